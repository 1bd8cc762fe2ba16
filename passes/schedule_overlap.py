"""schedule_overlap (post_grad, forward and backward): issue collectives early, wait late, compute in between.

A list scheduler walks the graph's dataflow with the cost model's clock: a
compute lane, and a link on which each issued collective takes its estimated
time. At every step it takes, in this order of preference:

1. a collective whose inputs are ready and whose group has issued all its
   earlier collectives (each group keeps its order: every rank issues the same
   sequence, so nothing deadlocks);
2. a node that costs nothing (a view, a getitem);
3. a wait whose collective has finished by now;
4. compute that leads to a collective not yet issued, the earliest first
   (the experts of chunk ``i`` before the combine of chunk ``i`` can go);
5. any other compute, in graph order (shared experts, weight gradients):
   what fills the time a collective is in flight;
6. only then a wait that stalls, on the collective that ends first.

So the dispatch of chunk ``i+1`` is in flight while the experts of chunk ``i``
compute, and its wait comes after them, in the forward and in the backward.
Nodes with side effects keep their order among themselves.

Before (chunked by ``chunk_for_overlap``, as AOTAutograd writes it)::

    all_to_all_single = _c10d_functional.all_to_all_single.default(view_1, [6, 6], [6, 6], '0')
    wait_tensor = _c10d_functional.wait_tensor.default(all_to_all_single)
    ...
    all_to_all_single_1 = _c10d_functional.all_to_all_single.default(view_4, [6, 6], [6, 6], '0')
    wait_tensor_1 = _c10d_functional.wait_tensor.default(all_to_all_single_1)
    ...
    grouped_mm_batched = moe_ascend.grouped_mm_batched.default(view_3, primals_3)

After::

    all_to_all_single = _c10d_functional.all_to_all_single.default(view_1, [6, 6], [6, 6], '0')
    all_to_all_single_1 = _c10d_functional.all_to_all_single.default(view_4, [6, 6], [6, 6], '0')
    mm_1 = aten.mm.default(view, permute_5)            # shared experts, while both are in flight
    wait_tensor = _c10d_functional.wait_tensor.default(all_to_all_single)
    grouped_mm_batched = moe_ascend.grouped_mm_batched.default(view_3, primals_3)
    ...
    all_to_all_single_2 = _c10d_functional.all_to_all_single.default(view_8, [6, 6], [6, 6], '0')
    wait_tensor_1 = _c10d_functional.wait_tensor.default(all_to_all_single_1)
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import torch.fx

from moe_ascend.passes.analysis.ops import collective_group, is_collective, is_wait
from moe_ascend.passes.infra import PassContext, PassResult, register_pass

COLLECTIVE, FREE, DONE_WAIT, URGENT, OTHER, STALL = range(6)


@register_pass(name="schedule_overlap", stage="post_grad", before=("verify_collectives",),
               roles=("forward", "backward", "inference"))
def schedule_overlap(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.options.overlap is False or ctx.cost_model is None or not any(is_collective(n) for n in gm.graph.nodes):
        return PassResult(gm, False)  # nothing to hide, or no clock to schedule by
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    order = overlap_order(body, ctx.cost_model)
    if order == body:
        return PassResult(gm, False)
    anchor = body[0].prev
    for node in order:
        anchor.append(node)
        anchor = node
    return PassResult(gm, True)


def overlap_order(body: list[torch.fx.Node], cost_model) -> list[torch.fx.Node]:
    """The nodes of ``body`` (a graph without its placeholders and output) in overlap order."""
    position = {n: i for i, n in enumerate(body)}
    after = _ordering_edges(body)
    waiting_on = {n: len(after[n]) for n in body}
    users: dict[torch.fx.Node, list[torch.fx.Node]] = defaultdict(list)
    for node in body:
        for pred in after[node]:
            users[pred].append(node)
    next_collective = _next_collective(body, position)
    cost = {n: 0.0 if is_wait(n) or is_collective(n) else cost_model.compute_seconds(n) for n in body}

    now = link_free = 0.0
    finishes: dict[torch.fx.Node, float] = {}
    ready: list[tuple] = []  # a heap of the nodes whose priority does not change
    ready_waits: list[torch.fx.Node] = []  # a wait's priority depends on the clock
    order: list[torch.fx.Node] = []

    def priority(node: torch.fx.Node) -> tuple:
        if is_collective(node):
            return (COLLECTIVE, position[node])
        if is_wait(node):
            end = finishes.get(node.args[0], now)  # a wait on a value already waited for is done at once
            return (DONE_WAIT if end <= now else STALL, end, position[node])
        if cost[node] == 0.0:
            return (FREE, position[node])
        if next_collective[node] is not None:
            return (URGENT, next_collective[node], position[node])
        return (OTHER, position[node])

    def make_ready(node: torch.fx.Node) -> None:
        if is_wait(node):
            ready_waits.append(node)
        else:
            heapq.heappush(ready, (priority(node), node))

    def take() -> torch.fx.Node:
        wait = min(ready_waits, key=priority, default=None)
        if wait is not None and (not ready or priority(wait) < ready[0][0]):
            ready_waits.remove(wait)
            return wait
        return heapq.heappop(ready)[1]

    for node in body:
        if waiting_on[node] == 0:
            make_ready(node)
    while ready or ready_waits:
        node = take()
        order.append(node)
        if is_collective(node):
            start = max(now, link_free)
            link_free = finishes[node] = start + cost_model.collective_seconds(node)
        elif is_wait(node):
            now = max(now, finishes.get(node.args[0], now))
        else:
            now += cost[node]
        for user in users[node]:
            waiting_on[user] -= 1
            if waiting_on[user] == 0:
                make_ready(user)
    return order


def _ordering_edges(body: list[torch.fx.Node]) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """What each node must come after: its inputs, its group's previous collective, the previous impure node."""
    members = set(body)
    after = {n: [i for i in n.all_input_nodes if i in members] for n in body}
    last_of_group: dict[str, torch.fx.Node] = {}
    last_impure = None
    for node in body:
        if is_collective(node):
            group = collective_group(node)
            if group in last_of_group:
                after[node].append(last_of_group[group])
            last_of_group[group] = node
        elif not is_wait(node) and node.is_impure():
            if last_impure is not None:
                after[node].append(last_impure)
            last_impure = node
    return after


def _next_collective(body: list[torch.fx.Node], position: dict[torch.fx.Node, int]) -> dict[torch.fx.Node, int | None]:
    """For each node, the graph position of the first collective that needs it (None when none does)."""
    first: dict[torch.fx.Node, int | None] = {}
    for node in reversed(body):
        candidates = [first[u] for u in node.users if u in first and first[u] is not None]
        if is_collective(node):
            candidates.append(position[node])
        first[node] = min(candidates) if candidates else None
    return first
