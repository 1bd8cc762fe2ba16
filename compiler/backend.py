"""The ``moe_ascend`` torch.compile backend.

    torch.compile(model, backend="moe_ascend", options={...})

Dynamo hands over one FX graph at a time. We validate the options, run the
pre_grad stage on the Dynamo graph (rewrites here get their backward from
AOTAutograd for free), then lower it with the chosen target, which runs the
post_grad stage on the forward and backward graphs.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx
from torch._guards import detect_fake_mode

import moe_ascend.passes  # noqa: F401  (registers the built-in passes)
from moe_ascend.compiler import profile
from moe_ascend.compiler.planner.cost_model import CostModel
from moe_ascend.compiler.report.dump import session_for
from moe_ascend.compiler.options import Options
from moe_ascend.compiler.pipeline import PostGradStage, run_stage
from moe_ascend.compiler.routing_phases import PhaseFollowing
from moe_ascend.compiler.targets import LOWERINGS, resolve_target
from moe_ascend.passes.infra import PASS_LOGGER, PassContext, PassLog, registered_passes
from moe_ascend.runtime import traffic
from moe_ascend.runtime.topology import Topology

log = logging.getLogger(__name__)
_graph_ids = itertools.count()
graphs_compiled = 0  # in this process, recompiles for a routing phase included (a training loop times around them)


def moe_ascend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """The backend function Dynamo calls for each captured graph."""
    opts = Options.from_user(options)
    if mode is not None:
        log.warning("moe_ascend: torch.compile(mode=%r) is ignored; pass settings through options", mode)
    compile_graph = functools.partial(_compile, example_inputs=example_inputs, opts=opts)
    if opts.routing == "affinity":  # its layers switch phase while training: a graph per phase
        following = PhaseFollowing(gm, compile_graph)
        return following if following.layers else following.compiled
    return compile_graph(gm)[0]


def _compile(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: Options) -> tuple[Callable, list]:
    """Both stages and the lowering: the compiled graph, and the layers affinity routing follows."""
    global graphs_compiled
    graphs_compiled += 1
    topology = Topology.detect(ranks_per_node=(opts.topology or {}).get("ranks_per_node"))
    target = resolve_target(opts.target, dry_run=opts.ascend_option("dry_run"))
    recorder = session_for(opts.dump_dir)
    graph_name = recorder.new_graph_name() if recorder is not None else f"graph_{next(_graph_ids)}"
    cost_model = CostModel.for_platform(topology)
    fake_mode = detect_fake_mode(example_inputs)
    training = torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in example_inputs)

    def make_context(stage: str, role: str) -> PassContext:
        name = graph_name if role == "dynamo" else f"{graph_name}.{role}"
        return PassContext(
            options=opts, stage=stage, role=role, graph_name=name, topology=topology,
            cost_model=cost_model, logger=PassLog(logging.getLogger(PASS_LOGGER)),
            fake_mode=fake_mode if role == "dynamo" else None, training=training,
        )

    pre_grad = make_context("pre_grad", "dynamo")
    gm = run_stage(gm, pre_grad, recorder)
    cache_key = None if recorder is not None else _cache_key(opts, target)
    post_grad = PostGradStage(make_context, recorder, cache_key)
    compiled = traffic.counting(LOWERINGS[target](gm, example_inputs, post_grad), post_grad.traffic)
    if opts.profile:
        compiled = profile.measuring(compiled, graph_name, functools.partial(_measured, graph_name, recorder))
    return compiled, pre_grad.analyses.get("affinity_layers", [])


def _measured(graph_name: str, recorder, role: str, timeline) -> None:
    """One graph's measured timeline: a line in the log, and in the dump beside the estimate."""
    hidden = profile.hidden_fraction(timeline)
    log.info("%s.%s measured: step %.3f ms, exposed communication %.3f ms of %.3f ms%s", graph_name, role,
             timeline.step_s * 1e3, timeline.exposed_comm_s * 1e3, timeline.comm_s * 1e3,
             f" (hidden {hidden:.2f})" if hidden is not None else "")
    if recorder is not None:
        recorder.add_measured(f"{graph_name}.{role}", timeline.to_json() | {"hidden_fraction": hidden})


def _cache_key(opts: Options, target: str) -> str:
    """Changes whenever the options or any registered pass's code changes (Inductor's cache key)."""
    digest = hashlib.sha256()
    digest.update(f"{target}|{opts.fingerprint()}|{_package_source_hash()}".encode())
    for p in registered_passes():
        digest.update(f"{p.name}|{p.stage}|{p.after}|{p.before}|{_source_of(p.fn)}".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _package_source_hash() -> str:
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for folder in ("passes", "compiler", "kernels"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _source_of(fn: Callable) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', id(fn))}"
