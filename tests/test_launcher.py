"""``moe-ascend launch``: namespaces per node, shaped uplinks, torchrun's environment, cleanup on every exit path."""

import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import alone_on_the_emulated_cluster

from moe_ascend.kernels.errors import LaunchError
from moe_ascend.runtime import launcher
from moe_ascend.runtime.launcher import ClusterSpec, parse_rate, parse_time

PROBE = str(Path(__file__).parent / "cluster" / "probe.py")


def run_launch(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_ascend.compiler.cli", "launch", *args], capture_output=True,
                          text=True, timeout=timeout)


def results(output: str) -> list[dict]:
    found = [json.loads(m) for m in re.findall(r"^\[r\d+\] RESULT (.*)$", output, flags=re.M)]
    return sorted(found, key=lambda r: r.get("rank", 0))


def our_namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return re.findall(rf"^{launcher.PREFIX}\d+-\S+", listed, flags=re.M)


def test_rates_and_times_read_as_tc_writes_them():
    assert parse_rate("1gbit") == 1e9 and parse_rate("200mbit") == 2e8 and parse_rate("500kbit") == 5e5
    assert parse_time("100us") == pytest.approx(1e-4) and parse_time("2ms") == pytest.approx(2e-3)
    with pytest.raises(LaunchError, match="'1gbit', '200mbit'"):
        parse_rate("fast")
    with pytest.raises(LaunchError, match="at least 1"):
        ClusterSpec(nodes=0, ranks_per_node=2)


def test_without_root_every_rank_runs_on_loopback_and_says_so(monkeypatch):
    monkeypatch.setattr(launcher, "shaping_unavailable", lambda: "not running as root")
    out = io.StringIO()
    code = launcher.launch(ClusterSpec(2, 1),
                           [sys.executable, "-c", "import os; print(os.environ['RANK'], os.environ['MASTER_ADDR'], "
                                                  "os.environ['MASTER_PORT'])"], out)
    assert code == 0
    assert "shaping is off (not running as root); running 2 ranks on loopback" in out.getvalue()
    ranks = sorted(re.findall(r"^\[r\d\] (\d) 127.0.0.1 (\d+)$", out.getvalue(), flags=re.M))
    assert [rank for rank, _ in ranks] == ["0", "1"]
    assert len({port for _, port in ranks}) == 1  # every rank meets at the same rendezvous


ENDING_RANK = """
import torch, torch.distributed as dist
from moe_ascend.runtime import launcher
dist.init_process_group("gloo")
everyone = [None, None]
dist.all_gather_object(everyone, torch.ones(4))  # a last collective whose work holds tensors
launcher.end_process_group()
print("gloo threads left:", launcher._gloo_threads(), "initialized:", dist.is_initialized())
"""


def test_a_rank_ends_its_group_before_the_interpreter_does(monkeypatch):
    # A gloo thread still dropping a collective's tensors while Python finalizes aborts the rank.
    monkeypatch.setattr(launcher, "shaping_unavailable", lambda: "not running as root")
    out = io.StringIO()
    assert launcher.launch(ClusterSpec(1, 2), [sys.executable, "-c", ENDING_RANK], out) == 0, out.getvalue()
    assert re.findall(r"^\[r\d\] (gloo threads left: .*)$", out.getvalue(), flags=re.M) == \
        ["gloo threads left: [] initialized: False"] * 2


@alone_on_the_emulated_cluster
def test_ranks_see_their_node_and_the_hierarchy_groups():
    done = run_launch("--nodes", "2", "--ranks-per-node", "2", "--", PROBE, "groups")
    assert done.returncode == 0, done.stdout + done.stderr
    # Node n holds ranks 2n, 2n+1; the inter-node group of local rank l is {l, l + 2}.
    assert results(done.stdout) == [
        {"rank": r, "node": r // 2, "local_rank": r % 2, "intra_sum": float(4 * (r // 2) + 1),
         "inter_sum": float(2 * (r % 2) + 2)}
        for r in range(4)
    ]
    assert our_namespaces() == []


@alone_on_the_emulated_cluster
def test_inter_node_throughput_matches_the_shaping():
    done = run_launch("--nodes", "2", "--inter-node-bandwidth", "200mbit", "--", PROBE, "throughput")
    assert done.returncode == 0, done.stdout + done.stderr
    receiver = results(done.stdout)[1]
    assert receiver["bits_per_s"] == pytest.approx(200e6, rel=0.2)
    assert receiver["uplink_mtu"] == launcher.UPLINK_MTU


@alone_on_the_emulated_cluster
def test_scaled_links_give_each_rank_the_rates_the_launcher_printed():
    done = run_launch("--nodes", "2", "--ranks-per-node", "2", "--scale-to", "ascend-910b", "--host-flops", "1e11",
                      "--", PROBE, "rates")
    assert done.returncode == 0, done.stdout + done.stderr
    printed = re.search(r"each rank gets ([\d.]+) MB/s across nodes .* and ([\d.]+) MB/s inside its node", done.stdout)
    inter, intra = float(printed[1]) * 1e6, float(printed[2]) * 1e6
    # 910B: 203 TFLOP/s over 25 GB/s per NPU across nodes, 196 GB/s inside; this "host" 100 GFLOP/s a rank
    assert inter == pytest.approx(1e11 / (313e12 * 0.65 / 25e9), rel=1e-3)
    assert intra == pytest.approx(1e11 / (313e12 * 0.65 / 196e9), rel=1e-3)
    for rank in results(done.stdout):
        assert rank["inter_bytes_per_s"] == pytest.approx(inter, rel=0.15)
        assert rank["intra_bytes_per_s"] == pytest.approx(intra, rel=0.15)
    assert our_namespaces() == []


def test_scaled_links_are_asked_for_once():
    for flags in (["--scale-to", "h100", "--inter-node-bandwidth", "1gbit"], ["--host-flops", "1e11"]):
        done = run_launch("--nodes", "2", *flags, "--", "true")
        assert done.returncode == 2 and "--scale-to" in done.stderr


@alone_on_the_emulated_cluster
def test_a_crashing_rank_ends_the_job_with_its_error_and_leaves_nothing_behind():
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.count("\n")
    done = run_launch("--nodes", "2", "--", PROBE, "crash")
    assert done.returncode == 1
    assert "rank 1 (node 1, local rank 0) failed with exit code 1" in done.stdout
    summary = done.stdout.split("failed with exit code 1")[1]
    assert "RuntimeError: boom on rank 1" in summary  # the failed rank's own traceback, not its peer's
    assert our_namespaces() == []
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.count("\n") == links_before


@alone_on_the_emulated_cluster
def test_ctrl_c_stops_every_rank_and_removes_the_namespaces():
    job = subprocess.Popen([sys.executable, "-m", "moe_ascend.compiler.cli", "launch", "--nodes", "2", "--",
                            PROBE, "sleep"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = 0
    for line in job.stdout:
        ready += line.strip().endswith("ready")
        if ready == 2:
            break
    assert len(our_namespaces()) == 3  # two nodes and the switch
    job.send_signal(signal.SIGINT)
    rest = job.communicate(timeout=60)[0]
    assert job.returncode == 130 and "interrupted (SIGINT); stopped all ranks" in rest
    assert our_namespaces() == []
    assert "probe.py sleep" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


@alone_on_the_emulated_cluster
def test_a_killed_launchers_namespaces_are_removed_by_the_next_launch():
    stale = launcher.EmulatedCluster(ClusterSpec(1, 1), tag=f"{launcher.PREFIX}{_dead_pid()}")
    stale.__enter__()  # created, never exited: as if its launcher had been SIGKILLed
    assert len(our_namespaces()) == 2
    assert sorted(launcher.remove_stale_namespaces()) == sorted([stale.switch, *stale.node_ns])
    assert our_namespaces() == []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    time.sleep(0.05)
    return proc.pid
