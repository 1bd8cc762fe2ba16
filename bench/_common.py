"""What every benchmark shares: the result JSON (DESIGN.md, Benchmarks), machine facts, medians."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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
    out.write_text(json.dumps({"figure": figure, **top_level, "runs": runs, "machine": machine(), "config": config}, indent=1))
    return out


def write_cluster_result(name: str, figure: dict, runs: list, args) -> Path:
    """``write_result`` for a ``run_on_cluster`` benchmark: its config is its arguments, less the worker flag and
    the output path."""
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "json")}
    return write_result(name, figure, runs, config, args.json)


def retain_freed_memory() -> None:
    """Run this benchmark's process with freed buffers kept in the heap, as the launcher runs ranks (a device's
    caching allocator does the same): restart it with ``HEAP_RETAINING_ENV`` unless the environment sets it."""
    from moe_ascend.runtime.launcher import HEAP_RETAINING_ENV

    if not all(name in os.environ for name in HEAP_RETAINING_ENV):
        os.execve(sys.executable, [sys.executable, *sys.argv], HEAP_RETAINING_ENV | dict(os.environ))


def median(values) -> float:
    return float(statistics.median(values))


def run_on_cluster(script: str, layout: str, bandwidth: str, worker_args: list[str]) -> list[dict]:
    """``script --worker ARGS`` on the emulated cluster of ``layout`` (``NODESxRANKS_PER_NODE``); rank 0's
    ``RESULT {json}`` lines, each with its layout. A failed run ends the benchmark with its output."""
    nodes, per_node = (int(v) for v in layout.lower().split("x"))
    command = [sys.executable, "-m", "moe_ascend.compiler.cli", "launch", "--nodes", str(nodes), "--ranks-per-node",
               str(per_node), "--inter-node-bandwidth", bandwidth, "--", script, "--worker", *worker_args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {layout} run failed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}")
    return [json.loads(line) | {"layout": layout} for line in re.findall(r"^\[r0\] RESULT (.*)$", done.stdout, flags=re.M)]


def worker_arguments(args) -> list[str]:
    """The command line that gives a worker ``args`` (less what only the launching side reads)."""
    flags = []
    for name, value in vars(args).items():
        if name in ("worker", "json", "layouts", "bandwidth") or value is False:
            continue
        flags.append(f"--{name.replace('_', '-')}" + ("" if value is True else f"={value}"))
    return flags


def cpu_seconds() -> float:
    """This process's CPU time so far, user and system, all its threads (gloo's among them)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_layouts(script: str, args, worker_args: list[str], show: Callable[[dict], None]) -> list[dict]:
    """``run_on_cluster`` on each of ``args.layouts`` (comma-separated) at ``args.bandwidth``; each run is shown
    with ``show(run)`` as it comes in."""
    runs = []
    for layout in args.layouts.split(","):
        for run in run_on_cluster(script, layout, args.bandwidth, worker_args):
            runs.append(run)
            show(run)
    return runs


def anchored_figure(runs: list[dict], name: str, key: str, goal: float, is_anchor: Callable[[dict], bool]) -> dict:
    """The headline figure: ``key`` of the first run ``is_anchor`` picks (None when no run is one)."""
    anchor = next((r for r in runs if is_anchor(r)), None)
    return {"name": name, "value": anchor[key] if anchor else None, "goal": goal, "higher_is_better": True}
