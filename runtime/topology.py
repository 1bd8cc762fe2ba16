"""Where this process sits in the cluster: nodes, ranks per node, its own node and local rank."""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch.distributed as dist

from moe_ascend.kernels.errors import TopologyError
from moe_ascend.kernels.hierarchical import Hierarchy
from moe_ascend.runtime.exchange_group import exchange_group


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
        from_group = env is None and dist.is_available() and dist.is_initialized()
        env = os.environ if env is None else env
        if from_group:  # the process group is the truth once it exists
            world_size, rank = dist.get_world_size(), dist.get_rank()
        else:
            world_size, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
        per_node = ranks_per_node or int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
        if per_node < 1 or world_size % per_node:
            raise TopologyError(
                f"world size {world_size} is not a whole number of nodes of {per_node} ranks: "
                f"set options['topology'] = {{'ranks_per_node': G}} with G dividing {world_size}"
            )
        return cls(nodes=world_size // per_node, ranks_per_node=per_node, rank=rank)

    def node_ranks(self, node: int) -> list[int]:
        """The global ranks on ``node``."""
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def peer_ranks(self, local_rank: int) -> list[int]:
        """The global ranks with ``local_rank`` on every node: one per node, in node order."""
        return list(range(local_rank, self.world_size, self.ranks_per_node))

    def process_groups(self) -> "HierarchyGroups":
        """This rank's intra-node and inter-node (same local rank) groups, created on first use and reused.

        Every rank creates every group in the same order, as ``dist.new_group`` requires.
        The groups are let go when the default group is destroyed: a gloo group still
        held at interpreter exit can abort the process (its worker thread frees a
        finished collective's tensors after Python has shut down).
        """
        world = dist.group.WORLD
        key = (self.nodes, self.ranks_per_node, id(world))
        if key not in _GROUPS:
            if not dist.is_initialized() or dist.get_world_size() != self.world_size:
                found = dist.get_world_size() if dist.is_initialized() else "no process group"
                raise TopologyError(
                    f"the topology {self.nodes} nodes x {self.ranks_per_node} ranks needs a default process group "
                    f"of {self.world_size} ranks, found {found}: call dist.init_process_group first, or set "
                    "options['topology'] to match the world size"
                )
            intra = [dist.new_group(self.node_ranks(n)) for n in range(self.nodes)]
            inter = [dist.new_group(self.peer_ranks(local_rank)) for local_rank in range(self.ranks_per_node)]
            _GROUPS[key] = HierarchyGroups(intra=intra[self.node], inter=inter[self.local_rank])
            weakref.finalize(world, _GROUPS.pop, key, None)
        return _GROUPS[key]

    def hierarchy(self) -> Hierarchy:
        """The two-step exchange's view of this topology: this rank's groups, by the names its all-to-alls run on."""
        groups = self.process_groups()
        return Hierarchy(self.nodes, self.ranks_per_node, exchange_group(groups.intra).group_name,
                         exchange_group(groups.inter).group_name)


class HierarchyGroups(NamedTuple):
    """``intra``: the ranks of this node; ``inter``: the ranks with this local rank, one per node."""

    intra: "dist.ProcessGroup"
    inter: "dist.ProcessGroup"


_GROUPS: dict[tuple, HierarchyGroups] = {}


@dataclass
class LinkBytes:
    """Bytes sent to peers on other nodes and to peers on this node."""

    inter_node: int = 0
    intra_node: int = 0

    def __add__(self, other: "LinkBytes") -> "LinkBytes":
        return LinkBytes(self.inter_node + other.inter_node, self.intra_node + other.intra_node)

    def to_json(self) -> dict:
        return {"inter_node": self.inter_node, "intra_node": self.intra_node}


def all_to_all_bytes(group: str, nbytes: int, input_splits: Sequence[int] | None) -> LinkBytes:
    """What an all-to-all of an ``nbytes`` input over ``group`` sends each way (equal splits unless given)."""
    remote, me = _peers_on_other_nodes(group)
    if input_splits is None:
        shares = [nbytes // len(remote)] * len(remote)
    else:
        rows = sum(input_splits)
        shares = [nbytes * split // rows if rows else 0 for split in input_splits]
    inter = sum(share for share, far in zip(shares, remote) if far)
    intra = sum(share for peer, (share, far) in enumerate(zip(shares, remote)) if not far and peer != me)
    return LinkBytes(inter, intra)


def _peers_on_other_nodes(group: str) -> tuple[tuple[bool, ...], int]:
    """For each rank of ``group`` in order: is it on another node than this rank; and this rank's index in it.
    Not cached: group names restart when a process group is destroyed and made again."""
    ranks = dist.get_process_group_ranks(dist.distributed_c10d._resolve_process_group(group))
    topology = Topology.detect()
    node_of = lambda rank: rank // topology.ranks_per_node  # noqa: E731
    return tuple(node_of(r) != topology.node for r in ranks), ranks.index(topology.rank)
