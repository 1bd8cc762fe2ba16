"""find_moe (pre_grad analysis): mark every node of every MoE layer with its layer and role.

The graph's code does not change; each node of a recognised layer gets
``node.meta["custom"]["moe"] = {"layer": i, "role": r}`` with ``r`` one of
router, dispatch, experts, combine. AOTAutograd copies ``meta["custom"]`` onto
the aten nodes of the forward graph and onto their backward nodes, so
post_grad passes read the same roles. How a layer is recognised:
``moe_ascend.passes.analysis.moe_regions``.

Before::

    linear = torch._C._nn.linear(x, gate_weight)      # meta: {}
    probs = torch.softmax(linear, dim = -1)
    topk = torch.topk(probs, 2, dim = -1)
    ...
    h = torch.bmm(dispatched, w1)

After (same code)::

    linear  meta["custom"]["moe"] = {"layer": 0, "role": "router"}
    topk    meta["custom"]["moe"] = {"layer": 0, "role": "router"}
    h       meta["custom"]["moe"] = {"layer": 0, "role": "experts"}
"""

from __future__ import annotations

import torch.fx

from moe_ascend.passes.analysis.moe_regions import annotate, cut_routers, find_moe_layers
from moe_ascend.passes.infra import PassContext, PassResult, register_pass


@register_pass(name="find_moe", stage="pre_grad", after=("normalise",), roles=("dynamo",))
def find_moe(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    refused: dict[torch.fx.Node, str] = {}
    router_like: list[torch.fx.Node] = []  # routers that look like a layer and are not: the user should hear of them

    def refuse(top_k: torch.fx.Node, why: str, router: bool) -> None:
        refused[top_k] = why
        if router:
            router_like.append(top_k)

    layers = find_moe_layers(gm, refuse)
    for layer in layers:
        annotate(layer)
    ctx.analyses["moe_layers"] = layers
    ctx.analyses["cut_routers"] = cut_routers(gm, layers)  # for the routing rewrites
    if layers:
        for top_k in router_like:
            ctx.logger.warning("%s: top-k %s is %s", ctx.graph_name, top_k.name, refused[top_k])
    elif refused:
        ctx.logger.warning("%s: no MoE layer found; the graph is compiled unchanged. Its top-k nodes: %s",
                           ctx.graph_name, "; ".join(f"{top_k.name} is {why}" for top_k, why in refused.items()))
    else:
        ctx.logger.info("%s: no MoE layer found; the graph is compiled unchanged", ctx.graph_name)
    return PassResult(gm, modified=False)
