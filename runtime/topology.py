"""Where this process sits in the cluster: nodes, ranks per node, its own node and local rank."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from moe_ascend.kernels.errors import TopologyError


@dataclass(frozen=True)
class Topology:
    """A cluster of ``nodes`` machines with ``ranks_per_node`` ranks each, seen from ``rank``."""

    nodes: int
    ranks_per_node: int
    rank: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.ranks_per_node < 1:
            raise TopologyError(
                f"a topology needs at least one node and one rank per node, got "
                f"nodes={self.nodes}, ranks_per_node={self.ranks_per_node}"
            )
        if not 0 <= self.rank < self.world_size:
            raise TopologyError(f"rank {self.rank} is outside a world of {self.world_size} ranks")

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def node(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.ranks_per_node

    @classmethod
    def detect(
        cls, ranks_per_node: int | None = None, env: Mapping[str, str] | None = None
    ) -> "Topology":
        """Read the topology from torchrun's environment; ``ranks_per_node`` overrides ``LOCAL_WORLD_SIZE``."""
        env = os.environ if env is None else env
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        per_node = ranks_per_node or int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
        if per_node < 1 or world_size % per_node:
            raise TopologyError(
                f"world size {world_size} is not a whole number of nodes of {per_node} ranks: "
                f"set options['topology'] = {{'ranks_per_node': G}} with G dividing {world_size}"
            )
        return cls(nodes=world_size // per_node, ranks_per_node=per_node, rank=rank)
