"""Index work the MoE ops share, in ops every backend lowers (Ascend's GE among them: it has no stable sort,
``index_copy``, ``index_put`` or ``bincount``, but ``sort``, ``searchsorted``, ``scatter`` and ``scatter_add``)."""

from __future__ import annotations

import torch
from torch import Tensor


def stable_order(values: Tensor, descending: bool = False) -> Tensor:
    """The indices a stable sort of ``values`` along its last dim gives (equal values keep their order), from
    unstable sorts: each value's rank is where its first equal stands in sorted order, and ``rank·n + position``
    is a key no two entries share."""
    keyed = -values if descending else values
    n = values.shape[-1]
    rank = torch.searchsorted(torch.sort(keyed, dim=-1).values, keyed.contiguous())
    return torch.sort(rank * n + torch.arange(n, device=values.device), dim=-1).indices


def expert_counts(expert_ids: Tensor, num_experts: int) -> Tensor:
    """``[E]``: how many entries of ``expert_ids`` name each expert (``bincount`` with a static size)."""
    ids = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=ids.dtype, device=ids.device).scatter_add(0, ids, torch.ones_like(ids))


def place(values: Tensor, positions: Tensor, size: int | None = None) -> Tensor:
    """``out[positions[i]] = values[i]`` along dim 0, ``size`` rows (default: as many as ``values``)."""
    rows = values.shape[0] if size is None else size
    index = positions.reshape(-1, *([1] * (values.dim() - 1))).expand_as(values)
    return values.new_zeros(rows, *values.shape[1:]).scatter(0, index, values)


def check_expert_ids(expert_ids: Tensor, num_experts: int) -> None:
    """Every id in ``[0, num_experts)``: an eager check (it reads the ids on the host), so traced forms leave it out."""
    if expert_ids.numel():
        torch._check(int(expert_ids.min()) >= 0 and int(expert_ids.max()) < num_experts,
                     lambda: f"expert ids must lie in [0, {num_experts})")
