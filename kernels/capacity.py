"""Capacity dispatch and combine: tokens to a static ``[E, C, d]`` buffer and back.

A (token, choice) pair gets a *slot* ``e·C + c`` in its expert's buffer, or
``-1`` when the expert is full. Who keeps a slot:

- ``"position"``: first choices before second choices, then token order
  (GShard): rank by ``(choice, token)``;
- ``"score"``: the pairs with the highest routing score (ties by position).

Slots are given in that rank order, so the buffer layout is deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ascend.kernels.indexing import check_expert_ids, expert_counts, place, stable_order
from moe_ascend.kernels.weighted_sum import weighted_sum, weighted_sum_backward

DROP_POLICIES = ("position", "score")


def assign_slots(expert_ids: Tensor, scores: Tensor, num_experts: int, capacity: int, drop_policy: str) -> Tensor:
    """``slots [T, k]``: each pair's slot ``e·C + rank`` in its expert's buffer, ``-1`` when dropped."""
    tokens, k = expert_ids.shape
    pair_expert = expert_ids.t().reshape(-1)  # pair p = choice·T + token: choice-major priority
    pairs = pair_expert.numel()
    if drop_policy == "position":
        order = stable_order(pair_expert)
    else:
        by_score = stable_order(scores.t().reshape(-1).float(), descending=True)
        order = by_score[stable_order(pair_expert[by_score])]
    counts = expert_counts(pair_expert, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = place(torch.arange(pairs, device=expert_ids.device) - starts[pair_expert[order]], order)
    slot = torch.where(rank < capacity, pair_expert * capacity + rank, torch.full_like(rank, -1))
    return slot.reshape(k, tokens).t().contiguous()


@torch.library.custom_op("moe_ascend::capacity_slots", mutates_args=())
def capacity_slots(expert_ids: Tensor, scores: Tensor, num_experts: int, capacity: int, drop_policy: str) -> Tensor:
    """The slot map ``capacity_dispatch`` uses, without the buffer: ``[T, k]``, ``e·C + c`` or ``-1``."""
    _check(expert_ids, num_experts, capacity, drop_policy)
    return assign_slots(expert_ids, scores, num_experts, capacity, drop_policy)


@capacity_slots.register_fake
def _(expert_ids, scores, num_experts, capacity, drop_policy):
    _check(expert_ids, num_experts, capacity, drop_policy)
    return expert_ids.new_empty(expert_ids.shape)


def _check(expert_ids: Tensor, num_experts: int, capacity: int, drop_policy: str) -> None:
    torch._check(drop_policy in DROP_POLICIES,
                 lambda: f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    torch._check(capacity >= 1, lambda: f"capacity must be >= 1, got {capacity}")
    torch._check(num_experts >= 1, lambda: f"num_experts must be >= 1, got {num_experts}")
    torch._check(expert_ids.dim() == 2, lambda: "expert_ids must be [tokens, k]")


@torch.library.custom_op("moe_ascend::capacity_dispatch", mutates_args=())
def capacity_dispatch(
    tokens: Tensor, expert_ids: Tensor, scores: Tensor, num_experts: int, capacity: int, drop_policy: str
) -> tuple[Tensor, Tensor]:
    """``tokens [T, d]`` → ``(dispatched [E, C, d], slots [T, k])``; empty slots are zero."""
    check_expert_ids(expert_ids, num_experts)
    return dispatch_to_slots(tokens, expert_ids, scores, num_experts, capacity, drop_policy)


def dispatch_to_slots(
    tokens: Tensor, expert_ids: Tensor, scores: Tensor, num_experts: int, capacity: int, drop_policy: str
) -> tuple[Tensor, Tensor]:
    """What ``capacity_dispatch`` computes, in plain torch ops, without its host-side check of the ids."""
    _check(expert_ids, num_experts, capacity, drop_policy)
    slots = assign_slots(expert_ids, scores, num_experts, capacity, drop_policy)
    return scatter_to_slots(tokens, slots, num_experts, capacity), slots


@capacity_dispatch.register_fake
def _(tokens, expert_ids, scores, num_experts, capacity, drop_policy):
    _check(expert_ids, num_experts, capacity, drop_policy)
    return tokens.new_empty(num_experts, capacity, tokens.shape[1]), expert_ids.new_empty(expert_ids.shape)


def scatter_to_slots(tokens: Tensor, slots: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Buffer row ``slots[t, j]`` gets ``tokens[t]``; dropped pairs land in a spare row that is cut off."""
    total = num_experts * capacity
    rows = torch.where(slots >= 0, slots, total).reshape(-1)
    source = tokens.unsqueeze(1).expand(-1, slots.shape[1], -1).reshape(-1, tokens.shape[1])
    return scatter_rows(source, rows, total).reshape(num_experts, capacity, tokens.shape[1])


def scatter_rows(source: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """``[num_rows, d]``: row ``rows[i]`` gets ``source[i]``; the spare row ``num_rows`` takes what is not sent."""
    return place(source, rows, num_rows + 1)[:num_rows]


def filled_slots(expert_ids: Tensor, num_experts: int, capacity: int) -> Tensor:
    """``[E, 1]``: how many of each expert's ``capacity`` slots the dispatch fills (its first ones, by
    ``assign_slots``)."""
    return expert_counts(expert_ids, num_experts).clamp(max=capacity).unsqueeze(1)


def gather_from_slots(buffer: Tensor, slots: Tensor) -> Tensor:
    """``[T, k, d]``: each pair's buffer row, zeros for dropped pairs."""
    rows = buffer.reshape(-1, buffer.shape[-1])[slots.clamp(min=0)]
    return rows * (slots >= 0).unsqueeze(-1).to(rows.dtype)


def _dispatch_setup(ctx, inputs, output) -> None:
    _, slots = output
    ctx.save_for_backward(slots)


def _dispatch_backward(ctx, grad_dispatched: Tensor, _grad_slots: Tensor):
    (slots,) = ctx.saved_tensors
    return gather_from_slots(grad_dispatched, slots).sum(dim=1), None, None, None, None, None


capacity_dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("moe_ascend::capacity_combine", mutates_args=())
def capacity_combine(expert_out: Tensor, slots: Tensor, weights: Tensor) -> Tensor:
    """``expert_out [E, C, d]`` → ``[T, d]``: each token's weighted sum over its kept pairs."""
    return combine_from_slots(expert_out, slots, weights)


def combine_from_slots(expert_out: Tensor, slots: Tensor, weights: Tensor) -> Tensor:
    """What ``capacity_combine`` computes, in plain torch ops."""
    return weighted_sum(gather_from_slots(expert_out, slots), weights)


@capacity_combine.register_fake
def _(expert_out, slots, weights):
    return expert_out.new_empty(slots.shape[0], expert_out.shape[-1])


def _combine_setup(ctx, inputs, output) -> None:
    expert_out, slots, weights = inputs
    ctx.buffer_shape = expert_out.shape
    ctx.save_for_backward(expert_out, slots, weights)


def _combine_backward(ctx, grad_out: Tensor):
    expert_out, slots, weights = ctx.saved_tensors
    pair_grad, grad_weights = weighted_sum_backward(gather_from_slots(expert_out, slots), weights, grad_out)
    total = ctx.buffer_shape[0] * ctx.buffer_shape[1]
    rows = torch.where(slots >= 0, slots, total).reshape(-1)
    grad_buffer = grad_out.new_zeros(total + 1, grad_out.shape[-1]).index_add_(
        0, rows, pair_grad.reshape(-1, grad_out.shape[-1]))
    return grad_buffer[:total].reshape(ctx.buffer_shape), None, grad_weights


capacity_combine.register_autograd(_combine_backward, setup_context=_combine_setup)
