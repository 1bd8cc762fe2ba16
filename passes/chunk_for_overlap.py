"""chunk_for_overlap (pre_grad): split each flat capacity exchange into chunks whose all-to-alls can hide.

The ``[E, C, d]`` buffer is cut along its slots into ``n`` chunks; each chunk
goes to the experts' ranks, through the experts and back on its own, so the
all-to-all of one chunk can run while the experts compute another (the
Adaptive Pipe of Pangu Ultra MoE, Tutel's overlap degree). The experts work
row by row, so every row meets the same weights as before and the outputs and
gradients equal the unchunked layer's (weight gradients are summed in chunks).

The chunks are emitted in pipeline order, which fixes each process group's
collective order for every later pass (``schedule_overlap`` may move a
collective, never past another of its group)::

    dispatch 0, dispatch 1, ..., dispatch n-1, experts 0, combine 0, experts 1, combine 1, ...

Every dispatch goes first so the link never waits for the experts: where the
all-to-all takes as long as the experts, an idle link is time lost. (Issuing
dispatch ``i+2`` only after combine ``i`` left the link idle while chunk ``i``
computed: measured on bench/overlap.py, 2 x 1 at 1 Gbit/s.) The backward
mirrors it: every combine's gradient goes back first, each dispatch's as its
chunk's experts finish.

The two-step exchange of ``hierarchical_a2a`` is chunked the same way, by
windows of the slots: chunk ``j``'s dispatch sends only the pairs the flat
dispatch puts in its window of each expert's slots (both steps of the exchange),
its experts run on them, and its combine returns their share of each token's
sum; the layer's output is the chunks' shares added up::

    dispatch 0 (slots 0:3), dispatch 1 (slots 3:6), experts 0, combine 0, experts 1, combine 1, out = sum

``n`` is ``options["overlap"]``, or under ``"auto"`` the cost model's choice
(``CostModel.best_chunks``: the step model's fastest layer), and at most ``C``. Layers whose experts do more
than row-wise work (a reduction over slots, a reshape that mixes them) keep
their exchange, with one line naming the node (a warning when a chunk count
was asked for, a note under ``"auto"``).

Before::

    capacity_dispatch = torch.ops.moe_ascend.capacity_dispatch.default(tokens, expert_ids, weights, 4, 6, 'position')
    dispatched = capacity_dispatch[0];  slots = capacity_dispatch[1]
    reshape_1 = dispatched.reshape(-1, 8)
    tensor = torch.ops._c10d_functional.all_to_all_single(reshape_1, [12, 12], [12, 12], '0')
    ...
    expert_out = torch.ops.moe_ascend.grouped_mm_batched.default(mul, w_down)
    ...
    out = torch.ops.moe_ascend.capacity_combine.default(returned, slots, weights)

After (``n = 2``)::

    slots_0 = torch.narrow(dispatched, 1, 0, 3)
    expert_in_0 = moe_ascend.kernels.exchange.to_experts(slots_0, '0', 2)
    slots_1 = torch.narrow(dispatched, 1, 3, 3)
    expert_in_1 = moe_ascend.kernels.exchange.to_experts(slots_1, '0', 2)
    grouped_mm_batched_0 = torch.ops.moe_ascend.grouped_mm_batched.default(expert_in_0, w_gate_up)
    ...
    returned_0 = moe_ascend.kernels.exchange.from_experts(expert_out_0, '0', 2)
    ...
    returned = torch.cat([returned_0, returned_1], 1)
    out = torch.ops.moe_ascend.capacity_combine.default(returned, slots, weights)
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from moe_ascend.kernels import exchange, hierarchical
from moe_ascend.passes.analysis.exchange_sites import (NOT_CAPACITY, CapacityExchange, HierarchicalExchange,
                                                       capacity_exchange, hierarchical_exchange)
from moe_ascend.passes.analysis.ops import is_row_wise, op_name
from moe_ascend.passes.infra import PassContext, PassResult, erase_unused, join_layer, register_pass

MOST_CHUNKS = 8


@register_pass(name="chunk_for_overlap", stage="pre_grad", after=("find_moe", "canonicalise", "hierarchical_a2a"),
               roles=("dynamo",))
def chunk_for_overlap(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.options.overlap_chunks is False or ctx.analyses.get("token_groups", 1) > 1:
        return PassResult(gm, False)  # (a token group's exchange is not chunked yet)
    # Asked for chunks and not given them is a warning; "auto" passing a layer by is a note.
    say = ctx.logger.info if ctx.options.overlap_chunks == "auto" else ctx.logger.warning
    modified = False
    for layer in ctx.analyses.get("moe_layers", []):
        site = hierarchical_exchange(layer) or capacity_exchange(layer)
        if isinstance(site, str):
            say("%s: MoE layer %d is not chunked for overlap: %s", ctx.graph_name, layer.index, _why_not(layer, site))
            continue
        experts = list(site.experts)
        not_row_wise = next((n for n in experts if not is_row_wise(n)), None)
        if not_row_wise is not None:
            say("%s: MoE layer %d is not chunked for overlap: its expert node %s (%s) is not known to work slot by "
                "slot", ctx.graph_name, layer.index, not_row_wise.name, op_name(not_row_wise))
            continue
        chunks = min(_chunk_count(site, ctx), site.capacity)
        if chunks < 2:
            ctx.logger.info("%s: MoE layer %d is not chunked for overlap: %s", ctx.graph_name, layer.index,
                            "the cost model predicts no gain" if site.capacity > 1 else "its capacity is one slot")
            continue
        rewrite = _rewrite_two_step if isinstance(site, HierarchicalExchange) else _rewrite
        rewrite(gm.graph, site, experts, layer, chunks, ctx)
        ctx.logger.info("%s: MoE layer %d exchanges its tokens in %d chunks", ctx.graph_name, layer.index, chunks)
        modified = True
    return PassResult(gm, modified)


def _why_not(layer, reason: str) -> str:
    if any(n.target is hierarchical.capacity_dispatch for n in layer.nodes.get("dispatch", [])):
        return "its two-step exchange is not one dispatch whose expert input and plan reach one combine"
    if reason == NOT_CAPACITY:
        return reason + "; chunk a dropless layer with MoELayer(..., overlap_chunks=n)"
    return reason or "it exchanges nothing (one process, or every expert is local): there is no all-to-all to hide"


def _chunk_count(site: CapacityExchange, ctx: PassContext) -> int:
    if isinstance(ctx.options.overlap_chunks, int):
        return ctx.options.overlap_chunks
    if ctx.cost_model is None:  # "auto" without a cost model: nothing to choose by
        return 1
    return ctx.cost_model.best_chunks(site, most=MOST_CHUNKS, hierarchical=isinstance(site, HierarchicalExchange))


def _tagger(layer, ctx: PassContext):
    def tagged(node: torch.fx.Node, like: torch.fx.Node, role: str, chunk: int | None) -> torch.fx.Node:
        """``node`` computes ``like``'s values for one chunk (all of them when ``chunk`` is None)."""
        return join_layer(node, like, layer, role, ctx.fake_mode, **({} if chunk is None else {"chunk": chunk}))
    return tagged


def _expert_copies(graph: torch.fx.Graph, experts: list[torch.fx.Node], expert_in: torch.fx.Node,
                   chunk_in: torch.fx.Node, chunk: int, tagged) -> dict:
    """The experts, copied to run on one chunk's input: each node's copy, by the node."""
    copies = {expert_in: chunk_in}
    for node in experts:
        copies[node] = tagged(graph.node_copy(node, lambda a: copies.get(a, a)), node, "experts", chunk)
    return copies


def _rewrite_two_step(graph: torch.fx.Graph, site: HierarchicalExchange, experts: list[torch.fx.Node], layer,
                      chunks: int, ctx: PassContext) -> None:
    tagged = _tagger(layer, ctx)
    windows = exchange.even_bounds(site.capacity, chunks)
    with graph.inserting_before(experts[0]):
        sent = []
        for j, window in enumerate(windows):
            dispatch = tagged(graph.create_node("call_function", hierarchical.capacity_dispatch, site.dispatch.args,
                                                {"slots": tuple(window)}, name=f"hierarchical_dispatch_{j}"),
                              site.dispatch, "dispatch", j)
            sent.append([tagged(graph.create_node("call_function", operator.getitem, (dispatch, i), name=f"{name}_{j}"),
                                like, "dispatch", j)
                         for i, (name, like) in enumerate((("expert_in", site.expert_in), ("plan", site.plan)))])
        shares = []
        for j, (expert_in, plan) in enumerate(sent):
            copies = _expert_copies(graph, experts, site.expert_in, expert_in, j, tagged)
            share = graph.create_node("call_function", hierarchical.capacity_combine,
                                      (copies[site.expert_out], plan, *site.combine.args[2:]), name=f"combined_{j}")
            shares.append(tagged(share, site.combine, "combine", j))
        total = shares[0]
        for share in shares[1:]:
            total = tagged(graph.call_function(operator.add, (total, share)), site.combine, "combine", None)
    site.combine.replace_all_uses_with(total)
    layer.replace(site.combine, total)
    graph.erase_node(site.combine)
    erase_unused(graph, layer, ("dispatch", "experts", "combine"))


def _rewrite(graph: torch.fx.Graph, site: CapacityExchange, experts: list[torch.fx.Node], layer, chunks: int,
             ctx: PassContext) -> None:
    bounds = exchange.even_bounds(site.capacity, chunks)
    expert_inputs: list[torch.fx.Node] = []
    returned: list[torch.fx.Node] = []
    tagged = _tagger(layer, ctx)

    def dispatch(j: int) -> None:
        start, stop = bounds[j]
        part = graph.create_node("call_function", torch.narrow, (site.dispatched, 1, start, stop - start),
                                 name=f"slots_{j}")
        tagged(part, site.expert_in, "dispatch", j)
        expert_in = graph.create_node("call_function", exchange.to_experts, (part, site.group, site.ep_size),
                                      name=f"expert_in_{j}")
        expert_inputs.append(tagged(expert_in, site.expert_in, "dispatch", j))

    with graph.inserting_before(experts[0]):
        for j in range(chunks):
            dispatch(j)
        for j in range(chunks):
            copies = _expert_copies(graph, experts, site.expert_in, expert_inputs[j], j, tagged)
            back = graph.create_node("call_function", exchange.from_experts,
                                     (copies[site.expert_out], site.group, site.ep_size), name=f"returned_{j}")
            returned.append(tagged(back, site.combine, "combine", j))
        joined = tagged(graph.create_node("call_function", torch.cat, (returned, 1), name="returned"), site.combine,
                        "combine", None)
    site.combine.replace_input_with(site.combine.args[0], joined)
    erase_unused(graph, layer, ("dispatch", "experts", "combine"))
