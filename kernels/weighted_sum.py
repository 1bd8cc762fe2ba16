"""The step both combines end with: each token's outputs for its k choices, summed with its routing weights."""

from __future__ import annotations

from torch import Tensor


def weighted_sum(pairs: Tensor, weights: Tensor) -> Tensor:
    """``pairs [T, k, d]``, ``weights [T, k]`` → ``[T, d]``."""
    return (pairs * weights.unsqueeze(-1).to(pairs.dtype)).sum(dim=1)


def weighted_sum_backward(pairs: Tensor, weights: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``weighted_sum`` for the pairs ``[T, k, d]`` and the weights ``[T, k]`` (in the weights' dtype)."""
    grad_pairs = grad_out.unsqueeze(1) * weights.unsqueeze(-1).to(grad_out.dtype)
    grad_weights = (pairs * grad_out.unsqueeze(1)).sum(dim=-1)
    return grad_pairs, grad_weights.to(weights.dtype)
