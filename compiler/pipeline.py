"""The stage pipeline: run a stage's passes in order, check the contract after each, record what happened.

After every pass: ``graph.lint()``; every node keeps a ``meta["val"]`` and the
nodes the pass created have one that matches their op; each process group's
collectives keep their relative order. A pass that says ``modified=False``
must leave the node list as it was. Any failure is an error that names the
pass, the stage and the graph.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass

from moe_ascend.kernels.errors import MoEAscendError, PassContractError, PassError
from moe_ascend.passes.analysis.collectives import collective_order, exchange_bytes, order_violations
from moe_ascend.passes.infra import Pass, PassContext, PassResult, meta_mismatch, ordered_passes
from moe_ascend.runtime.traffic import LinkBytes

log = logging.getLogger(__name__)


def run_stage(gm: torch.fx.GraphModule, ctx: PassContext, recorder: Any = None) -> torch.fx.GraphModule:
    """Run every pass of ``ctx.stage`` that applies to ``ctx.role``; return the final graph module."""
    _fill_val_from_example_value(gm)
    record = recorder.begin_graph(ctx, gm) if recorder is not None else None
    for p in ordered_passes(ctx.stage, ctx.options):
        if ctx.role not in p.roles:
            continue
        nodes_before = list(gm.graph.nodes)
        vals_before = {n for n in nodes_before if "val" in n.meta}  # side-effect nodes (set_grad_enabled) have none
        order_before = collective_order(gm)
        said = getattr(ctx.logger, "said", [])  # a PassLog keeps what each pass says
        said_before = len(said)
        started = time.perf_counter()
        result = _call(p, gm, ctx)
        seconds = time.perf_counter() - started
        if ctx.stage == "post_grad" and result.gm is not gm:
            _fail(p, ctx, "post_grad passes rewrite the graph in place; return PassResult(gm, ...) with the gm given")
        gm = result.gm
        _check(p, ctx, gm, nodes_before, vals_before, order_before, result.modified)
        if record is not None:
            record.pass_done(p, result.modified, nodes_before, gm, seconds, said[said_before:])
    if record is not None:
        record.finish(gm, ctx)
    return gm


def _call(p: Pass, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    try:
        result = p.fn(gm, ctx)
    except MoEAscendError:
        raise
    except Exception as exc:
        raise PassError(f"{type(exc).__name__}: {exc}", pass_name=p.name, stage=ctx.stage,
                        graph=ctx.graph_name) from exc
    if not isinstance(result, PassResult):
        _fail(p, ctx, f"returned {type(result).__name__}; a pass returns PassResult(gm, modified)")
    return result


def _check(
    p: Pass,
    ctx: PassContext,
    gm: torch.fx.GraphModule,
    nodes_before: list[torch.fx.Node],
    vals_before: set[torch.fx.Node],
    order_before: dict[str, list[str]],
    modified: bool,
) -> None:
    if not modified:
        if list(gm.graph.nodes) != nodes_before:
            _fail(p, ctx, "returned modified=False but changed the graph's nodes")
        return
    try:
        gm.graph.lint()
    except Exception as exc:
        _fail(p, ctx, f"graph.lint() failed: {exc}")
    gm.recompile()
    old = set(nodes_before)
    # what a pass made, and what reads it: a new node whose shapes do not fit its readers fails here, by name
    touched = {n for n in gm.graph.nodes if n not in old}
    touched |= {user for n in touched for user in n.users}
    problems = [
        f"{n.name}: {why}"
        for n in gm.graph.nodes
        if n.op != "output" and (why := _meta_problem(n, n in touched, vals_before, ctx.fake_mode))
    ]
    if problems:
        _fail(p, ctx, "FakeTensor metadata is wrong: " + "; ".join(problems[:5]))
    violations = order_violations(order_before, collective_order(gm))
    if violations:
        _fail(p, ctx,
              "collectives changed order within a process group (ranks would deadlock): " + "; ".join(violations))


def _meta_problem(node: torch.fx.Node, touched: bool, vals_before: set[torch.fx.Node], fake_mode: Any) -> str | None:
    if touched:
        return meta_mismatch(node, fake_mode)
    return "lost its meta['val']" if node in vals_before and "val" not in node.meta else None


def _fail(p: Pass, ctx: PassContext, message: str):
    raise PassContractError(message, pass_name=p.name, stage=ctx.stage, graph=ctx.graph_name)


def _fill_val_from_example_value(gm: torch.fx.GraphModule) -> None:
    """Dynamo records a node's fake value as ``example_value``; passes read ``val`` everywhere."""
    for node in gm.graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]


class PostGradStage(CustomInferenceAwareGraphPass):
    """The post_grad stage as Inductor's ``post_grad_custom_pre_pass`` (and called directly by ``eager``)."""

    def __init__(self, make_context, recorder: Any, cache_key: str | None):
        self.make_context = make_context
        self.recorder = recorder
        self.cache_key = cache_key
        self.traffic: dict[str, LinkBytes] = {}  # role → what one run of its graph sends (runtime.traffic.counting)
        self.then: Any = None  # what the lowering runs on each graph after the stage (Inductor: keep its schedule)

    def __call__(self, graph: torch.fx.Graph, is_inference: bool) -> None:
        gm = graph.owning_module
        self.run(gm, "inference" if is_inference else training_role(gm))
        if self.then is not None:
            self.then(gm)

    def run(self, gm: torch.fx.GraphModule, role: str) -> torch.fx.GraphModule:
        return run_stage(gm, self.make_context("post_grad", role), self.recorder)

    def account(self, gm: torch.fx.GraphModule, role: str) -> None:
        """Note what one run of the graph's all-to-alls sends; lowerings call it on every graph, cache hits too."""
        sent = exchange_bytes(gm)
        if sent is None:
            log.info("moe_ascend: a %s graph's all-to-all sizes are data; runtime.traffic does not count them", role)
        else:
            self.traffic[role] = sent

    def uuid(self) -> str | None:
        # None turns Inductor's FX-graph cache off: when dumping, the passes must really run.
        return self.cache_key


def training_role(gm: torch.fx.GraphModule) -> str:
    """AOTAutograd names the backward graph's incoming gradients ``tangents_*``."""
    placeholders = (n.name for n in gm.graph.nodes if n.op == "placeholder")
    return "backward" if any(name.startswith("tangents") for name in placeholders) else "forward"
