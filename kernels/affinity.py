"""Affinity routing (LocMoE+): a token's affinity to an expert is the cosine between the token and the expert's gate row.

    delta = affinity(tokens, gate_weight)                       # [T, E], in [-1, 1]
    weights, expert_ids = token_choice(logits, delta, k, True)  # TCR: each token's k most affine experts
    dispatched, slots = capacity_dispatch(tokens, expert_ids, delta.gather(1, expert_ids), E, C, "score")
                                                                # ECR: each expert keeps its C most affine choosers

Expert choice needs no kernel of its own: the capacity dispatch's ``"score"``
policy keeps, for each expert, the highest-scoring of the tokens that chose it,
and with the affinity as the score those are its best ``C`` tokens by δ.

Combine weights: a token's weights are the gate's softmax over all experts,
taken at the experts it chose and renormalised over them (as top-k routing
does), so the gate still learns through its logits while the choice follows δ.
A pair that expert choice drops adds nothing to the token's output (the
residual carries it), as a capacity drop does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def affinity(tokens: Tensor, gate_weight: Tensor) -> Tensor:
    """``δ [T, E]``: the cosine between each token ``[T, d]`` and each gate row ``[E, d]``."""
    return F.normalize(tokens, dim=-1) @ F.normalize(gate_weight, dim=-1).t()


def token_choice(logits: Tensor, delta: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """``(weights [T, k], expert_ids [T, k])``: the ``k`` experts of highest affinity, weighted by the gate's softmax."""
    expert_ids = delta.topk(k, dim=-1).indices
    weights = torch.softmax(logits.float(), dim=-1).gather(1, expert_ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), expert_ids
