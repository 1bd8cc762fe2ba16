"""How fast the planner evaluates layouts, and how well it predicts step times measured on the emulated cluster.

For each shipped model on its hardware (Mixtral 8x7B on 64 H100, DeepSeek-V3 on
2048 H100, Pangu Ultra MoE on 6144 Ascend 910B): the full search (enumeration,
evaluation, the memory filter) and, separately, the step model evaluating a
batch of a million layouts (the search space repeated), in one process on one
core and in ``--processes`` at once. Configurations per hour is the figure the
bar counts; setting a model up (once per model, hardware and device count) is
reported beside it.

The figure of merit, ``mean_abs_error``, is against measured step times on the
emulated cluster (``compiler.planner.measured``): each of the 34 configurations of the
measured set trains its model for ``--steps`` steps, and its job runs
``moe-ascend calibrate``'s micro-benchmarks beside them (``--calibrations``
times: before, amid and after the steps, the host's speed drifting); the step model
predicts each run from those rates alone. Beside it: the largest error, the
share of pairs of runs the predictions keep in order, and the error of the
predicted peak memory.

The published runs (``compiler/data/published.yaml``: DeepSeek-V3, Pangu Ultra
MoE, Qwen3-235B-A22B) are predicted from the spec-sheet profiles at the layout
each ran: tokens/s over the reported, whether it fits, and the share of the
search's layouts predicted faster (``published`` in the JSON).

    python bench/planner.py                  # both parts (about 20 minutes on 2 cores)
    python bench/planner.py --skip-measured  # the speed part only
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from moe_ascend.compiler.planner import published  # noqa: E402
from moe_ascend.compiler.planner.measured import MEASURED_SET  # noqa: E402
from moe_ascend.compiler.planner.search import layouts, search  # noqa: E402
from moe_ascend.compiler.planner.step_model import Hardware, MoEModel, StepModel  # noqa: E402

CASES = (("mixtral-8x7b", "h100", 64), ("deepseek-v3", "h100", 2048), ("pangu-ultra-moe", "ascend-910b", 6144))


def _evaluate_million(case) -> tuple[int, float]:
    """``(layouts evaluated, seconds)`` for a million layouts of ``case`` (its search space, repeated)."""
    model, hardware, devices = MoEModel.load(case[0]), Hardware.load(case[1]), case[2]
    step_model = StepModel(model, hardware, devices)
    space = layouts(model, hardware, devices)
    repeats = -(-1_000_000 // len(space["tp"]))
    batch = {name: np.tile(values, repeats) for name, values in space.items()}
    started = time.perf_counter()
    step_model.evaluate(batch)
    return len(batch["tp"]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="processes evaluating at once (one per core)")
    parser.add_argument("--skip-measured", action="store_true", help="only the speed of the search")
    parser.add_argument("--steps", type=int, default=15, help="timed steps of each measured configuration")
    parser.add_argument("--calibrations", type=int, default=3,
                        help="calibrations of each measured configuration: before its steps, then spread over them")
    parser.add_argument("--every", type=int, default=2,
                        help=f"measure every n-th configuration of the measured set (1: all {len(MEASURED_SET)})")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = []
    for name, hardware_name, devices in CASES:
        model, hardware = MoEModel.load(name), Hardware.load(hardware_name)
        started = time.perf_counter()
        step_model = StepModel(model, hardware, devices)
        built = time.perf_counter() - started
        plan = search(model, hardware, devices, step_model=step_model)
        evaluated, seconds = _evaluate_million((name, hardware_name, devices))
        best = plan.best(1)[0]
        runs.append({"model": name, "hardware": hardware_name, "devices": devices, "build_s": built,
                     "search_layouts": plan.evaluated, "search_s": plan.seconds, "fitting": int(plan.fitting.sum()),
                     "batch_layouts": evaluated, "batch_s": seconds,
                     "configs_per_hour_one_core": evaluated / seconds * 3600,
                     "best": {k: best[k] for k in ("tp", "ep", "pp", "vpp", "dp", "mb", "recompute", "chunks",
                                                   "hierarchical", "dualpipe", "fb_overlap", "step_s", "mfu")}})
        print(f"{name} on {devices} x {hardware_name}: set up in {built:.3f} s; search of {plan.evaluated} "
              f"layouts {plan.seconds:.2f} s; a million layouts in {seconds:.2f} s on one core "
              f"({evaluated / seconds * 3600:.3g} an hour); best {runs[-1]['best']}", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        started = time.perf_counter()
        done = pool.map(_evaluate_million, [CASES[0]] * args.processes)
        wall = time.perf_counter() - started  # includes each process building its formulas
    per_hour = sum(n for n, _ in done) / max(s for _, s in done) * 3600
    print(f"{args.processes} processes at once: {per_hour:.3g} layouts an hour (evaluation; {wall:.1f} s with the "
          f"builds)", flush=True)
    predicted_runs = [published.predict(run) for run in published.load()]
    for run in predicted_runs:
        print(f"published {run['name']}: predicted {run['predicted_tokens_per_s']:.4g} tokens/s against "
              f"{run['reported_tokens_per_s']:.4g} reported ({run['ratio']:.2f}x); "
              f"{run['memory_gib']:.1f} GiB a device ({'fits' if run['fits'] else 'does NOT fit'}); "
              f"{100 * run['rank_fraction']:.1f} % of the search's layouts predicted faster", flush=True)
    configs = () if args.skip_measured else MEASURED_SET[::args.every]
    accuracy, measured = measured_set(args.steps, configs, args.calibrations) if configs else ({}, [])
    figure = {"name": "mean_abs_error", "value": accuracy.get("mean_abs_error"), "goal": 0.10,
              "higher_is_better": False}
    out = write_result("planner", figure, runs, vars(args), args.json, configs_per_hour=per_hour,
                       max_error=accuracy.get("max_error"), pairwise_order_kept=accuracy.get("pairwise_order_kept"),
                       memory_mean_abs_error=accuracy.get("memory_mean_abs_error"),
                       memory_max_error=accuracy.get("memory_max_error"), measured_runs=measured,
                       measured_configs=len(configs), measured_dropped=len(configs) - len(measured),
                       published=predicted_runs,
                       published_max_ratio_error=max(abs(run["ratio"] - 1) for run in predicted_runs))
    print(f"configs_per_hour {per_hour:.3g} (goal 1e6, aim 1e7); "
          + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()) + f"; wrote {out}")


def measured_set(steps: int, configs, calibrations: int) -> tuple[dict, list[dict]]:
    """Run ``configs`` of the measured set on the emulated cluster and compare: ``(errors, runs)``."""
    from moe_ascend.compiler.planner.measured import errors, measure

    runs = measure(configs, Hardware.load("cpu-calibrated"), steps=steps, log=lambda line: print(line, flush=True),
                   calibrations=calibrations)
    return errors(runs), runs


if __name__ == "__main__":
    main()
