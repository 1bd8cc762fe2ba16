"""functionalise (pre_grad): an in-place op on a tensor nothing else sees becomes the op that returns a new one.

The MoE analysis follows values from node to user. An in-place op breaks that
chain: ``out.add_(bias)`` has no users, yet everything that reads ``out``
afterwards reads its result (transformers' grouped experts add their biases
so, as gpt-oss's do). Where ``out`` was made inside the graph and no view,
input or other name shares its memory, the in-place op is the functional one
and the later readers read it. Numerics are unchanged: it is the same kernel,
and AOTAutograd would functionalise the graph the same way.

Before::

    out = torch._grouped_mm(tokens, w, offs = offsets)
    add_ = out.add_(bias)
    weighted = out * weights

After::

    out = torch._grouped_mm(tokens, w, offs = offsets)
    add_ = out.add(bias)
    weighted = add_ * weights

An in-place op on a graph input, a parameter or a view (its effect outlives
or reaches past the value) is left as it is.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

from moe_ascend.passes.infra import PassContext, PassResult, infer_meta, register_pass

# In-place methods whose functional op (the name without "_") takes the same arguments and, where its result has
# the written tensor's shape and dtype (checked), computes what they write.
IN_PLACE_METHODS = frozenset({
    "add_", "sub_", "mul_", "div_", "masked_fill_", "clamp_", "index_add_", "index_fill_", "scatter_",
    "scatter_add_", "index_put_",
})


@register_pass(name="functionalise", stage="pre_grad", after=("normalise",), before=("find_moe",),
               roles=("dynamo",))
def functionalise(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    sharing = _nodes_by_storage(gm)
    modified = False
    for node in list(gm.graph.nodes):
        if not _writes_only_fresh_memory(node, sharing, order):
            continue
        mutated, in_place = node.args[0], node.target
        node.target = in_place[:-1]
        if not _keeps_shape_and_dtype(node, mutated, ctx):
            node.target, node.meta["val"] = in_place, mutated.meta["val"]
            continue
        for reader in [user for user in mutated.users if order[user] > order[node]]:
            reader.replace_input_with(mutated, node)
        modified = True
    return PassResult(gm, modified)


def _writes_only_fresh_memory(node: torch.fx.Node, sharing: dict, order: dict) -> bool:
    """``node`` is an in-place method on memory the graph made (no input, no parameter), which nothing but the
    written tensor reads after the write, and which no later op writes again (later views only read the result)."""
    if node.op != "call_method" or node.target not in IN_PLACE_METHODS or not node.args:
        return False
    mutated = node.args[0]
    value = mutated.meta.get("val") if isinstance(mutated, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return False
    for holder in sharing.get(StorageWeakRef(value.untyped_storage()), []):
        if holder.op not in ("call_function", "call_method"):
            return False
        if holder in (mutated, node):
            continue
        if order[holder] < order[node] and any(order[user] > order[node] for user in holder.users):
            return False  # an alias made before the write is read after it: it would see the write
        if order[holder] > order[node] and holder.op == "call_method" and holder.target in IN_PLACE_METHODS:
            return False
    return True


def _keeps_shape_and_dtype(node: torch.fx.Node, mutated: torch.fx.Node, ctx: PassContext) -> bool:
    """The functional op's value, now ``node``'s, has the written tensor's shape and dtype (no broadcast, no type
    promotion), so it computes what the in-place op wrote."""
    try:
        value = infer_meta(node, ctx.fake_mode)
    except Exception:  # the functional op does not take these arguments
        return False
    written = mutated.meta["val"]
    return isinstance(value, torch.Tensor) and value.shape == written.shape and value.dtype == written.dtype


def _nodes_by_storage(gm: torch.fx.GraphModule) -> dict:
    """The nodes whose value lives in each storage (a view shares its base's)."""
    sharing: dict = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            sharing.setdefault(StorageWeakRef(value.untyped_storage()), []).append(node)
    return sharing
