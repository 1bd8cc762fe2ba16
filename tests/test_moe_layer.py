"""MoELayer: one rank and four, capacity and dropless, eager and compiled, recognised by find_moe."""

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


def test_dropless_across_ranks_breaks_the_graph_where_it_reads_split_sizes():
    """What the docstring promises: reading the exchanged counts is a graph break (capacity mode has none)."""
    assert all(breaks >= 1 for breaks in run_ranks(2, dropless_graph_breaks))
