"""canonicalise (pre_grad): rewrite recognised MoE regions onto the moe_ascend ops, so later passes see one IR.

Three rewrites, each the same math:

    router   torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
          →  torch.ops.moe_ascend.topk_softmax(logits, k, False)
    router   scores = sigmoid(logits); choice = scores + bias          # DeepSeek-V3's, bias and groups optional
             ids = topk(within_best_groups(choice), k)[1]; w = scores.gather(1, ids) [/ Σ w] [· scale]
          →  torch.ops.moe_ascend.topk_sigmoid(logits, k, bias, groups, top_groups, group_top, renormalize, scale)
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

The sigmoid router is matched through its group limit as DeepSeek-V3 writes it
(transformers' and the reference code's forms): the choice viewed as
``[T, groups, E/groups]``, each group scored by the sum of its best ``group_top``
(or its max), the best ``top_groups`` kept in a ``zeros().scatter(1, best, 1)``
mask, expanded group-major to the experts and filled with -inf. A router
written another way keeps its ops (and its numbers); the routing rewrites then
say it is not in canonical form.

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
from dataclasses import dataclass, field

import torch
import torch.fx

import moe_ascend.kernels  # noqa: F401  (registers torch.ops.moe_ascend)
from moe_ascend.passes.analysis.ops import op_name
from moe_ascend.passes.analysis.routers import routed_layers
from moe_ascend.passes.infra import PassContext, PassResult, join_layer, register_pass, replace_node


@register_pass(name="canonicalise", stage="pre_grad", after=("find_moe",), roles=("dynamo",),
               enabled=lambda options: options.routing != "keep")
def canonicalise(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    modified = False
    for layer in routed_layers(ctx):  # a layer cut by a graph break has its router here and its experts elsewhere
        for node in list(layer.nodes["router"]):
            modified |= _fuse_router(gm, node, ctx, layer)
        modified |= _fuse_sigmoid_router(gm, layer.topk, ctx, layer)
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


@dataclass
class SigmoidRouter:
    """A matched DeepSeek-V3 router: the fused op's arguments, its weights' last node, and every node it replaces."""

    args: tuple
    weights: torch.fx.Node
    matched: list[torch.fx.Node] = field(default_factory=list)


def _fuse_sigmoid_router(gm: torch.fx.GraphModule, topk: torch.fx.Node, ctx: PassContext, layer) -> bool:
    router = _sigmoid_router(topk)
    if router is None:
        return False
    graph = gm.graph
    with graph.inserting_before(topk):
        fused = graph.call_function(torch.ops.moe_ascend.topk_sigmoid.default, router.args)
    replace_node(gm, topk, fused, ctx, layer)  # its one reader, [1], now reads the fused ids
    with graph.inserting_after(fused):
        weights = graph.create_node("call_function", operator.getitem, (fused, 0), name="routing_weights")
    join_layer(weights, router.weights, layer, "router", ctx.fake_mode)
    router.weights.replace_all_uses_with(weights)
    for node in sorted(router.matched, key=_position(graph), reverse=True):  # readers before what they read
        if not node.users:
            graph.erase_node(node)
            layer.replace(node, None)
    return True


def _sigmoid_router(topk: torch.fx.Node) -> SigmoidRouter | None:
    """``topk``, the layer's final top-k, as the end of a DeepSeek-V3 router, or None."""
    if _op(topk) != "topk" or not _topk_over_last_dim(topk) or len(topk.users) != 1 or _getitems(topk) != {1}:
        return None
    k = _arg(topk, 1, "k")
    limit = _group_limit(topk.args[0])
    if not isinstance(k, int) or limit is None:
        return None
    choice, (groups, top_groups, group_top), matched = limit
    scores, bias = choice, None
    if _op(choice) == "add" and len(choice.args) == 2 and not choice.kwargs:
        scores, bias = choice.args if _op(choice.args[0]) == "sigmoid" else reversed(choice.args)
        matched.append(choice)
        if not (isinstance(bias, torch.fx.Node) and tuple(bias.meta["val"].shape) == (scores.meta["val"].shape[-1],)):
            return None
    if _op(scores) != "sigmoid" or not isinstance(scores.args[0], torch.fx.Node):
        return None
    logits = scores.args[0]
    if logits.meta["val"].dim() != 2 or logits.meta["val"].dtype not in (torch.float32, torch.float64):
        return None
    (ids,) = topk.users
    gathers = [u for u in scores.users if _op(u) == "gather" and _arg(u, 1, "dim") in (1, -1)
               and _arg(u, 2, "index") is ids]
    if len(gathers) != 1:
        return None
    weights, renormalize, scale = _weights(gathers[0], matched)
    matched += [scores, gathers[0]]
    return SigmoidRouter((logits, k, bias, groups, top_groups, group_top, renormalize, scale), weights,
                         list(dict.fromkeys(matched)))


def _group_limit(selection: torch.fx.Node):
    """``(choice, (groups, top_groups, group_top), nodes)`` for the scores a final top-k reads: ``choice`` itself
    (one group), or ``choice.masked_fill(~kept_experts, -inf)`` with a group-major mask of the best groups."""
    if _op(selection) != "masked_fill":
        return selection, (1, 1, 1), []
    choice, dropped, fill = (_arg(selection, i, name) for i, name in enumerate(("input", "mask", "value")))
    if fill != float("-inf") or not all(isinstance(n, torch.fx.Node) for n in (choice, dropped)):
        return None  # a 0.0 fill differs wherever a kept choice is below zero (a negative bias)
    nodes = [selection, dropped]
    num_experts = choice.meta["val"].shape[-1]
    if dropped.meta["val"].shape != choice.meta["val"].shape:
        return None
    if _op(dropped) == "eq" and dropped.args[1] == 0:
        kept = dropped.args[0]
    elif _op(dropped) in ("invert", "logical_not", "bitwise_not"):
        kept = dropped.args[0]
        if _op(kept) in ("bool", "to"):
            nodes.append(kept)
            kept = kept.args[0]
    else:
        return None
    while _op(kept) in ("reshape", "view", "expand", "unsqueeze", "repeat_interleave"):
        nodes.append(kept)
        kept = kept.args[0]
    if _op(kept) != "scatter" or len(kept.meta["val"].shape) != 2 or not _expanded_group_major(nodes, kept):
        return None
    groups = kept.meta["val"].shape[1]
    zeros, dim, best, value = kept.args if len(kept.args) == 4 else (None,) * 4
    if _op(zeros) not in ("zeros_like", "new_zeros", "zeros") or dim not in (1, -1) or value not in (1, True):
        return None
    best_groups = best.args[0] if _op(best) == "getitem" and best.args[1] == 1 else None
    if _op(best_groups) != "topk" or not _topk_over_last_dim(best_groups):
        return None
    group_scores = best_groups.args[0]
    group_top, scored = _group_score(group_scores)
    view = scored.args[0] if scored is not None else None
    if (view is None or _op(view) not in ("view", "reshape") or view.args[0] is not choice
            or tuple(view.meta["val"].shape[1:]) != (groups, num_experts // groups)):
        return None
    nodes += [kept, zeros, best, best_groups, group_scores, group_scores.args[0], scored, view]
    return choice, (groups, _arg(best_groups, 1, "k"), group_top), nodes


def _expanded_group_major(nodes: list[torch.fx.Node], group_mask: torch.fx.Node) -> bool:
    """The view-like nodes from the group mask to the expert mask repeat each group's entry over its experts
    (``unsqueeze(-1).expand(..).reshape(T, E)`` or ``repeat_interleave(E/G, dim=1)``), not interleave groups."""
    views = [n for n in nodes if _op(n) in ("reshape", "view", "expand", "unsqueeze", "repeat_interleave")]
    first = views[-1] if views else None
    if _op(first) == "repeat_interleave":
        return len(views) == 1 and _arg(first, 2, "dim") in (1, -1)
    return _op(first) == "unsqueeze" and _arg(first, 1, "dim") in (-1, 2)


def _group_score(group_scores: torch.fx.Node) -> tuple[int, torch.fx.Node | None]:
    """``(group_top, the node that reads the grouped choice)``: ``topk(v, n)[0].sum(-1)`` or ``v.amax(-1)``."""
    if _op(group_scores) == "amax" and _arg(group_scores, 1, "dim") in (-1, 2):
        return 1, group_scores
    if _op(group_scores) == "sum" and _arg(group_scores, 1, "dim") in (-1, 2):
        values = group_scores.args[0]
        if _op(values) == "getitem" and values.args[1] == 0 and _op(values.args[0]) == "topk" \
                and _topk_over_last_dim(values.args[0]):
            return _arg(values.args[0], 1, "k"), values.args[0]
    return 0, None


def _weights(gathered: torch.fx.Node, matched: list) -> tuple[torch.fx.Node, bool, float]:
    """Follow the chosen scores through an optional renormalisation ``w / (Σ w [+ ε])`` and scaling ``w · s``."""
    weights, renormalize, scale = gathered, False, 1.0
    totals = [u for u in weights.users if _op(u) == "sum"]
    if len(totals) == 1 and len(weights.users) == 2 and _arg(totals[0], 1, "dim") in (-1, 1) \
            and totals[0].kwargs.get("keepdim") is True:
        denominator = totals[0]
        (reader,) = denominator.users if len(denominator.users) == 1 else (None,)
        if _op(reader) == "add" and isinstance(reader.args[1], float) and 0 <= reader.args[1] < 1e-10:
            denominator, (reader,) = reader, reader.users if len(reader.users) == 1 else (None,)
        if _op(reader) in ("truediv", "div", "itruediv") and reader.args == (weights, denominator):
            matched += [totals[0], denominator, weights]
            weights, renormalize = reader, True
    (reader,) = weights.users if len(weights.users) == 1 else (None,)
    if _op(reader) == "mul" and len(reader.args) == 2 and isinstance(reader.args[1], (int, float)) \
            and reader.args[0] is weights:
        matched.append(weights)
        weights, scale = reader, float(reader.args[1])
    matched.append(weights)
    return weights, renormalize, scale


def _op(node) -> str:
    """What ``node`` computes ("" for a constant or None)."""
    return op_name(node) if isinstance(node, torch.fx.Node) else ""


def _arg(node: torch.fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _getitems(node: torch.fx.Node) -> set:
    """The indices its readers take, or {None} when a reader is not a ``getitem``."""
    return {u.args[1] if u.target is operator.getitem else None for u in node.users}


def _position(graph: torch.fx.Graph):
    order = {node: i for i, node in enumerate(graph.nodes)}
    return lambda node: order[node]


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
