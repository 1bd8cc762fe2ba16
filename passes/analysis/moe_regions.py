"""Find the MoE layers of a Dynamo graph and the role of every node in them.

A layer starts at a *router*: a ``topk`` over the scores of a gate matmul
(``topk(softmax(x @ W_g))``, or a softmax over the top-k logits). From there
the analysis works on dataflow alone, so it does not care how the experts are
written (a loop over experts, one grouped ``bmm``, capacity einsums, an
all-to-all around them):

- *data* nodes depend on the routing decision and on the tokens ``x``
  directly (not only through the gate);
- the layer's *output* is the first node that every data path from every
  point where per-token routing enters the data (dispatch indices, combine
  weights) passes through: the immediate post-dominator of those entry
  points. Auxiliary losses are reduced over tokens, so where they join the
  model's loss is not such a point;
- *expert matmuls* are data matmuls with a weight operand (one that depends
  on neither the tokens nor the routing);
- inside the region, nodes before the expert matmuls are *dispatch*, nodes
  between them *experts*, nodes after them *combine*, and nodes computed
  from the gate alone *router*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import networkx as nx
import torch
import torch.fx

from moe_ascend.passes.analysis.ops import RUNTIME_ASSERTS, is_matmul, is_top_k, op_name

ROLES = ("router", "dispatch", "experts", "combine")
META_KEY = "moe"
_SCORE_OPS = {"softmax", "sigmoid", "log_softmax"}
# Ops that pass their input's values through (shape, dtype, copies): the same tokens or scores.
_PASS_THROUGH_OPS = {"view", "reshape", "flatten", "contiguous", "to", "float", "type", "clone", "squeeze", "unsqueeze"}
# Elementwise transforms of the scores a router selects on (DeepSeek-V3: a selection bias added, the experts of
# groups it did not pick masked out): the scores are whichever input leads back to the gate.
_SCORE_TRANSFORM_OPS = {"add", "sub", "mul", "div", "masked_fill", "where"}


@dataclass
class MoERegion:
    """One recognised MoE layer: its anchor nodes and its nodes by role, in graph order."""

    index: int
    gate: torch.fx.Node
    topk: torch.fx.Node
    tokens: torch.fx.Node
    output: torch.fx.Node
    nodes: dict[str, list[torch.fx.Node]] = field(default_factory=dict)

    def replace(self, old: torch.fx.Node, new: torch.fx.Node | None) -> None:
        """Keep the layer true after a rewrite: ``old`` became ``new`` (or went away, with ``None``)."""
        for role, nodes in self.nodes.items():
            self.nodes[role] = [new if n is old else n for n in nodes if n is not old or new is not None]
        for anchor in ("gate", "topk", "tokens", "output"):
            if getattr(self, anchor) is old and new is not None:
                setattr(self, anchor, new)

    def to_json(self) -> dict:
        return {
            "layer": self.index,
            "gate": self.gate.name,
            "topk": self.topk.name,
            "output": self.output.name,
            **{role: [n.name for n in self.nodes.get(role, [])] for role in ROLES},
        }


def find_moe_layers(
    gm: torch.fx.GraphModule, refuse: Callable[[torch.fx.Node, str, bool], None] = lambda top_k, why, router: None
) -> list[MoERegion]:
    """Every MoE layer of ``gm`` in graph order; each other top-k is ``refuse``d with the reason, and whether it
    is a router's last top-k (so looks like a layer)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    gates = _gates(gm)
    routers = _routers(gates)
    layers: list[MoERegion] = []
    for node, gate in gates.items():
        if node not in routers:
            refuse(node, NOT_OVER_A_GATE if gate is None else f"part of the selection of the router over {gate.name}",
                   False)
            continue
        layer, missing = _layer_from_router(len(layers), gate, node, order)
        if layer is None:
            refuse(node, f"router-like (over gate {gate.name}) but not an MoE layer: {missing}", True)
            continue
        layers.append(layer)
    return layers


NOT_OVER_A_GATE = ("not over a gate's scores (no matmul behind it through softmax or sigmoid and elementwise "
                   "transforms)")


def _gates(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, torch.fx.Node | None]:
    """Every top-k of ``gm``, in graph order, with the gate it selects over (None: it is not over a gate's scores,
    as sampling and metrics are not)."""
    return {node: _gate_of(node) for node in gm.graph.nodes if is_top_k(node)}


def _routers(gates: dict[torch.fx.Node, torch.fx.Node | None]) -> dict[torch.fx.Node, torch.fx.Node]:
    """Each router's last top-k, in graph order, with its gate: the top-ks over one gate are one router's selection
    (group-limited routing picks the groups first; PhiMoE's sparsemixer picks each of its experts with a max, and
    another max sets each one's gradient estimate)."""
    last = {gate: node for node, gate in gates.items() if gate is not None}  # later top-ks overwrite earlier ones
    return {node: gate for node, gate in gates.items() if gate is not None and last[gate] is node}


def cut_routers(gm: torch.fx.GraphModule, layers: list[MoERegion]) -> list[MoERegion]:
    """Routers (a top-k over a gate) of layers this graph holds only the start of, as a graph break cuts a
    dropless layer at its host-read split sizes: no output, the router, and everything after it as dispatch.

    The routing rewrites need only the router; the rest of such a layer is in later graphs.
    """
    whole = {layer.topk for layer in layers}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cut = []
    for node, gate in _routers(_gates(gm)).items():
        if node not in whole:
            after = sorted(descendants([node]), key=order.__getitem__)
            cut.append(MoERegion(len(layers) + len(cut), gate, node, gate.args[0], None,
                                {"router": [gate, node], "dispatch": after, "experts": [], "combine": []}))
    return cut


def annotate(layer: MoERegion) -> None:
    """Write ``{"layer": i, "role": r}`` into ``node.meta["custom"]["moe"]``, the key AOTAutograd keeps (a
    rewrite's own tags there, such as a token group, stay)."""
    for role, nodes in layer.nodes.items():
        for node in nodes:
            custom = node.meta.setdefault("custom", {})
            custom[META_KEY] = {**custom.get(META_KEY, {}), "layer": layer.index, "role": role}


def layers_from_annotations(gm: torch.fx.GraphModule) -> list[dict]:
    """Regroup annotated nodes of any graph (forward, backward) by layer and role."""
    by_layer: dict[int, dict[str, list[str]]] = {}
    for node in gm.graph.nodes:
        tag = (node.meta.get("custom") or {}).get(META_KEY)
        if tag is None:
            continue
        roles = by_layer.setdefault(tag["layer"], {role: [] for role in ROLES})
        roles[tag["role"]].append(node.name)
    return [{"layer": i, **by_layer[i]} for i in sorted(by_layer)]


def _gate_of(topk: torch.fx.Node) -> torch.fx.Node | None:
    """The gate matmul behind a top-k: through score functions, their elementwise transforms and pass-through ops,
    nearest input first."""
    frontier, seen = [topk.args[0]], set()
    while frontier:
        node = frontier.pop(0)
        if not isinstance(node, torch.fx.Node) or node in seen:
            continue
        seen.add(node)
        if is_matmul(node):
            return node
        name = op_name(node)
        if name in _SCORE_OPS | _PASS_THROUGH_OPS:
            frontier.append(node.args[0])
        elif name in _SCORE_TRANSFORM_OPS:
            frontier.extend(node.args)
    return None


def _layer_from_router(
    index: int, gate: torch.fx.Node, topk: torch.fx.Node, order: dict[torch.fx.Node, int]
) -> tuple[MoERegion | None, str]:
    tokens = gate.args[0]
    root = _shape_root(tokens)
    token_side = descendants([root], skip={gate})
    gate_side = descendants([gate]) | {gate}
    output, missing = _layer_output(gate, topk, tokens, token_side, gate_side)
    if output is None:
        return None, missing

    upstream = ancestors(root) | {root}
    region = (ancestors(output) | {output}) - upstream
    region = {n for n in region if n.op not in ("placeholder", "get_attr", "output")}
    # what the selection reads besides the gate (a selection bias) is the router's, not the experts'
    expert_weights = _expert_weight_values(region, upstream | ancestors(gate) | ancestors(topk), token_side)
    data_nodes = region & token_side
    router_nodes = (region & gate_side) - data_nodes - expert_weights
    matmuls = {n for n in data_nodes if is_matmul(n) and any(i in expert_weights for i in n.all_input_nodes)}
    if not matmuls:
        return None, "no matmul with expert weights consumes the dispatched tokens (no experts)"

    roles = _roles(region, data_nodes, router_nodes, matmuls, order)
    nodes = {role: sorted((n for n, r in roles.items() if r == role), key=order.__getitem__) for role in ROLES}
    return MoERegion(index, gate, topk, tokens, output, nodes), ""


def _layer_output(gate, topk, tokens, token_side, gate_side) -> tuple[torch.fx.Node | None, str]:
    """Where every path that carries per-token routing into the tokens meets again, or why there is no such node."""
    data = _without_checks(descendants([topk]) & token_side)
    routing_only = gate_side - token_side
    scores = _numel(gate)
    tokens_routed = scores // int(gate.meta["val"].shape[-1]) if scores else None
    entries = {
        n for n in data if any(i in routing_only and _is_per_token(i, tokens_routed) for i in n.all_input_nodes)
    }
    if not entries:
        return None, "its per-token choices never meet the tokens (no dispatch)"
    output = _convergence_point(data, entries)
    if output is None or output.op == "output":
        if any(user.op == "output" for n in data for user in n.users):
            return None, (
                "its routed tokens leave this graph before the combine: a graph break inside the layer "
                "(split sizes read with .tolist()?); set torch._dynamo.config.capture_scalar_outputs = True "
                "or use capacity (static-shape) dispatch"
            )
        return None, "its routed paths never meet again in one node (no combine)"
    return _back_to_token_shape(output, tokens), ""


def _without_checks(nodes: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """``nodes`` less the runtime asserts on captured sizes and what only feeds them (``u0 >= 0``): they end no
    path the tokens take."""
    kept = {n for n in nodes if op_name(n) not in RUNTIME_ASSERTS}
    only_checked = [n for n in kept if n.users and all(op_name(u) in RUNTIME_ASSERTS for u in n.users)]
    while only_checked:
        kept -= set(only_checked)
        only_checked = [i for n in only_checked for i in n.all_input_nodes
                        if i in kept and all(u not in kept for u in i.users)]
    return kept


def _roles(region, data_nodes, router_nodes, matmuls, order) -> dict[torch.fx.Node, str]:
    """Data before the expert matmuls is dispatch, between them experts, after them combine; weights follow their
    users."""
    after_matmul = descendants(matmuls) & data_nodes
    before_matmul = ancestors_of_set(matmuls) & data_nodes
    roles: dict[torch.fx.Node, str] = {n: "router" for n in router_nodes}
    for n in data_nodes:
        if n in matmuls or (n in after_matmul and n in before_matmul):
            roles[n] = "experts"
        elif n in before_matmul:
            roles[n] = "dispatch"
        else:
            roles[n] = "combine"
    for n in sorted(region - data_nodes - router_nodes, key=order.__getitem__, reverse=True):  # users first
        user_roles = [roles[u] for u in n.users if u in roles]
        roles[n] = next((r for r in ("experts", "dispatch") if r in user_roles), "combine")
    return roles


def _back_to_token_shape(point: torch.fx.Node, tokens: torch.fx.Node) -> torch.fx.Node:
    """Follow the meeting point's sole users until the values are token-shaped again (``[T·k, d]`` summed to
    ``[T, d]``)."""
    node = point
    while _numel(node) != _numel(tokens) and len(node.users) == 1:
        user = next(iter(node.users))
        if user.op not in ("call_function", "call_method"):
            break
        node = user
    return node if _numel(node) == _numel(tokens) else point


def _numel(node: torch.fx.Node) -> int | None:
    val = node.meta.get("val")
    try:
        return int(val.numel())
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None


def _is_per_token(node: torch.fx.Node, tokens: int | None) -> bool:
    """Routing values that still have a value per token (choices, weights, masks), not statistics reduced over
    tokens."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    try:
        return tokens is None or int(val.numel()) >= tokens
    except (TypeError, ValueError, RuntimeError):  # symbolic sizes: keep it
        return True


def _shape_root(node: torch.fx.Node) -> torch.fx.Node:
    """Walk up pass-through ops, so ``x`` and ``x.view(-1, d)`` count as the same tokens."""
    while op_name(node) in _PASS_THROUGH_OPS and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def descendants(starts: Iterable[torch.fx.Node], skip: set[torch.fx.Node] = frozenset()) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = [u for s in starts for u in s.users if u not in skip]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(u for u in node.users if u not in skip and u not in seen)
    return seen


def ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    return ancestors_of_set([node])


def ancestors_of_set(nodes: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = [i for n in nodes for i in n.all_input_nodes]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def _convergence_point(data: set[torch.fx.Node], entries: set[torch.fx.Node]) -> torch.fx.Node | None:
    """The first node that every data path from every point where routing enters passes through."""
    source, sink = "source", "sink"
    graph = nx.DiGraph()
    for node in entries:
        graph.add_edge(source, node)
    for node in data:
        inner_users = [u for u in node.users if u in data]
        if not inner_users:
            graph.add_edge(node, sink)
        for user in inner_users:
            graph.add_edge(node, user)
    post_dominators = nx.immediate_dominators(graph.reverse(copy=False), sink)
    point = post_dominators.get(source)
    return None if point in (None, sink) else point


def _expert_weight_values(
    region: set[torch.fx.Node], before_layer: set[torch.fx.Node], token_side: set[torch.fx.Node]
) -> set[torch.fx.Node]:
    """Values computed from the layer's own parameters and not from its tokens: ``w1``, ``w1[e]``, ``w1[expert_ids]``.

    The layer's parameters are the graph inputs its region reads that neither the
    tokens, the gate nor the router's top-k were computed from.
    """
    sources = {
        i for n in region for i in n.all_input_nodes
        if i.op in ("placeholder", "get_attr") and i not in before_layer
    }
    return (sources | descendants(sources)) - token_side
