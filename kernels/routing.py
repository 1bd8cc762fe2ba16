"""The two router ops: the top k experts of each token, and their weights.

``moe_ascend::topk_softmax``: softmax over expert logits, the top k, optionally
renormalised (Mixtral, Qwen, OLMoE, ...).

``moe_ascend::topk_sigmoid``: DeepSeek-V3's router (also Kimi K2, GLM-4.5)::

    scores  = sigmoid(logits)
    choice  = scores + bias                       # the bias steers the choice only
    groups  → keep each token's best top_groups of them (a group's score: the sum of its group_top best choices)
    ids     = top-k of choice among the kept groups' experts
    weights = scale · scores[ids] / (Σ scores[ids] + 1e-20  if renormalize)

the form of torch_npu's MoeGatingTopK. Ties go to the lower expert (and group)
id (a stable descending sort), so every device and the naive per-token loop
choose the same experts.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc
from torch import Tensor

from moe_ascend.kernels.indexing import expert_counts, stable_order


@torch.library.custom_op("moe_ascend::topk_softmax", mutates_args=())
def topk_softmax(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """``logits [T, E]`` → ``(weights [T, k], expert_ids [T, k])``, weights in ``logits.dtype``."""
    return top_k_of_softmax(logits, k, renormalize)


def top_k_of_softmax(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """What ``topk_softmax`` computes, in plain torch ops (the reference, and its form on Ascend's graph engine)."""
    _check_logits(logits, k)
    probs = _probs(logits)
    weights, expert_ids = _top_k(probs, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), expert_ids


@topk_softmax.register_fake
def _(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    _check_logits(logits, k)
    shape = (logits.shape[0], k)
    return logits.new_empty(shape), logits.new_empty(shape, dtype=torch.long)


def _probs(logits: Tensor) -> Tensor:
    """Softmax in at least fp32: bf16/fp16 logits would otherwise tie and flip choices."""
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def _top_k(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    order = stable_order(probs, descending=True)[:, :k].contiguous()
    return probs.gather(-1, order), order


@torch.library.custom_op("moe_ascend::topk_sigmoid", mutates_args=())
def topk_sigmoid(logits: Tensor, k: int, bias: Tensor | None, groups: int, top_groups: int, group_top: int,
                 renormalize: bool, scale: float) -> tuple[Tensor, Tensor]:
    """``logits [T, E]``, ``bias [E]`` or None → ``(weights [T, k], expert_ids [T, k])`` in ``logits.dtype``."""
    return top_k_of_sigmoid(logits, k, bias, groups, top_groups, group_top, renormalize, scale)


def top_k_of_sigmoid(logits: Tensor, k: int, bias: Tensor | None, groups: int, top_groups: int, group_top: int,
                     renormalize: bool, scale: float) -> tuple[Tensor, Tensor]:
    """What ``topk_sigmoid`` computes, in plain torch ops."""
    _check_sigmoid_router(logits, k, groups, top_groups, group_top)
    scores = _sigmoid(logits)
    choice = scores if bias is None else scores + bias.to(scores.dtype)
    _, expert_ids = _top_k(within_best_groups(choice, groups, top_groups, group_top), k)
    weights = scores.gather(1, expert_ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORMALIZE_EPS)
    return (weights * scale).to(logits.dtype), expert_ids


def within_best_groups(choice: Tensor, groups: int, top_groups: int, group_top: int) -> Tensor:
    """``choice [T, E]`` with every expert outside the token's ``top_groups`` best groups at -inf. Experts are
    numbered group-major (expert e in group ``e // (E / groups)``); a group scores the sum of its ``group_top``
    best choices."""
    if top_groups >= groups:
        return choice
    tokens, num_experts = choice.shape
    best = _top_k(choice.reshape(tokens * groups, num_experts // groups), group_top)[0]
    _, kept = _top_k(best.reshape(tokens, groups, group_top).sum(-1), top_groups)
    allowed = torch.zeros(tokens, groups, dtype=torch.bool, device=choice.device).scatter(1, kept, True)
    return choice.masked_fill(~allowed.repeat_interleave(num_experts // groups, dim=1), float("-inf"))


@topk_sigmoid.register_fake
def _(logits: Tensor, k: int, bias: Tensor | None, groups: int, top_groups: int, group_top: int, renormalize: bool,
      scale: float) -> tuple[Tensor, Tensor]:
    _check_sigmoid_router(logits, k, groups, top_groups, group_top)
    shape = (logits.shape[0], k)
    return logits.new_empty(shape), logits.new_empty(shape, dtype=torch.long)


RENORMALIZE_EPS = 1e-20  # DeepSeek-V3's and MoeGatingTopK's: below fp32 resolution of any sum of sigmoids


def _sigmoid(logits: Tensor) -> Tensor:
    """Sigmoid in at least fp32, as ``_probs`` (no ``.to`` of fp32 logits: it would alias them)."""
    return torch.sigmoid(logits if logits.dtype in (torch.float32, torch.float64) else logits.float())


def nudged_bias(bias: Tensor, expert_ids: Tensor, rate: float, group: str | None = None) -> Tensor:
    """DeepSeek-V3's aux-loss-free balancing: each expert's selection bias moves by ``rate`` towards an even load,
    down where the expert took more (token, choice) pairs than the mean, up where it took fewer. ``group``: the
    process group whose ranks' loads count together (their biases then stay equal)."""
    load = expert_counts(expert_ids, bias.shape[0]).to(bias.dtype)
    if group is not None:
        load = fc.all_reduce(load, "sum", group)  # waited for at its first use
    return bias + rate * torch.sign(load.mean() - load)


def load_balancing_loss(logits: Tensor, expert_ids: Tensor, score: str = "softmax") -> Tensor:
    """Switch Transformer's balance loss ``E · Σ_i f_i · P_i``: ``f_i`` the share of (token, choice) pairs routed to
    expert i (no gradient), ``P_i`` the mean router probability of i (for a sigmoid router its scores normalised
    per token, as DeepSeek-V3's balance loss takes them). It is 1 when routing is uniform, E when one expert takes
    everything; its gradient moves probability away from the experts that take more than their share."""
    num_experts = logits.shape[-1]
    pairs = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    pairs = pairs.index_add(0, expert_ids.flatten(), torch.ones(expert_ids.numel(), device=logits.device))
    if score == "sigmoid":
        scores = _sigmoid(logits)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    else:
        probs = _probs(logits)
    return num_experts * (pairs / expert_ids.numel() * probs.mean(dim=0)).sum()


def _check_logits(logits: Tensor, k: int) -> None:
    torch._check(logits.dim() == 2, lambda: f"topk_softmax takes logits [tokens, experts], got {logits.dim()} dims")
    torch._check(1 <= k <= logits.shape[1], lambda: f"top-k needs 1 <= k <= experts ({logits.shape[1]}), got k={k}")


def _check_sigmoid_router(logits: Tensor, k: int, groups: int, top_groups: int, group_top: int) -> None:
    num_experts = logits.shape[1]
    torch._check(logits.dim() == 2, lambda: f"topk_sigmoid takes logits [tokens, experts], got {logits.dim()} dims")
    torch._check(groups >= 1 and num_experts % groups == 0,
                 lambda: f"{num_experts} experts do not split into {groups} equal groups")
    torch._check(1 <= top_groups <= groups and 1 <= group_top <= num_experts // groups,
                 lambda: f"keep 1..{groups} groups scored by 1..{num_experts // groups} experts each, "
                         f"got top_groups={top_groups}, group_top={group_top}")
    torch._check(1 <= k <= min(top_groups, groups) * (num_experts // groups),
                 lambda: f"top-{k} does not fit in {top_groups} group(s) of {num_experts // groups} experts")


def _chosen_grad(grad: Tensor, chosen: Tensor, renormalize: bool, eps: float = 0.0) -> Tensor:
    """∂L/∂(chosen score) from ∂L/∂weight. Renormalised, w_i = p_i / S  ⇒  ∂L/∂p_i = (g_i − Σ_j g_j w_j) / S."""
    if not renormalize:
        return grad
    total = chosen.sum(dim=-1, keepdim=True) + eps
    return (grad - (grad * chosen / total).sum(dim=-1, keepdim=True)) / total


def _setup(ctx, inputs, output) -> None:
    logits, k, renormalize = inputs
    _, expert_ids = output
    ctx.renormalize = renormalize
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(_probs(logits), expert_ids)


def _backward(ctx, grad_weights: Tensor, _grad_ids: Tensor):
    probs, expert_ids = ctx.saved_tensors
    grad = _chosen_grad(grad_weights.to(probs.dtype), probs.gather(-1, expert_ids), ctx.renormalize)
    grad_probs = torch.zeros_like(probs).scatter_add(-1, expert_ids, grad)
    grad_logits = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
    return grad_logits.to(ctx.logits_dtype), None, None


topk_softmax.register_autograd(_backward, setup_context=_setup)


def _setup_sigmoid(ctx, inputs, output) -> None:
    logits, _, _, _, _, _, renormalize, scale = inputs
    _, expert_ids = output
    ctx.renormalize, ctx.scale, ctx.logits_dtype = renormalize, scale, logits.dtype
    ctx.save_for_backward(_sigmoid(logits), expert_ids)


def _backward_sigmoid(ctx, grad_weights: Tensor, _grad_ids: Tensor):
    """The choice carries no gradient (nor does the bias, which only steers it); the weights are the chosen
    sigmoids, renormalised and scaled."""
    scores, expert_ids = ctx.saved_tensors
    grad = _chosen_grad(grad_weights.to(scores.dtype) * ctx.scale, scores.gather(-1, expert_ids), ctx.renormalize,
                        RENORMALIZE_EPS)
    grad_scores = torch.zeros_like(scores).scatter_add(-1, expert_ids, grad)
    return (grad_scores * scores * (1 - scores)).to(ctx.logits_dtype), None, None, None, None, None, None, None


topk_sigmoid.register_autograd(_backward_sigmoid, setup_context=_setup_sigmoid)
