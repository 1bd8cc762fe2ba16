"""Published training runs predicted by the step model: ``compiler/data/published.yaml``.

    for run in load():
        predicted = predict(run)   # tokens/s against the reported, memory, and the layout's rank in the search

Each run names a shipped model file (with its recipe overridden as published), a hardware profile from spec
sheets, the device count and the layout it ran. The prediction is ``search.score`` of that layout; its rank is
the share of the layouts that fit, from the search of the same model and cluster, predicted faster.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moe_ascend.compiler.planner.search import parse_layout, score, search
from moe_ascend.compiler.planner.step_model import DATA, Hardware, MoEModel, PlannerError


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    model: str
    hardware: str
    devices: int
    layout: str
    reported_tokens_per_s: float
    recipe: dict = dataclasses.field(default_factory=dict)
    assumed: str = ""

    def moe_model(self) -> MoEModel:
        return dataclasses.replace(MoEModel.load(self.model), **self.recipe)


def load(path=DATA / "published.yaml") -> list[PublishedRun]:
    import yaml

    names = {f.name for f in dataclasses.fields(PublishedRun)}
    runs = []
    for entry in yaml.safe_load(path.read_text()):
        unknown = set(entry) - names
        if unknown:
            raise PlannerError(f"{path}: run {entry.get('name')!r} has unknown keys {sorted(unknown)}; a run takes "
                               f"{sorted(names)}")
        runs.append(PublishedRun(**{**entry, "reported_tokens_per_s": float(entry["reported_tokens_per_s"])}))
    return runs


def predict(run: PublishedRun) -> dict:
    """The run's layout scored, its ratio to the reported throughput, and where the search ranks it."""
    model, hardware = run.moe_model(), Hardware.load(run.hardware)
    scored = score(model, hardware, run.devices, parse_layout(run.layout))
    plan = search(model, hardware, run.devices)
    fitting = plan.predicted["tokens_per_s"][plan.fitting]
    return {
        "name": run.name, "layout": scored["layout"], "fits": scored["fits"],
        "memory_gib": scored["memory_bytes"] / 2**30,
        "reported_tokens_per_s": run.reported_tokens_per_s, "predicted_tokens_per_s": scored["tokens_per_s"],
        "ratio": scored["tokens_per_s"] / run.reported_tokens_per_s,
        "predicted_mfu": scored["mfu"],
        # the share of the layouts that fit which the search predicts faster than the published one
        "rank_fraction": float(np.mean(fitting > scored["tokens_per_s"])) if fitting.size else 1.0,
        "best_tokens_per_s": float(fitting.max()) if fitting.size else 0.0,
        "parts_s": {name: scored[name] for name in ("compute_s", "a2a_exposed_s", "tp_comm_s", "pp_p2p_s",
                                                    "bubble_s", "dp_exposed_s", "optimizer_s")},
    }
