"""Dumps: per-pass FX code, ``summary.json`` and ``index.html`` under ``dump_dir``.

Layout (one folder per rank when the world has more than one)::

    dump_dir/summary.json
    dump_dir/index.html
    dump_dir/graph_0/pre_grad/00_input.py, 01_normalise.py, ...
    dump_dir/graph_0.forward/post_grad/00_input.py, ...
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.fx

from moe_ascend.compiler.report.ascend_coverage import missing_converters
from moe_ascend.compiler.report.summary import SUMMARY_VERSION
from moe_ascend.compiler.report.html import graph_view, write_index
from moe_ascend.passes.analysis.collectives import collectives_by_kind, declared_all_to_alls, exchange_bytes
from moe_ascend.passes.analysis.moe_regions import META_KEY, layers_from_annotations
from moe_ascend.passes.infra import Pass, PassContext

_SESSIONS: dict[Path, "DumpSession"] = {}


def session_for(dump_dir: str | os.PathLike | None) -> "DumpSession | None":
    """The process's dump session for ``dump_dir`` (a per-rank subfolder in a multi-rank job)."""
    if dump_dir is None:
        return None
    folder = Path(dump_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        folder = folder / f"rank{os.environ.get('RANK', '0')}"
    folder = folder.resolve()
    if folder not in _SESSIONS:
        _SESSIONS[folder] = DumpSession(folder)
    return _SESSIONS[folder]


class DumpSession:
    """Everything compiled into one ``dump_dir`` by this process; rewrites summary and page as graphs finish."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.graphs: list[GraphRecord] = []
        self._graph_ids = itertools.count()
        self.options: dict[str, Any] = {}
        _clear_previous_dump(folder)
        folder.mkdir(parents=True, exist_ok=True)

    def new_graph_name(self) -> str:
        return f"graph_{next(self._graph_ids)}"

    def begin_graph(self, ctx: PassContext, gm: torch.fx.GraphModule) -> "GraphRecord":
        self.options = {k: _jsonable(v) for k, v in vars(ctx.options).items()}
        record = GraphRecord(self, ctx, gm)
        self.graphs.append(record)
        return record

    def add_measured(self, graph_name: str, measured: dict) -> None:
        """A post_grad graph's measured timeline (options["profile"]), shown beside its estimate."""
        for record in self.graphs:
            if record.name == graph_name and record.stage == "post_grad" and record.result:
                record.result["measured"] = measured
                record.view = graph_view(self.folder, record.to_json())
        self.write()

    def summary(self) -> dict:
        return {
            "version": SUMMARY_VERSION,
            "torch": torch.__version__,
            "options": self.options,
            "graphs": [g.to_json() for g in self.graphs],
        }

    def write(self) -> None:
        (self.folder / "summary.json").write_text(json.dumps(self.summary(), indent=1))
        write_index(self.folder, [g.view for g in self.graphs if g.view is not None], torch.__version__)


class GraphRecord:
    """One graph in one stage: its passes, in order, with their code and node counts."""

    def __init__(self, session: DumpSession, ctx: PassContext, gm: torch.fx.GraphModule):
        self.session = session
        self.name = ctx.graph_name
        self.stage = ctx.stage
        self.role = ctx.role
        self.folder = Path(self.name) / self.stage
        self.passes: list[dict] = []
        self.input_file = self._write_code(0, "input", gm)
        self.result: dict[str, Any] = {}
        self.view: dict | None = None  # the page's view, made once the graph is finished

    def pass_done(self, p: Pass, modified: bool, nodes_before: list[torch.fx.Node], gm: torch.fx.GraphModule,
                  seconds: float, said: list[tuple[str, str]] = ()) -> None:
        before, after = set(nodes_before), set(gm.graph.nodes)
        self.passes.append(
            {
                "name": p.name,
                "modified": modified,
                "changes_numerics": p.changes_numerics,
                "nodes_before": len(before),
                "nodes_after": len(after),
                "nodes_added": len(after - before),
                "nodes_removed": len(before - after),
                "seconds": round(seconds, 6),
                "said": [{"level": level, "message": message} for level, message in said],
                "file": self._write_code(len(self.passes) + 1, p.name, gm),
            }
        )

    def finish(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        timeline = ctx.cost_model.timeline(gm) if ctx.cost_model is not None else None
        self.result = {
            "nodes": len(gm.graph.nodes),
            "moe_layers": _detailed_layers(ctx, gm),
            "collectives": collectives_by_kind(gm),
            "exchange_bytes": _exchange_bytes_json(gm),
            "estimate": timeline.to_json() if timeline is not None else None,
            "regions": _region_graphs(gm),
        }
        if self.stage == "post_grad" and ctx.options.target == "ascend":  # traced as torchair would: what GE lacks
            self.result["ge_missing"] = missing_converters(gm)
        self.view = graph_view(self.session.folder, self.to_json())
        self.session.write()

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "stage": self.stage,
            "role": self.role,
            "input_file": self.input_file,
            "passes": self.passes,
            **self.result,
        }

    def _write_code(self, index: int, label: str, gm: torch.fx.GraphModule) -> str:
        relative = self.folder / f"{index:02d}_{label}.py"
        path = self.session.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(gm.print_readable(print_output=False, include_stride=False, include_device=False))
        return str(relative)


def _exchange_bytes_json(gm: torch.fx.GraphModule) -> dict | str | None:
    """Bytes one run of the graph sends per kind of link; ``"data-dependent"`` when its split sizes are data; None
    where kernel calls issue them (their sizes are inside: the traced forward and backward graphs count them)."""
    if any(declared_all_to_alls(node) for node in gm.graph.nodes):
        return None
    sent = exchange_bytes(gm)
    return sent.to_json() if sent is not None else "data-dependent"


def _detailed_layers(ctx: PassContext, gm: torch.fx.GraphModule) -> list[dict]:
    """pre_grad knows each layer's anchors (gate, topk, output); other graphs regroup the annotations."""
    found = ctx.analyses.get("moe_layers")
    if found is not None:
        return [layer.to_json() for layer in found]
    return layers_from_annotations(gm)


def _region_graphs(gm: torch.fx.GraphModule) -> list[dict]:
    """For each MoE layer: its nodes (name, op, role) and the edges between them, for the pictures."""
    regions: dict[int, dict] = {}
    for node in gm.graph.nodes:
        tag = (node.meta.get("custom") or {}).get(META_KEY)
        if tag is None:
            continue
        region = regions.setdefault(tag["layer"], {"layer": tag["layer"], "nodes": [], "edges": []})
        region["nodes"].append({"name": node.name, "op": _op_label(node), "role": tag["role"]})
    by_name = {n.name: n for n in gm.graph.nodes}
    for region in regions.values():
        names = {n["name"] for n in region["nodes"]}
        for name in names:
            for user in by_name[name].users:
                if user.name in names:
                    region["edges"].append([name, user.name])
    return [regions[i] for i in sorted(regions)]


def _op_label(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return getattr(value, "__qualname__", repr(value))


def _clear_previous_dump(folder: Path) -> None:
    """A new process starts a new dump: remove what an earlier run wrote (only our own files)."""
    if not (folder / "summary.json").exists():
        return
    for entry in folder.iterdir():
        if entry.name in ("summary.json", "index.html") or entry.name.startswith("graph_"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
