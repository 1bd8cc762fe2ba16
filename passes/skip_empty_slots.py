"""skip_empty_slots (pre_grad): the expert matmuls of a capacity layer compute only the slots that hold tokens.

A capacity buffer ``[E, C, d]`` is padded: at capacity factor 1.25 a fifth of
its slots are empty at best, and more where routing is uneven (a cold expert
fills few of its ``C``). ``capacity_dispatch`` fills each expert's slots in
order, so the used ones are each expert's first ``filled[e] = min(tokens
routed to e, C)``; ``grouped_mm_filled`` multiplies those rows and leaves the
rest zero (what a zero row's matmul gives anyway). The combine reads only the
filled slots, and the experts work row by row, so outputs and gradients equal
the padded layer's; the saving is the empty slots' share of the expert
matmuls, forward and backward (the backward of ``grouped_mm_filled`` skips
them too). This is what Ascend's ``GroupedMatmul`` with a group list and
MegaBlocks' argument against padding are about, kept in static shapes.

Applies to layers whose experts read the dispatch buffer on the same rank, and
to the two-step exchange of ``hierarchical_a2a``, whose dispatch knows where
each source rank's pairs landed (``hierarchical.filled_blocks(plan)``: one
block per source rank), whole or in ``chunk_for_overlap``'s chunks (each
chunk's dispatch plans its window of the slots, so its plan has that window's
fill: the later windows, past most experts' tokens, are mostly empty). A
layer whose buffer crosses a flat all-to-all first keeps its padded matmuls
(the fill of the other ranks' blocks is not known here), with one note. Each
rewritten layer must keep its experts row-wise (a reduction over slots would
read the empty rows) and let nothing but the combine read their results.

Before::

    capacity_dispatch = torch.ops.moe_ascend.capacity_dispatch.default(tokens, expert_ids, weights, 4, 6, 'position')
    dispatched = capacity_dispatch[0];  slots = capacity_dispatch[1]
    grouped_mm_batched = torch.ops.moe_ascend.grouped_mm_batched.default(dispatched, w_gate_up)
    ...
    grouped_mm_batched_1 = torch.ops.moe_ascend.grouped_mm_batched.default(mul, w_down)
    out = torch.ops.moe_ascend.capacity_combine.default(grouped_mm_batched_1, slots, weights)

After::

    filled = moe_ascend.kernels.capacity.filled_slots(expert_ids, 4, 6)
    grouped_mm_filled = torch.ops.moe_ascend.grouped_mm_filled.default(dispatched, w_gate_up, filled)
    ...
    grouped_mm_filled_1 = torch.ops.moe_ascend.grouped_mm_filled.default(mul, w_down, filled)
    out = torch.ops.moe_ascend.capacity_combine.default(grouped_mm_filled_1, slots, weights)
"""

from __future__ import annotations

import torch
import torch.fx

from moe_ascend.kernels import capacity, exchange, hierarchical
from moe_ascend.passes.analysis.exchange_sites import exchange_collectives, hierarchical_exchanges
from moe_ascend.passes.analysis.moe_regions import ancestors, descendants
from moe_ascend.passes.analysis.ops import is_row_wise, op_name, op_namespace
from moe_ascend.passes.infra import PassContext, PassResult, join_layer, register_pass, replace_node


@register_pass(name="skip_empty_slots", stage="pre_grad",
               after=("find_moe", "canonicalise", "hierarchical_a2a", "affinity_routing", "chunk_for_overlap"),
               roles=("dynamo",))
def skip_empty_slots(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    modified = False
    for layer in ctx.analyses.get("moe_layers", []):
        sites = _padded_experts(layer)
        if isinstance(sites, str):
            if sites:
                ctx.logger.info("%s: MoE layer %d keeps its padded expert matmuls: %s", ctx.graph_name, layer.index,
                                sites)
            continue
        for dispatch, matmuls in sites:
            _skip_empty(gm, ctx, layer, dispatch, matmuls)
        modified = True
    return PassResult(gm, modified)


def _skip_empty(gm: torch.fx.GraphModule, ctx: PassContext, layer, dispatch: torch.fx.Node,
                matmuls: list[torch.fx.Node]) -> None:
    """``matmuls`` (on ``dispatch``'s buffer) multiply only its filled slots."""
    if dispatch.target is hierarchical.capacity_dispatch:
        plan = next(u for u in dispatch.users if u.args[1] == 1)
        with gm.graph.inserting_after(plan):
            filled = gm.graph.create_node("call_function", hierarchical.filled_blocks, (plan,), name="filled")
    else:
        expert_ids, num_experts, slots_per_expert = dispatch.args[1], dispatch.args[3], dispatch.args[4]
        with gm.graph.inserting_after(dispatch):
            filled = gm.graph.create_node("call_function", capacity.filled_slots,
                                          (expert_ids, num_experts, slots_per_expert), name="filled")
    join_layer(filled, dispatch, layer, "dispatch", ctx.fake_mode)
    for matmul in matmuls:
        with gm.graph.inserting_before(matmul):
            skipping = gm.graph.call_function(torch.ops.moe_ascend.grouped_mm_filled.default, (*matmul.args, filled))
        replace_node(gm, matmul, skipping, ctx, layer)


Site = tuple[torch.fx.Node, list[torch.fx.Node]]  # a capacity dispatch and the expert matmuls on its buffer


def _padded_experts(layer) -> list[Site] | str:
    """Each of the layer's capacity dispatches (one per chunk of a two-step exchange) with the expert matmuls on
    its buffer, or why there are none ("": not a capacity layer with grouped matmuls, nothing to say)."""
    two_steps = hierarchical_exchanges(layer)
    if two_steps:
        exchanges = [(t.dispatch, t.combine, t.expert_in, t.expert_out) for t in two_steps]
    else:
        roles = {n: role for role, nodes in layer.nodes.items() for n in nodes}
        dispatches = [n for n in roles if _is_op(n, "capacity_dispatch")]  # not the two-step exchange's namesake
        combines = [n for n in roles if _is_op(n, "capacity_combine")]
        if len(dispatches) != 1 or len(combines) != 1:
            return ""
        dispatched = next((u for u in dispatches[0].users if u.args[1] == 0), None)
        if dispatched is None or not isinstance(combines[0].args[0], torch.fx.Node):
            return ""
        exchanges = [(dispatches[0], combines[0], dispatched, combines[0].args[0])]
    sites = []
    for exchange_nodes in exchanges:
        site = _padded_site(layer, *exchange_nodes)
        if isinstance(site, str):
            return site
        sites.append(site)
    return sites


def _padded_site(layer, dispatch: torch.fx.Node, combine: torch.fx.Node, dispatched: torch.fx.Node,
                 experts_out: torch.fx.Node) -> Site | str:
    """``dispatch`` and the expert matmuls between its buffer and ``combine``, or why they cannot skip."""
    experts = descendants([dispatched]) & (ancestors(experts_out) | {experts_out})
    matmuls = [n for n in dispatch.graph.nodes if n in experts and _is_op(n, "grouped_mm_batched")]
    if not matmuls:
        return ""
    if exchange_collectives(layer) or any(n.target in (exchange.to_experts, exchange.from_experts) for n in experts):
        return "its buffer reaches the experts through an all-to-all (the other ranks' fill is not known here)"
    buffer = tuple(dispatched.meta["val"].shape[:2])
    for node in experts:
        if not is_row_wise(node) or not all(tuple(v.shape[:2]) == buffer for v in _tensors(node.meta["val"])):
            return f"its expert node {node.name} ({op_name(node)}) is not known to work slot by slot"
        stray = next((u for u in node.users if u not in experts and u is not combine), None)
        if stray is not None:
            return f"{stray.name} reads the experts' output {node.name} besides the combine"
    return dispatch, matmuls


def _is_op(node: torch.fx.Node, name: str) -> bool:
    """``node`` calls ``torch.ops.moe_ascend.<name>``."""
    return op_namespace(node) == "moe_ascend" and op_name(node) == name


def _tensors(val) -> list[torch.Tensor]:
    return [val] if isinstance(val, torch.Tensor) else [v for v in val if isinstance(v, torch.Tensor)]
