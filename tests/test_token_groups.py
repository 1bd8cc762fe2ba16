"""token_groups: the graph it produces, where it refuses and why, the schedule it leaves room for, and that the
grouped graph computes what the ungrouped one does, forward and backward, on two ranks."""

import itertools
import logging
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from distributed import run_ranks
from graphs import code_lines

from moe_ascend.passes import PassResult
from moe_ascend.passes.analysis.ops import is_collective, is_matmul, is_wait, op_name
from moe_ascend.runtime import MoELayer

GROUPS = {"token_groups": 2}
CALLS = itertools.count()


class Block(nn.Module):
    """Attention, then an expert-parallel MoE layer (a shared expert beside it), each with its residual."""

    def __init__(self, d=8, heads=2, experts=4, top_k=2, capacity_factor=2.0, **moe):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.moe = MoELayer(d, 16, experts, top_k, capacity_factor=capacity_factor, ep_group=dist.group.WORLD,
                            num_shared_experts=1, **moe)

    def forward(self, x):
        batch, seq, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, seq, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(batch, seq, d))
        return x + self.moe(x.reshape(-1, d)).reshape(batch, seq, d)


def compiled_graphs(temporary_passes, model, x, overlap):
    """One training step; the code after token_groups and each post-grad graph's nodes."""
    seen, call = {}, next(CALLS)  # probes of their own: a test may compile twice

    @temporary_passes(name=f"probe_pre_grad_{call}", stage="pre_grad", after=("token_groups",), roles=("dynamo",))
    def probe_pre_grad(gm, ctx):
        seen["pre_grad"] = code_lines(gm)
        return PassResult(gm, False)

    @temporary_passes(name=f"probe_post_grad_{call}", stage="post_grad", after=("schedule_overlap",))
    def probe_post_grad(gm, ctx):
        seen[ctx.role] = list(gm.graph.nodes)
        return PassResult(gm, False)

    torch._dynamo.reset()
    torch.compile(model, backend="moe_ascend", options={"target": "eager", "overlap": overlap})(x).sum().backward()
    return seen


def _group(node):
    return (node.meta.get("custom") or {}).get("token_group")


def test_each_group_runs_the_graph_on_its_rows_with_its_share_of_the_slots(fake_two_ranks, temporary_passes):
    torch.manual_seed(0)  # 4 x 6 tokens, 4 experts, top-2, capacity factor 2: C = 24 = T holds every token
    lines = compiled_graphs(temporary_passes, Block(), torch.randn(4, 6, 8), GROUPS)["pre_grad"]
    shown = ("l_x__group_0", "l_x__group_1", "reshape_group_1", "a_group_0", "a_group_1",
             "capacity_dispatch_default_group_1", "expert_in_group_1", "out_2_group_1", "add_2_groups")
    assert [line for line in lines if line.split(" = ")[0] in shown] == [
        "l_x__group_0 = torch.narrow(l_x_, 0, 0, 2)",
        "l_x__group_1 = torch.narrow(l_x_, 0, 2, 2)",
        "reshape_group_1 = linear_group_1.reshape(2, 6, 3, 2, 4)",  # the view's batch axis: 4 rows became 2
        "a_group_0 = torch._C._nn.scaled_dot_product_attention(transpose_group_0, transpose_1_group_0, "
        "transpose_2_group_0, is_causal = True)",
        "a_group_1 = torch._C._nn.scaled_dot_product_attention(transpose_group_1, transpose_1_group_1, "
        "transpose_2_group_1, is_causal = True)",
        "capacity_dispatch_default_group_1 = torch.ops.moe_ascend.capacity_dispatch.default(tokens_group_1, "
        "expert_ids_group_1, weights_group_1, 4, 12, 'position')",  # ceil(24 / 2) slots per expert
        "expert_in_group_1 = moe_ascend_kernels_exchange_to_experts(dispatched_group_1, '0', 2)",
        "out_2_group_1 = torch.ops.moe_ascend.capacity_combine.default(returned_group_1, slots_group_1, "
        "weights_group_1)",
        "add_2_groups = torch.cat([add_2_group_0, add_2_group_1], 0)",
    ]
    assert not any("all_to_all_single" in line for line in lines)  # each group's exchange follows its buffer
    assert sum("exchange_to_experts(" in line for line in lines) == 2


def test_a_state_update_sees_the_whole_batch_once(fake_two_ranks, temporary_passes):
    # DeepSeek-V3's bias, nudged by the load: each group routes its rows, the load counts them all together
    torch.manual_seed(0)
    model = Block(score="sigmoid", router_bias_update=0.01)
    lines = compiled_graphs(temporary_passes, model, torch.randn(4, 6, 8), GROUPS)["pre_grad"]
    assert sum("topk_sigmoid.default(logits_group_" in line for line in lines) == 2
    assert "expert_ids_groups = torch.cat([expert_ids_group_0, expert_ids_group_1], 0)" in lines
    assert [line.split(" = ")[0] for line in lines if re.search(r"all_reduce|copy_\(|scatter_add\(", line)] == [
        "scatter_add", "tensor", "copy_"]


def _between(nodes, collective) -> list:
    """The nodes after ``collective`` and before its wait."""
    position = {n: i for i, n in enumerate(nodes)}
    wait = next(u for u in collective.users if is_wait(u))
    return nodes[position[collective] + 1:position[wait]]


def test_one_groups_attention_and_weight_gradients_run_while_the_others_all_to_all_travels(fake_two_ranks,
                                                                                             temporary_passes):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    graphs = compiled_graphs(temporary_passes, model, torch.randn(4, 6, 8, requires_grad=True), GROUPS)
    forward, backward = graphs["forward"], graphs["backward"]

    dispatches = [n for n in forward if is_collective(n)]
    assert [_group(n) for n in dispatches] == [0, 1, 0, 1] * 2  # each layer: both dispatches, both combines
    # group 1's attention computes while group 0's first dispatch is in flight
    assert any(op_name(n).startswith("_scaled_dot_product") and _group(n) == 1
               for n in _between(forward, dispatches[0]))

    # in the backward, some all-to-all of each group has the other group's matmuls under it, weight gradients
    # among them (a matmul with a parameter's gradient downstream: here, one reading a tangent of the other group)
    for group in (0, 1):
        hidden = [n for c in backward if is_collective(c) and _group(c) == group for n in _between(backward, c)
                  if is_matmul(n) and _group(n) == 1 - group]
        assert hidden, f"no matmul of group {1 - group} under any backward all-to-all of group {group}"


def test_a_capacity_that_can_drop_is_grouped_only_when_asked(fake_two_ranks, temporary_passes, caplog):
    torch.manual_seed(0)  # capacity factor 1: C = 12 < T = 24, so the groups' buffers could drop differently
    model, x = Block(capacity_factor=1.0), torch.randn(4, 6, 8)
    with caplog.at_level(logging.WARNING, logger="moe_ascend"):
        lines = compiled_graphs(temporary_passes, model, x, GROUPS)["pre_grad"]
    assert not any("_group_" in line for line in lines)
    assert re.search(r"not split into 2 token groups: capacity_dispatch_default \(capacity_dispatch\) can drop "
                     r"tokens \(capacity 12 slots per expert for 24 tokens\).*'changes_numerics': True",
                     caplog.text)
    lines = compiled_graphs(temporary_passes, model, x, {**GROUPS, "changes_numerics": True})["pre_grad"]
    assert any(re.match(r"capacity_dispatch_default_group_1 = .*, 4, 6, 'position'\)", line) for line in lines)


def test_auto_groups_where_the_other_groups_attention_can_hide_what_the_experts_cannot(
        fake_two_ranks, temporary_passes, cost_model_hardware, caplog):
    # Experts too quick to hide any chunk, attention and the shared expert as slow as the link: token groups.
    cost_model_hardware(matmul_flops=1e6, expert_matmul_flops=1e12)
    torch.manual_seed(0)
    model, x = nn.Sequential(Block(), Block()), torch.randn(4, 6, 8)
    with caplog.at_level(logging.INFO, logger="moe_ascend"):
        lines = compiled_graphs(temporary_passes, model, x, "auto")["pre_grad"]
    assert "split into 4 token groups (2 MoE layers each)" in caplog.text
    assert any(line.startswith("l_args_0__group_3 = torch.narrow(l_args_0_, 0, 3, 1)") for line in lines)
    assert not any(re.match(r"slots_\d+ = torch\.narrow", line) for line in lines)  # a group's exchange: unchunked

    # A capacity that can drop: plain "auto" keeps the numerics, so it chunks instead and says why; with consent,
    # it groups.
    model = nn.Sequential(Block(capacity_factor=1.0), Block(capacity_factor=1.0))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moe_ascend"):
        lines = compiled_graphs(temporary_passes, model, x, "auto")["pre_grad"]
    assert not any("_group_" in line for line in lines)
    assert re.search(r"not split into 4 token groups: .* can drop tokens .*overlap=\{'token_groups': 'auto', "
                     r"'changes_numerics': True\}", caplog.text)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # "auto" choosing is no warning
    lines = compiled_graphs(temporary_passes, model, x, {"token_groups": "auto", "changes_numerics": True})["pre_grad"]
    assert any(line.startswith("l_args_0__group_3 = ") for line in lines)


def test_auto_keeps_to_chunks_where_the_experts_hide_them(fake_two_ranks, temporary_passes, cost_model_hardware,
                                                           caplog):
    # Slow experts, quick attention: eight chunks hide under the experts all but a quarter of the exchange; two
    # groups (two sequences) would leave half of it (one of four exchanges) with nothing more to hide under.
    cost_model_hardware(matmul_flops=1e12, expert_matmul_flops=1e6)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="moe_ascend"):
        lines = compiled_graphs(temporary_passes, nn.Sequential(Block(), Block()), torch.randn(2, 12, 8),
                                "auto")["pre_grad"]
    assert not any("_group_" in line for line in lines)
    assert re.search(r"not split into token groups: the cost model predicts \d chunks of each exchange faster",
                     caplog.text)
    assert any(re.match(r"slots_\d+ = torch\.narrow", line) for line in lines)


class BatchStatistic(Block):
    """Centres the tokens on the batch's mean before the layer: rows that depend on every other row."""

    def forward(self, x):
        return super().forward(x - x.mean(dim=0, keepdim=True))


def test_a_graph_that_mixes_rows_is_left_alone_with_the_node_named(fake_two_ranks, temporary_passes, caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="moe_ascend"):
        lines = compiled_graphs(temporary_passes, BatchStatistic(), torch.randn(4, 6, 8), GROUPS)["pre_grad"]
    assert not any("_group_" in line for line in lines)
    assert re.search(r"not split into 2 token groups: mean \(mean\) works along dim=0, the axis of the batch's rows",
                     caplog.text)


def test_one_process_has_nothing_to_hide_and_says_so(temporary_passes, caplog):
    torch.manual_seed(0)
    model = MoELayer(8, 16, 4, 2, capacity_factor=2.0)
    with caplog.at_level(logging.WARNING, logger="moe_ascend"):
        lines = compiled_graphs(temporary_passes, model, torch.randn(12, 8), GROUPS)["pre_grad"]
    assert not any("_group_" in line for line in lines)
    assert "not split into 2 token groups: the graph exchanges nothing" in caplog.text


def grouped_equals_ungrouped(rank, world_size, runs):
    """Each run ``(target, model)`` grouped in two against the same model ungrouped (run by the eager target: one
    reference per model serves every target), outputs and every gradient. Rank 0 lowers the grouped graph by
    ``target``, the others by the eager target (Inductor's compile once, not on every rank of two cores); they
    exchange as one job, so the lowering keeps the collectives' order."""
    worst, references = {}, {}
    for target, kind in runs:
        def build():
            torch.manual_seed(0)
            if kind == "layer":
                return MoELayer(8, 16, 4, 2, capacity_factor=2.0, ep_group=dist.group.WORLD).double()
            if kind == "biased layer":  # its router bias is nudged by the whole batch's load
                return MoELayer(8, 16, 4, 2, capacity_factor=2.0, ep_group=dist.group.WORLD, score="sigmoid",
                                router_bias_update=0.01).double()
            return nn.Sequential(Block(), Block(drop_policy="score")).double()

        torch.manual_seed(1 + rank)
        shape = (4, 6, 8) if kind == "blocks" else (12, 8)
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(*shape, dtype=torch.float64)

        def step(target, overlap):
            model = build()
            torch._dynamo.reset()
            out = torch.compile(model, backend="moe_ascend", options={"target": target, "overlap": overlap})(x)
            out.backward(grad)
            got = [out.detach(), x.grad.clone(), *(p.grad.clone() for p in model.parameters()), *model.buffers()]
            x.grad = None
            return got

        if kind not in references:
            references[kind] = step("eager", False)
        got = step(target if rank == 0 else "eager", GROUPS)
        worst[f"{target}/{kind}"] = max((a - b).abs().max().item() for a, b in zip(references[kind], got, strict=True))
    return worst


@pytest.mark.slow
def test_grouped_and_scheduled_equals_the_ungrouped_graph_forward_and_backward():
    runs = [("eager", "layer"), ("eager", "biased layer"), ("eager", "blocks"), ("inductor", "blocks")]
    for worst in run_ranks(2, grouped_equals_ungrouped, runs):
        assert set(worst) == {f"{t}/{k}" for t, k in runs}
        assert max(worst.values()) < 1e-12, worst
