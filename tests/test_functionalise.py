"""functionalise: an in-place op on a tensor only the graph made and nothing else holds becomes the functional op,
and whatever read the tensor after it reads its result."""

import torch
from checks import assert_matches_eager
from graphs import code_lines, context, dynamo_graph

from moe_ascend.passes.functionalise import functionalise


def experts_with_bias(x, w, b, weights):
    out = x @ w
    out.add_(b)  # as transformers' grouped experts add their biases
    gate, up = out[..., ::2], out[..., 1::2]
    return gate * up * weights


def test_golden_the_write_becomes_a_value_its_readers_read():
    gm = dynamo_graph(experts_with_bias, torch.randn(6, 4), torch.randn(4, 8), torch.randn(8), torch.randn(6, 1))
    result = functionalise(gm, context())
    result.gm.recompile()
    assert result.modified
    assert code_lines(result.gm) == [
        "l_x_ = L_x_",
        "l_w_ = L_w_",
        "l_b_ = L_b_",
        "l_weights_ = L_weights_",
        "out = l_x_ @ l_w_",
        "add_ = out.add(l_b_)",
        "gate = add_[(Ellipsis, slice(None, None, 2))]",
        "up = add_[(Ellipsis, slice(1, None, 2))]",
        "mul = gate * up",
        "mul_1 = mul * l_weights_",
    ]


def batched_experts_with_bias(x, w, b):
    out = torch.bmm(x.unsqueeze(1), w).squeeze(1)  # a view of the product, which nothing else reads
    out.add_(b)
    return out * 2


def test_golden_a_write_through_the_only_view_of_a_product_becomes_a_value():
    gm = dynamo_graph(batched_experts_with_bias, torch.randn(6, 4), torch.randn(6, 4, 8), torch.randn(6, 8))
    result = functionalise(gm, context())
    result.gm.recompile()
    assert result.modified
    assert code_lines(result.gm)[-4:] == [
        "bmm = torch.bmm(unsqueeze, l_w_)", "out = bmm.squeeze(1)", "add_ = out.add(l_b_)", "mul = add_ * 2",
    ]


def written_input(x, b):
    x.add_(b)  # the caller sees this write
    return x * 2


def written_after_a_view(x, w, b):
    out = x @ w
    first = out[:, :2]  # sees the write
    out.add_(b)
    return first * 2


def written_with_a_wider_type(x, w):
    out = x @ w
    out.mul_(torch.full((8,), 2.0, dtype=torch.float64))  # in place stays float32; mul would give float64
    return out


def test_writes_whose_effect_reaches_further_stay_in_place():
    for fn, inputs in [(written_input, (torch.randn(6, 8), torch.randn(8))),
                       (written_after_a_view, (torch.randn(6, 4), torch.randn(4, 8), torch.randn(8))),
                       (written_with_a_wider_type, (torch.randn(6, 4), torch.randn(4, 8)))]:
        gm = dynamo_graph(fn, *inputs)
        assert not functionalise(gm, context()).modified, fn.__name__


class BiasedExperts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 8))
        self.b = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return experts_with_bias(x, self.w, self.b, torch.linspace(0, 1, x.shape[0]).unsqueeze(-1))


def test_numerics_forward_and_backward_equal_eager():
    torch.manual_seed(0)
    assert_matches_eager(BiasedExperts(), (torch.randn(6, 4, requires_grad=True),), {"target": "eager"}, tol=1e-6)
