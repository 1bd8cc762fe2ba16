"""On every rank of a 2 x 2 emulated cluster: the expert-parallel MoELayer against one process holding every expert.

``moe_layer.py`` prints one ``RESULT {json}`` line per rank: for capacity and dropless in eager, and capacity
compiled with moe_ascend, the largest difference of the outputs and of every gradient, and the compiled
layer's graph-break count.
"""

import json

import torch
import torch.distributed as dist

from moe_ascend.runtime import MoELayer
from moe_ascend.runtime.launcher import end_process_group

MODES = {"capacity": 1.0, "dropless": None}


def layer_kwargs(mode):
    return dict(d_model=8, d_ff=16, num_experts=8, top_k=2, capacity_factor=MODES[mode], num_shared_experts=1)


def largest_difference(mode: str, compiled: bool) -> float:
    """The EP layer's outputs and grads on this rank against a single-process layer's (same weights, all ranks'
    tokens)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = MoELayer(**layer_kwargs(mode))
    layer = MoELayer(**layer_kwargs(mode), ep_group=dist.group.WORLD)
    local = slice(rank * layer.num_local_experts, (rank + 1) * layer.num_local_experts)
    with torch.no_grad():
        layer.gate.weight.copy_(reference.gate.weight)
        layer.w_gate_up.copy_(reference.w_gate_up[local])
        layer.w_down.copy_(reference.w_down[local])
        for mine, theirs in zip(layer.shared.parameters(), reference.shared.parameters()):
            mine.copy_(theirs)
    batches = [torch.randn(6, 8, generator=torch.Generator().manual_seed(100 + r)) for r in range(world_size)]
    probes = [torch.randn(6, 8, generator=torch.Generator().manual_seed(200 + r)) for r in range(world_size)]

    run = torch.compile(layer, backend="moe_ascend", options={"target": "eager"}) if compiled else layer
    out = run(batches[rank])
    (out * probes[rank]).sum().backward()
    sum((reference(b) * p).sum() for b, p in zip(batches, probes)).backward()

    pairs = [(out, reference(batches[rank])), (layer.w_gate_up.grad, reference.w_gate_up.grad[local]),
             (layer.w_down.grad, reference.w_down.grad[local])]
    for mine, theirs in [(layer.gate.weight, reference.gate.weight),
                         *zip(layer.shared.parameters(), reference.shared.parameters())]:
        dist.all_reduce(mine.grad)  # replicated parameters: each rank holds its own tokens' share
        pairs.append((mine.grad, theirs.grad))
    return max((a - b).abs().max().item() for a, b in pairs)


def graph_breaks() -> int:
    torch.manual_seed(0)
    layer = MoELayer(**layer_kwargs("capacity"), ep_group=dist.group.WORLD)
    return torch._dynamo.explain(layer)(torch.randn(6, 8)).graph_break_count


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = {"rank": dist.get_rank(), "capacity_graph_breaks": graph_breaks(),
              **{f"{mode}{'_compiled' if compiled else ''}": largest_difference(mode, compiled)
                 for mode, compiled in [("capacity", False), ("dropless", False), ("capacity", True)]}}
    print("RESULT " + json.dumps(result), flush=True)
    end_process_group()
