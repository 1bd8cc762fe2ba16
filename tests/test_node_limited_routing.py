"""Node-limited routing: each token's experts on at most M nodes, the rewritten router, and the bytes it saves."""

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import launch
from graphs import code_lines

import moe_ascend.kernels as ops
from moe_ascend.kernels.node_limited import node_limited_topk_softmax, nodes_reached
from moe_ascend.passes import PassResult
from moe_ascend.runtime import MoELayer

SCRIPT = str(Path(__file__).parent / "cluster" / "node_limited.py")


def logits(tokens=40, experts=16, seed=0):
    return torch.randn(tokens, experts, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k, num_nodes, max_nodes", [(2, 4, 1), (4, 4, 2), (8, 4, 3), (3, 2, 1)])
def test_no_token_reaches_more_than_max_nodes(k, num_nodes, max_nodes):
    _, ids = node_limited_topk_softmax(logits(), k, True, num_nodes, max_nodes)
    assert int(nodes_reached(ids, 16, num_nodes).max()) <= max_nodes
    assert all(len(set(row.tolist())) == k for row in ids)  # k distinct experts


def test_a_token_takes_its_top_k_among_the_experts_of_its_best_nodes():
    scores = logits()
    weights, ids = node_limited_topk_softmax(scores, 4, False, 4, 2)
    probs = torch.softmax(scores, -1)
    for t in range(scores.shape[0]):
        per_node = probs[t].reshape(4, 4)
        node_score = per_node.topk(2, -1).values.sum(-1)  # the best k // M = 2 of each node's experts
        nodes = node_score.topk(2).indices
        allowed = torch.cat([torch.arange(4 * n, 4 * n + 4) for n in nodes.tolist()])
        expected = allowed[probs[t, allowed].topk(4).indices]
        assert set(ids[t].tolist()) == set(expected.tolist())
    torch.testing.assert_close(weights, probs.gather(1, ids))


def test_with_every_node_allowed_it_is_top_k_softmax():
    scores = logits()
    for got, want in zip(node_limited_topk_softmax(scores, 4, True, 4, 4), ops.topk_softmax(scores, 4, True)):
        torch.testing.assert_close(got, want)


def router_after_the_pass(temporary_passes, **layer_options) -> list[str]:
    """The router's lines once node_limited_routing ran on a capacity MoELayer over two nodes of one rank each
    (experts 0-1 on node 0, 2-3 on node 1), M = 1."""
    seen = {}

    @temporary_passes(name="probe", stage="pre_grad", after=("node_limited_routing",), roles=("dynamo",))
    def probe(gm, ctx):
        seen["lines"] = code_lines(gm)
        return PassResult(gm, False)

    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, capacity_factor=1.0, ep_group=dist.group.WORLD, **layer_options)
    options = {"target": "eager", "overlap": False, "routing": "node_limited", "routing_options": {"max_nodes": 1},
               "topology": {"ranks_per_node": 1}}
    torch.compile(layer, backend="moe_ascend", options=options)(torch.randn(12, 8)).sum().backward()
    return [line for line in seen["lines"] if re.search(r"linear|routing|topk|^weights|^expert_ids", line)]


def test_the_router_is_rewritten_for_expert_parallel_layers(fake_two_ranks, temporary_passes):
    assert router_after_the_pass(temporary_passes) == [
        "logits = torch._C._nn.linear(tokens, l_self_modules_gate_parameters_weight_, None)",
        "node_limited_routing = moe_ascend_kernels_node_limited_node_limited_topk_softmax(logits, 2, True, 2, 1)",
        "weights = node_limited_routing[0]",
        "expert_ids = node_limited_routing[1]",
    ]


def test_a_sigmoid_router_gets_the_nodes_as_its_groups(fake_two_ranks, temporary_passes):
    # DeepSeek-V3's own form: the limit is its group limit with a node per group, scored by its best k // M
    assert router_after_the_pass(temporary_passes, score="sigmoid") == [
        "logits = torch._C._nn.linear(tokens, l_self_modules_gate_parameters_weight_, None)",
        "node_limited_routing = torch.ops.moe_ascend.topk_sigmoid.default(logits, 2, l_self_buffers_expert_bias_, "
        "2, 1, 2, True, 1.0)",
        "weights = node_limited_routing[0]",
        "expert_ids = node_limited_routing[1]",
    ]


@pytest.mark.parametrize("groups, top_groups, says", [
    (1, 1, ("logits", 4, "bias", 2, 1, 4, True, 2.5)),  # the two nodes become its groups, scored by their best 4
    (2, 2, ("logits", 4, "bias", 2, 1, 1, True, 2.5)),  # its groups are the nodes: the tighter limit, its own score
    (2, 1, None),  # it already keeps one node
    (4, 2, "its router already limits each token to 2 of 4 expert groups, which are not the 2 nodes"),
])
def test_a_sigmoid_router_keeps_the_tighter_limit(groups, top_groups, says):
    from types import SimpleNamespace

    from moe_ascend.passes.node_limited_routing import _sigmoid_limited

    op = SimpleNamespace(args=("logits", 4, "bias", groups, top_groups, 1, True, 2.5))
    assert _sigmoid_limited(SimpleNamespace(op=op, num_experts=8), nodes=2, max_nodes=1) == says


def test_a_layer_on_one_rank_keeps_its_router_and_says_why(caplog):
    layer = MoELayer(8, 16, 4, 2, capacity_factor=1.0)
    options = {"target": "eager", "routing": "node_limited", "routing_options": {"max_nodes": 1}}
    torch.compile(layer, backend="moe_ascend", options=options)(torch.randn(12, 8))
    assert "keeps its router (routing='node_limited'): the topology has one node" in caplog.text


@pytest.mark.slow
def test_on_the_emulated_cluster_no_token_reaches_more_nodes_and_inter_node_bytes_fall():
    # 2 nodes x 2 ranks, 8 experts, top-4, dropless over the two-step exchange, M = 1: compiled equals the same
    # routing in eager (forward and backward), and each token now crosses to at most one node instead of ~two;
    # for a softmax router and for DeepSeek-V3's sigmoid router with a selection bias.
    for result in launch(2, 2, SCRIPT, "check"):
        for score in ("softmax", "sigmoid"):
            assert result[score]["max_abs_diff"] < 1e-12, (score, result)
            assert result[score]["most_nodes"] == 1
            keep = result["softmax"]["bytes"]["keep"]["inter_node"]  # the same tokens and top-4, not limited
            limited = result[score]["bytes"]["node_limited"]["inter_node"]
            assert limited < 0.7 * keep, (score, result)  # from ~0.98 remote node visits per token to ~0.5
