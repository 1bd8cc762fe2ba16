"""The ascend target: its dry run (the graphs torchair would get, built and run here), the GE converter check,
and the table it reads. The tests that need an NPU skip without torch_npu."""

import importlib.util
import textwrap

import pytest
import torch
from checks import assert_matches_eager
from quickstart import MoETransformer, batches, stdlib_bytes

from moe_ascend.compiler.report import ascend_coverage
from moe_ascend.compiler.options import Options
from moe_ascend.kernels.errors import OptionError
from moe_ascend.runtime import MoELayer

DRY_RUN = {"target": "ascend", "ascend_options": {"dry_run": True}}
NO_NPU = "needs torch_npu with CANN and an NPU (never installed in CI: without CANN it breaks `import torch`)"


@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["capacity", "dropless"])
def test_dry_run_equals_eager_forward_and_backward(capacity_factor):
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, capacity_factor=capacity_factor, num_shared_experts=1)
    assert_matches_eager(layer, (torch.randn(12, 8),), DRY_RUN)


def test_quickstart_graphs_have_a_converter_for_every_op_after_every_pass(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(d_model=32, n_heads=2, d_ff=64, n_layers=2, seq_len=16)
    assert_matches_eager(model, next(batches(stdlib_bytes(100_000), 4, 16)), DRY_RUN | {"dump_dir": str(tmp_path)})
    rows = ascend_coverage.check_dump(tmp_path)
    assert {row["role"] for row in rows} == {"forward", "backward"}
    assert {row["step"] for row in rows} >= {"input", "schedule_overlap", "verify_collectives"}
    assert [row for row in rows if row["missing"]] == []


def test_the_check_names_each_op_ge_lacks_and_why():
    def uses_what_ge_lacks(x, index):
        # index_copy: torchair's converter only raises; the fused CPU attention kernel: no converter at all
        copied = x.index_copy(0, index, x)
        attended = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(x[None, None], x[None, None],
                                                                                       x[None, None])[0]
        return copied + attended[0, 0] + torch.nn.functional.silu(x)

    gm = torch.fx.experimental.proxy_tensor.make_fx(uses_what_ge_lacks)(torch.randn(4, 8), torch.tensor([3, 2, 1, 0]))
    assert ascend_coverage.missing_converters(gm) == {
        "aten._scaled_dot_product_flash_attention_for_cpu.default": "torchair has no converter for it",
        "aten.index_copy.default": "torchair registers a converter for it that is not implemented",
    }
    assert ascend_coverage.why_not_covered("aten.silu_backward.default") is None  # a stub the target decomposes
    assert ascend_coverage.why_not_covered("moe_ascend.capacity_dispatch.default") is None  # decomposed
    assert ascend_coverage.why_not_covered("moe_ascend.grouped_mm.default") is None  # npu_grouped_matmul
    assert "on the host" in ascend_coverage.why_not_covered("moe_ascend.observe_affinity.default")
    symbolic = torch.fx.Graph()
    size = symbolic.call_function(__import__("operator").add, (symbolic.placeholder("a"), 1))
    assert ascend_coverage.op_key(size) == "operator.add" and ascend_coverage.why_not_covered("operator.add") is None
    assert ascend_coverage.why_not_covered("torch.sym_sum") is None  # torchair converts symbolic sizes' arithmetic
    assert ascend_coverage.why_not_covered("builtins.print") == "torchair has no converter for it"


def test_the_table_is_read_from_torchairs_sources(tmp_path):
    package = tmp_path / "torchair" / "python" / "torchair" / "ge_converter"
    package.mkdir(parents=True)
    (package / "ops.py").write_text(textwrap.dedent('''
        @register_fx_node_ge_converter(torch.ops.aten.mm.default)
        def conveter_mm(self, mat2, meta_outputs=None):
            """NB: aten::mm(Tensor self, Tensor mat2) -> Tensor"""
            return ge.MatMul(self, mat2)

        @register_fx_node_ge_converter(torch.ops.aten.index_copy.default)
        def conveter_index_copy(self, dim, index, source, meta_outputs=None):
            """NB: aten::index_copy(...)"""
            raise NotImplementedError("torch.ops.aten.index_copy.default ge_converter is not implemented!")

        def conveter_grouped(x, weight, meta_outputs=None):
            return ge.GroupedMatmul(x, weight)

        register_fx_node_ge_converter(torch.ops.npu.npu_grouped_matmul.default)(conveter_grouped)
    '''))
    out = tmp_path / "table.tsv"
    assert ascend_coverage.regenerate(tmp_path / "torchair", out, commit="abc123", date="2026-06-01") == 5
    text = out.read_text()
    assert "# Read from Ascend/torchair abc123 (2026-06-01)" in text
    rows = dict(line.split("\t") for line in text.splitlines() if not line.startswith("#"))
    assert rows == {"aten.mm.default": "implemented", "aten.index_copy.default": "stub",
                    "npu.npu_grouped_matmul.default": "implemented",
                    "_c10d_functional.all_to_all_single.default": "decomposed",
                    "npu_define.allgather.default": "decomposed"}


def test_the_shipped_table_says_where_it_comes_from_and_covers_the_moe_kernels():
    assert "Ascend/torchair fced8842" in ascend_coverage.table_source()
    table = ascend_coverage.converter_table()
    assert table["aten.mm.default"] == "implemented" and table["aten.index_put.default"] == "stub"
    for op in ("npu.npu_grouped_matmul.default", "npu.npu_moe_gating_top_k_softmax.default",
               "npu.npu_moe_distribute_dispatch.default", "npu.npu_moe_distribute_combine.default"):
        assert table[op] == "implemented", op


def test_ascend_options_are_checked():
    assert Options.from_user(DRY_RUN).ascend_option("mode") == "max-autotune"
    with pytest.raises(OptionError, match=r"'ascend_options'\['mode'\] is 'reduce-overhead'; give one of"):
        Options.from_user({"target": "ascend", "ascend_options": {"mode": "reduce-overhead"}})
    with pytest.raises(OptionError, match="applies to target 'ascend'"):
        Options.from_user({"target": "inductor", "ascend_options": {"dry_run": True}})


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is None, reason=NO_NPU)
def test_on_an_npu_the_layer_compiled_for_graph_mode_equals_eager_on_the_cpu():
    import torch_npu  # noqa: F401

    torch.manual_seed(0)
    layer = MoELayer(64, 128, 8, 2, capacity_factor=1.25)
    x = torch.randn(32, 64)
    want = layer(x)
    got = torch.compile(layer.npu(), backend="moe_ascend", options={"target": "ascend"})(x.npu())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)


# --- MC2: which expert-parallel exchange maps onto npu_moe_distribute_dispatch/combine, with which arguments ----

def mc2_decision(ranks, capacity_factor, training=False, dtype=torch.bfloat16, soc="Ascend910B", d_model=256):
    """The pass's decision for a 32-expert top-2 capacity layer over ``ranks`` (fake ranks), 64 tokens a rank."""
    import torch.distributed as dist
    from graphs import context, dynamo_graph
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moe_ascend.passes.find_moe import find_moe
    from moe_ascend.passes.mc2_dispatch import mc2_dispatch
    from moe_ascend.passes.normalise import normalise

    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=ranks)
    try:
        torch.manual_seed(0)
        layer = MoELayer(d_model, 128, 32, 2, capacity_factor=capacity_factor, ep_group=dist.group.WORLD).to(dtype)
        gm = dynamo_graph(layer, torch.randn(64, d_model, dtype=dtype))
        ctx = context(options={"target": "ascend", "ascend_options": {"dry_run": True, "soc": soc}}, training=training)
        normalise(gm, ctx)
        find_moe(gm, ctx)
        assert not mc2_dispatch(gm, ctx).modified
        (decision,) = ctx.analyses["mc2"]
        return decision
    finally:
        dist.destroy_process_group()


def test_golden_mc2_mapping_of_an_inference_layer_that_drops_nothing():
    from moe_ascend.kernels.ascend import TensorArg, call_problems

    decision = mc2_decision(16, capacity_factor=16.0)  # C = ceil(2 * 64 / 32 * 16) = 64 = T: nothing can drop
    assert (decision.soc, decision.dispatch.op, decision.combine.op) == \
        ("Ascend910B", "npu_moe_distribute_dispatch", "npu_moe_distribute_combine")
    common = {"group_ep": "hccl:0", "ep_world_size": 16, "ep_rank_id": 3, "moe_expert_num": 32, "global_bs": 1024}
    assert decision.dispatch.args == {"x": "tokens", "expert_ids": "expert_ids:int32", **common,
                                      "expert_scales": "weights:float32", "quant_mode": 0, "expert_token_nums_type": 1}
    assert decision.combine.args == {
        "expand_x": "expert_out", "expert_ids": "expert_ids:int32", "expand_idx": "dispatch.expand_idx",
        "ep_send_counts": "dispatch.ep_recv_counts", "expert_scales": "weights:float32", **common,
        "tp_send_counts": "dispatch.tp_recv_counts", "expand_scales": "dispatch.expand_scales"}
    assert all(isinstance(decision.dispatch.args[k], TensorArg) for k in ("x", "expert_ids", "expert_scales"))
    for call in (decision.dispatch, decision.combine):  # against torch_npu's recorded schemas
        assert call_problems(call.op, call.args) == []


def test_mc2_on_atlas_a3_takes_version_2():
    decision = mc2_decision(16, capacity_factor=16.0, soc="Ascend910_93", d_model=1024)
    assert (decision.dispatch.op, decision.combine.op) == ("npu_moe_distribute_dispatch_v2",
                                                           "npu_moe_distribute_combine_v2")
    assert decision.combine.args["assist_info_for_combine"] == "dispatch.assist_info_for_combine"


@pytest.mark.parametrize("case, want", [
    (dict(ranks=16, capacity_factor=16.0, training=True), "no backward"),
    (dict(ranks=16, capacity_factor=1.25), "C = 5 < T = 64 tokens may drop pairs"),  # ceil(2 * 64 / 32 * 1.25)
    (dict(ranks=16, capacity_factor=16.0, dtype=torch.float32), "its tokens are float32"),
    (dict(ranks=4, capacity_factor=16.0), "an EP group of 4 ranks is not among [16, 32, 64]"),
    (dict(ranks=16, capacity_factor=16.0, d_model=200), "hidden size 200 is outside [32, 7168] (a multiple of 32)"),
])
def test_mc2_says_why_a_layer_keeps_its_all_to_all(case, want):
    assert want in mc2_decision(**case)


def test_the_schema_check_catches_a_wrong_call():
    from moe_ascend.kernels.ascend import TensorArg, call_problems

    assert call_problems("npu_moe_distribute_dispatch", {"x": TensorArg("tokens"), "expert_ids": 3, "group_ep": "g",
                                                         "ep_world_size": 16, "ep_rank_id": 0, "bogus": 1}) == [
        "npu_moe_distribute_dispatch has no argument 'bogus'",
        "npu_moe_distribute_dispatch(expert_ids: Tensor) given 3",
        "npu_moe_distribute_dispatch needs 'moe_expert_num'",
    ]


def test_doctor_and_inspect_show_the_check_of_a_dump(tmp_path):
    import subprocess
    import sys

    from moe_ascend.compiler.report.inspect import format_table, load_summary

    # Affinity routing's token-choice phase folds statistics into a buffer on the host: no GE form.
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, capacity_factor=1.25)
    options = DRY_RUN | {"dump_dir": str(tmp_path), "routing": "affinity"}
    torch.compile(layer, backend="moe_ascend", options=options)(torch.randn(12, 8)).sum().backward()
    doctor = subprocess.run([sys.executable, "-m", "moe_ascend.compiler.cli", "doctor", "--ascend-check",
                             str(tmp_path)], capture_output=True, text=True)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "missing: moe_ascend.observe_affinity.default (it folds the affinity statistics" in doctor.stdout
    table = format_table(load_summary(tmp_path))
    assert "Ascend GE converters: none for moe_ascend.observe_affinity.default" in table


def mc2_rewrite_against_the_layer(rank, world_size, dump_dir):
    """On each rank: the layer rewritten onto the MC2 kernels (their stand-ins here) against the layer itself."""
    import mc2_standin
    import torch.distributed as dist

    from moe_ascend.kernels import ascend

    mc2_standin.register()
    ascend.ep_comm_name = lambda group, rank: group  # the stand-ins run on the gloo group itself
    torch.manual_seed(0)  # 4 experts top-2 over the ranks, 8 tokens a rank: C = ceil(2 * 8 / 4 * 2.0) = 8 = T
    layer = MoELayer(1024, 64, 4, 2, capacity_factor=2.0, ep_group=dist.group.WORLD).to(torch.bfloat16)
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    options = {"target": "ascend", "ascend_options": {"dry_run": True, "soc": "Ascend910_93"}, "dump_dir": dump_dir}
    with torch.no_grad():
        want = layer(x)
        got = torch.compile(layer, backend="moe_ascend", options=options)(x)
    return (got.float() - want.float()).abs().max().item(), want.float().abs().max().item()


@pytest.mark.slow
def test_mc2_rewrite_computes_what_the_capacity_layer_does(tmp_path):
    from distributed import run_ranks

    for difference, scale in run_ranks(2, mc2_rewrite_against_the_layer, str(tmp_path)):
        assert difference <= 0.02 * scale, (difference, scale)  # bf16: the sums run in another order
    (code,) = (tmp_path / "rank0" / "graph_0" / "pre_grad").glob("*_mc2_dispatch.py")
    lines = [line.strip() for line in code.read_text().splitlines()
             if " = " in line and not line.strip().startswith("#")]
    calls = [line.split(" = ", 1)[1].split("(")[0] for line in lines if "torch.ops." in line]
    assert calls == ["torch.ops.moe_ascend.topk_softmax.default",
                     "torch.ops.npu.npu_moe_distribute_dispatch_v2.default", "torch.ops.moe_ascend.grouped_mm.default",
                     "torch.ops.moe_ascend.grouped_mm.default", "torch.ops.npu.npu_moe_distribute_combine_v2.default"]
    assert not any("all_to_all" in line or "capacity_dispatch" in line or "capacity_combine" in line for line in lines)
