"""Hand-written MoE layers, the way people write them (used by several tests)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_compile

ACTS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class MLP(nn.Module):
    def __init__(self, hidden, ffn, act="silu", gated=True, bias=False):
        super().__init__()
        self.gated = gated
        if gated:
            self.w1 = nn.Linear(hidden, ffn, bias=bias)  # gate
            self.w3 = nn.Linear(hidden, ffn, bias=bias)  # up
        else:
            self.fc1 = nn.Linear(hidden, ffn, bias=bias)
        self.w2 = nn.Linear(ffn, hidden, bias=bias)
        self.act = ACTS[act]()

    def forward(self, x):
        if self.gated:
            return self.w2(self.act(self.w1(x)) * self.w3(x))
        return self.w2(self.act(self.fc1(x)))


class LoopExperts(nn.Module):
    """A ModuleList of MLPs, dispatched with torch.where and combined with index_add_."""

    def __init__(self, num_experts, hidden, ffn, act="silu", gated=True, bias=False):
        super().__init__()
        self.experts = nn.ModuleList(MLP(hidden, ffn, act, gated, bias) for _ in range(num_experts))

    def forward(self, hidden, topk_idx, topk_weights):
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(topk_idx == e)
            y = expert(hidden[tok]) * topk_weights[tok, slot, None]
            out.index_add_(0, tok, y)
        return out


DecoratedLoopExperts = moe_compile.experts(type("DecoratedLoopExperts", (LoopExperts,), {}))


@moe_compile.experts
class GatherExperts(nn.Module):
    """Stacked 3D weights gathered per (token, slot), combined with a weighted sum: no loop at all."""

    def __init__(self, num_experts, hidden, ffn):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(num_experts, hidden, 2 * ffn) / hidden**0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, ffn, hidden) / ffn**0.5)

    def forward(self, hidden, topk_idx, topk_weights):
        h = torch.einsum("th,tkhf->tkf", hidden, self.w_in[topk_idx])
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("tkf,tkfh->tkh", F.gelu(gate) * up, self.w_out[topk_idx])
        return (y * topk_weights.unsqueeze(-1)).sum(1)


@moe_compile.experts
class NormedExperts(nn.Module):
    """An expert body that is not an MLP (a LayerNorm inside): captured, not fused."""

    def __init__(self, num_experts, hidden, ffn):
        super().__init__()
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, ffn), nn.LayerNorm(ffn), nn.Linear(ffn, hidden)) for _ in range(num_experts)
        )

    def forward(self, hidden, topk_idx, topk_weights):
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(topk_idx == e)
            out.index_add_(0, tok, expert(hidden[tok]) * topk_weights[tok, slot, None])
        return out


class MoELayer(nn.Module):
    """Router Linear -> softmax|sigmoid -> top-k (-> renormalise) -> experts. Input [B, S, H]."""

    def __init__(self, experts, hidden, num_experts, k, score="softmax", renorm=True):
        super().__init__()
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts, self.k, self.score, self.renorm = experts, k, score, renorm

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        scores = logits.softmax(-1) if self.score == "softmax" else torch.sigmoid(logits)
        w, idx = torch.topk(scores, self.k, dim=-1)
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)
        return self.experts(x, idx, w).reshape(shape)


class Net(nn.Module):
    def __init__(self, moe, hidden):
        super().__init__()
        self.inp = nn.Linear(hidden, hidden)
        self.moe = moe
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h))


class InlineMoE(nn.Module):
    """Router, dispatch and combine all in one forward, experts in an nn.ModuleList: no decorator anywhere."""

    def __init__(self, E, H, F, k, act="silu", gated=True, bias=False, score="softmax", renorm=True,
                 dispatch="where", combine="index_add"):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(MLP(H, F, act, gated, bias) for _ in range(E))
        self.k, self.score, self.renorm, self.dispatch, self.combine = k, score, renorm, dispatch, combine

    def forward(self, x):
        B, S, H = x.shape
        x = x.view(-1, H)
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1) if self.score == "softmax" else torch.sigmoid(logits)
        w, idx = torch.topk(probs, self.k, dim=-1)
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            if self.dispatch == "where":
                tok, slot = torch.where(idx == e)
                we = w[tok, slot]
            else:
                mask = idx == e
                tok = mask.any(-1).nonzero().squeeze(-1)
                we = (w * mask).sum(-1)[tok]
            y = expert(x[tok]) * we[:, None]
            if self.combine == "index_add":
                out.index_add_(0, tok, y)
            else:
                out.scatter_add_(0, tok[:, None].expand(-1, H), y)
        return out.view(B, S, H)


class GShardMoE(nn.Module):
    """fairseq/GShard-style top-1 or top-2 gating with a capacity factor (tokens over capacity are dropped),
    one-hot dispatch and combine tensors, einsum dispatch and combine; experts an nn.ModuleList or stacked 3D."""

    def __init__(self, E, H, F, k=2, capacity_factor=1.0, stacked=False, act="relu"):
        super().__init__()
        self.wg = nn.Linear(H, E, bias=False)
        self.E, self.k, self.cf, self.stacked = E, k, capacity_factor, stacked
        if stacked:
            self.w1 = nn.Parameter(torch.randn(E, H, F) / H**0.5)
            self.w2 = nn.Parameter(torch.randn(E, F, H) / F**0.5)
            self.act = ACTS[act]()
        else:
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(H, F), ACTS[act](), nn.Linear(F, H)) for _ in range(E))

    def gating(self, x):
        gates = F.softmax(self.wg(x), dim=1)
        S = x.shape[0]
        cap = max(1, int(self.k * math.ceil(S / self.E) * self.cf))
        masks, locs, gs = [], [], []
        taken = torch.zeros(self.E, dtype=torch.long)
        logits = gates
        for _ in range(self.k):
            i = torch.argmax(logits, dim=1)
            m = F.one_hot(i, self.E)
            loc = torch.cumsum(m, 0) - 1 + taken
            taken = taken + m.sum(0)
            logits = logits.masked_fill(m.bool(), float("-inf"))
            m = m * (loc < cap)
            masks.append(m)
            locs.append((loc * m).sum(1))
            gs.append((gates * m).sum(1))
        denom = sum(gs).clamp(min=torch.finfo(gates.dtype).eps) if self.k > 1 else 1
        combine = 0
        for m, loc, g in zip(masks, locs, gs):
            combine = combine + ((g / denom)[:, None] * m)[:, :, None] * F.one_hot(loc, cap)[:, None, :]
        return combine, combine.bool()

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        combine, dispatch = self.gating(x)
        d = torch.einsum("sec,sm->ecm", dispatch.to(x.dtype), x)
        if self.stacked:
            y = torch.bmm(self.act(torch.bmm(d, self.w1)), self.w2)
        else:
            y = torch.cat([e(c) for e, c in zip(self.experts, d.chunk(self.E, dim=0))], dim=0)
        return torch.einsum("sec,ecm->sm", combine, y).reshape(shape)


class InlineGatherMoE(nn.Module):
    """Router and stacked 3D expert weights gathered per (token, choice), all in one forward, no decorator."""

    def __init__(self, E, H, F, k, bias=True):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, 2 * F, H) / H**0.5)
        self.w_out = nn.Parameter(torch.randn(E, H, F) / F**0.5)
        self.b_in = nn.Parameter(torch.randn(E, 2 * F) * 0.1) if bias else None
        self.k = k

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = torch.topk(torch.sigmoid(self.router(x)), self.k, dim=-1)
        h = torch.einsum("th,tkfh->tkf", x, self.w_in[idx])
        if self.b_in is not None:
            h = h + self.b_in[idx]
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("tkf,tkhf->tkh", F.silu(gate) * up, self.w_out[idx])
        return (y * w.unsqueeze(-1)).sum(1).reshape(shape)


class AllToAllIdentity(torch.autograd.Function):
    """DeepSpeed-style all-to-all around the experts: an autograd Function that exchanges buffers between ranks
    (here always one rank, so a copy)."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x.contiguous())
            return out
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return AllToAllIdentity.apply(grad)


class DeepSpeedTop1Gate(nn.Module):
    """DeepSpeed-MoE-style top-1 gate: the capacity is a 0-d tensor (with a data-dependent minimum) used as
    ``F.one_hot(..., num_classes=capacity)``; returns (aux loss, combine weights, dispatch mask)."""

    def __init__(self, H, E, capacity_factor=1.0, min_capacity=2):
        super().__init__()
        self.wg = nn.Linear(H, E, bias=False)
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity

    def forward(self, x):
        gates = F.softmax(self.wg(x), dim=1)
        S, E = gates.shape
        capacity = torch.ceil((S / E) * torch.tensor(self.capacity_factor)).to(torch.int64)
        min_capacity = torch.tensor(self.min_capacity)
        if capacity < min_capacity:
            capacity = min_capacity.to(torch.int64)
        idx = torch.argmax(gates, dim=1)
        mask = F.one_hot(idx, num_classes=E)
        loc = torch.cumsum(mask, dim=0) - 1
        l_aux = (gates.mean(0) * mask.float().mean(0)).sum() * E
        mask = mask * torch.lt(loc, capacity)
        loc_s = torch.sum(loc * mask, dim=1)
        gate_s = (gates * mask).sum(1)
        loc_onehot = F.one_hot(loc_s, num_classes=capacity).float()
        combine = torch.einsum("s,se,sc->sec", gate_s, mask.float(), loc_onehot)
        return l_aux, combine, combine.bool()


class DeepSpeedMoE(nn.Module):
    """Gate, einsum dispatch, all-to-all, experts over [E, C, H] chunks, all-to-all back, einsum combine; returns
    (output, aux loss) as DeepSpeed's MoE layer does."""

    def __init__(self, H, F_, E, capacity_factor=1.0):
        super().__init__()
        self.gate = DeepSpeedTop1Gate(H, E, capacity_factor)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(H, F_), nn.GELU(), nn.Linear(F_, H)) for _ in range(E))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        l_aux, combine, dispatch = self.gate(x)
        d = AllToAllIdentity.apply(torch.einsum("sec,sm->ecm", dispatch.type_as(x), x))
        y = torch.cat([e(c) for e, c in zip(self.experts, d.chunk(len(self.experts), dim=0))], dim=0)
        y = AllToAllIdentity.apply(y)
        return torch.einsum("sec,ecm->sm", combine.type_as(x), y).reshape(shape), l_aux


class AuxNet(nn.Module):
    """Net for MoE layers that return (output, aux loss): the aux loss is added to the output."""

    def __init__(self, moe, hidden):
        super().__init__()
        self.inp, self.moe, self.out = nn.Linear(hidden, hidden), moe, nn.Linear(hidden, hidden)

    def forward(self, x):
        h = self.inp(x)
        m, aux = self.moe(h)
        return self.out(h + m) + aux


class GroupedExperts(nn.Module):
    """Stacked SwiGLU weights ``w1 [E, F, H]``, ``w2 [E, H, F]``, ``w3 [E, F, H]`` over rows sorted by expert,
    run by a Python loop over ``torch.split(x, counts)``."""

    def __init__(self, E, H, Fd):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, Fd, H) / H**0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, Fd) / Fd**0.5)
        self.w3 = nn.Parameter(torch.randn(E, Fd, H) / H**0.5)

    def forward(self, x, counts):
        outs = []
        for e, xe in enumerate(torch.split(x, counts.long().tolist(), dim=0)):
            h = F.silu(xe @ self.w1[e].transpose(-2, -1)) * (xe @ self.w3[e].transpose(-2, -1))
            outs.append(h @ self.w2[e].transpose(-2, -1))
        return torch.cat(outs, dim=0)
