"""bench/_suite.py: `make bench`'s report puts every benchmark's figure beside its goal, and the raw runs below."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "bench" / "_suite.py"


def load_suite(results: Path):
    spec = importlib.util.spec_from_file_location("bench_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    suite.RESULTS = results
    return suite


def test_the_report_says_which_figures_meet_their_goals(tmp_path):
    figures = {"e2e": {"name": "speedup_all_vs_baseline", "value": 0.87, "goal": 1.8, "higher_is_better": True},
               "planner": {"name": "mean_abs_error", "value": 0.062, "goal": 0.1, "higher_is_better": False}}
    for name, figure in figures.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"figure": figure, "loss_ratio": 1.004, "runs": [{"variant": "all", "tokens_per_s": 1411.0}],
             "machine": {"cpus": 2}, "config": {"steps": 60}}))
    (tmp_path / "e2e.png").write_bytes(b"")
    report = load_suite(tmp_path).report({"e2e": 660.0})
    assert "| e2e | speedup_all_vs_baseline | 0.87 | >= 1.8 | not met |" in report
    assert "![e2e](e2e.png)" in report and "Shortened" not in report
    assert "| planner | mean_abs_error | 0.062 | <= 0.1 | met |" in report
    assert "Wall time: 11.0 min." in report and "- loss_ratio: 1.004" in report
    assert '"tokens_per_s": 1411.0' in report  # the raw runs, as written


def test_a_quick_suite_says_its_runs_are_shortened_and_each_shortens_a_real_benchmark(tmp_path):
    suite = load_suite(tmp_path)
    assert "Shortened runs (`make bench QUICK=1`)" in suite.report({"e2e": 60.0}, quick=True)
    assert set(suite.QUICK) == {p.stem for p in suite.benchmarks()}


def test_e2e_trains_every_variant_in_the_figures_job_and_the_baseline_and_all_beside_it():
    import argparse
    import sys

    sys.path[:0] = [str(SUITE.parent), str(SUITE.parents[1] / "examples")]
    try:
        spec = importlib.util.spec_from_file_location("bench_e2e", SUITE.parent / "e2e.py")
        e2e = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(e2e)
    finally:
        del sys.path[:2]
    args = argparse.Namespace(regimes="ascend-910b,1gbit", layouts="2x1,2x2", models="top8-of-64,top2-of-8",
                              variants="baseline,balance,all", beside_variants="baseline,all", steps=20,
                              beside_steps=12)
    assert e2e.jobs(args) == [("ascend-910b", "2x1", "top8-of-64", "baseline,balance,all", 20),
                              ("ascend-910b", "2x1", "top2-of-8", "baseline,all", 12),
                              ("ascend-910b", "2x2", "top8-of-64", "baseline,all", 12),
                              ("1gbit", "2x1", "top8-of-64", "baseline,all", 12)]


def test_balance_captures_the_share_of_the_imbalances_cost_that_ours_wins_back():
    spec = importlib.util.spec_from_file_location("bench_balance", SUITE.parent / "balance.py")
    balance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(balance)
    # steps of 10, 6.67 and 5 ms: ours wins back 3.33 of the 5 ms the imbalance costs
    assert balance.captured_fraction({"off": 100.0, "ours": 150.0, "ideal": 200.0}) == pytest.approx(2 / 3)
    assert balance.captured_fraction({"off": 100.0, "ours": 90.0, "ideal": 200.0}) < 0  # ours lost
    assert balance.captured_fraction({"off": 100.0, "ours": 150.0, "ideal": 100.0}) is None  # nothing to win
    assert balance.captured_fraction({"off": 100.0, "ours": 150.0}) is None


def test_balance_replays_the_recorded_routing_on_the_recorded_experts(tmp_path):
    import argparse

    import torch

    spec = importlib.util.spec_from_file_location("bench_balance", SUITE.parent / "balance.py")
    balance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(balance)
    recorded = torch.tensor([[[70.0, 10, 10, 10], [25, 25, 25, 25]], [[10, 70, 10, 10], [25, 25, 25, 25]]])
    torch.save(recorded, tmp_path / "loads.pt")
    args = argparse.Namespace(routing="recorded", loads=str(tmp_path / "loads.pt"), recorded_top_k=2, top_k=4,
                              ffn=512, experts=8, tokens=20000)
    replay = balance.replay_shape(args)
    assert (replay.experts, replay.top_k, replay.ffn) == (4, 2, 1024)  # a token's expert FLOP kept
    # each step and layer's first choice (the top-1 of the skew, the gate aside) follows that step's shares
    for step, layer, shares in [(0, 0, [0.7, 0.1, 0.1, 0.1]), (1, 0, [0.1, 0.7, 0.1, 0.1]), (2, 1, [0.25] * 4)]:
        first = balance.skew(step, 0, layer, replay).argmax(-1)
        assert torch.bincount(first, minlength=4).double() / 20000 == pytest.approx(shares, abs=0.02)
    even = balance.skew(0, 0, 0, replay, even=True).argmax(-1)
    assert torch.bincount(even, minlength=4).double() / 20000 == pytest.approx([0.25] * 4, abs=0.02)


def test_a_benchmark_figure_without_its_name_or_goal_is_refused_before_it_is_written(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_common", SUITE.parent / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    out = tmp_path / "routing_quality.json"
    with pytest.raises(ValueError, match=re.escape("lacks ['name', 'value', 'goal', 'higher_is_better']")):
        common.write_result("routing_quality", {"tokens_per_expert_reduction": 0.6}, [], {}, str(out))
    assert not out.exists()


def load_common():
    spec = importlib.util.spec_from_file_location("bench_common", SUITE.parent / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common


def test_a_regime_is_a_target_to_scale_the_links_to_or_a_rate():
    common = load_common()
    assert common.regime_flags("1gbit", 1e11) == ["--inter-node-bandwidth", "1gbit"]
    assert common.regime_flags("ascend-910b", 1.2e11) == ["--scale-to", "ascend-910b", "--host-flops",
                                                           "120000000000.0"]
    assert common.regime_flags("mine.yaml", None) == ["--scale-to", "mine.yaml"]


@pytest.mark.parametrize("share, layout, warned", [(0.04, "2x1", False), (0.06, "2x1", True), (0.09, "4x2", False),
                                                    (0.11, "4x2", True)])
def test_host_comm_share_above_its_limit_is_said(capsys, share, layout, warned):
    # 0.05 with a core per rank, 0.10 where ranks outnumber this machine's cores (the tests assume 2 or more, <= 8)
    import os

    if not 2 <= len(os.sched_getaffinity(0)) < 8:
        pytest.skip("the limits depend on the cores: this case is written for 2 to 7")
    assert load_common().host_comm_share_checked(share, layout) == share
    assert ("WARNING: host_comm_share" in capsys.readouterr().err) == warned


@pytest.mark.parametrize("name", ["a2a", "overlap", "e2e", "balance"])
def test_cluster_benchmarks_run_the_scaled_regime_first_and_1gbit_beside_it(name):
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, str(SUITE.parent / f"{name}.py"), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "(default ascend-910b,1gbit)" in " ".join(shown.stdout.split())
