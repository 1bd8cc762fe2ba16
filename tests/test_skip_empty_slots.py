"""skip_empty_slots: a capacity layer's expert matmuls compute only the slots that hold tokens, with the same
numbers."""

import logging

import pytest
import torch
from checks import assert_matches_eager
from graphs import code_lines, context, dynamo_graph

import moe_ascend.kernels as ops
from moe_ascend.passes.find_moe import find_moe
from moe_ascend.passes.normalise import normalise
from moe_ascend.passes.skip_empty_slots import skip_empty_slots
from moe_ascend.runtime import MoELayer


def rewritten(fn, *inputs):
    gm = dynamo_graph(fn, *inputs)
    ctx = context()
    normalise(gm, ctx)
    find_moe(gm, ctx)
    result = skip_empty_slots(gm, ctx)
    gm.recompile()
    return result, code_lines(gm)


def test_golden_both_expert_matmuls_take_the_fill_of_the_dispatch():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, capacity_factor=1.5)
    result, lines = rewritten(layer, torch.randn(6, 8))
    assert result.modified
    assert "filled = moe_ascend_kernels_capacity_filled_slots(expert_ids, 4, 5)" in lines
    assert [line for line in lines if line.startswith("grouped_mm")] == [
        "grouped_mm_filled_default = torch.ops.moe_ascend.grouped_mm_filled.default(dispatched, "
        "l_self_parameters_w_gate_up_, filled)",
        "grouped_mm_filled_default_1 = torch.ops.moe_ascend.grouped_mm_filled.default(mul, "
        "l_self_parameters_w_down_, filled)",
    ]
    assert "out = torch.ops.moe_ascend.capacity_combine.default(grouped_mm_filled_default_1, slots, weights)" in lines


@pytest.mark.parametrize("target", ["eager", "inductor"])
@pytest.mark.parametrize("drop_policy, capacity_factor", [("position", 1.25), ("score", 0.5), ("position", 4.0)])
def test_layer_equals_eager_forward_and_backward(target, drop_policy, capacity_factor):
    # 0.5 drops pairs; 4.0 leaves most slots empty; the skew sends most tokens to expert 0 and none to expert 3.
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, capacity_factor=capacity_factor, drop_policy=drop_policy, num_shared_experts=1)
    with torch.no_grad():
        layer.gate.weight[0] += 2.0
        layer.gate.weight[3] -= 4.0
    x = torch.randn(2, 10, 8)
    assert_matches_eager(layer, (x,), {"target": target})


def test_the_pass_runs_in_a_compile(tmp_path):
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, capacity_factor=1.25)
    torch.compile(layer, backend="moe_ascend",
                  options={"target": "eager", "dump_dir": str(tmp_path)})(torch.randn(6, 8))
    (dump,) = (tmp_path / "graph_0" / "pre_grad").glob("*_skip_empty_slots.py")
    code = dump.read_text()
    assert "ops.moe_ascend.grouped_mm_filled" in code and "ops.moe_ascend.grouped_mm_batched" not in code


class SlotMixingExperts(torch.nn.Module):
    """Capacity experts that add each expert's mean over its slots: the empty slots' values matter."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(8, 4, bias=False)
        self.w = torch.nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x):
        weights, expert_ids = ops.topk_softmax(self.gate(x), 2, True)
        dispatched, slots = ops.capacity_dispatch(x, expert_ids, weights, 4, 5, "position")
        h = ops.grouped_mm_batched(dispatched, self.w)
        return ops.capacity_combine(h + h.mean(dim=1, keepdim=True), slots, weights)


def test_experts_that_mix_slots_keep_their_padded_matmuls(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="moe_ascend"):
        result, lines = rewritten(SlotMixingExperts(), torch.randn(6, 8))
    assert not result.modified
    assert (any("grouped_mm_batched" in line for line in lines)
            and not any("grouped_mm_filled" in line for line in lines))
    assert ("MoE layer 0 keeps its padded expert matmuls: its expert node mean (mean) is not known to work slot "
            "by slot" in caplog.text)
    assert_matches_eager(SlotMixingExperts(), (torch.randn(6, 8),), {"target": "eager"})


@pytest.mark.parametrize("overlap", [False, 2])
def test_an_expert_parallel_layer_keeps_its_padded_matmuls_and_says_why(fake_two_ranks, caplog, overlap):
    import torch.distributed as dist

    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, capacity_factor=1.0, ep_group=dist.group.WORLD)
    with caplog.at_level(logging.INFO, logger="moe_ascend"):
        torch.compile(layer, backend="moe_ascend", options={"target": "eager", "overlap": overlap})(torch.randn(12, 8))
    assert "MoE layer 0 keeps its padded expert matmuls: its buffer reaches the experts through an all-to-all" \
        in caplog.text
