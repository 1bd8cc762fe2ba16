"""The two-step hierarchical all-to-all: equal to the flat exchange, two groups in order, chosen by the cost model."""

import fcntl
import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from distributed import launch

from moe_ascend.compiler.planner.cost_model import CostModel, LayerShape
from moe_ascend.compiler.planner.step_model import Hardware
from moe_ascend.runtime.topology import Topology

SCRIPT = str(Path(__file__).parent / "cluster" / "hierarchical.py")


@functools.cache
def _two_by_two_job() -> list[dict]:
    return launch(2, 2, SCRIPT, "equal", "golden", "traffic")


@pytest.fixture
def two_by_two(tmp_path_factory, worker_id) -> list[dict]:
    """The 2 x 2 checks, each rank's, from one job: four ranks started once on two cores for three tests. Under
    pytest-xdist the first worker to ask runs it and the others read its result (xdist_group cannot keep the
    tests on one worker: pytest-xdist 3.8 names the group in ``item._nodeid``, which pytest 9.2 no longer reads)."""
    if worker_id == "master":
        return _two_by_two_job()
    result = tmp_path_factory.getbasetemp().parent / "two_by_two.json"  # this session's, shared by its workers
    with open(result.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            result.write_text(json.dumps(_two_by_two_job()))
        return json.loads(result.read_text())


# (two-step dispatches, expert matmuls that skip the empty slots): the whole exchange skips them (two matmuls), and
# so does each chunk; token groups keep their padded ones (the split graph's two-step layers are not found again: no
# pass after token_groups sees them)
COUNTS = {"position": (1, 2), "score": (1, 2), "position_2_chunks": (2, 4), "position_2_token_groups": (2, 0)}


def assert_equal(results: list[dict], compiled=tuple(COUNTS)) -> None:
    # Every rank: the kernels called directly (both drop policies, three windows of the slots summed, dropless in
    # one and three chunks), MoELayer compiled with the pass (capacity: whole, and where ``compiled`` names them in
    # two chunks and in two token groups), and MoELayer(hierarchical_a2a=True) compiled (dropless).
    for result in results:
        assert set(result["eager"]) == {"position", "score", "score_3_windows", "dropless", "dropless_3_chunks"}
        counts = {name: (result["compiled"].pop(f"{name} dispatches"), result["compiled"].pop(f"{name} filled matmuls"))
                  for name in compiled}
        assert counts == {name: COUNTS[name] for name in compiled}
        assert set(result["compiled"]) == {*compiled, "dropless"}
        for check in ("eager", "compiled"):
            assert max(result[check].values()) < 1e-12, (result["rank"], check, result[check])


@pytest.mark.slow
def test_hierarchical_equals_flat_forward_and_backward_on_2x2(two_by_two):
    assert_equal([rank["equal"] for rank in two_by_two])


@pytest.mark.slow
def test_hierarchical_equals_flat_forward_and_backward_on_4x2():
    assert_equal(launch(4, 2, SCRIPT, "equal_whole"), compiled=("position", "score"))


@pytest.mark.slow
def test_golden_two_collectives_on_two_groups_in_order(two_by_two):
    result = two_by_two[0]["golden"]
    assert result["pre_grad"] == [
        "logits", "topk_softmax_default", "weights", "expert_ids",
        "hierarchical_dispatch", "expert_in", "plan",
        "grouped_mm_batched_default", "gate", "up", "silu", "mul", "expert_out",
        "hierarchical_combine",
    ]
    a2a = "all_to_all_single"
    assert result["forward"] == [
        [a2a, "inter"], [a2a, "inter"],  # step 1: tokens and their routes, once per destination node
        [a2a, "intra"], [a2a, "intra"],  # step 2: on to the experts' ranks
        [a2a, "intra"],                  # combine: sums per rank back to the forwarding rank
        [a2a, "inter"],                  # and one row per (token, node) home
    ]
    assert {group for _, group in result["backward"]} == {"inter", "intra"}


@pytest.mark.slow
def test_golden_the_two_step_exchange_in_two_chunks_of_slots(two_by_two):
    # every chunk's dispatch first (both steps), then each chunk's experts and combine; the shares add up
    result = two_by_two[0]["golden"]
    assert result["chunked_pre_grad"] == [
        "logits", "topk_softmax_default", "weights", "expert_ids",
        "hierarchical_dispatch_0", "expert_in_0", "plan_0", "hierarchical_dispatch_1", "expert_in_1", "plan_1",
        "grouped_mm_batched_default_2", "gate_1", "up_1", "silu_1", "mul_1", "expert_out_1", "combined_0",
        "grouped_mm_batched_default_3", "gate_2", "up_2", "silu_2", "mul_2", "expert_out_2", "combined_1",
        "add",
    ]
    groups = [group for _, group in result["chunked_forward"]]  # each chunk: 2 + 1 inter-node, 2 + 1 intra-node
    assert (groups.count("inter"), groups.count("intra"), len(groups)) == (6, 6, 12)


@pytest.mark.slow
def test_the_runtime_counts_bytes_per_link_for_eager_and_compiled_exchanges(two_by_two):
    # Capacity layer: [16 experts, 6 slots, 8] fp64 = 6144 bytes a buffer, a quarter to each of the 4 ranks;
    # rank 0 on 2 x 2 sends two quarters off its node and one to its node-mate, four times a step
    # (dispatch and combine, forward and backward).
    for result in (rank["traffic"] for rank in two_by_two):
        assert result["eager_flat"] == {"inter_node": 4 * 2 * 1536, "intra_node": 4 * 1536}
        assert result["compiled_flat"] == result["eager_flat"]  # static sizes of the graphs, counted per call
        assert result["compiled_hierarchical"] == result["eager_hierarchical"]
        assert result["eager_hierarchical"] != result["eager_flat"]
        forward, backward = result["report"]  # the inspect report's forward and backward graphs
        assert forward.startswith("all-to-all bytes per run: inter-node ") and backward.startswith("all-to-all bytes")
        # the Dynamo graph holds the rewrite's kernels as calls: it counts what they issue, as the forward shows
        dynamo, forward, _ = result["collectives"]
        assert dynamo == forward and forward.count("x") == 2 and "none" not in forward, result["collectives"]


def test_the_cost_model_picks_hierarchy_for_bandwidth_bound_exchanges_only():
    cost_model = CostModel(topology=Topology(nodes=4, ranks_per_node=2), hardware=Hardware.load("cpu-calibrated"))
    # top-8 of 64 experts, MBs per rank: each token crosses to ~4 nodes once instead of to ~6 remote experts
    bandwidth_bound = LayerShape(tokens=2048, width=1024, element_bytes=4, num_experts=64, top_k=8, ep_size=8,
                                 expert_flops=6 * 1024 * 1024 * 2048 * 8)
    flat, two_step = cost_model.layer_step_seconds(bandwidth_bound, 1, np.array([0, 1]))
    assert two_step < 0.8 * flat
    # a few bytes: the two-step exchange's extra collectives cost more than the bytes it saves
    latency_bound = LayerShape(tokens=8, width=8, element_bytes=4, num_experts=64, top_k=8, ep_size=8, expert_flops=1e3)
    flat, two_step = cost_model.layer_step_seconds(latency_bound, 1, np.array([0, 1]))
    assert two_step > flat


def test_chunks_of_the_two_step_capacity_exchange_resend_tokens_so_auto_keeps_it_whole():
    # train_moe's layer on 2 x 1 with the links scaled to ascend-910b: 512 tokens of width 256, top-8 of 64
    hardware = replace(Hardware.load("cpu-calibrated"), inter_node_bandwidth=7.8e6, intra_node_bandwidth=61e6)
    cost_model = CostModel(topology=Topology(nodes=2, ranks_per_node=1), hardware=hardware)
    chunks = np.array([1, 2])
    for capacity, two_step_chunked in [(0, True), (80, False)]:  # dropless; capacity factor 1.25 (C = 80)
        layer = LayerShape(tokens=512, width=256, element_bytes=4, num_experts=64, top_k=8, ep_size=2,
                           expert_flops=6 * 256 * 1024 * max(capacity, 64) * 64 / 2, capacity=capacity)
        flat, two_step = (cost_model.layer_step_seconds(layer, chunks, hierarchical) for hierarchical in (0, 1))
        assert flat[1] < flat[0]  # the flat exchange's windows split its bytes: chunks hide them
        # a token with experts in both windows of a node crosses twice: 2 chunks send twice the static rows
        assert bool(two_step[1] < two_step[0]) == two_step_chunked, (capacity, two_step)


def test_asked_for_in_one_process_it_says_why_it_leaves_the_flat_exchange(caplog):
    import torch

    from moe_ascend.runtime import MoELayer

    torch.manual_seed(0)
    layer = torch.compile(MoELayer(8, 16, 4, 2, capacity_factor=1.0), backend="moe_ascend",
                          options={"target": "eager", "hierarchical_a2a": True})
    with caplog.at_level("INFO", logger="moe_ascend"):
        layer(torch.randn(6, 8))
    said = [r for r in caplog.records if "hierarchical_a2a" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"]
    assert said[0].getMessage().endswith(
        "hierarchical_a2a=True leaves the flat all-to-all: the topology is one node of 1 rank, so no exchange "
        "crosses a node (under torchrun, LOCAL_WORLD_SIZE below WORLD_SIZE, or options['topology'] = "
        "{'ranks_per_node': G}, gives several)")
