"""Expert balancing projected to expert-parallel scale: a simulation, not a run.

    project(loads)   # loads [steps, layers, experts]: train_moe.py --record-loads
    # {"targets": {"ascend-910b/ep64": {"off": {"step_s"}, "eplb": {"step_s", "gain"}, "ours": {...}}, ...},
    #  "projected_gain_ep64": ours over no balancing on 64 Ascend 910B ranks}

A cluster of 64 expert-parallel ranks is not at hand; its routing is. The loads a real training run recorded are
replayed onto 32 and 64 ranks: each policy's placement of the experts (``runtime.balance``) gives every step's
busiest rank over the mean, and the step model (``step_model``, its ``imbalance``) turns that into the step of a
seed-sized model at that scale, migrations included.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from moe_ascend.compiler.planner.search import score
from moe_ascend.compiler.planner.step_model import Hardware, MoEModel
from moe_ascend.runtime.balance import Placement, greedy_placement, imbalance, plan_placement
from moe_ascend.runtime.balance.planner import moved_experts
from moe_ascend.runtime.balance.predict import BestRecent

# Each target: its hardware profile, the model file trained on it, and the layout around the expert group
# (pipeline 16, selective recomputation, the two-step exchange; data parallel 2 expert groups).
PROJECTION_TARGETS = {"ascend-910b": "pangu-ultra-moe", "h100": "deepseek-v3"}
PROJECTION_EP = (32, 64)
POLICIES = ("off", "eplb", "ours")


class _Target:
    """One projected cluster: its step at a given imbalance (the step model's, cached) and a migration's time,
    which moves each re-placed slot's weights and Adam state (14 bytes a parameter) over the inter-node link, the
    slots spread over the ranks."""

    def __init__(self, model: MoEModel, hardware: Hardware, ep: int):
        self.model, self.hardware, self.ep = model, hardware, ep
        self.layout = {"tp": 1, "pp": 16, "ep": ep, "dp": 2 * ep, "recompute": 2, "hierarchical": 1}
        self.slot_seconds = 14 * 3 * model.hidden * model.expert_ffn / (hardware.inter_node_bandwidth
                                                                       / hardware.ranks_per_node)
        self._step_at = functools.cache(self._score)  # this target's, rounded: a replay asks for few values

    def step_s(self, busiest_over_mean: float) -> float:
        return self._step_at(round(busiest_over_mean, 3))

    def _score(self, busiest_over_mean: float) -> float:
        model = dataclasses.replace(self.model, imbalance=busiest_over_mean)
        return score(model, self.hardware, 32 * self.ep, self.layout)["step_s"]

    def migration_s(self, moved_slots: int) -> float:
        return -(-moved_slots // self.ep) * self.slot_seconds


def project(loads: torch.Tensor, interval: int = 10, horizon: int = 8) -> dict:
    """Recorded loads ``[steps, layers, experts]`` replayed on 32 and 64 expert-parallel ranks of each target:
    the step model's step with the busiest rank's load over the mean as its ``imbalance``, for no balancing (the
    experts in order), EPLB (one spare slot per rank, re-planned from each ``interval``-step window's load, always
    migrating) and ours (the same slots, planned from the ``BestRecent`` forecast, migrating only when the step
    time saved over ``horizon`` windows beats the migration's)."""
    loads = loads.double()
    result = {"simulation": True, "what": "recorded loads replayed at expert-parallel scale through the step model "
                                          "(no cluster of that size ran)", "targets": {}}
    for hardware_name, model_name in PROJECTION_TARGETS.items():
        hardware, model = Hardware.load(hardware_name), MoEModel.load(model_name)
        for ep in PROJECTION_EP:
            if loads.shape[2] % ep:
                continue
            target = _Target(model, hardware, ep)
            policies = {policy: _replay(policy, loads, target, interval, horizon) for policy in POLICIES}
            for policy in ("eplb", "ours"):
                policies[policy]["gain"] = policies["off"]["step_s"] / policies[policy]["step_s"] - 1
            result["targets"][f"{hardware_name}/ep{ep}"] = {"model": model_name, "layout": target.layout, **policies}
    ep64 = result["targets"].get("ascend-910b/ep64")
    result["projected_gain_ep64"] = ep64["ours"]["gain"] if ep64 else None
    return result


def _replay(policy: str, loads: torch.Tensor, target: _Target, interval: int, horizon: int) -> dict:
    """One policy over every layer's recorded steps: the mean step (each layer's share of it, migrations
    included) and how many times it migrated."""
    steps, layers, experts = loads.shape
    seconds, migrations = 0.0, 0
    for layer in range(layers):
        placement = Placement.initial(experts, target.ep, 0 if policy == "off" else target.ep)
        predictor = BestRecent()
        for window in range(0, steps, interval):
            if window and policy != "off":
                seen = loads[window - interval:window, layer].mean(0)
                planned = _plan(policy, seen, placement, predictor, target, horizon, horizon * interval / layers)
                if moved := moved_experts(placement, planned):
                    migrations += 1
                    seconds += target.migration_s(moved)
                placement = planned
            seconds += sum(target.step_s(imbalance(placement, step)) for step in loads[window:window + interval, layer]
                           ) / layers
    return {"step_s": seconds / steps, "migrations": migrations}


def _plan(policy: str, seen: torch.Tensor, placement: Placement, predictor: BestRecent, target: _Target, horizon: int,
          steps_served: float) -> Placement:
    """EPLB re-plans from the window just seen. Ours plans for the forecast and keeps the current placement unless
    the step time the new one saves over the steps it serves (this layer's share) beats its migration."""
    if policy == "eplb":
        return greedy_placement(seen, placement.num_slots, placement.ranks)
    predictor.update(seen)
    forecast = predictor.predict(horizon)
    planned = plan_placement(forecast, placement)
    saved = steps_served * (target.step_s(imbalance(placement, forecast)) - target.step_s(imbalance(planned, forecast)))
    return planned if saved > target.migration_s(moved_experts(placement, planned)) else placement
