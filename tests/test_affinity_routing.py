"""Affinity routing: the affinity, token choice and expert choice by it, and LocMoE's capacity lower bound."""

import pytest
import torch
import torch.nn.functional as F

import moe_ascend.kernels as ops
from moe_ascend.kernels.affinity import affinity, token_choice
from moe_ascend.passes.affinity_routing import capacity_lower_bound


@pytest.fixture
def router():
    generator = torch.Generator().manual_seed(0)
    tokens, gate = torch.randn(64, 16, generator=generator), torch.randn(8, 16, generator=generator)
    return tokens, gate


def test_affinity_is_the_cosine_in_minus_one_one_and_ignores_the_tokens_scale(router):
    tokens, gate = router
    delta = affinity(tokens, gate)
    explicit = torch.stack([torch.stack([F.cosine_similarity(t, w, dim=0) for w in gate]) for t in tokens])
    torch.testing.assert_close(delta, explicit)
    assert delta.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(affinity(tokens * torch.rand(64, 1) * 50, gate), delta)


def test_token_choice_takes_the_most_affine_experts_weighted_by_the_gates_softmax(router):
    tokens, gate = router
    logits, delta = tokens @ gate.t(), affinity(tokens, gate)
    weights, expert_ids = token_choice(logits, delta, 2, renormalize=True)
    assert torch.equal(expert_ids, delta.topk(2).indices)
    expected = torch.softmax(logits, -1).gather(1, expert_ids)
    torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True))


def test_expert_choice_keeps_each_experts_best_capacity_tokens_among_those_that_chose_it(router):
    tokens, gate = router
    num_experts, capacity = 8, 5
    delta = affinity(tokens, gate)
    _, expert_ids = token_choice(tokens @ gate.t(), delta, 2, renormalize=True)
    chosen = delta.gather(1, expert_ids)
    _, slots = ops.capacity_dispatch(tokens, expert_ids, chosen, num_experts, capacity, "score")
    kept = slots >= 0  # [T, k]: the pairs that got a slot
    for expert in range(num_experts):
        choosers = (expert_ids == expert)
        kept_tokens = (choosers & kept).any(-1).nonzero().flatten()
        assert len(kept_tokens) <= capacity
        # every kept pair is one of the token's choices, and no dropped chooser beats a kept one
        best = chosen[choosers].topk(min(capacity, int(choosers.sum()))).values
        torch.testing.assert_close(chosen[choosers & kept].sort(descending=True).values, best)


@pytest.mark.parametrize("delta, form, expected", [(0.03, "exact", 1.14), (0.05, "exact", 45.7), (0.05, "exp", 10.5)])
def test_capacity_lower_bound_matches_locmoe(delta, form, expected):
    assert capacity_lower_bound(delta, 4096, 16, form=form) == pytest.approx(expected, rel=0.01)


def test_capacity_lower_bound_rejects_what_it_cannot_bound():
    with pytest.raises(ValueError, match="form must be one of"):
        capacity_lower_bound(0.03, 4096, 16, form="approx")
    with pytest.raises(ValueError, match="0 < delta < 1"):
        capacity_lower_bound(1.5, 4096, 16)
