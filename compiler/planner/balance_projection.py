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
from moe_ascend.runtime.balance.predict import Trend

# Each target: its hardware profile, the model file trained on it, and the layout around the expert group
# (pipeline 16, selective recomputation, the two-step exchange; data parallel 2 expert groups).
PROJECTION_TARGETS = {"ascend-910b": "pangu-ultra-moe", "h100": "deepseek-v3"}
PROJECTION_EP = (32, 64)


def project(loads: torch.Tensor, interval: int = 10, horizon: int = 8) -> dict:
    """Recorded loads ``[steps, layers, experts]`` replayed on 32 and 64 expert-parallel ranks of each target:
    the step model's step with the busiest rank's load over the mean as its ``imbalance``, for no balancing (the
    experts in order), EPLB (one spare slot per rank, re-planned from each window's load, always migrating) and
    ours (the same slots, planned from the trend predictor's forecast, migrating only when the predicted gain over
    ``horizon`` windows beats the migration's time). A migration moves each re-placed slot's weights and Adam
    state (14 bytes a parameter) over the inter-node link, the slots spread over the ranks."""
    steps, layers, experts = loads.shape
    loads = loads.double()
    result = {"simulation": True, "what": "recorded loads replayed at expert-parallel scale through the step model "
                                          "(no cluster of that size ran)", "targets": {}}
    for hardware_name, model_name in PROJECTION_TARGETS.items():
        hardware, base = Hardware.load(hardware_name), MoEModel.load(model_name)
        for ep in PROJECTION_EP:
            if experts % ep:
                continue
            layout = {"tp": 1, "pp": 16, "ep": ep, "dp": 2 * ep, "recompute": 2, "hierarchical": 1}

            @functools.lru_cache(maxsize=None)
            def step_at(busiest_over_mean: float) -> float:
                return score(dataclasses.replace(base, imbalance=busiest_over_mean), hardware, 32 * ep,
                             layout)["step_s"]

            def step_s(busiest_over_mean: float) -> float:
                return step_at(round(busiest_over_mean, 3))

            slot_seconds = 14 * 3 * base.hidden * base.expert_ffn / (hardware.inter_node_bandwidth
                                                                    / hardware.ranks_per_node)
            policies = {}
            for policy in ("off", "eplb", "ours"):
                seconds, migrations = 0.0, 0
                for layer in range(layers):
                    placement = Placement.initial(experts, ep, 0 if policy == "off" else ep)
                    predictor = Trend()
                    for window in range(0, steps, interval):
                        load = loads[window:window + interval, layer]
                        if window and policy != "off":
                            seen = loads[window - interval:window, layer].mean(0)
                            if policy == "eplb":
                                planned = greedy_placement(seen, placement.num_slots, ep)
                            else:
                                predictor.update(seen)
                                forecast = predictor.predict(horizon)
                                planned = plan_placement(forecast, placement)
                                gain = horizon * interval * (step_s(imbalance(placement, forecast))
                                                             - step_s(imbalance(planned, forecast)))
                                if gain <= -(-moved_experts(placement, planned) // ep) * slot_seconds * layers:
                                    planned = placement
                            moved = moved_experts(placement, planned)
                            if moved:
                                migrations += 1
                                seconds += -(-moved // ep) * slot_seconds
                            placement = planned
                        seconds += sum(step_s(imbalance(placement, row)) for row in load) / layers
                policies[policy] = {"step_s": seconds / steps, "migrations": migrations}
            for policy in ("eplb", "ours"):
                policies[policy]["gain"] = policies["off"]["step_s"] / policies[policy]["step_s"] - 1
            result["targets"][f"{hardware_name}/ep{ep}"] = {"model": model_name, "layout": layout, **policies}
    ep64 = result["targets"].get("ascend-910b/ep64")
    result["projected_gain_ep64"] = ep64["ours"]["gain"] if ep64 else None
    return result
