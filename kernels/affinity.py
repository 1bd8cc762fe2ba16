"""Affinity routing (LocMoE+): a token's affinity to an expert is the cosine between the token and the expert's gate
row; LocMoE's capacity bounds, and the routing state the switch to expert choice reads.

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

import math
import weakref

import mpmath
import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from moe_ascend.kernels.routing import _probs


def affinity(tokens: Tensor, gate_weight: Tensor) -> Tensor:
    """``δ [T, E]``: the cosine between each token ``[T, d]`` and each gate row ``[E, d]``."""
    return F.normalize(tokens, dim=-1) @ F.normalize(gate_weight, dim=-1).t()


def token_choice(logits: Tensor, delta: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """``(weights [T, k], expert_ids [T, k])``: the ``k`` experts of highest affinity, weighted by the gate's
    softmax."""
    expert_ids = delta.topk(k, dim=-1).indices
    weights = _probs(logits).gather(1, expert_ids)  # at least fp32, as topk_softmax
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), expert_ids


def grap_gate(d_model: int, num_experts: int, like: Tensor) -> Tensor:
    """LocMoE's GrAP gate as rows ``[E, d]``: expert ``i`` averages the ``i``-th block of ``d / E`` features."""
    torch._check(d_model % num_experts == 0,
                 lambda: f"GrAP needs d ({d_model}) divisible by the experts ({num_experts})")
    block = d_model // num_experts
    return torch.eye(num_experts, dtype=like.dtype, device=like.device).repeat_interleave(block, dim=1) / block


def affinity_top_k(tokens: Tensor, gate_rows: Tensor, logits: Tensor, k: int,
                   renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
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
# The one registry of gates routed by affinity: id(gate weight) → the module holding it and its state. Graphs hold no
# module, so their observe_affinity calls name the gate by this key; the pass finds a recompiled graph's gate here.
_gates: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()


def add_routing_state(gate: torch.nn.Module) -> Tensor:
    """The gate module's ``affinity_routing`` buffer, made (token choice, nothing observed) if it has none.

    Call it on each gate before loading a checkpoint of an affinity-routed model into a fresh one.
    """
    if not hasattr(gate, STATE):
        weight = next(gate.parameters())
        gate.register_buffer(STATE, torch.zeros(STATE_SIZE, dtype=torch.float64, device=weight.device))
    return getattr(gate, STATE)


def register_gate(gate_weight: torch.nn.Parameter, gate: torch.nn.Module) -> int:
    """Record ``gate`` as the holder of ``gate_weight`` (giving it a state): the key its graphs name it by."""
    add_routing_state(gate)
    _gates[id(gate_weight)] = gate
    return id(gate_weight)


def registered_gate(gate_weight: torch.nn.Parameter) -> torch.nn.Module | None:
    """The module recorded as holding ``gate_weight``, if it still does."""
    gate = _gates.get(id(gate_weight))
    return gate if gate is not None and any(p is gate_weight for p in gate.parameters(recurse=False)) else None


# mutates_args=(): the state it writes is no graph's input (the pass reads it while compiling, the phase switch
# after each call), so nothing the graph computes depends on it; has_side_effect below keeps the call.
@torch.library.custom_op("moe_ascend::observe_affinity", mutates_args=())
def observe_affinity(delta: Tensor, expert_ids: Tensor, gate_key: int) -> None:
    """Fold one step's affinity of the chosen (token, expert) pairs into the gate's state: its mean and its least.

    The state is the gate's buffer, read at each call (a checkpoint loaded with ``assign=True`` replaces it).
    Only a training step counts: evaluation neither moves the statistics nor brings the switch nearer.
    """
    gate = _gates.get(gate_key)
    if gate is None or not gate.training:  # the model is gone, or being evaluated
        return
    state = getattr(gate, STATE)
    delta = delta.detach()
    chosen = delta.gather(1, expert_ids).to(state.dtype)
    observed = torch.stack([chosen.mean(), chosen.min(), outranked_share(delta, expert_ids[:, 0]).to(state.dtype)])
    with torch.no_grad():
        state[STEPS] += 1
        state[MEAN_AFFINITY:] = SMOOTHING * state[MEAN_AFFINITY:] + (1 - SMOOTHING) * observed


@observe_affinity.register_fake
def _(delta, expert_ids, gate_key):
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


# --- LocMoE's bounds ----------------------------------------------------------------------------------------------

FORMS = ("exact", "exp")
WARM_UP_STEPS = round(1 / (1 - SMOOTHING))  # the running means' memory: no switch before it is full


def capacity_lower_bound(delta: float, d: int, n: int, form: str = "exact") -> float:
    """LocMoE's lower bound on an expert's capacity, for affinity ``delta``, width ``d`` and ``n`` experts."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not 0 < delta < 1 or d < 2 or n < 1:
        raise ValueError(f"need 0 < delta < 1, d >= 2 and n >= 1; got delta={delta}, d={d}, n={n}")
    if form == "exp":
        return math.exp(d * delta**2 / (2 - delta**2)) / n
    # P(|cos| > δ) for an unrelated token: 1 − I_{δ²}(½, (d−1)/2), computed without cancellation.
    beyond = mpmath.betainc(0.5, (d - 1) / 2, delta**2, 1, regularized=True)
    return float(1 / (n * beyond))


def outrank_probability(delta: float, d: int) -> float:
    """P(an unrelated token's cosine with a gate row exceeds ``delta``): a random direction in ``d`` dimensions."""
    if delta <= 0:
        return 0.5
    return float(mpmath.betainc(0.5, (d - 1) / 2, delta**2, 1, regularized=True)) / 2


def least_affinity(state: Tensor | None) -> float:
    """The chosen pairs' least affinity over the recent steps, where the bound is taken (NaN with no state)."""
    return running_affinity(state)[1] if state is not None else float("nan")


def expert_choice_capacity(tokens: int, width: int, num_experts: int, layer_capacity: int, state: Tensor | None,
                           form: str = "exact") -> int:
    """C for expert choice: LocMoE's bound at the least chosen affinity, at least ceil(T / E), at most the layer's."""
    floor = math.ceil(tokens / num_experts)
    least = least_affinity(state)
    bound = math.ceil(capacity_lower_bound(least, width, num_experts, form)) if 0 < least < 1 else 0
    return min(layer_capacity, max(floor, bound))
