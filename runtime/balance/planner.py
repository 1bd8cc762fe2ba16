"""Planning a placement: which slots hold which experts, so that the busiest rank has as little as possible.

Both planners first give the hottest experts the redundant slots, one at a
time to the expert with the most load per replica, then pack the replicas
(each carrying its share of its expert's load) into ranks of ``slots_per_rank``
slots, never two replicas of one expert on one rank.

- ``greedy_placement``: DeepSeek EPLB's way: pack onto nodes, then onto the
  ranks of each node, heaviest first to the least-loaded bin with a free slot;
  the result ignores where experts are now.
- ``plan_placement`` (ours): the same start, then a local search that swaps
  replicas between the busiest rank and any other while that lowers the
  maximum rank load (greedy packing stops at the first fit; the swaps close
  most of the gap to the mean), then the packed ranks are matched to the
  current ones so that the fewest experts move (a migration only pays for
  what moves).
"""

from __future__ import annotations

import heapq

from moe_ascend.runtime.balance.placement import Placement, PlacementError


def replica_counts(load, num_slots: int, ranks: int) -> list[int]:
    """How many slots each expert gets: one each, the rest one at a time to the most load per replica (at most one
    replica per rank)."""
    load = [float(x) for x in load]
    if num_slots < len(load):
        raise PlacementError(f"{num_slots} slots cannot hold {len(load)} experts")
    counts = [1] * len(load)
    heap = [(-x, e) for e, x in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(num_slots - len(load)):
        _, expert = heapq.heappop(heap)
        counts[expert] += 1
        if counts[expert] < ranks:
            heapq.heappush(heap, (-load[expert] / counts[expert], expert))
    return counts


def _replicas(load, counts) -> list[tuple[float, int]]:
    """``(share of load, expert)`` for every replica, heaviest first (ties by expert id, so every rank agrees)."""
    items = [(float(load[e]) / c, e) for e, c in enumerate(counts) for _ in range(c)]
    return sorted(items, key=lambda item: (-item[0], item[1]))


def _pack(items, bins: int, capacity: int) -> list[list[tuple[float, int]]]:
    """Longest-processing-time packing: each item to the least-loaded bin with room that lacks its expert."""
    packed, loads = [[] for _ in range(bins)], [0.0] * bins
    for share, expert in items:
        open_bins = [b for b in range(bins) if len(packed[b]) < capacity]
        distinct = [b for b in open_bins if all(e != expert for _, e in packed[b])] or open_bins
        target = min(distinct, key=lambda b: (loads[b], b))
        packed[target].append((share, expert))
        loads[target] += share
    return packed


def _placement(ranks_items, num_experts: int) -> Placement:
    slots = [expert for items in ranks_items for _, expert in items]
    return Placement(tuple(slots), num_experts, len(ranks_items))


def greedy_placement(load, num_slots: int, ranks: int, ranks_per_node: int | None = None) -> Placement:
    """EPLB-style: replicas for the hottest, packed heaviest-first onto nodes, then onto each node's ranks."""
    ranks_per_node = ranks_per_node or ranks
    nodes, per_rank = ranks // ranks_per_node, num_slots // ranks
    items = _replicas(load, replica_counts(load, num_slots, ranks))
    ranks_items = []
    for node_items in _pack(items, nodes, per_rank * ranks_per_node):
        ranks_items += _pack(sorted(node_items, key=lambda item: (-item[0], item[1])), ranks_per_node, per_rank)
    return _placement(ranks_items, len(load))


def plan_placement(load, current: Placement) -> Placement:
    """Ours: greedy packing, swaps that lower the busiest rank, then the fewest moves from ``current``."""
    ranks, per_rank = current.ranks, current.slots_per_rank
    packed = _pack(_replicas(load, replica_counts(load, current.num_slots, ranks)), ranks, per_rank)
    _swap_down_the_maximum(packed)
    return _keep_in_place(packed, current)


def _swap_down_the_maximum(packed: list[list[tuple[float, int]]]) -> None:
    """Swap one replica of the busiest rank with one of another rank while that lowers the pair's maximum."""
    loads = [sum(share for share, _ in items) for items in packed]
    for _ in range(10 * sum(map(len, packed))):
        busiest = max(range(len(packed)), key=lambda r: (loads[r], -r))
        best = None  # (new pair maximum, other rank, index on busiest, index on other)
        for other in range(len(packed)):
            if other == busiest:
                continue
            for i, (share_i, expert_i) in enumerate(packed[busiest]):
                for j, (share_j, expert_j) in enumerate(packed[other]):
                    delta = share_i - share_j
                    if delta <= 0 or expert_i == expert_j:
                        continue
                    if any(e == expert_j for k, (_, e) in enumerate(packed[busiest]) if k != i) or \
                            any(e == expert_i for k, (_, e) in enumerate(packed[other]) if k != j):
                        continue
                    pair_max = max(loads[busiest] - delta, loads[other] + delta)
                    if pair_max < loads[busiest] - 1e-9 and (best is None or pair_max < best[0]):
                        best = (pair_max, other, i, j)
        if best is None:
            return
        _, other, i, j = best
        (share_i, _), (share_j, _) = packed[busiest][i], packed[other][j]
        packed[busiest][i], packed[other][j] = packed[other][j], packed[busiest][i]
        loads[busiest] += share_j - share_i
        loads[other] += share_i - share_j


def _keep_in_place(packed, current: Placement) -> Placement:
    """Give each packed rank to the current rank that already holds most of its experts, and keep each expert in
    the slot it already occupies there."""
    ranks, per_rank = current.ranks, current.slots_per_rank
    held = [current.slot_experts[r * per_rank:(r + 1) * per_rank] for r in range(ranks)]
    overlap = [[sum(min(held[r].count(e), [x for _, x in items].count(e)) for e in set(held[r])) for r in range(ranks)]
               for items in packed]
    pairs = sorted(((-overlap[b][r], b, r) for b in range(ranks) for r in range(ranks)))
    rank_of_bin, taken = {}, set()
    for _, b, r in pairs:
        if b not in rank_of_bin and r not in taken:
            rank_of_bin[b] = r
            taken.add(r)
    slots = [-1] * current.num_slots
    for b, items in enumerate(packed):
        r, wanted = rank_of_bin[b], [e for _, e in items]
        free = []
        for local, expert in enumerate(held[r]):
            if expert in wanted:
                wanted.remove(expert)
                slots[r * per_rank + local] = expert
            else:
                free.append(local)
        for local, expert in zip(free, wanted):
            slots[r * per_rank + local] = expert
    return Placement(tuple(slots), current.num_experts, ranks)


def imbalance(placement: Placement, load) -> float:
    """Max over mean rank load (1.0 is perfect)."""
    loads = placement.rank_loads(load)
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


def moved_experts(old: Placement, new: Placement) -> int:
    """Slots whose expert changes (each one is an expert's weights and optimizer state to fetch)."""
    return sum(a != b for a, b in zip(old.slot_experts, new.slot_experts))
