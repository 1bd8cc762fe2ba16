"""The exchange's process group: on gloo, a companion whose all-to-all receives before it sends."""

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from moe_ascend.runtime.exchange_group import ReceiveFirstGroup, exchange_group
from distributed import run_ranks


def _exchanges_like_gloo(rank, world_size):
    world = dist.group.WORLD
    group = exchange_group(world)
    assert isinstance(group, ReceiveFirstGroup) and exchange_group(world) is group
    assert group.group_name != world.group_name and dist.get_process_group_ranks(group) == list(range(world_size))

    # Uneven splits, one of them empty: rank r sends (r + p) % 3 rows to peer p.
    send_splits = [(rank + peer) % 3 for peer in range(world_size)]
    receive_splits = [(peer + rank) % 3 for peer in range(world_size)]
    rows = torch.arange(sum(send_splits) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * rank
    expected = torch.empty(sum(receive_splits), 2)
    dist.all_to_all_single(expected, rows, receive_splits, send_splits)

    # Three exchanges in flight at once, waited for in reverse order.
    sent = rows.clone().requires_grad_()
    in_flight = [fc.all_to_all_single_autograd(sent * (i + 1), receive_splits, send_splits, group.group_name)
                 for i in range(3)]
    received = [fc.wait_tensor(t) for t in reversed(in_flight)][::-1]
    assert all(torch.equal(r, expected * (i + 1)) for i, r in enumerate(received))
    sum(r.sum() * (i + 1) for i, r in enumerate(received)).backward()  # the gradient goes back the other way
    assert torch.equal(sent.grad, torch.full_like(rows, 1 + 4 + 9))

    # A subgroup's companion is made by its members alone (rank 2 never asks).
    pair = dist.new_group([0, 1])
    if rank < 2:
        companion = exchange_group(pair)
        got = fc.wait_tensor(fc.all_to_all_single(torch.tensor([rank, rank + 10.0]), None, None, companion.group_name))
        assert got.tolist() == [0.0 + rank * 10, 1.0 + rank * 10]

    held = weakref.ref(group)
    del group, world
    dist.destroy_process_group()
    gc.collect()
    return held() is None


@pytest.mark.slow
def test_gloo_exchanges_run_on_a_receive_first_companion_that_matches_gloos_all_to_all():
    assert run_ranks(3, _exchanges_like_gloo) == [True, True, True]


def test_the_companion_posts_every_receive_before_its_first_send():
    class Recording:  # the gloo transport's point-to-point calls, in order
        def __init__(self):
            self.calls = []

        def rank(self):
            return 1

        def size(self):
            return 3

        def recv(self, tensors, peer, tag):
            self.calls.append(("recv", peer))
            return dist.Work()

        def send(self, tensors, peer, tag):
            self.calls.append(("send", peer))
            return dist.Work()

    transport = Recording()
    group = ReceiveFirstGroup(transport, "recording")
    group.alltoall_base(torch.empty(6), torch.arange(6.0), [], [], None)
    assert transport.calls == [("recv", 2), ("recv", 0), ("send", 2), ("send", 0)]


def test_other_backends_exchange_on_their_own_group(fake_two_ranks):
    assert exchange_group(dist.group.WORLD) is dist.group.WORLD
