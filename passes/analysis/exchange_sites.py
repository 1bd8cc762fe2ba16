"""Where a recognised MoE layer exchanges tokens with the experts' ranks: the flat capacity exchange.

The passes that rebuild an exchange (``hierarchical_a2a``, ``chunk_for_overlap``)
start from the same few nodes of a capacity-mode layer::

    dispatched, slots = capacity_dispatch(tokens, expert_ids, scores, E, C, policy)   # [E, C, d]
    expert_in  = <all-to-all, then [W, E/W, C, d] → [E/W, W·C, d]>(dispatched)        # the experts' input
    expert_out = <experts>(expert_in)                                                 # row by row
    out        = capacity_combine(<[E/W, W·C, d] → all-to-all → [E, C, d]>(expert_out), slots, weights)

``capacity_exchange`` finds them, or says in one sentence why a layer has none.
After ``hierarchical_a2a`` the exchange is two kernel calls instead
(``hierarchical_exchange``; after ``chunk_for_overlap`` a pair per chunk, ``hierarchical_exchanges``)::

    dispatch = hierarchical.capacity_dispatch(tokens, expert_ids, weights, scores, E, C, policy, hierarchy)
    expert_out = <experts>(dispatch[0])
    out = hierarchical.capacity_combine(expert_out, dispatch[1], hierarchy)

The experts are every node between the exchange's own reshapes on either side,
whatever role the recogniser gave them: a rewrite that rebuilds the exchange
must carry them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
import torch.fx

from moe_ascend.kernels import hierarchical
from moe_ascend.passes.analysis.moe_regions import ancestors, descendants
from moe_ascend.passes.analysis.ops import collective_group, is_collective, op_name


# What the exchange itself does to the buffer on either side of its all-to-all.
LAYOUT_OPS = frozenset({"wait_tensor", "reshape", "view", "transpose", "permute", "contiguous", "flatten", "unflatten"})
NOT_CAPACITY = ("it is not a capacity_dispatch/capacity_combine layer (a dropless layer's split sizes split its "
                "exchange across graphs)")


@dataclass
class CapacityExchange:
    """The nodes of one flat capacity exchange, and its sizes."""

    dispatch: torch.fx.Node  # capacity_dispatch
    combine: torch.fx.Node  # capacity_combine
    expert_in: torch.fx.Node  # the experts' [E/W, W·C, d] input: the all-to-all's output, reshaped
    experts: tuple[torch.fx.Node, ...]  # what computes expert_out from expert_in, in graph order
    expert_out: torch.fx.Node  # the experts' output, before the reshapes and the all-to-all back
    group: str  # the expert-parallel process group's name
    ep_size: int
    num_experts: int
    capacity: int

    @property
    def dispatched(self) -> torch.fx.Node:
        """The ``[E, C, d]`` buffer: ``capacity_dispatch(...)[0]``."""
        return next(u for u in self.dispatch.users if u.args[1] == 0)


@dataclass
class HierarchicalExchange:
    """The nodes of one two-step capacity exchange (``hierarchical_a2a``'s), and its sizes."""

    dispatch: torch.fx.Node  # hierarchical.capacity_dispatch
    combine: torch.fx.Node  # hierarchical.capacity_combine
    expert_in: torch.fx.Node  # dispatch[0], the experts' [E/W, W·C, d] input
    plan: torch.fx.Node  # dispatch[1]
    experts: tuple[torch.fx.Node, ...]
    expert_out: torch.fx.Node
    ep_size: int
    num_experts: int
    capacity: int


def hierarchical_exchange(layer) -> HierarchicalExchange | None:
    """The layer's two-step capacity exchange, if it has one (whole: not yet split into chunks)."""
    dispatch = capacity_dispatch(layer)
    if dispatch is None or dispatch.target is not hierarchical.capacity_dispatch or dispatch.kwargs:
        return None
    return _two_step_from(dispatch)


def hierarchical_exchanges(layer) -> list[HierarchicalExchange]:
    """Each two-step exchange of the layer: its one, or after ``chunk_for_overlap`` one per chunk (a window of each
    expert's slots, ``capacity`` its width); none unless every two-step dispatch of the layer has its exchange."""
    dispatches = [n for n in layer.nodes.get("dispatch", []) if n.target is hierarchical.capacity_dispatch]
    found = [_two_step_from(dispatch) for dispatch in dispatches]
    return found if found and all(found) else []


def _two_step_from(dispatch: torch.fx.Node) -> HierarchicalExchange | None:
    """The two-step exchange that ``dispatch`` (a ``hierarchical.capacity_dispatch``) starts."""
    parts = {u.args[1]: u for u in dispatch.users if op_name(u) == "getitem"}
    if set(parts) != {0, 1} or len(dispatch.users) != 2:
        return None
    combines = [u for u in parts[1].users if u.target is hierarchical.capacity_combine and u.args[1] is parts[1]]
    if len(combines) != 1 or len(parts[1].users) != 1:
        return None
    combine = combines[0]
    experts = _between(parts[0], combine.args[0])
    hierarchy, window = dispatch.args[7], dispatch.kwargs.get("slots")
    capacity = dispatch.args[5] if window is None else window[1] - window[0]
    return HierarchicalExchange(dispatch, combine, parts[0], parts[1], experts, combine.args[0],
                                hierarchy.world_size, dispatch.args[4], capacity)


def capacity_dispatch(layer) -> torch.fx.Node | None:
    """The layer's capacity dispatch, flat or two-step, if it has one."""
    return next((n for n in layer.nodes.get("dispatch", []) if op_name(n) == "capacity_dispatch"
                 or n.target is hierarchical.capacity_dispatch), None)


def capacity_at(dispatch: torch.fx.Node) -> tuple[int, int]:
    """Where the capacity is among a capacity dispatch's arguments, ``(…, scores, E, C, policy[, hierarchy])``
    (the two-step one takes its weights first), and its value."""
    at = 5 if dispatch.target is hierarchical.capacity_dispatch else 4
    return at, dispatch.args[at]


def exchange_collectives(layer) -> list[torch.fx.Node]:
    """The layer's all-to-alls, in graph order."""
    return [n for role in ("dispatch", "experts", "combine") for n in layer.nodes.get(role, [])
            if is_collective(n) and op_name(n) == "all_to_all_single"]


def capacity_exchange(layer) -> CapacityExchange | str:
    """The layer's flat exchange, or why it has none ("" when it exchanges nothing: one rank)."""
    roles = {n: role for role, nodes in layer.nodes.items() for n in nodes}
    collectives = exchange_collectives(layer)
    if not collectives:
        return ""
    dispatches = [n for n in roles if op_name(n) == "capacity_dispatch"]
    combines = [n for n in roles if op_name(n) == "capacity_combine"]
    if len(dispatches) != 1 or len(combines) != 1:
        return NOT_CAPACITY
    dispatch, combine = dispatches[0], combines[0]
    groups = {collective_group(n) for n in collectives}
    if len(collectives) != 2 or len(groups) != 1:
        return f"it has {len(collectives)} all-to-alls; one dispatch and one combine on one group are expected"
    expert_in, expert_out = _received(collectives[0]), _sent(collectives[1])
    experts = _between(expert_in, expert_out)
    if not experts or any(roles.get(n) not in ("dispatch", "experts", "combine") for n in experts):
        return "its experts do not lie between its dispatch's all-to-all and its combine's"
    order = {n: i for i, n in enumerate(dispatch.graph.nodes)}
    if order[combine.args[2]] > order[experts[0]]:
        return "its combine weights are computed after the experts start; the dispatch needs them"
    group = groups.pop()
    ep_size = dist.get_world_size(dist.distributed_c10d._resolve_process_group(group))
    num_experts, capacity = dispatch.args[3], dispatch.args[4]
    want = (num_experts // ep_size, ep_size * capacity)
    if (num_experts % ep_size or tuple(expert_in.meta["val"].shape[:2]) != want
            or tuple(expert_out.meta["val"].shape[:2]) != want):
        return f"its experts' input is not the flat exchange's [E/W, W*C, d] = [{want[0]}, {want[1]}, d]"
    return CapacityExchange(dispatch, combine, expert_in, experts, expert_out, group, ep_size, num_experts, capacity)


def _received(all_to_all: torch.fx.Node) -> torch.fx.Node:
    """The dispatch's all-to-all output after the exchange's own reshapes (they have one user each)."""
    node = all_to_all
    while len(node.users) == 1 and op_name(next(iter(node.users))) in LAYOUT_OPS:
        node = next(iter(node.users))
    return node


def _sent(all_to_all: torch.fx.Node) -> torch.fx.Node:
    """What the combine's all-to-all sends, before the exchange's own reshapes."""
    node = all_to_all.args[0]
    while isinstance(node, torch.fx.Node) and op_name(node) in LAYOUT_OPS and len(node.users) == 1:
        node = node.args[0]
    return node


def _between(start: torch.fx.Node, end: torch.fx.Node) -> tuple[torch.fx.Node, ...]:
    """The nodes that depend on ``start`` and that ``end`` depends on (``end`` included), in graph order."""
    inside = descendants([start]) & (ancestors(end) | {end})
    return tuple(n for n in start.graph.nodes if n in inside)
