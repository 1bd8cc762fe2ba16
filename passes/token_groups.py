"""token_groups (pre_grad): split the graph's tokens into groups that run side by side, so one group's
all-to-all travels while the other group's attention and experts compute.

On with ``options={"overlap": {"token_groups": g}}``. Every input that carries
the batch (an input that is not a parameter or buffer) is cut along its first
axis into ``g`` equal groups; every node that reads a group's rows is copied
once per group, the copies emitted side by side (group 0's, then group 1's,
node by node), and the graph's outputs are the groups' outputs put back
together. What reads no rows (the weights, a mask built from the sequence
length) is computed once and shared. The groups' dataflows meet nowhere before
the output, so ``schedule_overlap`` is free to run group 1's attention while
group 0's dispatch is in flight, in the forward and in the backward that
AOTAutograd derives (each weight's gradient is the sum of the groups').

It applies where the model treats the rows of the batch independently up to
the graph's outputs: each copy must compute, for its rows, what the whole graph
computes for them. Each node is checked as it is copied: its output must be
its rows of the whole output (the same shape, one axis ``g`` times shorter),
and no ``dim`` it works along may be the rows' axis. A node that fails (a loss
or a norm over the whole batch, a routing statistic such as an auxiliary loss,
a slice of the rows) is named in one warning, and the graph is left alone.
What only updates module state (an in-place write on a buffer that no output
reads, such as DeepSeek-V3's router bias nudged by the load, or a layer's
load counter) is computed once, from the groups' rows put back together: it
sees the batch the ungrouped graph sees.
Inside an MoE layer the groups' routing buffers are their own: each group
dispatches its tokens into ``ceil(C / g)`` slots per expert, so the bytes sent
stay those of the ungrouped layer. When ``C`` holds every token (``C ≥ T``) no
token is dropped either way and the grouped graph computes what the ungrouped
one does; with a smaller capacity the groups' buffers drop differently (by
position or score among fewer tokens), so that needs
``{"token_groups": g, "changes_numerics": True}``.

Under ``overlap="auto"`` (or ``{"token_groups": "auto"}``) the cost model
chooses: ``g`` groups where the step model predicts them faster than any chunk
count of one group (``CostModel.best_overlap``: the groups hide under the
whole layer, attention included, where chunks hide under the experts only),
else the graph is left to ``chunk_for_overlap``. Plain ``"auto"`` keeps the
numerics: it groups only layers whose capacity holds every token.

Before (``g = 2``, tokens ``x [4, 8]``)::

    linear = torch._C._nn.linear(x, w)
    relu = torch.relu(linear)
    return (relu,)

After::

    x_group_0 = torch.narrow(x, 0, 0, 2)
    x_group_1 = torch.narrow(x, 0, 2, 2)
    linear_group_0 = torch._C._nn.linear(x_group_0, w)
    linear_group_1 = torch._C._nn.linear(x_group_1, w)
    relu_group_0 = torch.relu(linear_group_0)
    relu_group_1 = torch.relu(linear_group_1)
    relu_groups = torch.cat([relu_group_0, relu_group_1], 0)
    return (relu_groups,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

from moe_ascend.kernels import exchange, hierarchical
from moe_ascend.passes.analysis.exchange_sites import (CapacityExchange, capacity_at, capacity_dispatch,
                                                       capacity_exchange)
from moe_ascend.passes.analysis.moe_regions import META_KEY, ancestors_of_set, annotate, find_moe_layers
from moe_ascend.passes.analysis.ops import is_collective, op_name
from moe_ascend.passes.chunk_for_overlap import MOST_CHUNKS
from moe_ascend.passes.infra import PassContext, PassResult, infer_meta, register_pass, shape_generic_exchange

EXCHANGE_KERNELS = (exchange.to_experts, exchange.from_experts, exchange.dropless_dispatch, exchange.dropless_send,
                    exchange.dropless_combine, exchange.dropless_return, hierarchical.capacity_dispatch,
                    hierarchical.capacity_combine, hierarchical.dropless_moe)
# Ops that only re-view their input, with the new shape spelled out as ints.
_SHAPED_VIEWS = {"view", "reshape", "expand"}

# An MoE layer's roles whose values may be a group's own buffers (its dispatch buffer, its experts' input) rather
# than its rows of a whole-batch value; the router must keep to rows (a statistic over all tokens is refused).
_BUFFER_ROLES = ("dispatch", "experts", "combine")
GROUP_KEY = "token_group"  # node.meta["custom"][GROUP_KEY]: the group a copy computes for
GROUPS_KEY = "token_groups"  # ctx.analyses[GROUPS_KEY]: how many groups the graph was split into
MOST_GROUPS = 4  # "auto" tries 2 … MOST_GROUPS
ITEMS = "items"  # the rows' axis of a tuple (topk's values and indices, unbind's pieces): each item's own


class Refusal(Exception):
    """The graph cannot be split: the node and why (said in the pass's warning)."""

    def __init__(self, node: torch.fx.Node, why: str):
        super().__init__(f"{node.name} ({op_name(node)}) {why}")


@dataclass
class Grouped:
    """A value computed per group: the copies, and the axis its rows lie along in each (None: it has no rows, a
    buffer of the group's own, such as its MoE layer's dispatch buffer)."""

    copies: list[torch.fx.Node]
    axis: int | str | None  # or ITEMS


@register_pass(name="token_groups", stage="pre_grad",
               after=("find_moe", "canonicalise", "hierarchical_a2a", "affinity_routing", "node_limited_routing"),
               before=("chunk_for_overlap", "skip_empty_slots", "mc2_dispatch"), roles=("dynamo",),
               enabled=lambda options: options.token_groups != 1)
def token_groups(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    asked = ctx.options.token_groups
    layers = ctx.analyses.get("moe_layers", [])
    if not any(_exchanges(n) for n in gm.graph.nodes):
        if asked != "auto":  # (under "auto", chunk_for_overlap says it once)
            ctx.logger.warning("%s: not split into %d token groups: the graph exchanges nothing (%s), so there is "
                               "no communication for a group to hide", ctx.graph_name, asked,
                               "no MoE layer" if not layers else "one process, or experts that are all local")
        return PassResult(gm, False)
    groups = _chosen_groups(gm, layers, ctx) if asked == "auto" else asked
    if groups == 1:
        return PassResult(gm, False)
    try:  # on a copy first: a refusal leaves the graph as it was
        _split(_graph_copy(gm), groups, ctx)
    except Refusal as refusal:
        say = ctx.logger.info if asked == "auto" else ctx.logger.warning
        say("%s: not split into %d token groups: %s; the graph is left as it was", ctx.graph_name, groups, refusal)
        return PassResult(gm, False)
    except Exception as error:  # the default ("auto") must not fail a compile the user did not ask to group
        if asked != "auto":
            raise
        ctx.logger.warning("%s: not split into %d token groups: the pass failed on this graph (%s: %s), a bug to "
                           "report; the graph is left as it was", ctx.graph_name, groups, type(error).__name__, error)
        return PassResult(gm, False)
    _split(gm, groups, ctx)
    ctx.analyses["moe_layers"] = _regions(gm)
    ctx.analyses[GROUPS_KEY] = groups
    ctx.logger.info("%s: split into %d token groups (%d MoE layers each)", ctx.graph_name, groups, len(layers))
    return PassResult(gm, True)


def _chosen_groups(gm: torch.fx.GraphModule, layers, ctx: PassContext) -> int:
    """Under "auto": the group count the cost model predicts fastest; 1 where chunks (or nothing) do better, or
    where it cannot price every layer (a layer that is not one flat capacity exchange)."""
    sites = [capacity_exchange(layer) for layer in layers]
    if ctx.cost_model is None or not sites or not all(isinstance(site, CapacityExchange) for site in sites):
        return 1
    rows = [node.meta["val"].shape[0] for node in gm.graph.nodes if node.op == "placeholder" and _carries_rows(node)]
    counts = [g for g in range(2, MOST_GROUPS + 1) if all(r % g == 0 for r in rows)]
    chunks, groups = ctx.cost_model.best_overlap(gm, sites, MOST_CHUNKS, counts)
    if groups == 1:
        ctx.logger.info("%s: not split into token groups: the cost model predicts %s faster", ctx.graph_name,
                        f"{chunks} chunks of each exchange" if chunks > 1 else "no overlap")
    return groups


def _exchanges(node: torch.fx.Node) -> bool:
    """A collective, or one of the exchange kernels that hold their collectives inside."""
    return is_collective(node) or node.target in EXCHANGE_KERNELS


def _group_capacities(layers, groups: int, ctx: PassContext) -> dict[torch.fx.Node, int]:
    """Each capacity dispatch's slots per expert in one group, ``ceil(C / g)``; its exchange made shape-generic so
    the copies can follow the smaller buffer. A capacity below the layer's tokens needs the user's consent."""
    capacities = {}
    for layer in layers:
        dispatch = capacity_dispatch(layer)
        if dispatch is None:
            continue
        tokens, capacity = dispatch.args[0].meta["val"].shape[0], capacity_at(dispatch)[1]
        if capacity < tokens and not ctx.options.overlap_option("changes_numerics"):
            raise Refusal(dispatch, f"can drop tokens (capacity {capacity} slots per expert for {tokens} tokens), and "
                          "groups' buffers drop differently from one buffer for all; pass "
                          f"overlap={{'token_groups': {ctx.options.token_groups!r}, 'changes_numerics': True}} to "
                          "accept that")
        site = capacity_exchange(layer)
        if isinstance(site, CapacityExchange):
            shape_generic_exchange(dispatch.graph, site, layer)
        capacities[dispatch] = math.ceil(capacity / groups)
    return capacities


def _split(gm: torch.fx.GraphModule, groups: int, ctx: PassContext) -> None:
    capacities = _group_capacities(_regions(gm), groups, ctx)
    graph = gm.graph
    values: dict[torch.fx.Node, Grouped] = {}
    joined: dict[torch.fx.Node, torch.fx.Node] = {}  # a grouped value put back together, made once
    state_updates = _state_updates(graph)
    originals = []
    for node in list(graph.nodes):
        if node.op == "placeholder":
            if _carries_rows(node):
                values[node] = _cut(graph, node, groups, ctx)
        elif node.op == "output":
            node.args = torch.fx.node.map_arg(node.args, lambda v: _whole(v, node, values, joined, ctx, "is an output"))
        elif node in state_updates:
            node.args, node.kwargs = torch.fx.node.map_arg(
                (node.args, node.kwargs), lambda v: _whole(v, node, values, joined, ctx, "updates module state"))
        elif any(i in values for i in node.all_input_nodes):
            values[node] = _copy_per_group(graph, node, values, groups, capacities, ctx)
            originals.append(node)
    for node in reversed(originals):
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _carries_rows(node: torch.fx.Node) -> bool:
    """A tensor input that is not a parameter or buffer: the batch."""
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    source = source() if callable(source) else str(source)  # Dynamo's source text: a property in some versions
    val = node.meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dim() >= 1
            and not isinstance(getattr(grapharg, "example", None), torch.nn.Parameter)
            and "_parameters" not in source and "_buffers" not in source)


def _cut(graph: torch.fx.Graph, placeholder: torch.fx.Node, groups: int, ctx: PassContext) -> Grouped:
    rows = placeholder.meta["val"].shape[0]
    if rows % groups:
        raise Refusal(placeholder, f"has {rows} rows, which do not split into {groups} equal groups")
    size = rows // groups
    copies = []
    with graph.inserting_before(_first_computation(graph)):
        for j in range(groups):
            part = graph.call_function(torch.narrow, (placeholder, 0, j * size, size))
            part._rename(f"{placeholder.name}_group_{j}")
            part.meta["custom"] = {GROUP_KEY: j}
            infer_meta(part, ctx.fake_mode)
            copies.append(part)
    return Grouped(copies, 0)


def _first_computation(graph: torch.fx.Graph) -> torch.fx.Node:
    return next(n for n in graph.nodes if n.op != "placeholder")


def _copy_per_group(graph: torch.fx.Graph, node: torch.fx.Node, values: dict[torch.fx.Node, Grouped], groups: int,
                    capacities: dict[torch.fx.Node, int], ctx: PassContext) -> Grouped:
    if is_collective(node):
        raise Refusal(node, "exchanges with split sizes fixed for the whole batch's tokens")
    _check_dims(node, values)
    shape = _shape_of_group(node, values, groups) if op_name(node) in _SHAPED_VIEWS else None
    copies, axes = [], set()
    for j in range(groups):
        with graph.inserting_before(node):
            copy = graph.node_copy(node, lambda a: values[a].copies[j] if a in values else a)
        copy._rename(f"{node.name}_group_{j}")
        copy.meta["custom"] = {**(copy.meta.get("custom") or {}), GROUP_KEY: j}  # AOTAutograd carries it along
        if node in capacities:
            args = list(copy.args)
            args[capacity_at(node)[0]] = capacities[node]
            copy.args = tuple(args)
        if shape is not None:
            copy.args = (copy.args[0], *shape)
        try:
            infer_meta(copy, ctx.fake_mode)
        except Exception as exc:
            raise Refusal(node, f"does not work on a group's rows ({type(exc).__name__}: {str(exc)[:160]})") from exc
        copies.append(copy)
        axes.add(_rows_axis(node, copy, groups))
    axis = axes.pop() if len(axes) == 1 else None
    if isinstance(node.meta.get("val"), (tuple, list)):
        return Grouped(copies, ITEMS)  # each item's rows are found where it is taken out
    if axis is None and _role(node) not in _BUFFER_ROLES:
        raise Refusal(node, "mixes the rows of the batch (a loss, norm or statistic over all tokens, or a slice of "
                      "them): its output is not the groups' outputs side by side")
    return Grouped(copies, axis)


def _role(node: torch.fx.Node) -> str | None:
    """The node's role in an MoE layer, or None."""
    return ((node.meta.get("custom") or {}).get(META_KEY) or {}).get("role") if node.op != "placeholder" else None


def _rows_axis(node: torch.fx.Node, copy: torch.fx.Node, groups: int) -> int | None:
    """The one axis along which the copy's output is ``groups`` times shorter than the node's (None: no such axis)."""
    whole, part = node.meta.get("val"), copy.meta.get("val")
    if not (isinstance(whole, torch.Tensor) and isinstance(part, torch.Tensor)) or whole.dim() != part.dim():
        return None
    shorter = [a for a, (w, p) in enumerate(zip(whole.shape, part.shape)) if w != p]
    if len(shorter) == 1 and whole.shape[shorter[0]] == groups * part.shape[shorter[0]]:
        return shorter[0]
    return None


def _check_dims(node: torch.fx.Node, values: dict[torch.fx.Node, Grouped]) -> None:
    """No ``dim`` the node works along may be the rows' axis of an input (a softmax or a sum across the batch)."""
    if _role(node) in _BUFFER_ROLES or op_name(node) in _SHAPED_VIEWS:
        return
    rows = [(i, values[i].axis) for i in node.all_input_nodes if i in values and isinstance(values[i].axis, int)]
    if not rows:
        return
    kwargs = _named_arguments(node)
    for name in ("dim", "dims", "axis"):
        dims = kwargs.get(name)
        if dims is None:
            continue
        for value, axis in rows:
            ndim = value.meta["val"].dim()
            if any(d % max(ndim, 1) == axis for d in (dims if isinstance(dims, (list, tuple)) else [dims])
                   if isinstance(d, int)):
                raise Refusal(node, f"works along {name}={dims}, the axis of the batch's rows")


def _named_arguments(node: torch.fx.Node) -> dict:
    """The node's arguments by name, where its schema can say (else its keyword arguments)."""
    target = getattr(torch, node.target, None) if node.op == "call_method" else node.target  # x.sum(0) ~ torch.sum
    if callable(target):
        try:
            normalized = normalize_function(target, tuple(node.args), dict(node.kwargs),
                                            normalize_to_only_use_kwargs=True)
        except Exception:
            normalized = None
        if normalized is not None:
            return dict(normalized.kwargs)
    return dict(node.kwargs)


def _shape_of_group(node: torch.fx.Node, values: dict[torch.fx.Node, Grouped], groups: int) -> tuple:
    """A view's shape arguments (after its input) for one group: the axis the rows start on is ``groups`` times shorter.

    The group's rows are a contiguous block of the input when every axis before the rows' is of size one, and
    then they are the first ``1 / groups`` of every view of it too: the first axis of size above one shrinks.
    """
    source = node.args[0]
    axis = values[source].axis if source in values else None
    whole = source.meta["val"].shape
    if not isinstance(axis, int) or math.prod(whole[:axis]) != 1:
        raise Refusal(node, "re-views a value whose rows are not its leading block")
    shape = list(node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple))
                 else node.args[1])
    out = node.meta["val"].shape
    lead = next((a for a, size in enumerate(out) if size != 1), None)
    if lead is None or out[lead] % groups:
        raise Refusal(node, f"re-views the rows into {tuple(out)}, which does not split into {groups} groups")
    if shape[lead] != -1:
        shape[lead] = shape[lead] // groups
    return tuple(shape) if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else (shape,)


def _whole(value, reader: torch.fx.Node, values: dict[torch.fx.Node, Grouped],
           joined: dict[torch.fx.Node, torch.fx.Node], ctx: PassContext, what: str):
    """``value`` for the whole batch, as ``reader`` needs it: a grouped value's copies put back together along
    their rows (once, before its first such reader)."""
    if value not in values:
        return value
    grouped = values[value]
    if not isinstance(grouped.axis, int):
        raise Refusal(reader, f"{what} from {value.name}, which has no rows to put back together")
    if value not in joined:
        with reader.graph.inserting_before(reader):
            cat = reader.graph.call_function(torch.cat, (grouped.copies, grouped.axis))
        cat._rename(f"{value.name}_groups")
        infer_meta(cat, ctx.fake_mode)
        joined[value] = cat
    return joined[value]


def _state_updates(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The nodes that compute only a buffer's next value: in-place writes on an input that is not the batch,
    which nothing reads, and what they read that no output needs."""
    writes = [n for n in graph.nodes if n.op in ("call_method", "call_function") and not n.users
              and op_name(n).endswith("_") and not op_name(n).startswith("_")
              and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "placeholder"
              and not _carries_rows(n.args[0])]
    needed = ancestors_of_set([graph.output_node()])
    return {n for n in ancestors_of_set(writes) | set(writes) if n not in needed and n.op != "placeholder"}


def _graph_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A graph module of its own graph (nodes and their metadata copied) over the same parameters: a dry run."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def _regions(gm: torch.fx.GraphModule) -> list:
    """The graph's MoE layers, annotated; in a split graph each group's copy of a layer is a layer of its own."""
    layers = find_moe_layers(gm)
    for layer in layers:
        annotate(layer)
    return layers

