"""Dropless permute / unpermute: every (token, choice) pair becomes one row, rows grouped by expert.

Rows keep token order inside an expert, so ``row_map[i]`` (the pair
``token·k + choice`` that row ``i`` holds) is a stable sort of the expert ids.
Shapes are static (``T·k`` rows); only how many rows each expert gets is data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ascend.kernels.indexing import check_expert_ids, expert_counts, place, stable_order
from moe_ascend.kernels.weighted_sum import weighted_sum, weighted_sum_backward


@torch.library.custom_op("moe_ascend::permute", mutates_args=())
def permute(tokens: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``tokens [T, d]`` → ``(rows [T·k, d], tokens_per_expert [E], row_map [T·k])``."""
    check_expert_ids(expert_ids, num_experts)
    return permute_rows(tokens, expert_ids, num_experts)


def permute_rows(tokens: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """What ``permute`` computes, in plain torch ops, without its host-side check of the ids."""
    k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)
    row_map = stable_order(flat_ids)
    tokens_per_expert = expert_counts(flat_ids, num_experts)
    return tokens[row_map // k], tokens_per_expert, row_map


@permute.register_fake
def _(tokens, expert_ids, num_experts):
    rows = expert_ids.numel()
    return (tokens.new_empty(rows, tokens.shape[1]), expert_ids.new_empty(num_experts), expert_ids.new_empty(rows))


def _permute_setup(ctx, inputs, output) -> None:
    tokens, expert_ids, _ = inputs
    ctx.pairs_shape = expert_ids.shape
    ctx.save_for_backward(output[2])


def _permute_backward(ctx, grad_rows: Tensor, _grad_counts, _grad_map):
    (row_map,) = ctx.saved_tensors
    return _rows_to_pairs(grad_rows, row_map).reshape(*ctx.pairs_shape, -1).sum(dim=1), None, None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


def _rows_to_pairs(rows: Tensor, row_map: Tensor) -> Tensor:
    """Undo the grouping: pair ``row_map[i]`` gets row ``i``."""
    return place(rows, row_map)


@torch.library.custom_op("moe_ascend::unpermute", mutates_args=())
def unpermute(rows: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """``rows [T·k, d]`` (in permuted order) → ``[T, d]``: each token's weighted sum over its k rows."""
    return unpermute_rows(rows, row_map, weights)


def unpermute_rows(rows: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """What ``unpermute`` computes, in plain torch ops."""
    return weighted_sum(_rows_to_pairs(rows, row_map).reshape(*weights.shape, -1), weights)


@unpermute.register_fake
def _(rows, row_map, weights):
    return rows.new_empty(weights.shape[0], rows.shape[-1])


def _unpermute_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _unpermute_backward(ctx, grad_out: Tensor):
    rows, row_map, weights = ctx.saved_tensors
    pairs = _rows_to_pairs(rows, row_map).reshape(*weights.shape, -1)
    pair_grad, grad_weights = weighted_sum_backward(pairs, weights, grad_out)
    return pair_grad.reshape(-1, grad_out.shape[-1])[row_map], None, grad_weights


unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)
