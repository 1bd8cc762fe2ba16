"""hierarchical_a2a (pre_grad): the expert-parallel exchange crosses the inter-node link once per (token, node).

For each recognised capacity-mode EP layer whose all-to-alls run over all the
ranks, the flat dispatch (``capacity_dispatch`` → all-to-all → the experts'
``[E_rank, W·C, d]`` input) and the flat combine (the experts' output →
all-to-all → ``capacity_combine``) become the two-step exchange of
``moe_ascend.kernels.hierarchical``: an inter-node all-to-all among the ranks
with the same local rank, then an intra-node one, and back. The experts see the
same input, so outputs and gradients equal the flat layer's (sums in another
order). Shapes stay static.

``hierarchical_a2a=True`` rewrites every such layer when the topology spans
nodes; ``"auto"`` only where the cost model predicts the two steps to make
the layer faster (``CostModel.hierarchical_pays``: the step model's layer,
flat and two-step); ``False`` never.

Before::

    capacity_dispatch = torch.ops.moe_ascend.capacity_dispatch.default(tokens, expert_ids, weights, 16, 6, 'position')
    dispatched = capacity_dispatch[0];  slots = capacity_dispatch[1]
    tensor = torch.ops._c10d_functional_autograd.all_to_all_single(dispatched.reshape(-1, 8), [24, 24, 24, 24],
                                                                   [24, 24, 24, 24], '0')
    ...
    per_expert = transpose.reshape(4, 24, 8)
    grouped_mm_batched = torch.ops.moe_ascend.grouped_mm_batched.default(per_expert, w_gate_up)
    ...
    out = torch.ops.moe_ascend.capacity_combine.default(returned, slots, weights)

After::

    hierarchical_dispatch = moe_ascend.kernels.hierarchical.capacity_dispatch(
        tokens, expert_ids, weights, weights, 16, 6, 'position',
        Hierarchy(nodes=2, ranks_per_node=2, intra_group='1', inter_group='3'))
    expert_in = hierarchical_dispatch[0];  plan = hierarchical_dispatch[1]
    grouped_mm_batched = torch.ops.moe_ascend.grouped_mm_batched.default(expert_in, w_gate_up)
    ...
    out = moe_ascend.kernels.hierarchical.capacity_combine(expert_out, plan, Hierarchy(...))
"""

from __future__ import annotations

import operator
import torch
import torch.distributed as dist
import torch.fx

from moe_ascend.kernels import hierarchical
from moe_ascend.passes.analysis.exchange_sites import (NOT_CAPACITY, CapacityExchange, capacity_exchange,
                                                       exchange_collectives)
from moe_ascend.passes.analysis.ops import collective_group
from moe_ascend.passes.infra import PassContext, PassResult, erase_unused, inherit_meta, register_pass


@register_pass(name="hierarchical_a2a", stage="pre_grad", after=("find_moe", "canonicalise"), roles=("dynamo",))
def hierarchical_a2a(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    setting = ctx.options.hierarchical_a2a
    topology = ctx.topology
    if setting is False or topology is None or topology.nodes < 2:
        if setting is True and ctx.analyses.get("moe_layers"):  # asked for by name: say why it cannot apply
            ctx.logger.warning("%s: hierarchical_a2a=True leaves the flat all-to-all: %s", ctx.graph_name,
                               _one_node(topology))
        return PassResult(gm, False)
    modified = False
    for layer in ctx.analyses.get("moe_layers", []):
        site = _capacity_exchange(layer, topology)
        if isinstance(site, str):
            if site:  # an EP layer we cannot rewrite; a single-rank layer needs no note
                ctx.logger.warning("%s: MoE layer %d keeps the flat all-to-all: %s", ctx.graph_name, layer.index, site)
            continue
        hierarchy = topology.hierarchy()
        if setting == "auto" and (ctx.cost_model is None or not ctx.cost_model.hierarchical_pays(site)):
            ctx.logger.info("%s: MoE layer %d keeps the flat all-to-all: the cost model predicts no gain",
                            ctx.graph_name, layer.index)
            continue
        _rewrite(gm, site, hierarchy, ctx, layer)
        modified = True
    return PassResult(gm, modified)


def _one_node(topology) -> str:
    if topology is None:
        return "this process is in no distributed job, so no exchange crosses a node"
    ranks = f"{topology.ranks_per_node} rank{'s' if topology.ranks_per_node > 1 else ''}"
    return (f"the topology is one node of {ranks}, so no exchange crosses a node (under "
            f"torchrun, LOCAL_WORLD_SIZE below WORLD_SIZE, or options['topology'] = {{'ranks_per_node': G}}, "
            f"gives several)")


def _capacity_exchange(layer, topology) -> CapacityExchange | str:
    """The layer's flat exchange over all ranks, or why it has none we can rewrite ("" when nothing to say)."""
    hierarchy = topology.hierarchy()
    collectives = exchange_collectives(layer)
    if collectives and {collective_group(n) for n in collectives} <= {hierarchy.intra_group, hierarchy.inter_group}:
        return ""  # already the two-step exchange (MoELayer(hierarchical_a2a=True))
    site = capacity_exchange(layer)
    if site == NOT_CAPACITY:
        return site + "; for a dropless layer, build MoELayer(..., hierarchical_a2a=True)"
    if isinstance(site, str):
        return site
    group = dist.distributed_c10d._resolve_process_group(site.group)
    if dist.get_process_group_ranks(group) != list(range(topology.world_size)):
        return "its expert-parallel group is not all ranks in order; the two-step exchange needs the whole topology"
    return site


def _rewrite(gm: torch.fx.GraphModule, site: CapacityExchange, hierarchy: hierarchical.Hierarchy, ctx: PassContext,
             layer) -> None:
    graph = gm.graph
    tokens, expert_ids, scores, num_experts, capacity, drop_policy = site.dispatch.args[:6]
    weights = site.combine.args[2]
    with graph.inserting_before(site.experts[0]):
        dispatch = graph.create_node("call_function", hierarchical.capacity_dispatch,
                                     (tokens, expert_ids, weights, scores, num_experts, capacity, drop_policy,
                                      hierarchy),
                                     name="hierarchical_dispatch")
        expert_in = graph.create_node("call_function", operator.getitem, (dispatch, 0), name="expert_in")
        plan = graph.create_node("call_function", operator.getitem, (dispatch, 1), name="plan")
    with graph.inserting_after(site.expert_out):
        combine = graph.create_node("call_function", hierarchical.capacity_combine, (site.expert_out, plan, hierarchy),
                                    name="hierarchical_combine")
    for node, like in ((dispatch, site.dispatch), (expert_in, site.dispatch), (plan, site.dispatch),
                       (combine, site.combine)):
        inherit_meta(node, like, ctx.fake_mode)
    for node in site.experts:
        node.replace_input_with(site.expert_in, expert_in)
    site.combine.replace_all_uses_with(combine)
    graph.erase_node(site.combine)
    layer.replace(site.combine, combine)  # its place in the combine role, and as the layer's output
    layer.nodes["dispatch"] += [dispatch, expert_in, plan]
    erase_unused(graph, layer, ("dispatch", "combine"))
