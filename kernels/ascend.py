"""The moe_ascend ops on Ascend: what each becomes in a graph-engine (GE) graph, and the NPU kernels of eager mode.

torchair turns an FX graph into a GE graph op by op, through a converter per
op; an op it has no converter for fails the compile (there is no per-op
fallback in ``max-autotune`` mode). Each moe_ascend op reaches GE one of two ways:

- **decomposed**: its plain-torch form (the same function its reference
  implementation runs) is handed to torchair as a decomposition, so AOTAutograd
  traces it into aten ops that torchair converts (sort, searchsorted, scatter,
  gather, bmm, ...; no stable sort, ``index_copy`` or ``index_put``, which GE
  lacks). The op's own backward still applies.
- **fused**: where the data decides the shapes (grouped matmuls over a count
  per expert), onto the torch_npu kernel built for it, whose GE converter
  torchair ships (``npu_grouped_matmul`` with a group list).

``ge_form(op)`` says which; ``compiler.report.ascend_coverage`` reads it. A few aten
ops that torchair registers only as stubs are decomposed too (``ATEN_FORMS``:
SiLU's backward, ``where`` with a scalar, and the device-side asserts that
``one_hot`` and friends trace to, which a GE graph has no op for and drops).
``decompositions(npu)`` is the table for torchair (``npu=False``: the plain
forms only, what the ascend target's dry run traces on a machine without an NPU).
Nothing here imports torch_npu: the NPU forms look it up when they run.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from moe_ascend.kernels.capacity import assign_slots, combine_from_slots, dispatch_to_slots
from moe_ascend.kernels.dropless import permute_rows, unpermute_rows
from moe_ascend.kernels.routing import top_k_of_sigmoid, top_k_of_softmax

ops = torch.ops.moe_ascend
aten = torch.ops.aten


def slot_mask(filled: Tensor, slots: int) -> Tensor:
    """``[E, B·C, 1]``: 1 where a slot of ``grouped_mm_filled``'s layout holds a token (``filled [E, B]``)."""
    block = slots // filled.shape[1]
    position = torch.arange(slots, device=filled.device)
    used = (position % block).unsqueeze(0) < filled.repeat_interleave(block, dim=1)
    return used.unsqueeze(-1)


def filled_matmul(x: Tensor, w: Tensor, filled: Tensor) -> Tensor:
    """``grouped_mm_filled`` as a static batched matmul: every slot is computed, the empty ones are zeroed."""
    return torch.bmm(x, w) * slot_mask(filled, x.shape[1]).to(x.dtype)


def filled_weight_grad(x: Tensor, grad: Tensor, filled: Tensor) -> Tensor:
    """``grouped_mm_filled_weight_grad`` as a static batched matmul over the used slots."""
    return torch.bmm((x * slot_mask(filled, x.shape[1]).to(x.dtype)).transpose(1, 2), grad)


def npu_grouped_mm(x: Tensor, w: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """``grouped_mm`` on torch_npu's GroupedMatmul: rows grouped along m by per-expert counts (group_list_type 1)."""
    (out,) = torch.ops.npu.npu_grouped_matmul([x], [w], group_list=tokens_per_expert, split_item=2, group_type=0,
                                              group_list_type=1)
    used = torch.arange(x.shape[0], device=x.device) < tokens_per_expert.sum()
    return out * used.unsqueeze(-1).to(out.dtype)  # the op's contract: rows past the counts are zero


def npu_grouped_mm_weight_grad(x: Tensor, grad: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """``grouped_mm_weight_grad`` on GroupedMatmul grouped along k: expert e's ``x_eᵀ · grad_e``, ``[E, d, f]``."""
    (out,) = torch.ops.npu.npu_grouped_matmul([x.t()], [grad], group_list=tokens_per_expert, split_item=3,
                                              group_type=2, group_list_type=1)
    return out


def npu_topk_softmax(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """``topk_softmax`` on torch_npu's MoeGatingTopKSoftmax (softmax in fp32, as the reference does)."""
    weights, expert_ids, _ = torch.ops.npu.npu_moe_gating_top_k_softmax(logits.float(), None, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), expert_ids.long()


# Every moe_ascend op: its plain form (decomposed for GE), its torch_npu form (fused), or neither (host-side work).
PLAIN_FORMS: dict[str, Callable] = {
    "topk_softmax": top_k_of_softmax,
    "topk_sigmoid": top_k_of_sigmoid,  # torch_npu's MoeGatingTopK takes only E = 256, k_group = 4 on A2/A3
    "capacity_slots": assign_slots,
    "capacity_dispatch": dispatch_to_slots,
    "capacity_combine": combine_from_slots,
    "permute": permute_rows,
    "unpermute": unpermute_rows,
    "grouped_mm_batched": torch.bmm,
    "grouped_mm_filled": filled_matmul,
    "grouped_mm_filled_weight_grad": filled_weight_grad,
}
NPU_FORMS: dict[str, tuple[Callable, str]] = {  # op → (form, the torch_npu op it runs, whose converter GE needs)
    "topk_softmax": (npu_topk_softmax, "npu.npu_moe_gating_top_k_softmax.default"),
    "grouped_mm": (npu_grouped_mm, "npu.npu_grouped_matmul.default"),
    "grouped_mm_weight_grad": (npu_grouped_mm_weight_grad, "npu.npu_grouped_matmul.default"),
}


def _silu_backward(grad: Tensor, x: Tensor) -> Tensor:
    sigmoid = torch.sigmoid(x)
    return grad * sigmoid * (1 + x * (1 - sigmoid))


def _where_scalar_other(condition: Tensor, x: Tensor, other) -> Tensor:
    return torch.where(condition, x, torch.full_like(x, other))


def _where_scalar_self(condition: Tensor, value, other: Tensor) -> Tensor:
    return torch.where(condition, torch.full_like(other, value), other)


def _dropped_assert(*args) -> None:
    return None


# aten ops whose torchair converter is a stub, in ops it converts.
ATEN_FORMS: dict = {
    aten.silu_backward.default: _silu_backward,
    aten.where.ScalarOther: _where_scalar_other,
    aten.where.ScalarSelf: _where_scalar_self,
    aten._assert_async.msg: _dropped_assert,
    aten._assert_async.default: _dropped_assert,
}
HOST_SIDE = {
    "observe_affinity": "it folds the affinity statistics into a module's state on the host (affinity routing's "
                        "token-choice phase); GE graphs cannot call back into Python",
}


def ge_form(op: str) -> str:
    """How ``moe_ascend.<op>.default`` reaches a GE graph: ``"decomposed"``, the torch_npu op it runs, or ``""``
    (it cannot: see ``HOST_SIDE``)."""
    if op in PLAIN_FORMS:
        return "decomposed"
    return NPU_FORMS[op][1] if op in NPU_FORMS else ""


def decompositions(npu: bool) -> dict:
    """The decomposition table for torchair: the plain forms, and with ``npu`` the fused ones over them."""
    table = dict(ATEN_FORMS) | {getattr(ops, name).default: form for name, form in PLAIN_FORMS.items()}
    if npu:
        table.update({getattr(ops, name).default: form for name, (form, _) in NPU_FORMS.items()})
    return table


def register_npu_kernels() -> None:
    """Eager mode on an NPU: the fused forms as the ops' ``npu`` kernels (call once torch_npu is imported)."""
    for name, (form, _) in NPU_FORMS.items():
        torch.library.register_kernel(f"moe_ascend::{name}", "npu", form)


# --- torch_npu's MC2 kernels (npu_moe_distribute_dispatch/combine): their schemas and limits -------------------

NPU_MOE_OPS = Path(__file__).resolve().parent / "data" / "npu_moe_ops.yaml"


@functools.lru_cache(maxsize=1)
def npu_moe_ops() -> dict:
    """The recorded schemas (``schemas``) and MC2 limits per SoC (``mc2``) of torch_npu's fused MoE ops."""
    import yaml

    return yaml.safe_load(NPU_MOE_OPS.read_text())


def npu_schema(name: str) -> torch.FunctionSchema:
    return torch._C.parse_schema("npu::" + npu_moe_ops()["schemas"][name])


class TensorArg(str):
    """An argument that is a tensor of the graph (named for what it holds), not a constant."""


def call_problems(name: str, args: dict) -> list[str]:
    """How a call of torch_npu's ``name`` with ``args`` (by name) disagrees with the recorded schema."""
    schema = npu_schema(name)
    known = {a.name: a for a in schema.arguments}
    problems = [f"{name} has no argument {key!r}" for key in args if key not in known]
    for argument in schema.arguments:
        if argument.name not in args:
            if not argument.has_default_value():
                problems.append(f"{name} needs {argument.name!r}")
            continue
        value, kind = args[argument.name], str(argument.type)
        wants_tensor = "Tensor" in kind  # Tensor, Optional[Tensor], List[Tensor]
        if wants_tensor != isinstance(value, TensorArg) or (not wants_tensor and not _fits(value, kind)):
            problems.append(f"{name}({argument.name}: {kind}) given {value!r}")
    return problems


def _fits(value, kind: str) -> bool:
    kind = kind.removeprefix("Optional[").rstrip("]?")
    return {"int": isinstance(value, int) and not isinstance(value, bool), "str": isinstance(value, str),
            "bool": isinstance(value, bool), "float": isinstance(value, float)}.get(kind, False)


def ep_comm_name(group: str, rank: int) -> str:
    """The HCCL communicator name of process group ``group`` (what MC2's ``group_ep`` takes), on an NPU."""
    pg = torch.distributed.distributed_c10d._resolve_process_group(group)
    return pg._get_backend(torch.device("npu")).get_hccl_comm_name(rank)
