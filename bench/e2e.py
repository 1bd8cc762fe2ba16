"""End to end: examples/train_moe.py's MoE transformer with each technique alone and all together, against the
inductor baseline, on the emulated cluster.

    python bench/e2e.py                          # 2 x 1 ranks, links scaled to ascend-910b (the figure) and 1 Gbit/s
    python bench/e2e.py --layouts 2x1,2x2 --steps 40

The model is train_moe's in the seeds' shape: 64 routed experts of FFN 1024, top-8, one shared expert, 2 blocks
(``--experts 8 --top-k 2 --ffn 512`` is the small model earlier figures used).

The variants:

    baseline      backend="inductor": the flat all-to-all, token-choice top-k, no balancing
    hierarchical  moe_ascend, the two-step all-to-all only
    overlap       moe_ascend, chunked dispatch and the overlap schedule only ("auto" chunks)
    affinity      moe_ascend, affinity routing only
    balance       moe_ascend, EDPB only (one redundant expert slot per rank and layer)
    all           moe_ascend with all four

In each layout's job every variant trains side by side in one process, a block of steps each in turn (the
order rotating from block to block), so the machine's slow minutes fall on all of them alike. All train the
same model from the same seed on the same bytes for the same steps. A variant's tokens/s counts its steps after
``--warmup`` that compiled nothing (a recompile happens once in a run; migrations are counted); its loss is the
mean training cross-entropy over the last ``--average`` steps. The figure is ``speedup_all_vs_baseline`` on the
first layout in the first regime (``--regimes``: links scaled to ascend-910b, then 1 Gbit/s), beside it
``loss_ratio`` (all together / baseline), and from a replay of the most inter-node bytes a variant's step sent,
alone: ``comm_share`` (its time over each variant's step time) and ``host_comm_share`` (the busiest rank's CPU
seconds over its wire seconds). Writes bench/results/e2e.json and a bar chart
(PNG) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import (add_regime_arguments, host_comm_share_checked, replayed_exchange, run_layouts,  # noqa: E402
                     worker_arguments, write_cluster_result)
from train_moe import TECHNIQUES, Trainer, parser as train_parser  # noqa: E402
from moe_ascend.runtime.launcher import end_process_group  # noqa: E402

VARIANTS = {"baseline": ("inductor", "none"), **{t: ("moe_ascend", t) for t in TECHNIQUES},
            "all": ("moe_ascend", "all")}


def trainer_args(args, variant: str) -> argparse.Namespace:
    """train_moe's arguments for one variant (its model and run as the bench's)."""
    backend, techniques = VARIANTS[variant]
    train = train_parser().parse_args([])
    for name in vars(train):
        if hasattr(args, name):
            setattr(train, name, getattr(args, name))
    train.backend, train.techniques, train.log_every, train.checkpoint = backend, techniques, 0, None
    train.no_profile = True  # the profiler windows of several compiled models taking turns in one process collide
    return train


def worker(args) -> None:
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # every variant compiles the same forward once (or twice)
    dist.init_process_group("gloo")
    variants = args.variants.split(",")
    trainers = [Trainer(trainer_args(args, v)) for v in variants]
    for block, first in enumerate(range(0, args.steps, args.block)):
        turn = block % len(trainers)
        for trainer in trainers[turn:] + trainers[:turn]:
            trainer.train(min(first + args.block, args.steps))
    results = [trainer.result(args.warmup) | {"variant": variant} for variant, trainer in zip(variants, trainers)]
    # the most inter-node bytes a variant's step sent (plain Inductor's go uncounted), replayed alone
    replay = replayed_exchange(max(r["inter_node_bytes_per_step"] for r in results)) or {}
    if dist.get_rank() == 0:
        for result, trainer in zip(results, trainers):
            step_s = trainer.args.batch * trainer.args.seq_len * trainer.world / result["tokens_per_s"]
            print("RESULT " + json.dumps(result | {"host_comm_share": replay.get("host_comm_share"),
                                                   "comm_share": replay.get("comm_s", 0) / step_s}), flush=True)
    end_process_group()


def show(run: dict) -> None:
    exposed = run["exposed_comm_s"]
    print(f"{_where(run)} {run['variant']:>12}: {run['tokens_per_s']:8.0f} tokens/s, loss {run['final_loss']:.4f}, "
          f"exposed comm {'-' if exposed is None else f'{exposed * 1e3:.1f} ms'}, {run['migrations']} migrations",
          flush=True)


def summary(runs: list[dict]) -> dict:
    """Per job (layout and regime): each variant's tokens/s, its speedup and loss ratio over the baseline of the
    same job."""
    out = {}
    for where in dict.fromkeys(map(_where, runs)):
        here = {r["variant"]: r for r in runs if _where(r) == where}
        base = here.get("baseline")
        out[where] = {v: {"tokens_per_s": r["tokens_per_s"], "final_loss": r["final_loss"],
                           "speedup": r["tokens_per_s"] / base["tokens_per_s"] if base else None,
                           "loss_ratio": r["final_loss"] / base["final_loss"] if base else None,
                           "exposed_comm_ms": None if r["exposed_comm_s"] is None else r["exposed_comm_s"] * 1e3,
                           "inter_node_mib_per_step": r["inter_node_bytes_per_step"] / 2**20,
                           "migrations": r["migrations"]}
                       for v, r in here.items()}
    return out


def _where(run: dict) -> str:
    return f"{run['layout']} {run['regime']}"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(table)
    variants = list(dict.fromkeys(v for layout in layouts for v in table[layout]))
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(layouts)
    for i, layout in enumerate(layouts):
        speedups = [table[layout].get(v, {}).get("speedup") or 0 for v in variants]
        bars = axis.bar([x + i * width for x in range(len(variants))], speedups, width, label=layout)
        axis.bar_label(bars, fmt="%.2f", fontsize=7)
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.axhline(1.8, color="tab:red", linewidth=0.8, linestyle="--", label="goal: all together 1.8x")
    axis.set_xticks([x + width * (len(layouts) - 1) / 2 for x in range(len(variants))], variants)
    axis.set_ylabel("tokens/s over the inductor baseline")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_regime_arguments(parser, "2x1")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block", type=int, default=5, help="steps a variant trains before the next one's turn")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each variant left out of tokens/s")
    parser.add_argument("--average", type=int, default=10, help="last steps the final loss averages")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1024, help="hidden units of each expert")
    parser.add_argument("--batch", type=int, default=4, help="sequences of 128 bytes per rank and step")
    parser.add_argument("--chunks", default="auto", help="the overlap's chunk count (2 or more), or auto")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; give some of {list(VARIANTS)}")
    if args.worker:
        return worker(args)
    runs = run_layouts(os.path.abspath(__file__), args, worker_arguments(args), show)
    table = summary(runs)
    first = table[_where(runs[0])]  # the first layout in the first regime
    together = first.get("all", {})
    figure = {"name": "speedup_all_vs_baseline", "value": together.get("speedup"), "goal": 1.8,
              "higher_is_better": True}
    share = host_comm_share_checked(runs[0]["host_comm_share"], runs[0]["layout"])
    baseline = next((r for r in runs if r["variant"] == "baseline" and _where(r) == _where(runs[0])), runs[0])
    out = write_cluster_result("e2e", figure, runs, args, host_comm_share=share, regime=runs[0]["regime"],
                               baseline_comm_share=baseline["comm_share"])
    data = json.loads(out.read_text())
    data.update(speedup_all_vs_baseline=together.get("speedup"), loss_ratio=together.get("loss_ratio"), table=table)
    out.write_text(json.dumps(data, indent=1))
    plot(table, out.with_suffix(".png"))
    for layout, rows in table.items():
        print(f"{layout}: " + ", ".join(f"{v} {r['speedup']:.2f}x (loss {r['loss_ratio']:.3f})" for v, r in rows.items()
                                        if r["speedup"] is not None))
    print(f"speedup_all_vs_baseline {figure['value']}, loss_ratio {data['loss_ratio']}; the baseline's step is "
          f"{baseline['comm_share']:.2f} communication (35-60 %: the seeds' regime), host_comm_share {share}; "
          f"wrote {out}")


if __name__ == "__main__":
    main()
