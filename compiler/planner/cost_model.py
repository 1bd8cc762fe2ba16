"""The cost model the passes read: per-node times on a two-lane timeline, and each MoE layer priced by the
step model for the passes' ``"auto"`` choices.

Timeline: compute runs on one lane in graph order; a collective starts on the
communication lane when it is issued (and the lane is free) and the compute
lane stalls at its ``wait_tensor`` until it ends. The stalls are the exposed
communication.

``"auto"`` choices (the overlap chunk count, the hierarchical exchange): the
layer as the pass sees it (``LayerShape``: tokens, width, experts, top-k, the
expert-parallel size and the experts' FLOPs) becomes a one-layer model of
``step_model.StepModel`` on this platform's hardware profile (``cpu-calibrated``,
``h100`` or ``ascend-910b``, or ``$MOE_ASCEND_HARDWARE``: a shipped name or a
YAML path), evaluated for each choice at once; the fastest step wins.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.fx

from moe_ascend.compiler.planner.step_model import Hardware, MoEModel, StepModel
from moe_ascend.passes.analysis.ops import is_collective, is_wait, op_name
from moe_ascend.runtime.launcher import cluster_from_environment

FREE_OPS = {
    "view", "_unsafe_view", "reshape", "permute", "expand", "t", "transpose", "unsqueeze",
    "squeeze", "getitem", "alias", "slice", "select", "as_strided", "detach", "sym_size",
}


@dataclass(frozen=True)
class HardwareProfile:
    """Peak rates of one device and its links (bytes and FLOP per second, seconds)."""

    name: str
    matmul_flops: float
    memory_bandwidth: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    collective_latency: float

    @classmethod
    def from_hardware(cls, hardware: Hardware) -> "HardwareProfile":
        return cls(hardware.name, hardware.matmul_flops * hardware.matmul_efficiency, hardware.memory_bandwidth,
                   hardware.intra_node_bandwidth, hardware.inter_node_bandwidth,
                   max(hardware.intra_node_latency, hardware.inter_node_latency))


# Two-core CPU ranks joined by the emulated cluster's 1 Gbit/s inter-node link.
CPU_EMULATED = HardwareProfile("cpu-emulated", 3e10, 8e9, 2e9, 1.25e8, 1e-4)
HARDWARE_ENV = "MOE_ASCEND_HARDWARE"


def platform_hardware() -> Hardware:
    """The hardware profile of the devices this process trains on: ``$MOE_ASCEND_HARDWARE`` where set, else the
    shipped profile of an Ascend NPU or a CUDA GPU, else this CPU's with the links of the emulated cluster it runs
    in (``moe-ascend launch`` shaped them: the ``"auto"`` choices must price the link in force)."""
    import importlib.util

    if name := os.environ.get(HARDWARE_ENV):
        return Hardware.load(name)
    if importlib.util.find_spec("torch_npu") is not None:
        return Hardware.load("ascend-910b")
    if torch.cuda.is_available():
        return Hardware.load("h100")
    return with_shaped_links(Hardware.load("cpu-calibrated"), cluster_from_environment())


def with_shaped_links(hardware: Hardware, cluster: dict | None) -> Hardware:
    """``hardware`` with the link rates the launcher shaped (``cluster``: its ``MOE_ASCEND_CLUSTER``), where it
    shaped them: the node's uplink, and each rank's share of the node's loopback."""
    if not cluster or not cluster.get("shaped"):
        return hardware
    links = {"inter_node_bandwidth": cluster["bandwidth_bits_per_s"] / 8}
    if cluster.get("intra_bandwidth_bits_per_s"):
        links["intra_node_bandwidth"] = cluster["intra_bandwidth_bits_per_s"] / 8 / cluster["ranks_per_node"]
    return replace(hardware, name=f"{hardware.name} on the shaped links", **links)


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer's exchange as a pass sees it, on one rank: what the step model needs to price it."""

    tokens: int
    width: int
    element_bytes: int
    num_experts: int
    top_k: int
    ep_size: int
    expert_flops: float  # the experts' matmuls, forward
    other_flops: float = 0.0  # the layer's share of the graph's other matmuls (attention, shared experts), forward
    capacity: int = 0  # slots an expert of a capacity exchange (its static buffers); 0: dropless

    def model(self) -> MoEModel:
        """A one-layer model of this layer alone: its experts (SwiGLU of the width that gives their FLOPs), one
        sequence of its tokens, its other matmuls as attention's weights, no embeddings or output layer to speak
        of."""
        expert_ffn = max(1.0, self.expert_flops / (6 * self.width * self.tokens * self.top_k))
        return MoEModel(name="layer", layers=1, hidden=self.width, heads=1, head_dim=1, vocab=1,
                        experts=self.num_experts, top_k=self.top_k, expert_ffn=expert_ffn, sequence=self.tokens,
                        global_batch=self.ep_size, attention_params=self.other_flops / (2 * self.tokens),
                        dtype_bytes=self.element_bytes,
                        capacity_factor=self.capacity * self.num_experts / (self.tokens * self.top_k))


@dataclass
class TimelineEvent:
    node: str
    lane: str  # "compute", "comm" or "wait"
    start: float
    end: float


@dataclass
class Timeline:
    events: list[TimelineEvent] = field(default_factory=list)
    compute_s: float = 0.0
    comm_s: float = 0.0
    exposed_comm_s: float = 0.0
    step_s: float = 0.0

    def to_json(self) -> dict:
        return {
            "compute_s": self.compute_s,
            "comm_s": self.comm_s,
            "exposed_comm_s": self.exposed_comm_s,
            "step_s": self.step_s,
            "events": [asdict(e) for e in self.events],
        }


class CostModel:
    """Estimates node times on a ``HardwareProfile``; collectives use the inter-node link when the topology spans
    nodes."""

    def __init__(self, profile: HardwareProfile | None = None, topology=None, hardware: Hardware | None = None):
        self.hardware = hardware
        self.profile = profile or (HardwareProfile.from_hardware(hardware) if hardware else CPU_EMULATED)
        self.topology = topology

    @classmethod
    def for_platform(cls, topology=None) -> "CostModel":
        return cls(topology=topology, hardware=platform_hardware())

    def layer_step_seconds(self, shape: LayerShape, chunks, hierarchical, groups=1) -> np.ndarray:
        """The step model's time of ``shape``'s layer, forward and backward, for each (chunks, hierarchical,
        token groups)."""
        ranks_per_node = self.topology.ranks_per_node if self.topology is not None else 1
        hardware = replace(self.hardware or platform_hardware(), ranks_per_node=ranks_per_node)
        step_model = StepModel(shape.model(), hardware, shape.ep_size)
        ep = shape.ep_size
        return step_model.evaluate(dict(tp=1, ep=ep, pp=1, vpp=1, dp=ep, mb=1, recompute=0, chunks=chunks,
                                        hierarchical=hierarchical, groups=groups))["step_s"]

    def best_chunks(self, site, most: int, hierarchical: bool = False) -> int:
        """The overlap chunk count (1 … ``most``) with the fastest predicted step of ``site``'s layer (a
        ``passes.analysis.exchange_sites.CapacityExchange``, or a ``HierarchicalExchange`` with ``hierarchical``)."""
        chunks = np.arange(1, most + 1)
        return int(chunks[np.argmin(self.layer_step_seconds(layer_shape(site), chunks, int(hierarchical)))])

    def best_overlap(self, gm: torch.fx.GraphModule, sites, most_chunks: int, group_counts) -> tuple[int, int]:
        """(chunks, token groups) with the fastest predicted step of ``gm``, whose MoE layers exchange at
        ``sites``: chunks 1 … ``most_chunks`` of one group, or one chunk of each of ``group_counts`` groups. The
        graph's matmuls outside the experts are spread over its layers: the groups hide under them too."""
        shapes = [layer_shape(site) for site in sites]
        expert_flops = sum(shape.expert_flops for shape in shapes)
        other_flops = max(0.0, sum(_matmul_flops(node) for node in gm.graph.nodes) - expert_flops) / len(sites)
        candidates = np.array([(n, 1) for n in range(1, most_chunks + 1)] + [(1, g) for g in group_counts])
        step = sum(self.layer_step_seconds(replace(shape, other_flops=other_flops), candidates[:, 0], 0,
                                           candidates[:, 1]) for shape in shapes)
        chunks, groups = candidates[int(np.argmin(step))]
        return int(chunks), int(groups)

    def hierarchical_pays(self, site) -> bool:
        """Whether the two-step exchange makes ``site``'s layer's predicted step faster than the flat one."""
        flat, two_step = self.layer_step_seconds(layer_shape(site), 1, np.array([0, 1]))
        return bool(two_step < flat)

    def compute_seconds(self, node: torch.fx.Node) -> float:
        name = op_name(node)
        if node.op not in ("call_function", "call_method") or name in FREE_OPS:
            return 0.0
        flops = _matmul_flops(node)
        if flops:
            return flops / self.profile.matmul_flops
        return _bytes_touched(node) / self.profile.memory_bandwidth

    def collective_seconds(self, node: torch.fx.Node) -> float:
        spans_nodes = self.topology is not None and self.topology.nodes > 1
        bandwidth = self.profile.inter_node_bandwidth if spans_nodes else self.profile.intra_node_bandwidth
        factor = 2.0 if op_name(node) == "all_reduce" else 1.0  # ring all-reduce moves the data twice
        return self.profile.collective_latency + factor * _tensor_bytes(node.meta.get("val")) / bandwidth

    def timeline(self, gm: torch.fx.GraphModule) -> Timeline:
        timeline = Timeline()
        now = comm_free = 0.0
        comm_end: dict[torch.fx.Node, float] = {}
        for node in gm.graph.nodes:
            if is_collective(node):
                start = max(now, comm_free)
                comm_free = comm_end[node] = start + self.collective_seconds(node)
                timeline.comm_s += comm_free - start
                timeline.events.append(TimelineEvent(node.name, "comm", start, comm_free))
            elif is_wait(node):
                ready = comm_end.get(node.args[0], now)
                if ready > now:
                    timeline.events.append(TimelineEvent(node.name, "wait", now, ready))
                    timeline.exposed_comm_s += ready - now
                    now = ready
            else:
                seconds = self.compute_seconds(node)
                if seconds > 0:
                    timeline.events.append(TimelineEvent(node.name, "compute", now, now + seconds))
                    timeline.compute_s += seconds
                    now += seconds
        timeline.step_s = max(now, comm_free)
        return timeline


def layer_shape(site) -> LayerShape:
    """The ``LayerShape`` of a capacity exchange the passes found (``CapacityExchange``, ``HierarchicalExchange``)."""
    tokens, expert_ids = (arg.meta["val"] for arg in site.dispatch.args[:2])
    return LayerShape(tokens=int(tokens.shape[0]), width=int(tokens.shape[1]), element_bytes=tokens.element_size(),
                      num_experts=site.num_experts, top_k=int(expert_ids.shape[1]), ep_size=site.ep_size,
                      expert_flops=sum(_matmul_flops(node) for node in site.experts), capacity=site.capacity)


def _tensor_bytes(val) -> int:
    if isinstance(val, torch.Tensor):
        return _numel(val) * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(_tensor_bytes(v) for v in val)
    return 0


def _numel(t: torch.Tensor) -> int:
    try:
        return int(math.prod(int(s) for s in t.shape))
    except (TypeError, ValueError, RuntimeError):  # unbacked sizes: no estimate
        return 0


def _bytes_touched(node: torch.fx.Node) -> int:
    inputs = sum(_tensor_bytes(i.meta.get("val")) for i in node.all_input_nodes)
    return inputs + _tensor_bytes(node.meta.get("val"))


def _matmul_flops(node: torch.fx.Node) -> float:
    """2·(output elements)·(contracted size) for the matmul family, attention's two products, else 0."""
    name = op_name(node)
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0.0
    if name == "scaled_dot_product_attention":  # q·kᵀ and its softmax·v: 4·(q's elements)·(keys), half if causal
        causal = bool(node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False))
        keys = node.args[1].meta.get("val") if isinstance(node.args[1], torch.fx.Node) else None
        if not isinstance(keys, torch.Tensor):
            return 0.0
        return 4.0 * _numel(out) * int(keys.shape[-2]) / (2 if causal else 1)
    if name in ("mm", "bmm", "matmul", "addmm", "baddbmm", "grouped_mm_batched", "grouped_mm"):
        left = node.args[1] if name in ("addmm", "baddbmm") else node.args[0]
    elif name == "linear":
        left = node.args[0]
    else:
        return 0.0
    left_val = left.meta.get("val") if isinstance(left, torch.fx.Node) else None
    if not isinstance(left_val, torch.Tensor) or left_val.dim() == 0:
        return 0.0
    try:
        return 2.0 * _numel(out) * int(left_val.shape[-1])
    except (TypeError, ValueError, RuntimeError):
        return 0.0
