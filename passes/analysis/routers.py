"""A recognised layer's router in the canonical form the routing rewrites start from.

    logits = linear(tokens, gate_weight)                      # no bias
    weights, expert_ids = topk_softmax(logits, k, renormalize)
      or   weights, expert_ids = topk_sigmoid(logits, k, bias, groups, top_groups, group_top, renormalize, scale)

``canonicalise`` puts ``topk(softmax(logits))`` and DeepSeek-V3's sigmoid
routers in this form; ``canonical_router`` finds it, or says in one sentence
why a layer's router is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx

from moe_ascend.passes.analysis.ops import op_name


@dataclass
class Router:
    """The nodes and settings of one canonical router."""

    op: torch.fx.Node  # topk_softmax or topk_sigmoid
    logits: torch.fx.Node  # the gate's output [T, E]
    tokens: torch.fx.Node  # what the gate reads [T, d]
    gate_weight: torch.fx.Node  # [E, d]
    k: int
    renormalize: bool

    @property
    def num_experts(self) -> int:
        return self.logits.meta["val"].shape[-1]

    @property
    def score(self) -> str:
        """``"softmax"`` or ``"sigmoid"``: what the router turns logits into."""
        return SCORES[op_name(self.op)]


SCORES = {"topk_softmax": "softmax", "topk_sigmoid": "sigmoid"}


def routed_layers(ctx) -> list:
    """The layers whose router a routing rewrite may change: whole layers, and layers a graph break cut after the
    router."""
    return ctx.analyses.get("moe_layers", []) + ctx.analyses.get("cut_routers", [])


def rewritable_routers(ctx, why_not: Callable[[object, Router], str] = lambda layer, router: ""):
    """``(layer, router)`` for each routed layer whose router is canonical and ``why_not`` has nothing against;
    each other layer gets one warning that it keeps its router, and why."""
    for layer in routed_layers(ctx):
        router = canonical_router(layer)
        why = router if isinstance(router, str) else why_not(layer, router)
        if why:
            ctx.logger.warning("%s: MoE layer %d keeps its router (routing=%r): %s", ctx.graph_name, layer.index,
                               ctx.options.routing, why)
            continue
        yield layer, router


def canonical_router(layer) -> Router | str:
    """The layer's router, or why it is not ``topk_softmax`` or ``topk_sigmoid`` of ``linear(tokens, gate_weight)``."""
    topk = layer.topk
    if op_name(topk) not in SCORES:
        return ("its router is neither softmax then top-k nor DeepSeek-V3's sigmoid form over fp32 logits "
                "(the forms canonicalise rewrites)")
    logits, k = topk.args[:2]
    renormalize = topk.args[2] if op_name(topk) == "topk_softmax" else topk.args[6]
    if (op_name(logits) != "linear" or logits.kwargs or len(logits.args) > 3
            or (len(logits.args) == 3 and logits.args[2] is not None)):
        return "its gate is not a linear layer without bias (the affinity is a cosine with the gate's rows)"
    tokens, gate_weight = logits.args[:2]
    if tokens.meta["val"].dim() != 2:
        return "its gate does not read a [tokens, d] matrix"
    return Router(topk, logits, tokens, gate_weight, k, renormalize)
