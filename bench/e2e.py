"""End to end: examples/train_moe.py's MoE transformer with each technique alone and all together, against the
inductor baseline, on the emulated cluster.

    python bench/e2e.py                     # the figure's job and the three beside it (below)
    python bench/e2e.py --layouts 2x1 --regimes ascend-910b --models top8-of-64 --steps 40   # the figure's only

The models are train_moe's transformer (2 blocks, one shared expert) with two shapes of routed experts:

    top8-of-64    the seeds' shape: 64 fine-grained experts of FFN 1024, top-8 (the figure's)
    top2-of-8     8 experts of FFN 512, top-2: the small model of earlier figures, where a token's two choices
                  rarely share a node, so the two-step exchange saves little

The jobs: the figure's (top8-of-64 on 2 x 1, links scaled to ascend-910b) trains every variant; beside it, one
thing changed at a time (top2-of-8, 2 x 2, 1 Gbit/s), each job trains ``--beside-variants`` (the baseline and all
together) for ``--beside-steps``.

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
``loss_ratio`` (all together / baseline), and from a replay, alone, of the inter-node bytes a step of the flat
exchange sent (the baseline's exchange; its bytes counted in a variant with a flat exchange, ``comm_replayed_from``,
or the most any variant sent where none ran): ``comm_share`` (its time over each variant's step time) and
``host_comm_share`` (the busiest rank's CPU seconds over its wire seconds). Writes bench/results/e2e.json and a bar
chart (PNG) beside it.
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
from _common import (CompilerLines, add_regime_arguments, host_comm_share_checked, measure_host_flops,  # noqa: E402
                     replayed_exchange, run_on_cluster, worker_arguments, write_cluster_result)
from train_moe import TECHNIQUES, Trainer, parser as train_parser  # noqa: E402
from moe_ascend.runtime.launcher import end_process_group  # noqa: E402

VARIANTS = {"baseline": ("inductor", "none"), **{t: ("moe_ascend", t) for t in TECHNIQUES},
            "all": ("moe_ascend", "all")}
FLAT_EXCHANGE = ("overlap", "affinity", "balance")  # the variants whose exchange is the baseline's, counted


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


MODELS = {"top8-of-64": {"experts": 64, "top_k": 8, "ffn": 1024}, "top2-of-8": {"experts": 8, "top_k": 2, "ffn": 512}}


def jobs(args) -> list[tuple[str, str, str, str, int]]:
    """``(regime, layout, model, variants, steps)`` of each job: the figure's (the first of each), then one thing
    changed at a time: each other model, each other layout, each other regime. Every variant for ``--steps`` in
    the figure's job, ``--beside-variants`` for ``--beside-steps`` in the others."""
    regimes, layouts, models = (getattr(args, name).split(",") for name in ("regimes", "layouts", "models"))
    where = ([(regimes[0], layouts[0], m) for m in models] + [(regimes[0], layout, models[0]) for layout in layouts[1:]]
             + [(r, layouts[0], models[0]) for r in regimes[1:]])
    return [(r, layout, m, *((args.variants, args.steps) if i == 0 else (args.beside_variants, args.beside_steps)))
            for i, (r, layout, m) in enumerate(where)]


def run_jobs(args) -> list[dict]:
    """Each job on the emulated cluster, its runs shown as they come in (each tagged with its model)."""
    measure_host_flops(args)
    runs = []
    for regime, layout, model, variants, steps in jobs(args):
        print(f"-- {model} on {layout}, {regime}: {variants}, {steps} steps", flush=True)
        job = argparse.Namespace(**{**vars(args), **MODELS[model], "variants": variants, "steps": steps})
        for run in run_on_cluster(os.path.abspath(__file__), layout, regime, worker_arguments(job), args.host_flops):
            runs.append(run | {"model": model})
            show(runs[-1])
    return runs


def worker(args) -> None:
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # every variant compiles the same forward once (or twice)
    dist.init_process_group("gloo")
    variants = args.variants.split(",")
    trainers = [Trainer(trainer_args(args, v)) for v in variants]
    said = {id(trainer): [] for trainer in trainers}  # what moe_ascend said compiling each (what "auto" chose)
    for block, first in enumerate(range(0, args.steps, args.block)):
        turn = block % len(trainers)
        for trainer in trainers[turn:] + trainers[:turn]:
            with CompilerLines(said[id(trainer)]):
                trainer.train(min(first + args.block, args.steps))
    results = [trainer.result(args.warmup) | {"variant": variant, "compiler_said": said[id(trainer)]}
               for variant, trainer in zip(variants, trainers)]
    # the baseline's exchange is the flat one, but plain Inductor's go uncounted: replay a flat variant's bytes alone
    flat = [r for r in results if r["variant"] in FLAT_EXCHANGE] or results
    replayed = max(flat, key=lambda r: r["inter_node_bytes_per_step"])
    replay = replayed_exchange(replayed["inter_node_bytes_per_step"]) or {}
    if dist.get_rank() == 0:
        for result, trainer in zip(results, trainers):
            step_s = trainer.args.batch * trainer.args.seq_len * trainer.world / result["tokens_per_s"]
            print("RESULT " + json.dumps(result | {"host_comm_share": replay.get("host_comm_share"),
                                                   "comm_share": replay.get("comm_s", 0) / step_s,
                                                   "comm_replayed_from": replayed["variant"]}), flush=True)
    end_process_group()


def show(run: dict) -> None:
    exposed = run["exposed_comm_s"]
    print(f"{_where(run)} {run['variant']:>12}: {run['tokens_per_s']:8.0f} tokens/s, loss {run['final_loss']:.4f}, "
          f"exposed comm {'-' if exposed is None else f'{exposed * 1e3:.1f} ms'}, {run['migrations']} migrations",
          flush=True)
    for line in dict.fromkeys(run.get("compiler_said", [])):  # each once: every rank and recompile says it again
        print(f"    {line}", flush=True)


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
    return f"{run['model']} {run['layout']} {run['regime']}"


def plot(table: dict, runs: list[dict], path: Path) -> None:
    """Each job's speedups as bars, and the loss curves of the figure's job (the first) beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(table)
    variants = list(dict.fromkeys(v for job in shown for v in table[job]))
    figure, (bars_axis, loss_axis) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(shown)
    for i, job in enumerate(shown):
        speedups = [table[job].get(v, {}).get("speedup") or 0 for v in variants]
        bars = bars_axis.bar([x + i * width for x in range(len(variants))], speedups, width, label=job)
        bars_axis.bar_label(bars, fmt="%.2f", fontsize=6)
    bars_axis.axhline(1.0, color="gray", linewidth=0.8)
    bars_axis.axhline(1.8, color="tab:red", linewidth=0.8, linestyle="--", label="goal: all together 1.8x")
    bars_axis.set_xticks([x + width * (len(shown) - 1) / 2 for x in range(len(variants))], variants)
    bars_axis.set_ylabel("tokens/s over the inductor baseline")
    bars_axis.legend(fontsize=7)
    for run in runs:
        if _where(run) == shown[0]:
            loss_axis.plot(range(1, len(run["losses"]) + 1), run["losses"], label=run["variant"], linewidth=1)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel(f"training loss ({shown[0]})")
    loss_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_regime_arguments(parser, "2x1,2x2")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="the first job's, comma separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--beside-variants", default="baseline,all", help="the other jobs' variants")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma separated, of " + ", ".join(MODELS) + "; the first is the figure's")
    parser.add_argument("--steps", type=int, default=20, help="the figure's job's")
    parser.add_argument("--beside-steps", type=int, default=12, help="the other jobs'")
    parser.add_argument("--block", type=int, default=5, help="steps a variant trains before the next one's turn")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each variant left out of tokens/s")
    parser.add_argument("--average", type=int, default=10, help="last steps the final loss averages")
    parser.add_argument("--layers", type=int, default=2)
    for name in ("--experts", "--top-k", "--ffn"):  # a worker's model (from --models)
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4, help="sequences of 128 bytes per rank and step")
    parser.add_argument("--chunks", default="auto", help="the overlap's chunk count (2 or more), or auto")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for given, known in [(args.variants + "," + args.beside_variants, VARIANTS), (args.models, MODELS)]:
        unknown = sorted(set(given.split(",")) - set(known))
        if unknown:
            parser.error(f"unknown {unknown}; give some of {list(known)}")
    if args.worker:
        return worker(args)
    runs = run_jobs(args)
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
    plot(table, runs, out.with_suffix(".png"))
    for layout, rows in table.items():
        print(f"{layout}: " + ", ".join(f"{v} {r['speedup']:.2f}x (loss {r['loss_ratio']:.3f})" for v, r in rows.items()
                                        if r["speedup"] is not None))
    print(f"speedup_all_vs_baseline {figure['value']}, loss_ratio {data['loss_ratio']}; the baseline's step is "
          f"{baseline['comm_share']:.2f} communication (replayed from {baseline['comm_replayed_from']}; 35-60 %: the "
          f"seeds' regime), host_comm_share {share}; wrote {out}")


if __name__ == "__main__":
    main()
