"""Training throughput under skewed, drifting expert load: no balancing, a static EPLB-style placement, and ours.

A stack of dropless MoE layers, expert parallel over every rank of the emulated
cluster (2 nodes x 1 rank: one compute-bound rank per core, DESIGN.md), trains
on random tokens whose routing is skewed on purpose: each step adds to the
gate's logits the log of a Zipf distribution (exponent ``--zipf``) over the
experts whose hottest expert drifts smoothly around the ring, one expert every
``--drift-steps`` steps, plus Gumbel noise (so the top-k samples it). Every
rank and every policy sees the same schedule.

    off      the plain placement, no redundant slots (tokens per expert are only observed)
    static   EPLB-style: one greedy placement (with replicas) from the first window's load, never changed
    ours     ExpertBalancer: the best recent of three forecasts (last window, EMA, trend), planning with
             replicas, migrating when the predicted gain over the horizon beats the measured migration cost
    ideal    the plain placement with the same tokens routed without the skew (only the noise): even load,
             the step a perfect balancer would reach, migrations excluded

Beside the stress case, the routing real training produces (``--routings recorded``, on the first layout and
regime): train_moe's per-step, per-layer tokens per expert (DeepSeek-V3's sigmoid router balanced by its bias,
recorded with ``--record-loads``) replayed as each step's skew, on train_moe's experts (64, top-8, each narrowed
so a token's expert FLOP are the Zipf runs'). Its ``recorded`` section has the same figures: where the bias already
keeps the load even, what EDPB must show is that it costs nothing.

The experts are narrow and see many tokens (width 32, 8,192 tokens a rank): some 4,000 rows per expert a step,
so moving an expert costs about one step of compute, as a migration does in real training (a fraction of one
there, where an expert sees millions of rows between optimizer steps), while the exchange's FLOP per byte stays
that of the scaled regime (both scale with the width).

The four train side by side in one process, taking turns a block of steps at
a time, so the machine's noisy minutes fall on all of them alike; each policy's
tokens/s counts its own steps after the first (its migrations included), on
rank 0. The figure is ``captured_fraction`` = (T_off − T_ours) / (T_off − T_ideal), T a step's seconds: the share
of what the imbalance costs that ours wins back, in the first of ``--regimes`` (links scaled to ascend-910b; the
1 Gbit/s runs beside it); beside it ``throughput_gain`` = ours / off − 1 and, from a replay of a step's
inter-node bytes alone,
``comm_share`` (its time over the policy's step) and ``host_comm_share`` (the busiest rank's CPU seconds over
its wire seconds). Writes
bench/results/balance.json and a PNG of the imbalance (max / mean rank load)
over time.

Then a projection to expert-parallel scale, a simulation: train_moe's own routing (DeepSeek-V3's sigmoid
router balanced by its bias, recorded with ``--record-loads``) replayed onto 32 and 64 expert-parallel ranks of
Pangu Ultra MoE on Ascend 910B and DeepSeek-V3 on H100, each policy's placements giving the busiest rank's load
over the mean, which the planner's step model turns into a step time (``projected_gain_ep64``: ours over no
balancing, Ascend 910B, 64 ranks; EPLB beside it).

    python bench/balance.py                  # launches the cluster itself
    python bench/balance.py --steps 160 --rounds 1
    python bench/balance.py --projection-only --loads loads.pt   # only the simulation, from recorded loads
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import (add_regime_arguments, host_comm_share_checked, layout_shape, measure_host_flops,  # noqa: E402
                     median, regime_flags, replayed_exchange, run_layouts, run_on_cluster, worker_arguments,
                     write_cluster_result, write_result, RESULTS)

import moe_ascend.kernels as ops  # noqa: E402
from moe_ascend.compiler.planner.balance_projection import project  # noqa: E402
from moe_ascend.runtime import MoELayer  # noqa: E402
from moe_ascend.runtime.balance import (ExpertBalancer, Placement, Stopwatch, greedy_placement, imbalance,  # noqa: E402
                                        plan_placement, prediction_error)
from moe_ascend.runtime.balance.planner import moved_experts  # noqa: E402
from moe_ascend.runtime.balance.predict import PREDICTORS  # noqa: E402
from moe_ascend.runtime.launcher import end_process_group  # noqa: E402
from train_moe import parser as train_parser  # noqa: E402

POLICIES = ("off", "static", "ours", "ideal")


class SkewedRouting(MoELayer):
    """A balanced MoE layer whose gate logits get the step's skew (a buffer: no recompile as it moves)."""

    def __init__(self, args, redundant: int):
        super().__init__(args.width, args.ffn, args.experts, args.top_k, ep_group=dist.group.WORLD, balance=True,
                         redundant_experts=redundant)
        self.register_buffer("skew", torch.zeros(args.tokens, args.experts))

    def route(self, tokens):
        return ops.topk_softmax(self.gate(tokens) + self.skew, self.top_k, self.renormalize)


class Block(nn.Module):
    def __init__(self, args, redundant: int):
        super().__init__()
        self.norm, self.moe = nn.LayerNorm(args.width), SkewedRouting(args, redundant)

    def forward(self, x):
        return x + self.moe(self.norm(x))


def skew(step: int, rank: int, layer: int, args, even: bool = False) -> torch.Tensor:
    """The routing's log-probabilities over the experts at ``step`` (``args.routing``: log Zipf over the ring of
    experts, hottest at a position that drifts one expert per ``drift_steps``; or the recorded share of each expert
    in ``layer`` at that step), plus Gumbel noise of this (step, rank), so the top-k samples them; ``even``: the
    noise alone."""
    if args.routing == "recorded":
        recorded = args.recorded[step % args.recorded.shape[0], layer % args.recorded.shape[1]]
        log_p = torch.log(recorded.clamp_min(1) / recorded.sum())
    else:
        distance = (torch.arange(args.experts) - step / args.drift_steps) % args.experts
        log_p = -args.zipf * torch.log1p(distance)
    uniform = torch.rand(args.tokens, args.experts, generator=torch.Generator().manual_seed(step * 1000 + rank))
    return log_p * (not even) - torch.log(-torch.log(uniform.clamp_min(1e-9)))


def replay_shape(args) -> argparse.Namespace:
    """The worker's model for ``args.routing``: the recorded routing replays on train_moe's experts (their number
    from the recording, top-k ``--recorded-top-k``), each narrowed so that a token's expert FLOP are the Zipf
    runs' (``ffn · top_k`` kept)."""
    if args.routing != "recorded":
        return args
    recorded = torch.load(args.loads).double()
    top_k = args.recorded_top_k
    return argparse.Namespace(**{**vars(args), "recorded": recorded, "experts": recorded.shape[-1], "top_k": top_k,
                                 "ffn": args.ffn * args.top_k // top_k})


class Trainee:
    """One policy's model, optimizer and balancer, trained a block of steps at a time."""

    def __init__(self, policy: str, args):
        self.policy, self.args, self.rank = policy, args, dist.get_rank()
        torch.manual_seed(0)
        plain = policy in ("off", "ideal")
        self.layers = nn.ModuleList(Block(args, 0 if plain else args.redundant) for _ in range(args.layers))
        model = nn.Sequential(*self.layers)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.stopwatch = Stopwatch()
        self.balancer = ExpertBalancer(model, self.optimizer, interval=args.interval, horizon=args.horizon,
                                       min_interval=args.min_interval, clock=self.stopwatch,
                                       policy="observe" if plain else {"static": "static", "ours": "dynamic"}[policy])
        self.step_fn = (torch.compile(model, backend="moe_ascend", options={"target": "eager"}) if args.compile
                        else model)
        self.x = torch.randn(args.tokens, args.width, generator=torch.Generator().manual_seed(self.rank))

    def train(self, steps: range) -> None:
        for step in steps:
            for index, layer in enumerate(self.layers):
                layer.moe.skew.copy_(skew(step, self.rank, index, self.args, even=self.policy == "ideal"))
            with self.stopwatch:
                loss = (self.step_fn(self.x) - self.x).square().mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            if step == 0:  # the first step compiles and warms up: not counted (the balancer's clock skips it too)
                self.warmup_s = self.stopwatch.total

    def result(self) -> dict:
        seconds, windows = self.stopwatch.total - self.warmup_s, self.balancer.windows
        return {"policy": self.policy, "routing": self.args.routing, "seconds": seconds,
                "tokens_per_s": self.args.steps * self.args.tokens * dist.get_world_size() / seconds,
                "imbalance": [(w["step"], w["imbalance"]) for w in windows],
                "migrations": [{"moved_slots": m.moved_slots, "seconds": m.seconds, "committed": m.committed}
                               for m in self.balancer.migrations],
                "decisions": [(w["step"], w["predicted_gain_s"], w["predicted_cost_s"], w.get("migrated", False))
                              for w in windows if "predicted_gain_s" in w],
                "step_times": [(w["step"], w["step_time_s"]) for w in windows],
                "trace": [w["load"] for w in windows]}


def worker(args) -> None:
    """Every policy trains side by side in one process, a block of steps each in turn (the order rotating from
    block to block), so the machine's slow minutes fall on all of them alike."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    args = replay_shape(args)
    policies = args.policies.split(",")
    for round_ in range(args.rounds):
        trainees = [Trainee(policy, args) for policy in policies]
        for block, first in enumerate(range(0, args.steps + 1, args.block)):
            turn = block % len(trainees)
            for trainee in trainees[turn:] + trainees[:turn]:
                trainee.train(range(first, min(first + args.block, args.steps + 1)))
        replay = replayed_exchange(step_inter_node_bytes(args)) or {}  # a step's inter-node bytes, alone
        if dist.get_rank() == 0:
            for trainee in trainees:
                result = trainee.result()
                step_s = result["seconds"] / args.steps
                print("RESULT " + json.dumps(result | {"round": round_,
                                                       "host_comm_share": replay.get("host_comm_share"),
                                                       "comm_share": replay.get("comm_s", 0) / step_s}), flush=True)
    end_process_group()


def step_inter_node_bytes(args) -> float:
    """What a rank sends to other nodes in a step with even routing: each layer's dispatch and combine, forward and
    backward, of its tokens' top-k rows (fp32), the share of them whose expert is on another node."""
    from moe_ascend.runtime import Topology

    topology = Topology.detect()
    remote = 1 - topology.ranks_per_node / topology.world_size
    return 4 * args.layers * args.tokens * args.top_k * args.width * 4 * remote


def captured_fraction(tokens_per_s: dict[str, float]) -> float | None:
    """``(T_off − T_ours) / (T_off − T_ideal)`` with ``T`` a step's seconds (1 / tokens/s): the share of the
    imbalance's cost that ours wins back; None without the three, or where the imbalance costs nothing."""
    if not {"off", "ours", "ideal"} <= tokens_per_s.keys():
        return None
    off, ours, ideal = (1 / tokens_per_s[p] for p in ("off", "ours", "ideal"))
    return (off - ours) / (off - ideal) if off > ideal else None


def compare_planners(trace: torch.Tensor, args, ranks: int) -> dict:
    """EPLB greedy against ours, each planning every window of the recorded load for that window: mean imbalance
    and slots moved (ours from its previous placement, EPLB from scratch as it plans)."""
    slots = args.experts + args.redundant
    result = {"eplb": {"imbalance": 0.0, "moved_slots": 0}, "ours": {"imbalance": 0.0, "moved_slots": 0}}
    for layer in range(trace.shape[1]):
        previous = {name: Placement.initial(args.experts, ranks, args.redundant) for name in result}
        for load in trace[:, layer]:
            planned = {"eplb": greedy_placement(load, slots, ranks), "ours": plan_placement(load, previous["ours"])}
            for name, placement in planned.items():
                result[name]["imbalance"] += imbalance(placement, load) / (trace.shape[0] * trace.shape[1])
                result[name]["moved_slots"] += moved_experts(previous[name], placement)
                previous[name] = placement
    return result


def record_loads(args, path: Path) -> torch.Tensor:
    """``examples/train_moe.py`` (its seed-shaped model in 2 blocks, DeepSeek-V3's sigmoid router balanced by its
    selection bias, none of our balancing) for ``--record-steps`` steps on a 2 x 1 cluster: the (token, choice) pairs
    each expert was routed, ``[steps, layers, experts]``."""
    import subprocess

    train = Path(__file__).resolve().parents[1] / "examples" / "train_moe.py"
    # the routing depends on neither the link nor the lowering: the fastest link, without Inductor, records it soonest
    command = [sys.executable, "-m", "moe_ascend.compiler.cli", "launch", "--nodes", "2",
               *regime_flags("10gbit", None), "--", sys.executable, str(train), "--router", "sigmoid",
               "--target", "eager", "--techniques", "none", "--layers", "2", "--steps", str(args.record_steps),
               "--log-every", "0", "--record-loads", str(path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"recording train_moe's loads failed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}")
    return torch.load(path)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for run in (r for r in runs if r["round"] == 0):
        steps, ratio = zip(*run["imbalance"]) if run["imbalance"] else ((), ())
        axis.plot(steps, ratio, label=f"{run['policy']} ({run['tokens_per_s']:.0f} tokens/s)")
    axis.set_xlabel("step")
    axis.set_ylabel("imbalance (max / mean rank load)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_regime_arguments(parser, "2x1")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1)
    # many rows per expert a step, as in real training (its migration then costs about a step, not eight):
    # narrow (both the compute and the bytes moved scale with the width), with many tokens
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per rank and step")
    parser.add_argument("--width", type=int, default=32)
    # experts wide enough for their compute to match their exchange in the scaled regime (2.25·ffn FLOP a byte)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--redundant", type=int, default=2, help="redundant expert slots per layer (static, ours)")
    parser.add_argument("--routings", default="zipf,recorded",
                        help="zipf: the drifting Zipf (every layout and regime; the figure's); recorded: train_moe's "
                             "recorded routing replayed (the first layout and regime)")
    parser.add_argument("--recorded-steps", type=int, default=10,
                        help="the recorded routing's steps (a step there sends top-k of 64 experts: 4 times the bytes)")
    parser.add_argument("--recorded-policies", default="off,ours,ideal",
                        help="the recorded routing's policies (EPLB's static placement is compared on the Zipf runs "
                             "and in the projection)")
    parser.add_argument("--recorded-top-k", type=int, default=train_parser().get_default("top_k"),
                        help="experts a token chose in the recording (train_moe's --top-k)")
    parser.add_argument("--routing", default="zipf", help=argparse.SUPPRESS)  # a worker's
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--drift-steps", type=int, default=20, help="steps for the hottest expert to move by one")
    parser.add_argument("--block", type=int, default=5, help="steps a policy trains before the next one's turn")
    parser.add_argument("--interval", type=int, default=5, help="steps between load reads")
    parser.add_argument("--horizon", type=int, default=8, help="windows a new placement is expected to serve")
    parser.add_argument("--min-interval", type=int, default=20, help="steps between migrations, at least")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma separated, of " + ", ".join(POLICIES))
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (moe_ascend, eager target)")
    parser.add_argument("--loads", default=None, help="recorded loads to project to expert-parallel scale "
                        "(train_moe.py --record-loads); default: record --record-steps of train_moe first")
    parser.add_argument("--record-steps", type=int, default=40, help="train_moe steps whose loads are recorded")
    parser.add_argument("--projection-only", action="store_true",
                        help="only the projection (bench/results/balance-projection.json), no cluster runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    loads_path = Path(args.loads) if args.loads else RESULTS / "train_moe-loads.pt"
    loads_path.parent.mkdir(parents=True, exist_ok=True)
    loads = torch.load(loads_path) if args.loads else record_loads(args, loads_path)
    projected = project(loads)
    for target, policies in projected["targets"].items():
        print(f"projection (simulation) {target}: step {policies['off']['step_s']:.3f} s unbalanced; EPLB "
              f"{policies['eplb']['gain']:+.3f} ({policies['eplb']['migrations']} migrations), ours "
              f"{policies['ours']['gain']:+.3f} ({policies['ours']['migrations']})", flush=True)
    if args.projection_only:
        figure = {"name": "projected_gain_ep64", "value": projected["projected_gain_ep64"], "goal": 0.25,
                  "higher_is_better": True}
        write_result("balance-projection", figure, [], vars(args) | {"loads": str(loads_path)}, args.json,
                     **projected)
        return
    script = os.path.abspath(__file__)
    routings = args.routings.split(",")
    runs = run_layouts(script, args, worker_arguments(args), show) if "zipf" in routings else []
    recorded = []
    if "recorded" in routings:
        layout, regime = args.layouts.split(",")[0], args.regimes.split(",")[0]
        print(f"-- train_moe's recorded routing: {layout}, {regime}", flush=True)
        measure_host_flops(args)
        replay = argparse.Namespace(**{**vars(args), "routing": "recorded", "loads": str(loads_path),
                                       "steps": args.recorded_steps, "policies": args.recorded_policies})
        recorded = run_on_cluster(script, layout, regime, worker_arguments(replay), args.host_flops)
        for run in recorded:
            show(run)
    first = [r for r in runs if r["regime"] == runs[0]["regime"]] or recorded  # the figure's regime
    zipf = summary(first) if runs else None
    replayed = summary(recorded) if recorded else None
    figure = {"name": "captured_fraction", "value": zipf and zipf["captured_fraction"], "goal": 0.8,
              "higher_is_better": True}
    share = host_comm_share_checked(first[0]["host_comm_share"], first[0]["layout"])
    off = next((r for r in first if r["policy"] == "off"), first[0])
    out = write_cluster_result("balance", figure, runs + recorded, args, host_comm_share=share,
                               regime=first[0]["regime"], baseline_comm_share=off["comm_share"])
    data = json.loads(out.read_text())
    data.update(projected_gain_ep64=projected["projected_gain_ep64"], projection=projected, recorded=replayed,
                tokens_per_s_by_regime={regime: summary([r for r in runs if r["regime"] == regime])["tokens_per_s"]
                                        for regime in dict.fromkeys(r["regime"] for r in runs)})
    if zipf:
        trace = torch.tensor(off["trace"])
        scored = max(1, min(args.horizon, len(trace) // 2))  # windows ahead each forecast is scored (fewer: short run)
        nodes, per_node = layout_shape(args.layouts.split(",")[0])
        data.update(zipf, prediction_windows_ahead=scored,
                    prediction_error={name: prediction_error(trace, name, scored) for name in PREDICTORS},
                    planners_on_trace=compare_planners(trace, args, nodes * per_node))
        print(f"drifting Zipf: {said(zipf)}; prediction error ({scored} windows ahead) "
              + ", ".join(f"{name} {error:.3f}" for name, error in data["prediction_error"].items())
              + f"; planners on the trace {data['planners_on_trace']}")
    if replayed:
        print(f"train_moe's recorded routing: {said(replayed)}")
    out.write_text(json.dumps(data, indent=1))
    plot(first, out.with_suffix(".png"))
    print(f"the unbalanced step is {off['comm_share']:.2f} communication (35-60 %: the seeds' regime), "
          f"host_comm_share {share}; wrote {out}")


def show(run: dict) -> None:
    print(f"{run['layout']} {run['regime']} {run['routing']} round {run['round']} {run['policy']:>6}: "
          f"{run['tokens_per_s']:8.0f} tokens/s ({run['seconds']:.1f} s), mean imbalance {mean_imbalance(run):.3f}, "
          f"{sum(m['committed'] for m in run['migrations'])} migrations", flush=True)


def mean_imbalance(run: dict) -> float:
    return sum(i for _, i in run["imbalance"]) / max(1, len(run["imbalance"]))


def summary(runs: list[dict]) -> dict:
    """Each policy's tokens/s (the median over rounds) and mean imbalance; ours', static's and the ideal's gain
    over no balancing, and the captured fraction (None where a policy did not run)."""
    ran = [p for p in POLICIES if any(r["policy"] == p for r in runs)]
    tokens = {p: median([r["tokens_per_s"] for r in runs if r["policy"] == p]) for p in ran}

    def gain(policy):
        return tokens[policy] / tokens["off"] - 1 if {policy, "off"} <= tokens.keys() else None
    return {"tokens_per_s": tokens, "captured_fraction": captured_fraction(tokens), "throughput_gain": gain("ours"),
            "static_gain": gain("static"), "ideal_gain": gain("ideal"),
            "mean_imbalance": {p: median([mean_imbalance(r) for r in runs if r["policy"] == p]) for p in ran}}


def said(summary: dict) -> str:
    """A summary in one line."""
    def signed(value):
        return "-" if value is None else f"{value:+.3f}"
    return (f"tokens/s {', '.join(f'{p} {t:.0f}' for p, t in summary['tokens_per_s'].items())}; mean imbalance "
            f"{', '.join(f'{p} {i:.3f}' for p, i in summary['mean_imbalance'].items())}; captured_fraction "
            f"{summary['captured_fraction']}, gain: ours {signed(summary['throughput_gain'])}, static "
            f"{signed(summary['static_gain'])}, ideal {signed(summary['ideal_gain'])}")


if __name__ == "__main__":
    main()
