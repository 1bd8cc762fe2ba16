"""normalise (pre_grad): one spelling per op, so later passes match one form.

Dynamo keeps the user's spelling: ``x.softmax(-1)``, ``F.softmax(x, -1)`` and
``torch.softmax(x, -1)`` are three different nodes. This pass rewrites the
method and ``torch.nn.functional`` spellings of the ops the MoE analyses and
rewrites look at into the ``torch.*`` function. Numerics are unchanged: it is
the same kernel.

Before::

    probs = linear.softmax(dim = -1)
    sum_1 = w.sum(-1, keepdim = True)

After::

    probs = torch.softmax(linear, dim = -1)
    sum_1 = torch.sum(w, -1, keepdim = True)
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from moe_ascend.passes.infra import PassContext, PassResult, register_pass

# Tensor methods whose torch.* function takes the same arguments after ``self``.
CANONICAL_METHODS = {
    name: getattr(torch, name)
    for name in (
        "softmax", "log_softmax", "sigmoid", "topk", "sort", "argsort", "sum", "mean",
        "cumsum", "matmul", "bmm", "gather", "scatter_add", "index_select", "index_add",
        "einsum", "relu", "tanh", "exp", "where", "masked_fill",
    )
}
# torch.nn.functional spellings that are the same op as a torch.* function when called
# with at most (input, dim) positionally and only these keywords.
CANONICAL_FUNCTIONS = {
    F.softmax: (torch.softmax, {"dim", "dtype", "_stacklevel"}),
    F.log_softmax: (torch.log_softmax, {"dim", "dtype", "_stacklevel"}),
    F.sigmoid: (torch.sigmoid, set()),
}


@register_pass(name="normalise", stage="pre_grad", roles=("dynamo",))
def normalise(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    modified = False
    for node in gm.graph.nodes:
        target = _canonical_target(node)
        if target is None:
            continue
        # Same arguments, same value: retarget the node in place, keeping its name and meta.
        node.op, node.target = "call_function", target
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "_stacklevel"}
        modified = True
    return PassResult(gm, modified)


def _canonical_target(node: torch.fx.Node):
    if node.op == "call_method":
        return CANONICAL_METHODS.get(node.target)
    if node.op == "call_function" and node.target in CANONICAL_FUNCTIONS:
        target, keywords = CANONICAL_FUNCTIONS[node.target]
        if len(node.args) > 2 or set(node.kwargs) - keywords:
            return None
        return target
    return None
