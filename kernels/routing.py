"""``moe_ascend::topk_softmax``: softmax over expert logits, the top k, optionally renormalised.

Ties go to the lower expert id (a stable descending sort), so every device
and the naive per-token loop choose the same experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ascend.kernels.indexing import stable_order


@torch.library.custom_op("moe_ascend::topk_softmax", mutates_args=())
def topk_softmax(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """``logits [T, E]`` → ``(weights [T, k], expert_ids [T, k])``, weights in ``logits.dtype``."""
    return top_k_of_softmax(logits, k, renormalize)


def top_k_of_softmax(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """What ``topk_softmax`` computes, in plain torch ops (the reference, and its form on Ascend's graph engine)."""
    _check_logits(logits, k)
    probs = _probs(logits)
    weights, expert_ids = _top_k(probs, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), expert_ids


@topk_softmax.register_fake
def _(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    _check_logits(logits, k)
    shape = (logits.shape[0], k)
    return logits.new_empty(shape), logits.new_empty(shape, dtype=torch.long)


def _probs(logits: Tensor) -> Tensor:
    """Softmax in at least fp32: bf16/fp16 logits would otherwise tie and flip choices."""
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def _top_k(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    order = stable_order(probs, descending=True)[:, :k].contiguous()
    return probs.gather(-1, order), order


def load_balancing_loss(logits: Tensor, expert_ids: Tensor) -> Tensor:
    """Switch Transformer's balance loss ``E · Σ_i f_i · P_i``: ``f_i`` the share of (token, choice) pairs routed to
    expert i (no gradient), ``P_i`` the mean router probability of i. It is 1 when routing is uniform, E when one
    expert takes everything; its gradient moves probability away from the experts that take more than their share."""
    num_experts = logits.shape[-1]
    pairs = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    pairs = pairs.index_add(0, expert_ids.flatten(), torch.ones(expert_ids.numel(), device=logits.device))
    return num_experts * (pairs / expert_ids.numel() * _probs(logits).mean(dim=0)).sum()


def _check_logits(logits: Tensor, k: int) -> None:
    torch._check(logits.dim() == 2, lambda: f"topk_softmax takes logits [tokens, experts], got {logits.dim()} dims")
    torch._check(1 <= k <= logits.shape[1], lambda: f"top-k needs 1 <= k <= experts ({logits.shape[1]}), got k={k}")


def _setup(ctx, inputs, output) -> None:
    logits, k, renormalize = inputs
    _, expert_ids = output
    ctx.renormalize = renormalize
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(_probs(logits), expert_ids)


def _backward(ctx, grad_weights: Tensor, _grad_ids: Tensor):
    probs, expert_ids = ctx.saved_tensors
    grad = grad_weights.to(probs.dtype)
    chosen = probs.gather(-1, expert_ids)
    if ctx.renormalize:  # w_i = p_i / S  ⇒  ∂L/∂p_i = (g_i − Σ_j g_j w_j) / S
        total = chosen.sum(dim=-1, keepdim=True)
        grad = (grad - (grad * chosen / total).sum(dim=-1, keepdim=True)) / total
    grad_probs = torch.zeros_like(probs).scatter_add(-1, expert_ids, grad)
    grad_logits = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
    return grad_logits.to(ctx.logits_dtype), None, None


topk_softmax.register_autograd(_backward, setup_context=_setup)
