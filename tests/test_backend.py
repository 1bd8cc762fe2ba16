"""The backend end to end: numerics against eager, training without recompiles, targets, options."""

import logging

import pytest
import torch
from checks import assert_matches_eager
from models import DenseMLP, TwoLoopMoE
from quickstart import MoETransformer, batches, stdlib_bytes


def small_transformer():
    torch.manual_seed(0)
    return MoETransformer(d_model=32, n_heads=2, d_ff=64, n_layers=2, num_experts=8, top_k=2, seq_len=16)


def text_batch(batch=4, seq_len=16):
    return next(batches(stdlib_bytes(100_000), batch, seq_len))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_moe_transformer_loss_and_every_gradient_match_eager(target):
    assert_matches_eager(small_transformer(), text_batch(), {"target": target})


@pytest.mark.slow
@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_loop_moe_outputs_and_gradients_match_eager(target):
    torch.manual_seed(0)
    assert_matches_eager(TwoLoopMoE(), (torch.randn(12, 16),), {"target": target})


def test_a_warm_cache_still_counts_the_exchanges_of_both_graphs(monkeypatch):
    # AOTAutograd's cache, warm from the first compile, would hand the second both graphs without the lowering that
    # counts their all-to-alls (runtime.traffic): a rerun of a benchmark measured no inter-node byte
    from moe_ascend.compiler.pipeline import PostGradStage

    counted, count = [], PostGradStage.account
    monkeypatch.setattr(PostGradStage, "account", lambda self, gm, role: (counted.append(role), count(self, gm, role)))
    for _ in range(2):
        torch._dynamo.reset()
        torch.manual_seed(0)
        compiled = torch.compile(DenseMLP(), backend="moe_ascend", options={"target": "inductor"})  # fast to lower
        compiled(torch.randn(12, 16, requires_grad=True)).sum().backward()
    assert counted == ["forward", "backward"] * 2


def test_training_steps_do_not_recompile():
    from torch._dynamo.utils import counters

    counters.clear()
    model = small_transformer()
    compiled = torch.compile(model, backend="moe_ascend", options={"target": "eager"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batches(stdlib_bytes(100_000), 4, 16)
    losses = []
    for _ in range(4):
        loss = compiled(*next(data))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert counters["stats"]["unique_graphs"] == 1
    assert losses[-1] < losses[0]


def test_model_without_moe_compiles_unchanged_with_one_info_line(caplog, tmp_path):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="moe_ascend"):
        assert_matches_eager(DenseMLP(), (torch.randn(8, 16),), {"target": "eager", "dump_dir": str(tmp_path)})
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "no MoE layer found" in infos[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(not p["modified"] for g in summary["graphs"] for p in g["passes"])


def test_unknown_option_is_a_value_error_listing_the_valid_ones():
    model = torch.compile(DenseMLP(), backend="moe_ascend", options={"overlapp": 2})
    with pytest.raises(Exception) as info:
        model(torch.randn(2, 16))
    text = str(info.value)
    assert "overlapp" in text and "'overlap'" in text and "hierarchical_a2a" in text


def test_target_ascend_without_torch_npu_says_what_is_missing():
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    model = torch.compile(DenseMLP(), backend="moe_ascend", options={"target": "ascend"})
    with pytest.raises(Exception, match="target 'ascend' is not available here: torch_npu is not installed"):
        model(torch.randn(2, 16))


def test_auto_target_picks_inductor_here_and_says_why(caplog):
    import importlib.util

    from moe_ascend.compiler import targets

    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    targets._announced_auto = False
    with caplog.at_level(logging.INFO, logger="moe_ascend"):
        assert targets.resolve_target("auto") == "inductor"
        assert targets.resolve_target("auto") == "inductor"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "torch_npu is not installed" in said[0]


def test_moe_with_all_to_all_matches_eager(single_rank_group):
    from models import ExpertParallelMoE

    torch.manual_seed(0)
    assert_matches_eager(ExpertParallelMoE(single_rank_group), (torch.randn(8, 16),), {"target": "eager"})
