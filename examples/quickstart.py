"""Quickstart: compile a small MoE transformer with moe_ascend, train it on real text, look at the dumps.

    python examples/quickstart.py --steps 20 --dump-dir graphs/
    moe-ascend inspect graphs/

The model is plain PyTorch (nothing from moe_ascend inside it): causal
attention, then an MoE feed-forward with a softmax top-2 router over 8
experts, GShard-style capacity dispatch, and a load-balancing loss. The
text is the bytes of Python's own standard-library sources, so it runs on
any machine with nothing to download.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoEFeedForward(nn.Module):
    """Top-k routing over ``num_experts`` expert MLPs with capacity ``C = ceil(k·T/E·capacity_factor)``."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 8, top_k: int = 2, capacity_factor: float = 1.25):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_out = nn.Parameter(torch.randn(num_experts, d_ff, d_model) / math.sqrt(d_ff))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, d = x.shape
        tokens = x.reshape(-1, d)
        num_tokens, E, k = tokens.shape[0], self.num_experts, self.top_k
        capacity = math.ceil(k * num_tokens / E * self.capacity_factor)

        probs = torch.softmax(self.gate(tokens), dim=-1)
        weights, experts = torch.topk(probs, k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)

        # Slot of each (choice, token) in its expert's buffer: first choices first, then by position.
        choice_mask = F.one_hot(experts.t().reshape(-1), E)  # [k·T, E]
        position = (torch.cumsum(choice_mask, dim=0) - 1) * choice_mask
        kept = choice_mask * (position < capacity)
        slots = F.one_hot(position.clamp(max=capacity - 1), capacity) * kept.unsqueeze(-1)  # [k·T, E, C]
        slots = slots.reshape(k, num_tokens, E, capacity).to(x.dtype)
        dispatch = slots.sum(dim=0)  # [T, E, C]
        combine = (slots * weights.t().reshape(k, num_tokens, 1, 1)).sum(dim=0)

        expert_in = torch.einsum("tec,td->ecd", dispatch, tokens)
        expert_out = torch.bmm(F.gelu(torch.bmm(expert_in, self.w_in)), self.w_out)
        out = torch.einsum("tec,ecd->td", combine, expert_out)

        # Switch-Transformer load-balancing loss: E · Σ_e (fraction routed to e) · (mean prob of e).
        routed = F.one_hot(experts[:, 0], E).to(x.dtype).mean(dim=0)
        aux_loss = E * (routed * probs.mean(dim=0)).sum()
        return out.reshape(batch, seq, d), aux_loss


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, num_experts: int, top_k: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.moe = MoEFeedForward(d_model, d_ff, num_experts, top_k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(batch, seq, 3, self.n_heads, d // self.n_heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, d))
        moe_out, aux_loss = self.moe(self.norm2(x))
        return x + moe_out, aux_loss


class MoETransformer(nn.Module):
    """A byte-level decoder: embedding, ``n_layers`` attention + MoE blocks, a tied output head."""

    def __init__(self, d_model=64, n_heads=4, d_ff=128, n_layers=2, num_experts=8, top_k=2, seq_len=64, vocab=256):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, num_experts, top_k) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # the head is tied: keep the first logits small

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, aux_weight: float = 0.01) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        aux_total = x.new_zeros(())
        for block in self.blocks:
            x, aux_loss = block(x)
            aux_total = aux_total + aux_loss
        logits = self.norm(x) @ self.embed.weight.t()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) + aux_weight * aux_total


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """The bytes of the standard library's Python sources, in a fixed order: real text on every machine."""
    chunks, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq_len: int, seed: int = 0):
    """Endless random windows of ``seq_len + 1`` bytes: inputs and next-byte targets."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--target", default="auto", help="auto | inductor | eager | ascend")
    parser.add_argument("--dump-dir", default="graphs")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = MoETransformer(seq_len=args.seq_len)
    compiled = torch.compile(model, backend="moe_ascend", options={"target": args.target, "dump_dir": args.dump_dir})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = batches(stdlib_bytes(), args.batch, args.seq_len)

    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, targets = next(data)
        loss = compiled(ids, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - started:.1f}s)", flush=True)
    index = Path(args.dump_dir).resolve() / "index.html"
    print(f"dumps: {index}  (or: moe-ascend inspect {args.dump_dir})")


if __name__ == "__main__":
    main()
