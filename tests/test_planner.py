"""The planner: the symbolic step model (compiler.planner.step_model) and the layout search
(compiler.planner.search)."""

import itertools
import json

import numpy as np
import pytest
import sympy as sp

from moe_ascend.compiler.cli import main
from moe_ascend.compiler.planner.measured import errors
from moe_ascend.compiler.planner.search import SEARCHED, layouts, search
from moe_ascend.compiler.planner.step_model import (OPTIONAL, Hardware, MoEModel, PlannerError, StepModel,
                                                    distinct_nodes_fraction)

H100 = Hardware.load("h100")
# 16 experts of top-4 over 4 nodes of 8: small enough to reason about, large enough for every technique to matter
SMALL = MoEModel(name="small", layers=8, hidden=2048, heads=16, head_dim=128, vocab=32000, experts=16, top_k=4,
                 expert_ffn=1024, sequence=2048, global_batch=256)
COMM_FREE = Hardware(**{**H100.__dict__, "comm_compute_share": 0.0})  # communication that takes no compute
LAYOUT_ONE = dict(tp=1, ep=16, pp=2, vpp=1, dp=16, mb=1, recompute=0, chunks=1, hierarchical=0)
# the same with DeepSeek-V3's attention (MLA), its node limit and its FP8 recipe
SMALL_MLA = MoEModel(**{**SMALL.__dict__, "q_rank": 512, "kv_rank": 256, "rope_dim": 64, "node_limit": 2,
                        "fp8": True})


@pytest.fixture(scope="module")
def small():
    return StepModel(SMALL, H100, devices=32)


def vary(model: StepModel, **changes) -> dict:
    """The model's outputs for LAYOUT_ONE, then with each change in turn (arrays of two)."""
    (name, values), = changes.items()
    return model.evaluate({**LAYOUT_ONE, name: np.array(values)})


# --- the formulas ------------------------------------------------------------------------------

@pytest.mark.parametrize("experts, top_k, nodes", [(8, 2, 2), (16, 4, 4), (12, 3, 3), (8, 1, 4)])
def test_the_hierarchical_share_is_the_mean_number_of_distinct_nodes_over_k(experts, top_k, nodes):
    node_of = [e * nodes // experts for e in range(experts)]
    choices = list(itertools.combinations(range(experts), top_k))
    distinct = sum(len({node_of[e] for e in c}) for c in choices) / len(choices)
    assert distinct_nodes_fraction(experts, top_k, nodes) == pytest.approx(distinct / top_k)


def test_parameter_counts_match_the_published_models():
    mixtral, deepseek = MoEModel.load("mixtral-8x7b"), MoEModel.load("deepseek-v3")
    assert mixtral.dense_params + mixtral.expert_params == pytest.approx(46.7e9, rel=0.01)
    assert mixtral.active_params == pytest.approx(12.9e9, rel=0.01)
    assert deepseek.dense_params + deepseek.expert_params == pytest.approx(671e9, rel=0.01)
    assert deepseek.active_params == pytest.approx(37e9, rel=0.03)


@pytest.mark.parametrize("model, layout", [
    (SMALL, dict(tp=2, ep=4, pp=2, vpp=2, dp=8, mb=2, recompute=1, chunks=2, hierarchical=1, groups=2)),
    (SMALL_MLA, dict(tp=2, ep=16, pp=2, vpp=1, dp=8, mb=2, recompute=2, chunks=2, hierarchical=1, dualpipe=1)),
], ids=["1f1b", "mla-fp8-dualpipe"])
def test_the_numbers_are_the_formulas(model, layout):
    model = StepModel(model, H100, devices=32)
    compiled = model.evaluate(layout)
    for name, expression in model.expressions.items():
        exact = float(expression.xreplace({model.symbols[n]: sp.Integer(layout.get(n, OPTIONAL.get(n)))
                                           for n in model.symbols}))
        assert compiled[name] == pytest.approx(exact, rel=1e-9), name


def test_each_technique_moves_what_it_should(small):
    hierarchy = vary(small, hierarchical=[0, 1])  # expert group over 2 nodes, top-4 of 16: fewer bytes cross
    assert hierarchy["a2a_exposed_s"][1] < 0.9 * hierarchy["a2a_exposed_s"][0]
    wide = MoEModel(**{**SMALL.__dict__, "expert_ffn": 8192})
    overlap = vary(StepModel(wide, COMM_FREE, devices=32), chunks=[1, 4])  # experts longer than their exchange
    assert overlap["a2a_exposed_s"][1] < 0.5 * overlap["a2a_exposed_s"][0]
    inside_a_node = vary(small, ep=[1, 8])  # dp 16 = 2 nodes; 8 experts' ranks fit in one
    assert inside_a_node["a2a_exposed_s"][0] == pytest.approx(0, abs=1e-12) and inside_a_node["a2a_exposed_s"][1] > 0
    interleaved = vary(small, vpp=[1, 2])
    assert interleaved["bubble_s"][1] < 0.6 * interleaved["bubble_s"][0]
    recompute = vary(small, recompute=[0, 1])
    assert recompute["memory_bytes"][1] < recompute["memory_bytes"][0]
    assert recompute["step_s"][1] > recompute["step_s"][0]
    skew = StepModel(MoEModel(**{**SMALL.__dict__, "imbalance": 1.5}), H100, devices=32).evaluate(LAYOUT_ONE)
    assert skew["step_s"] > small.evaluate(LAYOUT_ONE)["step_s"]


def test_a_hidden_exchange_still_costs_the_compute_its_kernels_hold():
    wide = MoEModel(**{**SMALL.__dict__, "expert_ffn": 8192})
    chunked = {**LAYOUT_ONE, "chunks": 4}
    unhidden = Hardware(**{**COMM_FREE.__dict__, "overlap_efficiency": 0.0})
    link, free, held = (StepModel(wide, hw, devices=32).evaluate(chunked) for hw in (unhidden, COMM_FREE, H100))
    # 0.15 of what is hidden (DeepEP's 20 of 132 SMs) comes back as exposed time
    hidden = link["a2a_exposed_s"] - free["a2a_exposed_s"]
    assert hidden > 0
    assert held["a2a_exposed_s"] - free["a2a_exposed_s"] == pytest.approx(H100.comm_compute_share * hidden)


def test_each_chunk_pays_the_latency_and_hides_only_what_the_device_overlaps():
    slow_start = Hardware(**{**H100.__dict__, "inter_node_latency": 0.05})  # a latency that dwarfs the bytes
    chunked = vary(StepModel(SMALL, slow_start, devices=32), chunks=[1, 4])
    assert chunked["a2a_exposed_s"][1] > chunked["a2a_exposed_s"][0]
    no_overlap = Hardware(**{**H100.__dict__, "overlap_efficiency": 0.0})
    chunked = vary(StepModel(SMALL, no_overlap, devices=32), chunks=[1, 4])
    assert chunked["a2a_exposed_s"][1] >= chunked["a2a_exposed_s"][0]


def test_token_groups_hide_all_but_one_exchange_under_the_whole_layer_and_shrink_each_matmul():
    # no latency, and a link fast enough for the rest of a layer to hide all but one exchange
    quick_start = Hardware(**{**COMM_FREE.__dict__, "inter_node_latency": 0.0, "intra_node_latency": 0.0,
                              "inter_node_bandwidth": 10 * H100.inter_node_bandwidth})
    model = StepModel(SMALL, quick_start, devices=32)
    assert model.evaluate(LAYOUT_ONE)["step_s"] == model.evaluate({**LAYOUT_ONE, "groups": 1})["step_s"]
    one, two = vary(model, groups=[1, 2])["a2a_exposed_s"]
    # two groups send dispatch and combine twice, each half the bytes: one of the four stays exposed
    assert two == pytest.approx(one / 4)
    chunked = vary(model, chunks=[1, 2])["a2a_exposed_s"][1]
    assert two < chunked  # two chunks hide under the experts only, and expose the first and the last
    no_overlap = StepModel(SMALL, Hardware(**{**quick_start.__dict__, "overlap_efficiency": 0.0}), devices=32)
    ungrouped, grouped = vary(no_overlap, groups=[1, 2])["step_s"]
    assert grouped > ungrouped  # nothing hidden, and each matmul has half the rows


def test_the_training_recipe_sets_the_bytes_each_weight_holds():
    layout = {**LAYOUT_ONE, "ep": 1, "pp": 1, "dp": 32}
    def states(**recipe):  # the memory of a run with no activations to speak of
        model = MoEModel(**{**SMALL.__dict__, "sequence": 1, **recipe})
        return float(StepModel(model, H100, devices=32).evaluate(layout)["memory_bytes"])
    weights = SMALL.dense_params + SMALL.expert_params
    # fp32, optimizer not sharded: weight, gradient and Adam's two moments, 4 bytes each
    assert states(dtype_bytes=4, distributed_optimizer=False) == pytest.approx(16 * weights, rel=0.01)
    # bf16 with fp32 gradients; the master weights and moments (12 bytes) sharded over 32
    assert states() == pytest.approx((2 + 4 + 12 / 32) * weights, rel=0.01)


def test_mla_is_counted_from_its_latents_and_its_heads():
    deepseek = MoEModel.load("deepseek-v3")
    # q: 7168·1536 + 1536·128·192; kv: 7168·576 + 512·128·256; out: 128·128·7168 (the published 671B / 37B)
    assert deepseek.attention_params_per_layer == 187_105_280
    kept, linear = deepseek.attention_activations(selective=False)
    assert (kept, linear) == (7168 + 1536 + 512 + 64 + 128 * (192 + 192 + 128), 7168 + 1536 + 512 + 128 * 128)
    kept, linear = deepseek.attention_activations(selective=True)  # norms and up-projections recomputed
    assert (kept, linear) == (7168 + 1536 + 512 + 64, 128 * 128)
    with pytest.raises(PlannerError, match=r"selective_recompute \['attn'\] unknown"):
        MoEModel(**{**SMALL.__dict__, "selective_recompute": ["attn"]})


def test_selective_recompute_keeps_less_than_none_and_costs_less_than_full():
    model = StepModel(SMALL_MLA, H100, devices=32)
    none, full, selective = (model.evaluate({**LAYOUT_ONE, "recompute": rc}) for rc in (0, 1, 2))
    assert full["memory_bytes"] < selective["memory_bytes"] < none["memory_bytes"]
    assert none["step_s"] < selective["step_s"] < full["step_s"]


def test_fp8_runs_the_linear_layers_at_the_fp8_rate_and_keeps_their_inputs_in_one_byte():
    wide = {**SMALL_MLA.__dict__, "expert_ffn": 8192}  # the matmuls, not the casts, take the time
    bf16, fp8 = (StepModel(MoEModel(**{**wide, "fp8": on}), H100, devices=32).evaluate(LAYOUT_ONE)
                 for on in (False, True))
    assert fp8["compute_s"] < 0.8 * bf16["compute_s"] and fp8["memory_bytes"] < bf16["memory_bytes"]
    assert fp8["a2a_exposed_s"] < bf16["a2a_exposed_s"]  # the dispatch crosses in one byte a value
    with pytest.raises(PlannerError, match="fp8_matmul_flops"):
        StepModel(SMALL_MLA, Hardware.load("ascend-910b"), devices=32).evaluate(LAYOUT_ONE)


def test_dualpipe_halves_the_bubble_hides_each_exchange_under_the_other_direction_and_holds_two_stages():
    model = StepModel(SMALL, H100, devices=32)
    pipe, dual = (model.evaluate({**LAYOUT_ONE, "pp": 4, "dp": 8, "ep": 8, "dualpipe": d}) for d in (0, 1))
    assert dual["bubble_s"] < 0.5 * pipe["bubble_s"] and dual["pp_p2p_s"] == 0
    assert dual["a2a_exposed_s"] < pipe["a2a_exposed_s"]
    assert dual["memory_bytes"] > pipe["memory_bytes"]


def test_a_node_limit_caps_the_nodes_a_token_crosses_to_in_the_two_step_exchange():
    spread = {**LAYOUT_ONE, "ep": 32, "pp": 1, "dp": 32, "hierarchical": 1}  # 4 nodes, top-4: ~2.7 nodes a token
    free, limited = (StepModel(MoEModel(**{**SMALL.__dict__, "node_limit": m}), H100, devices=32).evaluate(spread)
                     for m in (0, 1))
    assert limited["a2a_exposed_s"] < 0.6 * free["a2a_exposed_s"]


def test_measured_rates_of_attention_and_the_optimizer_are_used():
    base = StepModel(SMALL, H100, devices=32).evaluate(LAYOUT_ONE)["step_s"]
    for slower in ({"attention_flops": 1e12}, {"optimizer_bandwidth": 1e9}, {"expert_matmul_flops": 1e13}):
        hardware = Hardware(**{**H100.__dict__, **slower})
        assert StepModel(SMALL, hardware, devices=32).evaluate(LAYOUT_ONE)["step_s"] > base, slower


def test_prediction_errors_count_relative_error_and_the_pairs_kept_in_order():
    runs = [{"step_s": 1.0, "predicted_step_s": 1.1, "memory_bytes": 100, "predicted_memory_bytes": 90},
            {"step_s": 2.0, "predicted_step_s": 1.0, "memory_bytes": 100, "predicted_memory_bytes": 100},
            {"step_s": 3.0, "predicted_step_s": 3.0, "memory_bytes": 100, "predicted_memory_bytes": 100}]
    figures = errors(runs)
    assert figures["mean_abs_error"] == pytest.approx((0.1 + 0.5 + 0) / 3)
    assert figures["max_error"] == pytest.approx(0.5)
    assert figures["pairwise_order_kept"] == pytest.approx(2 / 3)  # 1 < 2 predicted the other way round
    assert figures["memory_max_error"] == pytest.approx(0.1)


# --- the search --------------------------------------------------------------------------------

def test_every_layout_searched_is_one_the_devices_and_the_model_allow():
    space = layouts(SMALL, H100, 32)
    tp, ep, pp, vpp, dp, mb = (space[n] for n in ("tp", "ep", "pp", "vpp", "dp", "mb"))
    assert np.all(tp * pp * dp == 32) and np.all(tp * dp % ep == 0) and np.all(SMALL.experts % ep == 0)
    assert np.all(tp <= 8) and np.all(SMALL.global_batch % (dp * mb) == 0) and np.all(pp * vpp <= SMALL.layers)
    assert np.all((space["hierarchical"] == 0) | (ep > 8)), "hierarchy only where the expert group spans nodes"
    assert np.all((space["dualpipe"] == 0) | ((vpp == 1) & (pp % 2 == 0))), "DualPipe: an even pipeline, no vpp"
    assert set(np.unique(space["recompute"])) == {0, 1, 2} and np.any(ep > dp), "selective; ep folded over tp"
    assert len({tuple(row) for row in np.stack([space[n] for n in SEARCHED], 1)}) == len(tp), "no layout twice"


def test_the_plan_lists_the_fastest_layouts_that_fit_and_the_pareto_front():
    plan = search(SMALL, H100, 32)
    best = plan.best(5)
    assert [r["step_s"] for r in best] == sorted(r["step_s"] for r in best)
    assert best[0]["step_s"] == pytest.approx(plan.predicted["step_s"][plan.fitting].min())
    assert all(r["memory_bytes"] <= H100.usable_memory * H100.memory_bytes for r in best)
    front = plan.pareto()
    fits = np.flatnonzero(plan.fitting)
    for row in front:  # nothing that fits is both leaner and faster
        leaner = plan.predicted["memory_bytes"][fits] <= row["memory_bytes"]
        assert not np.any(plan.predicted["tokens_per_s"][fits][leaner] > row["tokens_per_s"] * (1 + 1e-12))


def test_what_the_planner_cannot_use_says_what_to_change(tmp_path):
    with pytest.raises(PlannerError, match="deepseek-v3"):
        MoEModel.load("no-such-model")
    (tmp_path / "m.yaml").write_text("name: m\nlayers: 2\nhidden: 8\nheds: 2\n")
    with pytest.raises(PlannerError, match=r"unknown keys \['heds'\]"):
        MoEModel.load(str(tmp_path / "m.yaml"))
    with pytest.raises(PlannerError, match="global batch"):
        layouts(MoEModel(**{**SMALL.__dict__, "layers": 2, "global_batch": 3}), H100, 32)  # dp is 2 at least


def test_moe_ascend_plan_prints_the_best_layouts_and_writes_json_and_a_pareto_plot(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "mixtral-8x7b", "--hardware", "h100", "--devices", "64", "--top", "3",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mixtral-8x7b on 64 x h100" in printed and "tok/s/dev" in printed
    written = json.loads(out.read_text())
    assert len(written["best"]) == 3 and written["evaluated"] > 1000 and written["configs_per_hour"] > 1e6
    assert written["best"][0]["step_s"] <= written["best"][1]["step_s"]
    assert (tmp_path / "plan.png").stat().st_size > 0
    assert main(["plan", "--model", "mixtral-8x7b", "--hardware", "no-such", "--devices", "8"]) == 2
    assert "ascend-910b" in capsys.readouterr().err


def test_one_given_layout_is_scored_with_the_parts_of_its_step(tmp_path, capsys):
    from moe_ascend.compiler.planner.search import PARTS, parse_layout, score

    scored = score(MoEModel.load("deepseek-v3"), H100, 2048, parse_layout("tp=1,pp=16,ep=64,recompute=1"))
    assert scored["layout"] == {"tp": 1, "ep": 64, "pp": 16, "vpp": 1, "dp": 128, "mb": 1, "recompute": 1,
                                "chunks": 1, "hierarchical": 0, "groups": 1, "dualpipe": 0, "fb_overlap": 0}
    assert sum(scored[part] for part in PARTS) == pytest.approx(scored["step_s"], rel=1e-12)
    assert scored["tokens_per_s_per_device"] * 2048 == pytest.approx(scored["tokens_per_s"])
    with pytest.raises(PlannerError, match=r"ep = 3 does not divide tp·dp = 128 and the 256 experts"):
        score(MoEModel.load("deepseek-v3"), H100, 2048, parse_layout("pp=16,ep=3"))
    with pytest.raises(PlannerError, match=r"--layout item 'tp:2': give name=integer"):
        parse_layout("tp:2")
    out = tmp_path / "scored.json"
    assert main(["plan", "--model", "deepseek-v3", "--hardware", "h100", "--devices", "2048", "--layout",
                 "pp=16,ep=64,recompute=1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tokens/s per device" in printed and "expert all-to-all left exposed" in printed
    assert json.loads(out.read_text())["layout"]["dp"] == 128


# --- the published runs ------------------------------------------------------------------------

def test_each_published_run_is_its_layout_scored_and_ranked_in_the_search():
    from moe_ascend.compiler.planner.published import load, predict

    runs = {run.name: run for run in load()}
    assert {"deepseek-v3", "pangu-ultra-moe", "qwen3-235b-a22b"} <= set(runs)
    deepseek = predict(runs["deepseek-v3"])
    assert deepseek["layout"] == {"tp": 1, "ep": 64, "pp": 16, "vpp": 1, "dp": 128, "mb": 1, "recompute": 2,
                                       "chunks": 1, "hierarchical": 1, "groups": 1, "dualpipe": 1, "fb_overlap": 0}
    assert deepseek["ratio"] == pytest.approx(deepseek["predicted_tokens_per_s"] / 3.157e6)
    qwen = predict(runs["qwen3-235b-a22b"])  # (it fits: the search's best is at least as fast)
    assert qwen["fits"] and qwen["best_tokens_per_s"] >= qwen["predicted_tokens_per_s"]
    assert 0 < qwen["rank_fraction"] < 1


# The bar: within ±20 % of the reported throughput, the layout fitting as published. Where the model is still
# off, the xfail says by how much (strict: it fails once the model gets there, to be moved in).
OFF = {"deepseek-v3": "predicted 1.49x the reported (it fits: 63 GiB a device of 72 usable)",
       "pangu-ultra-moe": "predicted 1.33x the reported (the layout and rate from secondary sources)",
       "qwen3-235b-a22b-1f1b-overlap": "predicted 1.46x: the overlap hides 5.5 s of exposed all-to-all where the "
                                       "run gained 2.1 s"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=OFF[name]))
                                  if name in OFF else name for name in ("deepseek-v3", "pangu-ultra-moe",
                                                                        "qwen3-235b-a22b",
                                                                        "qwen3-235b-a22b-1f1b-overlap")])
def test_published_runs_are_predicted_within_a_fifth_at_the_layout_they_ran(name):
    from moe_ascend.compiler.planner.published import load, predict

    predicted = predict(next(run for run in load() if run.name == name))
    assert 0.8 <= predicted["ratio"] <= 1.2 and predicted["fits"], predicted
