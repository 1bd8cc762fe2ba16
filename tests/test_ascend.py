"""The ascend target: its dry run (the graphs torchair would get, built and run here), the GE converter check,
and the table it reads. The tests that need an NPU skip without torch_npu."""

import importlib.util
import textwrap

import pytest
import torch
from checks import assert_matches_eager
from quickstart import MoETransformer, batches, stdlib_bytes

from moe_ascend.compiler import ascend_coverage
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
                    "_c10d_functional.all_to_all_single.default": "decomposed", "npu_define.allgather.default": "decomposed"}


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
