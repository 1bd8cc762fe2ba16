"""``moe-ascend launch --scale-to TARGET``: the emulated cluster's links at a real cluster's balance.

What makes expert-parallel communication matter is how many FLOP a device computes in the time one byte
crosses a link, not either rate alone. A target's profile gives both (``step_model.Hardware``: the achieved
matmul rate, the node's uplink shared by its ranks, each device's intra-node link); this host gives its
per-rank compute rate. The links are then set so that this host keeps the target's ratios:

    host FLOP/s per rank     target FLOP/s per device
    --------------------  =  -------------------------         for the inter-node and the intra-node link
    link bytes/s per rank    target link bytes/s per device

    ascend-910b: 313 TFLOP/s x 0.65 over 25 GB/s RoCE per NPU  ~  8,100 FLOP per inter-node byte
                 ... over 196 GB/s HCCS per NPU                ~  1,040 FLOP per intra-node byte
    a ~70 GFLOP/s CPU rank then gets ~8.6 MB/s (69 Mbit/s) across nodes and ~67 MB/s inside its node

The launcher shapes each node's uplink at ranks-per-node times the inter-node rate per rank, and each node
namespace's loopback (which carries every byte between ranks of that node once) at ranks-per-node times
the intra-node rate per rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe_ascend.compiler.planner.calibrate import expert_matmul_rate
from moe_ascend.compiler.planner.step_model import Hardware

# The experts of a benchmark's MoE layer on one rank: rows per expert, experts, width, expert FFN (fp32).
PROBE = (256, 4, 512, 1024)


@dataclass(frozen=True)
class ScaledLinks:
    """The rates that give this host a target's compute-to-link balance (bytes per second, one direction)."""

    target: str
    host_flops: float  # per rank, the expert matmuls' rate measured here
    target_flops: float  # per device, what the target's matmuls reach
    inter_flop_per_byte: float  # the target's FLOP per byte crossing nodes, per device
    intra_flop_per_byte: float  # the same for a byte to a peer of the same node
    inter_node_rank_rate: float  # this host's inter-node rate per rank
    intra_node_rank_rate: float  # this host's intra-node rate per rank

    def uplink_bits(self, ranks_per_node: int) -> float:
        """Each node's uplink, in bits per second: its ranks share it, as on the target."""
        return 8 * ranks_per_node * self.inter_node_rank_rate

    def loopback_bits(self, ranks_per_node: int) -> float:
        """Each node's loopback, in bits per second: every byte between two ranks of the node crosses it once."""
        return 8 * ranks_per_node * self.intra_node_rank_rate

    def describe(self, ranks_per_node: int) -> str:
        return (f"scaled to {self.target}: {self.target_flops / 1e12:.0f} TFLOP/s a device does "
                f"{self.inter_flop_per_byte:,.0f} FLOP per inter-node byte and {self.intra_flop_per_byte:,.0f} per "
                f"intra-node byte; this host's ranks compute {self.host_flops / 1e9:.1f} GFLOP/s, so each rank gets "
                f"{self.inter_node_rank_rate / 1e6:.2f} MB/s across nodes "
                f"(uplink {self.uplink_bits(ranks_per_node) / 1e6:.1f} Mbit/s for {ranks_per_node} rank(s) a node) "
                f"and {self.intra_node_rank_rate / 1e6:.1f} MB/s inside its node "
                f"(loopback {self.loopback_bits(ranks_per_node) / 1e6:.0f} Mbit/s)")

    def to_json(self) -> dict:
        return asdict(self)


def scale_to(target: str, host_flops: float | None = None) -> ScaledLinks:
    """The link rates that give this host (``host_flops`` per rank, measured when None) ``target``'s balance
    (a shipped hardware profile's name or a YAML path)."""
    hardware = Hardware.load(target)
    host = host_flops if host_flops is not None else host_compute_rate()
    device_flops = hardware.matmul_flops * hardware.matmul_efficiency
    inter = device_flops / (hardware.inter_node_bandwidth / hardware.ranks_per_node)
    intra = device_flops / hardware.intra_node_bandwidth
    return ScaledLinks(hardware.name, host, device_flops, inter, intra, host / inter, host / intra)


def host_compute_rate(repeats: int = 5) -> float:
    """One rank's compute rate here (FLOP/s, one thread): SwiGLU experts' forward and backward at the size a
    benchmark's layer gives each expert (``PROBE``: rows per expert, experts, width, expert FFN)."""
    rows, experts, hidden, ffn = PROBE
    return expert_matmul_rate(rows, experts, hidden, ffn, repeats)
