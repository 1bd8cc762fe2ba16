"""Affinity routing: the affinity, token choice and expert choice by it, and LocMoE's capacity lower bound."""

import logging
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from graphs import code_lines

import moe_ascend.kernels as ops
from moe_ascend.kernels import affinity as kernels
from moe_ascend.kernels.affinity import affinity, affinity_top_k, token_choice
from moe_ascend.passes import PassResult
from moe_ascend.kernels.affinity import capacity_lower_bound
from moe_ascend.runtime import add_routing_state
from moe_ascend.runtime import MoELayer


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


# --- the pass ------------------------------------------------------------------------------------------------

def routed(temporary_passes, layer, x, phase, steps=1, **options):
    """Compile ``layer`` with affinity routing in ``phase``; run ``steps`` training steps; the code after the pass."""
    seen = {}

    @temporary_passes(name="probe", stage="pre_grad", after=("affinity_routing", "chunk_for_overlap"),
                      before=("skip_empty_slots",), roles=("dynamo",))
    def probe(gm, ctx):
        gate_named = (r"observe_affinity\.default\((.*), \d+\)", r"observe_affinity.default(\1, GATE)")
        seen.setdefault("lines", [re.sub(*gate_named, line) for line in code_lines(gm) if not line.startswith("l_")])
        return PassResult(gm, False)

    compiled = torch.compile(layer, backend="moe_ascend",
                             options={"target": "eager", "routing": "affinity", "routing_options": {"phase": phase},
                                      **options})
    for _ in range(steps):
        out = compiled(x)
        out.backward(torch.ones_like(out))
    return seen["lines"], compiled


def small_layer(**kwargs):
    torch.manual_seed(0)
    return MoELayer(8, 16, 4, 2, capacity_factor=1.0, **kwargs).double()


def test_token_choice_routes_by_affinity_and_observes_it(temporary_passes):
    lines, _ = routed(temporary_passes, small_layer(), torch.randn(12, 8, dtype=torch.float64), "auto")
    router = lines[:lines.index("dispatched = capacity_dispatch_default[0]")]
    assert router == [
        "tokens = l_x_.reshape(-1, 8)",
        "logits = torch._C._nn.linear(tokens, l_self_modules_gate_parameters_weight_, None)",
        "affinity_routing = moe_ascend_kernels_affinity_affinity_top_k(tokens, l_self_modules_gate_parameters_weight_, "
        "logits, 2, True)",
        "delta = affinity_routing[2]",
        "weights = affinity_routing[0]",
        "expert_ids = affinity_routing[1]",
        "observe_affinity_default = torch.ops.moe_ascend.observe_affinity.default(delta, expert_ids, GATE)",
        "capacity_dispatch_default = torch.ops.moe_ascend.capacity_dispatch.default(tokens, expert_ids, weights, 4, 6, "
        "'position')",
    ]


def test_expert_choice_keeps_each_experts_best_tokens_in_a_smaller_buffer(temporary_passes, fake_two_ranks):
    layer = small_layer(ep_group=dist.group.WORLD)
    lines, _ = routed(temporary_passes, layer, torch.randn(12, 8, dtype=torch.float64), "expert_choice")
    assert "chosen_affinity = delta.gather(1, expert_ids)" in lines
    # 12 tokens, 4 experts: C = max(ceil(12 / 4), bound) = 3 slots instead of the layer's 6; the flat exchange is
    # built anew for the smaller buffer
    assert ("capacity_dispatch_default = torch.ops.moe_ascend.capacity_dispatch.default(tokens, expert_ids, "
            "chosen_affinity, 4, 3, 'score')") in lines
    assert "expert_in = moe_ascend_kernels_exchange_to_experts(dispatched, '0', 2)" in lines
    assert "returned = moe_ascend_kernels_exchange_from_experts(expert_out, '0', 2)" in lines
    assert not any("all_to_all_single" in line for line in lines)


def eager_affinity(layer, x, capacity=None):
    """The same routing written out in eager: token choice by δ, and expert choice in ``capacity`` slots if given."""
    weights, ids, delta = affinity_top_k(x, layer.gate.weight, layer.gate(x), layer.top_k, layer.renormalize)
    if capacity is None:
        dispatched, slots = ops.capacity_dispatch(x, ids, weights, layer.num_experts, layer.capacity(x.shape[0]),
                                                  "position")
    else:
        dispatched, slots = ops.capacity_dispatch(x, ids, delta.gather(1, ids), layer.num_experts, capacity, "score")
    return ops.capacity_combine(layer._experts_batched(dispatched), slots, weights)


def gradients(layer, forward, x):
    x = x.detach().requires_grad_()
    out = forward(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    grads = [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("phase, capacity", [("token_choice", None), ("expert_choice", 3)])
def test_compiled_equals_the_routing_written_in_eager_forward_and_backward(temporary_passes, phase, capacity):
    layer, x = small_layer(), torch.randn(12, 8, dtype=torch.float64)
    expected = gradients(layer, lambda t: eager_affinity(layer, t, capacity), x)
    _, compiled = routed(temporary_passes, layer, x, phase)
    layer.zero_grad(set_to_none=True)
    got = gradients(layer, compiled, x)
    for name, a, b in zip(["out", "x"] + [n for n, _ in layer.named_parameters()], expected, got, strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_the_switch_comes_from_the_observed_affinity_and_recompiles_once(temporary_passes, caplog):
    caplog.set_level(logging.INFO, logger="moe_ascend")
    layer, x = small_layer(), torch.randn(12, 8, dtype=torch.float64)
    _, compiled = routed(temporary_passes, layer, x, "auto", steps=3)
    state = layer.gate.affinity_routing
    assert state[kernels.STEPS] == 3 and state[kernels.PHASE] == kernels.TOKEN_CHOICE  # a random gate: not settled
    # What training would bring: 20 steps in which an unrelated token outranked a relevant one with probability
    # q = 0.01: 2·T·q = 2·12·0.01 is well within expert choice's C = 3 slots.
    state.copy_(torch.tensor([0, 20, *(v * (1 - 0.9**20) for v in (0.9, 0.5, 0.01))], dtype=torch.float64))
    for _ in range(4):
        compiled(x).sum().backward()
    assert state[kernels.PHASE] == kernels.EXPERT_CHOICE
    assert "affinity routing switches to expert choice after 21 steps" in caplog.text
    assert caplog.text.count("routes by expert choice") == 1  # one recompile
    # both forms of LocMoE's bound (d = 8, 4 experts) are under one slot here: the floor ceil(12 / 4) wins
    least, exact, exp = map(float, re.search(r"3 slots per expert \(LocMoE's bound at the least chosen affinity "
                                             r"([\d.]+): exact ([\d.]+), exp ([\d.]+); floor ceil\(T/E\) = 3, "
                                             r"the layer's own 6\)", caplog.text).groups())
    assert exact == pytest.approx(capacity_lower_bound(least, 8, 4), rel=2e-3)
    assert exp == pytest.approx(capacity_lower_bound(least, 8, 4, form="exp"), rel=2e-3)
    assert layer.state_dict()["gate.affinity_routing"][kernels.PHASE] == kernels.EXPERT_CHOICE  # checkpointed


def test_the_switch_waits_while_unrelated_tokens_often_outrank_relevant_ones(temporary_passes):
    layer, x = small_layer(), torch.randn(12, 8, dtype=torch.float64)
    _, compiled = routed(temporary_passes, layer, x, "auto", steps=1)
    state = layer.gate.affinity_routing
    # high affinity, as before, but q = 0.2: 2·12·0.2 = 4.8 tokens would outrank, more than C = 3 slots
    state.copy_(torch.tensor([0, 20, *(v * (1 - 0.9**20) for v in (0.9, 0.5, 0.2))], dtype=torch.float64))
    compiled(x).sum().backward()
    assert state[kernels.PHASE] == kernels.TOKEN_CHOICE


def test_evaluation_leaves_the_routing_state_as_training_left_it(temporary_passes):
    layer, x = small_layer(), torch.randn(12, 8, dtype=torch.float64)
    _, compiled = routed(temporary_passes, layer, x, "auto", steps=2)
    trained = layer.gate.affinity_routing.clone()
    layer.eval()
    with torch.no_grad():
        compiled(x)
        compiled(x)
    assert torch.equal(layer.gate.affinity_routing, trained)
    layer.train()
    compiled(x).sum().backward()
    assert layer.gate.affinity_routing[kernels.STEPS] == 3


def test_two_layers_of_one_graph_switch_together_under_their_own_names(temporary_passes):
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoELayer(8, 16, 4, 2, capacity_factor=1.0), MoELayer(8, 16, 4, 2, capacity_factor=1.0))
    x = torch.randn(12, 8)
    lines, _ = routed(temporary_passes, model, x, "expert_choice")
    assert sum(line.startswith("chosen_affinity") for line in lines) == 2


def test_the_outranked_share_counts_unrelated_tokens_above_relevant_ones():
    generator = torch.Generator().manual_seed(0)
    delta = torch.rand(40, 5, generator=generator, dtype=torch.float64) * 2 - 1
    first = delta.argmax(dim=1)
    above = pairs = 0
    for expert in range(5):
        relevant, unrelated = delta[first == expert, expert], delta[first != expert, expert]
        above += int((unrelated[:, None] > relevant[None, :]).sum())
        pairs += relevant.numel() * unrelated.numel()
    assert float(kernels.outranked_share(delta, first)) == pytest.approx(above / pairs)
    # relevant tokens on top of every column: never outranked; below every unrelated one: always
    separated = torch.eye(4, dtype=torch.float64).repeat(3, 1)
    assert float(kernels.outranked_share(separated, separated.argmax(1))) == 0.0
    assert float(kernels.outranked_share(-separated, separated.argmax(1))) == 1.0


def test_a_checkpoint_in_expert_choice_compiles_straight_to_it(temporary_passes, caplog):
    caplog.set_level(logging.INFO, logger="moe_ascend")
    trained = small_layer()
    add_routing_state(trained.gate)[kernels.PHASE] = kernels.EXPERT_CHOICE
    fresh = small_layer()
    add_routing_state(fresh.gate)  # before loading: the fresh model has no state buffer yet
    fresh.load_state_dict(trained.state_dict())
    routed(temporary_passes, fresh, torch.randn(12, 8, dtype=torch.float64), "auto", steps=2)
    assert caplog.text.count("routes by expert choice") == 1


def test_a_sigmoid_router_keeps_its_choice_and_says_why(caplog):
    layer = MoELayer(8, 16, 4, 2, capacity_factor=1.0, score="sigmoid")
    x = torch.randn(12, 8)
    out = torch.compile(layer, backend="moe_ascend", options={"target": "eager", "routing": "affinity"})(x)
    assert ("MoE layer 0 keeps its router (routing='affinity'): affinity routing needs a softmax router, this one is "
            "sigmoid") in caplog.text
    torch.testing.assert_close(out, layer(x))
