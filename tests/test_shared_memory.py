"""Shared memory between a node's ranks: an outbox that never waits, read through the sender's /proc entry."""

import datetime
import os

import pytest
import torch

from moe_ascend.runtime import shared_memory
from moe_ascend.runtime.shared_memory import Inbox, Outbox, node_identity

pytestmark = pytest.mark.skipif(node_identity() is None, reason="needs memfd and /proc")
NOW = datetime.timedelta(0)


def test_a_block_posted_to_the_outbox_is_read_back_through_the_senders_proc_entry():
    outbox = Outbox(group_size=3)
    readers = {rank: Inbox(rank, {0: os.getpid()}) for rank in (1, 2)}
    blocks = {1: torch.arange(10.0).reshape(5, 2), 2: torch.arange(3, dtype=torch.int64)}
    notes = outbox.post(blocks)
    assert notes[2][2] % shared_memory.ALIGN == 0  # each block starts on a cache line
    received = {1: torch.empty(5, 2), 2: torch.empty(3, dtype=torch.int64)}
    readers[2].read(0, notes[2], received[2])
    assert not outbox.ring.drain()  # rank 1 has not read yet
    readers[1].read(0, notes[1], received[1])
    assert all(torch.equal(blocks[r], received[r]) for r in blocks)
    assert outbox.ring.drain()
    outbox.close(wait=NOW)


def test_a_full_outbox_grows_rather_than_waiting_and_releases_the_old_ring_once_it_is_read(monkeypatch):
    monkeypatch.setattr(shared_memory, "FIRST_RING", 1024)
    outbox, reader = Outbox(group_size=2), Inbox(1, {0: os.getpid()})
    blocks = [torch.full((100,), float(i)) for i in range(3)]  # 400 bytes each, after 64 of flags: two fit
    notes = [outbox.post({1: block})[1] for block in blocks]
    assert [note[0].item() for note in notes] == [0, 0, 1]  # the third went to a new ring, none waited
    assert outbox.ring.size >= 2048 and [ring.generation for ring in outbox.retired] == [0]

    received = torch.empty(100)
    reader.read(0, notes[0], received)
    assert torch.equal(received, blocks[0])
    outbox.post({1: torch.zeros(1)})
    assert outbox.retired  # ring 0 still holds the unread second block
    for note, block in zip(notes[1:], blocks[1:]):
        reader.read(0, note, received)
        assert torch.equal(received, block)
    note = outbox.post({1: torch.zeros(1)})[1]
    assert outbox.retired == [] and note[5].item() == 1  # released; readers are told to unmap it
    reader.read(0, note, torch.empty(1))
    assert sorted(reader.rings) == [(0, 1)]
    outbox.close(wait=NOW)


def test_the_ring_reuses_read_space_from_its_start():
    outbox, reader = Outbox(group_size=2), Inbox(1, {0: os.getpid()})
    half = torch.zeros(shared_memory.FIRST_RING // 8 - 16)  # with its 64 bytes of flags, half the ring
    first = outbox.post({1: half})[1]
    second = outbox.post({1: half})[1]
    reader.read(0, first, torch.empty_like(half))
    third = outbox.post({1: torch.zeros(16)})[1]
    assert third[0].item() == 0 and third[4].item() == 0  # ring 0 again, from its start
    assert second[4].item() == first[2].item() + half.numel() * 4
    outbox.close(wait=NOW)
