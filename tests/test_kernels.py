"""The MoE ops against naive per-token loops: forward values and gradients, on random shapes (hypothesis)."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import moe_ascend.kernels as ops

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True)


@st.composite
def routing_cases(draw):
    """Shapes and expert choices, including the corner cases the bar names."""
    num_experts = draw(st.integers(1, 6))
    k = draw(st.integers(1, num_experts))
    tokens = draw(st.integers(1, 10))
    mode = draw(st.sampled_from(["random", "one_expert", "skip_expert", "k_equals_e"]))
    if mode == "k_equals_e":
        k = num_experts
    if mode == "one_expert":
        k = 1
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    choices = torch.stack([torch.randperm(num_experts, generator=generator)[:k] for _ in range(tokens)])
    if mode == "one_expert":
        choices.fill_(num_experts - 1)
    if mode == "skip_expert" and num_experts > k:  # expert 0 gets no token
        choices = torch.stack([1 + torch.randperm(num_experts - 1, generator=generator)[:k] for _ in range(tokens)])
    capacity = draw(st.integers(1, tokens * k))
    width = draw(st.integers(1, 5))
    return dict(tokens=tokens, num_experts=num_experts, k=k, choices=choices, capacity=capacity, width=width,
                generator=generator)


def rand(case, *shape, requires_grad=True):
    return torch.randn(*shape, generator=case["generator"], dtype=torch.float64).requires_grad_(requires_grad)


def assert_same(got, want, inputs):
    """Values equal, and gradients of a random projection equal, for every differentiable input."""
    torch.testing.assert_close(got, want)
    probe = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(1))
    grads_got = torch.autograd.grad((got * probe).sum(), inputs, allow_unused=True)
    grads_want = torch.autograd.grad((want * probe).sum(), inputs, allow_unused=True)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(w),
                                   w if w is not None else torch.zeros_like(g))


# --- naive per-token references -------------------------------------------------------------


def naive_topk_softmax(logits, k, renormalize):
    weights, ids = [], []
    for row in logits:
        probs = torch.softmax(row, dim=-1)
        chosen = sorted(range(len(row)), key=lambda e: (-probs[e].item(), e))[:k]
        w = probs[chosen]
        weights.append(w / w.sum() if renormalize else w)
        ids.append(chosen)
    return torch.stack(weights), torch.tensor(ids)


def naive_topk_sigmoid(logits, k, bias, groups, top_groups, group_top, renormalize, scale):
    """DeepSeek-V3's router, token by token: the best groups by their best choices, then the top k inside them."""
    weights, ids = [], []
    per_group = logits.shape[1] // groups
    for row in logits:
        scores = torch.sigmoid(row)
        choice = scores + bias if bias is not None else scores
        group_score = [sum(sorted(choice[g * per_group:(g + 1) * per_group].tolist(), reverse=True)[:group_top])
                       for g in range(groups)]
        kept = sorted(range(groups), key=lambda g: (-group_score[g], g))[:top_groups]
        allowed = [e for e in range(len(row)) if e // per_group in kept]
        chosen = sorted(allowed, key=lambda e: (-choice[e].item(), e))[:k]
        w = scores[chosen]
        weights.append((w / w.sum() if renormalize else w) * scale)
        ids.append(chosen)
    return torch.stack(weights), torch.tensor(ids)


def naive_slots(choices, scores, num_experts, capacity, policy):
    tokens, k = choices.shape
    pairs = [(j, t) for j in range(k) for t in range(tokens)]
    if policy == "score":
        pairs.sort(key=lambda p: (-scores[p[1], p[0]].item(), p[0], p[1]))
    used = [0] * num_experts
    slots = torch.full((tokens, k), -1, dtype=torch.long)
    for j, t in pairs:
        e = int(choices[t, j])
        if used[e] < capacity:
            slots[t, j] = e * capacity + used[e]
            used[e] += 1
    return slots


def naive_dispatch(tokens, slots, num_experts, capacity):
    rows = [torch.zeros(tokens.shape[1], dtype=tokens.dtype) for _ in range(num_experts * capacity)]
    for t in range(slots.shape[0]):
        for j in range(slots.shape[1]):
            if slots[t, j] >= 0:
                rows[slots[t, j]] = tokens[t]
    return torch.stack(rows).reshape(num_experts, capacity, -1)


def naive_combine(buffer, slots, weights):
    flat = buffer.reshape(-1, buffer.shape[-1])
    out = []
    for t in range(slots.shape[0]):
        acc = torch.zeros(buffer.shape[-1], dtype=buffer.dtype)
        for j in range(slots.shape[1]):
            if slots[t, j] >= 0:
                acc = acc + weights[t, j] * flat[slots[t, j]]
        out.append(acc)
    return torch.stack(out)


def naive_row_order(choices, num_experts):
    return [(t, j) for e in range(num_experts) for t in range(choices.shape[0]) for j in range(choices.shape[1])
            if choices[t, j] == e]


# --- properties -----------------------------------------------------------------------------


@PROPERTY
@given(case=routing_cases(), renormalize=st.booleans(), ties=st.booleans())
@example(case=dict(tokens=3, num_experts=4, k=4, choices=None, capacity=1, width=1,
                   generator=torch.Generator().manual_seed(0)),
         renormalize=True, ties=True)
def test_topk_softmax(case, renormalize, ties):
    logits = rand(case, case["tokens"], case["num_experts"], requires_grad=False)
    if ties:
        logits = logits.round()  # equal logits: ties go to the lower expert id
    logits.requires_grad_(True)
    weights, ids = ops.topk_softmax(logits, case["k"], renormalize)
    want_weights, want_ids = naive_topk_softmax(logits, case["k"], renormalize)
    assert torch.equal(ids, want_ids)
    assert_same(weights, want_weights, [logits])


@st.composite
def sigmoid_routers(draw):
    """DeepSeek-V3 router settings: groups dividing the experts, a top-k that fits in the kept groups."""
    groups, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    top_groups = draw(st.integers(1, groups))
    return dict(tokens=draw(st.integers(1, 8)), num_experts=groups * per_group, groups=groups, top_groups=top_groups,
                group_top=draw(st.integers(1, per_group)), k=draw(st.integers(1, top_groups * per_group)),
                generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))))


@PROPERTY
@given(case=sigmoid_routers(), biased=st.booleans(), renormalize=st.booleans(), ties=st.booleans(),
       scale=st.sampled_from([1.0, 2.5]))
def test_topk_sigmoid(case, biased, renormalize, ties, scale):
    logits = rand(case, case["tokens"], case["num_experts"], requires_grad=False)
    if ties:
        logits = logits.round()  # equal scores: ties go to the lower group and expert id
    logits.requires_grad_(True)
    bias = rand(case, case["num_experts"], requires_grad=False).round() / 4 if biased else None
    settings = (case["k"], bias, case["groups"], case["top_groups"], case["group_top"], renormalize, scale)
    weights, ids = ops.topk_sigmoid(logits, *settings)
    want_weights, want_ids = naive_topk_sigmoid(logits, *settings)
    assert torch.equal(ids, want_ids)
    assert_same(weights, want_weights, [logits])


def test_topk_sigmoid_says_what_does_not_fit():
    with pytest.raises(RuntimeError, match="top-3 does not fit in 1 group"):
        ops.topk_sigmoid(torch.randn(4, 4), 3, None, 2, 1, 1, True, 1.0)
    with pytest.raises(RuntimeError, match="6 experts do not split into 4 equal groups"):
        ops.topk_sigmoid(torch.randn(4, 6), 2, None, 4, 2, 1, True, 1.0)


@PROPERTY
@given(case=routing_cases(), policy=st.sampled_from(["position", "score"]))
def test_capacity_dispatch(case, policy):
    tokens = rand(case, case["tokens"], case["width"])
    scores = rand(case, case["tokens"], case["k"], requires_grad=False)
    dispatched, slots = ops.capacity_dispatch(tokens, case["choices"], scores, case["num_experts"], case["capacity"],
                                              policy)
    want_slots = naive_slots(case["choices"], scores, case["num_experts"], case["capacity"], policy)
    assert torch.equal(slots, want_slots)
    assert torch.equal(ops.capacity_slots(case["choices"], scores, case["num_experts"], case["capacity"], policy),
                       want_slots)
    kept_per_expert = torch.bincount(slots[slots >= 0] // case["capacity"], minlength=case["num_experts"])
    assert int(kept_per_expert.max()) <= case["capacity"]
    assert_same(dispatched, naive_dispatch(tokens, want_slots, case["num_experts"], case["capacity"]), [tokens])


@PROPERTY
@given(case=routing_cases(), policy=st.sampled_from(["position", "score"]))
def test_capacity_combine(case, policy):
    scores = rand(case, case["tokens"], case["k"], requires_grad=False)
    slots = naive_slots(case["choices"], scores, case["num_experts"], case["capacity"], policy)
    buffer = rand(case, case["num_experts"], case["capacity"], case["width"])
    weights = rand(case, case["tokens"], case["k"])
    assert_same(ops.capacity_combine(buffer, slots, weights), naive_combine(buffer, slots, weights), [buffer, weights])


@PROPERTY
@given(case=routing_cases())
def test_permute(case):
    tokens = rand(case, case["tokens"], case["width"])
    rows, counts, row_map = ops.permute(tokens, case["choices"], case["num_experts"])
    order = naive_row_order(case["choices"], case["num_experts"])
    assert row_map.tolist() == [t * case["k"] + j for t, j in order]
    assert counts.tolist() == [int((case["choices"] == e).sum()) for e in range(case["num_experts"])]
    assert_same(rows, torch.stack([tokens[t] for t, _ in order]), [tokens])


@PROPERTY
@given(case=routing_cases())
def test_unpermute(case):
    _, _, row_map = ops.permute(torch.zeros(case["tokens"], 1), case["choices"], case["num_experts"])
    rows = rand(case, case["tokens"] * case["k"], case["width"])
    weights = rand(case, case["tokens"], case["k"])
    position = {pair: i for i, pair in enumerate(naive_row_order(case["choices"], case["num_experts"]))}
    want = torch.stack([
        sum(weights[t, j] * rows[position[(t, j)]] for j in range(case["k"])) for t in range(case["tokens"])
    ])
    assert_same(ops.unpermute(rows, row_map, weights), want, [rows, weights])


@PROPERTY
@given(case=routing_cases(), out_width=st.integers(1, 4))
def test_grouped_mm_batched(case, out_width):
    x = rand(case, case["num_experts"], case["capacity"], case["width"])
    w = rand(case, case["num_experts"], case["width"], out_width)
    want = torch.stack([torch.stack([x[e, c] @ w[e] for c in range(x.shape[1])]) for e in range(x.shape[0])])
    assert_same(ops.grouped_mm_batched(x, w), want, [x, w])


@PROPERTY
@given(case=routing_cases(), out_width=st.integers(1, 4), blocks=st.integers(1, 3))
def test_grouped_mm_filled(case, out_width, blocks):
    # One block per source rank; on one rank (blocks = 1) the fill the capacity dispatch leaves.
    capacity = case["capacity"]
    if blocks == 1:
        filled = ops.capacity.filled_slots(case["choices"], case["num_experts"], capacity)
    else:
        filled = torch.randint(0, capacity + 1, (case["num_experts"], blocks), generator=case["generator"])
    x = rand(case, case["num_experts"], blocks * capacity, case["width"])
    w = rand(case, case["num_experts"], case["width"], out_width)
    used = lambda e, slot: slot % capacity < filled[e, slot // capacity]  # noqa: E731
    want = torch.stack([torch.stack([x[e, s] @ w[e] * used(e, s) for s in range(x.shape[1])])
                        for e in range(x.shape[0])])
    assert_same(ops.grouped_mm_filled(x, w, filled), want, [x, w])


@PROPERTY
@given(case=routing_cases(), out_width=st.integers(1, 4))
def test_grouped_mm(case, out_width):
    counts = torch.bincount(case["choices"].reshape(-1), minlength=case["num_experts"])
    x = rand(case, int(counts.sum()), case["width"])
    w = rand(case, case["num_experts"], case["width"], out_width)
    expert_of_row = torch.repeat_interleave(torch.arange(case["num_experts"]), counts)
    want = torch.stack([x[i] @ w[expert_of_row[i]] for i in range(x.shape[0])])
    assert_same(ops.grouped_mm(x, w, counts), want, [x, w])


# --- registrations: schema, fake implementation, autograd, compile ----------------------------


def opcheck_cases():
    g = torch.Generator().manual_seed(0)
    tokens, logits = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    weights, ids = ops.topk_softmax(logits, 2, True)
    dispatched, slots = ops.capacity_dispatch(tokens, ids, weights, 3, 3, "score")
    rows, counts, row_map = ops.permute(tokens, ids, 3)
    req = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    return [
        (torch.ops.moe_ascend.topk_softmax, (req(logits), 2, True)),
        (torch.ops.moe_ascend.topk_sigmoid, (req(logits), 2, torch.randn(3, generator=g), 1, 1, 1, True, 2.5)),
        (torch.ops.moe_ascend.capacity_dispatch, (req(tokens), ids, weights.detach(), 3, 3, "position")),
        (torch.ops.moe_ascend.capacity_slots, (ids, weights.detach(), 3, 3, "score")),
        (torch.ops.moe_ascend.capacity_combine, (req(dispatched), slots, req(weights))),
        (torch.ops.moe_ascend.permute, (req(tokens), ids, 3)),
        (torch.ops.moe_ascend.unpermute, (req(rows), row_map, req(weights))),
        (torch.ops.moe_ascend.grouped_mm_batched, (req(dispatched), req(torch.randn(3, 4, 5, generator=g)))),
        (torch.ops.moe_ascend.grouped_mm_filled, (req(dispatched), req(torch.randn(3, 4, 5, generator=g)),
                                                  ops.capacity.filled_slots(ids, 3, 3))),
        (torch.ops.moe_ascend.grouped_mm, (req(rows), req(torch.randn(3, 4, 5, generator=g)), counts)),
    ]


@pytest.mark.parametrize("op, args", opcheck_cases(), ids=lambda v: getattr(v, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_bad_arguments_say_what_to_change():
    with pytest.raises(RuntimeError, match=r"1 <= k <= experts \(3\), got k=4"):
        ops.topk_softmax(torch.randn(2, 3), 4, False)
    with pytest.raises(RuntimeError, match="drop_policy must be one of"):
        ops.capacity_dispatch(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 2, 1, "random")
    with pytest.raises(RuntimeError, match=r"expert ids must lie in \[0, 2\)"):
        ops.capacity_dispatch(torch.randn(2, 3), torch.full((2, 1), 5), torch.ones(2, 1), 2, 1, "position")
