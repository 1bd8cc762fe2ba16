import fcntl
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))
torch.set_num_threads(1)


# pytest-xdist runs two tests at once (make test, make check); these two lock files keep an `exclusive` test
# (it measures rates or times, or looks at the machine's namespaces) alone on the machine.
RUNNING = Path(tempfile.gettempdir()) / "moe_ascend-tests.running"
TURNSTILE = Path(tempfile.gettempdir()) / "moe_ascend-tests.turnstile"


# the files of the longest multi-rank jobs (a minute or more of two cores each, cold)
LONGEST = ("test_train_moe.py", "test_hierarchical_a2a.py", "test_token_groups.py", "test_overlap.py")


def pytest_collection_modifyitems(items):
    """The `slow` tests first, the longest jobs' files first among them: under xdist the short ones then fill in
    around them, where a long test started last would leave the other worker idle until it ends."""
    def order(item):
        name = item.path.name
        return item.get_closest_marker("slow") is None, LONGEST.index(name) if name in LONGEST else len(LONGEST)

    items.sort(key=order)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every test, its fixtures' setup and teardown included, holds RUNNING shared; an exclusive one holds it
    alone. An exclusive test waiting for it holds the turnstile, which every test passes first, so no new test
    starts meanwhile (it cannot starve)."""
    exclusive = item.get_closest_marker("exclusive") is not None
    with open(TURNSTILE, "a") as turnstile, open(RUNNING, "a") as running:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(running, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(running, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no graph or guard from an earlier test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def temporary_passes():
    """Register passes in a test; they are unregistered afterwards."""
    from moe_ascend.passes import register_pass, unregister_pass

    names = []

    def register(**kwargs):
        names.append(kwargs["name"])
        return register_pass(**kwargs)

    yield register
    for name in names:
        unregister_pass(name)


@pytest.fixture
def single_rank_group():
    """A real one-rank gloo process group, so graphs can hold functional collectives."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def fake_two_ranks():
    """A fake two-rank process group in this one process: graphs hold real collectives that move nothing."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def cost_model_hardware(tmp_path, monkeypatch):
    """``use(**fields)``: the passes' cost model prices layers on a test profile (``$MOE_ASCEND_HARDWARE``): a slow
    link (100 kB/s), everything else quick and at full efficiency, but for ``fields``."""
    def use(**fields):
        profile = dict(name="test", matmul_efficiency=1, rows_at_half_efficiency=0, expert_rows_at_half_efficiency=0,
                       attention_flops=1e12, memory_bandwidth=1e12, optimizer_bandwidth=1e12, memory_bytes=1e9,
                       ranks_per_node=1, intra_node_bandwidth=1e5, inter_node_bandwidth=1e5, intra_node_latency=1e-6,
                       inter_node_latency=1e-6, overlap_efficiency=1.0)
        path = tmp_path / "profile.yaml"
        path.write_text("".join(f"{key}: {value}\n" for key, value in {**profile, **fields}.items()))
        monkeypatch.setenv("MOE_ASCEND_HARDWARE", str(path))

    return use
