"""find_moe: every MoE layer found, every node of it tagged with its role, in all three graphs."""

import json
import logging

import torch
from graphs import context, dynamo_graph
from models import DeepSeekStyleMoE, LoopMoE, RouterOnly, TwoLoopMoE
from quickstart import MoEFeedForward

from moe_ascend.passes.find_moe import find_moe
from moe_ascend.passes.normalise import normalise


def roles(gm):
    return {n.name: n.meta["custom"]["moe"]["role"] for n in gm.graph.nodes if "moe" in n.meta.get("custom", {})}


def test_golden_loop_moe_roles():
    torch.manual_seed(0)
    gm = dynamo_graph(LoopMoE(num_experts=2), torch.randn(6, 16))
    find_moe(gm, ctx := context())
    (layer,) = ctx.analyses["moe_layers"]
    assert (layer.gate.name, layer.topk.name, layer.output.name) == ("linear", "topk", "out_2")
    assert layer.to_json() == {
        "layer": 0, "gate": "linear", "topk": "topk", "output": "out_2",
        "router": ["linear", "probs", "topk", "weights", "chosen", "eq", "mul", "weight", "eq_1", "mul_2", "weight_1"],
        "dispatch": [],
        "experts": ["input_1", "input_2", "input_3", "input_4", "input_5", "input_6"],
        "combine": ["out", "mul_1", "out_1", "mul_3", "out_2"],
    }
    assert roles(gm)["input_3"] == "experts" and gm.graph.find_nodes(op="placeholder")[0].meta.get("custom") is None


def test_golden_deepseek_router_is_the_whole_selection():
    # sigmoid scores, a selection bias, the best group chosen first, top-k inside it, weights from the unbiased
    # scores renormalised and scaled: the last top-k is the router's, the group top-ks and the bias are its selection
    torch.manual_seed(0)
    gm = dynamo_graph(DeepSeekStyleMoE(num_experts=4, groups=2, top_groups=1), torch.randn(6, 16))
    find_moe(gm, ctx := context())
    (layer,) = ctx.analyses["moe_layers"]
    found = layer.to_json()
    assert (found["gate"], found["topk"], found["output"]) == ("linear", "topk_2", "out_3")
    assert found["router"][:22] == [
        "linear", "scores", "for_choice", "view", "topk", "getitem", "group_scores", "topk_1", "best_groups",
        "zeros_like", "group_mask", "unsqueeze", "expand", "expert_mask", "eq", "masked_fill", "topk_2", "chosen",
        "weights", "sum_2", "truediv", "weights_1"]
    assert found["dispatch"] == []
    assert found["experts"] == [f"input_{i}" for i in range(1, 16)]  # the shared expert's three, then each expert's
    assert found["combine"] == ["mul_2", "out", "mul_4", "out_1", "mul_6", "out_2", "mul_8", "out_3"]


def test_golden_capacity_moe_roles():
    torch.manual_seed(0)
    moe = MoEFeedForward(d_model=8, d_ff=16, num_experts=4, top_k=2)
    gm = dynamo_graph(lambda x: moe(x)[0], torch.randn(1, 6, 8))
    normalise(gm, context())
    find_moe(gm, ctx := context())
    (layer,) = ctx.analyses["moe_layers"]
    found = layer.to_json()
    assert found["dispatch"] == ["tokens", "expert_in"]
    assert found["experts"] == ["bmm", "gelu", "expert_out"]
    assert found["combine"] == ["out"]
    assert {"probs", "topk", "dispatch", "combine"} <= set(found["router"])
    # The load-balancing loss is computed from the router but is not part of the layer's region.
    assert "aux_loss" not in roles(gm)


def test_two_layers_are_two_regions_and_the_layer_between_is_neither():
    torch.manual_seed(0)
    gm = dynamo_graph(TwoLoopMoE(), torch.randn(6, 16))
    find_moe(gm, ctx := context())
    assert [layer.index for layer in ctx.analyses["moe_layers"]] == [0, 1]
    tagged = {n.name: n.meta["custom"]["moe"]["layer"] for n in gm.graph.nodes if "moe" in n.meta.get("custom", {})}
    mix = [n for n in gm.graph.nodes
           if n.op == "call_function" and n.name.startswith("linear") and "mix" in str(n.args[1])]
    assert mix and all(n.name not in tagged for n in mix)
    assert set(tagged.values()) == {0, 1}


def test_router_without_experts_is_reported_once_and_not_annotated(caplog):
    gm = dynamo_graph(RouterOnly(), torch.randn(6, 16))
    with caplog.at_level(logging.WARNING, logger="moe_ascend"):
        find_moe(gm, ctx := context())
    assert ctx.analyses["moe_layers"] == []
    (record,) = [r for r in caplog.records if r.name.startswith("moe_ascend")]
    assert ("topk" in record.getMessage()
            and "not an MoE layer: its per-token choices never meet the tokens" in record.getMessage())
    assert roles(gm) == {}


def sampled_then_routed_nowhere(x, w):
    best, _ = torch.topk(x.sum(-1), 2)  # no gate behind it
    _, chosen = torch.topk(torch.softmax(x @ w, dim=-1), 2, dim=-1)
    return best.sum() + chosen.float().mean()


def test_no_layer_found_names_each_top_k_and_why_in_one_warning(caplog):
    gm = dynamo_graph(sampled_then_routed_nowhere, torch.randn(6, 16), torch.randn(16, 4))
    with caplog.at_level(logging.INFO, logger="moe_ascend"):
        find_moe(gm, context())
    (record,) = [r for r in caplog.records if r.name.startswith("moe_ascend")]
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        "graph_t: no MoE layer found; the graph is compiled unchanged. Its top-k nodes: topk is not over a gate's "
        "scores (no matmul behind it through softmax or sigmoid and elementwise transforms); topk_1 is router-like "
        "(over gate matmul) but not an MoE layer: its per-token choices never meet the tokens (no dispatch)")


def test_roles_reach_the_forward_and_backward_graphs(tmp_path):
    torch.manual_seed(0)
    model = torch.compile(LoopMoE(), backend="moe_ascend", options={"target": "eager", "dump_dir": str(tmp_path)})
    model(torch.randn(6, 16)).sum().backward()
    summary = json.loads((tmp_path / "summary.json").read_text())
    by_role = {g["role"]: g for g in summary["graphs"]}
    assert set(by_role) == {"dynamo", "forward", "backward"}
    for role in ("forward", "backward"):
        (layer,) = by_role[role]["moe_layers"]
        assert layer["router"] and layer["experts"] and layer["combine"]
    forward_experts = by_role["forward"]["moe_layers"][0]["experts"]
    assert sum(name.startswith("addmm") for name in forward_experts) == 8  # 4 experts x 2 linears


def test_all_to_all_dispatch_and_combine_get_their_roles(single_rank_group, tmp_path):
    from models import ExpertParallelMoE

    torch.manual_seed(0)
    model = torch.compile(ExpertParallelMoE(single_rank_group), backend="moe_ascend",
                          options={"target": "eager", "dump_dir": str(tmp_path)})
    tokens = torch.randn(8, 16, requires_grad=True)  # as if from an earlier layer: both exchanges have a backward
    model(tokens).sum().backward()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [g["role"] for g in summary["graphs"]] == ["dynamo", "forward", "backward"]
    for graph in summary["graphs"]:
        assert graph["collectives"] == {"all_to_all_single": {"0": 2}}
        (region,) = graph["regions"]
        exchanges = [n["role"] for n in region["nodes"] if "all_to_all_single" in n["op"]]
        assert sorted(exchanges) == ["combine", "dispatch"], graph["name"]
    dynamo = summary["graphs"][0]["moe_layers"][0]
    assert "tensor" in dynamo["dispatch"] and "tensor_1" in dynamo["combine"]
    assert dynamo["experts"] == ["bmm", "relu", "expert_out"]
