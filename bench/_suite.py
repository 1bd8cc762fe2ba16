"""``make bench``: every benchmark of bench/, one after another, and one report of their figures.

    python bench/_suite.py            # run them all, then write bench/results/REPORT.md
    python bench/_suite.py --quick    # shortened runs of each (make bench QUICK=1)
    python bench/_suite.py --report   # only the report, from the JSON already in bench/results/

Each benchmark runs as its own process (its default arguments: the figures DESIGN.md's benchmarks define) and
writes bench/results/NAME.json; the suite times it. The report has a table of every figure against its goal,
then per benchmark its other top-level figures, the machine, the configuration, its wall time and its raw
runs (the JSON as written).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPORT = RESULTS / "REPORT.md"


def benchmarks() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_"))


# ``--quick`` (make bench QUICK=1): every figure from shortened runs (fewer steps, rounds, repeats and variants; the
# figure's layout and regime only), each JSON's config saying so
QUICK = {
    "a2a": ["--layouts", "4x2", "--regimes", "ascend-910b", "--top-k", "2,8", "--repeats", "2"],
    # the drifting Zipf only: replaying train_moe's routing (top-8 of 64, four times the bytes) adds minutes
    "balance": ["--regimes", "ascend-910b", "--policies", "off,ours,ideal", "--steps", "15", "--record-steps", "20",
                "--routings", "zipf"],
    "compile_overhead": ["--repeats", "1"],
    # overlap beside them: the baseline's communication share is replayed from a flat exchange's counted bytes
    "e2e": ["--regimes", "ascend-910b", "--layouts", "2x1", "--models", "top8-of-64",
            "--variants", "baseline,overlap,all", "--steps", "10", "--warmup", "3", "--average", "5"],
    "moe_layer": ["--steps", "10"],
    "overlap": ["--regimes", "ascend-910b", "--configs", "off,auto", "--rounds", "2"],
    "planner": ["--steps", "5", "--every", "8"],
    "routing_quality": ["--steps", "100"],
}


def run_all(quick: bool = False) -> dict[str, float]:
    """Each benchmark's wall seconds; the first that fails ends the suite with its exit status."""
    seconds = {}
    for script in benchmarks():
        print(f"== {script.name}", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(script), *(QUICK.get(script.stem, []) if quick else [])])
        seconds[script.stem] = time.perf_counter() - started
        print(f"== {script.name}: {seconds[script.stem] / 60:.1f} min", flush=True)
        if done.returncode != 0:
            sys.exit(f"{script.name} failed (exit {done.returncode}); the suite stops here")
    (RESULTS / "durations.json").write_text(json.dumps({"quick": quick, "seconds": seconds}, indent=1))
    return seconds


def met(figure: dict) -> str:
    value, goal = figure.get("value"), figure.get("goal")
    if value is None or goal is None:
        return "no value" if value is None else "no goal"
    return "met" if (value >= goal if figure.get("higher_is_better", True) else value <= goal) else "not met"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def report(seconds: dict[str, float], quick: bool = False) -> str:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json")) if p.stem != "durations"}
    shortened = " Shortened runs (`make bench QUICK=1`): read each figure with its configuration." if quick else ""
    lines = ["# moe_ascend benchmarks", "",
             f"Written by `make bench` (bench/_suite.py) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"all benchmarks took {sum(seconds.values()) / 60:.1f} min.{shortened}" if seconds else
             "Written by `python bench/_suite.py --report` from the results already in bench/results/.", "",
             "| benchmark | figure | value | goal | |", "|---|---|---|---|---|"]
    for name, data in results.items():
        figure = data["figure"]
        direction = ">=" if figure.get("higher_is_better", True) else "<="
        lines.append(f"| {name} | {figure['name']} | {_number(figure.get('value'))} | {direction} "
                     f"{_number(figure.get('goal'))} | {met(figure)} |")
    for name, data in results.items():
        extra = {k: v for k, v in data.items() if k not in ("figure", "runs", "machine", "config", "measured_runs")}
        lines += ["", f"## {name}", ""]
        if name in seconds:
            lines.append(f"Wall time: {seconds[name] / 60:.1f} min.")
        lines += [f"![{png.stem}]({png.name})" for png in sorted(RESULTS.glob(f"{name}*.png"))]
        lines.append(f"Machine: `{json.dumps(data.get('machine'))}`")
        lines.append(f"Configuration: `{json.dumps(data.get('config'))}`")
        for key, value in extra.items():
            shown = _number(value) if not isinstance(value, (dict, list)) else f"`{json.dumps(value)}`"
            lines.append(f"- {key}: {shown}")
        runs = data.get("runs") or data.get("measured_runs") or []
        lines += ["", f"<details><summary>raw runs ({len(runs)})</summary>", "", "```json",
                  json.dumps(runs, indent=1), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only write the report from bench/results/")
    parser.add_argument("--quick", action="store_true", help="shortened runs of every benchmark (see QUICK)")
    args = parser.parse_args()
    seconds, quick = ({}, False) if args.report else (run_all(args.quick), args.quick)
    if args.report and (RESULTS / "durations.json").exists():
        durations = json.loads((RESULTS / "durations.json").read_text())
        seconds, quick = durations["seconds"], durations["quick"]
    RESULTS.mkdir(exist_ok=True)
    REPORT.write_text(report(seconds, quick))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
