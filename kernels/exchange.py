"""The flat expert-parallel exchange: each (token, expert) pair travels straight to the expert's rank.

``exchange`` is the one all-to-all every EP path uses (functional, so it
traces into graphs, and differentiable). The dropless dispatch and combine
here are ``MoELayer``'s; the hierarchical ones in ``hierarchical.py`` take the
same arguments and return the same things.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed._functional_collectives as fc
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake


def exchange(tensor: Tensor, group: str, output_splits=None, input_splits=None) -> Tensor:
    """Functional, differentiable all-to-all over ``group`` (equal splits unless given), waited for."""
    out = issue(tensor, group, output_splits, input_splits)
    return fc.wait_tensor(out) if isinstance(out, fc.AsyncCollectiveTensor) else out


def issue(tensor: Tensor, group: str, output_splits=None, input_splits=None) -> Tensor:
    """``exchange`` without the wait: in eager the result waits at its first use, so work placed between overlaps
    the transfer (a traced graph gets its wait at once, and the scheduler places it)."""
    out = fc.all_to_all_single_autograd(tensor, output_splits, input_splits, group)
    # A compiled graph counts its exchanges per call (runtime.traffic.counting); a pass's shape inference sends nothing.
    if EXCHANGE_OBSERVERS and not (torch.compiler.is_compiling() or is_fake(tensor)):
        _observe(group, tensor.numel() * tensor.element_size(), input_splits)
        if out.grad_fn is not None:  # the backward sends the gradient the other way
            back = (group, out.numel() * out.element_size(), output_splits)
            out.grad_fn.register_hook(lambda *_: _observe(*back))
    return out


# Called with (group, bytes sent, input splits or None) for every eager exchange, its backward's too: the runtime's
# traffic counter registers here (a layer above the kernels, which they do not import).
EXCHANGE_OBSERVERS: list[Callable[[str, int, Sequence[int] | None], None]] = []


def _observe(group: str, nbytes: int, input_splits) -> None:
    for observer in EXCHANGE_OBSERVERS:
        observer(group, nbytes, input_splits)


def to_experts(dispatched: Tensor, group: str, ep_size: int) -> Tensor:
    """The capacity buffer ``[E, C, d]`` (experts numbered rank-major) → this rank's experts' ``[E/W, W·C, d]``.

    Each rank's block of the buffer is contiguous, so the splits are equal; the
    experts see their slots by source rank. Any slice ``[:, a:b]`` of the buffer
    goes the same way, which is what chunking for overlap relies on.
    """
    num_experts, capacity, width = dispatched.shape
    local = num_experts // ep_size
    received = exchange(dispatched.reshape(-1, width), group)
    return received.reshape(ep_size, local, capacity, width).transpose(0, 1).reshape(local, ep_size * capacity, width)


def from_experts(expert_out: Tensor, group: str, ep_size: int) -> Tensor:
    """``to_experts`` backwards: the experts' ``[E/W, W·C, d]`` output → the source's ``[E, C, d]`` buffer."""
    local, slots, width = expert_out.shape
    capacity = slots // ep_size
    back = expert_out.reshape(local, ep_size, capacity, width).transpose(0, 1).reshape(-1, width)
    return exchange(back, group).reshape(ep_size * local, capacity, width)


class DroplessPlan(NamedTuple):
    """What the flat dropless combine needs from its dispatch."""

    row_map: Tensor  # the permutation of the source's pairs
    by_expert: Tensor  # received rows → expert order
    send_splits: list[int]
    receive_splits: list[int]


def dropless_dispatch(tokens: Tensor, expert_ids: Tensor, num_experts: int, ep_size: int, group: str
                      ) -> tuple[Tensor, Tensor, DroplessPlan]:
    """``tokens [T, d]`` → (this rank's rows grouped by local expert, tokens per local expert, plan).

    The per-expert counts are exchanged first and read on the host (``.tolist()``) as split sizes.
    """
    received, tokens_per_expert, plan = dropless_send(tokens, expert_ids, num_experts, ep_size, group)
    return received[plan.by_expert], tokens_per_expert, plan


def dropless_send(tokens: Tensor, expert_ids: Tensor, num_experts: int, ep_size: int, group: str
                  ) -> tuple[Tensor, Tensor, DroplessPlan]:
    """``dropless_dispatch`` with its rows still in flight, by (source rank, local expert): ``[plan.by_expert]``
    waits for them and groups them by expert."""
    local = num_experts // ep_size
    rows, tokens_per_expert, row_map = torch.ops.moe_ascend.permute(tokens, expert_ids, num_experts)
    counts_received = exchange(tokens_per_expert, group).reshape(ep_size, local)  # [source rank, local expert]
    send_splits = tokens_per_expert.reshape(ep_size, local).sum(dim=1).tolist()
    receive_splits = counts_received.sum(dim=1).tolist()
    received = issue(rows, group, receive_splits, send_splits)
    # the output size given: the received rows, so a compiled graph need not read the counts to size it
    local_expert = torch.repeat_interleave(torch.arange(local, device=rows.device).repeat(ep_size),
                                           counts_received.reshape(-1), output_size=received.shape[0])
    by_expert = torch.sort(local_expert, stable=True).indices
    return received, counts_received.sum(dim=0), DroplessPlan(row_map, by_expert, send_splits, receive_splits)


def dropless_combine(expert_out: Tensor, plan: DroplessPlan, weights: Tensor, group: str) -> Tensor:
    """Rows back to their source ranks, then each token's weighted sum."""
    return torch.ops.moe_ascend.unpermute(dropless_return(expert_out, plan, group), plan.row_map, weights)


def dropless_return(expert_out: Tensor, plan: DroplessPlan, group: str) -> Tensor:
    """The experts' rows on their way back to their source ranks (in flight: the first use waits)."""
    return issue(expert_out[torch.argsort(plan.by_expert)], group, plan.send_splits, plan.receive_splits)


def even_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive ranges covering ``range(size)``, their lengths differing by at most one."""
    edges = [size * j // parts for j in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))
