"""The main job in a few minutes: a seed-shaped MoE transformer trained on the emulated cluster, plain Inductor
beside moe_ascend with every technique, then what each pass changed.

    make demo                      # = python examples/demo.py --dump-dir graphs
    python examples/demo.py --steps 24 --scale-to h100

Two nodes of one rank each (one compute-bound rank per core), their links
scaled to the target's compute-to-link balance (``moe-ascend launch
--scale-to``; on loopback, said so, where the machine cannot shape links).
The model is ``examples/train_moe.py``'s, shaped like the seeds' (64 routed
experts of FFN 1024, top-8, one shared expert, 2 blocks). Two runs train
side by side in one job, a block of steps each in turn, from the same seed on
the same bytes: the Inductor baseline (the flat all-to-all, no moe_ascend
pass) and moe_ascend with every technique of ``train_moe.py --techniques
all``. Each step prints as it ends; then the tokens/s of both (the steps that
compiled nothing), the inspect table of rank 0's graphs (what each pass
changed, the collectives by link, the communication left exposed) and the
path of the HTML report.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_moe import Trainer, parser as train_parser  # noqa: E402

from moe_ascend.runtime.launcher import end_process_group  # noqa: E402

BLOCKS = 2  # train_moe's seed-shaped model, two of its blocks: a demo's minutes
RUNS = {"inductor": ("inductor", "none"), "moe_ascend": ("moe_ascend", "all")}


def run_arguments(args, run: str) -> argparse.Namespace:
    """train_moe's arguments for one of the two runs."""
    train = train_parser().parse_args([])
    train.layers, (train.backend, train.techniques) = BLOCKS, RUNS[run]
    train.steps, train.log_every, train.average = args.steps, 0, args.steps // 2
    train.dump_dir = args.dump_dir if run == "moe_ascend" else None
    return train


def worker(args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        trainers = {run: Trainer(run_arguments(args, run)) for run in RUNS}
        for block, first in enumerate(range(0, args.steps, args.block)):
            order = list(trainers.items())
            for run, trainer in order[block % 2:] + order[:block % 2]:  # each takes the first turn in turn
                while trainer.step < min(first + args.block, args.steps):
                    trainer.train(trainer.step + 1)
                    if trainer.rank == 0:
                        compiled = " (compiling)" if trainer.step - 1 in trainer.compiled_at else ""
                        print(f"{run:>10}  step {trainer.step:3d}  loss {trainer.losses[-1]:.3f}  "
                              f"{trainer.seconds[-1]:6.2f} s{compiled}", flush=True)
        if dist.get_rank() == 0:
            print(summary(trainers), flush=True)
    finally:
        end_process_group()


def summary(trainers: dict) -> str:
    base, ours = trainers["inductor"], trainers["moe_ascend"]
    lines = ["", "tokens/s over the steps that compiled nothing (every rank's tokens, the slowest rank's time):"]
    for run, trainer in trainers.items():
        exposed = trainer.exposed_comm_s()
        sent = (f"{trainer.inter_node_bytes / 2**20 / trainer.step:.2f} MiB/step across nodes" if run == "moe_ascend"
                else "its exchanges uncounted (no moe_ascend graph)")
        lines.append(f"  {run:>10}: {trainer.tokens_per_s():7.0f} tokens/s, loss {trainer.result(0)['final_loss']:.3f}"
                     f" (mean of the last {trainer.args.average} steps), {sent}"
                     + (f", {exposed * 1e3:.0f} ms/step of communication left exposed" if exposed is not None else ""))
    speedup = ours.tokens_per_s() / base.tokens_per_s()
    lines.append(f"  moe_ascend with every technique: {speedup:.2f}x the Inductor baseline's tokens/s "
                 f"(a short run: bench/e2e.py measures it at length)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps of each run")
    parser.add_argument("--block", type=int, default=4, help="steps a run trains before the other's turn")
    parser.add_argument("--scale-to", default="ascend-910b", help="the target whose compute-to-link balance the "
                        "links get (moe-ascend launch --scale-to)")
    parser.add_argument("--dump-dir", default="graphs", help="moe_ascend's graphs, one folder per rank")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    shutil.rmtree(args.dump_dir, ignore_errors=True)  # this run's graphs only
    cli = [sys.executable, "-m", "moe_ascend.compiler.cli"]
    launch = [*cli, "launch", "--nodes", "2", "--ranks-per-node", "1", "--scale-to", args.scale_to, "--",
              sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps),
              "--block", str(args.block), "--dump-dir", str(Path(args.dump_dir).resolve())]
    with subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as job:
        for line in job.stdout:
            if "USDT:" not in line:  # the profiler's own start and stop notices, on every rank
                print(line, end="", flush=True)
    if job.returncode:
        sys.exit(f"the training job failed (exit {job.returncode})")
    print(f"\nwhat moe_ascend did to rank 0's graphs (moe-ascend inspect {args.dump_dir}):", flush=True)
    subprocess.run([*cli, "inspect", args.dump_dir], check=True)
    print(f"\nthe HTML report, every graph before and after each pass: {Path(args.dump_dir) / 'rank0' / 'index.html'}")


if __name__ == "__main__":
    main()
