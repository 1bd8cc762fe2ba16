"""Stand-ins for torch_npu's MC2 kernels (version 2), for machines without an NPU: the recorded schemas, and an
implementation with the documented contract on gloo, so the rewrite onto them can run and be checked.

``npu_moe_distribute_dispatch_v2`` gives each rank its experts' rows grouped by local expert (``expand_x``, padded
to ``A = global_bs · min(local experts, K)`` rows) and the count per local expert; ``npu_moe_distribute_combine_v2``
takes the experts' rows back and returns each token's sum weighted by ``expert_scales``. What the pair passes
between them (``assist_info_for_combine``) is this stand-in's own packing, not the kernel's.
"""

import torch

import moe_ascend.kernels.exchange as ep
from moe_ascend.kernels.ascend import npu_moe_ops

_library = None


def register() -> None:
    """Define ``torch.ops.npu.npu_moe_distribute_{dispatch,combine}_v2`` (once per process)."""
    global _library
    if _library is not None:
        return
    _library = torch.library.Library("npu", "DEF")
    schemas = npu_moe_ops()["schemas"]
    for name, impl, fake in [("npu_moe_distribute_dispatch_v2", _dispatch, _dispatch_fake),
                             ("npu_moe_distribute_combine_v2", _combine, _combine_fake)]:
        _library.define(schemas[name])
        _library.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"npu::{name}", fake, lib=_library)


def _rows(x, expert_ids, ep_world_size, moe_expert_num, global_bs):
    local = moe_expert_num // ep_world_size
    return global_bs * min(local, expert_ids.shape[1]), local


def _dispatch_fake(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, **kwargs):
    global_bs = kwargs.get("global_bs") or x.shape[0] * ep_world_size
    rows, local = _rows(x, expert_ids, ep_world_size, moe_expert_num, global_bs)
    assist = max(expert_ids.numel(), rows * 128)
    return (x.new_empty(rows, x.shape[1]), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(assist, dtype=torch.int32), x.new_empty(local, dtype=torch.int64),
            x.new_empty(ep_world_size * local, dtype=torch.int32), x.new_empty(1, dtype=torch.int32),
            x.new_empty(rows, dtype=torch.float32))


def _dispatch(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, **kwargs):
    out = list(_dispatch_fake(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, **kwargs))
    rows, counts, plan = ep.dropless_dispatch(x, expert_ids.long(), moe_expert_num, ep_world_size, group_ep)
    expand_x = out[0].zero_()
    expand_x[: rows.shape[0]] = rows
    packed = [rows.shape[0], ep_world_size, *plan.send_splits, *plan.receive_splits, *plan.row_map.tolist(),
              *plan.by_expert.tolist()]
    out[2] = out[2].zero_()
    out[2][: len(packed)] = torch.tensor(packed, dtype=torch.int32)
    out[3] = counts.to(torch.int64)
    return tuple(out)


def _combine_fake(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep,
                  ep_world_size, ep_rank_id, moe_expert_num, **kwargs):
    return expand_x.new_empty(expert_ids.shape[0], expand_x.shape[1])


def _combine(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep, ep_world_size,
             ep_rank_id, moe_expert_num, **kwargs):
    packed = assist_info_for_combine.tolist()
    received, world = packed[0], packed[1]
    send, receive = packed[2:2 + world], packed[2 + world:2 + 2 * world]
    at = 2 + 2 * world
    pairs = expert_ids.numel()
    row_map = torch.tensor(packed[at:at + pairs])
    by_expert = torch.tensor(packed[at + pairs:at + pairs + received])
    plan = ep.DroplessPlan(row_map, by_expert, send, receive)
    return ep.dropless_combine(expand_x[:received], plan, expert_scales, group_ep).to(expand_x.dtype)
