"""normalise: method and torch.nn.functional spellings become the torch.* function."""

import torch
import torch.nn.functional as F
from checks import assert_matches_eager
from graphs import code_lines, context, dynamo_graph

from moe_ascend.passes.normalise import normalise


def router(x, w):
    probs = (x @ w).softmax(dim=-1)
    values, _ = probs.topk(2, dim=-1)
    return F.softmax(values, dim=-1).sum(-1)


def test_golden_one_spelling_per_op():
    gm = dynamo_graph(router, torch.randn(6, 4), torch.randn(4, 3))
    result = normalise(gm, context())
    result.gm.recompile()
    assert result.modified
    assert code_lines(result.gm) == [
        "l_x_ = L_x_",
        "l_w_ = L_w_",
        "matmul = l_x_ @ l_w_",
        "probs = torch.softmax(matmul, dim = -1)",
        "topk = torch.topk(probs, 2, dim = -1)",
        "values = topk[0]",
        "softmax_1 = torch.softmax(values, dim = -1)",
        "sum_1 = torch.sum(softmax_1, -1)",
    ]


def test_a_graph_already_normal_is_not_modified():
    gm = dynamo_graph(lambda x: torch.softmax(x, dim=-1), torch.randn(3, 4))
    assert not normalise(gm, context()).modified


def test_keeps_a_spelling_it_cannot_prove_equal():
    gm = dynamo_graph(lambda x: F.softmax(x, -1, 3), torch.randn(3, 4))  # positional _stacklevel
    assert not normalise(gm, context()).modified


class Router(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return router(x, self.w)


def test_numerics_forward_and_backward_equal_eager():
    torch.manual_seed(0)
    assert_matches_eager(Router(), (torch.randn(6, 4),), {"target": "eager"}, tol=1e-6)
