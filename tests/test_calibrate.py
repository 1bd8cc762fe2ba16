"""moe-ascend calibrate: the fits recover what they are given; a real run measures the link the launcher shaped, and
the step model on the profile it writes predicts measured training steps (compiler.planner.measured)."""

import numpy as np
import pytest
from distributed import alone_on_the_emulated_cluster

from moe_ascend.compiler.planner.calibrate import calibrate, fit_link, fit_matmul, write_profile
from moe_ascend.compiler.planner.measured import RunConfig, measure
from moe_ascend.compiler.planner.step_model import Hardware, MoEModel, StepModel
from moe_ascend.kernels.errors import CalibrationError
from moe_ascend.runtime.launcher import parse_rate


def test_the_matmul_fit_recovers_the_rate_curve():
    rows = [16, 64, 256, 1024]
    rates = [5e10 * m / (m + 32) for m in rows]
    peak, half = fit_matmul(rows, rates)
    assert peak == pytest.approx(5e10) and half == pytest.approx(32)


def test_the_link_fit_recovers_latency_and_bandwidth():
    sent = [1e3, 1e4, 1e5, 1e6]
    link = fit_link(sent, [2e-4 + b / 1.25e8 for b in sent])
    assert (link.latency, link.bandwidth) == pytest.approx((2e-4, 1.25e8))
    with pytest.raises(CalibrationError, match="did not take longer for more bytes"):
        fit_link(sent, [1e-3, 1e-3, 1e-3, 1e-3])


def test_one_slow_small_exchange_does_not_turn_the_link_fit():
    # a busy host held up the smallest exchange 40 ms: least squares would give a negative slope here
    sent = [1e3, 4e3, 1.6e4, 6.4e4, 2.56e5, 1.024e6]
    seconds = [2e-4 + b / 5.7e8 for b in sent]
    seconds[0] += 0.04
    assert np.polyfit(sent, seconds, 1)[0] < 0
    assert fit_link(sent, seconds).bandwidth == pytest.approx(5.7e8, rel=1e-6)


@alone_on_the_emulated_cluster
def test_a_calibration_measures_the_shaped_link_and_plans_with_it(tmp_path):
    profile, how = calibrate("200mbit", "100us", repeats=3, log=lambda line: None)
    shaped = parse_rate("200mbit") / 8
    # on the layers' receive-first exchange; gloo's own all-to-all gets half the rate, taking directions in turns
    assert 0.8 * shaped <= profile["inter_node_bandwidth"] <= 1.05 * shaped
    assert profile["intra_node_bandwidth"] > 4 * profile["inter_node_bandwidth"]  # loopback beats the uplink
    path = tmp_path / "measured.yaml"
    write_profile(profile, path, how)
    hardware = Hardware.load(str(path))
    assert hardware.inter_node_bandwidth == pytest.approx(profile["inter_node_bandwidth"], rel=1e-5)
    step = StepModel(MoEModel.load("mixtral-8x7b"), hardware, 8).evaluate(
        {"tp": 1, "ep": 8, "pp": 1, "vpp": 1, "dp": 8, "mb": 1, "recompute": 0, "chunks": 1, "hierarchical": 0})
    assert float(step["step_s"]) > 0


@alone_on_the_emulated_cluster
def test_the_calibrated_step_model_predicts_measured_training_steps():
    # lowered by the eager target: Inductor's compile of two models on two ranks would take most of the test
    configs = [RunConfig("2x1", "200mbit", 1, target="eager"),
               RunConfig("2x1", "200mbit", 4, hierarchical=True, target="eager")]
    runs = measure(configs, Hardware.load("cpu-calibrated"), steps=3, log=lambda line: None, calibrations=1)
    for run in runs:
        assert run["predicted_step_s"] == pytest.approx(run["step_s"], rel=0.3), run
        assert run["predicted_memory_bytes"] == pytest.approx(run["memory_bytes"], rel=0.2), run
    assert runs[1]["step_s"] > runs[0]["step_s"] and runs[1]["predicted_step_s"] > runs[0]["predicted_step_s"]
