"""Dispatch + combine time and inter-node bytes, flat vs hierarchical all-to-all, on the emulated cluster.

For each regime (the links scaled to an Ascend 910B cluster's balance, then
1 Gbit/s between nodes), each layout (2 x 2 and 4 x 2 ranks) and each top-k
(2, 4, 8, 16 of 64 experts), every rank routes its tokens at random and runs
the dropless exchange both ways, alternating which goes first (the
hierarchical one pipelined in ``--chunks`` pieces); the experts are the
identity (communication only, so more ranks than cores is fine, DESIGN.md).
A step's time is the slowest rank's. Bytes are what the exchanges hand to the
inter-node links (tokens and routes; the counts are a few bytes), counted from
their split sizes; the node's uplink counter (``tx_bytes``, headers included)
is read beside them.

Beside the two, ``link_only`` sends the hierarchical exchange's step-1 rows (tokens and routes) to the other nodes
and their sums back, with nothing else: the time this machine's shaped link and TCP need for those bytes, the
ceiling of the hierarchical exchange here (its other work is the intra-node step and the host-side gathers and
sums, on cores the ranks share). Each contender's ``cpu_s`` is every rank's CPU time (user and system) over the
machine's cores: where it comes near the wall time, the cores, not the link, set the pace. ``host_comm_share``
is the busiest rank's own CPU seconds in the hierarchical exchange over its wall time: the regime's fidelity
(a NIC moves the bytes without the host's cores).

The predicted byte ratio is the expected number of distinct remote nodes of a
token over its expected number of remote experts, for uniform routing.

    python bench/a2a.py                        # both layouts (launches the cluster itself)
    python bench/a2a.py --layouts 4x2 --top-k 8 --regimes ascend-910b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_regime_arguments, anchored_figure, cpu_seconds, host_comm_share_checked, median,  # noqa: E402
                     run_layouts, write_cluster_result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_regime_arguments(parser, "2x2,4x2")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", default="2,4,8,16")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--width", type=int, default=1024, help="hidden size (fp32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=4, help="pipeline chunks of the hierarchical exchange")
    parser.add_argument("--json", default=None, help="output path (default bench/results/a2a.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    print(f"{'layout':<7}{'top-k':>6}{'flat ms':>10}{'hier ms':>10}{'speedup':>9}{'bytes h/f':>11}{'predicted':>11}"
          f"{'goodput':>9}{'link only':>11}{'hier cpu ms':>13}{'comm share':>12}", flush=True)
    worker_args = ["--experts", str(args.experts), "--top-k", args.top_k, "--tokens", str(args.tokens),
                   "--width", str(args.width), "--repeats", str(args.repeats), "--chunks", str(args.chunks)]

    def show(run: dict) -> None:
        print(f"{run['layout']:<7}{run['top_k']:>6}{run['flat_s'] * 1e3:>10.1f}{run['hierarchical_s'] * 1e3:>10.1f}"
              f"{run['speedup']:>9.2f}{run['inter_bytes_ratio']:>11.3f}{run['predicted_bytes_ratio']:>11.3f}"
              f"{run['hierarchical_goodput']:>9.2f}{run['link_only_goodput']:>11.2f}"
              f"{run['hierarchical_cpu_s'] * 1e3:>13.1f}{run['host_comm_share']:>12.3f}", flush=True)

    runs = run_layouts(__file__, args, worker_args, show)
    anchor = next((r for r in runs if r["layout"] == "4x2" and r["top_k"] == 8 and r["num_experts"] == 64), None)
    figure = anchored_figure(runs, "speedup_top8_e64_4x2", "speedup", 2.0, lambda r: r is anchor)
    share = host_comm_share_checked(anchor["host_comm_share"], anchor["layout"]) if anchor else None
    path = write_cluster_result("a2a", figure, runs, args,
                                goodput_top8_e64_4x2=anchor and anchor["hierarchical_goodput"],
                                host_comm_share=share, regime=anchor and anchor["regime"])
    print(f"speedup_top8_e64_4x2 = {figure['value']}  (goal >= 2.0), goodput_top8_e64_4x2 = "
          f"{anchor and anchor['hierarchical_goodput']} (goal >= 0.85), host_comm_share = {share} (goal <= 0.10)  "
          f"-> {path}")


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import moe_ascend.kernels as ops
    from moe_ascend.kernels import exchange as flat
    from moe_ascend.kernels.exchange import exchange
    from moe_ascend.kernels import hierarchical
    from moe_ascend.runtime import Topology
    from moe_ascend.runtime.exchange_group import exchange_group
    from moe_ascend.runtime.launcher import cluster_from_environment, end_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    topology = Topology.detect()
    groups = topology.process_groups()
    world, rank = topology.world_size, topology.rank
    h = topology.hierarchy()
    world_group = exchange_group(dist.group.WORLD).group_name
    cluster = cluster_from_environment()  # what the launcher really applied
    link_bits = cluster["bandwidth_bits_per_s"]

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def node_sum(value: float, group=groups.intra) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=group)
        return t.item()

    cores = len(os.sched_getaffinity(0))  # the emulated nodes share this machine's cores

    for top_k in (int(k) for k in args.top_k.split(",")):
        generator = torch.Generator().manual_seed(1000 * top_k + rank)
        tokens = torch.randn(args.tokens, args.width, generator=generator)
        weights, expert_ids = ops.topk_softmax(torch.randn(args.tokens, args.experts, generator=generator), top_k, True)

        def run_flat():
            rows, _, plan = flat.dropless_dispatch(tokens, expert_ids, args.experts, world, world_group)
            return flat.dropless_combine(rows, plan, weights, world_group), plan

        def run_hierarchical():  # the experts are the identity: what is timed is the exchange
            out = hierarchical.dropless_moe(tokens, expert_ids, weights, args.experts, h, identity, args.chunks)
            return out, step1

        row_width = args.width + 2 * args.experts // topology.nodes  # a step-1 row: the token and its route
        step1 = hierarchical.step1_plan(expert_ids, args.experts, h, args.chunks)
        step1_sent = [sum(sizes) for sizes in zip(*(chunk.splits[0] for chunk in step1))]
        step1_received = [sum(sizes) for sizes in zip(*(chunk.splits[1] for chunk in step1))]

        def run_link_only():  # the step-1 bytes there and back on the inter-node group, nothing else
            there = exchange(tokens.new_empty(sum(step1_sent), row_width), h.inter_group, step1_received, step1_sent)
            return exchange(there, h.inter_group, step1_sent, step1_received), step1

        contenders = {"flat": run_flat, "hierarchical": run_hierarchical, "link_only": run_link_only}
        outputs = {name: fn()[0] for name, fn in contenders.items()}  # warm-up, and the two exchanges must agree
        agree = torch.allclose(outputs["flat"], outputs["hierarchical"], rtol=1e-5, atol=1e-5)
        times = {name: [] for name in contenders}
        wire = {name: [] for name in contenders}
        cpu = {name: [] for name in contenders}  # every rank's CPU seconds over this machine's cores
        busiest_cpu = {name: [] for name in contenders}  # the busiest rank's own CPU seconds
        plans = {}
        for repeat in range(args.repeats):
            for name in (list(contenders) if repeat % 2 == 0 else list(contenders)[::-1]):
                dist.barrier()
                before, cpu_before = uplink_tx_bytes(), cpu_seconds()
                started = time.perf_counter()
                _, plans[name] = contenders[name]()
                elapsed, cpu_spent = time.perf_counter() - started, cpu_seconds() - cpu_before
                times[name].append(slowest(elapsed))
                cpu[name].append(node_sum(cpu_spent, dist.group.WORLD) / cores)
                busiest_cpu[name].append(slowest(cpu_spent))
                wire[name].append(node_sum(uplink_tx_bytes() - before if topology.local_rank == 0 else 0))
        element = tokens.element_size()
        flat_bytes = node_sum(flat_inter_bytes(plans["flat"], topology, args.width, element))
        route_bytes = 2 * args.experts // topology.nodes * weights.element_size()  # (present, weight) per node expert
        hier_bytes = node_sum(hierarchical_inter_bytes(plans["hierarchical"], topology, args.width, element,
                                                       route_bytes))
        flat_s, hier_s, link_s = (median(times[name]) for name in contenders)
        if rank == 0:
            print("RESULT " + json.dumps({
                "num_experts": args.experts, "top_k": top_k, "tokens_per_rank": args.tokens, "width": args.width,
                "flat_s": flat_s, "hierarchical_s": hier_s, "speedup": flat_s / hier_s,
                "flat_times_s": times["flat"], "hierarchical_times_s": times["hierarchical"],
                "link_only_s": link_s, "link_only_times_s": times["link_only"],
                "flat_inter_bytes_node0": flat_bytes, "hierarchical_inter_bytes_node0": hier_bytes,
                "inter_bytes_ratio": hier_bytes / flat_bytes,
                "predicted_bytes_ratio": predicted_ratio(args.experts, top_k, topology.nodes),
                "flat_uplink_tx_bytes_node0": median(wire["flat"]),
                "hierarchical_uplink_tx_bytes_node0": median(wire["hierarchical"]),
                # a node's inter-node bytes over the exchange's time, as a share of its uplink's rate
                "hierarchical_goodput": hier_bytes * 8 / hier_s / link_bits,
                "flat_goodput": flat_bytes * 8 / flat_s / link_bits,
                "link_only_goodput": hier_bytes * 8 / link_s / link_bits,
                "flat_cpu_s": median(cpu["flat"]), "hierarchical_cpu_s": median(cpu["hierarchical"]),
                "link_only_cpu_s": median(cpu["link_only"]), "cores": cores,
                # the fidelity of the regime: the busiest rank's CPU seconds in the exchange over its wire seconds
                "host_comm_share": median(busiest_cpu["hierarchical"]) / hier_s,
                "flat_host_comm_share": median(busiest_cpu["flat"]) / flat_s,
                "outputs_agree": agree, "shaped": cluster["shaped"],
            }), flush=True)
    end_process_group()


def identity(rows, tokens_per_expert):
    return rows


def flat_inter_bytes(plan, topology, width: int, element: int) -> float:
    """This rank's inter-node bytes, dispatch + combine: the rows it sent to ranks of other nodes, there and back."""
    remote_rows = sum(rows for rank, rows in enumerate(plan.send_splits)
                      if rank // topology.ranks_per_node != topology.node)
    return 2 * remote_rows * width * element


def hierarchical_inter_bytes(step1, topology, width: int, element: int, route_bytes: int) -> float:
    """The rows it sent to other nodes in step 1: there with their route, and their sums back."""
    remote_rows = sum(rows for chunk in step1 for node, rows in enumerate(chunk.splits[0]) if node != topology.node)
    return remote_rows * (2 * width * element + route_bytes)


def predicted_ratio(num_experts: int, top_k: int, nodes: int) -> float:
    """E[distinct remote nodes of a token] / E[remote experts of a token], top-k uniform without replacement."""
    per_node = num_experts // nodes
    miss = math.comb(num_experts - per_node, top_k) / math.comb(num_experts, top_k)
    return (nodes - 1) * (1 - miss) / (top_k * (nodes - 1) / nodes)


def uplink_tx_bytes() -> int:
    """Bytes this node's uplink has sent (0 outside the emulated cluster)."""
    path = Path("/sys/class/net/uplink/statistics/tx_bytes")
    return int(path.read_text()) if path.exists() else 0


if __name__ == "__main__":
    main()
