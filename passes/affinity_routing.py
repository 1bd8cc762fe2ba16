"""affinity_routing (pre_grad, changes numerics): experts and tokens meet by affinity (LocMoE+), token choice first,
expert choice with a small capacity once the affinity has settled.

On with ``options={"routing": "affinity"}``. A token's affinity to an expert is
δ = cos(token, the gate's row), or against LocMoE's fixed GrAP blocks with
``routing_options={"gate": "grap"}`` (``moe_ascend.kernels.affinity``).

- Token choice (TCR, the first phase): each token takes its k most affine
  experts; its weights are the gate's softmax there, renormalised as the layer
  asked, so the gate keeps learning through its logits. Every capacity and
  exchange of the layer stays as it was.
- Expert choice (ECR): of the tokens that chose it, each expert keeps its best
  ``C`` by δ (the capacity dispatch's ``"score"`` policy with δ as the score),
  ``C`` from LocMoE's lower bound at the least affinity of a chosen pair, at
  least ``ceil(T / E)`` (fewer slots than tokens leaves tokens with no expert
  for certain) and at most the layer's own capacity. Shapes stay static
  (``[E, C, d]``); a pair that is dropped adds nothing (the residual carries it).
  Capacity layers only: a dropless layer stays in token choice.

The switch: LocMoE+ (Corollary 6) shows that expert choice with C slots succeeds
once ``C ≥ 2·T·q`` (T tokens a step), q the probability that a token unrelated
to an expert outranks a relevant one, while token choice is better as long as q
is of order one. LocMoE's analysis takes unrelated tokens to be random
directions, ``q(δ) = ½·(1 − I_{δ²}(½, (d−1)/2))`` at a relevant affinity δ
(``outrank_probability``); real hidden states are not (in the routing benchmark,
d = 64, q(mean affinity) stays between 0.1 and 0.4 while the measured q falls
from 0.06 to between 0.004 and 0.05), so q is measured instead: each
token-choice step counts, for each expert, how often a token that did not choose
it first has the higher δ than one that did
(``kernels.affinity.outranked_share``), and folds that, with the chosen pairs'
mean and least affinity, into the layer's state. (Choosing by δ already puts an
expert's first-choice tokens high in its column, so even a random gate measures
q well below ½.) Once ``2·T·q ≤ C`` for the expert-choice capacity C (after ten
steps of warm-up), the layer switches to expert choice. The state is a buffer
``affinity_routing`` of the gate module, so checkpoints carry it
(``add_routing_state`` makes it before a checkpoint is loaded into a fresh
model); the switch, and a checkpoint that brings a switched state, recompile the
graph once (``compiler.routing_phases``).
``routing_options={"phase": "token_choice" | "expert_choice"}`` fixes the phase.

Before::

    linear = torch._C._nn.linear(tokens, gate_weight)
    topk_softmax = torch.ops.moe_ascend.topk_softmax.default(linear, 2, True)
    weights = topk_softmax[0];  expert_ids = topk_softmax[1]
    capacity_dispatch = torch.ops.moe_ascend.capacity_dispatch.default(tokens, expert_ids, weights, 4, 6, 'position')

After, token choice::

    affinity_routing = moe_ascend.kernels.affinity.affinity_top_k(tokens, gate_weight, linear, 2, True)
    weights = affinity_routing[0];  expert_ids = affinity_routing[1];  delta = affinity_routing[2]
    observe_affinity = torch.ops.moe_ascend.observe_affinity.default(affinity_routing_state_0, delta, expert_ids)
    capacity_dispatch = torch.ops.moe_ascend.capacity_dispatch.default(tokens, expert_ids, weights, 4, 6, 'position')

After, expert choice (C = 3)::

    affinity_routing = moe_ascend.kernels.affinity.affinity_top_k(tokens, gate_weight, linear, 2, True)
    weights = affinity_routing[0];  expert_ids = affinity_routing[1];  delta = affinity_routing[2]
    chosen_affinity = delta.gather(1, expert_ids)
    capacity_dispatch = torch.ops.moe_ascend.capacity_dispatch.default(tokens, expert_ids, chosen_affinity, 4, 3,
                                                                       'score')

LocMoE (arXiv 2401.13920) bounds the capacity from below: when a token's
affinity to its relevant expert exceeds δ, and an unrelated token's cosine with
a gate row is that of a random direction in d dimensions (``δ²`` is Beta(½, (d−1)/2)
distributed), an expert among ``n`` needs at least

    exact:  1 / (n · (1 − I_{δ²}(½, (d−1)/2)))     (I: the regularised incomplete beta)
    exp:    (1/n) · exp(d·δ² / (2 − δ²))           (the paper's closed-form estimate)

slots: ``capacity_lower_bound``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from moe_ascend.kernels import affinity as kernels
from moe_ascend.kernels.errors import PassError
from moe_ascend.passes.analysis.exchange_sites import (CapacityExchange, capacity_at, capacity_dispatch,
                                                       capacity_exchange)
from moe_ascend.passes.analysis.moe_regions import descendants
from moe_ascend.passes.analysis.ops import module_holding
from moe_ascend.passes.analysis.routers import Router, rewritable_routers
from moe_ascend.passes.infra import (PassContext, PassResult, infer_meta, register_pass, replace_node,
                                    shape_generic_exchange)

STATE = kernels.STATE


@dataclass
class RoutedLayer:
    """What the phase switch needs of one layer routed by affinity: its state's owner and its sizes."""

    owner: nn.Module  # holds the state buffer
    tokens: int
    width: int
    num_experts: int
    capacity: int  # the layer's own slots per expert
    phase: float  # the phase this graph was compiled for
    form: str = "exact"  # of the capacity bound

    @property
    def state(self) -> torch.Tensor:
        return getattr(self.owner, STATE)


@register_pass(name="affinity_routing", stage="pre_grad", after=("find_moe", "canonicalise", "hierarchical_a2a"),
               before=("chunk_for_overlap",), roles=("dynamo",), changes_numerics=True,
               enabled=lambda options: options.routing == "affinity")
def affinity_routing(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    fixed_phase = ctx.options.routing_option("phase")
    modified = False
    for layer, router in rewritable_routers(ctx, _not_softmax):
        owner = state_owner(router.gate_weight)
        if owner is None and fixed_phase == "auto":
            ctx.logger.warning("%s: MoE layer %d stays in token choice: its gate module is not found, so it has no "
                               "state to switch by; fix the phase with routing_options={'phase': ...}",
                               ctx.graph_name, layer.index)
        phase = _phase(fixed_phase, owner)
        routed = _route_by_affinity(gm, layer, router, ctx)
        expert_ids, delta = _output(gm, routed, 1, "expert_ids"), _output(gm, routed, 2, "delta")
        dispatch = capacity_dispatch(layer)
        if dispatch is None:
            ctx.logger.info("%s: MoE layer %d stays in token choice: expert choice needs a capacity dispatch",
                            ctx.graph_name, layer.index)
        elif phase == kernels.TOKEN_CHOICE and fixed_phase == "auto" and owner is not None:
            _observe(gm, layer, gate_key(router.gate_weight), delta, expert_ids)
            ctx.analyses.setdefault("affinity_layers", []).append(
                RoutedLayer(owner, *router.tokens.meta["val"].shape, router.num_experts, capacity_at(dispatch)[1],
                            phase, ctx.options.routing_option("bound")))
        elif phase == kernels.EXPERT_CHOICE:
            _expert_choice(gm, layer, router, dispatch, owner, delta, expert_ids, ctx)
        modified = True
    return PassResult(gm, modified)


def _not_softmax(layer, router: Router) -> str:
    if router.score != "softmax":
        return f"affinity routing needs a softmax router, this one is {router.score}"
    return ""


def _phase(fixed_phase: str, owner: nn.Module | None) -> float:
    if fixed_phase != "auto":
        return kernels.EXPERT_CHOICE if fixed_phase == "expert_choice" else kernels.TOKEN_CHOICE
    return float(getattr(owner, STATE)[kernels.PHASE]) if owner is not None else kernels.TOKEN_CHOICE


def _route_by_affinity(gm: torch.fx.GraphModule, layer, router: Router, ctx: PassContext) -> torch.fx.Node:
    """``topk_softmax(logits, k, r)`` → ``affinity_top_k(tokens, gate rows, logits, k, r)``."""
    graph = gm.graph
    with graph.inserting_before(router.op):
        rows = router.gate_weight
        if ctx.options.routing_option("gate") == "grap":
            width = router.tokens.meta["val"].shape[1]
            rows = graph.create_node("call_function", kernels.grap_gate, (width, router.num_experts, router.tokens),
                                     name="grap_gate")
            infer_meta(rows, ctx.fake_mode)
            layer.nodes["router"].append(rows)
        routed = graph.create_node("call_function", kernels.affinity_top_k,
                                   (router.tokens, rows, router.logits, router.k, router.renormalize),
                                   name="affinity_routing")
    replace_node(gm, router.op, routed, ctx, layer)
    return routed


def _output(gm: torch.fx.GraphModule, routed: torch.fx.Node, index: int, name: str) -> torch.fx.Node:
    """``routed[index]``: the existing getitem, or a new one."""
    for user in routed.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    with gm.graph.inserting_after(routed):
        node = gm.graph.create_node("call_function", operator.getitem, (routed, index), name=name)
    infer_meta(node)
    return node


def _later(gm: torch.fx.GraphModule, *nodes: torch.fx.Node) -> torch.fx.Node:
    """The one of ``nodes`` the graph computes last: what reads them all goes after it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return max(nodes, key=order.__getitem__)


def _observe(gm: torch.fx.GraphModule, layer, key: int, delta: torch.fx.Node, expert_ids: torch.fx.Node) -> None:
    """Each step folds its chosen pairs' affinity into the state of the gate registered under ``key``."""
    with gm.graph.inserting_after(_later(gm, delta, expert_ids)):
        observe = gm.graph.call_function(torch.ops.moe_ascend.observe_affinity.default,
                                         (delta, expert_ids, key))
    infer_meta(observe)
    layer.nodes["router"].append(observe)


def _expert_choice(gm, layer, router: Router, dispatch, owner, delta, expert_ids, ctx: PassContext) -> None:
    """The layer's capacity dispatch keeps each expert's best C choosers by δ; the shapes after it follow C."""
    site = capacity_exchange(layer)  # before the capacity changes: its shapes are checked against it
    at, layer_capacity = capacity_at(dispatch)
    tokens, width = router.tokens.meta["val"].shape
    state = getattr(owner, STATE) if owner is not None else None
    capacity = kernels.expert_choice_capacity(tokens, width, router.num_experts, layer_capacity, state,
                                      ctx.options.routing_option("bound"))
    with gm.graph.inserting_after(_later(gm, delta, expert_ids)):
        scores = gm.graph.create_node("call_method", "gather", (delta, 1, expert_ids), name="chosen_affinity")
    infer_meta(scores)
    layer.nodes["router"].append(scores)
    args = list(dispatch.args)
    args[at - 2], args[at], args[at + 1] = scores, capacity, "score"
    dispatch.args = tuple(args)
    if isinstance(site, CapacityExchange):
        shape_generic_exchange(gm.graph, site, layer)
    _shapes_follow(gm, dispatch, layer, ctx)
    ctx.logger.info("%s: MoE layer %d routes by expert choice, %d slots per expert (%s)", ctx.graph_name, layer.index,
                    capacity, _bounds_line(tokens, width, router.num_experts, layer_capacity, state))


def _bounds_line(tokens: int, width: int, num_experts: int, layer_capacity: int, state) -> str:
    """What C was chosen from: LocMoE's bound in both forms at the least chosen affinity, the floor and the ceiling."""
    least = kernels.least_affinity(state)
    bounds = (", ".join(f"{form} {kernels.capacity_lower_bound(least, width, num_experts, form):.4g}"
                        for form in kernels.FORMS)
              if 0 < least < 1 else "none: no affinity observed in (0, 1)")
    return (f"LocMoE's bound at the least chosen affinity {least:.3f}: {bounds}; floor ceil(T/E) = "
            f"{math.ceil(tokens / num_experts)}, the layer's own {layer_capacity}")


def _shapes_follow(gm: torch.fx.GraphModule, dispatch: torch.fx.Node, layer, ctx: PassContext) -> None:
    """Work out again every value downstream of the dispatch; one that cannot follow the new capacity is an error."""
    downstream = descendants([dispatch]) | {dispatch}
    for node in gm.graph.nodes:
        if node in downstream and node.op in ("call_function", "call_method"):
            try:
                infer_meta(node, ctx.fake_mode)
            except Exception as exc:
                raise PassError(
                    f"MoE layer {layer.index}: {node.name} cannot follow the expert-choice capacity ({exc}); "
                    "keep token choice with routing_options={'phase': 'token_choice'}",
                    pass_name="affinity_routing", stage=ctx.stage, graph=ctx.graph_name) from exc


def settled(layer: RoutedLayer, state: torch.Tensor) -> bool:
    """Expert choice is due (``state``: the layer's, on the host): warmed up, and its capacity C holds twice the
    tokens expected to outrank a relevant one, ``2·T·q <= C``, q measured (LocMoE+, Corollary 6)."""
    outranked = kernels.running_affinity(state)[2]
    capacity = kernels.expert_choice_capacity(layer.tokens, layer.width, layer.num_experts, layer.capacity, state,
                                              layer.form)
    return float(state[kernels.STEPS]) >= kernels.WARM_UP_STEPS and 2 * layer.tokens * outranked <= capacity


def gate_key(gate_weight: torch.fx.Node) -> int:
    """The registry's key for the graph's gate weight (see ``kernels.affinity.register_gate``)."""
    return id(gate_weight.meta["grapharg"].example)


def state_owner(gate_weight: torch.fx.Node) -> nn.Module | None:
    """The gate module holding the graph's gate weight (its state lives there): registered, or found while Dynamo
    traces from its record of where the parameter came from."""
    grapharg = gate_weight.meta.get("grapharg")
    if grapharg is None or not isinstance(grapharg.example, nn.Parameter):
        return None
    parameter = grapharg.example
    owner = kernels.registered_gate(parameter) or module_holding(grapharg.source)
    if owner is not None:
        kernels.register_gate(parameter, owner)
    return owner
