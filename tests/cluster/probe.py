"""What the launcher tests run on every rank: ``probe.py groups|throughput|rates|crash|sleep``."""

import json
import sys
import time

import torch
import torch.distributed as dist

from moe_ascend.runtime.topology import Topology
from moe_ascend.runtime.launcher import end_process_group


def groups() -> dict:
    """Each rank's view of the cluster, and sums over its intra- and inter-node groups."""
    topology = Topology.detect()
    hierarchy = topology.process_groups()
    assert topology.process_groups() is hierarchy, "groups are created once"
    intra, inter = torch.tensor([float(dist.get_rank())]), torch.tensor([float(dist.get_rank())])
    dist.all_reduce(intra, group=hierarchy.intra)
    dist.all_reduce(inter, group=hierarchy.inter)
    return {"rank": dist.get_rank(), "node": topology.node, "local_rank": topology.local_rank,
            "intra_sum": intra.item(), "inter_sum": inter.item()}


def throughput(nbytes: int = 10_000_000) -> dict:
    """Rank 0 (node 0) sends ``nbytes`` to rank 1 (node 1): the second of two timed transfers."""
    message = torch.zeros(nbytes // 4)
    for _ in range(2):
        dist.barrier()
        started = time.perf_counter()
        if dist.get_rank() == 0:
            dist.send(message, 1)
        elif dist.get_rank() == 1:
            dist.recv(message, 0)
        dist.barrier()
        seconds = time.perf_counter() - started
    mtu = int(open("/sys/class/net/uplink/mtu").read())
    return {"rank": dist.get_rank(), "bits_per_s": nbytes * 8 / seconds, "uplink_mtu": mtu}


def rates(inter_bytes: int = 8_000_000, intra_bytes: int = 40_000_000) -> dict:
    """Every rank at once exchanges a message with its peer inside its node, then with its peer on the next node
    (both directions, as an all-to-all loads the links): the bytes each rank received over the time the last of
    them took (the ranks of a node share its links, not always evenly), the fastest of three (a busy moment of the
    machine only ever slows a round)."""
    topology = Topology.detect()
    rank, per_node = dist.get_rank(), topology.ranks_per_node
    peers = {"intra": rank ^ 1, "inter": (rank + per_node) % dist.get_world_size()}
    measured = {}
    for link, nbytes in (("intra", intra_bytes), ("inter", inter_bytes)):
        outgoing, incoming = torch.zeros(nbytes // 4), torch.empty(nbytes // 4)
        rounds = []
        for _ in range(3):
            dist.barrier()
            started = time.perf_counter()
            # the receive first: gloo's notice of it would otherwise queue behind this rank's own send
            for work in [dist.irecv(incoming, peers[link]), dist.isend(outgoing, peers[link])]:
                work.wait()
            dist.barrier()
            rounds.append(time.perf_counter() - started)
        measured[f"{link}_bytes_per_s"] = nbytes / min(rounds)
    return {"rank": rank, **measured}


def crash() -> dict:
    dist.barrier()
    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()  # rank 0 waits here for a peer that is gone
    return {}


def sleep() -> dict:
    dist.barrier()
    print("ready", flush=True)
    time.sleep(600)
    return {}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    print("RESULT " + json.dumps(globals()[sys.argv[1]]()), flush=True)
    end_process_group()
