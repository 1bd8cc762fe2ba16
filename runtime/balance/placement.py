"""Where each expert lives: the logical → physical map that a balanced ``MoELayer`` routes through.

A layer with ``E`` logical experts and ``R`` redundant ones has ``E + R``
physical *slots*, ``(E + R) / ep_size`` on each rank of its expert-parallel
group, rank ``r`` holding slots ``[r·S, (r+1)·S)``. A placement says which
logical expert each slot computes; every expert has at least one slot, a hot
one may have several (replicas). A rank sends an expert's (token, choice)
pairs to its nearest replicas, in turn: those on the rank itself, else those
on its node, else all of them (every rank draws from the same distribution,
so each replica still gets an even share, and fewer tokens cross links).

The layer holds the map in buffers: ``replica_slots [E, 1 + R]`` (each
expert's slots, the first repeated to fill) and ``replica_count [E]`` for the
whole placement, and the same two tables restricted to this rank's nearest
replicas (``route_slots``, ``route_count``), which the compiled graph reads. A
new placement overwrites them in place, so the graph sees it without a
recompile.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from moe_ascend.kernels.errors import MoEAscendError


class PlacementError(MoEAscendError, ValueError):
    """A placement that cannot hold the layer's experts."""


@dataclass(frozen=True)
class Placement:
    """``slot_experts[g]``: the logical expert that physical slot ``g`` computes (slot ``g`` on rank
    ``g // slots_per_rank``)."""

    slot_experts: tuple[int, ...]
    num_experts: int
    ranks: int

    def __post_init__(self):
        if len(self.slot_experts) % self.ranks:
            raise PlacementError(f"{len(self.slot_experts)} slots do not split evenly over {self.ranks} ranks")
        missing = set(range(self.num_experts)) - set(self.slot_experts)
        if missing or not all(0 <= e < self.num_experts for e in self.slot_experts):
            raise PlacementError(f"every slot must hold one of the {self.num_experts} experts and every expert a slot; "
                                 f"experts without a slot: {sorted(missing)}")

    @classmethod
    def initial(cls, num_experts: int, ranks: int, redundant: int = 0) -> "Placement":
        """Experts in order over the ranks, each rank's redundant slots replicating its own first experts
        (so replicas start equal without any communication)."""
        if num_experts % ranks or redundant % ranks:
            raise PlacementError(f"{num_experts} experts and {redundant} redundant slots must both split evenly over "
                                 f"{ranks} expert-parallel ranks; choose multiples of {ranks}")
        own, extra = num_experts // ranks, redundant // ranks
        if extra > own:
            raise PlacementError(f"{extra} redundant slots per rank exceed its {own} experts; "
                                 f"use at most {own * ranks}")
        slots = []
        for rank in range(ranks):
            first = rank * own
            slots += list(range(first, first + own)) + list(range(first, first + extra))
        return cls(tuple(slots), num_experts, ranks)

    @property
    def num_slots(self) -> int:
        return len(self.slot_experts)

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ranks

    @property
    def max_replicas(self) -> int:
        return 1 + self.num_slots - self.num_experts

    def rank_of(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def replicas(self, expert: int) -> list[int]:
        return [slot for slot, held in enumerate(self.slot_experts) if held == expert]

    def rank_loads(self, expert_load) -> list[float]:
        """Each rank's share of ``expert_load`` (an expert's load split evenly over its replicas)."""
        count = Counter(self.slot_experts)
        loads = [0.0] * self.ranks
        for slot, expert in enumerate(self.slot_experts):
            loads[self.rank_of(slot)] += float(expert_load[expert]) / count[expert]
        return loads

    def tables(self, rank: int | None = None, node_of: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(replica_slots [E, max_replicas], replica_count [E])``, int64, as the layer's buffers hold them; with
        ``rank``, only the replicas that rank routes to (``node_of[r]``: the node of rank ``r``)."""
        slots = torch.zeros(self.num_experts, self.max_replicas, dtype=torch.int64)
        count = torch.zeros(self.num_experts, dtype=torch.int64)
        for expert in range(self.num_experts):
            held = self.replicas(expert) if rank is None else self.nearest_replicas(expert, rank, node_of)
            slots[expert] = torch.tensor(held + [held[0]] * (self.max_replicas - len(held)))
            count[expert] = len(held)
        return slots, count

    def nearest_replicas(self, expert: int, rank: int, node_of: list[int] | None = None) -> list[int]:
        """The expert's replicas on ``rank``, else on its node, else all of them."""
        held = self.replicas(expert)
        node_of = node_of or list(range(self.ranks))
        for near in (lambda s: self.rank_of(s) == rank, lambda s: node_of[self.rank_of(s)] == node_of[rank]):
            if chosen := [s for s in held if near(s)]:
                return chosen
        return held

    @classmethod
    def from_tables(cls, replica_slots: torch.Tensor, replica_count: torch.Tensor, ranks: int) -> "Placement":
        num_experts, max_replicas = replica_slots.shape
        slot_experts = [-1] * (num_experts + max_replicas - 1)
        for expert in range(num_experts):
            for slot in replica_slots[expert, : int(replica_count[expert])].tolist():
                slot_experts[slot] = expert
        return cls(tuple(slot_experts), num_experts, ranks)


def physical_slots(expert_ids: torch.Tensor, replica_slots: torch.Tensor, replica_count: torch.Tensor) -> torch.Tensor:
    """Each (token, choice) pair's physical slot: an expert's pairs go to its replicas in turn, in token order.

    The turn is the pair's place among its expert's pairs, not its place in the batch: with ``k`` a multiple of the
    replica count, the batch position would send every first choice to one replica and every second to another.
    """
    flat = expert_ids.flatten()
    order = torch.argsort(flat, stable=True)
    pairs_per_expert = torch.zeros_like(replica_count).index_add_(0, flat, torch.ones_like(flat))
    first_pair = torch.cumsum(pairs_per_expert, 0) - pairs_per_expert
    turn_in_order = torch.arange(flat.numel(), device=flat.device) - first_pair[flat[order]]
    # back to batch order by a gather through the inverse permutation, not a scatter into a fresh buffer: Inductor
    # fused that scatter with the next layer's, after this layer's read of it, under keep_schedule's control deps
    turn = turn_in_order[torch.argsort(order)]
    replica = (turn % replica_count[flat]).view_as(expert_ids)
    return replica_slots[expert_ids, replica]
