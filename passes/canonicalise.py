"""canonicalise (pre_grad): rewrite recognised MoE regions onto the moe_ascend ops, so later passes see one IR.

Two rewrites, each exactly the same math:

    router   torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
          →  torch.ops.moe_ascend.topk_softmax(logits, k, False)
    experts  torch.bmm(x, w)              # w: the layer's expert weights, [E, d, f]
          →  torch.ops.moe_ascend.grouped_mm_batched(x, w)

Opt-in (``options={"passes": ["canonicalise"]}``), and on whenever a pass that
consumes the one IR is (``routing`` other than ``"keep"``). Under Inductor the opaque ops cut fusions:
on the quickstart model 31 kernels to compile instead of 27 (≈ +7 % compile
time) for the same step time, a price worth paying only once a later pass
uses the result.

The router rewrite applies to fp32/fp64 scores (the op's softmax runs in at
least fp32, which would round bf16 differently). The one place the two can
differ is an exact tie between two experts' probabilities: torch.topk leaves
the order unspecified, ``topk_softmax`` picks the lower expert id.

Before::

    probs = torch.softmax(linear, dim = -1)
    topk = torch.topk(probs, 2, dim = -1)
    weights = topk[0];  experts = topk[1]
    bmm = torch.bmm(expert_in, l_w_in_)

After::

    probs = torch.softmax(linear, dim = -1)        # still there for its other users (aux loss)
    topk_softmax = torch.ops.moe_ascend.topk_softmax.default(linear, 2, False)
    weights = topk_softmax[0];  experts = topk_softmax[1]
    bmm = torch.ops.moe_ascend.grouped_mm_batched.default(expert_in, l_w_in_)
"""

from __future__ import annotations

import operator

import torch
import torch.fx

import moe_ascend.kernels  # noqa: F401  (registers torch.ops.moe_ascend)
from moe_ascend.passes.analysis.ops import op_name
from moe_ascend.passes.analysis.routers import routed_layers
from moe_ascend.passes.infra import PassContext, PassResult, register_pass, replace_node


@register_pass(name="canonicalise", stage="pre_grad", after=("find_moe",), roles=("dynamo",),
               enabled=lambda options: options.routing != "keep")
def canonicalise(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    modified = False
    for layer in routed_layers(ctx):  # a layer cut by a graph break has its router here and its experts elsewhere
        for node in list(layer.nodes["router"]):
            modified |= _fuse_router(gm, node, ctx, layer)
        for node in list(layer.nodes["experts"]):
            modified |= _grouped_expert_matmul(gm, node, ctx, layer)
    return PassResult(gm, modified)


def _fuse_router(gm: torch.fx.GraphModule, topk: torch.fx.Node, ctx: PassContext, layer) -> bool:
    """``topk(softmax(logits, -1), k, dim=-1)`` whose users take its values and indices → ``topk_softmax``."""
    if topk.target is not torch.topk:
        return False
    scores = topk.args[0]
    k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
    if not (_is_softmax_over_last_dim(scores) and isinstance(k, int) and _topk_over_last_dim(topk)):
        return False
    logits = scores.args[0]
    if logits.meta["val"].dim() != 2 or logits.meta["val"].dtype not in (torch.float32, torch.float64):
        return False
    if not all(u.op == "call_function" and u.target is operator.getitem for u in topk.users):
        return False
    with gm.graph.inserting_before(topk):
        fused = gm.graph.call_function(torch.ops.moe_ascend.topk_softmax.default, (logits, k, False))
    replace_node(gm, topk, fused, ctx, layer)
    if not scores.users:  # the softmax fed only the top-k
        gm.graph.erase_node(scores)
        layer.replace(scores, None)
    return True


def _grouped_expert_matmul(gm: torch.fx.GraphModule, bmm: torch.fx.Node, ctx: PassContext, layer) -> bool:
    """``torch.bmm(x, w)`` in the experts role, on an expert-weight tensor ``w`` → ``grouped_mm_batched``."""
    if bmm.target is not torch.bmm or bmm.kwargs:
        return False
    x, w = bmm.args
    if not _is_expert_weight(w):
        return False  # e.g. weights gathered per token (w[expert_ids]): not the [E, d, f] layout
    with gm.graph.inserting_before(bmm):
        grouped = gm.graph.call_function(torch.ops.moe_ascend.grouped_mm_batched.default, (x, w))
    replace_node(gm, bmm, grouped, ctx, layer)
    return True


def _is_expert_weight(node: torch.fx.Node) -> bool:
    """A parameter seen through view-only ops (``w.transpose(1, 2)``)."""
    while op_name(node) in ("transpose", "permute", "contiguous") and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node.op in ("placeholder", "get_attr")


def _is_softmax_over_last_dim(node) -> bool:
    if not isinstance(node, torch.fx.Node) or node.target is not torch.softmax:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    rank = node.meta["val"].dim()
    return dim in (-1, rank - 1) and node.kwargs.get("dtype") is None and len(node.args) <= 2


def _topk_over_last_dim(topk: torch.fx.Node) -> bool:
    rank = topk.args[0].meta["val"].dim()
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    return dim in (-1, rank - 1) and largest is True
