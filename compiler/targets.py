"""Lowering targets: how a pre_grad-rewritten Dynamo graph becomes something that runs.

Every target runs AOTAutograd and hands our post_grad stage the forward,
backward and inference graphs: Inductor through ``post_grad_custom_pre_pass``
(``config_patches=`` so the lazily compiled backward sees it too), ``eager``
through its own forward/backward compilers, ``ascend`` through torchair's
``CompilerConfig.post_grad_custom_pre_pass``.

``ascend`` hands torchair the moe_ascend ops' GE forms as decompositions
(``kernels.ascend``), with forms of the few aten ops whose torchair converter
is a stub. With ``ascend_options={"dry_run": True}`` it needs no NPU:
AOTAutograd traces the graphs torchair would be given (its partitioner, those
decompositions), the post_grad stage runs on them, each is checked for ops GE
could not take (one warning per graph that has any), and they run eagerly, as
torchair's ``debug.run_eagerly`` does.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.fx

from moe_ascend.compiler.keep_schedule import keep_schedule
from moe_ascend.compiler.pipeline import PostGradStage, training_role
from moe_ascend.kernels.errors import TargetUnavailableError

log = logging.getLogger(__name__)
_announced_auto = False


def resolve_target(target: str, dry_run: bool = False) -> str:
    """``"auto"``: ascend when torch_npu imports and an NPU is visible, else inductor (said once, at info).
    ``"ascend"`` where it cannot run (and no dry run is asked for) is an error that says what is missing."""
    global _announced_auto
    if target == "ascend" and not dry_run and (reason := ascend_unavailable_reason()) is not None:
        raise TargetUnavailableError(
            f"target 'ascend' is not available here: {reason}; use target='inductor' or 'eager', or "
            "ascend_options={'dry_run': True} to build and check the graphs torchair would get"
        )
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

    # AOTAutograd's cache hands back both graphs without calling inner_compile, which would leave their exchanges
    # uncounted; Inductor's FX-graph cache (inside compile_fx_inner) still spares the lowering.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner_compile,
                          config_patches={"post_grad_custom_pre_pass": post_grad})


def lower_eager(gm: torch.fx.GraphModule, example_inputs, post_grad: PostGradStage) -> Callable:
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    # Inductor's decompositions and partitioner, so post_grad passes see the same aten IR on every target (the
    # default partitioner replayed the hierarchical dispatch, all-to-alls included, in the backward).
    return _aot_eager(gm, example_inputs, post_grad, select_decomp_table(), min_cut_rematerialization_partition)


def _aot_eager(gm: torch.fx.GraphModule, example_inputs, post_grad: PostGradStage, decompositions, partition_fn,
               check: Callable[[torch.fx.GraphModule, str], None] | None = None) -> Callable:
    """AOTAutograd with our post_grad stage as its forward/backward/inference compilers; the graphs run eagerly."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def compiler_for(role: str):
        def compile_graph(graph: torch.fx.GraphModule, inputs):
            post_grad.account(graph, role)
            graph = post_grad.run(graph, role)
            if check is not None:
                check(graph, role)
            return make_boxed_func(graph.forward)

        return compile_graph

    return aot_module_simplified(
        gm,
        example_inputs,
        fw_compiler=compiler_for("forward"),
        bw_compiler=compiler_for("backward"),
        inference_compiler=compiler_for("inference"),
        decompositions=decompositions,
        partition_fn=partition_fn,
    )


def lower_ascend(gm: torch.fx.GraphModule, example_inputs, post_grad: PostGradStage) -> Callable:
    from moe_ascend.kernels import ascend

    context = post_grad.make_context("post_grad", "forward")
    options = context.options
    dry_run = options.ascend_option("dry_run")
    decompositions = ascend.decompositions(npu=not dry_run)
    if dry_run:
        from torch._functorch.partitioners import default_partition  # torchair's
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # Attention as its math (matmuls, softmax): the fused CPU kernel this machine would trace to is no NPU op.
        with sdpa_kernel([SDPBackend.MATH]):
            return _aot_eager(gm, example_inputs, post_grad, decompositions, default_partition,
                              _warn_missing_converters)
    return _torchair(gm, example_inputs, post_grad, options, decompositions, inference=not context.training)


def _warn_missing_converters(graph: torch.fx.GraphModule, role: str) -> None:
    from moe_ascend.compiler.report.ascend_coverage import missing_converters

    missing = missing_converters(graph)
    if missing:
        log.warning("moe_ascend: GE would reject this %s graph: %s", role,
                    "; ".join(f"{op} ({why})" for op, why in missing.items()))


def _torchair(gm: torch.fx.GraphModule, example_inputs, post_grad: PostGradStage, options, decompositions,
              inference: bool) -> Callable:
    """torchair's backend with our post_grad stage as its ``post_grad_custom_pre_pass``."""
    import torch_npu  # noqa: F401  (before torchair, which it provides)
    import torchair

    from moe_ascend.kernels import ascend

    ascend.register_npu_kernels()
    config = torchair.CompilerConfig()
    config.mode = options.ascend_option("mode")
    if options.dump_dir is not None:  # GE's own graphs beside ours
        ge_dir = Path(options.dump_dir) / "ge"
        ge_dir.mkdir(parents=True, exist_ok=True)
        config.debug.graph_dump.type = "pbtxt" if config.mode == "max-autotune" else "py"
        config.debug.graph_dump.path = str(ge_dir)
    def post_grad_pass(graph: torch.fx.GraphModule, inputs, config) -> None:
        role = "inference" if inference else training_role(graph)  # torchair gives its pass the graph alone
        post_grad.account(graph, role)
        post_grad.run(graph, role)

    config.post_grad_custom_pre_pass = post_grad_pass
    return torchair.get_npu_backend(compiler_config=config, custom_decompositions=decompositions)(gm, example_inputs)


LOWERINGS = {"inductor": lower_inductor, "eager": lower_eager, "ascend": lower_ascend}
