"""The ``moe-ascend`` command: inspect, doctor, bench, launch, calibrate and plan."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

from moe_ascend.kernels.errors import LaunchError, MoEAscendError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-ascend",
                                     description="moe_ascend: a torch.compile backend for MoE training")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="summarise a dump folder (graphs, passes, MoE layers, collectives)")
    inspect.add_argument("dir")
    inspect.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    inspect.add_argument("--rank", type=int, default=None,
                         help="the rank to show of a multi-rank dump (default: the lowest)")

    doctor = commands.add_parser("doctor", help="what this machine can run")
    doctor.add_argument("--ascend-check", metavar="DIR", type=Path,
                        help="list the ops of a dump's post-grad graphs (after every pass) that Ascend's graph engine "
                             "has no converter for; exit status 1 if there are any")

    bench = commands.add_parser("bench", help="run bench/NAME.py (extra arguments go to the benchmark)")
    bench.add_argument("name")
    bench.add_argument("args", nargs=argparse.REMAINDER)

    launch = commands.add_parser(
        "launch", help="run a script on an emulated cluster: a network namespace per node, shaped inter-node links",
        description="Runs NODES x RANKS_PER_NODE ranks of SCRIPT with torchrun's environment. As root with iproute2, "
                    "each node is a network namespace and tc shapes its uplink; otherwise every rank runs on loopback.")
    launch.add_argument("--nodes", type=int, required=True)
    launch.add_argument("--ranks-per-node", type=int, default=1)
    launch.add_argument("--inter-node-bandwidth", default=None,
                        help="tc rate of each node's uplink (default 1gbit; not with --scale-to)")
    launch.add_argument("--inter-node-latency", default="100us",
                        help="one-way delay added to each uplink (default 100us)")
    launch.add_argument("--scale-to", metavar="TARGET", default=None,
                        help="shape the uplinks and each node's loopback so that this host's compute rate over each "
                             "link's rate equals TARGET's (a hardware YAML file, or a shipped one: "
                             + ", ".join(_shipped("hardware")) + ")")
    launch.add_argument("--host-flops", type=float, default=None,
                        help="with --scale-to: this host's per-rank compute rate in FLOP/s (default: measured now)")
    launch.add_argument("command_args", metavar="command", nargs=argparse.REMAINDER,
                        help="-- script.py ARGS (or any program)")

    calibrate = commands.add_parser(
        "calibrate", help="measure this machine's emulated cluster (matmul, memory, each link's all-to-all) into a "
                          "hardware profile for plan",
        description="Micro-benchmarks matmul and memory on one thread, and the MoE layers' all-to-all inside a node "
                    "and across the emulated cluster's shaped link; writes the fitted profile as a hardware YAML file.")
    calibrate.add_argument("--out", default="cpu-calibrated.yaml",
                           help="the profile to write (default cpu-calibrated.yaml)")
    calibrate.add_argument("--inter-node-bandwidth", default="1gbit",
                           help="tc rate of each node's uplink (default 1gbit)")
    calibrate.add_argument("--inter-node-latency", default="100us",
                           help="one-way delay added to each uplink (default 100us)")
    calibrate.add_argument("--repeats", type=int, default=5, help="timed repeats of each micro-benchmark (default 5)")

    plan = commands.add_parser(
        "plan", help="search parallel layouts (TP/EP/PP/VPP/DP, micro-batch, recompute, overlap, hierarchy) with the "
                     "step model",
        description="Evaluates every layout of MODEL on DEVICES devices of HARDWARE with the symbolic step model; "
                    "prints the fastest that fit in memory and writes JSON and a Pareto plot (tokens/s against "
                    "memory). With --layout, scores that one layout instead: its step, memory, tokens/s and the "
                    "parts of its step.",
        epilog="the table's columns:\n" + "\n".join(f"  {name:<10} {what}" for name, what in _plan_columns().items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--model", required=True,
                      help="a model YAML file, or a shipped one: " + ", ".join(_shipped("models")))
    plan.add_argument("--hardware", required=True,
                      help="a hardware YAML file, or a shipped one: " + ", ".join(_shipped("hardware")))
    plan.add_argument("--devices", type=int, required=True)
    plan.add_argument("--top", type=int, default=10, help="layouts to print (default 10)")
    plan.add_argument("--imbalance", type=float, default=None,
                      help="busiest / mean expert load (default: the model file's)")
    plan.add_argument("--json", default=None, help="output (default plan_MODEL_HARDWARE_DEVICES.json)")
    plan.add_argument("--png", default=None, help="Pareto plot (default beside the JSON)")
    plan.add_argument("--layout", default=None,
                      help="score this layout only, e.g. tp=8,pp=16,vpp=2,ep=32 (names: tp ep pp vpp dp mb "
                           "recompute chunks hierarchical groups dualpipe fb_overlap; dp defaults to the devices "
                           "left over, the rest to 1 or 0; ep counts the whole expert group, folded over tp and dp)")

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except MoEAscendError as exc:
        print(f"moe-ascend {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`| head`): what it read is all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush has somewhere to go
        return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "plan":
        return _plan(args)
    if args.command == "calibrate":
        from moe_ascend.compiler.planner.calibrate import calibrate, write_profile

        profile, how = calibrate(args.inter_node_bandwidth, args.inter_node_latency, repeats=args.repeats)
        write_profile(profile, Path(args.out), how)
        print(f"wrote {args.out}: use it as moe-ascend plan --hardware {args.out}")
        return 0
    if args.command == "inspect":
        from moe_ascend.compiler.report.inspect import format_table, load_summary
        from moe_ascend.compiler.report.summary import dump_ranks

        summary = load_summary(args.dir, args.rank)
        ranks = dump_ranks(args.dir)
        if len(ranks) > 1:
            shown = ranks[0] if args.rank is None else args.rank
            print(f"{args.dir} holds the dumps of ranks {', '.join(map(str, ranks))}; this is rank {shown}"
                  + (" (--rank N shows another)" if args.rank is None else ""),
                  file=sys.stderr if args.json else sys.stdout)
        print(json.dumps(summary, indent=1) if args.json else format_table(summary))
        return 0
    if args.command == "launch":
        from moe_ascend.runtime.launcher import launch

        command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
        return launch(_cluster_spec(args), command)
    if args.command == "doctor":
        if args.ascend_check is not None:
            from moe_ascend.compiler.report.ascend_coverage import check_dump, format_check

            rows = check_dump(args.ascend_check)
            print(format_check(rows))
            return 1 if any(row["missing"] for row in rows) else 0
        from moe_ascend.compiler.doctor import report

        print(report())
        return 0
    if args.command == "bench":
        script = bench_folder() / f"{args.name}.py"
        if not script.exists():
            known = sorted(p.stem for p in bench_folder().glob("*.py") if not p.stem.startswith("_"))
            raise MoEAscendError(f"no benchmark {args.name!r}; known: {known}")
        sys.argv = [str(script), *args.args]
        runpy.run_path(str(script), run_name="__main__")
        return 0
    raise AssertionError(args.command)


def _cluster_spec(args: argparse.Namespace):
    """The emulated cluster ``launch`` asked for: explicit rates, or rates scaled to a target's balance."""
    from moe_ascend.runtime.launcher import ClusterSpec

    if args.scale_to is None:
        if args.host_flops is not None:
            raise LaunchError("--host-flops sets the rate --scale-to scales from: give --scale-to TARGET too")
        return ClusterSpec(args.nodes, args.ranks_per_node, args.inter_node_bandwidth or "1gbit",
                           args.inter_node_latency)
    if args.inter_node_bandwidth is not None:
        raise LaunchError("--scale-to sets the inter-node bandwidth itself: give one of --scale-to and "
                          "--inter-node-bandwidth, not both")
    from moe_ascend.compiler.planner.scaling import scale_to

    links = scale_to(args.scale_to, args.host_flops)
    print(f"moe-ascend launch: {links.describe(args.ranks_per_node)}", flush=True)
    return ClusterSpec(args.nodes, args.ranks_per_node, f"{links.uplink_bits(args.ranks_per_node):.0f}bit",
                       args.inter_node_latency,
                       intra_node_bandwidth=f"{links.loopback_bits(args.ranks_per_node):.0f}bit",
                       scaled_to=links.to_json())


def _shipped(kind: str) -> list[str]:
    from moe_ascend.compiler.planner.step_model import DATA

    return sorted(p.stem for p in (DATA / kind).glob("*.yaml"))


def _plan(args: argparse.Namespace) -> int:
    import dataclasses

    from moe_ascend.compiler.planner.search import format_table, plot_pareto, search
    from moe_ascend.compiler.planner.step_model import Hardware, MoEModel, PlannerError

    if args.devices < 1:
        raise PlannerError(f"--devices must be at least 1, got {args.devices}")
    model, hardware = MoEModel.load(args.model), Hardware.load(args.hardware)
    if args.imbalance is not None:
        model = dataclasses.replace(model, imbalance=args.imbalance)
    if args.layout is not None:
        from moe_ascend.compiler.planner.search import format_score, parse_layout, score

        scored = score(model, hardware, args.devices, parse_layout(args.layout))
        print(format_score(model, hardware, args.devices, scored))
        if args.json:
            Path(args.json).write_text(json.dumps(scored, indent=1))
        return 0
    plan = search(model, hardware, args.devices, progress=sys.stderr.isatty())
    print(format_table(plan, args.top))
    out = Path(args.json or f"plan_{model.name}_{hardware.name}_{args.devices}.json")
    out.write_text(json.dumps(plan.to_json(args.top) | {"model_spec": dataclasses.asdict(model),
                                                        "hardware_spec": hardware.to_json()}, indent=1))
    png = Path(args.png) if args.png else out.with_suffix(".png")
    plot_pareto(plan, png)
    print(f"wrote {out} and {png}")
    return 0


def _plan_columns() -> dict[str, str]:
    from moe_ascend.compiler.planner.search import COLUMNS

    return COLUMNS


def bench_folder() -> Path:
    """bench/ beside the package folders (an editable install or a source checkout)."""
    return Path(__file__).resolve().parents[1] / "bench"


if __name__ == "__main__":
    sys.exit(main())
