"""mc2_dispatch (pre_grad, target ascend, inference): a flat capacity exchange onto torch_npu's MC2 kernels.

``npu_moe_distribute_dispatch`` and ``npu_moe_distribute_combine`` fuse an
expert-parallel layer's routing with its all-to-all on Ascend (the
communication runs inside the kernels, "MC2"). They exist for inference only
(no backward) and are dropless, and each SoC bounds their shapes
(``kernels/data/npu_moe_ops.yaml``). A capacity layer maps onto them exactly
when its buffer can hold every token a rank sends an expert (``C >= T``: no
pair is ever dropped, so capacity and dropless routing agree) and its shapes
are within the bounds: tokens in bf16/fp16, hidden size, tokens per rank,
top-k, EP size and experts per rank.

For each recognised flat capacity exchange the pass decides: an ``Mc2Mapping``
(which torch_npu op, with which arguments, checked against the recorded
schema) or the one reason it does not map. Decisions go to
``ctx.analyses["mc2"]`` and one line each to the log. Where torch_npu's ops
exist (on an NPU; a dry run without them only decides), the layer is
rewritten: the dispatch kernel replaces the capacity dispatch and its
all-to-all, the experts run on its rows grouped by local expert (each expert
matmul becomes ``grouped_mm`` with the kernel's per-expert counts), and the
combine kernel returns each token's weighted sum.

It runs in pre_grad, not post_grad: the ascend lowering decomposes the
capacity ops while AOTAutograd traces, so post_grad graphs no longer hold them.

Before (EP over 16 ranks, 32 experts, C = T = 64)::

    capacity_dispatch = torch.ops.moe_ascend.capacity_dispatch.default(tokens, expert_ids, weights, 32, 64, 'position')
    ... all_to_all_single ... experts ... all_to_all_single ...
    out = torch.ops.moe_ascend.capacity_combine.default(returned, slots, weights)

Decision (Ascend910B)::

    npu_moe_distribute_dispatch(x=tokens, expert_ids=expert_ids:int32, group_ep='hccl:0', ep_world_size=16,
                                ep_rank_id=0, moe_expert_num=32, expert_scales=weights:float32, global_bs=1024, ...)
    npu_moe_distribute_combine(expand_x=expert_out, expert_ids=expert_ids:int32, expand_idx=dispatch.expand_idx, ...)

After (where the ops exist)::

    to = expert_ids.to(torch.int32);  to_1 = weights.to(torch.float32)
    dispatch = torch.ops.npu.npu_moe_distribute_dispatch.default(x = tokens, expert_ids = to, group_ep = ..., ...)
    expand_x = dispatch[0];  expand_idx = dispatch[2];  expert_token_nums = dispatch[3];  ...
    grouped_mm = torch.ops.moe_ascend.grouped_mm.default(expand_x, w_gate_up, expert_token_nums)
    ...
    combined = torch.ops.npu.npu_moe_distribute_combine.default(expand_x = grouped_mm_1, expert_ids = to, ...)
    out = combined.to(torch.bfloat16)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx

from moe_ascend.kernels import ascend
from moe_ascend.kernels.ascend import TensorArg
from moe_ascend.passes.analysis.exchange_sites import CapacityExchange, capacity_exchange
from moe_ascend.passes.analysis.ops import cut_dim, is_row_wise, op_name
from moe_ascend.passes.infra import PassContext, PassResult, erase_unused, join_layer, register_pass

DRY_RUN_SOC = "Ascend910B"  # the SoC a dry run decides for unless ascend_options["soc"] names one


@dataclass(frozen=True)
class Mc2Call:
    op: str  # the torch_npu op, in torch.ops.npu
    args: dict  # by name: constants, and TensorArg for the graph's tensors


@dataclass(frozen=True)
class Mc2Mapping:
    layer: int
    soc: str
    dispatch: Mc2Call
    combine: Mc2Call


@register_pass(name="mc2_dispatch", stage="pre_grad", after=("find_moe", "hierarchical_a2a"),
               before=("chunk_for_overlap",), roles=("dynamo",), enabled=lambda options: options.target == "ascend")
def mc2_dispatch(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    soc = ctx.options.ascend_option("soc")
    decisions, modified = [], False
    for layer in ctx.analyses.get("moe_layers", []):
        site = capacity_exchange(layer)
        if isinstance(site, str):
            continue  # no flat capacity exchange: nothing MC2 could take (one rank, dropless, two-step)
        if soc == "auto":
            soc = DRY_RUN_SOC if ctx.options.ascend_option("dry_run") else _npu_soc()
        decision = mc2_mapping(site, layer.index, soc, training=ctx.training, rank=dist.get_rank())
        decisions.append(decision)
        if isinstance(decision, str):
            ctx.logger.info("%s: MoE layer %d keeps its all-to-all (no MC2 on %s): %s", ctx.graph_name,
                            layer.index, soc, decision)
            continue
        here = _npu_op(decision.dispatch.op) is not None
        ctx.logger.info("%s: MoE layer %d %s %s / %s", ctx.graph_name, layer.index,
                        "maps onto" if here else "fits (no torch_npu here to map onto)", decision.dispatch.op,
                        decision.combine.op)
        if here:
            _rewrite(gm.graph, site, decision, layer, ctx)
            modified = True
    ctx.analyses["mc2"] = decisions
    return PassResult(gm, modified)


def mc2_mapping(site: CapacityExchange, layer: int, soc: str, training: bool, rank: int) -> Mc2Mapping | str:
    """The MC2 calls that compute ``site``'s exchange, or why there are none."""
    limits = ascend.npu_moe_ops()["mc2"].get(soc)
    if limits is None:
        return f"no MC2 limits are recorded for SoC {soc!r} (known: {sorted(ascend.npu_moe_ops()['mc2'])})"
    if training:
        return "the MC2 kernels have no backward (inference only); a training graph keeps its all-to-all"
    tokens, expert_ids = site.dispatch.args[0], site.dispatch.args[1]
    batch, hidden = tokens.meta["val"].shape
    top_k = expert_ids.meta["val"].shape[1]
    dtype = str(tokens.meta["val"].dtype).removeprefix("torch.")
    world, experts = site.ep_size, site.num_experts
    low, high = limits["ep_world_size"][0], limits["ep_world_size"][-1]
    world_ok = world in limits["ep_world_size"] if len(limits["ep_world_size"]) > 2 else low <= world <= high
    checks = [
        (site.capacity >= batch, f"its capacity C = {site.capacity} < T = {batch} tokens may drop pairs; MC2 is "
                                 "dropless, so the two agree only when C >= T"),
        (dtype in limits["dtypes"], f"its tokens are {dtype}; MC2 takes {limits['dtypes']}"),
        (limits["hidden"][0] <= hidden <= limits["hidden"][1] and hidden % limits["hidden_multiple"] == 0,
         f"hidden size {hidden} is outside {limits['hidden']} (a multiple of {limits['hidden_multiple']})"),
        (batch <= limits["batch_max"], f"{batch} tokens per rank exceed {limits['batch_max']}"),
        (top_k <= limits["top_k_max"], f"top-{top_k} exceeds top-{limits['top_k_max']}"),
        (world_ok, f"an EP group of {world} ranks is not among {limits['ep_world_size']}"),
        (experts // world <= limits["local_experts_max"] and experts <= limits["experts_max"],
         f"{experts} experts ({experts // world} per rank) exceed {limits['experts_max']} "
         f"({limits['local_experts_max']} per rank)"),
    ]
    problem = next((why for ok, why in checks if not ok), None)
    if problem is None:
        # Row-wise work, with feature dims counted from the end: the kernel's rows are [rows, d], not [E/W, W·C, d].
        not_row_wise = next((n for n in site.experts if not is_row_wise(n) or cut_dim(n) not in (None, -1)), None)
        if not_row_wise is not None:
            problem = f"its expert node {not_row_wise.name} ({op_name(not_row_wise)}) is not known to work row by row"
    if problem is not None:
        return problem
    mapping = Mc2Mapping(layer, soc, *_calls(limits, site.group, world, rank, experts, batch))
    problems = ascend.call_problems(mapping.dispatch.op, mapping.dispatch.args) + \
        ascend.call_problems(mapping.combine.op, mapping.combine.args)
    if problems:  # a mapping that the recorded schemas reject is a bug here, not a reason to skip
        raise AssertionError(f"MC2 mapping disagrees with torch_npu's schemas: {problems}")
    return mapping


def _calls(limits: dict, group: str, world: int, rank: int, experts: int, batch: int) -> tuple[Mc2Call, Mc2Call]:
    version_2 = limits["dispatch"].endswith("_v2")
    common = {"group_ep": f"hccl:{group}", "ep_world_size": world, "ep_rank_id": rank, "moe_expert_num": experts,
              "global_bs": batch * world}
    ids, weights = TensorArg("expert_ids:int32"), TensorArg("weights:float32")
    dispatch = {"x": TensorArg("tokens"), "expert_ids": ids, **common, "expert_scales": weights,
                "quant_mode": 0, "expert_token_nums_type": 1}
    handle = "assist_info_for_combine" if version_2 else "expand_idx"
    combine = {"expand_x": TensorArg("expert_out"), "expert_ids": ids, handle: TensorArg(f"dispatch.{handle}"),
               "ep_send_counts": TensorArg("dispatch.ep_recv_counts"), "expert_scales": weights, **common,
               "tp_send_counts": TensorArg("dispatch.tp_recv_counts"),
               "expand_scales": TensorArg("dispatch.expand_scales")}
    return Mc2Call(limits["dispatch"], dispatch), Mc2Call(limits["combine"], combine)


# What each output of the dispatch kernel holds, by position (version 2 has assist_info_for_combine for expand_idx).
DISPATCH_OUTPUTS = ("expand_x", "dynamic_scales", "expand_idx", "expert_token_nums", "ep_recv_counts",
                    "tp_recv_counts", "expand_scales")


def _rewrite(graph: torch.fx.Graph, site: CapacityExchange, mapping: Mc2Mapping, layer, ctx: PassContext) -> None:
    """The layer's capacity exchange → the MC2 kernels, the experts on the kernel's rows."""
    tokens, expert_ids, weights = site.dispatch.args[0], site.dispatch.args[1], site.combine.args[2]

    def add(target, args=(), kwargs=None, like=site.dispatch, role="dispatch", method=False):
        node = graph.create_node("call_method" if method else "call_function", target, args, kwargs or {})
        return join_layer(node, like, layer, role, ctx.fake_mode)

    with graph.inserting_before(site.experts[0]):
        tensors = {"tokens": tokens, "expert_ids:int32": add("to", (expert_ids, torch.int32), method=True),
                   "weights:float32": add("to", (weights, torch.float32), method=True)}
        group_ep = ascend.ep_comm_name(site.group, dist.get_rank())
        dispatched = add(_npu_op(mapping.dispatch.op), kwargs=_bound(mapping.dispatch.args, tensors, group_ep))
        for position, name in enumerate(DISPATCH_OUTPUTS):
            name = "assist_info_for_combine" if name == "expand_idx" and mapping.dispatch.op.endswith("_v2") else name
            tensors[f"dispatch.{name}"] = add(operator.getitem, (dispatched, position))
        copies = {site.expert_in: tensors["dispatch.expand_x"]}
        for node in site.experts:  # the same row-wise work on [rows, d] instead of [E/W, W·C, d]
            if op_name(node) == "grouped_mm_batched":
                x, w = (copies.get(a, a) for a in node.args)
                copies[node] = add(torch.ops.moe_ascend.grouped_mm.default,
                                   (x, w, tensors["dispatch.expert_token_nums"]), like=node, role="experts")
            else:
                copies[node] = join_layer(graph.node_copy(node, lambda a: copies.get(a, a)), node, layer, "experts",
                                          ctx.fake_mode)
        tensors["expert_out"] = copies[site.expert_out]
    with graph.inserting_before(site.combine):
        combined = add(_npu_op(mapping.combine.op), kwargs=_bound(mapping.combine.args, tensors, group_ep),
                       like=site.combine, role="combine")
        out = add("to", (combined, site.combine.meta["val"].dtype), like=site.combine, role="combine", method=True)
    site.combine.replace_all_uses_with(out)
    graph.erase_node(site.combine)
    layer.replace(site.combine, out)
    erase_unused(graph, layer, ("dispatch", "experts", "combine"))


def _bound(args: dict, tensors: dict, group_ep: str) -> dict:
    """A decided call's arguments with the graph's nodes for its tensors and the EP group's communicator name."""
    return {key: tensors[value] if isinstance(value, TensorArg) else group_ep if key == "group_ep" else value
            for key, value in args.items()}


def _npu_op(name: str):
    """``torch.ops.npu.<name>.default`` where torch_npu (or a stand-in) defines it, else None."""
    try:
        return getattr(torch.ops.npu, name).default
    except (AttributeError, RuntimeError):
        return None


def _npu_soc() -> str:
    import torch_npu

    name = torch_npu.npu.get_device_name()
    return "Ascend910_93" if "910_93" in name else "Ascend910B"
