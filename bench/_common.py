"""What every benchmark shares: the result JSON (DESIGN.md, Benchmarks), machine facts, medians."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class CompilerLines(logging.Handler):
    """Within its ``with``: what moe_ascend logs at INFO (the passes' choices, affinity's switch) into ``lines``."""

    def __init__(self, lines: list[str]):
        super().__init__(logging.INFO)
        self.lines, self.logger = lines, logging.getLogger("moe_ascend")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "CompilerLines":
        self.level_before = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


FIGURE_KEYS = ("name", "value", "goal", "higher_is_better")


def write_result(name: str, figure: dict, runs: list, config: dict, path: str | None = None, **top_level) -> Path:
    """Write ``{"figure", "runs", "machine", "config", ...}`` to ``path`` (default bench/results/NAME.json); the figure
    names itself, its value and its goal (``make bench``'s report reads them)."""
    missing = [key for key in FIGURE_KEYS if key not in figure]
    if missing:
        raise ValueError(f"{name}'s figure {figure} lacks {missing}: give it {list(FIGURE_KEYS)}")
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"figure": figure, **top_level, "runs": runs, "machine": machine(), "config": config},
                              indent=1))
    return out


def write_cluster_result(name: str, figure: dict, runs: list, args, **top_level) -> Path:
    """``write_result`` for a ``run_on_cluster`` benchmark: its config is its arguments, less the worker flag and
    the output path."""
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "json")}
    return write_result(name, figure, runs, config, args.json, **top_level)


def retain_freed_memory() -> None:
    """Run this benchmark's process with freed buffers kept in the heap, as the launcher runs ranks (a device's
    caching allocator does the same): restart it with ``HEAP_RETAINING_ENV`` unless the environment sets it."""
    from moe_ascend.runtime.launcher import HEAP_RETAINING_ENV

    if not all(name in os.environ for name in HEAP_RETAINING_ENV):
        os.execve(sys.executable, [sys.executable, *sys.argv], HEAP_RETAINING_ENV | dict(os.environ))


def median(values) -> float:
    return float(statistics.median(values))


# Every benchmark runs the scaled regime (the figure's) and reports the 1 Gbit/s run beside it.
REGIMES = "ascend-910b,1gbit"
# host_comm_share above these (CPU seconds in communication over its wire seconds, busiest rank) means this host's
# TCP and gloo work, not the shaped link, sets the pace: one core per rank, or more ranks than cores.
HOST_COMM_SHARE_LIMIT = {"own_core": 0.05, "shared_cores": 0.10}


def add_regime_arguments(parser: argparse.ArgumentParser, layouts: str) -> None:
    """``--layouts`` and ``--regimes`` (the links each layout runs on), and ``--host-flops``."""
    parser.add_argument("--layouts", default=layouts, help=f"NODESxRANKS_PER_NODE, comma separated (default {layouts})")
    parser.add_argument("--regimes", default=REGIMES,
                        help="comma separated: a target whose compute-to-link balance the links are scaled to "
                             "(moe-ascend launch --scale-to: ascend-910b, h100 or a hardware YAML), or an inter-node "
                             f"rate such as 1gbit; the first is the figure's (default {REGIMES})")
    parser.add_argument("--host-flops", type=float, default=None,
                        help="this host's per-rank compute rate the scaled regimes scale from (default: measured once)")


def run_on_cluster(script: str, layout: str, regime: str, worker_args: list[str], host_flops: float | None = None
                   ) -> list[dict]:
    """``script --worker ARGS`` on the emulated cluster of ``layout`` (``NODESxRANKS_PER_NODE``) in ``regime`` (a
    target to scale the links to, with this host's ``host_flops``, or an inter-node rate); rank 0's ``RESULT {json}``
    lines, each with its layout and regime. A failed run ends the benchmark with its output."""
    nodes, per_node = layout_shape(layout)
    command = [sys.executable, "-m", "moe_ascend.compiler.cli", "launch", "--nodes", str(nodes), "--ranks-per-node",
               str(per_node), *regime_flags(regime, host_flops), "--", script, "--worker", *worker_args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {layout} run ({regime}) failed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}")
    for line in re.findall(r"^moe-ascend launch: (scaled to .*)$", done.stdout, flags=re.M):
        print(f"  {layout}: {line}", flush=True)
    return [json.loads(line) | {"layout": layout, "regime": regime}
            for line in re.findall(r"^\[r0\] RESULT (.*)$", done.stdout, flags=re.M)]


def layout_shape(layout: str) -> tuple[int, int]:
    """``"NODESxRANKS_PER_NODE"`` → ``(nodes, ranks per node)``."""
    nodes, per_node = (int(v) for v in layout.lower().split("x"))
    return nodes, per_node


def regime_flags(regime: str, host_flops: float | None) -> list[str]:
    """``moe-ascend launch``'s flags for ``regime``: an explicit inter-node rate, or a target to scale to."""
    if _is_rate(regime):
        return ["--inter-node-bandwidth", regime]
    return ["--scale-to", regime] + (["--host-flops", str(host_flops)] if host_flops is not None else [])


def _is_rate(regime: str) -> bool:
    """Whether ``regime`` is an explicit link rate as the launcher reads one (else a target to scale to)."""
    from moe_ascend.kernels.errors import LaunchError
    from moe_ascend.runtime.launcher import parse_rate

    try:
        parse_rate(regime)
    except LaunchError:
        return False
    return True


def host_comm_share_checked(share: float | None, layout: str) -> float | None:
    """``share`` (busiest rank's CPU seconds in communication over their wire seconds), with a warning where it is
    above the fidelity limit for ``layout``'s ranks on this machine's cores (None: not measured)."""
    if share is None:
        return None
    nodes, per_node = layout_shape(layout)
    ranks, cores = nodes * per_node, len(os.sched_getaffinity(0))
    limit = HOST_COMM_SHARE_LIMIT["own_core" if ranks <= cores else "shared_cores"]
    if share > limit:
        print(f"WARNING: host_comm_share {share:.3f} is above {limit}: this host's CPU work of moving the bytes, not "
              f"the shaped link, sets much of the communication time; read the figure as this machine's, not the "
              f"target's", file=sys.stderr, flush=True)
    return share


def worker_arguments(args) -> list[str]:
    """The command line that gives a worker ``args`` (less what only the launching side reads)."""
    flags = []
    for name, value in vars(args).items():
        if name in ("worker", "json", "layouts", "regimes", "host_flops") or value is False:
            continue
        flags.append(f"--{name.replace('_', '-')}" + ("" if value is True else f"={value}"))
    return flags


def cpu_seconds() -> float:
    """This process's CPU time so far, user and system, all its threads (gloo's among them)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def replayed_exchange(inter_node_bytes: float, repeats: int = 3) -> dict | None:
    """On every rank of a training job, after its steps: one step's inter-node bytes (``inter_node_bytes``, the
    largest over the ranks is used) sent again as one even all-to-all on the group the MoE layers exchange on, with
    nothing else running. ``comm_s``: its wall seconds (a stand-in for the step's communication alone);
    ``host_comm_share``: the busiest rank's CPU seconds over them. Medians of ``repeats``; None when no byte crossed
    nodes."""
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    from moe_ascend.runtime import Topology
    from moe_ascend.runtime.exchange_group import exchange_group

    topology = Topology.detect()
    world, remote = topology.world_size, topology.world_size - topology.ranks_per_node
    largest = torch.tensor([float(inter_node_bytes)])
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    if remote == 0 or largest.item() == 0:  # nothing crossed nodes: nothing to measure
        return None
    rows = max(1, int(largest.item() / 4 / 1024 / remote))  # rows of 1024 fp32 each rank sends each peer
    buffer = torch.zeros(world * rows, 1024)
    group = exchange_group(dist.group.WORLD).group_name
    wall, cpu = [], []
    for _ in range(repeats + 1):  # the first warms the companion group up
        dist.barrier()
        started, cpu_started = time.perf_counter(), cpu_seconds()
        fc.wait_tensor(fc.all_to_all_single(buffer, None, None, group))
        measured = torch.tensor([time.perf_counter() - started, cpu_seconds() - cpu_started])
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
        wall.append(measured[0].item())
        cpu.append(measured[1].item())
    return {"comm_s": median(wall[1:]), "host_comm_share": median(c / w for c, w in zip(cpu[1:], wall[1:]))}


def measure_host_flops(args) -> None:
    """``args.host_flops``: this host's per-rank compute rate, measured once where a regime scales the links to a
    target (so every scaled job gets the same links), unless given."""
    if args.host_flops is None and not all(map(_is_rate, args.regimes.split(","))):
        from moe_ascend.compiler.planner.scaling import host_compute_rate

        args.host_flops = host_compute_rate()


def run_layouts(script: str, args, worker_args: list[str], show: Callable[[dict], None]) -> list[dict]:
    """``run_on_cluster`` on each of ``args.layouts`` in each of ``args.regimes`` (comma-separated; the figure's
    regime first); each run is shown with ``show(run)`` as it comes in."""
    measure_host_flops(args)
    runs = []
    for regime in args.regimes.split(","):
        print(f"-- {regime}", flush=True)
        for layout in args.layouts.split(","):
            for run in run_on_cluster(script, layout, regime, worker_args, args.host_flops):
                runs.append(run)
                show(run)
    return runs


def anchored_figure(runs: list[dict], name: str, key: str, goal: float, is_anchor: Callable[[dict], bool]) -> dict:
    """The headline figure: ``key`` of the first run ``is_anchor`` picks (None when no run is one): in the first
    regime, where ``run_layouts`` ran them."""
    anchor = next((r for r in runs if is_anchor(r)), None)
    return {"name": name, "value": anchor[key] if anchor else None, "goal": goal, "higher_is_better": True}
