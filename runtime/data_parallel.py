"""Data parallelism beside expert parallelism: the weights every rank holds a copy of."""

from __future__ import annotations

import torch
import torch.distributed as dist


def average_gradients(parameters: list[torch.Tensor], group=None) -> None:
    """Each copy's gradient replaced by its mean over the ranks of ``group``: one all-reduce of one flat bucket."""
    ranks = dist.get_world_size(group)
    if ranks == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    dist.all_reduce(flat, group=group)
    flat /= ranks
    offset = 0
    for p in parameters:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
