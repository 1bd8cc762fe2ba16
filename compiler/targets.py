"""Lowering targets: how a pre_grad-rewritten Dynamo graph becomes something that runs.

Every target runs AOTAutograd and hands our post_grad stage the forward,
backward and inference graphs: Inductor through ``post_grad_custom_pre_pass``
(``config_patches=`` so the lazily compiled backward sees it too), ``eager``
through its own forward/backward compilers, ``ascend`` through torchair's
``CompilerConfig.post_grad_custom_pre_pass`` (its own issue).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable

import torch
import torch.fx

from moe_ascend.compiler.keep_schedule import keep_schedule
from moe_ascend.compiler.pipeline import PostGradStage, training_role
from moe_ascend.kernels.errors import TargetUnavailableError

log = logging.getLogger("moe_ascend")
_announced_auto = False


def resolve_target(target: str) -> str:
    """``"auto"``: ascend when torch_npu imports and an NPU is visible, else inductor (said once, at info)."""
    global _announced_auto
    if target != "auto":
        return target
    reason = ascend_unavailable_reason()
    if reason is None:
        return "ascend"
    if not _announced_auto:
        log.info("moe_ascend: target 'auto' uses inductor (%s)", reason)
        _announced_auto = True
    return "inductor"


def ascend_unavailable_reason() -> str | None:
    """Why the ascend target cannot run here, or None when it can. Imports torch_npu only if installed."""
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (it needs Huawei CANN; see README, 'Running on Ascend')"
    try:
        import torch_npu  # noqa: F401
    except Exception as exc:  # torch_npu without CANN fails at import
        return f"torch_npu does not import: {exc}"
    if not (hasattr(torch, "npu") and torch.npu.is_available()):
        return "torch_npu imports but no NPU is visible"
    return None


def lower_inductor(gm: torch.fx.GraphModule, example_inputs, post_grad: PostGradStage) -> Callable:
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    if post_grad.make_context("post_grad", "forward").options.overlap is not False:
        post_grad.then = keep_schedule  # or Inductor's fusion and memory-driven reordering undo it
    def inner_compile(graph: torch.fx.GraphModule, inputs, **kwargs):
        # Here, not in the post_grad stage: Inductor skips that stage on an FX-graph cache hit.
        post_grad.account(graph, "inference" if kwargs.get("is_inference") else training_role(graph))
        return compile_fx_inner(graph, inputs, **kwargs)

    return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches={"post_grad_custom_pre_pass": post_grad})


def lower_eager(gm: torch.fx.GraphModule, example_inputs, post_grad: PostGradStage) -> Callable:
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table

    def compiler_for(role: str):
        def compile_graph(graph: torch.fx.GraphModule, inputs):
            post_grad.account(graph, role)
            graph = post_grad.run(graph, role)
            return make_boxed_func(graph.forward)

        return compile_graph

    # Inductor's decompositions and partitioner, so post_grad passes see the same aten IR on every target (the
    # default partitioner replayed the hierarchical dispatch, all-to-alls included, in the backward).
    return aot_module_simplified(
        gm,
        example_inputs,
        fw_compiler=compiler_for("forward"),
        bw_compiler=compiler_for("backward"),
        inference_compiler=compiler_for("inference"),
        decompositions=select_decomp_table(),
        partition_fn=min_cut_rematerialization_partition,
    )


def lower_ascend(gm: torch.fx.GraphModule, example_inputs, post_grad: PostGradStage) -> Callable:
    reason = ascend_unavailable_reason() or "the torchair lowering is not built yet (issue: Lowering to Ascend graph mode)"
    raise TargetUnavailableError(f"target 'ascend' is not available here: {reason}; use target='inductor' or 'eager'")


LOWERINGS = {"inductor": lower_inductor, "eager": lower_eager, "ascend": lower_ascend}
