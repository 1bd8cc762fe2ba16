"""The flat expert-parallel exchange: each (token, expert) pair travels straight to the expert's rank.

``exchange`` is the one all-to-all every EP path uses (functional, so it
traces into graphs, and differentiable). The dropless dispatch and combine
here are ``MoELayer``'s; the hierarchical ones in ``hierarchical.py`` take the
same arguments and return the same things.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed._functional_collectives as fc
from torch import Tensor


def exchange(tensor: Tensor, group: str, output_splits=None, input_splits=None) -> Tensor:
    """Functional, differentiable all-to-all over ``group`` (equal splits unless given), waited for."""
    out = issue(tensor, group, output_splits, input_splits)
    return fc.wait_tensor(out) if isinstance(out, fc.AsyncCollectiveTensor) else out


def issue(tensor: Tensor, group: str, output_splits=None, input_splits=None) -> Tensor:
    """``exchange`` without the wait: in eager the result waits at its first use, so work placed between overlaps
    the transfer (a traced graph gets its wait at once, and the scheduler places it)."""
    out = fc.all_to_all_single_autograd(tensor, output_splits, input_splits, group)
    if not torch.compiler.is_compiling():  # a compiled graph counts its exchanges per call (runtime.traffic.counting)
        from moe_ascend.runtime import traffic  # the runtime imports the kernels

        traffic.record(traffic.all_to_all_bytes(group, tensor.numel() * tensor.element_size(), input_splits))
        if out.grad_fn is not None:  # the backward sends the gradient the other way
            back = traffic.all_to_all_bytes(group, out.numel() * out.element_size(), output_splits)
            out.grad_fn.register_hook(lambda *_: traffic.record(back))
    return out


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
    local = num_experts // ep_size
    rows, tokens_per_expert, row_map = torch.ops.moe_ascend.permute(tokens, expert_ids, num_experts)
    counts_received = exchange(tokens_per_expert, group).reshape(ep_size, local)  # [source rank, local expert]
    send_splits = tokens_per_expert.reshape(ep_size, local).sum(dim=1).tolist()
    receive_splits = counts_received.sum(dim=1).tolist()
    received = exchange(rows, group, receive_splits, send_splits)  # rows by (source rank, local expert)
    local_expert = torch.repeat_interleave(torch.arange(local, device=rows.device).repeat(ep_size), counts_received.reshape(-1))
    by_expert = torch.sort(local_expert, stable=True).indices
    return received[by_expert], counts_received.sum(dim=0), DroplessPlan(row_map, by_expert, send_splits, receive_splits)


def dropless_combine(expert_out: Tensor, plan: DroplessPlan, weights: Tensor, group: str) -> Tensor:
    """Rows back to their source ranks, then each token's weighted sum."""
    back = expert_out[torch.argsort(plan.by_expert)]
    returned = exchange(back, group, plan.send_splits, plan.receive_splits)
    return torch.ops.moe_ascend.unpermute(returned, plan.row_map, weights)
