"""A compiled graph that follows its layers' routing phase: recompiled once when affinity routing switches.

The ``affinity_routing`` pass compiles each layer for the phase its state holds
(token choice or expert choice). The graph of the token-choice phase folds each
step's affinity into the state; after each call its state is copied to the host
(without waiting, so the check reads the previous step's) and checked: once a
layer is due for expert choice (``affinity_routing.settled``), or its state was
loaded from a checkpoint in another phase, the state is marked and the graph is
compiled again from the Dynamo graph as it came, once. Under data or expert
parallelism the check reads the statistics averaged over the ranks (one small
all-reduce a step, from warm-up to the switch), so every rank switches at the
same step with the same capacity.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx

from moe_ascend.kernels import affinity as kernels
from moe_ascend.passes import affinity_routing

log = logging.getLogger(__name__)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A graph module of its own over the same parameters and metadata (the passes rewrite graphs in place)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    return copy


def agreed(state: torch.Tensor) -> torch.Tensor:
    """A layer's routing statistics averaged over every rank of the job: each rank observes its own tokens, but
    the switch and the expert-choice capacity must be the same on all of them, or their exchanges would not match."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return state
    state = state.clone()
    dist.all_reduce(state)
    return state / dist.get_world_size()


class PhaseFollowing:
    """Calls the graph compiled for the current phases; ``compile_graph(gm) -> (compiled, routed layers)``."""

    def __init__(self, dynamo_graph: torch.fx.GraphModule, compile_graph: Callable):
        self.dynamo_graph = copy_graph_module(dynamo_graph)
        self.compile_graph = compile_graph
        self.compiled, self.layers = compile_graph(dynamo_graph)
        self.host_states = [torch.zeros(kernels.STATE_SIZE, dtype=torch.float64) for _ in self.layers]
        self.recompiles = 0

    def __call__(self, *args: Any) -> Any:
        if any(self._due(layer, host) for layer, host in zip(self.layers, self.host_states)):
            self._recompile()
        outputs = self.compiled(*args)
        for layer, host in zip(self.layers, self.host_states):
            host.copy_(layer.state, non_blocking=True)
        return outputs

    def _due(self, layer: affinity_routing.RoutedLayer, host: torch.Tensor) -> bool:
        if float(host[kernels.PHASE]) != layer.phase:  # a checkpoint brought another phase
            return True
        if layer.phase != kernels.TOKEN_CHOICE or float(host[kernels.STEPS]) < kernels.WARM_UP_STEPS:
            return False  # (every rank has taken as many steps: all of them skip the agreement alike)
        host = agreed(host)
        if affinity_routing.settled(layer, host):
            layer.state.copy_(host)  # every rank's expert-choice capacity from the same statistics
            layer.state[kernels.PHASE] = kernels.EXPERT_CHOICE
            mean, least, outranked = kernels.running_affinity(host)
            log.info("moe_ascend: affinity routing switches to expert choice after %d steps (chosen pairs' affinity: "
                     "mean %.3f, least %.3f; an unrelated token outranks a relevant one with probability %.4f, "
                     "%.4f for random directions)", int(host[kernels.STEPS]), mean, least, outranked,
                     kernels.outrank_probability(mean, layer.width))
            return True
        return False

    def _recompile(self) -> None:
        self.compiled, self.layers = self.compile_graph(copy_graph_module(self.dynamo_graph))
        self.host_states = [layer.state.detach().to("cpu", copy=True) for layer in self.layers]
        self.recompiles += 1
