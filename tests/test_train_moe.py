"""examples/train_moe.py: every technique on at once trains, and a run resumed from its checkpoint follows the
uninterrupted run's loss curve exactly."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_moe
from distributed import launch

pytestmark = pytest.mark.slow  # training runs: make test, not make check

SCRIPT = str(Path(__file__).resolve().parents[1] / "examples" / "train_moe.py")
SMALL = ["--layers", "2", "--width", "64", "--heads", "2", "--ffn", "64", "--experts", "4", "--top-k", "2",
         "--seq-len", "32", "--batch", "2", "--log-every", "4", "--average", "2"]


def train(*args: str) -> tuple[dict, str]:
    """Rank 0's result and output of train_moe on 2 nodes x 1 rank (loopback without root)."""
    done = subprocess.run([sys.executable, "-m", "moe_ascend.compiler.cli", "launch", "--nodes", "2", "--",
                           sys.executable, SCRIPT, *SMALL, *args], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    found = re.findall(r"^\[r0\] RESULT (.*)$", done.stdout, flags=re.M)
    assert len(found) == 1, done.stdout[-4000:]
    return json.loads(found[0]), done.stdout


@pytest.mark.timeout(400)  # three trainer runs of two ranks, each compiling its graphs three times: 70 s on 2 cores
def test_a_resumed_run_follows_the_uninterrupted_loss_curve(tmp_path):
    # The transformed graphs run without Inductor (its lowering of every technique: all_techniques.py below).
    checkpoint, eager = str(tmp_path / "ckpt"), ("--target", "eager")
    # seed 8: the layers switch to expert choice at steps 10 and 13, 16 steps hold both
    run = ("--techniques", "all", "--seed", "8", *eager)
    straight, output = train("--steps", "16", *run)
    assert straight["techniques"] == list(train_moe.TECHNIQUES) and len(straight["losses"]) == 16
    assert straight["losses"][-1] < straight["losses"][0]  # it learns
    # affinity routing switched each layer to expert choice, on both ranks at the same step (or their exchanges
    # would not have matched): a recompile each, left out of tokens/s with the first compile
    assert len(straight["compiled_at"]) == 3 and straight["compiled_at"][0] == 0
    # the progress lines: loss, tokens/s and the exposed communication once the graphs were measured (second call)
    assert re.search(r"\[r0\] step    16  loss \d\.\d{4}  +\d+ tokens/s  exposed comm \d+\.\d ms/step", output)

    # saved between the two switches: the checkpoint brings one layer in expert choice, the other not yet
    middle = (straight["compiled_at"][1] + straight["compiled_at"][2] + 1) // 2
    train("--steps", str(middle), "--checkpoint", checkpoint, *run)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["rank0-of-2.pt", "rank1-of-2.pt"]
    resumed, output = train("--steps", "16", "--checkpoint", checkpoint, "--resume", *run)
    assert f"[r0] resumed at step {middle}" in output
    assert middle in resumed["compiled_at"]  # the rest ran in new processes
    assert resumed["losses"] == straight["losses"]


def test_the_overlap_schedule_keeps_numerics_with_every_technique_on():
    """The schedule once let Inductor fuse one layer's scatter with the next layer's, after this layer read it."""
    ranks = launch(2, 1, str(Path(__file__).parent / "cluster" / "all_techniques.py"))
    assert [rank["scheduled_by"] for rank in ranks] == ["inductor", "eager"]
    for rank in ranks:
        assert rank["outputs"] < 1e-12 and rank["gradients"] < 1e-12, rank


def test_resuming_with_other_arguments_is_refused(tmp_path, single_rank_group):
    args = train_moe.parser().parse_args([*SMALL, "--techniques", "none", "--checkpoint", str(tmp_path)])
    trainer = train_moe.Trainer(args)
    trainer.save()
    args.techniques = "affinity"
    with pytest.raises(SystemExit, match="saved by a different run.*resume with the same arguments"):
        train_moe.Trainer(args).resume()


def test_unknown_techniques_say_which_are_known():
    with pytest.raises(SystemExit, match=r"unknown \['fast'\].*'hierarchical', 'overlap', 'affinity', 'balance'"):
        train_moe.techniques_from("overlap,fast")


def test_the_sigmoid_router_trains_balanced_by_its_bias_and_its_loads_are_recorded(tmp_path):
    loads = tmp_path / "loads.pt"
    result, _ = train("--steps", "4", "--router", "sigmoid", "--router-bias-update", "0.01", "--techniques",
                      "hierarchical,overlap", "--target", "eager", "--record-loads", str(loads))
    assert len(result["losses"]) == 4
    recorded = torch.load(loads)
    # [steps, layers, experts]: every (token, choice) pair of both ranks, each step and layer
    assert recorded.shape == (4, 2, 4) and (recorded.sum(-1) == 2 * 2 * 32 * 2).all()


def test_affinity_routing_refuses_the_sigmoid_router_with_the_reason(single_rank_group):
    args = train_moe.parser().parse_args([*SMALL, "--router", "sigmoid", "--techniques", "affinity"])
    with pytest.raises(SystemExit, match="affinity routing works on softmax routers only"):
        train_moe.Trainer(args)
