"""Bytes this rank sends over the inter-node and intra-node links, counted as its exchanges run.

    from moe_ascend.runtime import traffic

    traffic.reset()
    model(x).sum().backward()
    traffic.read()  # LinkBytes(inter_node=..., intra_node=...): this step's bytes, forward and backward

Every all-to-all of the EP exchange counts what it hands to each peer, split by
whether the peer is on another node (the topology says), and not what it keeps.
Eager exchanges (``kernels.exchange``, so the dropless split sizes between graph
breaks too) are counted through the kernels' ``EXCHANGE_OBSERVERS`` hook, which
importing ``moe_ascend.runtime`` installs; a compiled graph counts its
all-to-alls' static sizes once per call, its backward once per backward (see
``counting``). Other
collectives (gradient all-reduces of data parallelism) are not counted.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from moe_ascend.kernels import exchange
from moe_ascend.runtime.topology import LinkBytes, all_to_all_bytes

__all__ = ["LinkBytes", "all_to_all_bytes", "backward_of", "counting", "read", "record", "reset"]


_sent = LinkBytes()


def read() -> LinkBytes:
    """What this rank has sent since the last ``reset``."""
    return LinkBytes(_sent.inter_node, _sent.intra_node)


def reset() -> None:
    _sent.inter_node = _sent.intra_node = 0


def record(sent: LinkBytes) -> None:
    _sent.inter_node += sent.inter_node
    _sent.intra_node += sent.intra_node


def _record_exchange(group: str, nbytes: int, input_splits: Sequence[int] | None) -> None:
    record(all_to_all_bytes(group, nbytes, input_splits))


exchange.EXCHANGE_OBSERVERS.append(_record_exchange)


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
