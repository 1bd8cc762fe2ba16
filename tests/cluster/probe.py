"""What the launcher tests run on every rank: ``probe.py groups|throughput|crash|sleep``."""

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
