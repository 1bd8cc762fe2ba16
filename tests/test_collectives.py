"""Collectives: per-group order is kept by every pass, every collective is waited on, and the timeline's exposed
time."""

import pytest
import torch
import torch.distributed._functional_collectives as fc
from graphs import code_lines, context, dynamo_graph

from moe_ascend.compiler.planner.cost_model import CostModel, HardwareProfile
from moe_ascend.compiler.pipeline import run_stage
from moe_ascend.kernels.errors import PassContractError
from moe_ascend.passes import PassResult
from moe_ascend.passes.analysis.collectives import collective_order, collectives_by_kind
from moe_ascend.passes.verify_collectives import verify_collectives


def two_exchanges_graph(group):
    def two_exchanges(x, y):
        a = fc.all_to_all_single(x, None, None, group)
        b = fc.all_to_all_single(y, None, None, group)
        return a.sum() + b.sum()

    return dynamo_graph(two_exchanges, torch.randn(8), torch.randn(4))


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_collectives_are_listed_by_group_and_kind(single_rank_group):
    gm = two_exchanges_graph(single_rank_group)
    assert collective_order(gm) == {"0": ["tensor", "tensor_1"]}
    assert collectives_by_kind(gm) == {"all_to_all_single": {"0": 2}}


def test_verify_collectives_keeps_a_correct_graph_as_it_is(single_rank_group):
    gm = two_exchanges_graph(single_rank_group)
    before = code_lines(gm)
    assert not verify_collectives(gm, context("post_grad", "forward")).modified
    assert code_lines(gm) == before


def test_verify_collectives_rejects_a_collective_nobody_waits_for(single_rank_group):
    gm = two_exchanges_graph(single_rank_group)
    wait = node(gm, "b")
    wait.replace_all_uses_with(wait.args[0])
    gm.graph.erase_node(wait)
    with pytest.raises(PassContractError, match="tensor_1 is issued but never waited on"):
        verify_collectives(gm, context("post_grad", "forward"))


def test_a_pass_that_reorders_one_groups_collectives_is_stopped(temporary_passes, single_rank_group):
    @temporary_passes(name="t_swap", stage="post_grad", enabled=False)
    def swap(gm, ctx):
        first = node(gm, "tensor")
        for name in ("tensor_1", "b"):
            first.prepend(node(gm, name))
        return PassResult(gm, True)

    gm = two_exchanges_graph(single_rank_group)
    with pytest.raises(PassContractError,
                       match=r"t_swap.*changed order.*was \['tensor', 'tensor_1'\], now \['tensor_1', 'tensor'\]"):
        run_stage(gm, context("post_grad", "forward", options={"passes": ["t_swap"]}))


# 1 GFLOP/s compute, 1 MB/s links, no latency: 4000 bytes take 4 ms, a 1 MFLOP matmul 1 ms.
SLOW_LINK = HardwareProfile("test", matmul_flops=1e9, memory_bandwidth=1e15, intra_node_bandwidth=1e6,
                            inter_node_bandwidth=1e6, collective_latency=0.0)


def exchange_and_matmul_graph(group):
    def exchange_and_matmul(x, y, w):
        a = fc.all_to_all_single(x, None, None, group)
        return a.sum() + (y @ w).sum()

    return dynamo_graph(exchange_and_matmul, torch.randn(1000), torch.randn(10, 500), torch.randn(500, 100))


def test_timeline_exposes_all_communication_when_the_wait_follows_the_issue(single_rank_group):
    timeline = CostModel(SLOW_LINK).timeline(exchange_and_matmul_graph(single_rank_group))
    assert timeline.comm_s == pytest.approx(4e-3)
    assert timeline.compute_s == pytest.approx(1e-3, rel=1e-3)
    assert timeline.exposed_comm_s == pytest.approx(4e-3)
    assert timeline.step_s == pytest.approx(5e-3, rel=1e-3)


def test_timeline_hides_the_compute_placed_between_issue_and_wait(single_rank_group):
    gm = exchange_and_matmul_graph(single_rank_group)
    node(gm, "a").prepend(node(gm, "matmul"))  # the matmul now runs while the all-to-all is in flight
    timeline = CostModel(SLOW_LINK).timeline(gm)
    assert timeline.exposed_comm_s == pytest.approx(3e-3, rel=1e-3)
    assert timeline.step_s == pytest.approx(4e-3, rel=1e-3)
    lanes = [(e.node, e.lane) for e in timeline.events]
    assert lanes[:3] == [("tensor", "comm"), ("matmul", "compute"), ("a", "wait")]
