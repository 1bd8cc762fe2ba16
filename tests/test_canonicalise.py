"""canonicalise: recognised routers and expert matmuls become moe_ascend ops, with the same numbers."""

import re

import pytest
import torch
from checks import assert_matches_eager
from graphs import code_lines, context, dynamo_graph
from models import DeepSeekStyleMoE, LoopMoE
from quickstart import MoEFeedForward, MoETransformer, batches, stdlib_bytes

from moe_ascend.passes.canonicalise import canonicalise
from moe_ascend.passes.find_moe import find_moe
from moe_ascend.passes.functionalise import functionalise
from moe_ascend.passes.normalise import normalise


def prepared(fn, *inputs):
    gm = dynamo_graph(fn, *inputs)
    ctx = context()
    normalise(gm, ctx)
    functionalise(gm, ctx)
    find_moe(gm, ctx)
    return gm, ctx


def test_golden_router_and_expert_matmuls():
    torch.manual_seed(0)
    moe = MoEFeedForward(d_model=8, d_ff=16, num_experts=4, top_k=2)
    gm, ctx = prepared(lambda x: moe(x)[0], torch.randn(1, 6, 8))
    result = canonicalise(gm, ctx)
    gm.recompile()
    assert result.modified
    lines = code_lines(gm)
    assert "topk_softmax_default = torch.ops.moe_ascend.topk_softmax.default(linear, 2, False)" in lines
    assert "weights = topk_softmax_default[0]" in lines and "experts = topk_softmax_default[1]" in lines
    assert not any("torch.topk" in line or "torch.bmm" in line for line in lines)
    assert "probs = torch.softmax(linear, dim = -1)" in lines  # still read by the load-balancing loss
    grouped = [re.sub(r"\b[gl]_moe_", "moe_", line) for line in lines if line.startswith("grouped_mm_batched")]
    assert grouped == [  # Dynamo spells the closure's weights g_... or l_... depending on how it was reached
        "grouped_mm_batched_default = torch.ops.moe_ascend.grouped_mm_batched.default(expert_in, moe_parameters_w_in_)",
        "grouped_mm_batched_default_1 = torch.ops.moe_ascend.grouped_mm_batched.default(gelu, moe_parameters_w_out_)",
    ]
    (layer,) = ctx.analyses["moe_layers"]
    assert layer.topk.name == "topk_softmax_default"
    assert [n.name for n in layer.nodes["experts"]] == ["grouped_mm_batched_default", "gelu",
                                                         "grouped_mm_batched_default_1"]
    roles = {n.name: n.meta["custom"]["moe"]["role"] for n in gm.graph.nodes if "moe" in n.meta.get("custom", {})}
    assert roles["topk_softmax_default"] == "router" and roles["grouped_mm_batched_default"] == "experts"


def test_per_expert_loop_keeps_its_linears():
    torch.manual_seed(0)
    gm, ctx = prepared(LoopMoE(), torch.randn(6, 16))
    canonicalise(gm, ctx)
    gm.recompile()
    lines = code_lines(gm)
    assert sum("torch._C._nn.linear" in line for line in lines) == 1 + 8  # gate + 4 experts x 2
    assert any("moe_ascend.topk_softmax" in line for line in lines)
    assert not any("torch.softmax" in line for line in lines)  # it fed only the top-k: gone with it


def test_transformer_loss_and_gradients_equal_eager():
    torch.manual_seed(0)
    model = MoETransformer(d_model=32, n_heads=2, d_ff=64, n_layers=2, seq_len=16)
    assert_matches_eager(model, next(batches(stdlib_bytes(100_000), 4, 16)),
                         {"target": "eager", "passes": ["canonicalise"]})


@pytest.mark.parametrize("asked", [False, True])
def test_runs_only_when_asked(asked, tmp_path):
    torch.manual_seed(0)
    moe = MoEFeedForward(d_model=8, d_ff=16, num_experts=4, top_k=2)
    options = {"target": "eager", "dump_dir": str(tmp_path), "passes": ["canonicalise"] if asked else []}
    torch.compile(lambda x: moe(x)[0], backend="moe_ascend", options=options)(torch.randn(1, 6, 8))
    assert "torch.topk" in (tmp_path / "graph_0" / "pre_grad" / "03_find_moe.py").read_text()
    assert (tmp_path / "graph_0" / "pre_grad" / "04_canonicalise.py").exists() == asked


def router_lines(gm):
    return [line for line in code_lines(gm)
            if re.search(r"sigmoid|topk|gather|masked_fill|scatter|^routing_weights|^chosen", line)]


def test_golden_deepseek_router_becomes_topk_sigmoid():
    # sigmoid + bias, the best 2 of 4 groups by their best two, top-2 inside, weights renormalised and scaled by 2.5
    torch.manual_seed(0)
    gm, ctx = prepared(DeepSeekStyleMoE(num_experts=8, groups=4, top_groups=2), torch.randn(6, 16))
    assert canonicalise(gm, ctx).modified
    gm.recompile()
    assert router_lines(gm) == [
        "topk_sigmoid_default = torch.ops.moe_ascend.topk_sigmoid.default(linear, 2, l_self_buffers_bias_, 4, 2, 2, "
        "True, 2.5)",
        "routing_weights = topk_sigmoid_default[0]",
        "chosen = topk_sigmoid_default[1]",
    ]
    (layer,) = ctx.analyses["moe_layers"]
    assert layer.topk.name == "topk_sigmoid_default"
    router = {n.name for n in layer.nodes["router"]}
    assert {"linear", "topk_sigmoid_default", "routing_weights", "chosen"} <= router
    assert not router & {"scores", "for_choice", "masked_fill", "weights", "weights_1"}  # erased with the rewrite


def test_a_group_limit_filled_with_zero_keeps_its_ops():
    # 0.0 is not -inf: a kept expert whose biased score is below zero would lose to a dropped one
    torch.manual_seed(0)
    gm, ctx = prepared(DeepSeekStyleMoE(fill=0.0), torch.randn(6, 16))
    assert not canonicalise(gm, ctx).modified
    gm.recompile()
    assert "masked_fill = torch.masked_fill(for_choice, eq, 0.0)" in router_lines(gm)


@pytest.mark.parametrize("groups, top_groups", [(4, 2), (1, 1)], ids=["grouped", "one group"])
def test_deepseek_router_outputs_and_gradients_equal_eager(groups, top_groups, tmp_path):
    torch.manual_seed(0)
    assert_matches_eager(DeepSeekStyleMoE(groups=groups, top_groups=top_groups),
                         (torch.randn(6, 16, requires_grad=True),),
                         {"target": "eager", "passes": ["canonicalise"], "dump_dir": str(tmp_path)})
    assert "topk_sigmoid" in (tmp_path / "graph_0" / "pre_grad" / "04_canonicalise.py").read_text()
