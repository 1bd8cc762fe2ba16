"""Routing quality: top-2 with capacity factor 1.25 against affinity routing, same model, seed, data and steps.

    python bench/routing_quality.py [--steps 200] [--json PATH]

A small MoE language model learns the bytes of Python's standard-library
sources (90 % to train, the rest to validate). Both runs compile with
``backend="moe_ascend"``; the affinity run adds ``routing="affinity"``, which
starts in token choice and switches each layer to expert choice when its
measured affinity says so (``passes.affinity_routing``).

Both runs add Switch Transformer's load-balancing loss (coefficient 0.01) to the
training loss; the validation loss is the cross-entropy alone, of the compiled
model, so each run is judged with the router it trained with (the uncompiled
module would route the affinity run's tokens by plain top-2 of the logits in the
layer's own capacity: ``val_loss_plain_router``, beside it). Tokens per expert
are the slots each expert computes per step: the static capacity C of the graph
that ran (the layer's ``ceil(1.25 · 2T / E)``, or the expert-choice C once a
layer switched). The dropped-pair rate (of (token, choice) pairs, no slot) and
the dropped-token rate (tokens with none of their choices kept) are measured on
a validation batch by routing each layer's input in eager the way its graph does.
Writes bench/results/routing_quality.json (figure ``tokens_per_expert_reduction``
= 1 − affinity / baseline at the last step, top-level ``val_loss_ratio``) and a
PNG of the loss curves beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import write_result  # noqa: E402
from quickstart import batches, stdlib_bytes  # noqa: E402  (the quickstart's data: the standard library's bytes)

import moe_ascend.kernels as ops  # noqa: E402
from moe_ascend.kernels import affinity as kernels  # noqa: E402
from moe_ascend.kernels.affinity import expert_choice_capacity  # noqa: E402
from moe_ascend.runtime import MoELayer  # noqa: E402

D_MODEL, HEADS, LAYERS, EXPERTS, TOP_K, D_FF, CAPACITY_FACTOR = 64, 4, 2, 8, 2, 128, 1.25
AUX_LOSS_COEFF = 0.01  # Switch Transformer's balance loss, in both runs (Megatron's moe_aux_loss_coeff default)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.attention = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.moe = MoELayer(D_MODEL, D_FF, EXPERTS, TOP_K, capacity_factor=CAPACITY_FACTOR,
                            aux_loss_coeff=AUX_LOSS_COEFF)

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.moe(self.norm2(x))


class ByteLM(nn.Module):
    def __init__(self, sequence: int):
        super().__init__()
        self.embed = nn.Embedding(256, D_MODEL)
        self.position = nn.Parameter(torch.randn(sequence, D_MODEL) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D_MODEL)
        self.register_buffer("mask", torch.triu(torch.full((sequence, sequence), float("-inf")), 1))

    def forward(self, tokens):
        x = self.embed(tokens) + self.position
        for block in self.blocks:
            x = block(x, self.mask)
        return self.norm(x) @ self.embed.weight.t()


def slots_per_expert(model: ByteLM, tokens: int) -> list[int]:
    """The static capacity each layer's graph computes now."""
    per_layer = []
    for block in model.blocks:
        layer = block.moe
        state = getattr(layer.gate, kernels.STATE, None)
        if state is not None and float(state[kernels.PHASE]) == kernels.EXPERT_CHOICE:
            per_layer.append(expert_choice_capacity(tokens, D_MODEL, EXPERTS, layer.capacity(tokens), state))
        else:
            per_layer.append(layer.capacity(tokens))
    return per_layer


def dropped(model: ByteLM, tokens_in: torch.Tensor) -> tuple[float, float]:
    """The share of (token, choice) pairs that get no slot, and of tokens that get none of their choices (the
    residual alone carries them), each layer routed in eager as its graph routes."""
    seen = []
    hooks = [block.moe.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].reshape(-1, D_MODEL))))
             for block in model.blocks]
    with torch.no_grad():
        model(tokens_in)
    for hook in hooks:
        hook.remove()
    pairs_dropped = tokens_dropped = pairs = tokens = 0
    for layer, x in seen:
        state = getattr(layer.gate, kernels.STATE, None)
        if state is None:
            weights, ids = ops.topk_softmax(layer.gate(x), TOP_K, True)
            slots = ops.capacity_slots(ids, weights, EXPERTS, layer.capacity(x.shape[0]), "position")
        else:
            _, ids, delta = kernels.affinity_top_k(x, layer.gate.weight, layer.gate(x), TOP_K, True)
            if float(state[kernels.PHASE]) == kernels.EXPERT_CHOICE:
                capacity = expert_choice_capacity(x.shape[0], D_MODEL, EXPERTS, layer.capacity(x.shape[0]), state)
                slots = ops.capacity_slots(ids, delta.gather(1, ids), EXPERTS, capacity, "score")
            else:
                slots = ops.capacity_slots(ids, delta.gather(1, ids), EXPERTS, layer.capacity(x.shape[0]), "position")
        pairs_dropped += int((slots < 0).sum())
        tokens_dropped += int((slots < 0).all(dim=1).sum())
        pairs += slots.numel()
        tokens += slots.shape[0]
    return pairs_dropped / pairs, tokens_dropped / tokens


def validation_loss(model: nn.Module, val_batches: list) -> float:
    losses = [F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item() for x, y in val_batches]
    return sum(losses) / len(losses)


def train(routing: str, args, train_data, val_data) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = ByteLM(args.sequence)
    options = {"target": "eager", "routing": routing}
    compiled = torch.compile(model, backend="moe_ascend", options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    data = batches(train_data, args.batch, args.sequence, seed=1)
    tokens = args.batch * args.sequence
    losses, slots, step_s = [], [], []
    switched_at = [None] * LAYERS
    for step in range(args.steps):
        x, y = next(data)
        started = time.perf_counter()
        loss = F.cross_entropy(compiled(x).reshape(-1, 256), y.reshape(-1))
        balance_loss = sum(block.moe.aux_loss for block in model.blocks)
        optimizer.zero_grad(set_to_none=True)
        (loss + balance_loss).backward()
        optimizer.step()
        step_s.append(time.perf_counter() - started)
        losses.append(loss.item())
        per_layer = slots_per_expert(model, tokens)
        slots.append(sum(per_layer) / len(per_layer))
        for index, capacity in enumerate(per_layer):
            if switched_at[index] is None and capacity < model.blocks[index].moe.capacity(tokens):
                switched_at[index] = step
    model.eval()
    val = batches(val_data, args.batch, args.sequence, seed=2)
    with torch.no_grad():
        val_batches = [next(val) for _ in range(args.val_batches)]
        val_loss = validation_loss(compiled, val_batches)
        val_loss_plain_router = validation_loss(model, val_batches)
        pair_drops, token_drops = dropped(model, val_batches[0][0])
    late = step_s[len(step_s) // 2:]
    return {"routing": routing, "train_loss": losses, "balance_loss_last": balance_loss.item(), "val_loss": val_loss,
            "val_loss_plain_router": val_loss_plain_router,
            "tokens_per_expert": slots[-1], "tokens_per_expert_curve": slots, "dropped_pair_rate": pair_drops,
            "dropped_token_rate": token_drops, "switched_at_step": switched_at,
            "step_time_s_second_half_median": sorted(late)[len(late) // 2]}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for run in runs:
        smooth = [sum(run["train_loss"][max(0, i - 9):i + 1]) / len(run["train_loss"][max(0, i - 9):i + 1])
                  for i in range(len(run["train_loss"]))]
        axis.plot(smooth, label=f"{run['routing']} (val {run['val_loss']:.3f})")
        for step in run["switched_at_step"]:
            if step is not None:
                axis.axvline(step, linestyle=":", color="grey")
    axis.set_xlabel("step")
    axis.set_ylabel("train loss (10-step mean)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = stdlib_bytes(3_000_000)
    split = int(len(data) * 0.9)
    runs = [train(routing, args, data[:split], data[split:]) for routing in ("keep", "affinity")]
    baseline, affine = runs
    reduction = 1 - affine["tokens_per_expert"] / baseline["tokens_per_expert"]
    val_loss_ratio = affine["val_loss"] / baseline["val_loss"]
    figure = {"name": "tokens_per_expert_reduction", "value": reduction, "goal": 0.60, "higher_is_better": True}
    out = write_result("routing_quality", figure, runs, vars(args), args.json,
                       val_loss_ratio=val_loss_ratio)
    plot(runs, out.with_suffix(".png"))
    for run in runs:
        print(f"{run['routing']:>8}: val loss {run['val_loss']:.4f} (plain router {run['val_loss_plain_router']:.4f}), "
              f"tokens per expert {run['tokens_per_expert']:.0f}, dropped pairs {run['dropped_pair_rate']:.3f}, "
              f"tokens {run['dropped_token_rate']:.3f}, switched at {run['switched_at_step']}, "
              f"step {run['step_time_s_second_half_median'] * 1e3:.0f} ms")
    print(f"tokens_per_expert_reduction {reduction:.3f}, val_loss_ratio {val_loss_ratio:.4f}; wrote {out}")


if __name__ == "__main__":
    main()
