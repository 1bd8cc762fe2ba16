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
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d))
                                     for _ in range(num_experts))

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


class ExpertParallelMoE(nn.Module):
    """Capacity dispatch to ``[E, C, d]``, an all-to-all to the experts' ranks, grouped experts, and back.

    On a one-rank group the exchanges move nothing, but the graph holds the
    same functional collectives an expert-parallel run issues.
    """

    def __init__(self, group, d=16, f=32, num_experts=4, top_k=2, capacity=6):
        super().__init__()
        self.group_name = group.group_name  # a name, not the group object: the module stays deep-copyable
        self.top_k, self.capacity = top_k, capacity
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, d, f) * d**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, f, d) * f**-0.5)

    def forward(self, x):
        import torch.distributed._functional_collectives as fc

        num_experts, capacity = self.w1.shape[0], self.capacity
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        mask = F.one_hot(chosen, num_experts).sum(dim=1)  # [T, E]
        position = (torch.cumsum(mask, dim=0) - 1) * mask
        slots = F.one_hot(position.clamp(max=capacity - 1), capacity) * (mask * (position < capacity)).unsqueeze(-1)
        dispatch = slots.to(x.dtype)  # [T, E, C]
        combine = dispatch * (probs * mask).unsqueeze(-1)
        send = torch.einsum("tec,td->ecd", dispatch, x)
        received = fc.all_to_all_single_autograd(send.reshape(-1, x.shape[-1]), None, None,
                                                 self.group_name).reshape(send.shape)
        expert_out = torch.bmm(torch.relu(torch.bmm(received, self.w1)), self.w2)
        returned = fc.all_to_all_single_autograd(expert_out.reshape(-1, x.shape[-1]), None, None,
                                                 self.group_name).reshape(send.shape)
        return torch.einsum("tec,ecd->td", combine, returned)


class TitanStyleMoE(nn.Module):
    """Expert parallelism as torchtitan and Megatron write it: sort by expert, split sizes, all-to-all, per-expert
    matmuls."""

    def __init__(self, group, d=16, f=32, num_experts=4, top_k=2):
        super().__init__()
        import torch.distributed as dist

        self.group_name, self.top_k, self.num_experts = group.group_name, top_k, num_experts
        self.ep = dist.get_world_size(group)
        self.local = num_experts // self.ep
        self.router = nn.Linear(d, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(self.local, d, f) * d**-0.5)
        self.w2 = nn.Parameter(torch.randn(self.local, f, d) * f**-0.5)

    def forward(self, x):
        import torch.distributed._functional_collectives as fc

        scores = torch.softmax(self.router(x), dim=-1)
        top_scores, selected = torch.topk(scores, self.top_k, dim=-1)
        flat_experts = selected.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        routed = x[order // self.top_k]
        counts = F.one_hot(flat_experts, self.num_experts).sum(dim=0)
        counts_received = fc.all_to_all_single(counts, None, None, self.group_name)
        send_splits = counts.view(self.ep, -1).sum(dim=1).tolist()
        receive_splits = counts_received.view(self.ep, -1).sum(dim=1).tolist()
        received = fc.all_to_all_single_autograd(routed, receive_splits, send_splits, self.group_name)
        chunks = list(torch.split(received, counts_received.tolist()))  # by (source rank, local expert)
        for e in range(self.local):
            mine = list(range(e, len(chunks), self.local))
            out = torch.relu(torch.cat([chunks[c] for c in mine]) @ self.w1[e]) @ self.w2[e]
            for c, piece in zip(mine, torch.split(out, [chunks[c].shape[0] for c in mine])):
                chunks[c] = piece
        returned = fc.all_to_all_single_autograd(torch.cat(chunks), send_splits, receive_splits, self.group_name)
        unsorted = torch.empty_like(returned).index_copy(0, order, returned)
        weighted = unsorted.reshape(-1, self.top_k, x.shape[-1]) * top_scores.unsqueeze(-1)
        return weighted.sum(dim=1)


class DeepSeekStyleMoE(nn.Module):
    """DeepSeek-V3's router written from scratch: sigmoid scores, a selection-only bias, top-k within the best
    ``top_groups`` expert groups (each group scored by its best two), weights from the unbiased scores,
    renormalised and scaled; a loop over the experts and a shared expert. ``fill`` is what the experts outside the
    kept groups score (DeepSeek-V3 writes -inf)."""

    def __init__(self, d=16, f=32, num_experts=8, top_k=2, groups=4, top_groups=2, scale=2.5, fill=float("-inf")):
        super().__init__()
        self.top_k, self.groups, self.top_groups, self.scale, self.fill = top_k, groups, top_groups, scale, fill
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.register_buffer("bias", torch.linspace(-0.1, 0.1, num_experts))
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, f), nn.SiLU(), nn.Linear(f, d))
                                     for _ in range(num_experts))
        self.shared = nn.Sequential(nn.Linear(d, f), nn.SiLU(), nn.Linear(f, d))

    def forward(self, x):
        scores = torch.sigmoid(self.gate(x))
        for_choice = scores + self.bias
        group_scores = for_choice.view(x.shape[0], self.groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
        best_groups = group_scores.topk(self.top_groups, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, scores.shape[-1] // self.groups).reshape(x.shape[0], -1)
        chosen = for_choice.masked_fill(expert_mask == 0, self.fill).topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, chosen)
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.scale
        out = self.shared(x)
        for e, expert in enumerate(self.experts):
            weight = (weights * (chosen == e)).sum(dim=-1, keepdim=True)
            out = out + weight * expert(x)
        return out
