"""Which collectives a graph issues, on which process group, in which order."""

from __future__ import annotations

from collections import defaultdict

import torch.fx

from moe_ascend.kernels.hierarchical import Hierarchy
from moe_ascend.passes.analysis.ops import collective_group, is_collective, op_name
from moe_ascend.runtime.topology import LinkBytes, all_to_all_bytes


def collective_order(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    """For each process group, the names of its collectives in the order the graph issues them."""
    order: dict[str, list[str]] = defaultdict(list)
    for node in gm.graph.nodes:
        if is_collective(node):
            order[collective_group(node)].append(node.name)
    return dict(order)


def collectives_by_kind(gm: torch.fx.GraphModule) -> dict[str, dict[str, int]]:
    """``{"all_to_all_single": {"<group>": count}}``: what summary.json reports."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for node in gm.graph.nodes:
        if is_collective(node):
            counts[op_name(node)][collective_group(node)] += 1
        for group in declared_all_to_alls(node):
            counts["all_to_all_single"][group] += 1
    return {kind: dict(groups) for kind, groups in counts.items()}


def declared_all_to_alls(node: torch.fx.Node) -> list[str]:
    """The groups of the all-to-alls a kernel call issues inside (``hierarchical.issues_all_to_alls``)."""
    steps = getattr(node.target, "all_to_alls", ()) if node.op == "call_function" else ()
    hierarchy = next((a for a in node.args if isinstance(a, Hierarchy)), None)
    return [getattr(hierarchy, f"{step}_group") for step in steps] if hierarchy is not None else []


def order_violations(before: dict[str, list[str]], after: dict[str, list[str]]) -> list[str]:
    """Collectives that survived a pass but changed their order within their group.

    New and removed collectives are allowed (a rewrite may replace one by two);
    two that exist before and after must keep their relative order, or ranks
    that run different graphs would issue them differently and deadlock.
    """
    problems = []
    for group, names in after.items():
        kept_before = [n for n in before.get(group, []) if n in names]
        kept_after = [n for n in names if n in kept_before]
        if kept_before != kept_after:
            problems.append(f"group {group}: order was {kept_before}, now {kept_after}")
    return problems


def exchange_bytes(gm: torch.fx.GraphModule) -> LinkBytes | None:
    """What one run of the graph's all-to-alls sends over each kind of link, from their static sizes.

    None when a size is data (dropless split sizes read inside the graph): then only the runtime knows.
    """
    sent = LinkBytes()
    for node in gm.graph.nodes:
        if not (is_collective(node) and op_name(node) == "all_to_all_single"):
            continue
        tensor, input_splits = node.args[0].meta.get("val"), node.args[2] if len(node.args) > 2 else None
        sizes = [*(tensor.shape if tensor is not None else [None]), *(input_splits or [])]
        if not all(isinstance(size, int) for size in sizes):
            return None
        sent = sent + all_to_all_bytes(collective_group(node), tensor.numel() * tensor.element_size(), input_splits)
    return sent
