"""Where a recognised MoE layer exchanges tokens with the experts' ranks: the flat capacity exchange.

The passes that rebuild an exchange (``hierarchical_a2a``, ``chunk_for_overlap``)
start from the same few nodes of a capacity-mode layer::

    dispatched, slots = capacity_dispatch(tokens, expert_ids, scores, E, C, policy)   # [E, C, d]
    expert_in  = <all-to-all, then [W, E/W, C, d] → [E/W, W·C, d]>(dispatched)        # the experts' input
    expert_out = <experts>(expert_in)                                                 # row by row
    out        = capacity_combine(<[E/W, W·C, d] → all-to-all → [E, C, d]>(expert_out), slots, weights)

``capacity_exchange`` finds them, or says in one sentence why a layer has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
import torch.fx

from moe_ascend.passes.analysis.ops import collective_group, is_collective, op_name


NOT_CAPACITY = ("it is not a capacity_dispatch/capacity_combine layer (a dropless layer's split sizes split its "
                "exchange across graphs)")


@dataclass
class CapacityExchange:
    """The nodes of one flat capacity exchange, and its sizes."""

    dispatch: torch.fx.Node  # capacity_dispatch
    combine: torch.fx.Node  # capacity_combine
    expert_in: torch.fx.Node  # the experts' [E/W, W·C, d] input, after the all-to-all
    expert_user: torch.fx.Node  # the expert node that reads it
    expert_out: torch.fx.Node  # the experts' output, before the all-to-all back
    group: str  # the expert-parallel process group's name
    ep_size: int
    num_experts: int
    capacity: int

    @property
    def dispatched(self) -> torch.fx.Node:
        """The ``[E, C, d]`` buffer: ``capacity_dispatch(...)[0]``."""
        return next(u for u in self.dispatch.users if u.args[1] == 0)


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
    experts = set(layer.nodes.get("experts", []))
    entries = [(a, user) for user in experts for a in user.all_input_nodes if roles.get(a) == "dispatch"]
    exits = [n for n in experts if any(roles.get(u) == "combine" for u in n.users)]
    if len(entries) != 1 or len(exits) != 1:
        return "its experts do not have one input from the dispatch and one output to the combine"
    (expert_in, expert_user), expert_out = entries[0], exits[0]
    order = {n: i for i, n in enumerate(dispatch.graph.nodes)}
    if order[combine.args[2]] > order[expert_user]:
        return "its combine weights are computed after the experts start; the dispatch needs them"
    group = groups.pop()
    ep_size = dist.get_world_size(dist.distributed_c10d._resolve_process_group(group))
    num_experts, capacity = dispatch.args[3], dispatch.args[4]
    want = (num_experts // ep_size, ep_size * capacity)
    if num_experts % ep_size or tuple(expert_in.meta["val"].shape[:2]) != want or tuple(expert_out.meta["val"].shape[:2]) != want:
        return f"its experts' input is not the flat exchange's [E/W, W*C, d] = [{want[0]}, {want[1]}, d]"
    return CapacityExchange(dispatch, combine, expert_in, expert_user, expert_out, group, ep_size, num_experts, capacity)
