"""Training step time of a MoE transformer with the all-to-all hidden under computation, on the emulated cluster.

The model (``--layers`` blocks: attention, then a capacity-mode MoE layer with
fine-grained routed experts and a shared one, expert parallel over all ranks)
is shaped like the seeds' models; on links scaled to a real cluster's balance (``--regimes``, the
first: ascend-910b) its all-to-all is about as long as its compute, as
DeepSeek-V3 reports for real clusters (``comm_share``: T_comm_only over the
serial step, 35-60 % is that regime). Each rank times forward + backward
of the model compiled these ways (``--configs`` picks some), in rounds, the order rotating every round:

    inductor     torch.compile(backend="inductor"): the baseline
    off          moe_ascend, overlap=False: one all-to-all each way, waited at once (T_serial)
    n=2, n=4     moe_ascend, the exchange in 2 / 4 chunks, scheduled to overlap
    auto         moe_ascend, overlap="auto": the cost model's choice of chunks or token groups, where grouping
                 keeps the numerics (every layer's capacity holds its tokens; not this model's)
    g=2, g=4     moe_ascend, overlap={"token_groups": g, "changes_numerics": True}: the batch in g groups whose
                 exchanges hide under each other's attention and experts (each group's capacity is 1/g of the
                 layer's, so it may drop other tokens: ``max_abs_diff_vs_off`` is its output against off's)
    auto+drops   moe_ascend, overlap={"token_groups": "auto", "changes_numerics": True}: the cost model's choice
                 with grouping allowed to drop as g=2 does

and beside each moe_ascend one, the same compiled step with every all-to-all
replaced by a local copy of the same size (T_compute_only, a post_grad pass
given through options["passes"]) and the step's all-to-alls alone, replayed in
their order with the same sizes (T_comm_only). A step's time is the slowest
rank's; the median over rounds is reported.

    hidden fraction = (T_serial - T_step) / (T_serial - T_compute_only)

Beside it, the CPU time the replayed all-to-alls take on the busiest rank
(``comm_cpu_s``: gloo's threads and the kernel's TCP work, which a NIC's DMA
does on real hardware) bounds what this machine can hide: with one core per
rank that CPU time cannot run under the rank's compute, so

    hidden_fraction_ceiling = 1 - comm_cpu_s / (T_serial - T_compute_only)

and ``host_comm_share = comm_cpu_s / T_comm_only``, the fidelity of the regime (at most 0.05 with a core per rank).
No schedule makes a step shorter than its compute alone or its communication alone, so

    hidden_fraction_bound = (T_serial - max(T_compute_only, T_comm_only)) / (T_serial - T_compute_only)

is the most any overlap can hide: below 1 wherever the link takes longer than the compute.

Each moe_ascend config's second warm-up step runs under the profiler (``options["profile"]``): rank 0's measured
timeline of each graph (compute, transfers, waits) goes into its run, drawn as ``overlap-LAYOUT-REGIME-CONFIG.png``
beside the JSON.

hierarchical_a2a is off throughout: this measures overlap alone (the two-step
exchange has bench/a2a.py). The figure is auto's hidden fraction on 2 nodes x
1 rank in the first regime; the 1 Gbit/s run is reported beside it (and 2 x 2, four ranks on two cores,
DESIGN.md, with ``--layouts 2x1,2x2``).

    python bench/overlap.py                      # 2 x 1, scaled and 1 Gbit/s (launches the cluster itself)
    python bench/overlap.py --layouts 2x1,2x2 --rounds 7 --configs inductor,off,n=2,n=4,auto,g=2,g=4
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_regime_arguments, anchored_figure, cpu_seconds, host_comm_share_checked, median,  # noqa: E402
                     run_layouts, worker_arguments, write_cluster_result)

CONFIGS = {"inductor": None, "off": False, "n=2": 2, "n=4": 4, "auto": "auto",
           "g=2": {"token_groups": 2, "changes_numerics": True}, "g=4": {"token_groups": 4, "changes_numerics": True},
           "auto+drops": {"token_groups": "auto", "changes_numerics": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_regime_arguments(parser, "2x1")
    # experts wide enough that the serial step's communication share is inside the seeds' 35-60 % when scaled
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank (batch x sequence)")
    parser.add_argument("--sequence", type=int, default=256)
    parser.add_argument("--width", type=int, default=256, help="model width")
    parser.add_argument("--ffn", type=int, default=4096, help="hidden size of each expert (and of the shared one)")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--shared-experts", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--configs", default=",".join(c for c in CONFIGS if c not in ("n=4", "g=4")),
                        help="which of " + ", ".join(CONFIGS)
                        + " (off is always run: the hidden fractions are measured from it)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="output path (default bench/results/overlap.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown --configs {sorted(unknown)}; pick from {list(CONFIGS)}")
    if args.worker:
        return worker(args)

    print(f"{'layout':<7}{'config':<12}{'chunks':>7}{'groups':>7}{'T_step ms':>11}{'compute ms':>12}{'comm ms':>9}"
          f"{'hidden':>8}{'/max':>7}{'comm cpu ms':>13}{'ceiling':>9}{'comm share':>12}", flush=True)
    worker_args = worker_arguments(args)

    def show(run: dict) -> None:
        print(f"{run['layout']:<7}{run['config']:<12}{run['chunks'] or '':>7}{run['token_groups']:>7}"
              f"{run['T_step'] * 1e3:>11.1f}"
              + (f"{run['T_compute_only'] * 1e3:>12.1f}{run['T_comm_only'] * 1e3:>9.1f}{run['hidden_fraction']:>8.3f}"
                 f"{run['step_over_max']:>7.2f}{run['comm_cpu_s'] * 1e3:>13.1f}{run['hidden_fraction_ceiling']:>9.3f}"
                 f"{run['comm_share']:>12.3f}" if "T_compute_only" in run else ""), flush=True)

    runs = run_layouts(__file__, args, worker_args, show)
    out = Path(args.json).parent if args.json else Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        if run.get("timelines"):
            run["timeline_png"] = str(draw_timelines(run, out))
    figure = anchored_figure(runs, "hidden_fraction", "hidden_fraction", 0.90,
                             lambda r: r["layout"] == "2x1" and r["config"] == "auto")
    serial = next((r for r in runs if r["layout"] == "2x1" and r["config"] == "off"), None)
    share = host_comm_share_checked(serial["host_comm_share"], serial["layout"]) if serial else None
    path = write_cluster_result("overlap", figure, runs, args, host_comm_share=share,
                                baseline_comm_share=serial and serial["comm_share"], regime=serial and serial["regime"])
    bound = next((r["hidden_fraction_bound"] for r in runs if r["layout"] == "2x1" and r["config"] == "auto"), None)
    print(f"hidden_fraction (2x1, auto) = {figure['value']}  (goal >= 0.90, aiming at 0.95; no schedule hides more "
          f"than {bound} at this balance); the serial step's "
          f"communication share {serial and serial['comm_share']} (35-60 %: the seeds' regime), host_comm_share "
          f"{share} (<= 0.05)  -> {path}")


def worker(args) -> None:
    import logging

    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    import moe_ascend.compiler.backend  # noqa: F401  (registers the backend)
    from moe_ascend.compiler.profile import measured_timelines
    from moe_ascend.passes import PassResult, register_pass
    from moe_ascend.passes.analysis.ops import collective_group, is_collective, is_wait, op_name
    from moe_ascend.runtime.launcher import cluster_from_environment, end_process_group

    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # eleven compiled versions of one forward
    torch._dynamo.config.accumulated_recompile_limit = 256
    torch._inductor.config.fx_graph_cache = False  # the passes must run: they record each config's exchanges
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    exchanges: dict[str, list] = {}  # the config being compiled → its all-to-alls, forward then backward

    @register_pass(name="local_copies", stage="post_grad", after=("schedule_overlap",), before=("verify_collectives",),
                   enabled=False)
    def local_copies(gm, ctx):
        """Every all-to-all becomes a copy of its input (equal splits: the same size), its wait the copy."""
        for node in list(gm.graph.nodes):
            if is_collective(node) and op_name(node) == "all_to_all_single":
                with gm.graph.inserting_before(node):
                    copy = gm.graph.call_function(torch.ops.aten.clone.default, (node.args[0],))
                copy.meta["val"] = node.meta["val"]
                for wait in [u for u in node.users if is_wait(u)]:
                    wait.replace_all_uses_with(copy)
                    gm.graph.erase_node(wait)
                gm.graph.erase_node(node)
        return PassResult(gm, True)

    @register_pass(name="record_exchanges", stage="post_grad", after=("schedule_overlap",))
    def record_exchanges(gm, ctx):
        for node in gm.graph.nodes:
            if is_collective(node) and op_name(node) == "all_to_all_single":
                val = node.args[0].meta["val"]
                exchanges.setdefault(compiling, []).append((tuple(val.shape), val.dtype, collective_group(node)))
        return PassResult(gm, False)

    chosen, grouped = [], []
    logging.getLogger("moe_ascend").addHandler(_Chosen(chosen, grouped))
    logging.getLogger("moe_ascend").setLevel(logging.INFO)

    block = torch.nn.Sequential(*(Block(args.width, args.ffn, args.experts, args.top_k, args.shared_experts,
                                        heads=max(1, args.width // 64), seed=layer) for layer in range(args.layers)))
    configs = {name: overlap for name, overlap in CONFIGS.items() if name in args.configs.split(",") or name == "off"}
    torch.manual_seed(1 + rank)
    x = torch.randn(args.tokens // args.sequence, args.sequence, args.width)
    grad = torch.randn_like(x)

    def step(fn):
        fn(x).backward(grad)
        block.zero_grad(set_to_none=True)

    steps, chunks, groups, outputs, timelines = {}, {}, {}, {}, {}
    for name, overlap in configs.items():
        for variant in ("", " compute") if overlap is not None else ("",):
            compiling = name + variant
            if overlap is None:
                fn = torch.compile(block, backend="inductor")
            else:
                options = {"overlap": overlap, "hierarchical_a2a": False, "target": "inductor",
                           "passes": ["local_copies"] if variant else [], "profile": not variant}
                fn = torch.compile(block, backend="moe_ascend", options=options)
            del chosen[:], grouped[:]
            measured_before = measured_timelines()
            step(fn)
            step(fn)  # the second call is the profiled one
            steps[compiling] = fn
            if variant:
                continue
            outputs[name] = fn(x).detach()  # with grad: no inference graph compiled, none of its exchanges
            if overlap is not None:  # the third call ended the profiler's session
                timelines[name] = {graph: timeline.to_json() for graph, timeline in measured_timelines().items()
                                   if measured_before.get(graph) is not timeline}
            chunks[name] = chosen[0] if chosen else (1 if overlap is not None else None)
            groups[name] = grouped[0] if grouped else 1

    def replay(name):
        """The step's all-to-alls alone: same sizes, same groups, same order, each waited before the next."""
        for shape, dtype, group in exchanges.get(name, []):
            fc.wait_tensor(fc.all_to_all_single(torch.empty(shape, dtype=dtype), None, None, group))

    timed = {**{n: (lambda f=f: step(f)) for n, f in steps.items()},
             **{n + " comm": (lambda n=n: replay(n)) for n, o in configs.items() if o is not None}}
    times: dict[str, list[float]] = {n: [] for n in timed}
    cpu: dict[str, list[float]] = {n: [] for n in timed}  # the busiest rank's CPU seconds (all its threads)
    names = list(timed)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            dist.barrier()
            started, cpu_started = time.perf_counter(), cpu_seconds()
            timed[name]()
            elapsed = torch.tensor([time.perf_counter() - started, cpu_seconds() - cpu_started])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(elapsed[0].item())
            cpu[name].append(elapsed[1].item())

    if rank == 0:
        t = {n: median(v) for n, v in times.items()}
        serial = t["off"]
        cluster = cluster_from_environment()
        for name, overlap in configs.items():
            run = {"config": name, "chunks": chunks[name], "T_step": t[name], "T_step_all_s": times[name],
                   "shaped": cluster["shaped"], "ranks": dist.get_world_size(), "layers": args.layers,
                   "token_groups": groups[name],
                   "max_abs_diff_vs_off": float((outputs[name] - outputs["off"]).abs().max()),
                   "timelines": timelines.get(name, {})}
            if overlap is not None:
                compute, comm = t[name + " compute"], t[name + " comm"]
                comm_cpu = median(cpu[name + " comm"])
                run |= {"T_compute_only": compute, "T_comm_only": comm, "T_serial": serial,
                        "hidden_fraction": (serial - t[name]) / (serial - compute),
                        # A rank has one core: the CPU its transfers need cannot hide under its compute.
                        "comm_cpu_s": comm_cpu, "hidden_fraction_ceiling": 1 - comm_cpu / (serial - compute),
                        "step_over_max": t[name] / max(compute, comm),
                        "hidden_fraction_bound": (serial - max(compute, comm)) / (serial - compute),
                        # the communication's share of the serial step (T_comm_only against T_step), and the
                        # regime's fidelity: the busiest rank's CPU seconds in the exchanges over their wire seconds
                        "comm_share": comm / serial, "host_comm_share": comm_cpu / comm,
                        "T_compute_only_all_s": times[name + " compute"], "T_comm_only_all_s": times[name + " comm"]}
            print("RESULT " + json.dumps(run), flush=True)
    end_process_group()


def draw_timelines(run: dict, folder: Path) -> Path:
    """One config's measured timelines on a time axis: a row per graph and lane (compute, transfers, waits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"compute": "tab:blue", "comm": "tab:orange", "wait": "tab:red"}
    rows = [(graph, lane) for graph in sorted(run["timelines"]) for lane in ("compute", "comm", "wait")]
    fig, ax = plt.subplots(figsize=(12, 0.4 * len(rows) + 1.2))
    for y, (graph, lane) in enumerate(rows):
        events = [e for e in run["timelines"][graph]["events"] if e["lane"] == lane]
        ax.broken_barh([(e["start"] * 1e3, (e["end"] - e["start"]) * 1e3) for e in events], (y - 0.4, 0.8),
                       color=colours[lane])
    ax.set_yticks(range(len(rows)), [f"{graph} {lane}" for graph, lane in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms from the graph's start (rank 0, the profiled warm-up step)")
    ax.set_title(f"{run['layout']} {run['regime']} {run['config']}: T_step {run['T_step'] * 1e3:.0f} ms, "
                 f"hidden {run.get('hidden_fraction', 0):.2f}")
    fig.tight_layout()
    path = folder / f"overlap-{run['layout']}-{run['regime']}-{run['config'].replace('=', '')}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


class _Chosen:
    """Catches the chunk counts chunk_for_overlap announces and the token groups token_groups does (a logging
    handler)."""

    level = 0

    def __init__(self, chunks: list, groups: list):
        self.chunks, self.groups = chunks, groups

    def handle(self, record) -> None:
        message = record.getMessage()
        for pattern, into in ((r"exchanges its tokens in (\d+) chunks", self.chunks),
                              (r"(?<!not )split into (\d+) token groups", self.groups)):
            found = re.search(pattern, message)
            if found:
                into.append(int(found.group(1)))


def Block(width: int, ffn: int, experts: int, top_k: int, shared_experts: int, heads: int, seed: int = 0):
    """Pre-norm attention, then a capacity MoE layer expert-parallel over every rank; same weights everywhere."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F

    from moe_ascend.runtime import MoELayer

    class MoEBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width, bias=False)
            self.moe = MoELayer(width, ffn, experts, top_k, capacity_factor=1.0, ep_group=dist.group.WORLD,
                                num_shared_experts=shared_experts)

        def forward(self, x):
            batch, sequence, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(batch, sequence, 3, heads, -1).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
            x = x + self.proj(attended)
            return x + self.moe(self.norm2(x))

    torch.manual_seed(seed)
    return MoEBlock()


if __name__ == "__main__":
    main()
