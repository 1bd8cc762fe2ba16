"""``ExpertBalancer``: EDPB for the balanced ``MoELayer``s of a model, driven by the optimizer's steps.

    model = Model(...)                     # MoELayer(..., balance=True, redundant_experts=R)
    optimizer = torch.optim.AdamW(model.parameters())
    balancer = ExpertBalancer(model, optimizer)
    step = torch.compile(model, backend="moe_ascend")   # train as usual: the balancer hooks optimizer.step()

It sums the gradients of replicated experts over their replicas (so replicas
stay equal and the update is that of one expert): copies on one rank locally,
and for experts with replicas on several ranks each weight's all_reduce starts
as soon as backward has its gradient, under the rest of backward, and is
waited for before the optimizer step (with gradient accumulation, the sum
waits for the step).
After every ``interval`` steps it reads the tokens per expert the layers
counted on device (one all_reduce: the only host sync), updates the load
prediction, plans a placement for the predicted load and migrates when

    horizon · (step time now − predicted step time after) > migration cost

and at least ``min_interval`` steps have passed since the last migration.
Step time is modelled as ``a + b · Σ_layers (busiest rank's tokens)`` plus
the part of the all_reduce of the gradients of experts replicated across
ranks that the step waits for (a replica whose compute saving does not pay
for its gradients' sum is not worth a migration), ``b`` fitted on the windows
measured so far (until two windows differ in load, ``b`` assumes half of the
step is expert compute). The sums run under the rest of backward: the share
of their wire time (their bytes at ``bandwidth``) a step waits for is
measured while replicas span ranks (the wait before the optimizer step, on
the rank that waited least: the others also wait for its skew), and before
that taken as ``1 / layers`` (the first layer's sums end backward with
nothing left to run under). The migration cost is
measured on the previous migration (seconds per byte moved), and before the
first from ``bandwidth`` (bytes per second; by default the inter-node link
``moe-ascend launch`` shaped, else 1 Gbit/s). ``clock`` times the steps (``time.perf_counter``;
a benchmark that interleaves several models gives each its own stopwatch).

``policy``: ``"dynamic"`` (the above), ``"static"`` (the EPLB-style baseline:
one greedy placement planned from the first window's load, never changed) or
``"observe"`` (measure and predict only: ``windows`` records the imbalance).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_ascend.runtime.balance.migrate import MigrationReport, migrate, slot_bytes, slot_tensors, transfers
from moe_ascend.runtime.balance.placement import Placement
from moe_ascend.runtime.balance.planner import greedy_placement, imbalance, plan_placement
from moe_ascend.runtime.balance.predict import PREDICTORS

log = logging.getLogger(__name__)
POLICIES = ("dynamic", "static", "observe")
_AT_THE_STEP = object()  # a replica sum that waits for the optimizer step (not started in backward)


def link_bytes_per_s() -> float:
    """The inter-node link's rate in bytes per second: ``moe-ascend launch``'s shaping when it shaped one, else
    1 Gbit/s."""
    from moe_ascend.runtime.launcher import cluster_from_environment

    cluster = cluster_from_environment() or {}
    return cluster["bandwidth_bits_per_s"] / 8 if cluster.get("shaped") else 125e6


def balanced_layers(model: torch.nn.Module) -> list:
    from moe_ascend.runtime.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer) and m.balance]


def read_loads(layers, group=None, step_time: float = 0.0) -> tuple[torch.Tensor, float]:
    """``[layers, experts]`` tokens per expert since the last read, summed over the group's ranks (the counters
    restart), and the ranks' mean of ``step_time``: every rank decides from the same numbers, so all of them
    migrate or none does (a rank that decided alone would wait in a collective the others never join)."""
    loads = torch.stack([layer.expert_load for layer in layers]).double().flatten()
    for layer in layers:
        layer.expert_load.zero_()
    measured = torch.cat([loads, torch.tensor([step_time], dtype=torch.float64)])
    ranks = dist.get_world_size(group) if dist.is_initialized() else 1
    if ranks > 1:
        dist.all_reduce(measured, group=group)
    return measured[:-1].view(len(layers), -1), float(measured[-1]) / ranks


@functools.lru_cache(maxsize=64)
def _replica_rows(placement: Placement, rank: int) -> tuple[int, int, list[tuple[int, int]]]:
    """``(rows, spanning, local)``: the rows of this rank's replica sums, of which the first ``spanning`` are the
    experts with replicas on more than one rank (the same on every rank, so only they cross ranks); the others are
    experts whose replicas all live here; ``local`` is ``(local slot, row)`` for each of this rank's replicas
    (once per placement: every weight of every backward asks)."""
    per_rank = placement.slots_per_rank
    ranks_holding: dict[int, set[int]] = {}
    for slot, expert in enumerate(placement.slot_experts):
        ranks_holding.setdefault(expert, set()).add(slot // per_rank)
    copies = Counter(placement.slot_experts)
    spanning = sorted(e for e, held in ranks_holding.items() if len(held) > 1)
    here_only = sorted(e for e, held in ranks_holding.items() if held == {rank} and copies[e] > 1)
    row = {e: i for i, e in enumerate(spanning + here_only)}
    mine = placement.slot_experts[rank * per_rank:(rank + 1) * per_rank]
    return len(row), len(spanning), [(slot, row[e]) for slot, e in enumerate(mine) if e in row]


def spanning_replicas(placement: Placement) -> int:
    """How many experts have replicas on more than one rank: their gradients are summed across ranks every step."""
    return _replica_rows(placement, 0)[1]


def start_replica_sum(layer, weight: torch.Tensor, group=None) -> tuple | None:
    """Sum ``weight.grad`` over the replicas of each replicated expert: this rank's replicas locally, then, for the
    experts with replicas on other ranks too, an all_reduce that runs asynchronously (``finish_replica_sum`` waits
    for it). None when nothing is replicated."""
    distributed = dist.is_initialized() and dist.get_world_size(group) > 1
    rows, spanning, local = _replica_rows(layer.placement, dist.get_rank(group) if distributed else 0)
    if not rows:
        return None
    total = weight.grad.new_zeros(rows, *weight.shape[1:])
    for slot, i in local:
        total[i] += weight.grad[slot]
    work = dist.all_reduce(total[:spanning], group=group, async_op=True) if distributed and spanning else None
    return local, total, work


def finish_replica_sum(weight: torch.Tensor, started: tuple | None) -> None:
    if started is None:
        return
    local, total, work = started
    if work is not None:
        work.wait()
    for slot, i in local:
        weight.grad[slot] = total[i]


class Stopwatch:
    """Seconds spent inside ``with stopwatch:`` blocks: a balancer's ``clock`` where several runs take turns in one
    process, so each counts only its own steps."""

    def __init__(self):
        self.total, self._since = 0.0, None

    def __enter__(self):
        self._since = time.perf_counter()

    def __exit__(self, *exc):
        self.total, self._since = self(), None

    def __call__(self) -> float:
        return self.total + (time.perf_counter() - self._since if self._since is not None else 0.0)


class ExpertBalancer:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, group=None, interval: int = 10,
                 horizon: int = 10, min_interval: int = 50, predictor: str = "best", policy: str = "dynamic",
                 ranks_per_node: int | None = None, bandwidth: float | None = None,
                 fault: Callable[[str], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.layers = balanced_layers(model)
        if not self.layers:
            raise ValueError("no MoELayer with balance=True in the model: build its MoE layers with "
                             "MoELayer(..., balance=True, redundant_experts=R)")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {sorted(PREDICTORS)}, got {predictor!r}")
        self.optimizer, self.group = optimizer, group
        self.ranks = dist.get_world_size(group) if dist.is_initialized() else 1
        if any(layer.ep_size != self.ranks for layer in self.layers):
            raise ValueError(f"the balancer's group has {self.ranks} ranks but a layer's expert-parallel group has "
                             f"{[layer.ep_size for layer in self.layers]}; pass the layers' ep_group as group=")
        self.interval, self.horizon, self.min_interval = interval, horizon, min_interval
        self.policy, self.ranks_per_node, self.fault, self.clock = policy, ranks_per_node, fault, clock
        self.predictor = PREDICTORS[predictor]()
        self.bandwidth = bandwidth or link_bytes_per_s()
        self.seconds_per_byte = 1 / self.bandwidth
        self.steps, self.last_migration, self.window_started = 0, -min_interval, None
        self.exposed_share = 1 / len(self.layers)  # of the replica sums' wire time, until a window measures it
        self._replica_wait = 0.0  # seconds this window's steps waited for replica sums
        self.windows: list[dict] = []  # one per interval: what was measured, predicted and decided
        self.migrations: list[MigrationReport] = []
        self._replica_sums: dict[torch.Tensor, object] = {}  # started in backward, finished before the step
        self._hooks = [optimizer.register_step_pre_hook(lambda *_: self.before_step()),
                       optimizer.register_step_post_hook(lambda *_: self.after_step())]
        for layer in self.layers:
            for weight in (layer.w_gate_up, layer.w_down):
                self._hooks.append(weight.register_post_accumulate_grad_hook(
                    lambda weight, layer=layer: self._gradient_ready(layer, weight)))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    # --- checkpoints (the placement itself is in the layers' buffers, so in the model's state_dict) ----------

    def state_dict(self) -> dict:
        """What the next decisions depend on: the step count, the last migration, the predictor's state, the
        measured migration cost and the windows (the step-time fit reads the recent ones)."""
        return {"steps": self.steps, "last_migration": self.last_migration, "seconds_per_byte": self.seconds_per_byte,
                "exposed_share": self.exposed_share, "predictor": self.predictor.state_dict(), "windows": self.windows,
                "started": self.window_started is not None}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s: the window restarts at the next step (the clock is this process's)."""
        self.steps, self.last_migration = state["steps"], state["last_migration"]
        self.seconds_per_byte, self.windows = state["seconds_per_byte"], list(state["windows"])
        self.exposed_share = state.get("exposed_share", self.exposed_share)  # (older checkpoints: the prior)
        self.predictor.load_state_dict(state["predictor"])
        self.window_started = self.clock() if state["started"] else None

    # --- hooks ---------------------------------------------------------------------------------

    def _gradient_ready(self, layer, weight: torch.Tensor) -> None:
        if weight in self._replica_sums:  # a second backward before the step (gradient accumulation): sum at the step
            self._replica_sums[weight] = _AT_THE_STEP
            return
        self._replica_sums[weight] = start_replica_sum(layer, weight, self.group)

    def before_step(self) -> None:
        waiting_since = time.perf_counter()
        for layer in self.layers:
            for weight in (layer.w_gate_up, layer.w_down):
                started = self._replica_sums.get(weight, _AT_THE_STEP)
                if weight.grad is not None:
                    finish_replica_sum(weight, start_replica_sum(layer, weight, self.group)
                                       if started is _AT_THE_STEP else started)
        self._replica_sums.clear()
        self._replica_wait += time.perf_counter() - waiting_since

    def after_step(self) -> None:
        self.steps += 1
        if self.window_started is None:
            self.window_started = self.clock()
            for layer in self.layers:  # the first step also compiled: it starts the clock and is not counted
                layer.expert_load.zero_()
            self.steps, self._replica_wait = 0, 0.0
            return
        if self.steps % self.interval:
            return
        step_time = (self.clock() - self.window_started) / self.interval
        loads, step_time = read_loads(self.layers, self.group, step_time)
        loads = loads / self.interval  # tokens per expert per step
        self._measure_exposed_share()
        window = {"step": self.steps, "step_time_s": step_time,
                  "busiest": self._busiest(self.placements, loads),
                  "imbalance": sum(map(imbalance, self.placements, loads)) / len(self.layers),
                  "load": loads.tolist()}
        self.predictor.update(loads)
        self.windows.append(window)
        self._decide(window)
        self.window_started = self.clock()  # a migration's time is its own, not the next window's

    # --- the decision --------------------------------------------------------------------------

    def _decide(self, window: dict) -> None:
        if self.policy == "observe":
            return
        if self.policy == "static":
            if len(self.windows) == 1:
                loads = torch.tensor(window["load"])
                new = [greedy_placement(load, p.num_slots, p.ranks, self.ranks_per_node)
                       for load, p in zip(loads, self.placements)]
                self._migrate(new, window)
            return
        if self.steps - self.last_migration < self.min_interval:
            return
        predicted = self.predictor.predict(self.horizon)
        new = [plan_placement(load, p) for load, p in zip(predicted, self.placements)]
        if all(a == b for a, b in zip(new, self.placements)):
            return
        gain, cost = self.horizon * self.interval * self._seconds_saved(new, predicted), self._migration_cost(new)
        window.update(predicted_gain_s=gain, predicted_cost_s=cost)
        if gain > cost:
            self._migrate(new, window)

    def _migrate(self, new: list[Placement], window: dict) -> None:
        moving = self._bytes_to_move(new)
        report = migrate(self.layers, new, self.optimizer, self.group, self.fault)
        self.migrations.append(report)
        window["migrated"] = report.committed
        if not report.committed:
            log.warning("expert migration abandoned, every rank keeps its placement: %s", report.error)
            return
        self.last_migration = self.steps
        seconds = torch.tensor([report.seconds], dtype=torch.float64)
        if self.ranks > 1:  # the slowest rank's time, the same on every rank (it feeds the next decision)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=self.group)
        if moving:
            self.seconds_per_byte = float(seconds) / moving

    @property
    def placements(self) -> list[Placement]:
        return [layer.placement for layer in self.layers]

    # --- the models ----------------------------------------------------------------------------

    @staticmethod
    def _busiest(placements, loads) -> float:
        return sum(max(p.rank_loads(load)) for p, load in zip(placements, loads))

    def _seconds_per_token(self) -> float:
        """``b`` of ``step time = a + b · busiest``: least squares over the windows, or half the step per token."""
        recent = self.windows[-20:]
        xs, ys = [w["busiest"] for w in recent], [w["step_time_s"] for w in recent]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        spread = sum((x - mean_x) ** 2 for x in xs)
        if len(xs) >= 3 and spread > 1e-6 * mean_x**2:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
            if slope > 0:
                return slope
        return 0.5 * mean_y / mean_x if mean_x else 0.0

    def _seconds_saved(self, new: list[Placement], predicted) -> float:
        """Per step: the busiest ranks' tokens that ``new`` takes off, less the replica sums it adds across ranks."""
        compute = self._seconds_per_token() * (self._busiest(self.placements, predicted)
                                               - self._busiest(new, predicted))
        return compute - (self._replica_sum_seconds(new) - self._replica_sum_seconds(self.placements))

    def _replica_sum_seconds(self, placements: list[Placement]) -> float:
        """What a step waits for the all_reduce of the gradients of experts replicated across ranks: the measured
        ``exposed_share`` of their wire time."""
        return self.exposed_share * self._replica_sum_wire_seconds(placements)

    def _replica_sum_wire_seconds(self, placements: list[Placement]) -> float:
        """The replica sums' time on the wire: a ring's 2(W−1)/W of their bytes at ``bandwidth``."""
        per_byte = 2 * (self.ranks - 1) / self.ranks / self.bandwidth
        return per_byte * sum(
            spanning_replicas(p) * slot_bytes([layer.w_gate_up, layer.w_down])
            for layer, p in zip(self.layers, placements))

    def _measure_exposed_share(self) -> None:
        """``exposed_share`` from this window's wait for the replica sums, where they cross ranks: the least any
        rank waited (the one that arrived last waits for the wire alone, the others for its skew too)."""
        waited = torch.tensor([self._replica_wait / self.interval], dtype=torch.float64)
        self._replica_wait = 0.0
        wire = self._replica_sum_wire_seconds(self.placements)  # the same on every rank: all join or none
        if not wire:
            return
        if self.ranks > 1 and dist.is_initialized():
            dist.all_reduce(waited, op=dist.ReduceOp.MIN, group=self.group)
        self.exposed_share = min(1.0, float(waited) / wire)

    def _bytes_to_move(self, new: list[Placement]) -> int:
        return sum(slot_bytes(slot_tensors(layer, self.optimizer)) * len(transfers(old, placement))
                   for layer, old, placement in zip(self.layers, self.placements, new))

    def _migration_cost(self, new: list[Placement]) -> float:
        return self._bytes_to_move(new) * self.seconds_per_byte
