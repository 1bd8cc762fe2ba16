"""Forward + backward time of ``MoELayer`` compiled with moe_ascend against plain inductor, one process.

Both compiled copies hold the same weights and run in the same process,
alternating step by step, and which goes first alternates too (A B, B A, ...),
so that machine noise and order hit both alike.
The figure is inductor time / moe_ascend time for the capacity layer (the
static-shape layer that compiles to one graph); the dropless layer is
reported beside it. The process keeps freed buffers in its heap, as the
launcher's ranks do and as a device's caching allocator does (glibc's default
unmaps large buffers at free and page-faults them back at the next step; set
``MALLOC_MMAP_THRESHOLD_`` yourself to measure another allocator setting).

    python bench/moe_layer.py --steps 30
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, retain_freed_memory, write_result  # noqa: E402

from moe_ascend.runtime import MoELayer  # noqa: E402


def step_time(compiled, x) -> float:
    started = time.perf_counter()
    compiled(x).sum().backward()
    return time.perf_counter() - started


def measure(mode: str, args) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(args.d_model, args.d_ff, args.experts, args.top_k,
                     capacity_factor=1.25 if mode == "capacity" else None)
    contenders = {
        "inductor": torch.compile(copy.deepcopy(layer), backend="inductor"),
        "moe_ascend": torch.compile(copy.deepcopy(layer), backend="moe_ascend", options={"target": "inductor"}),
    }
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)
    for compiled in contenders.values():  # compile and warm up
        for _ in range(3):
            step_time(compiled, x)
    times = {name: [] for name in contenders}
    names = list(contenders)
    for step in range(args.steps):
        for name in names if step % 2 == 0 else names[::-1]:
            times[name].append(step_time(contenders[name], x))
    inductor, ours = median(times["inductor"]), median(times["moe_ascend"])
    return {"mode": mode, "inductor_s": inductor, "moe_ascend_s": ours, "speedup": inductor / ours,
            "inductor_times_s": times["inductor"], "moe_ascend_times_s": times["moe_ascend"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--json", default=None, help="output path (default bench/results/moe_layer.json)")
    args = parser.parse_args()
    retain_freed_memory()

    runs = []
    print(f"{'layer':<10}{'inductor ms':>13}{'moe_ascend ms':>15}{'speedup':>9}")
    for mode in ("capacity", "dropless"):
        run = measure(mode, args)
        runs.append(run)
        print(f"{mode:<10}{run['inductor_s'] * 1e3:>13.2f}{run['moe_ascend_s'] * 1e3:>15.2f}{run['speedup']:>9.3f}",
              flush=True)
    figure = {"name": "speedup_vs_inductor", "value": runs[0]["speedup"], "goal": 1.0, "higher_is_better": True}
    config = vars(args) | {"figure_layer": "capacity (capacity_factor 1.25)", "threads": torch.get_num_threads(),
                           "malloc": {name: os.environ.get(name)
                                      for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}}
    path = write_result("moe_layer", figure, runs, config, args.json)
    print(f"speedup_vs_inductor (capacity layer) = {figure['value']:.3f}  (goal >= 1.0)  -> {path}")


if __name__ == "__main__":
    main()
