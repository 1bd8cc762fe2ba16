"""On every rank: node-limited routing compiled against the same routing in eager, and the inter-node bytes it saves.

``node_limited.py check``: 8 experts over 2 nodes x 2 ranks, top-4, dropless with the two-step exchange
(which crosses the inter-node link once per (token, destination node)); a softmax router, and DeepSeek-V3's sigmoid
router (the nodes become its groups).
"""

import json
import sys

import torch
import torch.distributed as dist

import moe_ascend.kernels as ops
from moe_ascend.kernels.node_limited import node_limited_topk_softmax, nodes_reached
from moe_ascend.runtime import MoELayer, Topology
from moe_ascend.runtime import traffic as counter
from moe_ascend.runtime.launcher import end_process_group

NUM_EXPERTS, TOP_K, MAX_NODES = 8, 4, 1


class NodeLimitedLayer(MoELayer):
    """The reference: MoELayer routed by the node-limited kernel, in eager."""

    def route(self, tokens):
        nodes = Topology.detect().nodes
        if self.score == "sigmoid":
            return ops.topk_sigmoid(self.gate(tokens), self.top_k, self.expert_bias, nodes, MAX_NODES,
                                    TOP_K // MAX_NODES, self.renormalize, 1.0)
        return node_limited_topk_softmax(self.gate(tokens), self.top_k, self.renormalize, nodes, MAX_NODES)


def layer(score, cls=MoELayer):
    torch.manual_seed(0)
    built = cls(16, 32, NUM_EXPERTS, TOP_K, ep_group=dist.group.WORLD, hierarchical_a2a=True, score=score).double()
    if score == "sigmoid":
        built.expert_bias.copy_(torch.linspace(-0.05, 0.05, NUM_EXPERTS))  # a bias that steers the choice
    return built


def step(model, x) -> tuple[list, dict]:
    counter.reset()
    out = model(x)
    out.backward(torch.ones_like(out))
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad(set_to_none=True)
    return [out.detach()] + grads, counter.read().to_json()


def check() -> dict:
    torch.manual_seed(1 + dist.get_rank())
    x = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    return {"rank": dist.get_rank()} | {score: compare(score, x) for score in ("softmax", "sigmoid")}


def compare(score: str, x: torch.Tensor) -> dict:
    reference = layer(score, NodeLimitedLayer)
    _, ids = reference.route(x.detach())
    expected, _ = step(reference, x)
    bytes_sent = {}
    for routing in ("keep", "node_limited") if score == "softmax" else ("node_limited",):  # one baseline is enough
        torch._dynamo.reset()
        options = {"target": "eager", "routing": routing} | (
            {"routing_options": {"max_nodes": MAX_NODES}} if routing == "node_limited" else {})
        compiled = torch.compile(layer(score), backend="moe_ascend", options=options)
        step(compiled, x)  # compiles
        got, bytes_sent[routing] = step(compiled, x)
    difference = max((a - b).abs().max().item() for a, b in zip(expected, got, strict=True))
    return {"max_abs_diff": difference,
            "most_nodes": int(nodes_reached(ids, NUM_EXPERTS, Topology.detect().nodes).max()), "bytes": bytes_sent}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    print("RESULT " + json.dumps(globals()[sys.argv[1]]()), flush=True)
    end_process_group()
