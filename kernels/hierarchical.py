"""Two-step hierarchical expert-parallel exchange: the slow inter-node link once per (token, destination node).

A flat dispatch sends a token to every rank that owns one of its experts, so a
token with three experts on one remote node crosses the inter-node link three
times. The hierarchical dispatch sends it once per destination node and fans
out inside the node (Pangu Ultra MoE, DeepSeek-V3, Tutel 2DH):

    step 1  inter-node all-to-all among the ranks with this local rank, one per node:
            each token once to each node that holds one of its experts, with its
            route on that node (its slot and routing weight for each of the node's experts)
    step 2  intra-node all-to-all: each received token to the ranks of this node
            that own one of its experts, with their part of the route
    then    every (token, expert) pair lands in the slot the flat dispatch gives it

The combine mirrors it: each expert rank sums a token's weighted outputs over
its own experts, the forwarding rank sums over the node's ranks, and one row per
(token, node) goes back over the inter-node link. Outputs equal the flat
exchange's up to the order of those sums; autograd runs through it unchanged.

Capacity mode keeps static shapes: a rank sends a destination node at most
``min(T, E_node·C)`` tokens (the node's experts keep at most ``C`` of this rank's
pairs each), and a forwarding rank sends a peer at most ``min(that, E_rank·C)``
per source node, so nothing the flat dispatch keeps is ever dropped.
A dispatch may carry one window of the slots (``slots=(start, stop)``): only
the pairs the flat dispatch puts in those slots of each expert travel, into an
expert input of ``stop - start`` slots, and its combine returns their share of
each token's sum. Chunks of slots, each exchanged on its own and summed, are
the whole layer (``chunk_for_overlap`` pipelines them).

The dropless exchange runs the experts in between (``dropless_moe``) and can
go in chunks of tokens, pipelined: every chunk's step 1 is issued at once, and
each chunk is forwarded, run and returned as it lands, so the inter-node link
carries the return of early chunks while later ones still arrive, rather than
falling idle between a whole dispatch and a whole combine.

Experts are numbered rank-major over ranks numbered node-major, as ``MoELayer``
places them: expert ``e`` lives on rank ``e // E_rank``, node ``e // E_node``.
The route travels as float32 (slot + 1, exact below 2**24, and the weight; zero
means no pair) beside the tokens, which keep their dtype.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from moe_ascend.kernels.capacity import scatter_rows
from moe_ascend.kernels.exchange import exchange, issue
from moe_ascend.kernels.indexing import expert_counts
from moe_ascend.kernels.weighted_sum import weighted_sum


class Hierarchy(NamedTuple):
    """The EP group seen as ``nodes`` × ``ranks_per_node``, with this rank's two groups by name."""

    nodes: int
    ranks_per_node: int
    intra_group: str  # the ranks of this node
    inter_group: str  # the ranks with this local rank, one per node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


class CapacityPlan(NamedTuple):
    """Where each row went, kept by the dispatch for the combine."""

    node_rows: Tensor  # [T, N]: a token's row in the step-1 buffer per destination node (spare: not sent)
    forward_rows: Tensor  # [N·Cn, G]: a received row's place in the step-2 buffer per peer (spare: not sent)
    slot_rows: Tensor  # [Q, E_rank]: a step-2 row's slot in the expert buffer per local expert (spare: none)
    weights: Tensor  # [Q, E_rank]: its routing weight per local expert (0: none)
    filled: Tensor  # [E_rank, W]: the slots each local expert's block from each source rank fills (its first ones)


def filled_blocks(plan: CapacityPlan) -> Tensor:
    """``plan.filled``: the ``filled`` of ``grouped_mm_filled`` for the expert input its dispatch made."""
    return plan.filled


def issues_all_to_alls(*groups: str):
    """Declare the all-to-alls a kernel issues, by the ``Hierarchy`` group each runs on (``"inter"``, ``"intra"``),
    in order: a graph that holds the kernel as one call (a pass's rewrite, before AOTAutograd traces into it)
    counts them from here."""
    def declare(kernel):
        kernel.all_to_alls = groups
        return kernel
    return declare


@issues_all_to_alls("inter", "inter", "intra", "intra")
def capacity_dispatch(
    tokens: Tensor, expert_ids: Tensor, weights: Tensor, scores: Tensor, num_experts: int, capacity: int,
    drop_policy: str, hierarchy: Hierarchy, slots: tuple[int, int] | None = None,
) -> tuple[Tensor, CapacityPlan]:
    """``tokens [T, d]`` → ``(expert_in [E_rank, W·C, d], plan)``: the flat dispatch's expert input, hierarchically.

    ``weights`` are the combine's routing weights (they travel with the tokens);
    ``scores`` rank pairs for the ``"score"`` drop policy, as in ``capacity_dispatch``;
    ``slots=(start, stop)``: only what lands in those slots of each expert (``C`` becomes ``stop - start``).
    """
    nodes, per_node_ranks = hierarchy.nodes, hierarchy.ranks_per_node
    per_node, per_rank = num_experts // nodes, num_experts // hierarchy.world_size
    num_tokens, width = tokens.shape
    pair_slots = torch.ops.moe_ascend.capacity_slots(expert_ids, scores, num_experts, capacity, drop_policy)
    if slots is not None:  # the window's pairs, numbered within it
        start, stop = slots
        position = pair_slots % capacity
        inside = (pair_slots >= 0) & (position >= start) & (position < stop)
        pair_slots = torch.where(inside, expert_ids * (stop - start) + position - start, -1)
        capacity = stop - start
    slots = pair_slots
    kept = slots >= 0

    # Step 1: a row per (token, destination node), over the inter-node link.
    node_capacity = min(num_tokens, per_node * capacity)
    dest_node = expert_ids // per_node
    node_hit = torch.zeros(num_tokens, nodes + 1, dtype=torch.bool, device=tokens.device)
    node_hit = node_hit.scatter(1, torch.where(kept, dest_node, nodes), True)[:, :nodes]
    node_rows = rows_by_destination(node_hit.unsqueeze(0), node_capacity)[0]  # [T, N]
    sent_rows = nodes * node_capacity
    pair_rows = torch.where(kept, node_rows.gather(1, dest_node), sent_rows)
    route = route_columns(pair_rows, expert_ids % per_node, slots % capacity + 1, weights, sent_rows, per_node)
    payload = scatter_rows(tokens.unsqueeze(1).expand(-1, nodes, -1).reshape(-1, width), node_rows.reshape(-1),
                           sent_rows)
    payload, route = exchange(payload, hierarchy.inter_group), exchange(route, hierarchy.inter_group)

    # Step 2: each received row to the ranks of this node that own one of its experts.
    route_slots = route[:, :per_node].reshape(sent_rows, per_node_ranks, per_rank)
    route_weights = route[:, per_node:].reshape(sent_rows, per_node_ranks, per_rank)
    rank_capacity = min(node_capacity, per_rank * capacity)
    needed = (route_slots > 0).any(dim=-1).reshape(nodes, node_capacity, per_node_ranks)
    forward_rows = rows_by_destination(needed, rank_capacity).reshape(sent_rows, per_node_ranks)
    forwarded = per_node_ranks * nodes * rank_capacity
    payload = scatter_rows(payload.unsqueeze(1).expand(-1, per_node_ranks, -1).reshape(-1, width),
                           forward_rows.reshape(-1), forwarded)
    route = scatter_rows(torch.cat([route_slots, route_weights], dim=-1).reshape(-1, 2 * per_rank),
                         forward_rows.reshape(-1), forwarded)
    payload, route = exchange(payload, hierarchy.intra_group), exchange(route, hierarchy.intra_group)

    # Each (row, local expert) pair into its flat slot. Rows arrive as [forwarding rank l, source node n, c]:
    # they came from global rank n·G + l.
    world = hierarchy.world_size
    source = (torch.arange(nodes, device=tokens.device) * per_node_ranks
              + torch.arange(per_node_ranks, device=tokens.device).unsqueeze(1))  # [G, N]
    source = source.unsqueeze(-1).expand(-1, -1, rank_capacity).reshape(-1, 1)
    slot = route[:, :per_rank].long() - 1
    buffer_size = world * per_rank * capacity
    local_expert = torch.arange(per_rank, device=tokens.device)
    slot_rows = torch.where(slot >= 0, (source * per_rank + local_expert) * capacity + slot, buffer_size)
    received = scatter_rows(payload.unsqueeze(1).expand(-1, per_rank, -1).reshape(-1, width), slot_rows.reshape(-1),
                            buffer_size)
    expert_in = (received.reshape(world, per_rank, capacity, width).transpose(0, 1)
                 .reshape(per_rank, world * capacity, width))
    # a block's pairs take its first slots (capacity_slots numbers them in order): count the slots taken
    taken = slot_rows.reshape(-1)
    block_of = torch.where(taken < buffer_size, taken // capacity, world * per_rank)  # spare: the last count
    filled = expert_counts(block_of, world * per_rank + 1)[:-1].reshape(world, per_rank).t()
    return expert_in, CapacityPlan(node_rows, forward_rows, slot_rows, route[:, per_rank:].to(weights.dtype), filled)


@issues_all_to_alls("intra", "inter")
def capacity_combine(expert_out: Tensor, plan: CapacityPlan, hierarchy: Hierarchy) -> Tensor:
    """``expert_out [E_rank, W·C, d]`` → ``[T, d]``: each token's weighted sum over its experts, summed per node
    first."""
    per_rank, _, width = expert_out.shape
    world = hierarchy.world_size
    by_source = expert_out.reshape(per_rank, world, -1, width).transpose(0, 1).reshape(-1, width)
    partial = weighted_sum(gather_rows(by_source, plan.slot_rows), plan.weights)  # this rank's experts
    partial = exchange(partial, hierarchy.intra_group)
    node_sum = gather_rows(partial, plan.forward_rows).sum(dim=1)  # this node's ranks
    node_sum = exchange(node_sum, hierarchy.inter_group)
    return gather_rows(node_sum, plan.node_rows).sum(dim=1)  # every node


def rows_by_destination(hit: Tensor, capacity: int) -> Tensor:
    """``hit [B, R, D]`` → each hit's row in a ``[D, B, capacity]`` send buffer (destination-major), else the spare row.

    Hits keep their order inside each (destination, block); at most ``capacity`` per pair, by construction.
    """
    blocks, _, destinations = hit.shape
    position = torch.cumsum(hit.long(), dim=1) - 1
    block = torch.arange(blocks, device=hit.device).reshape(-1, 1, 1)
    destination = torch.arange(destinations, device=hit.device)
    rows = (destination * blocks + block) * capacity + position
    return torch.where(hit, rows, destinations * blocks * capacity)


def route_columns(pair_rows: Tensor, pair_column: Tensor, pair_slot: Tensor, pair_weight: Tensor, num_rows: int,
                  width: int) -> Tensor:
    """``[num_rows, 2·width]`` float32: each pair's slot + 1 and weight in its row, at its expert's column.

    Zero means "no pair", so rows and buffers that nothing fills read as empty.
    """
    dtype = torch.promote_types(pair_weight.dtype, torch.float32)
    index = (pair_rows.reshape(-1), pair_column.reshape(-1))
    slots = torch.zeros(num_rows + 1, width, dtype=dtype, device=pair_rows.device)
    slots = slots.index_put(index, pair_slot.reshape(-1).to(dtype))
    weights = torch.zeros(num_rows + 1, width, dtype=dtype, device=pair_rows.device)
    weights = weights.index_put(index, pair_weight.reshape(-1).to(dtype))
    return torch.cat([slots, weights], dim=1)[:num_rows]


def gather_rows(buffer: Tensor, rows: Tensor) -> Tensor:
    """``buffer[rows]`` with the spare row ``len(buffer)`` reading zeros; shape ``[*rows.shape, d]``."""
    padded = torch.cat([buffer, buffer.new_zeros(1, buffer.shape[-1])])
    return padded[rows]


class Step1(NamedTuple):
    """One chunk's rows over the inter-node link: a row per (token, destination node), grouped by node."""

    token_of_row: Tensor  # [S]: the token each row carries
    node_of_row: Tensor  # [S]: the node it goes to
    splits: tuple[list[int], list[int]]  # (sent, received) per node


def step1_plan(expert_ids: Tensor, num_experts: int, hierarchy: Hierarchy, chunks: int = 1) -> list[Step1]:
    """Each chunk's step-1 rows; the received split sizes come from one exchange of every chunk's counts."""
    per_node = num_experts // hierarchy.nodes
    node_hit = torch.zeros(expert_ids.shape[0], hierarchy.nodes, dtype=torch.bool, device=expert_ids.device)
    node_hit[torch.arange(expert_ids.shape[0], device=expert_ids.device).unsqueeze(1), expert_ids // per_node] = True
    hits = node_hit.tensor_split(chunks)
    counts = torch.stack([hit.sum(dim=0) for hit in hits])  # [K, N]
    received = exchange(counts.t().contiguous(), hierarchy.inter_group).t().tolist()
    plans, start = [], 0
    for hit, sent, got in zip(hits, counts.tolist(), received):
        row, node = hit.t().nonzero(as_tuple=True)[::-1]
        plans.append(Step1(row + start, node, (sent, got)))
        start += len(hit)
    return plans


def dropless_moe(tokens: Tensor, expert_ids: Tensor, weights: Tensor, num_experts: int, hierarchy: Hierarchy,
                 experts: Callable[[Tensor, Tensor], Tensor], chunks: int = 1) -> Tensor:
    """``tokens [T, d]`` → ``Σ_k weights[t, k] · expert_k(tokens[t])``, the experts run on their ranks, dropless.

    ``experts(rows, tokens_per_expert)`` maps this rank's rows grouped by local expert to their outputs, row for
    row. The tokens go in ``chunks`` pieces, pipelined: every chunk's step 1 is issued at once; then, in step
    ``s``, chunk ``s`` is forwarded inside the node, chunk ``s - 1`` runs its experts and starts back, and chunk
    ``s - 2``'s node sums leave for home, so the inter-node link carries the dispatch of later chunks and the
    return of earlier ones together (functional collectives wait at first use, in eager). As the flat dropless
    exchange, each step first exchanges its counts and reads them as split sizes.
    """
    nodes, per_node_ranks = hierarchy.nodes, hierarchy.ranks_per_node
    per_node, per_rank = num_experts // nodes, num_experts // hierarchy.world_size
    num_tokens = tokens.shape[0]

    # Each token's route over all experts: [T, N, 2, E_node] (present, weight).
    present = torch.zeros(num_tokens, num_experts, dtype=weights.dtype,
                          device=tokens.device).scatter(1, expert_ids, 1.0)
    weight = torch.zeros(num_tokens, num_experts, dtype=weights.dtype,
                         device=tokens.device).scatter(1, expert_ids, weights)
    route = torch.stack([present, weight], dim=1).reshape(num_tokens, 2, nodes, per_node).transpose(1, 2)

    step1 = step1_plan(expert_ids, num_experts, hierarchy, chunks)
    in_flight = [(issue(tokens[c.token_of_row], hierarchy.inter_group, c.splits[1], c.splits[0]),
                  issue(route[c.token_of_row, c.node_of_row].reshape(-1, 2 * per_node), hierarchy.inter_group,
                        c.splits[1], c.splits[0])) for c in step1]

    def forward(c: int):
        """Step 2: each received row to the ranks of this node that own one of its experts."""
        payload, node_route = in_flight[c]
        node_route = node_route.reshape(-1, 2, per_node_ranks, per_rank).transpose(1, 2)  # [R, G, 2, E_rank]
        row_of_forward, peer, splits = _send_order(node_route[:, :, 0].sum(-1) > 0, hierarchy.intra_group)
        return (row_of_forward, splits, issue(payload[row_of_forward], hierarchy.intra_group, splits[1], splits[0]),
                issue(node_route[row_of_forward, peer].reshape(-1, 2 * per_rank), hierarchy.intra_group,
                      splits[1], splits[0]))

    def run_experts(forwarded):
        """One expert row per (row, local expert) pair, grouped by expert; their weighted sum per row goes back."""
        row_of_forward, splits, payload, rank_route = forwarded
        row_of_pair, local_expert = (rank_route[:, :per_rank] > 0).t().nonzero(as_tuple=True)[::-1]
        pair_weights = rank_route[:, per_rank:][row_of_pair, local_expert].unsqueeze(-1)
        out = experts(payload[row_of_pair], (rank_route[:, :per_rank] > 0).sum(dim=0))
        part = _add_rows(out * pair_weights.to(out.dtype), row_of_pair, payload.shape[0])
        return row_of_forward, issue(part, hierarchy.intra_group, splits[0], splits[1])

    def go_home(c: int, returned):
        """The node's sum of each step-1 row, back over the inter-node link."""
        row_of_forward, part = returned
        node_sum = _add_rows(part, row_of_forward, sum(step1[c].splits[1]))
        return issue(node_sum, hierarchy.inter_group, step1[c].splits[0], step1[c].splits[1])

    forwarded, returned, homes = {}, {}, []
    for s in range(chunks + 2):  # the same order on every rank: its collectives match
        if s < chunks:
            forwarded[s] = forward(s)
        if 0 <= s - 1 < chunks:
            returned[s - 1] = run_experts(forwarded.pop(s - 1))
        if 0 <= s - 2 < chunks:
            homes.append(go_home(s - 2, returned.pop(s - 2)))
    out = homes[0].new_zeros(num_tokens, homes[0].shape[-1])
    for home, c in zip(homes, step1):  # each chunk is added as it lands, with no copy of them all first
        out.index_add_(0, c.token_of_row, home)
    return out


def _send_order(hit: Tensor, group: str) -> tuple[Tensor, Tensor, tuple[list[int], list[int]]]:
    """``hit [R, D]`` → a variable-size send buffer's rows, grouped by destination: (source row, destination) of each,
    and the (sent, received) split sizes, the received ones exchanged over ``group``.

    The dropless twin of ``rows_by_destination``, which places rows in a static buffer instead."""
    destination, source = hit.t().nonzero(as_tuple=True)  # destination-major, sources in order
    counts = hit.sum(dim=0)
    return source, destination, (counts.tolist(), exchange(counts, group).tolist())


def _add_rows(rows: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """``[num_rows, d]``: row ``index[i]`` accumulates ``rows[i]``."""
    return rows.new_zeros(num_rows, rows.shape[-1]).index_add_(0, index, rows)  # in place: no copy of the zeros
