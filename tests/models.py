"""Small plain-PyTorch models the tests compile (the quickstart transformer lives in examples/)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoopMoE(nn.Module):
    """A softmax top-k router and one MLP per expert, every expert run densely and masked by its weight."""

    def __init__(self, d=16, f=32, num_experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d)) for _ in range(num_experts))

    def forward(self, x):
        probs = self.gate(x).softmax(dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            weight = (weights * (chosen == e)).sum(dim=-1, keepdim=True)
            out = out + weight * expert(x)
        return out


class TwoLoopMoE(nn.Module):
    """Two MoE layers with a residual and a dense layer between them."""

    def __init__(self, d=16):
        super().__init__()
        self.first, self.second = LoopMoE(d), LoopMoE(d)
        self.mix = nn.Linear(d, d)

    def forward(self, x):
        x = x + self.first(x)
        x = torch.tanh(self.mix(x))
        return x + self.second(x)


class DenseMLP(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class RouterOnly(nn.Module):
    """A gate and a top-k whose choices only feed a statistic: MoE-like, but no experts."""

    def __init__(self, d=16, num_experts=4):
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.body = nn.Linear(d, d)

    def forward(self, x):
        _, chosen = torch.topk(torch.softmax(self.gate(x), dim=-1), 2, dim=-1)
        return self.body(x), chosen.float().mean()
