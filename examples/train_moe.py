"""Train a decoder-only MoE transformer with moe_ascend, expert parallel over every rank of a job.

    moe-ascend launch --nodes 2 --ranks-per-node 1 --inter-node-bandwidth 1gbit -- \\
        python examples/train_moe.py --steps 200 --techniques all --checkpoint ckpt/
    # later, or after a crash: the same command with --resume continues from ckpt/ where it stopped

The model: byte embeddings, ``--layers`` blocks of causal attention and an MoE
feed-forward (``runtime.MoELayer``: ``--experts`` routed SwiGLU experts, ``--top-k`` of them (64 and 8 by
default, of FFN 1024: fine-grained, as the seeds' models are),
capacity factor 1.25, one shared expert, Switch Transformer's balance loss;
``--router sigmoid``: DeepSeek-V3's sigmoid router balanced without an auxiliary loss, its selection
bias nudged every step against the measured load, beside a balance loss of 1e-4), a tied output head.
The text is the bytes of Python's standard-library
sources: each rank reads its own windows, chosen by (seed, rank, step), so a
resumed run reads what the uninterrupted one would have. The experts are
spread over the ranks; the other weights are copies whose gradients are
averaged by one all-reduce after backward.

``--techniques`` (comma-separated, ``all`` or ``none``) picks what moe_ascend does:

    hierarchical  the two-step all-to-all across nodes        options["hierarchical_a2a"] = True
    overlap       chunked dispatch hidden under the experts   options["overlap"] = "auto"
    affinity      affinity routing (token, then expert choice) options["routing"] = "affinity"
    balance       EDPB: MoELayer(balance=True, one redundant slot per expert-parallel rank),
                  runtime.balance.ExpertBalancer

``--backend inductor`` is the baseline: plain Inductor, the flat all-to-all, token-choice top-k, no balancing.

Every ``--log-every`` steps rank 0 prints the loss (mean since the last line), tokens/s over the whole job
(every rank's tokens, the steps since the last line) and the communication the graphs left exposed, as
measured on their second call (``options["profile"]``). ``--checkpoint DIR`` saves every ``--save-every``
steps and at the end: one file per rank (its experts, optimizer states, the balancer, the losses so far).
``--record-loads FILE`` writes the (token, choice) pairs each expert was routed, every step and layer, summed
over the ranks: a ``[steps, layers, experts]`` tensor (``bench/balance.py`` replays it at expert-parallel scale).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import stdlib_bytes  # noqa: E402  (real text on every machine)

from moe_ascend.compiler import backend, profile  # noqa: E402
from moe_ascend.runtime import add_routing_state  # noqa: E402
from moe_ascend.runtime import MoELayer, traffic  # noqa: E402
from moe_ascend.runtime.balance import ExpertBalancer, Stopwatch  # noqa: E402
from moe_ascend.runtime.data_parallel import average_gradients  # noqa: E402
from moe_ascend.runtime.launcher import end_process_group  # noqa: E402

TECHNIQUES = ("hierarchical", "overlap", "affinity", "balance")
CAPACITY_FACTOR, AUX_LOSS_COEFF = 1.25, 0.01
SIGMOID_AUX_LOSS_COEFF = 1e-4  # --router sigmoid: the small balance loss beside the bias


def techniques_from(text: str) -> tuple[str, ...]:
    """``all``, ``none`` or a comma-separated subset of ``TECHNIQUES``."""
    if text in ("all", "none"):
        return TECHNIQUES if text == "all" else ()
    chosen = tuple(t for t in text.split(",") if t)
    unknown = sorted(set(chosen) - set(TECHNIQUES))
    if unknown:
        raise SystemExit(f"--techniques: unknown {unknown}; give all, none or a comma-separated subset of {TECHNIQUES}")
    return chosen


def backend_options(techniques: tuple[str, ...], chunks: str = "auto", profile: bool = True,
                    target: str = "auto", dump_dir: str | None = None) -> dict:
    """The moe_ascend options that turn on ``techniques`` and nothing else (balancing is the layers' and the
    balancer's, not the compiler's); ``chunks``: the overlap's chunk count, or "auto"; ``target``: what lowers
    the transformed graphs; ``dump_dir``: where the graphs of every pass go (one folder per rank)."""
    overlap = (chunks if chunks == "auto" else int(chunks)) if "overlap" in techniques else False
    return {"hierarchical_a2a": "hierarchical" in techniques, "overlap": overlap,
            "routing": "affinity" if "affinity" in techniques else "keep", "profile": profile,
            "target": target} | ({"dump_dir": dump_dir} if dump_dir else {})


class RecordedMoE(MoELayer):
    """The MoE layer, counting the (token, choice) pairs routed to each expert (``--record-loads``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("routed", torch.zeros(self.num_experts, dtype=torch.int64), persistent=False)

    def route(self, tokens):
        weights, expert_ids = super().route(tokens)
        self.routed.index_add_(0, expert_ids.flatten(), torch.ones_like(expert_ids.flatten()))
        return weights, expert_ids


class Block(nn.Module):
    def __init__(self, args, ep_group, balance: bool):
        super().__init__()
        self.heads = args.heads
        self.norm1, self.norm2 = nn.LayerNorm(args.width), nn.LayerNorm(args.width)
        self.qkv = nn.Linear(args.width, 3 * args.width, bias=False)
        self.proj = nn.Linear(args.width, args.width, bias=False)
        sigmoid = args.router == "sigmoid"
        self.moe = (RecordedMoE if args.record_loads else MoELayer)(
            args.width, args.ffn, args.experts, top_k=args.top_k, capacity_factor=CAPACITY_FACTOR,
            ep_group=ep_group, num_shared_experts=1, balance=balance, score=args.router,
            aux_loss_coeff=SIGMOID_AUX_LOSS_COEFF if sigmoid else AUX_LOSS_COEFF,
            router_bias_update=args.router_bias_update if sigmoid else 0.0,
            # one spare slot per rank: the slots must split evenly over the ranks
            redundant_experts=(dist.get_world_size(ep_group) if ep_group is not None else 1) if balance else 0)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, s, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, s, d))
        return x + self.moe(self.norm2(x))


class MoETransformer(nn.Module):
    def __init__(self, args, ep_group, balance: bool):
        super().__init__()
        self.embed = nn.Embedding(256, args.width)
        self.position = nn.Parameter(torch.zeros(args.seq_len, args.width))
        self.blocks = nn.ModuleList(Block(args, ep_group, balance) for _ in range(args.layers))
        self.norm = nn.LayerNorm(args.width)
        nn.init.normal_(self.embed.weight, std=0.02)  # the head is tied: keep the first logits small

    def forward(self, ids, targets):
        x = self.embed(ids) + self.position
        for block in self.blocks:
            x = block(x)
        logits = self.norm(x) @ self.embed.weight.t()
        loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
        return loss, loss + sum(block.moe.aux_loss for block in self.blocks)


def _compilations() -> int:
    """Graphs compiled in this process so far: Dynamo's, and moe_ascend's own (a routing phase's recompile)."""
    return counters["stats"]["unique_graphs"] + backend.graphs_compiled


def batch_at(data: torch.Tensor, step: int, rank: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows rank ``rank`` trains on at ``step``: the same whether the run was resumed or not."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=generator)
    window = torch.stack([data[s:s + args.seq_len + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


class Trainer:
    """One training run: its model, optimizer, compiled step, balancer and record, a block of steps at a time
    (``bench/e2e.py`` interleaves several in one job)."""

    def __init__(self, args):
        self.args, self.rank, self.world = args, dist.get_rank(), dist.get_world_size()
        self.techniques = () if args.backend == "inductor" else techniques_from(args.techniques)
        if args.experts % self.world:
            raise SystemExit(f"--experts {args.experts} must be a multiple of the {self.world} ranks (expert parallel "
                             "over all of them)")
        if args.router == "sigmoid" and "affinity" in self.techniques:
            raise SystemExit("--router sigmoid: affinity routing works on softmax routers only; leave affinity out of "
                             "--techniques or use --router softmax")
        torch.manual_seed(args.seed)  # the same copies of the shared weights on every rank
        ep_group = dist.group.WORLD if self.world > 1 else None
        self.model = MoETransformer(args, ep_group, balance="balance" in self.techniques)
        experts = ("w_gate_up", "w_down")
        self.shared = [p for name, p in self.model.named_parameters() if not name.endswith(experts)]
        self.experts = [p for name, p in self.model.named_parameters() if name.endswith(experts)]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr)
        self.stopwatch = Stopwatch()  # this run's steps only (the balancer's clock)
        self.balancer = ExpertBalancer(self.model, self.optimizer, interval=5, horizon=8, min_interval=20,
                                       clock=self.stopwatch) if "balance" in self.techniques else None
        options = ({} if args.backend == "inductor"
                   else {"options": backend_options(self.techniques, args.chunks, not args.no_profile,
                                                   args.target, args.dump_dir)})
        self.compiled = torch.compile(self.model, backend=args.backend, **options)
        self.data = stdlib_bytes()
        self.step, self.losses, self.seconds = 0, [], []  # seconds: each step's, slowest rank
        self.compiled_at: list[int] = []  # the steps that compiled a graph (left out of tokens/s)
        self.graphs: set[str] = set()  # the compiled graphs that are this run's (others may share the process)
        self.inter_node_bytes = 0
        self.loads: list[torch.Tensor] = []  # --record-loads: [layers, experts] a step, every rank's

    def train(self, until: int) -> None:
        """Train up to step ``until``."""
        while self.step < until:
            graphs, sent = set(profile.measured_timelines()), traffic.read().inter_node
            compiled = _compilations()
            with self.stopwatch:
                seconds, loss = self._step()
            if _compilations() != compiled:
                self.compiled_at.append(self.step)
            self.graphs |= set(profile.measured_timelines()) - graphs  # (other runs may share this process)
            self.inter_node_bytes += traffic.read().inter_node - sent
            self.seconds.append(seconds)
            self.losses.append(loss)
            if self.args.record_loads:
                self.loads.append(self._routed())
            self.step += 1
            if self.rank == 0 and self.args.log_every and (self.step % self.args.log_every == 0 or self.step == until):
                print(self.progress_line(), flush=True)
            if self.args.checkpoint and self.args.save_every and self.step % self.args.save_every == 0:
                self.save()

    def _step(self) -> tuple[float, float]:
        """One training step: the slowest rank's seconds, and the loss averaged over the ranks' batches."""
        ids, targets = batch_at(self.data, self.step, self.rank, self.args)
        started = time.perf_counter()
        loss, total = self.compiled(ids, targets)
        total.backward()
        self._average_shared_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        measured = torch.tensor([time.perf_counter() - started, loss.item()], dtype=torch.float64)
        if self.world > 1:
            seconds, mean_loss = measured[:1], measured[1:]
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            dist.all_reduce(mean_loss)
            measured[1] /= self.world
        return float(measured[0]), float(measured[1])

    def _routed(self) -> torch.Tensor:
        """This step's (token, choice) pairs per expert and layer, every rank's; the counters start again."""
        routed = torch.stack([block.moe.routed for block in self.model.blocks])
        if self.world > 1:
            dist.all_reduce(routed)
        for block in self.model.blocks:
            block.moe.routed.zero_()
        return routed

    def _average_shared_gradients(self) -> None:
        """The gradients of the mean loss over every rank's batch: the copies' averaged over the ranks (one
        bucket); each rank's experts already have every rank's tokens' gradients, summed, so divided by the ranks."""
        if self.world == 1:
            return
        average_gradients(self.shared)
        for p in self.experts:
            p.grad /= self.world

    # --- what it reports -------------------------------------------------------------------------

    def tokens_per_s(self, since: int = 0) -> float:
        """Every rank's tokens over the slowest rank's seconds, the steps from ``since`` on that compiled nothing
        (a compile happens once a run, and once a layer when affinity routing switches; a migration, counted, is
        the balancer's running cost)."""
        seconds = [t for step, t in enumerate(self.seconds) if step >= since and step not in self.compiled_at]
        if not seconds:
            return float("nan")
        return len(seconds) * self.args.batch * self.args.seq_len * self.world / sum(seconds)

    def exposed_comm_s(self) -> float | None:
        """The communication the graphs left exposed in one step (forward and backward), as measured on their
        second call; None before it."""
        measured = profile.measured_timelines()
        return sum(measured[g].exposed_comm_s for g in self.graphs) if self.graphs else None

    def progress_line(self) -> str:
        every = self.args.log_every
        exposed = self.exposed_comm_s()
        return (f"step {self.step:5d}  loss {sum(self.losses[-every:]) / len(self.losses[-every:]):.4f}  "
                f"{self.tokens_per_s(max(0, self.step - every)):8.0f} tokens/s  exposed comm "
                + (f"{exposed * 1e3:.1f} ms/step" if exposed is not None else "(not measured yet)")
                + f"  sent {self.inter_node_bytes / 2**20 / max(1, self.step):.2f} MiB/step inter-node")

    def result(self, warmup: int) -> dict:
        return {"backend": self.args.backend, "techniques": list(self.techniques), "steps": self.step,
                "tokens_per_s": self.tokens_per_s(warmup), "step_s": self.seconds, "losses": self.losses,
                "compiled_at": self.compiled_at,
                "final_loss": sum(self.losses[-self.args.average:]) / len(self.losses[-self.args.average:]),
                "exposed_comm_s": self.exposed_comm_s(), "inter_node_bytes_per_step": self.inter_node_bytes / self.step,
                "migrations": len(self.balancer.migrations) if self.balancer else 0}

    # --- checkpoints -----------------------------------------------------------------------------

    def _path(self) -> Path:
        return Path(self.args.checkpoint) / f"rank{self.rank}-of-{self.world}.pt"

    def save(self) -> None:
        """This rank's part: its model (its experts, the copies), optimizer, balancer and the record so far."""
        path = self._path()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"run": self._identity(), "step": self.step, "losses": self.losses, "seconds": self.seconds,
                 "compiled_at": self.compiled_at,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "balancer": self.balancer.state_dict() if self.balancer else None}
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # a crash mid-save keeps the previous checkpoint

    def resume(self) -> bool:
        """Continue from this rank's checkpoint, if there is one (False: start afresh)."""
        path = self._path()
        if not path.exists():
            return False
        state = torch.load(path, weights_only=False)
        if state["run"] != self._identity():
            raise SystemExit(f"{path} was saved by a different run ({state['run']}); this one is {self._identity()}: "
                             "resume with the same arguments, or give another --checkpoint")
        if "affinity" in self.techniques:  # the routing state the pass keeps on each gate, made before loading
            for block in self.model.blocks:
                add_routing_state(block.moe.gate)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.balancer:
            self.balancer.load_state_dict(state["balancer"])
        self.step, self.losses, self.seconds = state["step"], state["losses"], state["seconds"]
        self.compiled_at = state["compiled_at"]
        return True

    def _identity(self) -> dict:
        keep = ("backend", "layers", "width", "heads", "ffn", "experts", "seq_len", "batch", "lr", "seed", "router",
                "router_bias_update")
        return {**{k: getattr(self.args, k) for k in keep}, "techniques": list(self.techniques), "world": self.world}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--techniques", default="all", help=f"all, none, or a comma-separated subset of {TECHNIQUES}")
    p.add_argument("--backend", default="moe_ascend", choices=("moe_ascend", "inductor"))
    p.add_argument("--target", default="auto", choices=("auto", "inductor", "eager"),
                   help="what lowers moe_ascend's transformed graphs (eager: no Inductor, quicker to compile)")
    p.add_argument("--chunks", default="auto", help="the overlap's chunk count (2 or more), or auto")
    p.add_argument("--no-profile", action="store_true", help="do not measure the exposed communication")
    p.add_argument("--dump-dir", default=None, help="write every pass's graphs here (moe-ascend inspect reads them)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024, help="hidden units of each expert")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8, help="routed experts per token")
    p.add_argument("--router", default="softmax", choices=("softmax", "sigmoid"),
                   help="softmax top-k with Switch's balance loss, or DeepSeek-V3's sigmoid router balanced by its "
                        "selection bias (no affinity routing)")
    p.add_argument("--router-bias-update", type=float, default=1e-3,
                   help="--router sigmoid: the bias's step against the measured load each step (DeepSeek-V3's γ)")
    p.add_argument("--record-loads", default=None, metavar="FILE",
                   help="save each step's (token, choice) pairs per layer and expert, summed over the ranks")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--average", type=int, default=20, help="steps the final loss averages")
    p.add_argument("--checkpoint", default=None, help="folder of the checkpoint (one file per rank)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint where it stopped")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.resume and not args.checkpoint:
        raise SystemExit("--resume needs --checkpoint DIR")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        trainer = Trainer(args)
        if args.resume and trainer.resume() and trainer.rank == 0:
            print(f"resumed at step {trainer.step} from {args.checkpoint}", flush=True)
        trainer.train(args.steps)
        if args.checkpoint:
            trainer.save()
        if args.record_loads and trainer.rank == 0:
            torch.save(torch.stack(trainer.loads), args.record_loads)
        if trainer.rank == 0:
            print("RESULT " + json.dumps(trainer.result(warmup=min(3, max(0, trainer.step - 1)))), flush=True)
    finally:
        end_process_group()


if __name__ == "__main__":
    main()
