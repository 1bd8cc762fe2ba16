"""MoELayer: one rank and four, capacity and dropless, eager and compiled, recognised by find_moe."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from checks import assert_matches_eager
from distributed import launch, run_ranks

from moe_ascend.kernels.errors import TopologyError
from moe_ascend.runtime import MoELayer

MODES = {"capacity": 1.0, "dropless": None}
SCRIPT = str(Path(__file__).parent / "cluster" / "moe_layer.py")


def layer_kwargs(mode):
    return dict(d_model=8, d_ff=16, num_experts=8, top_k=2, capacity_factor=MODES[mode], num_shared_experts=1)


@pytest.mark.parametrize("mode", MODES)
def test_one_rank_compiles_to_one_graph_and_matches_eager(mode):
    torch.manual_seed(0)
    layer = MoELayer(**layer_kwargs(mode))
    x = torch.randn(2, 6, 8)
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    assert_matches_eager(layer, (x,), {"target": "eager"})


def test_capacity_layer_matches_eager_under_inductor():
    torch.manual_seed(0)
    assert_matches_eager(MoELayer(**layer_kwargs("capacity")), (torch.randn(12, 8),), {"target": "inductor"})


def test_find_moe_sees_the_ops_of_our_layer(tmp_path):
    torch.manual_seed(0)
    compiled = torch.compile(MoELayer(**layer_kwargs("capacity")), backend="moe_ascend",
                             options={"target": "eager", "dump_dir": str(tmp_path)})
    compiled(torch.randn(12, 8)).sum().backward()
    summary = json.loads((tmp_path / "summary.json").read_text())
    (layer,) = summary["graphs"][0]["moe_layers"]
    ops_by_role = {role: {n["op"] for n in summary["graphs"][0]["regions"][0]["nodes"] if n["role"] == role}
                   for role in ("router", "dispatch", "experts", "combine")}
    assert "moe_ascend.topk_softmax.default" in ops_by_role["router"]
    assert "moe_ascend.capacity_dispatch.default" in ops_by_role["dispatch"]
    assert "moe_ascend.grouped_mm_filled.default" in ops_by_role["experts"]  # skip_empty_slots kept their role
    assert "moe_ascend.capacity_combine.default" in ops_by_role["combine"]
    assert [len(g["moe_layers"]) for g in summary["graphs"]] == [1, 1, 1]


def test_experts_must_split_over_the_group(monkeypatch):
    class ThreeRanks:
        group_name = "three"

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    with pytest.raises(TopologyError, match="8 experts do not split evenly over an expert-parallel group of 3"):
        MoELayer(8, 16, 8, 2, ep_group=ThreeRanks())


@pytest.mark.slow
def test_two_nodes_of_two_ranks_equal_one_process():
    # Through the launcher (2 x 2, shaped where root): capacity and dropless in eager, capacity compiled.
    for result in launch(2, 2, SCRIPT):
        assert result["capacity_graph_breaks"] == 0, result
        for check in ("capacity", "dropless", "capacity_compiled"):
            assert result[check] < 1e-5, (result["rank"], check, result[check])


def dropless_graph_breaks(rank, world_size):
    torch.manual_seed(0)
    layer = MoELayer(**layer_kwargs("dropless"), ep_group=dist.group.WORLD)
    return torch._dynamo.explain(layer)(torch.randn(6, 8)).graph_break_count


@pytest.mark.slow
def test_dropless_across_ranks_breaks_the_graph_where_it_reads_split_sizes():
    """What the docstring promises: reading the exchanged counts is a graph break (capacity mode has none)."""
    assert all(breaks >= 1 for breaks in run_ranks(2, dropless_graph_breaks))


def dropless_steps_in_one_graph(rank, world_size, dump_dir):
    """Five training steps of MoELayer dropless and a torchtitan-style layer, each compiled once by moe_ascend's
    Inductor target with captured split sizes: the largest error against eager, graphs made, layers found."""
    import copy

    from checks import run_and_grads
    from models import TitanStyleMoE
    from torch._dynamo.utils import counters

    from moe_ascend.compiler import backend
    from moe_ascend.compiler.report.summary import load_summary

    found = {}
    for name, build in (("moe_layer", lambda: MoELayer(16, 32, 4, 2, ep_group=dist.group.WORLD)),
                        ("titan_style", lambda: TitanStyleMoE(dist.group.WORLD))):
        torch.manual_seed(0)
        eager = build()
        compiled_model = copy.deepcopy(eager)
        torch._dynamo.reset()
        counters.clear()
        compiles_before, error = backend.graphs_compiled, 0.0
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            compiled = torch.compile(compiled_model, backend="moe_ascend",
                                     options={"target": "inductor", "dump_dir": f"{dump_dir}/{name}"})
            for step in range(5):  # other routing, other split sizes, every step
                x = torch.randn(8, 16, generator=torch.Generator().manual_seed(10 * step + rank))
                want, want_grads = run_and_grads(eager, (x,))
                got, got_grads = run_and_grads(compiled_model, (x,), call=compiled)
                error = max([error, float((got - want).abs().max())]
                            + [float((got_grads[k] - want_grads[k]).abs().max()) for k in want_grads])
                eager.zero_grad()
                compiled_model.zero_grad()
        summary = load_summary(f"{dump_dir}/{name}", rank)
        found[name] = {"error": error, "graphs": counters["stats"]["unique_graphs"],
                       "compiles": backend.graphs_compiled - compiles_before,
                       "layers": {g["role"]: [[r for r in ("router", "dispatch", "experts", "combine") if layer[r]]
                                              for layer in g["moe_layers"]] for g in summary["graphs"]}}
    return found


@pytest.mark.slow
def test_dropless_expert_parallel_is_one_graph_under_inductor_with_captured_split_sizes(tmp_path):
    every_role = [["router", "dispatch", "experts", "combine"]]
    for rank, found in enumerate(run_ranks(2, dropless_steps_in_one_graph, str(tmp_path))):
        for name, result in found.items():
            assert result["error"] < 1e-5, (rank, name, result)
            assert (result["graphs"], result["compiles"]) == (1, 1), (rank, name, result)  # no recompile
            assert result["layers"]["dynamo"] == every_role, (rank, name, result)
            assert result["layers"]["forward"] == every_role, (rank, name, result)


def test_the_balance_loss_is_one_for_uniform_routing_and_e_for_one_expert():
    from moe_ascend.kernels.routing import load_balancing_loss

    uniform = torch.zeros(4, 4)  # 4 tokens, 4 experts, each expert chosen twice
    assert float(load_balancing_loss(uniform, torch.arange(8).reshape(4, 2) % 4)) == pytest.approx(1.0)
    collapsed = torch.tensor([[10.0, 0, 0, 0]]).repeat(6, 1)
    assert float(load_balancing_loss(collapsed, torch.zeros(6, 1, dtype=torch.long))) == pytest.approx(4.0, rel=1e-3)


def test_the_balance_loss_moves_the_gate_away_from_the_expert_that_takes_every_token():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 1, capacity_factor=1.0, aux_loss_coeff=0.01)
    with torch.no_grad():
        layer.gate.weight[0] = 5 * torch.ones(8)  # expert 0 wins every token of positive mean
    x = torch.rand(16, 8)
    layer(x)
    assert layer.aux_loss > 0.01 * 3
    layer.aux_loss.backward()
    assert (layer.gate.weight.grad[0] @ x.mean(0)) > 0  # gradient descent lowers expert 0's logits


def test_the_balance_loss_is_kept_under_compile_and_equals_eager():
    torch.manual_seed(0)
    layer = MoELayer(**layer_kwargs("capacity"), aux_loss_coeff=0.01)
    x = torch.randn(12, 8)
    layer(x)
    expected = layer.aux_loss.detach()
    compiled = torch.compile(layer, backend="moe_ascend", options={"target": "eager"})
    compiled(x)
    torch.testing.assert_close(layer.aux_loss.detach(), expected)
    layer.aux_loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="aux_loss_coeff must be >= 0"):
        MoELayer(8, 16, 4, 2, aux_loss_coeff=-1.0)


def test_a_sigmoid_router_chooses_with_its_bias_and_weighs_without_it():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, capacity_factor=2.0, score="sigmoid", aux_loss_coeff=0.01)
    x = torch.randn(12, 8)
    layer.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))  # every token chooses expert 0
    weights, expert_ids = layer.route(x)
    assert (expert_ids == 0).any(dim=1).all()
    chosen = torch.sigmoid(layer.gate(x)).gather(1, expert_ids)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))
    layer.aux_loss = None  # a graph's output: not deep-copyable
    assert_matches_eager(layer, (x.requires_grad_(),), {"target": "eager"})
    with pytest.raises(ValueError, match="score must be 'softmax' or 'sigmoid', got 'tanh'"):
        MoELayer(8, 16, 4, 2, score="tanh")


def test_the_router_bias_moves_against_the_load_in_training_only():
    from moe_ascend.kernels.routing import nudged_bias

    bias = nudged_bias(torch.zeros(4), torch.tensor([[0, 1], [0, 2], [0, 1]]), 0.01)  # loads 3, 2, 1, 0: mean 1.5
    torch.testing.assert_close(bias, torch.tensor([-0.01, -0.01, 0.01, 0.01]))
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, capacity_factor=2.0, score="sigmoid", router_bias_update=0.01)
    layer.eval()(torch.randn(12, 8))
    assert not layer.expert_bias.any()  # evaluation leaves it
    with pytest.raises(ValueError, match=r"router_bias_update=0.01: give a rate >= 0, with score='sigmoid'"):
        MoELayer(8, 16, 4, 2, router_bias_update=0.01)


@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_compiled_the_router_bias_follows_the_same_steps_as_eager(target):
    torch.manual_seed(0)
    eager = MoELayer(8, 16, 4, 2, capacity_factor=2.0, score="sigmoid", router_bias_update=0.01)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="moe_ascend", options={"target": target})
    for step in range(4):
        x = torch.randn(12, 8, generator=torch.Generator().manual_seed(step))
        torch.testing.assert_close(compiled(x), eager(x))
        torch.testing.assert_close(compiled_layer.expert_bias, eager.expert_bias, rtol=0, atol=0)
    assert eager.expert_bias.abs().sum() > 0  # it moved, by ±0.01 steps
    assert torch.allclose(eager.expert_bias * 100, (eager.expert_bias * 100).round())


def biases_after_steps(rank, world_size):
    """Three training steps of a 2-rank sigmoid layer with aux-loss-free balancing, each rank its own tokens."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, capacity_factor=2.0, ep_group=dist.group.WORLD, score="sigmoid",
                     router_bias_update=0.01)
    compiled = torch.compile(layer, backend="moe_ascend", options={"target": "eager"})
    for step in range(3):
        compiled(torch.randn(12, 8, generator=torch.Generator().manual_seed(10 * step + rank))).sum().backward()
    return layer.expert_bias.tolist()


def test_the_router_bias_counts_every_rank_load_and_stays_equal_over_the_group():
    # each rank routes other tokens: only the loads summed over the group keep the two biases equal
    first, second = run_ranks(2, biases_after_steps)
    assert first == second and any(first)
