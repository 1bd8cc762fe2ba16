"""What a node computes, the same way in Dynamo (torch IR) and post-grad (aten IR) graphs."""

from __future__ import annotations

import torch
import torch.fx

MATMULS = frozenset({"linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "einsum"})
TOP_K = frozenset({"topk", "topk_softmax", "topk_sigmoid"})  # torch.topk, and moe_ascend's fused routers
WAIT = "wait_tensor"
# Ops that compute each slot's row from that row alone (the matmuls take the expert's weight on the right).
ROW_WISE_OPS = frozenset({
    "grouped_mm_batched", "grouped_mm_filled", "bmm", "matmul", "getitem", "silu", "gelu", "relu", "sigmoid", "tanh",
    "mul", "add", "sub", "div", "neg", "to", "float", "type", "contiguous", "clone", "chunk", "split",
})


def op_name(node: torch.fx.Node) -> str:
    """``"mm"`` for ``aten.mm.default``, ``"softmax"`` for ``x.softmax(...)``, ``"matmul"`` for ``a @ b``."""
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def is_top_k(node: torch.fx.Node) -> bool:
    """A router's choice of experts: ``torch.topk``, moe_ascend's routers, or a max along one dimension (a
    top-1, as PhiMoE's sparsemixer picks each of its two experts)."""
    name = op_name(node)
    if name in TOP_K:
        return True
    if node.op not in ("call_function", "call_method") or name != "max":
        return False
    return isinstance(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None), int)


# Checks a graph makes of its data-dependent sizes (captured scalars): they use a value and produce none.
RUNTIME_ASSERTS = frozenset({"_assert_scalar", "_assert_async", "_check", "_check_is_size", "sym_constrain_range",
                             "sym_constrain_range_for_size"})


def op_namespace(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace
    if isinstance(target, torch._ops.OpOverloadPacket):  # Dynamo graphs hold the packet
        return target._qualified_op_name.split("::")[0]
    return ""


def is_collective(node: torch.fx.Node) -> bool:
    """An issued collective (its result is only usable after a ``wait_tensor``)."""
    return node.op == "call_function" and op_namespace(node) == "_c10d_functional" and op_name(node) != WAIT


def is_wait(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and op_namespace(node) == "_c10d_functional" and op_name(node) == WAIT


def collective_group(node: torch.fx.Node) -> str:
    """The process-group name a functional collective runs on (its ``group_name`` argument)."""
    target = node.target
    overload = target.default if isinstance(target, torch._ops.OpOverloadPacket) else target
    names = [a.name for a in overload._schema.arguments]
    if "group_name" in node.kwargs:
        return str(node.kwargs["group_name"])
    position = names.index("group_name")
    return str(node.args[position]) if position < len(node.args) else "?"


def is_matmul(node: torch.fx.Node) -> bool:
    """The matmul family, including any library's grouped matmul (torch._grouped_mm, transformers', ours)."""
    name = op_name(node)
    return node.op in ("call_function", "call_method") and (name in MATMULS or "grouped_mm" in name)


def is_row_wise(node: torch.fx.Node) -> bool:
    """Each row of the output (a slot of an ``[E, C, d]`` buffer) comes from the same row of the input alone."""
    name = op_name(node)
    if name not in ROW_WISE_OPS:
        return False
    if name in ("chunk", "split"):  # only across features
        return cut_dim(node) in (-1, node.args[0].meta["val"].dim() - 1)
    return True


def cut_dim(node: torch.fx.Node) -> int | None:
    """The dim a ``chunk``/``split`` cuts along, as written (None for other ops)."""
    if op_name(node) not in ("chunk", "split"):
        return None
    return node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)


def module_holding(parameter_source) -> torch.nn.Module | None:
    """The module a Dynamo-traced parameter belongs to, from its source
    (``L['self']._modules['moe']._modules['gate']._parameters['weight']`` → that gate), while Dynamo traces."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    parameters = getattr(parameter_source, "base", None)
    if getattr(parameters, "member", None) != "_parameters":
        return None
    tx = InstructionTranslator.current_tx()
    if tx is None:
        return None
    try:
        module = tx.output.resolve_source_value(parameters.base)
    except Exception:  # a source Dynamo cannot resolve from the frame: no module found
        return None
    return module if isinstance(module, torch.nn.Module) else None
