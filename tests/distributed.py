"""Run a function on N real processes joined by a gloo process group (plain multi-process, loopback), or a
script on the emulated cluster through ``moe-ascend launch``."""

import json
import os
import queue
import re
import subprocess
import sys
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_ascend.runtime.launcher import end_process_group, free_port, shaping_unavailable


def _rank_main(rank, world_size, port, fn, args, results, collective_timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout))
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        end_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 240.0, collective_timeout: float = 120.0) -> list:
    """``fn(rank, world_size, *args)`` on every rank; returns their results, or raises with the first rank's traceback.

    A collective that waits longer than ``collective_timeout`` fails on its rank (gloo's timeout); ranks that
    report nothing within ``timeout`` fail the call, named, as a hang.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(r, world_size, port, fn, args, results, collective_timeout))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes = {}
    try:
        for _ in range(world_size):
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                silent = sorted(set(range(world_size)) - set(outcomes))
                raise AssertionError(f"ranks {silent} did not finish within {timeout:.0f} s: a hang") from None
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            outcomes[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [outcomes[r] for r in range(world_size)]


def launch(nodes: int, ranks_per_node: int, script: str, *args: str, timeout: float = 400,
           flags: tuple[str, ...] = ()) -> list[dict]:
    """``script ARGS`` on the emulated cluster (loopback without root), ``flags`` given to ``moe-ascend launch``:
    every rank's ``RESULT {json}`` line, by rank."""
    done = subprocess.run([sys.executable, "-m", "moe_ascend.compiler.cli", "launch", "--nodes", str(nodes),
                           "--ranks-per-node", str(ranks_per_node), *flags, "--", script, *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    found = [json.loads(m) for m in re.findall(r"^\[r\d+\] RESULT (.*)$", done.stdout, flags=re.M)]
    assert len(found) == nodes * ranks_per_node, done.stdout[-4000:]
    return sorted(found, key=lambda r: r["rank"])


def alone_on_the_emulated_cluster(test):
    """A test on the emulated cluster that runs alone on the machine (``exclusive``: it measures the links or the
    steps, or looks at every namespace); multi-process, so ``slow``; skipped where the cluster cannot be built."""
    unavailable = shaping_unavailable()
    return pytest.mark.exclusive(pytest.mark.slow(pytest.mark.skipif(
        unavailable is not None, reason=f"no emulated cluster here: {unavailable}")(test)))
