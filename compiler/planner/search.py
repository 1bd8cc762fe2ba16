"""``moe-ascend plan``: search parallel layouts of an MoE model on N devices with the step model.

    plan = search(MoEModel.load("deepseek-v3"), Hardware.load("h100"), devices=2048)
    plan.best(10)            # the fastest layouts that fit in memory, as dicts
    plan.pareto()            # tokens/s against memory per device: the layouts nothing beats on both
    score(model, hardware, 2048, parse_layout("tp=1,pp=16,ep=64"))   # one given layout, its time's parts

The search space is every layout that the devices and the model allow:
tensor parallel within a node and dividing the heads; pipeline stages at most
the layers; data parallel the rest; expert parallel dividing both tensor x data
parallel (the expert group folds over both) and the experts; 1, 2 or 4 virtual
stages (with a pipeline), or DualPipe (an even pipeline); micro-batches of 1, 2,
4 or 8 sequences dividing the batch; no, full or selective recomputation; 1, 2
or 4 overlap chunks (with expert parallel); the flat or hierarchical all-to-all
(when the expert group spans nodes). All of it is evaluated at once as numpy
arrays (``StepModel.evaluate``).
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass

import numpy as np

from moe_ascend.compiler.planner.step_model import (LAYOUT, OPTIONAL, Hardware, MoEModel, PlannerError, StepModel,
                                                    divisors, fits)

VIRTUAL_STAGES = (1, 2, 4)
MICRO_BATCHES = (1, 2, 4, 8)
CHUNKS = (1, 2, 4)
RECOMPUTE = (0, 1, 2)  # none, full, selective
SCHEDULES = ((0, 0), (0, 1), (1, 0))  # (dualpipe, fb_overlap): 1F1B, 1F1B with paired micro-batches, DualPipe


# The table's columns (``moe-ascend plan --help`` prints them).
COLUMNS = {
    "tp": "tensor-parallel size", "ep": "expert-parallel size", "pp": "pipeline stages",
    "vpp": "virtual stages per pipeline stage (interleaved schedule)", "dp": "data-parallel size",
    "mb": "sequences per micro-batch",
    "rc": "recomputation: none (0), each layer's whole forward (1), or selective (2: the model's "
          "selective_recompute parts: norms, MLA up-projections, SwiGLU outputs)",
    "n": "chunks each all-to-all is split into, to hide under the experts",
    "hier": "the two-step hierarchical all-to-all (1) or the flat one (0)",
    "dual": "DualPipe (1: a bidirectional pipeline, two micro-batches' forward and backward overlapped, each "
            "hiding the other's all-to-all) or 1F1B (0)",
    "fbo": "in 1F1B, one micro-batch's forward overlapped with another's backward (1; MindSpeed --moe-fb-overlap, "
           "Megatron-Core's combined 1F1B) or not (0)",
    "step s": "one training step (the model file's global batch)",
    "tok/s/dev": "tokens per second per device", "tok/s": "tokens per second of all the devices together",
    "MFU": "model FLOPs utilisation (6·active params + attention, per token, over the devices' peak)",
    "GiB/dev": "memory per device: weights, gradients, optimizer states, activations",
}
# A layout's parts: which names a user gives (``--layout``), and their value when left out.
LAYOUT_DEFAULTS = {"vpp": 1, "mb": 1, "recompute": 0, "chunks": 1, "hierarchical": 0, **OPTIONAL}
SEARCHED = (*LAYOUT, "dualpipe", "fb_overlap")  # what a search varies (token groups are a pass's choice: 1 here)
# The step's parts, in the order they are shown; they add up to the step.
PARTS = {"compute_s": "compute", "a2a_exposed_s": "expert all-to-all left exposed",
         "tp_comm_s": "tensor-parallel collectives", "pp_p2p_s": "pipeline sends",
         "bubble_s": "pipeline bubble", "dp_exposed_s": "data-parallel sync left exposed",
         "optimizer_s": "optimizer and gradient buffers"}


def parse_layout(text: str) -> dict[str, int]:
    """``"tp=8,pp=16,vpp=2,ep=32"`` → ``{"tp": 8, ...}``; the names of ``LAYOUT`` and ``OPTIONAL``."""
    known = (*LAYOUT, *OPTIONAL)
    layout = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in known or not value.strip().isdigit():
            raise PlannerError(f"--layout item {item!r}: give name=integer, names among {list(known)}")
        layout[name] = int(value)
    return layout


def score(model: MoEModel, hardware: Hardware, devices: int, given: dict[str, int]) -> dict:
    """One layout's predicted step, memory and throughput, and the parts of its step. ``dp`` defaults to the
    devices left over, ``ep`` to 1 and the rest to ``LAYOUT_DEFAULTS``; a layout the devices or the model do not
    allow says why."""
    layout = {"tp": 1, "pp": 1, "ep": 1, **LAYOUT_DEFAULTS, **given}
    tp, pp, ep = layout["tp"], layout["pp"], layout["ep"]
    if devices % (tp * pp):
        raise PlannerError(f"tp·pp = {tp * pp} does not divide the {devices} devices")
    layout.setdefault("dp", devices // (tp * pp))
    problems = [why for bad, why in (
        (tp * pp * layout["dp"] != devices, f"tp·pp·dp = {tp * pp * layout['dp']} is not the {devices} devices"),
        (tp > hardware.ranks_per_node, f"tp = {tp} spans nodes of {hardware.ranks_per_node} devices"),
        (model.heads % tp, f"tp = {tp} does not divide the {model.heads} heads"),
        ((tp * layout["dp"]) % ep or model.experts % ep, f"ep = {ep} does not divide tp·dp = {tp * layout['dp']} "
                                                         f"and the {model.experts} experts"),
        (layout["dualpipe"] and (pp % 2 or layout["vpp"] > 1), "DualPipe takes an even pp and vpp = 1"),
        (layout["dualpipe"] and layout["fb_overlap"], "DualPipe pairs its micro-batches itself: drop fb_overlap"),
        (pp * layout["vpp"] > model.layers, f"pp·vpp = {pp * layout['vpp']} is more stages than the "
                                            f"{model.layers} layers"),
        (model.global_batch % (layout["dp"] * layout["mb"]), f"dp·mb = {layout['dp'] * layout['mb']} does not "
                                                             f"divide the global batch of {model.global_batch}"),
    ) if bad]
    if problems:
        raise PlannerError(f"{model.name} on {devices} x {hardware.name} cannot run tp={tp} pp={pp} ep={ep} "
                           f"dp={layout['dp']}: " + "; ".join(problems))
    layout = {name: layout[name] for name in (*LAYOUT, *OPTIONAL)}
    predicted = {name: float(value) for name, value in StepModel(model, hardware, devices).evaluate(layout).items()}
    return {"layout": layout, **predicted, "tokens_per_s_per_device": predicted["tokens_per_s"] / devices,
            "fits": bool(fits(np.float64(predicted["memory_bytes"]), hardware))}


def format_score(model: MoEModel, hardware: Hardware, devices: int, scored: dict) -> str:
    layout = ", ".join(f"{name}={value}" for name, value in scored["layout"].items())
    memory = scored["memory_bytes"] / 2**30
    usable = hardware.usable_memory * hardware.memory_bytes / 2**30
    lines = [f"{model.name} on {devices} x {hardware.name}, {layout}",
             f"  step {scored['step_s']:.3f} s: {scored['tokens_per_s_per_device']:.4g} tokens/s per device, "
             f"{scored['tokens_per_s']:.4g} in all, MFU {scored['mfu']:.3f}",
             f"  memory {memory:.1f} GiB per device of {usable:.1f} usable: "
             + ("fits" if scored["fits"] else "does NOT fit")]
    for key, what in PARTS.items():
        lines.append(f"  {what:<34}{scored[key]:>10.3f} s {100 * scored[key] / scored['step_s']:6.1f} %")
    return "\n".join(lines)


def layouts(model: MoEModel, hardware: Hardware, devices: int) -> dict[str, np.ndarray]:
    """Every layout the model and the devices allow, as one array per ``LAYOUT`` name."""
    rows = []
    for tp in divisors(devices):
        if tp > hardware.ranks_per_node or model.heads % tp:
            continue
        for pp in divisors(devices // tp):
            if pp > model.layers:
                continue
            dp = devices // (tp * pp)
            for ep in divisors(tp * dp):  # the expert group folds over tensor and data parallel
                if model.experts % ep:
                    continue
                hierarchies = (0, 1) if ep > hardware.ranks_per_node else (0,)
                for vpp, mb, recompute, chunks, hierarchical, (dualpipe, fb_overlap) in itertools.product(
                        VIRTUAL_STAGES if pp > 1 else (1,), MICRO_BATCHES, RECOMPUTE, CHUNKS if ep > 1 else (1,),
                        hierarchies, SCHEDULES if pp % 2 == 0 else SCHEDULES[:2]):
                    if pp * vpp > model.layers or model.global_batch % (dp * mb) or (dualpipe and vpp > 1):
                        continue
                    rows.append((tp, ep, pp, vpp, dp, mb, recompute, chunks, hierarchical, dualpipe, fb_overlap))
    if not rows:
        raise PlannerError(f"no layout of {model.name} fits {devices} devices: the global batch "
                           f"({model.global_batch} sequences) must divide by the data-parallel size; choose devices "
                           f"whose data-parallel sizes divide it")
    table = np.array(rows, dtype=np.int64)
    return {name: table[:, i] for i, name in enumerate(SEARCHED)}


@dataclass
class Plan:
    model: MoEModel
    hardware: Hardware
    devices: int
    layout: dict[str, np.ndarray]
    predicted: dict[str, np.ndarray]
    seconds: float  # the search's wall time, enumeration included

    @property
    def evaluated(self) -> int:
        return len(self.layout["tp"])

    @property
    def fitting(self) -> np.ndarray:
        return fits(self.predicted["memory_bytes"], self.hardware)

    def rows(self, index) -> list[dict]:
        return [{**{name: int(self.layout[name][i]) for name in SEARCHED},
                 **{name: float(self.predicted[name][i]) for name in self.predicted}} for i in index]

    def best(self, count: int = 10) -> list[dict]:
        """The fastest layouts that fit in memory."""
        candidates = np.flatnonzero(self.fitting)
        order = candidates[np.argsort(self.predicted["step_s"][candidates], kind="stable")]
        return self.rows(order[:count])

    def pareto(self) -> list[dict]:
        """Layouts that fit and that no other layout beats on both tokens/s and memory per device."""
        candidates = np.flatnonzero(self.fitting)
        order = candidates[np.lexsort((-self.predicted["tokens_per_s"][candidates],
                                       self.predicted["memory_bytes"][candidates]))]
        front, fastest = [], -np.inf
        for i in order:  # by memory, ascending: a layout joins when it is faster than every leaner one
            if self.predicted["tokens_per_s"][i] > fastest:
                front.append(i)
                fastest = self.predicted["tokens_per_s"][i]
        return self.rows(front)

    def to_json(self, count: int = 10) -> dict:
        return {"model": self.model.name, "hardware": self.hardware.name, "devices": self.devices,
                "evaluated": self.evaluated, "fitting": int(self.fitting.sum()), "seconds": self.seconds,
                "configs_per_hour": self.evaluated / self.seconds * 3600, "best": self.best(count),
                "pareto": self.pareto()}


def search(model: MoEModel, hardware: Hardware, devices: int, step_model: StepModel | None = None,
           progress: bool = False, batch: int = 65536) -> Plan:
    """Evaluate every layout (``layouts``) in batches; ``progress`` draws a bar on stderr."""
    started = time.perf_counter()
    step_model = step_model or StepModel(model, hardware, devices)
    layout = layouts(model, hardware, devices)
    total = len(layout["tp"])
    parts = []
    for first in range(0, total, batch):
        parts.append(step_model.evaluate({name: values[first:first + batch] for name, values in layout.items()}))
        if progress:
            _bar(min(first + batch, total), total)
    predicted = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return Plan(model, hardware, devices, layout, predicted, time.perf_counter() - started)


def _bar(done: int, total: int, width: int = 40) -> None:
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} layouts")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def format_table(plan: Plan, count: int = 10) -> str:
    header = f"{'tp':>3}{'ep':>5}{'pp':>4}{'vpp':>4}{'dp':>6}{'mb':>4}{'rc':>3}{'n':>3}{'hier':>5}{'dual':>5}" \
             f"{'fbo':>4}" \
             f"{'step s':>9}{'tok/s/dev':>11}{'tok/s':>12}{'MFU':>7}{'GiB/dev':>9}"
    lines = [f"{plan.model.name} on {plan.devices} x {plan.hardware.name}: {plan.evaluated} layouts evaluated in "
             f"{plan.seconds:.2f} s ({plan.evaluated / plan.seconds * 3600:.3g} an hour), "
             f"{int(plan.fitting.sum())} fit in memory", header]
    for row in plan.best(count):
        lines.append(f"{row['tp']:>3}{row['ep']:>5}{row['pp']:>4}{row['vpp']:>4}{row['dp']:>6}{row['mb']:>4}"
                     f"{row['recompute']:>3}{row['chunks']:>3}{row['hierarchical']:>5}{row['dualpipe']:>5}"
                     f"{row['fb_overlap']:>4}"
                     f"{row['step_s']:>9.3f}"
                     f"{row['tokens_per_s'] / plan.devices:>11.4g}{row['tokens_per_s']:>12.4g}{row['mfu']:>7.3f}"
                     f"{row['memory_bytes'] / 2**30:>9.1f}")
    if not plan.fitting.any():
        lines.append("no layout fits in memory: add devices or give the model a smaller batch")
    return "\n".join(lines)


def plot_pareto(plan: Plan, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fitting = plan.fitting
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter(plan.predicted["memory_bytes"][fitting] / 2**30, plan.predicted["tokens_per_s"][fitting], s=4,
                 alpha=0.3, label="layouts that fit")
    front = plan.pareto()
    axis.plot([r["memory_bytes"] / 2**30 for r in front], [r["tokens_per_s"] for r in front], "r.-",
              label="Pareto front")
    axis.set_xlabel("memory per device (GiB)")
    axis.set_ylabel("tokens/s")
    axis.set_title(f"{plan.model.name} on {plan.devices} x {plan.hardware.name}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
