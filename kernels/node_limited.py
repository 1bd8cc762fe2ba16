"""Node-limited routing (DeepSeek-V3): a token's experts lie on at most ``M`` nodes.

    weights, expert_ids = node_limited_topk_softmax(logits, k, renormalize, num_nodes, max_nodes)

Experts are numbered node-major (expert ``e`` lives on node ``e // (E / nodes)``,
as expert parallelism over all ranks in order places them). Each node scores
a token by the sum of its ``max(1, k // M)`` highest expert probabilities; the
token keeps the ``M`` best nodes and takes its top ``k`` among their experts.
Weights are the softmax over all experts at the chosen ones (renormalised over
them when asked), so with ``M`` = every node this is ``topk_softmax``. Ties go
to the lower node and expert id, as in ``topk_softmax``.

Plain torch ops: AOTAutograd derives the backward (through the softmax and the
gather; the choices themselves carry no gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ascend.kernels.routing import _probs, _top_k, within_best_groups


def node_limited_topk_softmax(logits: Tensor, k: int, renormalize: bool, num_nodes: int,
                              max_nodes: int) -> tuple[Tensor, Tensor]:
    """``logits [T, E]`` → ``(weights [T, k], expert_ids [T, k])`` with the experts on at most ``max_nodes`` nodes."""
    tokens, num_experts = logits.shape
    per_node = num_experts // num_nodes
    torch._check(num_experts % num_nodes == 0,
                 lambda: f"{num_experts} experts do not split evenly over {num_nodes} nodes")
    torch._check(1 <= k <= max_nodes * per_node,
                 lambda: f"top-{k} does not fit in {max_nodes} node(s) of {per_node} experts; raise max_nodes")
    probs = _probs(logits)
    best_per_node = min(per_node, max(1, k // max_nodes))
    _, expert_ids = _top_k(within_best_groups(probs, num_nodes, max_nodes, best_per_node), k)
    weights = probs.gather(1, expert_ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), expert_ids


def nodes_reached(expert_ids: Tensor, num_experts: int, num_nodes: int) -> Tensor:
    """``[T]``: how many distinct nodes each token's experts live on."""
    node_of = expert_ids // (num_experts // num_nodes)
    return torch.zeros(expert_ids.shape[0], num_nodes, dtype=torch.bool, device=expert_ids.device).scatter(
        1, node_of, True).sum(-1)
