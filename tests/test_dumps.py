"""Dumps: a user pass shows at its declared point, summary.json lists the MoE layers, inspect reads it back."""

import json
import os
import subprocess
import sys

import pytest
import torch
from checks import assert_matches_eager
from models import LoopMoE, TwoLoopMoE

from moe_ascend.compiler.report import html as report_html
from moe_ascend.passes import PassResult, infer_meta

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


@pytest.fixture
def clone_matmul_outputs(temporary_passes):
    """A user pass: a copy after every matmul (numerics unchanged, visible in the code)."""

    @temporary_passes(name="t_clone_mm", stage="post_grad", before=("verify_collectives",))
    def clone_mm(gm, ctx):
        matmuls = [n for n in gm.graph.nodes if n.target in MATMULS]
        for mm in matmuls:
            with gm.graph.inserting_after(mm):
                copy = gm.graph.call_function(torch.ops.aten.clone.default, (mm,))
            infer_meta(copy)
            mm.replace_all_uses_with(copy, delete_user_cb=lambda user, copy=copy: user is not copy)
        return PassResult(gm, modified=bool(matmuls))

    return "t_clone_mm"


def compile_and_step(model, dump_dir, **options):
    compiled = torch.compile(model, backend="moe_ascend",
                             options={"target": "eager", "dump_dir": str(dump_dir), **options})
    compiled(torch.randn(6, 16)).sum().backward()
    return json.loads((dump_dir / "summary.json").read_text())


def graph(summary, role):
    return next(g for g in summary["graphs"] if g["role"] == role)


def test_user_pass_runs_at_its_declared_point_and_shows_in_the_dump(clone_matmul_outputs, tmp_path):
    torch.manual_seed(0)
    summary = compile_and_step(LoopMoE(), tmp_path)
    for role in ("forward", "backward"):
        passes = graph(summary, role)["passes"]
        assert [p["name"] for p in passes] == ["schedule_overlap", "t_clone_mm", "verify_collectives"]
        assert passes[1]["modified"] and passes[1]["nodes_added"] > 0 and passes[1]["nodes_removed"] == 0
        code_before = (tmp_path / graph(summary, role)["input_file"]).read_text()
        code_after = (tmp_path / passes[1]["file"]).read_text()
        assert "aten.clone.default" not in code_before and "aten.clone.default" in code_after
    assert [p["name"] for p in graph(summary, "dynamo")["passes"]] == ["normalise", "functionalise", "find_moe",
                                                                       "hierarchical_a2a", "token_groups",
                                                                       "chunk_for_overlap", "skip_empty_slots"]


def test_user_pass_keeps_numerics(clone_matmul_outputs, tmp_path):
    torch.manual_seed(0)
    assert_matches_eager(LoopMoE(), (torch.randn(6, 16),), {"target": "eager", "dump_dir": str(tmp_path)})


def test_disable_by_name_removes_the_pass(clone_matmul_outputs, tmp_path):
    summary = compile_and_step(LoopMoE(), tmp_path, disable=[clone_matmul_outputs])
    forward = graph(summary, "forward")
    assert [p["name"] for p in forward["passes"]] == ["schedule_overlap", "verify_collectives"]
    assert "aten.clone.default" not in (tmp_path / forward["passes"][-1]["file"]).read_text()


def test_summary_lists_every_moe_layer_with_its_router_and_expert_nodes(tmp_path):
    torch.manual_seed(0)
    summary = compile_and_step(TwoLoopMoE(), tmp_path)
    layers = graph(summary, "dynamo")["moe_layers"]
    assert [layer["layer"] for layer in layers] == [0, 1]
    for layer in layers:
        assert layer["topk"] in layer["router"] and layer["gate"] in layer["router"]
        assert len(layer["experts"]) == 12  # 4 experts x (linear, relu, linear)
        assert layer["output"] in layer["combine"]
    assert [layer["layer"] for layer in graph(summary, "backward")["moe_layers"]] == [0, 1]


def test_inspect_reads_the_summary_back(tmp_path):
    torch.manual_seed(0)
    summary = compile_and_step(LoopMoE(), tmp_path)
    cli = [sys.executable, "-m", "moe_ascend.compiler.cli", "inspect", str(tmp_path)]
    as_json = subprocess.run(cli + ["--json"], capture_output=True, text=True, check=True).stdout
    assert json.loads(as_json) == summary
    table = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert "graph_0.backward" in table and "verify_collectives" in table and "MoE layers: 1" in table


def test_inspect_of_a_multi_rank_dump_says_which_rank_it_shows_and_stops_quietly_when_piped(tmp_path, monkeypatch):
    from moe_ascend.compiler.cli import main

    import shutil

    torch.manual_seed(0)
    compile_and_step(LoopMoE(), tmp_path / "one")
    for rank in (0, 1):  # the layout a two-rank job writes
        shutil.copytree(tmp_path / "one", tmp_path / "job" / f"rank{rank}")
    cli = [sys.executable, "-m", "moe_ascend.compiler.cli", "inspect", str(tmp_path / "job")]
    first = subprocess.run(cli, capture_output=True, text=True, check=True).stdout.splitlines()[0]
    assert first == f"{tmp_path / 'job'} holds the dumps of ranks 0, 1; this is rank 0 (--rank N shows another)"
    second = subprocess.run(cli + ["--rank", "1"], capture_output=True, text=True, check=True).stdout
    assert second.splitlines()[0].endswith("this is rank 1") and "graph_0.backward" in second
    missing = subprocess.run(cli + ["--rank", "2"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no dump of rank 2; its ranks: [0, 1]" in missing.stderr
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head` does once it has its lines
    with open(write_end, "w", buffering=1) as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        assert main(["inspect", str(tmp_path / "job")]) == 0


def test_what_a_pass_says_is_kept_beside_it_in_the_summary_the_table_and_the_page(tmp_path):
    from moe_ascend.compiler.report.inspect import format_table, load_summary
    from moe_ascend.runtime import MoELayer

    torch.manual_seed(0)
    layer = torch.compile(MoELayer(8, 16, 4, 2, capacity_factor=1.0), backend="moe_ascend",
                          options={"target": "eager", "hierarchical_a2a": True, "dump_dir": str(tmp_path)})
    layer(torch.randn(6, 8))
    summary = load_summary(tmp_path)
    said = {p["name"]: p["said"] for p in summary["graphs"][0]["passes"]}
    why = ("graph_0: hierarchical_a2a=True leaves the flat all-to-all: the topology is one node of 1 rank, so no "
           "exchange crosses a node")
    ((level, message),) = [(s["level"], s["message"]) for s in said["hierarchical_a2a"]]
    assert level == "warning" and message.startswith(why)
    assert said["normalise"] == []
    assert f"      warning: {why}" in format_table(summary)
    assert why in (tmp_path / "index.html").read_text()


def test_inspect_of_a_folder_without_dumps_says_what_to_do(tmp_path):
    from moe_ascend.compiler.cli import main

    assert main(["inspect", str(tmp_path)]) == 2


def test_index_html_is_one_self_contained_page(tmp_path):
    torch.manual_seed(0)
    compile_and_step(TwoLoopMoE(), tmp_path)
    page = (tmp_path / "index.html").read_text()
    for name in ("graph_0", "graph_0.forward", "graph_0.backward", "normalise", "find_moe", "exposed_comm_s"):
        assert name in page
    assert page.count("<svg") >= 6  # two regions in each of three graphs
    assert "<script src" not in page and "<link" not in page


def test_region_picture_without_graphviz_is_a_plain_svg(monkeypatch):
    monkeypatch.setattr(report_html.shutil, "which", lambda name: None)
    region = {"layer": 0, "nodes": [{"name": "topk", "op": "topk", "role": "router"},
                                    {"name": "bmm", "op": "bmm", "role": "experts"}], "edges": [["topk", "bmm"]]}
    svg = report_html.region_svg(region)
    assert svg.startswith("<svg") and "topk" in svg and "bmm" in svg and "<line" in svg


def test_dump_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_ASCEND_DUMP_DIR", str(tmp_path))
    compiled = torch.compile(LoopMoE(), backend="moe_ascend", options={"target": "eager"})
    compiled(torch.randn(6, 16))
    assert (tmp_path / "summary.json").exists() and (tmp_path / "index.html").exists()


def test_inductor_dumps_survive_its_cache(tmp_path):
    """With dumps on, Inductor's FX-graph cache is bypassed, so the second compile still runs (and records) the
    passes."""
    torch.manual_seed(0)
    for attempt in range(2):
        torch._dynamo.reset()
        folder = tmp_path / str(attempt)
        compiled = torch.compile(LoopMoE(), backend="moe_ascend",
                                 options={"target": "inductor", "dump_dir": str(folder)})
        compiled(torch.randn(6, 16)).sum().backward()
        roles = {g["role"] for g in json.loads((folder / "summary.json").read_text())["graphs"]}
        assert roles == {"dynamo", "forward", "backward"}
