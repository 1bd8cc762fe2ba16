"""``MoELayer``: the reference expert-parallel MoE layer, built on the moe_ascend ops.

    router    weights, expert_ids = topk_softmax(gate(x), k)      (score="sigmoid": topk_sigmoid, DeepSeek-V3's)
    dispatch  capacity: [E, C, d] buffer (static shapes)  |  dropless: rows grouped by expert
    experts   SwiGLU per expert, as grouped matmuls (local experts only under expert parallelism)
    combine   each token's weighted sum of its experts' outputs (+ shared experts)

Expert parallelism over ``ep_group`` (``E / ep_size`` experts per rank) sends the
dispatched tokens to the ranks that own their experts with functional
``all_to_all_single`` and brings the results back the same way.

Capacity mode (``capacity_factor`` set) exchanges equal, static blocks: it
compiles to one graph. Dropless mode first exchanges the per-expert counts,
then uses them as split sizes. Those sizes are data: under ``torch.compile``
reading them (``.tolist()``) is a graph break, or, with
``torch._dynamo.config.capture_scalar_outputs = True``, unbacked sizes: the
layer is then one graph, forward and backward, which Inductor lowers and which
new sizes do not recompile. With one rank no sizes are exchanged and dropless
compiles to one graph either way.

``overlap_chunks=n`` (dropless) sends the tokens in ``n`` chunks, so each chunk's
experts compute while the other chunks' rows are on the wire; with
``hierarchical_a2a=True`` the chunks pipeline both steps of the exchange, there and back.
Capacity layers are chunked by the compiler (``options={"overlap": n}``).

``hierarchical_a2a=True`` runs the two-step exchange of
``kernels.hierarchical`` whenever the topology spans nodes: the way to get it
for dropless layers, whose exchange the compiler pass cannot rewrite (it is
split across graphs at the host-read split sizes). Capacity layers get it from
the ``hierarchical_a2a`` compile option as well.

``score="sigmoid"`` routes as DeepSeek-V3 does: each expert's sigmoid score,
plus a per-expert ``expert_bias`` buffer (zeros; it steers the choice only),
the top k chosen, their sigmoids renormalised into weights.
``router_bias_update=u`` (with ``score="sigmoid"``) is DeepSeek-V3's
aux-loss-free balancing: every training forward moves each expert's bias by
``u`` against its load over the expert-parallel group (down if it took more
than the mean, up if fewer), on device and inside a compiled graph; the next
forward chooses with it. Checkpoints carry the bias (a buffer).

``aux_loss_coeff=a`` (0 by default) keeps Switch Transformer's load-balancing
loss of each forward in ``layer.aux_loss`` (``a · kernels.routing.load_balancing_loss``
over the pairs the router chose, also under ``torch.compile`` and with the
routing passes, which change the choice it counts): add it to the training loss,
as Megatron's ``moe_aux_loss_coeff`` does. Without it a router is free to send
every token to a few experts.

``balance=True`` readies the layer for ``runtime.balance.ExpertBalancer``: it
counts tokens per logical expert into its ``expert_load`` buffer (inside the
graph), and routes each (token, choice) pair through a logical → physical map
held in buffers (``route_slots``, ``route_count``: the nearest replicas of each
expert, see ``runtime.balance.placement``) onto ``E + redundant_experts`` expert
slots, ``(E + R) / ep_size`` per rank, so hot experts can have replicas and a
new placement reaches a compiled graph without a recompile.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import moe_ascend.kernels as ops
import moe_ascend.kernels.exchange as ep
from moe_ascend.kernels import hierarchical
from moe_ascend.kernels.errors import TopologyError
from moe_ascend.kernels.routing import load_balancing_loss, nudged_bias
from moe_ascend.runtime.balance.placement import Placement, physical_slots
from moe_ascend.runtime.exchange_group import exchange_group
from moe_ascend.runtime.topology import Topology


class MoELayer(nn.Module):
    """Top-k routed SwiGLU experts, capacity or dropless, on one rank or across an EP process group."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        ep_group: dist.ProcessGroup | None = None,
        num_shared_experts: int = 0,
        drop_policy: str = "position",
        renormalize: bool = True,
        hierarchical_a2a: bool = False,
        overlap_chunks: int = 1,
        balance: bool = False,
        redundant_experts: int = 0,
        aux_loss_coeff: float = 0.0,
        score: str = "softmax",
        router_bias_update: float = 0.0,
    ):
        super().__init__()
        self.ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        if num_experts % self.ep_size:
            raise TopologyError(
                f"{num_experts} experts do not split evenly over an expert-parallel group of {self.ep_size} ranks; "
                "choose num_experts divisible by the group size"
            )
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        if redundant_experts and not balance:
            raise ValueError(f"redundant_experts={redundant_experts} needs balance=True "
                             "(replicas are placed by the balancer)")
        # Physical expert slots: the logical experts, plus replicas of hot ones when balancing (runtime.balance).
        placement = Placement.initial(num_experts, self.ep_size, redundant_experts) if balance else None
        self.num_slots = num_experts + redundant_experts
        self.num_local_experts = self.num_slots // self.ep_size
        self.capacity_factor, self.drop_policy, self.renormalize = capacity_factor, drop_policy, renormalize
        # The group's name, not the object: functional collectives take it, and the module stays deep-copyable.
        self.ep_group_name = exchange_group(ep_group).group_name if self.ep_size > 1 else None
        self.load_group_name = ep_group.group_name if self.ep_size > 1 else None  # the exchange's runs all-to-alls only
        self.hierarchy = self._hierarchy(ep_group) if hierarchical_a2a else None
        if overlap_chunks < 1 or (overlap_chunks > 1 and capacity_factor is not None):
            raise ValueError(
                f"overlap_chunks={overlap_chunks}: give a chunk count >= 1, for a dropless layer "
                "(capacity_factor=None); capacity layers are chunked by the compiler: options={'overlap': n}"
            )
        self.overlap_chunks = overlap_chunks
        if aux_loss_coeff < 0:
            raise ValueError(f"aux_loss_coeff must be >= 0, got {aux_loss_coeff}")
        self.aux_loss_coeff = aux_loss_coeff
        self.aux_loss: torch.Tensor | None = None  # the last forward's, when aux_loss_coeff > 0

        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        if router_bias_update < 0 or (router_bias_update and score != "sigmoid"):
            raise ValueError(f"router_bias_update={router_bias_update}: give a rate >= 0, with score='sigmoid' "
                             "(the bias steers a sigmoid router's choice, as in DeepSeek-V3)")
        self.score, self.router_bias_update = score, router_bias_update
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        if score == "sigmoid":
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        # The plain layer's draws, so a balanced layer starts as the same model (each slot copies the expert the
        # initial placement gives it) and every module after it draws the same numbers too.
        own = num_experts // self.ep_size
        gate_up = torch.randn(own, d_model, 2 * d_ff) / math.sqrt(d_model)
        down = torch.randn(own, d_ff, d_model) / math.sqrt(d_ff)
        self.balance = balance
        if balance:
            self._ep_rank = dist.get_rank(ep_group) if self.ep_size > 1 else 0
            self._node_of_rank = _node_of_rank(ep_group) if self.ep_size > 1 else [0]
            self._place(placement)
            first = self._ep_rank * placement.slots_per_rank
            held = [expert - self._ep_rank * own
                    for expert in placement.slot_experts[first:first + placement.slots_per_rank]]
            gate_up, down = gate_up[held], down[held]
        self.w_gate_up, self.w_down = nn.Parameter(gate_up), nn.Parameter(down)
        self.shared = SwiGLU(d_model, num_shared_experts * d_ff) if num_shared_experts else None

    def _place(self, placement: Placement) -> None:
        """Buffers for the balancer: tokens per logical expert (summed on device) and the logical → physical map."""
        self.register_buffer("expert_load", torch.zeros(self.num_experts, dtype=torch.int64))
        for name in ("replica_slots", "route_slots"):
            self.register_buffer(name, torch.zeros(self.num_experts, placement.max_replicas, dtype=torch.int64))
        for name in ("replica_count", "route_count"):
            self.register_buffer(name, torch.zeros(self.num_experts, dtype=torch.int64))
        self.place(placement)

    def place(self, placement: Placement) -> None:
        """Route through ``placement`` from now on (its tables, written in place: a compiled graph keeps working).
        Moves no weights: ``runtime.balance.migrate`` does, then calls this."""
        with torch.no_grad():
            for buffers, tables in [(("replica_slots", "replica_count"), placement.tables()),
                                    (("route_slots", "route_count"),
                                     placement.tables(self._ep_rank, self._node_of_rank))]:
                for name, table in zip(buffers, tables):
                    getattr(self, name).copy_(table)

    def _hierarchy(self, ep_group) -> hierarchical.Hierarchy | None:
        """The two-step exchange's groups, or None where one node holds every rank (nothing to save)."""
        topology = Topology.detect()
        if self.ep_size == 1 or topology.nodes == 1:
            return None
        if dist.get_process_group_ranks(ep_group) != list(range(topology.world_size)):
            raise TopologyError(
                "hierarchical_a2a=True needs the expert-parallel group to be all ranks in order "
                f"(the topology's {topology.nodes} x {topology.ranks_per_node}); pass ep_group=dist.group.WORLD"
            )
        return topology.hierarchy()

    @property
    def placement(self) -> Placement:
        """Which logical expert each physical slot holds, read from the buffers (a migration or a loaded checkpoint
        rewrites them in place; the host copy is redone only then)."""
        key = (self.replica_slots._version, self.replica_count._version)
        if getattr(self, "_placement_key", None) != key:
            self._placement = Placement.from_tables(self.replica_slots.cpu(), self.replica_count.cpu(), self.ep_size)
            self._placement_key = key
        return self._placement

    def capacity(self, num_tokens: int) -> int:
        """Rows per expert slot per source rank: ``ceil(k·T/E · capacity_factor)``, the plain layer's rows ``E·C``
        shared by the ``E + R`` slots of a balanced layer (redundant slots add no bytes to the exchange and no rows
        to the matmuls: an expert with ``r`` copies keeps up to ``r`` slots' rows, one without a replica ``E/(E+R)``
        of the plain layer's)."""
        per_expert = max(1, math.ceil(self.top_k * num_tokens / self.num_experts * self.capacity_factor))
        return max(1, per_expert * self.num_experts // self.num_slots)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, expert_ids = self.route(tokens)
        if self.balance:
            # Counted on device, read by the balancer every few steps: no host sync on the hot path.
            self.expert_load.index_add_(0, expert_ids.flatten(), torch.ones_like(expert_ids.flatten()))
            expert_ids = physical_slots(expert_ids, self.route_slots, self.route_count)
        if self.capacity_factor is not None:
            out = self._capacity_moe(tokens, weights, expert_ids)
        else:
            out = self._dropless_moe(tokens, weights, expert_ids)
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out.reshape(x.shape)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [T, k], expert_ids [T, k])``: the gate's scores, top k (and the balance loss, when asked)."""
        logits = self.gate(tokens)
        if self.score == "sigmoid":
            weights, expert_ids = ops.topk_sigmoid(logits, self.top_k, self.expert_bias, 1, 1, 1, self.renormalize,
                                                   1.0)
            if self.router_bias_update and self.training:
                with torch.no_grad():
                    self.expert_bias.copy_(nudged_bias(self.expert_bias, expert_ids, self.router_bias_update,
                                                       self.load_group_name))
        else:
            weights, expert_ids = ops.topk_softmax(logits, self.top_k, self.renormalize)
        if self.aux_loss_coeff:
            self.aux_loss = self.aux_loss_coeff * load_balancing_loss(logits, expert_ids, self.score)
        return weights, expert_ids

    def _capacity_moe(self, tokens, weights, expert_ids):
        capacity = self.capacity(tokens.shape[0])
        if self.hierarchy is not None:
            expert_in, plan = hierarchical.capacity_dispatch(tokens, expert_ids, weights, weights, self.num_slots,
                                                             capacity, self.drop_policy, self.hierarchy)
            return hierarchical.capacity_combine(self._experts_batched(expert_in), plan, self.hierarchy)
        dispatched, slots = ops.capacity_dispatch(tokens, expert_ids, weights, self.num_slots, capacity,
                                                  self.drop_policy)
        if self.ep_size == 1:
            return ops.capacity_combine(self._experts_batched(dispatched), slots, weights)
        expert_out = self._experts_batched(ep.to_experts(dispatched, self.ep_group_name, self.ep_size))
        return ops.capacity_combine(ep.from_experts(expert_out, self.ep_group_name, self.ep_size), slots, weights)

    def _dropless_moe(self, tokens, weights, expert_ids):
        if self.ep_size == 1:
            rows, tokens_per_expert, row_map = ops.permute(tokens, expert_ids, self.num_slots)
            return ops.unpermute(self._experts_grouped(rows, tokens_per_expert), row_map, weights)
        if self.hierarchy is not None:
            return hierarchical.dropless_moe(tokens, expert_ids, weights, self.num_slots, self.hierarchy,
                                             self._experts_grouped, self.overlap_chunks)
        if self.overlap_chunks > 1:
            return self._dropless_pipelined(tokens, weights, expert_ids)
        rows, tokens_per_expert, plan = ep.dropless_dispatch(tokens, expert_ids, self.num_slots, self.ep_size,
                                                             self.ep_group_name)
        return ep.dropless_combine(self._experts_grouped(rows, tokens_per_expert), plan, weights, self.ep_group_name)

    def _dropless_pipelined(self, tokens, weights, expert_ids):
        """Chunks of tokens, all sent at once; each chunk's experts run while the later chunks' rows arrive and
        the earlier chunks' results return (in eager; compiled, each chunk's host-read sizes break the graph)."""
        bounds = ep.even_bounds(tokens.shape[0], self.overlap_chunks)
        sent = [ep.dropless_send(tokens[a:b], expert_ids[a:b], self.num_slots, self.ep_size, self.ep_group_name)
                for a, b in bounds]
        returned = [ep.dropless_return(self._experts_grouped(received[plan.by_expert], tokens_per_expert), plan,
                                       self.ep_group_name) for received, tokens_per_expert, plan in sent]
        return torch.cat([ops.unpermute(back, plan.row_map, weights[a:b])
                          for back, (_, _, plan), (a, b) in zip(returned, sent, bounds)])

    def _experts_batched(self, x):
        gate, up = ops.grouped_mm_batched(x, self.w_gate_up).chunk(2, dim=-1)
        return ops.grouped_mm_batched(F.silu(gate) * up, self.w_down)

    def _experts_grouped(self, rows, tokens_per_expert):
        gate, up = ops.grouped_mm(rows, self.w_gate_up, tokens_per_expert).chunk(2, dim=-1)
        return ops.grouped_mm(F.silu(gate) * up, self.w_down, tokens_per_expert)


def _node_of_rank(ep_group) -> list[int]:
    """The node of each rank of the expert-parallel group (by the topology's ranks per node)."""
    per_node = Topology.detect().ranks_per_node
    return [r // per_node for r in dist.get_process_group_ranks(ep_group)]


class SwiGLU(nn.Module):
    """The shared experts: one dense SwiGLU MLP of ``num_shared_experts · d_ff`` hidden units."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
