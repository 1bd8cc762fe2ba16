"""``moe-ascend calibrate``: a hardware profile of this machine's emulated cluster, measured.

    moe-ascend calibrate --out cpu-calibrated.yaml [--inter-node-bandwidth 1gbit] [--inter-node-latency 100us]

Each micro-benchmark keeps the median of a few repeats:

    matmul      [m, h] @ [h, h] in fp32 on one thread, for m in ``ROWS``: fitted to the step model's curve
                rate(m) = R · m / (m + m½), a line in 1/m (1/rate = 1/R + (m½/R) · 1/m)
    memory      a 64 MiB copy: bytes read plus bytes written, per second
    intra-node  an all-to-all between the two ranks of one node (its namespace's loopback), on the group
                the MoE layers exchange on (``runtime.exchange_group``)
    inter-node  the same between two nodes of one rank, across the shaped uplinks

Each link's times are fitted to ``latency + bytes / bandwidth``, bytes being what one rank sends to the
other (half its buffer). The profile's rates are what was reached, so its ``matmul_efficiency`` is 1;
``memory_bytes`` is the machine's memory over the two ranks the emulated layouts run at once.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_ascend.kernels.errors import CalibrationError

ROWS = (16, 64, 256, 1024, 4096)
HIDDEN = 512
SIZES = tuple(1 << p for p in range(12, 24, 2))  # bytes of each rank's buffer: 4 KiB … 8 MiB
RANKS_PER_MACHINE = 2  # the emulated layouts' ranks at once, one per core (DESIGN.md, "Benchmarks")


@dataclass
class Link:
    latency: float  # seconds
    bandwidth: float  # bytes per second, one direction


def fit_matmul(rows, flops_per_s) -> tuple[float, float]:
    """``(R, m½)`` of ``rate(m) = R · m / (m + m½)`` through the measured rates, by least relative squares in 1/m."""
    inverse = 1 / np.asarray(flops_per_s, float)
    slope, intercept = np.polyfit(1 / np.asarray(rows, float), inverse, 1, w=1 / inverse)  # relative errors
    if intercept <= 0:
        raise CalibrationError("the matmul rates do not level off with more rows; rerun on an idle machine")
    return 1 / intercept, max(0.0, slope / intercept)


def fit_link(sent_bytes, seconds) -> Link:
    """``latency + bytes / bandwidth`` through the measured times: the bandwidth from the least-squares slope (the
    large sizes set it), the latency the median of what the bandwidth leaves unexplained (robust to one slow
    small exchange)."""
    sent_bytes, seconds = np.asarray(sent_bytes, float), np.asarray(seconds, float)
    per_byte = np.polyfit(sent_bytes, seconds, 1)[0]
    if per_byte * sent_bytes.max() <= 0.01 * seconds.max():  # the bytes explain (almost) none of the time
        raise CalibrationError("the exchange did not take longer for more bytes; rerun on an idle machine")
    return Link(max(float(np.median(seconds - sent_bytes * per_byte)), 0.0), 1 / per_byte)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_matmul(rows=ROWS, hidden: int = HIDDEN, repeats: int = 5) -> dict:
    torch.set_num_threads(1)
    weight = torch.randn(hidden, hidden)
    rates = []
    for m in rows:
        x = torch.randn(m, hidden)
        rates.append(2 * m * hidden * hidden / _median_seconds(lambda: x @ weight, repeats))
    peak, half = fit_matmul(rows, rates)
    return {"rows": list(rows), "flops_per_s": rates, "matmul_flops": peak, "rows_at_half_efficiency": half}


def measure_memory(megabytes: int = 64, repeats: int = 5) -> float:
    source = torch.empty(megabytes << 18)  # fp32: megabytes MiB
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / _median_seconds(lambda: target.copy_(source), repeats)


def measure_exchange(sizes=SIZES, repeats: int = 5) -> list[float]:
    """On each rank of a two-rank job: the median seconds of an all-to-all of each buffer size on the group the
    MoE layers exchange on (``runtime.exchange_group``: gloo's own all-to-all takes the two directions in turns),
    the slowest rank's, so both ranks report the same."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    from moe_ascend.runtime.exchange_group import exchange_group

    group = exchange_group(dist.group.WORLD).group_name
    times = []
    for size in sizes:
        buffer = torch.zeros(size // 4)
        seconds = torch.tensor(_median_seconds(lambda: fc.wait_tensor(fc.all_to_all_single(buffer, None, None, group)),
                                               repeats))
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        times.append(float(seconds))
    return times


def measure_link(nodes: int, ranks_per_node: int, bandwidth: str, latency: str, sizes, repeats: int) -> tuple[Link, dict]:
    """Run ``measure_exchange`` on the emulated cluster of that shape: its fitted times, and the cluster as the
    launcher applied it (``latency_shaped`` is false on a kernel without netem)."""
    from moe_ascend.runtime.launcher import ClusterSpec, launch

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "times.json"
        command = [sys.executable, "-m", "moe_ascend.compiler.calibrate", str(out), str(repeats), *map(str, sizes)]
        with open(os.devnull, "w") as quiet:
            code = launch(ClusterSpec(nodes, ranks_per_node, bandwidth, latency), command, out=quiet)
        if code != 0 or not out.exists():
            raise CalibrationError(f"the exchange benchmark on {nodes} x {ranks_per_node} failed (exit {code}); "
                                   f"run `moe-ascend launch --nodes {nodes} --ranks-per-node {ranks_per_node} -- "
                                   f"python -m moe_ascend.compiler.calibrate OUT` to see why")
        measured = json.loads(out.read_text())
    if nodes > 1 and not (measured["cluster"] or {}).get("shaped"):
        raise CalibrationError("the inter-node link was not shaped (calibrate needs root and iproute2, as "
                               "`moe-ascend launch` does); `moe-ascend doctor` says what is missing")
    return fit_link([size / 2 for size in sizes], measured["times"]), measured["cluster"] or {}


def calibrate(bandwidth: str = "1gbit", latency: str = "100us", sizes=SIZES, repeats: int = 5,
              log=lambda line: print(line, file=sys.stderr, flush=True)) -> tuple[dict, str]:
    """The measured profile, as the keys of ``step_model.Hardware``, and a line on how it was measured."""
    matmul = measure_matmul(repeats=repeats)
    log(f"matmul: {matmul['matmul_flops'] / 1e9:.1f} GFLOP/s, half of it at {matmul['rows_at_half_efficiency']:.0f} rows")
    memory = measure_memory(repeats=repeats)
    log(f"memory: {memory / 1e9:.2f} GB/s")
    intra, _ = measure_link(1, 2, bandwidth, latency, sizes, repeats)
    log(f"intra-node: {intra.bandwidth / 1e9:.2f} GB/s, {intra.latency * 1e6:.0f} us")
    inter, cluster = measure_link(2, 1, bandwidth, latency, sizes, repeats)
    delay = f"{latency} delay" if cluster.get("latency_shaped") else "no added delay (this kernel has no netem)"
    log(f"inter-node ({bandwidth}, {delay}): {inter.bandwidth / 1e6:.1f} MB/s, {inter.latency * 1e6:.0f} us")
    how = (f"Measured by `moe-ascend calibrate` on {os.uname().nodename}, {time.strftime('%Y-%m-%d')}: one-thread "
           f"CPU ranks, nodes joined by {bandwidth} uplinks with {delay}.")
    return {
        "name": "cpu-calibrated", "matmul_flops": matmul["matmul_flops"], "matmul_efficiency": 1.0,
        "rows_at_half_efficiency": matmul["rows_at_half_efficiency"], "memory_bandwidth": memory,
        "memory_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // RANKS_PER_MACHINE),
        "ranks_per_node": 1, "intra_node_bandwidth": intra.bandwidth, "inter_node_bandwidth": inter.bandwidth,
        "intra_node_latency": intra.latency, "inter_node_latency": inter.latency,
    }, how


def write_profile(profile: dict, path: Path, how: str) -> None:
    lines = [f"# {how}"]
    lines += [f"{key}: {value!r}" if isinstance(value, str) else f"{key}: {value:.6g}" for key, value in profile.items()]
    path.write_text("\n".join(lines) + "\n")


def _worker(out: str, repeats: str = "5", *sizes: str) -> None:
    """One rank of ``measure_link``'s job (run by the launcher)."""
    import torch.distributed as dist

    from moe_ascend.runtime.launcher import cluster_from_environment

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        times = measure_exchange([int(s) for s in sizes] or SIZES, int(repeats))
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps({"times": times, "cluster": cluster_from_environment()}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
