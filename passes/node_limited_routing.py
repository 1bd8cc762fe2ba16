"""node_limited_routing (pre_grad, changes numerics): each token's experts lie on at most M nodes (DeepSeek-V3).

On with ``options={"routing": "node_limited", "routing_options": {"max_nodes": M}}``.
A token crosses the inter-node link once per node its experts live on (with the
two-step exchange), so limiting the nodes limits those bytes. The router of each
recognised expert-parallel layer whose experts are spread over the topology's
nodes in rank order becomes ``kernels.node_limited.node_limited_topk_softmax``:
nodes ranked by the sum of their best expert probabilities, the token's top k
taken among the experts of its best M nodes. A sigmoid router
(``topk_sigmoid``, DeepSeek-V3's) gets the same limit as its group limit: the
nodes become its groups (a node scored by the sum of its best ``max(1, k // M)``
choices, bias included) and it keeps its best M; a router that already limits
tokens to its nodes keeps the tighter of the two. Layers on one node, or whose
experts are not placed over the nodes in rank order, keep their router with a
warning that says why. A layer that a graph break cuts before its exchange
(dropless split sizes read on the host) shows only its router here; its experts
are taken to lie over all ranks in order, as MoELayer, Megatron and torchtitan
place them.

Before::

    linear = torch._C._nn.linear(x, gate_weight)
    topk_softmax = torch.ops.moe_ascend.topk_softmax.default(linear, 4, True)

After (2 nodes, M = 1)::

    linear = torch._C._nn.linear(x, gate_weight)
    node_limited_routing = moe_ascend.kernels.node_limited.node_limited_topk_softmax(linear, 4, True, 2, 1)

and a sigmoid router, before and after::

    topk_sigmoid = torch.ops.moe_ascend.topk_sigmoid.default(linear, 4, bias, 1, 1, 1, True, 2.5)
    node_limited_routing = torch.ops.moe_ascend.topk_sigmoid.default(linear, 4, bias, 2, 1, 4, True, 2.5)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx

from moe_ascend.kernels.node_limited import node_limited_topk_softmax
from moe_ascend.passes.analysis.exchange_sites import exchange_collectives
from moe_ascend.passes.analysis.ops import collective_group
from moe_ascend.passes.analysis.routers import rewritable_routers
from moe_ascend.passes.infra import PassContext, PassResult, register_pass, replace_node


@register_pass(name="node_limited_routing", stage="pre_grad", after=("find_moe", "canonicalise"),
               before=("hierarchical_a2a", "chunk_for_overlap"), roles=("dynamo",), changes_numerics=True,
               enabled=lambda options: options.routing == "node_limited")
def node_limited_routing(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    max_nodes = ctx.options.routing_option("max_nodes")
    modified = False
    not_spread = lambda layer, router: _not_spread_over_nodes(layer, ctx.topology, router.num_experts)  # noqa: E731
    for layer, router in rewritable_routers(ctx, not_spread):
        if max_nodes >= ctx.topology.nodes:
            ctx.logger.info("%s: MoE layer %d keeps its router: max_nodes=%d is every node", ctx.graph_name,
                            layer.index, max_nodes)
            continue
        if router.score == "softmax":
            target = node_limited_topk_softmax
            args = (router.logits, router.k, router.renormalize, ctx.topology.nodes, max_nodes)
        else:
            target = torch.ops.moe_ascend.topk_sigmoid.default
            args = _sigmoid_limited(router, ctx.topology.nodes, max_nodes)
            if args is None:
                ctx.logger.info("%s: MoE layer %d keeps its router: it already keeps each token's experts on at "
                                "most %d nodes", ctx.graph_name, layer.index, max_nodes)
                continue
            if isinstance(args, str):
                ctx.logger.warning("%s: MoE layer %d keeps its router (routing='node_limited'): %s", ctx.graph_name,
                                   layer.index, args)
                continue
        with gm.graph.inserting_before(router.op):
            limited = gm.graph.create_node("call_function", target, args, name="node_limited_routing")
        replace_node(gm, router.op, limited, ctx, layer)
        modified = True
    return PassResult(gm, modified)


def _sigmoid_limited(router, nodes: int, max_nodes: int) -> tuple | str | None:
    """``topk_sigmoid``'s arguments with its groups on the nodes, or why it keeps its own (None: it is limited
    enough already)."""
    logits, k, bias, groups, top_groups, group_top, renormalize, scale = router.op.args
    if groups == 1:
        group_top = min(router.num_experts // nodes, max(1, k // max_nodes))
    elif groups != nodes:
        return (f"its router already limits each token to {top_groups} of {groups} expert groups, which are not "
                f"the {nodes} nodes")
    elif top_groups <= max_nodes:
        return None
    return logits, k, bias, nodes, max_nodes, group_top, renormalize, scale


def _not_spread_over_nodes(layer, topology, num_experts: int) -> str:
    """Why the layer's experts are not E/nodes per node in expert order ("" when they are)."""
    if topology is None or topology.nodes < 2:
        return "the topology has one node"
    collectives = exchange_collectives(layer)
    if not collectives and layer.output is not None:
        return "its experts all live on this rank (no expert-parallel exchange)"
    if num_experts % topology.nodes:
        return f"its {num_experts} experts do not split evenly over {topology.nodes} nodes"
    hierarchy = topology.hierarchy()
    for node in collectives:
        group = collective_group(node)
        ranks = dist.get_process_group_ranks(dist.distributed_c10d._resolve_process_group(group))
        if group not in (hierarchy.intra_group, hierarchy.inter_group) and ranks != list(range(topology.world_size)):
            return "its expert-parallel group is not all ranks in order, so its experts' nodes are unknown"
    return ""
