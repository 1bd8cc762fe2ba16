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
import threading
import time

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import distributed_c10d as c10d

BACKEND = "moe_ascend_gloo"
# Under the profiler each exchange marks its issue with this event (``#n`` appended) and records, by that name,
# the seconds until its last message was through: gloo's point-to-point work leaves no event of its own.
TRANSFER_EVENT = f"{BACKEND}:all_to_all"
transfer_seconds: dict[str, float] = {}
_MARKERS = itertools.count()
_TAGS = 1 << 24  # gloo's point-to-point tag space is ample; wrap well inside it

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

    def __init__(self, transport: dist.ProcessGroupGloo, name: str):
        super().__init__(transport.rank(), transport.size())
        self.transport = transport
        self._name = name
        self._tags = itertools.count()  # one per exchange: every member issues them in the same order

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
            torch.ops.profiler._record_function_exit._RecordFunction(
                torch.ops.profiler._record_function_enter_new(marker, None))
        issued = time.perf_counter()
        peers = [(me + step) % size for step in range(1, size)]
        works = [self.transport.recv([received[p]], p, tag) for p in peers if received[p].numel()]
        works += [self.transport.send([sent[p].contiguous()], p, tag) for p in peers if sent[p].numel()]
        received[me].copy_(sent[me])
        return ExchangeInFlight(works) if marker is None else WatchedExchange(works, marker, issued)


class ExchangeInFlight(dist.Work):
    """One exchange's point-to-point messages: waiting for it waits for them all."""

    def __init__(self, works: list[dist.Work]):
        super().__init__()
        self.works = works

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        for work in self.works:
            work.wait() if timeout is None else work.wait(timeout)
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


class WatchedExchange(ExchangeInFlight):
    """``ExchangeInFlight`` whose arrival time is recorded as it happens (a thread waits for it), for the profiler."""

    def __init__(self, works: list[dist.Work], marker: str, issued: float):
        super().__init__(works)
        self.failure: BaseException | None = None
        self.watcher = threading.Thread(target=self._watch, args=(marker, issued), daemon=True)
        self.watcher.start()

    def _watch(self, marker: str, issued: float) -> None:
        try:
            super().wait()  # gloo's work is waited for once only: from here
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


def _companion(group: dist.ProcessGroup, name: str) -> ReceiveFirstGroup:
    store = dist.PrefixStore(f"moe_ascend/{name}/", c10d._get_default_store())
    timeout = group._get_backend(torch.device("cpu")).options._timeout
    companion = ReceiveFirstGroup(dist.ProcessGroupGloo(store, group.rank(), group.size(), timeout), name)
    ranks = dist.get_process_group_ranks(group)
    c10d._register_pg_in_world(companion, backend_name=BACKEND, store=store, group_name=name,
                               backend_config=f"cpu:{BACKEND}",
                               rank_mapping={rank: index for index, rank in enumerate(ranks)})
    return companion
