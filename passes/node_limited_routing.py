"""node_limited_routing (pre_grad, changes numerics): each token's experts lie on at most M nodes (DeepSeek-V3).

On with ``options={"routing": "node_limited", "routing_options": {"max_nodes": M}}``.
A token crosses the inter-node link once per node its experts live on (with the
two-step exchange), so limiting the nodes limits those bytes. The router of each
recognised expert-parallel layer whose experts are spread over the topology's
nodes in rank order becomes ``kernels.node_limited.node_limited_topk_softmax``:
nodes ranked by the sum of their best expert probabilities, the token's top k
taken among the experts of its best M nodes. Layers on one node, or whose
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
"""

from __future__ import annotations

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
        with gm.graph.inserting_before(router.topk_softmax):
            limited = gm.graph.create_node(
                "call_function", node_limited_topk_softmax,
                (router.logits, router.k, router.renormalize, ctx.topology.nodes, max_nodes),
                name="node_limited_routing")
        replace_node(gm, router.topk_softmax, limited, ctx, layer)
        modified = True
    return PassResult(gm, modified)


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
