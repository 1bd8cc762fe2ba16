"""Moving experts to a new placement: weights, gradients and optimizer state, all or nothing.

Each slot's state (its rows of ``w_gate_up`` and ``w_down``, their gradients,
and every optimizer state tensor with one row per slot, e.g. Adam's moments)
travels as raw bytes, so what arrives is bitwise what left. Every rank works
out the same transfers from the old and new placements (a slot whose expert
changes takes it from a slot on its own rank when one holds it, else from the
expert's first holder), so the sequence of collectives is the same on every
rank:

    1. all_reduce   the bytes per slot of each layer (every rank must agree)
    2. per layer    all_to_all the rows, then all_to_all their checksums
    3. all_reduce   "ok" (MIN): did every rank stage and verify everything?

Nothing is written until step 3 says every rank succeeded; a rank that fails
on the way (an exception while packing or verifying, a checksum that does not
match) still takes part in the remaining collectives with stand-in buffers,
so no rank hangs and all keep the old placement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_ascend.kernels.errors import MoEAscendError
from moe_ascend.runtime.balance.placement import Placement


class MigrationError(MoEAscendError, RuntimeError):
    """A migration that could not complete; every rank kept its old placement."""


@dataclass
class MigrationReport:
    committed: bool
    moved_slots: int  # slots whose expert changed, over all layers and ranks
    bytes_received: int  # by this rank
    seconds: float
    error: str | None = None


def slot_tensors(layer, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """Everything that belongs to one expert slot, each tensor with one row per local slot."""
    tensors = []
    for weight in (layer.w_gate_up, layer.w_down):
        tensors.append(weight.data)
        if weight.grad is not None:
            tensors.append(weight.grad)
        state = optimizer.state.get(weight, {}) if optimizer is not None else {}
        tensors += [state[key] for key in sorted(state)
                    if isinstance(state[key], torch.Tensor) and state[key].dim()
                    and state[key].shape[0] == weight.shape[0]]
    return tensors


def _row_bytes(tensor: torch.Tensor) -> int:
    return tensor[0].numel() * tensor.element_size()


def slot_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(map(_row_bytes, tensors))


def _rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[slots, bytes]``: each slot's state as raw bytes."""
    return torch.cat([t.detach().reshape(t.shape[0], -1).contiguous().view(torch.uint8) for t in tensors], dim=1)


def _write_rows(tensors: list[torch.Tensor], rows: torch.Tensor) -> None:
    at = 0
    for t in tensors:
        width = _row_bytes(t)
        t.detach().copy_(rows[:, at:at + width].contiguous().view(t.dtype).reshape(t.shape))
        at += width


def checksum(rows: torch.Tensor) -> torch.Tensor:
    """Per row: the bytes as 32-bit words, summed in blocks of 16, the block sums weighted by their position (a
    changed word, or a moved block, changes it; sums in place, no widened copy of the rows)."""
    pad = -rows.shape[1] % 64
    blocks_per_row = (rows.shape[1] + pad) // 64
    words = torch.nn.functional.pad(rows, (0, pad)).view(torch.int32).view(rows.shape[0], blocks_per_row, 16)
    blocks = words.sum(-1, dtype=torch.int64)
    return (blocks * (torch.arange(blocks.shape[1], dtype=torch.int64) % 65521 + 1)).sum(1)


def transfers(old: Placement, new: Placement) -> list[tuple[int, int]]:
    """``(source slot, destination slot)`` for every slot whose expert changes, the same list on every rank."""
    pairs = []
    for slot, expert in enumerate(new.slot_experts):
        if old.slot_experts[slot] == expert:
            continue
        holders = old.replicas(expert)
        local = [s for s in holders if old.rank_of(s) == new.rank_of(slot)]
        pairs.append(((local or holders)[0], slot))
    return pairs


def migrate(layers: list, new_placements: list[Placement], optimizer: torch.optim.Optimizer | None,
            group: dist.ProcessGroup | None = None, fault: Callable[[str], None] | None = None) -> MigrationReport:
    """Move every layer to its new placement, or (on any rank's failure) none of them on any rank.

    ``fault(stage)`` is called at "packed" and "exchanged" on each rank: tests inject errors there.
    """
    started = time.perf_counter()
    group = group or dist.group.WORLD
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    failure: str | None = None

    def guarded(stage: str, work: Callable[[], object]):
        nonlocal failure
        if failure is not None:
            return None
        try:
            value = work()
            if fault is not None:
                fault(stage)
            return value
        except Exception as exc:  # noqa: BLE001 (any failure must still reach the agreement below)
            failure = f"rank {rank}, {stage}: {type(exc).__name__}: {exc}"
            return None

    tensors = [slot_tensors(layer, optimizer) for layer in layers]
    widths = torch.tensor([slot_bytes(t) for t in tensors] * 2, dtype=torch.int64)
    widths[len(layers):] *= -1
    agreed = widths.clone()
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(agreed, widths):
        raise MigrationError("ranks disagree on the state each expert slot holds (gradients present on some ranks "
                             "only, or different optimizers); migrate right after optimizer.step() on every rank")

    staged, moved, received_bytes = [], 0, 0
    for layer, layer_tensors, new in zip(layers, tensors, new_placements):
        old = layer.placement
        pairs = transfers(old, new)
        moved += len(pairs)
        per_rank, width = old.slots_per_rank, slot_bytes(layer_tensors)
        outgoing = sorted((p for p in pairs if old.rank_of(p[0]) == rank and new.rank_of(p[1]) != rank),
                          key=lambda p: (new.rank_of(p[1]), p[1]))
        incoming = sorted((p for p in pairs if new.rank_of(p[1]) == rank and old.rank_of(p[0]) != rank),
                          key=lambda p: (old.rank_of(p[0]), p[1]))
        send_counts = [sum(new.rank_of(d) == r for _, d in outgoing) for r in range(ranks)]
        recv_counts = [sum(old.rank_of(s) == r for s, _ in incoming) for r in range(ranks)]

        rows = guarded("packed", lambda: _rows(layer_tensors))
        send = (rows[[s - rank * per_rank for s, _ in outgoing]] if rows is not None
                else torch.zeros(len(outgoing), width, dtype=torch.uint8))
        arrived = torch.empty(len(incoming), width, dtype=torch.uint8)
        dist.all_to_all_single(arrived.view(-1), send.reshape(-1), [c * width for c in recv_counts],
                               [c * width for c in send_counts], group=group)
        sums = torch.empty(len(incoming), dtype=torch.int64)
        dist.all_to_all_single(sums, checksum(send), recv_counts, send_counts, group=group)
        received_bytes += arrived.numel()

        def assemble(rows=rows, pairs=pairs, incoming=incoming, arrived=arrived, sums=sums, old=old):
            if not torch.equal(checksum(arrived), sums):
                raise MigrationError("an expert's state arrived with a different checksum than it left with")
            result = rows.clone()
            for source, slot in pairs:
                if new.rank_of(slot) == rank and old.rank_of(source) == rank:
                    result[slot - rank * per_rank] = rows[source - rank * per_rank]
            for (_, slot), row in zip(incoming, arrived):
                result[slot - rank * per_rank] = row
            return result

        staged.append(guarded("exchanged", assemble))

    ok = torch.tensor([0 if failure else 1], dtype=torch.int64)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not int(ok):
        return MigrationReport(False, moved, received_bytes, time.perf_counter() - started,
                               failure or "another rank failed; every rank kept the old placement")
    with torch.no_grad():
        for layer, layer_tensors, new, rows in zip(layers, tensors, new_placements, staged):
            _write_rows(layer_tensors, rows)
            layer.place(new)
    return MigrationReport(True, moved, received_bytes, time.perf_counter() - started)
