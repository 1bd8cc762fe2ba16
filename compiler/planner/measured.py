"""The planner's measured set: MoE transformer training steps run on the emulated cluster, timed and sized, and
the step model's predictions of the same steps.

    runs = measure(MEASURED_SET, Hardware.load("cpu-calibrated"))   # a launch per (layout, bandwidth)
    errors(runs)       # mean and max |predicted / measured - 1|, pairs kept in order, memory errors

Each configuration trains ``WORKLOAD`` (a decoder of ``layers`` blocks: causal attention, then an MoE layer of
``runtime.MoELayer`` with capacity factor 1, so every expert computes exactly ``k·T/E`` rows) compiled by the
moe_ascend backend, with Adam in fp32 on one thread per rank. Data parallel is every rank; expert parallel is
every rank too (the experts spread over them) or none; the weights every rank holds a copy of have their
gradients summed by one all-reduce after backward (not overlapped). A configuration is its layout
(``NODESxRANKS_PER_NODE``), the inter-node bandwidth, top-k, the expert-parallel size, the flat or hierarchical
all-to-all and the overlap chunk count. The step time is the median
over ``steps`` steps of the slowest rank; the peak memory is the tensors alive at once in one more step, profiled
(``torch.profiler``'s allocation events, on top of the weights, gradients and optimizer states already held).

The predictions use the rates of ``moe-ascend calibrate``'s micro-benchmarks (none of them these runs), measured in
each run's own job before, halfway through and after its steps and averaged (the shared host's speed drifts by
tens of percent over minutes), on the run's ranks per node.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from moe_ascend.compiler.planner.calibrate import compute_here, compute_profile, largest_over_ranks, link_here, pooled
from moe_ascend.compiler.planner.step_model import Hardware, MoEModel, PlannerError, StepModel
from moe_ascend.runtime.data_parallel import average_gradients
from moe_ascend.runtime.launcher import end_process_group

# the model every configuration trains (top-k and the batch set per configuration); fp32 as CPUs train, its norms,
# SwiGLU and attention written as separate torch ops
WORKLOAD = MoEModel(name="emulated-moe", layers=2, hidden=256, heads=4, head_dim=64, vocab=256, experts=8, top_k=2,
                    expert_ffn=512, sequence=128, global_batch=4, dtype_bytes=4, distributed_optimizer=False,
                    overlap_grad_sync=False, fused_kernels=False)
MICRO_BATCH = 4  # sequences per rank


@dataclass(frozen=True)
class RunConfig:
    """One measured configuration."""

    layout: str  # NODESxRANKS_PER_NODE
    bandwidth: str  # the inter-node uplinks' shaped rate
    top_k: int
    hierarchical: bool = False
    chunks: int = 1
    ep: int = 2  # expert-parallel ranks (the rest of data parallel holds copies of the experts)
    target: str = "auto"  # what lowers the transformed graphs (the backend's option)

    @property
    def nodes(self) -> int:
        return int(self.layout.split("x")[0])

    @property
    def ranks_per_node(self) -> int:
        return int(self.layout.split("x")[1])

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    def options(self) -> dict:
        """The backend options that give this configuration."""
        return {"hierarchical_a2a": self.hierarchical, "overlap": self.chunks if self.chunks > 1 else False,
                "target": self.target}

    def model(self) -> MoEModel:
        return dataclasses.replace(WORKLOAD, top_k=self.top_k, global_batch=MICRO_BATCH * self.world)


def _measured_set() -> tuple[RunConfig, ...]:
    """Two ranks (one per core, DESIGN.md, Benchmarks) on one node or two: expert parallel over both or none,
    top-1, 2 or 4 of 8 experts, the flat or hierarchical all-to-all, 1, 2 or 4 chunks, 200 Mbit/s or 1 Gbit/s."""
    configs = [RunConfig("1x2", "1gbit", k, ep=1) for k in (1, 2, 4)]
    configs += [RunConfig("1x2", "1gbit", k, chunks=n) for k in (1, 2, 4) for n in (1, 2)]
    configs += [RunConfig("2x1", "1gbit", 2, ep=1)]
    for bandwidth in ("200mbit", "1gbit"):
        for k in (1, 2, 4):
            configs += [RunConfig("2x1", bandwidth, k), RunConfig("2x1", bandwidth, k, hierarchical=True),
                        RunConfig("2x1", bandwidth, k, chunks=2), RunConfig("2x1", bandwidth, k, chunks=4)]
    return tuple(configs)


MEASURED_SET = _measured_set()


def run_hardware(config: RunConfig, base: Hardware, compute: dict, link: dict | None) -> Hardware:
    """``base`` with what the run's own job measured beside its steps: the compute rates
    (``calibrate.compute_here``) and the link its ranks exchange on (``calibrate.link_here``; none on one rank)."""
    changes = compute_profile(compute) | {"ranks_per_node": config.ranks_per_node}
    if link is not None:
        side = "inter" if config.nodes > 1 else "intra"
        changes |= {f"{side}_node_bandwidth": link["bandwidth"], f"{side}_node_latency": link["latency"],
                    "overlap_efficiency": link["overlap"]}
    return dataclasses.replace(base, **changes)


def predict(config: RunConfig, hardware: Hardware) -> dict[str, float]:
    """The step model's step time and peak memory of one rank for ``config`` on ``hardware`` (``run_hardware``)."""
    world = config.world
    out = StepModel(config.model(), hardware, world).evaluate(dict(
        tp=1, ep=config.ep, pp=1, vpp=1, dp=world, mb=MICRO_BATCH, recompute=0, chunks=config.chunks,
        hierarchical=int(config.hierarchical)))
    return {"step_s": float(out["step_s"]), "memory_bytes": float(out["memory_bytes"])}


def errors(runs: list[dict]) -> dict[str, float]:
    """Mean and largest relative error of the predicted step times, the share of pairs of runs whose order by
    measured step time the predictions keep, and the mean and largest relative error of the predicted memory."""
    predicted = np.array([r["predicted_step_s"] for r in runs])
    measured = np.array([r["step_s"] for r in runs])
    relative = np.abs(predicted / measured - 1)
    pairs = [(i, j) for i in range(len(runs)) for j in range(i + 1, len(runs)) if measured[i] != measured[j]]
    kept = sum((predicted[i] - predicted[j]) * (measured[i] - measured[j]) > 0 for i, j in pairs)
    memory = np.array([r["predicted_memory_bytes"] / r["memory_bytes"] - 1 for r in runs])
    return {"mean_abs_error": float(relative.mean()), "max_error": float(relative.max()),
            "pairwise_order_kept": kept / len(pairs) if pairs else 1.0,
            "memory_mean_abs_error": float(np.abs(memory).mean()), "memory_max_error": float(np.abs(memory).max())}


def measure(configs, base: Hardware, steps: int = 15, log=print, calibrations: int = 3) -> list[dict]:
    """Run each configuration on the emulated cluster (one launch per layout and bandwidth); each run's measured and
    predicted figures (on ``run_hardware``), in ``configs``' order. A job that fails drops its runs, said in
    ``log``; the others stand. Each run calibrates ``calibrations`` times: before its steps, then spread over them
    (the host's speed drifts over minutes), and predicts with their mean."""
    import subprocess

    if calibrations < 1:
        raise PlannerError(f"calibrations={calibrations}: a run needs at least one calibration to predict with")
    groups: dict[tuple[str, str], list[RunConfig]] = {}
    for config in configs:
        groups.setdefault((config.layout, config.bandwidth), []).append(config)
    results: dict[RunConfig, dict] = {}
    for (layout, bandwidth), group in groups.items():
        first = group[0]
        command = [sys.executable, "-m", "moe_ascend.compiler.cli", "launch", "--nodes", str(first.nodes),
                   "--ranks-per-node", str(first.ranks_per_node), "--inter-node-bandwidth", bandwidth, "--",
                   sys.executable, "-m", "moe_ascend.compiler.planner.measured", str(steps), str(calibrations),
                   json.dumps([dataclasses.asdict(c) for c in group])]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line.split("RESULT ", 1)[1] for line in done.stdout.splitlines() if line.startswith("[r0] RESULT ")]
        if done.returncode != 0 or len(lines) != len(group):  # (a noisy host): the set goes on without them
            said = (done.stdout + done.stderr).strip().splitlines()
            log(f"{layout} {bandwidth:>7}: dropped {len(group)} runs, their job failed (exit {done.returncode})"
                + (f": {said[-1]}" if said else ""))
            continue
        for config, line in zip(group, lines):
            run = json.loads(line)
            predicted = predict(config, run_hardware(config, base, run["calibration"]["compute"],
                                                     run["calibration"]["link"]))
            run |= {"predicted_step_s": predicted["step_s"], "predicted_memory_bytes": predicted["memory_bytes"]}
            results[config] = run
            log(f"{layout} {bandwidth:>7} ep {config.ep} top-{config.top_k} "
                f"{'hier' if config.hierarchical else 'flat'} "
                f"chunks {config.chunks}: measured {run['step_s'] * 1e3:7.1f} ms, predicted "
                f"{run['predicted_step_s'] * 1e3:7.1f} ms ({run['predicted_step_s'] / run['step_s'] - 1:+.0%}); "
                f"memory {run['memory_bytes'] / 2**20:6.1f} MiB, "
                f"predicted {run['predicted_memory_bytes'] / 2**20:6.1f}")
    if not results:
        raise PlannerError("every measured run failed; see the lines above")
    return [results[c] for c in configs if c in results]


# --- one rank of a measured job (run under the launcher) -------------------------------------------

def _workload(config: RunConfig):
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F

    from moe_ascend.runtime.moe_layer import MoELayer

    m = config.model()
    group = dist.group.WORLD if config.ep > 1 else None

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(m.hidden), nn.LayerNorm(m.hidden)
            self.qkv = nn.Linear(m.hidden, 3 * m.heads * m.head_dim, bias=False)
            self.proj = nn.Linear(m.heads * m.head_dim, m.hidden, bias=False)
            self.moe = MoELayer(m.hidden, m.expert_ffn, m.experts, m.top_k, capacity_factor=1.0, ep_group=group)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, s, 3, m.heads, m.head_dim).transpose(1, 3).unbind(2)
            attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(attention.transpose(1, 2).reshape(b, s, -1))
            return x + self.moe(self.norm2(x))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(m.vocab, m.hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(m.layers))
            self.norm, self.out = nn.LayerNorm(m.hidden), nn.Linear(m.hidden, m.vocab, bias=False)

        def forward(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return self.out(self.norm(x))

    torch.manual_seed(0)  # the same copies of the shared weights on every rank
    model = Decoder()
    return model, torch.compile(model, backend="moe_ascend", options=config.options())


def _run(config: RunConfig, steps: int, calibrations: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    model, compiled = _workload(config)
    m = config.model()
    # every rank holds a copy of these (the experts too, without expert parallelism): their gradients are summed
    shared = [p for name, p in model.named_parameters() if config.ep == 1 or not name.endswith(("w_gate_up", "w_down"))]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(0, m.vocab, (MICRO_BATCH, m.sequence + 1), generator=generator)

    def step() -> None:
        logits = compiled(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, m.vocab), ids[:, 1:].reshape(-1)).backward()
        average_gradients(shared)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradient buffers held, as Megatron's are

    def calibration() -> dict:
        return {"compute": compute_here(repeats=3),
                "link": dataclasses.asdict(link_here(repeats=3)) if config.world > 1 else None}

    def timed(count: int) -> list[float]:
        """The slowest rank's seconds of ``count`` steps."""
        times = []
        for _ in range(count):
            dist.barrier()
            started = time.perf_counter()
            step()
            times.append(largest_over_ranks(time.perf_counter() - started))
        return times

    for _ in range(2):  # compile, and the optimizer's states
        step()
    measured, times = [calibration()], []
    for part in range(1, calibrations):  # the rest of the calibrations spread over the steps
        times += timed(steps * part // (calibrations - 1) - len(times))
        measured.append(calibration())
    times += timed(steps - len(times))
    held = sum(t.numel() * t.element_size() for p in model.parameters()
               for t in (p, p.grad, *optimizer.state[p].values()) if t is not None and t.dim() > 0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocated = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return {**dataclasses.asdict(config), "step_s": statistics.median(times), "times_s": times,
            "memory_bytes": largest_over_ranks(float(held + peak)), "held_bytes": held,
            "calibration": {"compute": _mean([c["compute"] for c in measured]),
                            "link": pooled([c["link"] for c in measured]) if config.world > 1 else None}}


def _mean(measured: list):
    """The element-wise mean of equally shaped measurements (dicts, lists and numbers)."""
    first = measured[0]
    if isinstance(first, dict):
        return {key: _mean([m[key] for m in measured]) for key in first}
    if isinstance(first, list):
        return [_mean(list(column)) for column in zip(*measured)]
    return float(np.mean(measured))


def _worker(steps: str, calibrations: str, configs: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for fields in json.loads(configs):
            run = _run(RunConfig(**fields), int(steps), int(calibrations))
            if dist.get_rank() == 0:
                print("RESULT " + json.dumps(run), flush=True)
            torch._dynamo.reset()
    finally:
        end_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
