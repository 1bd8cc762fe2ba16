"""The ``moe-ascend`` command: inspect, doctor, bench, and (with their issues) launch and plan."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

from moe_ascend.kernels.errors import MoEAscendError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-ascend", description="moe_ascend: a torch.compile backend for MoE training")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="summarise a dump folder (graphs, passes, MoE layers, collectives)")
    inspect.add_argument("dir")
    inspect.add_argument("--json", action="store_true", help="print summary.json instead of the table")

    commands.add_parser("doctor", help="what this machine can run")

    bench = commands.add_parser("bench", help="run bench/NAME.py (extra arguments go to the benchmark)")
    bench.add_argument("name")
    bench.add_argument("args", nargs=argparse.REMAINDER)

    launch = commands.add_parser(
        "launch", help="run a script on an emulated cluster: a network namespace per node, shaped inter-node links",
        description="Runs NODES x RANKS_PER_NODE ranks of SCRIPT with torchrun's environment. As root with iproute2, "
                    "each node is a network namespace and tc shapes its uplink; otherwise every rank runs on loopback.")
    launch.add_argument("--nodes", type=int, required=True)
    launch.add_argument("--ranks-per-node", type=int, default=1)
    launch.add_argument("--inter-node-bandwidth", default="1gbit", help="tc rate of each node's uplink (default 1gbit)")
    launch.add_argument("--inter-node-latency", default="100us", help="one-way delay added to each uplink (default 100us)")
    launch.add_argument("command_args", metavar="command", nargs=argparse.REMAINDER, help="-- script.py ARGS (or any program)")

    for name, issue in (("plan", "The planner"),):
        stub = commands.add_parser(name, help=f"not in this version yet (issue: {issue})")
        stub.add_argument("args", nargs=argparse.REMAINDER)
        stub.set_defaults(missing=issue)

    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "missing", None):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _run(args)
    except MoEAscendError as exc:
        print(f"moe-ascend {args.command}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "missing", None):
        raise MoEAscendError(f"not available in this version (arrives with the issue '{args.missing}')")
    if args.command == "inspect":
        from moe_ascend.compiler.inspect import format_table, load_summary

        summary = load_summary(args.dir)
        print(json.dumps(summary, indent=1) if args.json else format_table(summary))
        return 0
    if args.command == "launch":
        from moe_ascend.runtime.launcher import ClusterSpec, launch

        command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
        spec = ClusterSpec(args.nodes, args.ranks_per_node, args.inter_node_bandwidth, args.inter_node_latency)
        return launch(spec, command)
    if args.command == "doctor":
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


def bench_folder() -> Path:
    """bench/ beside the package folders (an editable install or a source checkout)."""
    return Path(__file__).resolve().parents[1] / "bench"


if __name__ == "__main__":
    sys.exit(main())
