"""A first cost model: per-node time from a hardware profile, and a two-lane timeline.

Compute runs on one lane in graph order; a collective starts on the
communication lane when it is issued (and the lane is free) and the compute
lane stalls at its ``wait_tensor`` until it ends. The stalls are the exposed
communication. The planner issue replaces the per-op formulas with a
calibrated model; the timeline logic stays.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.fx

from moe_ascend.passes.analysis.ops import is_collective, is_wait, op_name

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
    op_overhead: float = 1e-5  # launching one op: what every extra chunk pays per op


# Two-core CPU ranks joined by the emulated cluster's 1 Gbit/s inter-node link.
CPU_EMULATED = HardwareProfile("cpu-emulated", 3e10, 8e9, 2e9, 1.25e8, 1e-4)


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
    """Estimates node times on a ``HardwareProfile``; collectives use the inter-node link when the topology spans nodes."""

    def __init__(self, profile: HardwareProfile = CPU_EMULATED, topology=None):
        self.profile = profile
        self.topology = topology

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

    def exchange_seconds(self, inter_node_bytes: float, intra_node_bytes: float, collectives: int) -> float:
        """One rank's all-to-all traffic, in bytes it sends off its node and inside it.

        The ranks of a node share its uplink, so the inter-node bytes of all of them queue on it.
        """
        ranks_per_node = self.topology.ranks_per_node if self.topology is not None else 1
        return (collectives * self.profile.collective_latency
                + inter_node_bytes * ranks_per_node / self.profile.inter_node_bandwidth
                + intra_node_bytes / self.profile.intra_node_bandwidth)

    def flat_exchange_seconds(self, buffer_bytes: float, ep_size: int, collectives: int = 2) -> float:
        """A flat capacity exchange of one ``[E, C, d]`` buffer there and back over ``ep_size`` ranks.

        Each rank keeps ``1/W`` of the buffer; of the rest, the share for other nodes crosses the inter-node link.
        """
        nodes = self.topology.nodes if self.topology is not None and ep_size == self.topology.world_size else 1
        inter = 2 * buffer_bytes * (nodes - 1) / nodes
        intra = 2 * buffer_bytes * (ep_size // nodes - 1) / ep_size
        return self.exchange_seconds(inter, intra, collectives)

    def overlap_chunks(self, comm_s: float, compute_s: float, ops_per_chunk: int, most: int) -> int:
        """The chunk count with the shortest predicted pipeline of dispatch → experts → combine.

        With ``n`` chunks each all-to-all moves ``1/(2n)`` of the traffic (plus its latency) and each chunk's
        experts take ``1/n`` of the compute (plus their ops' launch overhead); the first dispatch and the last
        combine cannot hide, and the link carries both directions: ``2a + max(2(n-1)a, n·b)``.
        """
        def predicted(n: int) -> float:
            a = comm_s / (2 * n) + self.profile.collective_latency
            b = compute_s / n + ops_per_chunk * self.profile.op_overhead
            return 2 * a + max(2 * (n - 1) * a, n * b)

        return min(range(1, most + 1), key=predicted)

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
    """2·(output elements)·(contracted size) for the matmul family, else 0."""
    name = op_name(node)
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0.0
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
