"""Compile time of the quickstart model: moe_ascend (no dumps) against plain inductor.

Each measurement runs in a fresh process with a fresh, empty Inductor cache
folder, so both backends compile every kernel cold. Compile time is the first
training step (forward + backward, which compiles both graphs) minus a warm
step. The two backends alternate, and which goes first alternates too
(A B, B A, ...), so drift and order hit both alike; the figure is the median
of the per-pair ratios.

    python bench/compile_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))


def child(backend: str, batch: int, seq_len: int) -> dict:
    """One cold compile in this process; prints its timings as JSON."""
    import torch
    from quickstart import MoETransformer, batches, stdlib_bytes

    torch.manual_seed(0)
    model = MoETransformer(seq_len=seq_len)
    options = {"options": {"target": "inductor"}} if backend == "moe_ascend" else {}
    compiled = torch.compile(model, backend=backend, **options)
    data = batches(stdlib_bytes(200_000), batch, seq_len)

    def step() -> float:
        started = time.perf_counter()
        compiled(*next(data)).backward()
        return time.perf_counter() - started

    first = step()
    warm = min(step() for _ in range(3))
    return {"backend": backend, "first_step_s": first, "warm_step_s": warm, "compile_s": first - warm}


def measure(backend: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        out = subprocess.run(
            [sys.executable, __file__, "--child", backend, "--batch", str(args.batch), "--seq-len", str(args.seq_len)],
            env=env, capture_output=True, text=True, check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--json", default=None, help="output path (default bench/results/compile_overhead.json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq_len)))
        return

    from _common import median, write_result

    runs, ratios = [], []
    print(f"{'repeat':>6} {'inductor s':>11} {'moe_ascend s':>13} {'ratio':>7}")
    for repeat in range(args.repeats):
        if repeat % 2:
            ours, inductor = measure("moe_ascend", args), measure("inductor", args)
        else:
            inductor, ours = measure("inductor", args), measure("moe_ascend", args)
        ratio = ours["compile_s"] / inductor["compile_s"]
        runs += [dict(inductor, repeat=repeat), dict(ours, repeat=repeat)]
        ratios.append(ratio)
        print(f"{repeat:>6} {inductor['compile_s']:>11.2f} {ours['compile_s']:>13.2f} {ratio:>7.3f}", flush=True)
    figure = {"name": "compile_time_ratio", "value": median(ratios), "goal": 1.10, "higher_is_better": False}
    path = write_result("compile_overhead", figure, runs,
                        vars(args) | {"model": "examples/quickstart.py MoETransformer defaults"}, args.json)
    print(f"compile_time_ratio (median of {args.repeats}) = {figure['value']:.3f}  (goal <= 1.10)  -> {path}")


if __name__ == "__main__":
    main()
