"""Keep a post_grad graph's communication schedule through Inductor's own scheduling.

Inductor is free to move a node wherever its data allows: fusing the pointwise
work of two chunks into one kernel, or sinking a collective and hoisting its
wait, undoes ``schedule_overlap`` (and a pass that reorders collectives it does
not see deadlocks, pytorch issue 189454). Explicit control dependencies leave it
no such freedom: each collective and wait comes after the one before it and
after the compute placed before it, and the compute placed after it comes after
it, so none moves, the collectives keep the graph's order, and no fusion may
join work across them.
"""

from __future__ import annotations

import torch
import torch.fx
from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
from torch.utils._ordered_set import OrderedSet

from moe_ascend.compiler.planner.cost_model import FREE_OPS
from moe_ascend.passes.analysis.ops import is_collective, is_wait, op_name


def keep_schedule(gm: torch.fx.GraphModule) -> int:
    """Pin ``gm``'s collectives and waits where they stand among its compute; returns the number of pinned nodes.

    The graph falls into segments at each collective and wait. Each collective and wait comes after the
    previous one and after the last compute before it; each compute node of a segment comes after the
    collective or wait that opens the segment, unless one of its inputs already does.
    """
    deps: dict[torch.fx.Node, OrderedSet[torch.fx.Node]] = {}
    last_compute = last_comm = None
    after_comm: set[torch.fx.Node] = set()  # nodes already ordered after last_comm
    for node in gm.graph.nodes:
        if is_collective(node) or is_wait(node):
            wanted = OrderedSet(n for n in (last_comm, last_compute) if n is not None and n not in node.all_input_nodes)
            if wanted:
                deps[node] = wanted
            last_comm, after_comm = node, {node}
        elif node.op == "call_function":
            if any(i in after_comm for i in node.all_input_nodes):
                after_comm.add(node)
            elif last_comm is not None and _is_compute(node):
                deps[node] = OrderedSet([last_comm])
                after_comm.add(node)
            if _is_compute(node):
                last_compute = node
    preserve_node_ordering(gm.graph, deps)
    if deps:
        gm.recompile()
    return len(deps)


def _is_compute(node: torch.fx.Node) -> bool:
    """A real kernel with one tensor output (what a control dependency can wrap)."""
    return (node.op == "call_function" and op_name(node) not in FREE_OPS
            and isinstance(node.meta.get("val"), torch.Tensor))
