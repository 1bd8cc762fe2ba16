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

import weakref

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from moe_ascend.kernels.routing import _probs


def affinity(tokens: Tensor, gate_weight: Tensor) -> Tensor:
    """``δ [T, E]``: the cosine between each token ``[T, d]`` and each gate row ``[E, d]``."""
    return F.normalize(tokens, dim=-1) @ F.normalize(gate_weight, dim=-1).t()


def token_choice(logits: Tensor, delta: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """``(weights [T, k], expert_ids [T, k])``: the ``k`` experts of highest affinity, weighted by the gate's softmax."""
    expert_ids = delta.topk(k, dim=-1).indices
    weights = _probs(logits).gather(1, expert_ids)  # at least fp32, as topk_softmax
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), expert_ids


def grap_gate(d_model: int, num_experts: int, like: Tensor) -> Tensor:
    """LocMoE's GrAP gate as rows ``[E, d]``: expert ``i`` averages the ``i``-th block of ``d / E`` features."""
    torch._check(d_model % num_experts == 0, lambda: f"GrAP needs d ({d_model}) divisible by the experts ({num_experts})")
    block = d_model // num_experts
    return torch.eye(num_experts, dtype=like.dtype, device=like.device).repeat_interleave(block, dim=1) / block


def affinity_top_k(tokens: Tensor, gate_rows: Tensor, logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Token choice by affinity: ``(weights [T, k], expert_ids [T, k], delta [T, E])``."""
    delta = affinity(tokens, gate_rows).detach()  # the choice carries no gradient; the weights do, through the logits
    weights, expert_ids = token_choice(logits, delta, k, renormalize)
    return weights, expert_ids, delta


# The routing state of one layer, a float64 buffer: phase (0 token choice, 1 expert choice), observed steps, and
# running means (bias not corrected) of the chosen pairs' mean and least affinity and of the measured share of
# outranked pairs (``outranked_share``).
PHASE, STEPS, MEAN_AFFINITY, LEAST_AFFINITY, OUTRANKED = range(5)
STATE_SIZE = 5
TOKEN_CHOICE, EXPERT_CHOICE = 0.0, 1.0
SMOOTHING = 0.9  # each step's weight in the running means is 1 - SMOOTHING: about ten steps' memory


STATE = "affinity_routing"  # the state's buffer name on the module that owns the gate weight
_owners: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()


def owner_key(owner: torch.nn.Module) -> int:
    """The key a graph's ``observe_affinity`` calls find ``owner``'s state by (graphs hold no module)."""
    _owners[id(owner)] = owner
    return id(owner)


@torch.library.custom_op("moe_ascend::observe_affinity", mutates_args=())
def observe_affinity(delta: Tensor, expert_ids: Tensor, owner: int) -> None:
    """Fold one step's affinity of the chosen (token, expert) pairs into the owner's state: its mean and its least.

    The state is the owner's buffer, read at each call (a checkpoint loaded with ``assign=True`` replaces it).
    Only a training step counts: evaluation neither moves the statistics nor brings the switch nearer.
    """
    module = _owners.get(owner)
    if module is None or not module.training:  # the model is gone, or being evaluated
        return
    state = getattr(module, STATE)
    delta = delta.detach()
    chosen = delta.gather(1, expert_ids).to(state.dtype)
    observed = torch.stack([chosen.mean(), chosen.min(), outranked_share(delta, expert_ids[:, 0]).to(state.dtype)])
    with torch.no_grad():
        state[STEPS] += 1
        state[MEAN_AFFINITY:] = SMOOTHING * state[MEAN_AFFINITY:] + (1 - SMOOTHING) * observed


@observe_affinity.register_fake
def _(delta, expert_ids, owner):
    return None


torch.fx.node.has_side_effect(torch.ops.moe_ascend.observe_affinity.default)  # its work is the state, not a value


def outranked_share(delta: Tensor, first_choice: Tensor) -> Tensor:
    """The probability that a token unrelated to an expert outranks a relevant one, measured on one step.

    Relevant to expert i: the tokens whose first choice is i; unrelated: all the others. Over every expert's
    (relevant, unrelated) pairs, the share where the unrelated token's δ is the higher (a Mann–Whitney count
    from the ranks of each expert's column of δ); ½ when no expert has both kinds of token.
    """
    tokens, num_experts = delta.shape
    relevant = torch.nn.functional.one_hot(first_choice, num_experts).to(torch.float64)
    below = delta.argsort(dim=0).argsort(dim=0).to(torch.float64)  # how many tokens have a lower δ for the expert
    count = relevant.sum(dim=0)
    relevant_wins = (below * relevant).sum(dim=0) - count * (count - 1) / 2  # over unrelated tokens only
    pairs = (count * (tokens - count)).sum()
    return torch.where(pairs > 0, 1 - relevant_wins.sum() / pairs.clamp(min=1), torch.tensor(0.5, dtype=torch.float64))


def running_affinity(state: Tensor) -> tuple[float, float, float]:
    """Over the recent steps, bias-corrected: the chosen pairs' (mean, least) affinity and the outranked share
    (``outranked_share``); NaN before any step."""
    steps = float(state[STEPS])
    if steps == 0:
        return float("nan"), float("nan"), float("nan")
    correction = 1 - SMOOTHING ** steps
    return tuple(float(state[slot]) / correction for slot in (MEAN_AFFINITY, LEAST_AFFINITY, OUTRANKED))
