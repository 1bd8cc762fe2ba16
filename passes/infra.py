"""The pass API: ``register_pass``, ``PassResult``, ``PassContext``, and pass ordering.

A pass is ``fn(gm, ctx) -> PassResult``. It is declared once::

    @register_pass(name="my_pass", stage="post_grad", after=("find_moe",))
    def my_pass(gm, ctx):
        ...
        return PassResult(gm, modified=True)

and runs in every compile from then on, at the point its constraints give,
unless ``options["disable"]`` names it. A pass registered with
``enabled=False`` (or ``changes_numerics=True``) runs only when
``options["passes"]`` names it (or its ``enabled(options)`` says so).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch
import torch.fx

from moe_ascend.kernels import exchange
from moe_ascend.kernels.errors import OptionError, PassOrderError, PassRegistrationError
from moe_ascend.passes.analysis.moe_regions import META_KEY

PASS_LOGGER = "moe_ascend.passes"  # what the passes say, through their context (under the package's "moe_ascend")

STAGES = ("pre_grad", "post_grad")
ROLES = ("dynamo", "forward", "backward", "inference")


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module and whether it changed."""

    gm: torch.fx.GraphModule
    modified: bool


@runtime_checkable
class CostModel(Protocol):
    """What a pass may ask of the cost model (``compiler.planner.cost_model.CostModel`` answers; the compiler
    hands it over in the context, so the passes never import the compiler)."""

    def compute_seconds(self, node: torch.fx.Node) -> float:
        """The time ``node``'s computation takes on this platform."""

    def collective_seconds(self, node: torch.fx.Node) -> float:
        """The time collective ``node``'s transfer takes on the link its group spans."""

    def best_chunks(self, site: Any, most: int) -> int:
        """The chunk count (1 … ``most``) with the fastest predicted step for an exchange site the passes found."""

    def best_overlap(self, gm: torch.fx.GraphModule, sites: list, most_chunks: int,
                     group_counts: list[int]) -> tuple[int, int]:
        """(chunks, token groups) with the fastest predicted step of a graph whose MoE layers exchange at
        ``sites``: chunks of one group, or one chunk of each of ``group_counts`` groups."""

    def hierarchical_pays(self, site: Any) -> bool:
        """Whether the two-step exchange makes that site's layer faster than the flat one."""


@dataclass
class PassContext:
    """What a pass may read besides its graph.

    ``role`` is ``"dynamo"`` in pre_grad and ``"forward"``, ``"backward"`` or
    ``"inference"`` in post_grad. ``training`` says whether the graph will be
    differentiated (a pre_grad pass cannot tell from the graph). ``analyses``
    carries results from one pass to the later passes of the same graph
    (``find_moe`` puts ``"moe_layers"`` there).
    """

    options: Any
    stage: str
    role: str
    graph_name: str
    topology: Any = None
    cost_model: CostModel | None = None
    logger: "logging.Logger | PassLog" = field(default_factory=lambda: PassLog(logging.getLogger(PASS_LOGGER)))
    fake_mode: Any = None
    analyses: dict[str, Any] = field(default_factory=dict)
    training: bool = True


class PassLog(logging.LoggerAdapter):
    """The passes' logger, which also keeps what they said at INFO and above (the dump shows it beside each pass:
    why a pass asked for did not apply)."""

    def __init__(self, logger: logging.Logger):
        super().__init__(logger, {})
        self.said: list[tuple[str, str]] = []  # (level, message), in order

    def log(self, level: int, msg, *args, **kwargs) -> None:
        if level >= logging.INFO:
            self.said.append((logging.getLevelName(level).lower(), str(msg) % args if args else str(msg)))
        super().log(level, msg, *args, **kwargs)


@dataclass(frozen=True)
class Pass:
    """A registered pass and its declared place in the pipeline."""

    name: str
    stage: str
    fn: Callable[[torch.fx.GraphModule, PassContext], PassResult]
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    changes_numerics: bool = False
    enabled: bool | Callable[[Any], bool] = True
    roles: tuple[str, ...] = ROLES

    def runs_by_default(self, options: Any) -> bool:
        return self.enabled(options) if callable(self.enabled) else bool(self.enabled)


_REGISTRY: dict[str, Pass] = {}


def register_pass(
    name: str | None = None,
    *,
    stage: str = "pre_grad",
    after: Iterable[str] = (),
    before: Iterable[str] = (),
    changes_numerics: bool = False,
    enabled: bool | Callable[[Any], bool] | None = None,
    roles: Iterable[str] = ROLES,
) -> Callable:
    """Declare ``fn(gm, ctx) -> PassResult`` as a pass of ``stage``, ordered by ``after``/``before``.

    A pass that ``changes_numerics`` is off unless ``enabled(options)`` says so
    or ``options["passes"]`` names it.
    """
    if stage not in STAGES:
        raise PassRegistrationError(f"stage {stage!r} is not one of {list(STAGES)}")
    roles = tuple(roles)
    bad_roles = sorted(set(roles) - set(ROLES))
    if bad_roles:
        raise PassRegistrationError(f"roles {bad_roles} are not among {list(ROLES)}")

    def decorate(fn: Callable) -> Callable:
        pass_name = name or fn.__name__
        if pass_name in _REGISTRY and _REGISTRY[pass_name].fn is not fn:
            raise PassRegistrationError(
                f"a pass named {pass_name!r} is registered already; pick another name "
                f"or call unregister_pass({pass_name!r}) first"
            )
        on = enabled if enabled is not None else not changes_numerics
        _REGISTRY[pass_name] = Pass(
            pass_name, stage, fn, tuple(after), tuple(before), changes_numerics, on, roles
        )
        fn.moe_ascend_pass = _REGISTRY[pass_name]
        return fn

    return decorate


def unregister_pass(name: str) -> None:
    """Remove a registered pass (tests and notebooks that re-register)."""
    _REGISTRY.pop(name, None)


def registered_passes(stage: str | None = None) -> list[Pass]:
    return [p for p in _REGISTRY.values() if stage is None or p.stage == stage]


def ordered_passes(stage: str, options: Any) -> list[Pass]:
    """The passes that run in ``stage`` for these options, in an order that meets every constraint.

    Ties keep registration order, so the order never depends on a hash.
    """
    requested = _requested_passes(options)
    unknown = sorted(set(options.disable) - set(_REGISTRY))
    if unknown:
        raise OptionError(
            f"option 'disable' names unknown pass(es) {unknown}; registered passes are {sorted(_REGISTRY)}"
        )
    stage_passes = [p for p in _REGISTRY.values() if p.stage == stage]
    stage_passes += [p for p in requested if p.stage == stage and p.name not in _REGISTRY]
    order = _topological_order(stage, stage_passes)
    chosen = {p.name for p in requested}
    return [
        p
        for p in order
        if p.name not in options.disable and (p.name in chosen or p.runs_by_default(options))
    ]


def _requested_passes(options: Any) -> list[Pass]:
    """``options["passes"]``: registered names, registered callables, or plain callables (pre_grad)."""
    out = []
    for item in options.passes:
        if isinstance(item, str):
            if item not in _REGISTRY:
                raise OptionError(
                    f"option 'passes' names unknown pass {item!r}; registered passes are {sorted(_REGISTRY)}"
                )
            out.append(_REGISTRY[item])
        elif hasattr(item, "moe_ascend_pass"):
            out.append(item.moe_ascend_pass)
        else:  # a plain function: a pre_grad pass after every registered one
            out.append(Pass(getattr(item, "__name__", repr(item)), "pre_grad", item))
    return out


def _topological_order(stage: str, passes: list[Pass]) -> list[Pass]:
    index = {p.name: i for i, p in enumerate(passes)}
    edges: dict[str, set[str]] = {p.name: set() for p in passes}
    for p in passes:
        for other in p.after:
            _check_constraint(stage, p, other)
            if other in index:
                edges[other].add(p.name)
        for other in p.before:
            _check_constraint(stage, p, other)
            if other in index:
                edges[p.name].add(other)
    indegree = {name: 0 for name in edges}
    for targets in edges.values():
        for t in targets:
            indegree[t] += 1
    ready = [(index[n], n) for n, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for t in edges[name]:
            indegree[t] -= 1
            if indegree[t] == 0:
                heapq.heappush(ready, (index[t], t))
    if len(order) < len(passes):
        raise PassOrderError(
            f"the after=/before= constraints of {stage} passes form a cycle: "
            f"{_describe_cycle(edges, set(edges) - set(order))}; change the constraints of one of them"
        )
    by_name = {p.name: p for p in passes}
    return [by_name[n] for n in order]


def _check_constraint(stage: str, p: Pass, other: str) -> None:
    """A constraint on a pass of another stage is a mistake; one on an unregistered pass is allowed (optional
    plug-ins)."""
    registered = _REGISTRY.get(other)
    if registered is not None and registered.stage != stage:
        raise PassRegistrationError(
            f"pass {p.name!r} ({stage}) is ordered against {other!r}, a {registered.stage} pass; "
            "constraints only order passes of one stage"
        )


def _describe_cycle(edges: dict[str, set[str]], stuck: set[str]) -> str:
    """Walk successors inside the stuck set until a name repeats: that loop is a cycle."""
    start = sorted(stuck)[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(t for t in edges[path[-1]] if t in stuck)[0]
        if nxt in seen:
            loop = path[path.index(nxt):] + [nxt]
            return " -> ".join(loop)
        path.append(nxt)
        seen.add(nxt)


# --- rewriting helpers --------------------------------------------------------------------


def erase_unused(graph: torch.fx.Graph, layer, roles: Iterable[str]) -> None:
    """Erase the layer's nodes of these roles that nothing reads any more (a rewrite's leftovers), collectives too.

    Walking the graph backwards reaches a node's users before the node, so one pass frees whole chains.
    """
    candidates = {n for role in roles for n in layer.nodes.get(role, [])}
    for node in reversed(list(graph.nodes)):
        if (node in candidates and node.op in ("call_function", "call_method") and not node.users
                and node is not layer.output):
            graph.erase_node(node)
            layer.replace(node, None)


def shape_generic_exchange(graph: torch.fx.Graph, site, layer) -> None:
    """Replace the flat exchange of ``site`` (a ``CapacityExchange``), whose reshapes and split sizes hold the
    capacity as constants, by one that works them out from the buffer: a rewrite that changes the capacity keeps
    a working exchange."""
    with graph.inserting_before(site.experts[0]):
        expert_in = graph.create_node("call_function", exchange.to_experts, (site.dispatched, site.group, site.ep_size),
                                      name="expert_in")
    join_layer(expert_in, site.expert_in, layer, "dispatch")
    for node in site.experts:
        node.replace_input_with(site.expert_in, expert_in)
    with graph.inserting_after(site.expert_out):
        returned = graph.create_node("call_function", exchange.from_experts,
                                     (site.expert_out, site.group, site.ep_size), name="returned")
    join_layer(returned, site.combine, layer, "combine")
    site.combine.replace_input_with(site.combine.args[0], returned)
    erase_unused(graph, layer, ("dispatch", "combine"))


def replace_node(gm: torch.fx.GraphModule, old: torch.fx.Node, new: torch.fx.Node, ctx: PassContext, layer) -> None:
    """``new`` takes ``old``'s users, MoE role and source location (its ``val`` is derived afresh) and its place in
    the layer."""
    inherit_meta(new, old, ctx.fake_mode)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    layer.replace(old, new)


# --- FakeTensor metadata -----------------------------------------------------------------


def infer_meta(node: torch.fx.Node, fake_mode: Any = None) -> Any:
    """Compute ``node.meta["val"]`` from its inputs' ``val`` (what a pass calls for nodes it creates)."""
    val = _fake_output(node, fake_mode)
    node.meta["val"] = val
    return val


def inherit_meta(new: torch.fx.Node, old: torch.fx.Node, fake_mode: Any = None) -> None:
    """``new`` stands for ``old``: its ``val`` worked out afresh, ``old``'s MoE role and source location kept."""
    infer_meta(new, fake_mode)
    for key in ("custom", "stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def join_layer(new: torch.fx.Node, like: torch.fx.Node, layer, role: str, fake_mode: Any = None,
               **tags) -> torch.fx.Node:
    """``new`` works for ``layer`` as ``role``: its ``val`` worked out afresh, ``like``'s source location, the role
    (and ``tags``, such as a chunk index) in ``meta["custom"]["moe"]``, and a place among the layer's nodes."""
    inherit_meta(new, like, fake_mode)
    custom = dict(new.meta.get("custom") or {})  # a copy: inherit_meta shares like's
    custom[META_KEY] = {**custom.get(META_KEY, {}), "role": role, **tags}
    new.meta["custom"] = custom
    layer.nodes[role].append(new)
    return new


def _fake_output(node: torch.fx.Node, fake_mode: Any) -> Any:
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    # The inputs' own mode first: Dynamo's graph values need not share its tracing context's mode.
    fake_mode = _mode_of([args, kwargs]) or fake_mode
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return node.graph.owning_module.get_submodule(node.target)(*args, **kwargs)
    raise PassRegistrationError(f"cannot infer metadata of a {node.op} node ({node.name})")


def _mode_of(values: Any) -> Any:
    from torch._subclasses.fake_tensor import FakeTensor

    leaves = torch.utils._pytree.tree_leaves(values)
    return next((v.fake_mode for v in leaves if isinstance(v, FakeTensor)), None)


def meta_mismatch(node: torch.fx.Node, fake_mode: Any = None) -> str | None:
    """Why ``node.meta["val"]`` disagrees with what its op computes, or None when it agrees."""
    if "val" not in node.meta:
        return "has no meta['val']; set it with moe_ascend.passes.infer_meta(node)"
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        fresh = _fake_output(node, fake_mode)
    except _UNKNOWABLE_ON_FAKE:  # sizes that only data gives (a kernel reading split sizes): taken on trust
        return None
    except Exception as exc:  # the op does not take these inputs: the graph would fail when it runs
        first_line = (str(exc).splitlines() or [""])[0][:300]
        return f"its op fails on its inputs' meta['val']: {type(exc).__name__}: {first_line}"
    claimed = node.meta["val"]
    got, want = _signature(claimed), _signature(fresh)
    if got != want:
        return f"meta['val'] says {got} but the op computes {want}"
    return None


def _unknowable_on_fake() -> tuple[type[BaseException], ...]:
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException, \
        GuardOnDataDependentSymNode


_UNKNOWABLE_ON_FAKE = _unknowable_on_fake()


def _signature(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return (str(tuple(val.shape)), val.dtype)
    if isinstance(val, (list, tuple)):
        return tuple(_signature(v) for v in val)
    return type(val).__name__
