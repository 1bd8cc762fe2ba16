"""The process group an expert-parallel exchange runs on: on gloo, one whose all-to-all receives first.

    group = exchange_group(ep_group)   # gloo: a companion over the same ranks; NCCL, HCCL, ...: ep_group itself
    fc.all_to_all_single(x, None, None, group.group_name)

Gloo's all-to-all sends to each peer before it receives from it, and a pair of
ranks shares one TCP connection. A rank's notice that it is ready to receive
then queues behind the megabytes it is already sending the other way, and the
peer cannot start its half until they have gone: the two directions take turns.
Measured on the emulated cluster (2 nodes x 1 rank, 1 Gbit/s), 8 MB all-to-all
took 35 or 70 ms at random with gloo's own (ideal 33.5) and 35-46 ms when every
receive is posted before any send; 16 MB over 2 x 2 and 4 x 2 ranks went from
140-210 and 195-310 ms to 131-149 and 202-236 ms (line rate: 134 and 201 ms).

The companion posts those receives and sends as gloo point-to-point messages,
which progress on gloo's transport threads, not on the group's worker threads,
so several exchanges in flight (chunks for overlap) also move at once. The
companion only runs all-to-alls; it is cached per group while the default group
lives: ``destroy_process_group`` lets it go.
"""

from __future__ import annotations

import datetime
import itertools
import os
import threading
import time

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import distributed_c10d as c10d

from moe_ascend.runtime.shared_memory import NOTE_SIZE, Inbox, Outbox, node_identity

BACKEND = "moe_ascend_gloo"
# Under the profiler each exchange marks its issue with this event (``#n`` appended) and records, by that name,
# the seconds until its last message was through: gloo's point-to-point work leaves no event of its own.
TRANSFER_EVENT = f"{BACKEND}:all_to_all"
transfer_seconds: dict[str, float] = {}
_MARKERS = itertools.count()
_TAGS = 1 << 24  # gloo's point-to-point tag space is ample; wrap well inside it
_DRAIN = datetime.timedelta(seconds=30)  # shutdown waits this long for peers to read what is still posted

_COMPANIONS: dict[str, "ReceiveFirstGroup"] = {}  # by their own names; dropped as destroy_process_group shuts them


def exchange_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """The group ``group``'s all-to-alls should run on: its receive-first companion on gloo, else itself.

    Only the group's members call this (each builds the layer that uses it), in any order: the
    companion's rendezvous is among them, under a name derived from the group's own.
    """
    if dist.get_backend(group) != "gloo":
        return group
    name = f"{group.group_name}:receive_first"
    if name not in _COMPANIONS:
        _COMPANIONS[name] = _companion(group, name)
    return _COMPANIONS[name]


class ReceiveFirstGroup(dist.ProcessGroup):
    """A gloo group's ranks whose ``all_to_all_single`` posts every receive before its first send."""

    def __init__(self, transport: dist.ProcessGroupGloo, name: str, pids_on_this_node: dict[int, int] | None = None):
        """``pids_on_this_node``: the peers (group rank → process id) that exchange through shared memory."""
        super().__init__(transport.rank(), transport.size())
        self.transport = transport
        self._name = name
        self._tags = itertools.count()  # one per exchange: every member issues them in the same order
        self.shared_peers = set(pids_on_this_node or {}) - {transport.rank()}
        if self.shared_peers:
            self.outbox, self.inbox = Outbox(transport.size()), Inbox(transport.rank(), pids_on_this_node)

    def getBackendName(self) -> str:
        return BACKEND

    @property
    def group_name(self) -> str:
        return self._name

    def _set_group_name(self, name: str) -> None:
        self._name = name

    def shutdown(self) -> None:
        """``destroy_process_group`` calls this: let the transport go now, not at interpreter exit (where a live
        gloo group can abort the process)."""
        _COMPANIONS.pop(self.group_name, None)
        if self.shared_peers:
            self.outbox.close(wait=_DRAIN)  # a peer that has not read the last blocks may still map a new ring
        self.transport.shutdown()

    def alltoall_base(self, output: Tensor, input: Tensor, output_split_sizes: list[int],
                      input_split_sizes: list[int], opts=None) -> dist.Work:
        if input.device.type != "cpu":  # gloo's point-to-point messages are host memory only
            return self.transport.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)
        size, me = self.size(), self.rank()
        received = output.split(output_split_sizes or [output.shape[0] // size] * size)
        sent = input.split(input_split_sizes or [input.shape[0] // size] * size)
        tag = next(self._tags) % _TAGS
        marker = None
        if torch.autograd.profiler._is_profiler_enabled:
            marker = f"{TRANSFER_EVENT}#{next(_MARKERS)}"
            torch.ops.profiler._record_function_exit._RecordFunction(torch.ops.profiler._record_function_enter_new(marker, None))
        issued = time.perf_counter()
        peers = [(me + step) % size for step in range(1, size)]
        # A block is copied out of shared memory into its rows of the output: they must be one run of memory.
        shared = [p for p in peers if p in self.shared_peers] if output.is_contiguous() else []
        notes = {p: torch.empty(NOTE_SIZE, dtype=torch.int64) for p in shared if received[p].numel()}
        works = [self.transport.recv([notes[p] if p in notes else received[p]], p, tag)
                 for p in peers if received[p].numel()]
        posted = {p: sent[p] for p in shared if sent[p].numel()}  # to the outbox; their notes go over TCP
        outgoing = dict(enumerate(sent)) | (self.outbox.post(posted) if posted else {})
        works += [self.transport.send([outgoing[p].contiguous()], p, tag) for p in peers if sent[p].numel()]
        received[me].copy_(sent[me])
        finish = (lambda: self._read_shared(notes, received)) if notes else None
        return ExchangeInFlight(works, finish) if marker is None else WatchedExchange(works, finish, marker, issued)

    def _read_shared(self, notes: dict[int, Tensor], received: list[Tensor]) -> None:
        """Copy each same-node peer's block out of its outbox (which flags it read)."""
        for peer, note in notes.items():
            self.inbox.read(peer, note, into=received[peer])


class ExchangeInFlight(dist.Work):
    """One exchange's point-to-point messages: waiting for it waits for them all."""

    def __init__(self, works: list[dist.Work], finish=None):
        """``finish``: run once, after the messages, to complete the output (the shared-memory copies)."""
        super().__init__()
        self.works, self.finish = works, finish

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        for work in self.works:
            work.wait() if timeout is None else work.wait(timeout)
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works) and self.wait()


class WatchedExchange(ExchangeInFlight):
    """``ExchangeInFlight`` whose arrival time is recorded as it happens (a thread waits for it), for the profiler."""

    def __init__(self, works: list[dist.Work], finish, marker: str, issued: float):
        super().__init__(works, finish)
        self.failure: BaseException | None = None
        self.watcher = threading.Thread(target=self._watch, args=(marker, issued), daemon=True)
        self.watcher.start()

    def _watch(self, marker: str, issued: float) -> None:
        try:
            super().wait()  # gloo's work is waited for once only, and the output finished: from here
            transfer_seconds[marker] = time.perf_counter() - issued
        except BaseException as failure:  # handed to whoever waits
            self.failure = failure

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        limit = timeout.total_seconds() or None if timeout is not None else None  # zero: no timeout
        self.watcher.join(limit)
        if self.watcher.is_alive():
            raise TimeoutError(f"an all-to-all on a receive-first group did not finish within {limit} s")
        if self.failure is not None:
            raise self.failure
        return True

    def is_completed(self) -> bool:
        return not self.watcher.is_alive()


def _companion(group: dist.ProcessGroup, name: str) -> ReceiveFirstGroup:
    store = dist.PrefixStore(f"moe_ascend/{name}/", c10d._get_default_store())
    timeout = group._get_backend(torch.device("cpu")).options._timeout
    companion = ReceiveFirstGroup(dist.ProcessGroupGloo(store, group.rank(), group.size(), timeout), name,
                                  _pids_on_this_node(store, group.rank(), group.size()))
    ranks = dist.get_process_group_ranks(group)
    c10d._register_pg_in_world(companion, backend_name=BACKEND, store=store, group_name=name,
                               backend_config=f"cpu:{BACKEND}",
                               rank_mapping={rank: index for index, rank in enumerate(ranks)})
    return companion


def _pids_on_this_node(store: dist.Store, rank: int, size: int) -> dict[int, int]:
    """The members (group rank → pid) that can map this rank's memory, this rank among them: each publishes
    its node's identity and pid; none when shared memory is off or unavailable here."""
    identity = node_identity() if os.environ.get("MOE_ASCEND_SHARED_MEMORY", "1") != "0" else None
    store.set(f"node/{rank}", f"{identity or ''}|{os.getpid()}")
    members = [store.get(f"node/{peer}").decode().split("|") for peer in range(size)]
    return {peer: int(pid) for peer, (theirs, pid) in enumerate(members) if identity and theirs == identity}
