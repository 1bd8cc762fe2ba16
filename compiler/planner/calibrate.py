"""``moe-ascend calibrate``: a hardware profile of this machine's emulated cluster, measured.

    moe-ascend calibrate --out cpu-calibrated.yaml [--inter-node-bandwidth 1gbit] [--inter-node-latency 100us]

Each micro-benchmark runs as the ranks of a training job run (launched on the emulated cluster, one thread,
the launcher's heap settings; the compute ones on both ranks of a node at once, which share caches and memory,
keeping the slowest rank's figure) and keeps the median of a few repeats:

    matmul      [m, h] @ [h, h] in fp32 on one thread, forward and backward (3 x 2·m·h² FLOP), for m in
                ``ROWS``: fitted to the step model's curve rate(m) = R · m / (m + m½), a line in 1/m
                (1/rate = 1/R + (m½/R) · 1/m)
    experts     SwiGLU experts as the MoE layer runs them (``grouped_mm_batched``), forward and backward, m rows
                for each of 4 experts: the same fit, for the expert matmuls
    memory      a 64 MiB copy: bytes read plus bytes written, per second
    attention   causal scaled-dot-product attention, forward and backward, on [4, 4, 256, 64] (3 x 2·T·s·h FLOP)
    optimizer   one Adam step over 4 M fp32 weights: the 28 bytes a weight it reads and writes, per second
    intra-node  an all-to-all between the two ranks of one node (its namespace's loopback), on the group
                the MoE layers exchange on (``runtime.exchange_group``), back to back, and the small ones
                again each after a few milliseconds of matmuls, as a step issues its exchanges
    inter-node  the same between two nodes of one rank, across the shaped uplinks
    overlap     on each link, a 4 MiB all-to-all issued before about as long of matmuls: the share of it they hide

Each link's times are fitted to ``latency + bytes / bandwidth``, bytes being what one rank sends to the
other (half its buffer): the bandwidth from the back-to-back exchanges (a link whose latency still sets the
time at 8 MiB gets larger buffers), the latency from those after compute.
``compute_here`` and ``link_here`` measure inside any job: ``compiler.planner.measured`` runs them beside its
steps. The profile's rates are what was reached, so its ``matmul_efficiency`` is 1;
``memory_bytes`` is the machine's memory over the two ranks the emulated layouts run at once.
"""

from __future__ import annotations

import dataclasses
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
EXPERT_ROWS = (32, 128, 512, 2048)  # rows for each expert
HIDDEN = 512
SIZES = tuple(1 << p for p in range(12, 24, 2))  # bytes of each rank's buffer: 4 KiB … 8 MiB
LARGEST = 1 << 27  # a buffer link_here grows to at most, on a link whose latency hides 8 MiB
RANKS_PER_MACHINE = 2  # the emulated layouts' ranks at once, one per core (DESIGN.md, "Benchmarks")
BETWEEN_EXCHANGES = 0.005  # seconds of matmuls before each exchange that sets the latency (layers compute between)
LATENCY_SIZES = SIZES[:4]  # buffers whose exchange time is mostly latency: 4 KiB ... 256 KiB


@dataclass
class Link:
    latency: float  # seconds, of an exchange issued after compute
    bandwidth: float  # bytes per second, one direction
    overlap: float | None = None  # the share of an exchange on it that computation hides (measure_overlap)
    samples: list = dataclasses.field(default_factory=list)  # (bytes sent, seconds) back to back: the bandwidth
    after_compute: list = dataclasses.field(default_factory=list)  # (bytes sent, seconds) after matmuls: the latency


def pooled(links: list[dict]) -> dict:
    """One link fitted to the samples of several measurements of it (``Link`` as dicts), their mean overlap: the
    fit of all the points, where a mean of fits follows the worst one."""
    samples = [sample for link in links for sample in link["samples"]]
    after_compute = [sample for link in links for sample in link["after_compute"]]
    fitted = fit_link(*zip(*samples), after_compute=after_compute)
    return dataclasses.asdict(dataclasses.replace(fitted, overlap=float(np.mean([link["overlap"] for link in links]))))


def fit_matmul(rows, flops_per_s) -> tuple[float, float]:
    """``(R, m½)`` of ``rate(m) = R · m / (m + m½)`` through the measured rates, by least relative squares in 1/m."""
    inverse = 1 / np.asarray(flops_per_s, float)
    slope, intercept = np.polyfit(1 / np.asarray(rows, float), inverse, 1, w=1 / inverse)  # relative errors
    if intercept <= 0:
        raise CalibrationError("the matmul rates do not level off with more rows; rerun on an idle machine")
    return 1 / intercept, max(0.0, slope / intercept)


def fit_link(sent_bytes, seconds, after_compute=()) -> Link:
    """``latency + bytes / bandwidth`` through the measured times: the bandwidth from the Theil-Sen slope of the
    back-to-back exchanges (the median of the slopes between every two sizes: one exchange slowed by a busy host
    moves it little, where it could turn a least-squares slope negative), the latency the median of what the
    bandwidth leaves unexplained, in the exchanges issued after compute where there are some."""
    sent_bytes, seconds = np.asarray(sent_bytes, float), np.asarray(seconds, float)
    per_byte = theil_sen_slope(sent_bytes, seconds)
    if per_byte * sent_bytes.max() <= 0.01 * seconds.max():  # the bytes explain (almost) none of the time
        raise CalibrationError("the exchange did not take longer for more bytes; rerun on an idle machine")
    latency_bytes, latency_seconds = (np.asarray(list(zip(*after_compute)), float) if len(after_compute)
                                      else (sent_bytes, seconds))
    return Link(max(float(np.median(latency_seconds - latency_bytes * per_byte)), 0.0), 1 / per_byte,
                samples=[[float(b), float(t)] for b, t in zip(sent_bytes, seconds)],
                after_compute=[[float(b), float(t)] for b, t in after_compute])


def theil_sen_slope(x: np.ndarray, y: np.ndarray) -> float:
    """The median of the slopes through every two points of distinct ``x``."""
    i, j = np.triu_indices(len(x), k=1)
    distinct = x[j] != x[i]
    return float(np.median((y[j] - y[i])[distinct] / (x[j] - x[i])[distinct]))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _forward_backward(fn, *inputs):
    """A function that runs ``fn(*inputs)`` and its backward, for inputs that need gradients."""
    def run():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return run


def measure_matmul(rows=ROWS, hidden: int = HIDDEN, repeats: int = 5) -> dict:
    torch.set_num_threads(1)
    weight = torch.randn(hidden, hidden, requires_grad=True)
    rates = []
    for m in rows:
        x = torch.randn(m, hidden, requires_grad=True)
        rates.append(6 * m * hidden * hidden / _median_seconds(_forward_backward(torch.matmul, x, weight), repeats))
    peak, half = fit_matmul(rows, rates)
    return {"rows": list(rows), "flops_per_s": rates, "matmul_flops": peak, "rows_at_half_efficiency": half}


def measure_expert_matmul(rows=EXPERT_ROWS, experts: int = 4, hidden: int = HIDDEN, ffn: int = HIDDEN,
                          repeats: int = 5) -> dict:
    rates = [expert_matmul_rate(m, experts, hidden, ffn, repeats) for m in rows]
    peak, half = fit_matmul(rows, rates)
    return {"rows": list(rows), "flops_per_s": rates, "expert_matmul_flops": peak,
            "expert_rows_at_half_efficiency": half}


def expert_matmul_rate(rows: int, experts: int = 4, hidden: int = HIDDEN, ffn: int = HIDDEN, repeats: int = 5) -> float:
    """FLOP/s of SwiGLU experts as the MoE layer runs them (``grouped_mm_batched``), forward and backward, ``rows``
    rows for each of ``experts``, on one thread."""
    import torch.nn.functional as F

    import moe_ascend.kernels as ops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    w_gate_up = torch.randn(experts, hidden, 2 * ffn, requires_grad=True)
    w_down = torch.randn(experts, ffn, hidden, requires_grad=True)

    def swiglu(x):
        gate, up = ops.grouped_mm_batched(x, w_gate_up).chunk(2, dim=-1)
        return ops.grouped_mm_batched(F.silu(gate) * up, w_down)

    x = torch.randn(experts, rows, hidden, requires_grad=True)
    try:
        return 18 * experts * rows * hidden * ffn / _median_seconds(_forward_backward(swiglu, x), repeats)
    finally:
        torch.set_num_threads(threads)


def measure_memory(megabytes: int = 64, repeats: int = 5) -> float:
    source = torch.empty(megabytes << 18)  # fp32: megabytes MiB
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / _median_seconds(lambda: target.copy_(source), repeats)


def measure_attention(shape=(4, 4, 256, 64), repeats: int = 5) -> float:
    import torch.nn.functional as F

    torch.set_num_threads(1)
    batch, heads, sequence, head_dim = shape
    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
    causal = _forward_backward(lambda *qkv: F.scaled_dot_product_attention(*qkv, is_causal=True), q, k, v)
    return 3 * 2 * batch * sequence * sequence * heads * head_dim / _median_seconds(causal, repeats)


def measure_optimizer(weights: int = 4 << 20, repeats: int = 5) -> float:
    torch.set_num_threads(1)
    weight = torch.nn.Parameter(torch.randn(weights))
    weight.grad = torch.randn(weights)
    optimizer = torch.optim.Adam([weight], lr=1e-4)
    return 28 * weights / _median_seconds(optimizer.step, repeats)


def largest_over_ranks(value: float) -> float:
    """The largest of every rank's ``value``, on every rank (a step's time is its slowest rank's)."""
    import torch.distributed as dist

    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def mean_over_ranks(value: float) -> float:
    """The mean of every rank's ``value``, on every rank."""
    import torch.distributed as dist

    t = torch.tensor([value])
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _matmuls_lasting(seconds: float, repeats: int):
    """A function that runs as many [256, h] @ [h, h] matmuls as take about ``seconds`` on the slowest rank (every
    rank runs the same count)."""
    x, weight = torch.randn(256, HIDDEN), torch.randn(HIDDEN, HIDDEN)
    count = max(1, round(seconds / largest_over_ranks(_median_seconds(lambda: x @ weight, repeats))))

    def matmuls():
        for _ in range(count):
            x @ weight
    return matmuls


def _exchange_once(buffer: torch.Tensor, group: str):
    """One all-to-all of ``buffer`` on ``group``, waited for."""
    import torch.distributed._functional_collectives as fc

    return fc.wait_tensor(fc.all_to_all_single(buffer, None, None, group))


def _layers_exchange_group() -> str:
    import torch.distributed as dist

    from moe_ascend.runtime.exchange_group import exchange_group

    return exchange_group(dist.group.WORLD).group_name


def measure_exchange(sizes=SIZES, repeats: int = 5, after_compute: bool = False) -> list[float]:
    """On each rank of a two-rank job: the median seconds of an all-to-all of each buffer size on the group the
    MoE layers exchange on (``runtime.exchange_group``: gloo's own all-to-all takes the two directions in turns),
    averaged over the ranks (every rank returns the same times).

    Back to back, or each one ``after_compute``: issued after ``BETWEEN_EXCHANGES`` of matmuls, as a step issues
    its exchanges. Then the ranks arrive apart and the link's threads have gone idle, which back-to-back exchanges
    hide (measured on 2 x 1 ranks at 1 Gbit/s: 128 KB took 2.2 ms back to back, 3.1-3.6 ms after 6 ms of
    matmuls). The rank that arrives first waits for the other: the mean over the ranks counts half of that wait,
    what a step loses on average."""
    group = _layers_exchange_group()
    compute = _matmuls_lasting(BETWEEN_EXCHANGES, repeats) if after_compute else (lambda: None)
    times = []
    for size in sizes:
        buffer = torch.zeros(size // 4)
        _exchange_once(buffer, group)  # warm-up
        mine = []
        for _ in range(repeats):
            compute()
            started = time.perf_counter()
            _exchange_once(buffer, group)
            mine.append(time.perf_counter() - started)
        times.append(mean_over_ranks(statistics.median(mine)))
    return times


def measure_overlap(buffer_bytes: int = 4 << 20, repeats: int = 5) -> float:
    """On each rank of a two-rank job: the share of an all-to-all (on the layers' exchange group) that matmuls
    issued after it hide, ``(t_exchange + t_matmuls - t_both) / min(t_exchange, t_matmuls)``, with as many matmuls
    as take about as long as the exchange; the slowest rank's (the least)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    group = _layers_exchange_group()
    buffer = torch.zeros(buffer_bytes // 4)
    # every rank takes the slowest rank's times, so all of them size the same loop
    exchange = largest_over_ranks(_median_seconds(lambda: _exchange_once(buffer, group), repeats))
    matmuls = _matmuls_lasting(exchange, repeats)

    def both():
        sent = fc.all_to_all_single(buffer, None, None, group)
        matmuls()
        fc.wait_tensor(sent)

    compute = largest_over_ranks(_median_seconds(matmuls, repeats))
    together = largest_over_ranks(_median_seconds(both, repeats))
    hidden = torch.tensor([(exchange + compute - together) / min(exchange, compute)])
    dist.all_reduce(hidden, op=dist.ReduceOp.MIN)
    return min(1.0, max(0.0, float(hidden)))


def _launched(nodes: int, ranks_per_node: int, bandwidth: str, latency: str, job: list[str]) -> dict:
    """Rank 0's JSON of ``python -m moe_ascend.compiler.planner.calibrate JOB OUT ...`` on the emulated cluster of
    that shape: every micro-benchmark runs as a rank of a measured job runs (one thread, the launcher's heap
    settings)."""
    from moe_ascend.runtime.launcher import ClusterSpec, launch

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "measured.json"
        command = [sys.executable, "-m", "moe_ascend.compiler.planner.calibrate", job[0], str(out), *job[1:]]
        log = Path(folder) / "job.log"
        with open(log, "w") as written:
            code = launch(ClusterSpec(nodes, ranks_per_node, bandwidth, latency), command, out=written)
        if code != 0 or not out.exists():
            tail = "\n".join(log.read_text().splitlines()[-12:])
            raise CalibrationError(f"the {job[0]} benchmark on {nodes} x {ranks_per_node} failed (exit {code}):\n"
                                   f"{tail}")
        return json.loads(out.read_text())


def measure_link(nodes: int, ranks_per_node: int, bandwidth: str, latency: str, sizes=SIZES,
                 repeats: int = 5) -> tuple[Link, dict]:
    """``link_here`` on the emulated cluster of that shape, and the cluster as the launcher applied it
    (``latency_shaped`` is false on a kernel without netem)."""
    measured = _launched(nodes, ranks_per_node, bandwidth, latency, ["exchange", str(repeats), *map(str, sizes)])
    if nodes > 1 and not (measured["cluster"] or {}).get("shaped"):
        raise CalibrationError("the inter-node link was not shaped (calibrate needs root and iproute2, as "
                               "`moe-ascend launch` does); `moe-ascend doctor` says what is missing")
    return Link(**measured["link"]), measured["cluster"] or {}


ATTEMPTS = 3  # measurements of a link before its calibration gives up


def link_here(sizes=SIZES, repeats: int = 5) -> Link:
    """On every rank of a two-rank job: the exchange's times fitted to ``latency + bytes / bandwidth`` (bytes: what
    one rank sends the other, half its buffer; the bandwidth from back-to-back exchanges, the latency from small
    ones after compute), and the share of it computation hides. A fast link gets larger buffers until the bytes,
    not the latency, set the largest one's time."""
    sizes, times = list(sizes), measure_exchange(sizes, repeats)
    while times[-1] < 4 * times[0] and sizes[-1] < LARGEST:
        sizes.append(4 * sizes[-1])
        times += measure_exchange(sizes[-1:], repeats)  # every rank gets the same times: they loop alike
    after = measure_exchange(LATENCY_SIZES, repeats, after_compute=True)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            link = fit_link([size / 2 for size in sizes], times,
                            [(size / 2, t) for size, t in zip(LATENCY_SIZES, after)])
            break
        except CalibrationError:
            if attempt == ATTEMPTS:
                raise
            # a busy host: measure the sizes again, and fit every sample taken (the ranks decide alike)
            sizes, times = sizes + sizes, times + measure_exchange(sizes, repeats)
    return dataclasses.replace(link, overlap=measure_overlap(repeats=repeats))


def compute_here(repeats: int = 5) -> dict:
    """On every rank of a job at once, as the ranks of a measured job compute beside each other (sharing caches
    and memory): matmul, experts, memory, attention and Adam, as the slowest rank measured them."""
    import torch.distributed as dist

    measured = {}
    for name, measure in (("matmul", measure_matmul), ("experts", measure_expert_matmul), ("memory", measure_memory),
                          ("attention", measure_attention), ("optimizer", measure_optimizer)):
        dist.barrier()  # the ranks run each benchmark side by side
        measured[name] = measure(repeats=repeats)
    return _slowest(measured)


def compute_profile(compute: dict) -> dict:
    """The ``step_model.Hardware`` keys that ``compute_here``'s measurements give."""
    matmul, experts = compute["matmul"], compute["experts"]
    return {"matmul_flops": matmul["matmul_flops"], "matmul_efficiency": 1.0,
            "rows_at_half_efficiency": matmul["rows_at_half_efficiency"], "memory_bandwidth": compute["memory"],
            "expert_matmul_flops": experts["expert_matmul_flops"],
            "expert_rows_at_half_efficiency": experts["expert_rows_at_half_efficiency"],
            "attention_flops": compute["attention"], "optimizer_bandwidth": compute["optimizer"]}


def calibrate(bandwidth: str = "1gbit", latency: str = "100us", sizes=SIZES, repeats: int = 5,
              log=lambda line: print(line, file=sys.stderr, flush=True)) -> tuple[dict, str]:
    """The measured profile, as the keys of ``step_model.Hardware``, and a line on how it was measured."""
    compute = compute_profile(_launched(1, RANKS_PER_MACHINE, bandwidth, latency, ["compute", str(repeats)]))
    log(f"matmul: {compute['matmul_flops'] / 1e9:.1f} GFLOP/s, half of it at {compute['rows_at_half_efficiency']:.0f} "
        f"rows; experts: {compute['expert_matmul_flops'] / 1e9:.1f} GFLOP/s, half at "
        f"{compute['expert_rows_at_half_efficiency']:.0f} rows")
    log(f"memory: {compute['memory_bandwidth'] / 1e9:.2f} GB/s; attention: {compute['attention_flops'] / 1e9:.1f} "
        f"GFLOP/s; Adam: {compute['optimizer_bandwidth'] / 1e9:.2f} GB/s")
    intra, _ = measure_link(1, 2, bandwidth, latency, sizes, repeats)
    log(f"intra-node: {intra.bandwidth / 1e9:.2f} GB/s, {intra.latency * 1e6:.0f} us, "
        f"{intra.overlap:.0%} hidden under matmuls")
    inter, cluster = measure_link(2, 1, bandwidth, latency, sizes, repeats)
    delay = f"{latency} delay" if cluster.get("latency_shaped") else "no added delay (this kernel has no netem)"
    log(f"inter-node ({bandwidth}, {delay}): {inter.bandwidth / 1e6:.1f} MB/s, {inter.latency * 1e6:.0f} us, "
        f"{inter.overlap:.0%} hidden under matmuls")
    how = (f"Measured by `moe-ascend calibrate` on {os.uname().nodename}, {time.strftime('%Y-%m-%d')}: one-thread "
           f"CPU ranks, two at once, nodes joined by {bandwidth} uplinks with {delay}.")
    return {
        "name": "cpu-calibrated", **compute,
        "memory_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // RANKS_PER_MACHINE),
        "ranks_per_node": 1, "intra_node_bandwidth": intra.bandwidth, "inter_node_bandwidth": inter.bandwidth,
        "intra_node_latency": intra.latency, "inter_node_latency": inter.latency, "overlap_efficiency": inter.overlap,
    }, how


def write_profile(profile: dict, path: Path, how: str) -> None:
    lines = [f"# {how}"]
    lines += [f"{key}: {value!r}" if isinstance(value, str) else f"{key}: {value:.6g}"
              for key, value in profile.items()]
    path.write_text("\n".join(lines) + "\n")


def _worker(job: str, out: str, repeats: str = "5", *sizes: str) -> None:
    """One rank of a ``_launched`` job: ``exchange`` (``measure_link``'s) or ``compute`` (``calibrate``'s)."""
    import torch.distributed as dist

    from moe_ascend.runtime.launcher import cluster_from_environment, end_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if job == "compute":
            measured = compute_here(int(repeats))
        else:
            link = link_here([int(s) for s in sizes] or SIZES, int(repeats))
            measured = {"link": dataclasses.asdict(link), "cluster": cluster_from_environment()}
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(measured))
    finally:
        end_process_group()


def _slowest(rates: dict) -> dict:
    """``rates`` (numbers, or the dicts ``measure_matmul`` returns) as the slowest rank measured them: the least
    rate, or the whole result of the rank with the least fitted peak."""
    import torch.distributed as dist

    slowest = {}
    for name, value in rates.items():
        mine = value if isinstance(value, float) else next(v for k, v in value.items() if k.endswith("matmul_flops"))
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (mine, value))
        slowest[name] = min(everyone, key=lambda pair: pair[0])[1]
    return slowest


if __name__ == "__main__":
    _worker(*sys.argv[1:])
