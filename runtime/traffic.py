"""Bytes this rank sends over the inter-node and intra-node links, counted as its exchanges run.

    from moe_ascend.runtime import traffic

    traffic.reset()
    model(x).sum().backward()
    traffic.read()  # LinkBytes(inter_node=..., intra_node=...): this step's bytes, forward and backward

Every all-to-all of the EP exchange counts what it hands to each peer, split by
whether the peer is on another node (the topology says), and not what it keeps.
Eager exchanges (``kernels.exchange``, so the dropless split sizes between graph
breaks too) count themselves; a compiled graph counts its all-to-alls' static
sizes once per call, its backward once per backward (see ``counting``). Other
collectives (gradient all-reduces of data parallelism) are not counted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from moe_ascend.runtime.topology import Topology


@dataclass
class LinkBytes:
    """Bytes sent to peers on other nodes and to peers on this node."""

    inter_node: int = 0
    intra_node: int = 0

    def __add__(self, other: "LinkBytes") -> "LinkBytes":
        return LinkBytes(self.inter_node + other.inter_node, self.intra_node + other.intra_node)

    def to_json(self) -> dict:
        return {"inter_node": self.inter_node, "intra_node": self.intra_node}


_sent = LinkBytes()


def read() -> LinkBytes:
    """What this rank has sent since the last ``reset``."""
    return LinkBytes(_sent.inter_node, _sent.intra_node)


def reset() -> None:
    _sent.inter_node = _sent.intra_node = 0


def record(sent: LinkBytes) -> None:
    _sent.inter_node += sent.inter_node
    _sent.intra_node += sent.intra_node


def all_to_all_bytes(group: str, nbytes: int, input_splits: Sequence[int] | None) -> LinkBytes:
    """What an all-to-all of an ``nbytes`` input over ``group`` sends each way (equal splits unless given)."""
    remote, me = _peers_on_other_nodes(group)
    if input_splits is None:
        shares = [nbytes // len(remote)] * len(remote)
    else:
        rows = sum(input_splits)
        shares = [nbytes * split // rows if rows else 0 for split in input_splits]
    inter = sum(share for share, far in zip(shares, remote) if far)
    intra = sum(share for peer, (share, far) in enumerate(zip(shares, remote)) if not far and peer != me)
    return LinkBytes(inter, intra)


def _peers_on_other_nodes(group: str) -> tuple[tuple[bool, ...], int]:
    """For each rank of ``group`` in order: is it on another node than this rank; and this rank's index in it.
    Not cached: group names restart when a process group is destroyed and made again."""
    ranks = dist.get_process_group_ranks(dist.distributed_c10d._resolve_process_group(group))
    topology = Topology.detect()
    node_of = lambda rank: rank // topology.ranks_per_node  # noqa: E731
    return tuple(node_of(r) != topology.node for r in ranks), ranks.index(topology.rank)


def counting(compiled: Callable, per_call: dict[str, LinkBytes]) -> Callable:
    """``compiled`` that records ``per_call["forward"]`` (or ``"inference"``) at each call and
    ``per_call["backward"]`` when the backward runs through its outputs (filled in as the graphs are lowered)."""

    @functools.wraps(compiled)
    def run(*args):
        outputs = compiled(*args)
        grad_fn = backward_of(outputs)
        if grad_fn is None:
            record(per_call.get("inference") or per_call.get("forward", LinkBytes()))
        else:
            record(per_call.get("forward", LinkBytes()))
            grad_fn.register_hook(lambda *_: record(per_call.get("backward", LinkBytes())))
        return outputs

    return run


def backward_of(outputs) -> "torch.autograd.graph.Node | None":
    """The autograd node a compiled region's outputs lead back to (None when they need no gradient)."""
    tensors = [t for t in (outputs if isinstance(outputs, (list, tuple)) else [outputs]) if isinstance(t, torch.Tensor)]
    return next((t.grad_fn for t in tensors if t.grad_fn is not None), None)
