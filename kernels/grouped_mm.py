"""Grouped expert matmuls for both layouts.

- ``grouped_mm_batched``: capacity layout, ``x [E, C, d] @ w [E, d, f]`` (a batched matmul);
- ``grouped_mm_filled``: the same layout where only each expert's first
  ``filled[e]`` slots hold tokens (``capacity_dispatch`` fills slots in order;
  after an all-to-all, the first ones of each source rank's block): the empty
  slots are neither read nor computed, their output rows are zero;
- ``grouped_mm``: dropless layout, ``x [N, d]`` whose first ``tokens_per_expert[0]``
  rows belong to expert 0, the next to expert 1, and so on.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("moe_ascend::grouped_mm_batched", mutates_args=())
def grouped_mm_batched(x: Tensor, w: Tensor) -> Tensor:
    """``x [E, C, d]``, ``w [E, d, f]`` → ``[E, C, f]``."""
    return torch.bmm(x, w)


@grouped_mm_batched.register_fake
def _(x, w):
    torch._check(x.shape[0] == w.shape[0] and x.shape[2] == w.shape[1],
                 lambda: f"cannot multiply {tuple(x.shape)} by {tuple(w.shape)}")
    return x.new_empty(x.shape[0], x.shape[1], w.shape[2])


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _batched_backward(ctx, grad: Tensor):
    x, w = ctx.saved_tensors
    return torch.bmm(grad, w.transpose(1, 2)), torch.bmm(x.transpose(1, 2), grad)


grouped_mm_batched.register_autograd(_batched_backward, setup_context=_save_inputs)


@torch.library.custom_op("moe_ascend::grouped_mm_filled", mutates_args=())
def grouped_mm_filled(x: Tensor, w: Tensor, filled: Tensor) -> Tensor:
    """``x [E, B·C, d]``, ``w [E, d, f]``, ``filled [E, B]`` → ``[E, B·C, f]``.

    Expert ``e``'s slots come in ``B`` blocks of ``C`` (one block per source rank
    after an all-to-all, ``B = 1`` on one rank), and block ``b`` holds tokens in
    its first ``filled[e, b]`` slots only: those rows are ``x @ w[e]``, the rest zero.
    """
    out = x.new_empty(x.shape[0], x.shape[1], w.shape[2])
    for expert, used, empty in _filled_rows(filled, x.shape[1]):
        if used.stop > used.start:
            torch.mm(x[expert, used], w[expert], out=out[expert, used])
        out[expert, empty].zero_()
    return out


@grouped_mm_filled.register_fake
def _(x, w, filled):
    torch._check(x.shape[0] == w.shape[0] and x.shape[2] == w.shape[1],
                 lambda: f"cannot multiply {tuple(x.shape)} by {tuple(w.shape)}")
    torch._check(filled.dim() == 2 and filled.shape[0] == x.shape[0] and x.shape[1] % filled.shape[1] == 0,
                 lambda: f"filled must be [E, B] with B dividing the {x.shape[1]} slots of each expert, "
                         f"got {tuple(filled.shape)}")
    return x.new_empty(x.shape[0], x.shape[1], w.shape[2])


def _filled_rows(filled: Tensor, slots: int) -> list[tuple[int, slice, slice]]:
    """``(expert, used rows, empty rows)`` of every block."""
    block = slots // filled.shape[1]
    return [(e, slice(b * block, b * block + used), slice(b * block + used, (b + 1) * block))
            for e, blocks in enumerate(filled.tolist()) for b, used in enumerate(blocks)]  # one host read


@torch.library.custom_op("moe_ascend::grouped_mm_filled_weight_grad", mutates_args=())
def grouped_mm_filled_weight_grad(x: Tensor, grad: Tensor, filled: Tensor) -> Tensor:
    """``[E, d, f]``: ``Σ_b x[e, used rows of b]ᵀ · grad[e, same rows]`` (zero for an expert with no token)."""
    grad_w = x.new_zeros(x.shape[0], x.shape[2], grad.shape[2])
    for expert, used, _ in _filled_rows(filled, x.shape[1]):
        grad_w[expert].addmm_(x[expert, used].t(), grad[expert, used])
    return grad_w


@grouped_mm_filled_weight_grad.register_fake
def _(x, grad, filled):
    return x.new_empty(x.shape[0], x.shape[2], grad.shape[2])


def _filled_backward(ctx, grad: Tensor):
    x, w, filled = ctx.saved_tensors
    grad_x = grouped_mm_filled(grad, w.transpose(1, 2), filled)  # a transposed view: the matmul reads it as is
    return grad_x, grouped_mm_filled_weight_grad(x, grad, filled), None


grouped_mm_filled.register_autograd(_filled_backward, setup_context=_save_inputs)


@torch.library.custom_op("moe_ascend::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """``x [N, d]`` grouped by expert, ``w [E, d, f]`` → ``[N, f]``; rows past ``Σ tokens_per_expert`` are zero."""
    out = x.new_zeros(x.shape[0], w.shape[2])
    for expert, rows in _expert_rows(tokens_per_expert):
        out[rows] = x[rows] @ w[expert]
    return out


@grouped_mm.register_fake
def _(x, w, tokens_per_expert):
    torch._check(x.shape[1] == w.shape[1], lambda: f"cannot multiply rows of width {x.shape[1]} by {tuple(w.shape)}")
    torch._check(tokens_per_expert.shape[0] == w.shape[0], lambda: "one count per expert")
    return x.new_empty(x.shape[0], w.shape[2])


def _expert_rows(tokens_per_expert: Tensor) -> list[tuple[int, slice]]:
    """``(expert, its rows)`` for every expert that has rows."""
    ends = torch.cumsum(tokens_per_expert, 0).tolist()  # one host read: the reference loops over experts
    return [(e, slice(start, end)) for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)) if end > start]


@torch.library.custom_op("moe_ascend::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: Tensor, grad: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """``[E, d, f]``: expert ``e``'s weight gradient, ``x_eᵀ · grad_e`` over its rows (zero for an idle expert)."""
    grad_w = x.new_zeros(tokens_per_expert.shape[0], x.shape[1], grad.shape[1])
    for expert, rows in _expert_rows(tokens_per_expert):
        grad_w[expert] = x[rows].t() @ grad[rows]
    return grad_w


@grouped_mm_weight_grad.register_fake
def _(x, grad, tokens_per_expert):
    return x.new_empty(tokens_per_expert.shape[0], x.shape[1], grad.shape[1])


def _grouped_backward(ctx, grad: Tensor):
    # Both halves are ops themselves: the backward graph never loops over data-dependent sizes.
    x, w, tokens_per_expert = ctx.saved_tensors
    grad_x = grouped_mm(grad, w.transpose(1, 2).contiguous(), tokens_per_expert)
    return grad_x, grouped_mm_weight_grad(x, grad, tokens_per_expert), None


grouped_mm.register_autograd(_grouped_backward, setup_context=_save_inputs)
