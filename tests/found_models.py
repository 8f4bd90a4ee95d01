"""MoE blocks written the ways public MoE code writes them, which no graph pass reads inline: data-dependent dispatch
(``bincount(...).tolist()`` loops that skip empty experts, ``one_hot`` sized by ``int(x.max())``), expanded-index
gathers, ``scatter_add_`` into the shared expert's output, sigmoid routing with a selection-only bias and a route
scale, stacked experts with a tokens-per-expert buffer. Each is captured whole by structure (``capture_found``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import MLP


class GateListMoE(nn.Module):
    """What several styles below share: a bias-free ``gate`` Linear, a ModuleList of gated MLP experts, ``k``."""

    def __init__(self, E=4, H=8, F_=12, k=2):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(MLP(H, F_) for _ in range(E))
        self.k = k


class BincountLoopMoE(GateListMoE):
    """``counts = bincount(idx).tolist()`` then a loop that skips empty experts; tokens sorted by expert."""

    def forward(self, x):
        shape = x.shape
        x = x.view(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        w, idx = probs.topk(self.k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        flat = idx.flatten()
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        order = flat.argsort(stable=True)
        tokens = order // self.k
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start:start + n]
            tok = tokens[start:start + n]
            y = self.experts[e](x[tok]) * w.flatten()[sel, None]
            out.index_add_(0, tok, y)
            start += n
        return out.view(shape)


class OneHotMoE(nn.Module):
    """Dispatch masks from ``F.one_hot(idx, num_classes=int(idx.max()) + 1)``: a size that depends on the values."""

    def __init__(self, E=4, H=8, F_=12, k=2):
        super().__init__()
        self.router = nn.Linear(H, E)
        self.experts = nn.ModuleList(MLP(H, F_, act="gelu", gated=False) for _ in range(E))
        self.k = k

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        logits = self.router(x)
        top, idx = logits.topk(self.k, dim=-1)
        w = top.softmax(-1)
        mask = F.one_hot(idx, num_classes=int(idx.max()) + 1).permute(2, 1, 0)  # [E', k, T]
        out = torch.zeros_like(x)
        for e in range(mask.shape[0]):
            slot, tok = torch.where(mask[e])
            if tok.numel():
                out[tok] += self.experts[e](x[tok]) * w[tok, slot].unsqueeze(-1)
        return out.reshape(B, S, H)


class GatherSharedMoE(GateListMoE):
    """Experts' input gathered through ``arange``-expanded indices; the routed output ``scatter_add_``-ed into the
    shared expert's output."""

    def __init__(self, E=4, H=8, F_=12, k=2):
        super().__init__(E, H, F_, k)
        self.shared_expert = MLP(H, 2 * F_)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T, H = x.shape
        scores = torch.softmax(self.gate(x), dim=-1)
        w, idx = torch.topk(scores, self.k, dim=-1)
        token_ids = torch.arange(T, device=x.device).unsqueeze(1).expand(T, self.k).reshape(-1)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        gathered = torch.gather(x, 0, token_ids[order].unsqueeze(1).expand(-1, H))
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        ys = []
        for e, chunk in enumerate(torch.split(gathered, counts)):
            ys.append(self.experts[e](chunk))
        y = torch.cat(ys) * w.reshape(-1)[order].unsqueeze(1)
        out = self.shared_expert(x)
        out = out.scatter_add(0, token_ids[order].unsqueeze(1).expand(-1, H), y)
        return out.reshape(shape)


class BiasedSigmoidMoE(nn.Module):
    """Sigmoid scores, a selection-only ``[E]`` bias buffer (DeepSeek-V3 style), renormalised, times a route scale."""

    def __init__(self, E=8, H=8, F_=12, k=2, scale=2.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, H) / H ** 0.5)
        self.register_buffer("e_score_correction_bias", torch.randn(E) * 0.01)
        self.experts = nn.ModuleList(MLP(H, F_) for _ in range(E))
        self.k, self.routed_scaling_factor = k, scale

    def forward(self, x):
        shape = x.shape
        x = x.view(-1, shape[-1])
        scores = torch.sigmoid(x @ self.weight.t())
        idx = torch.topk(scores + self.e_score_correction_bias, self.k, dim=-1).indices
        w = scores.gather(1, idx)
        w = w / w.sum(-1, keepdim=True) * self.routed_scaling_factor
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out.view(shape)


class StackedCountingMoE(nn.Module):
    """Stacked experts ``[E, F, H]`` run by a ``split(counts.tolist())`` loop, the score on the experts' input, and a
    ``tokens_per_expert`` buffer the forward adds its counts to (torchtitan's bookkeeping)."""

    def __init__(self, E=4, H=8, F_=12, k=1):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, F_, H) / H ** 0.5)
        self.w3 = nn.Parameter(torch.randn(E, F_, H) / H ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, F_) / F_ ** 0.5)
        self.register_buffer("tokens_per_expert", torch.zeros(E))
        self.k = k

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = torch.sigmoid(self.router(x).float())
        top, idx = torch.topk(scores, self.k, dim=-1)
        counts = torch.histc(idx.view(-1).float(), bins=self.w1.shape[0], min=0, max=self.w1.shape[0])
        with torch.no_grad():
            self.tokens_per_expert.add_(counts)
        order = torch.argsort(idx.view(-1), stable=True)
        tok = order // self.k
        xs = (x[tok].float() * top.view(-1)[order, None]).to(x.dtype)
        outs = []
        for e, chunk in enumerate(torch.split(xs, counts.long().tolist())):
            h = F.silu(chunk @ self.w1[e].t()) * (chunk @ self.w3[e].t())
            outs.append(h @ self.w2[e].t())
        out = torch.zeros_like(x).scatter_add(0, tok[:, None].expand(-1, x.shape[1]), torch.cat(outs))
        return out.reshape(shape)


class ThresholdMoE(nn.Module):
    """Tokens reach every expert whose probability passes 0.3: no top-k reading (stays as it is)."""

    def __init__(self, E=4, H=8, F_=12):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(MLP(H, F_) for _ in range(E))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        p = self.gate(x).softmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = (p[:, e] > 0.3).nonzero().squeeze(-1)
            out.index_add_(0, tok, expert(x[tok]) * p[tok, e, None])
        return out.reshape(shape)


class DetachedRouterMoE(GateListMoE):
    """The routing weights ``.detach()``-ed: the router gets no gradient (in eager too); every output reading
    matches, the gradient check tells it apart (stays as it is)."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.gate(x).softmax(-1).topk(self.k)
        w = w.detach()
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out.reshape(shape)


class Net(nn.Module):
    """A projection in, the block, a projection out (so the block's input and output have gradients)."""

    def __init__(self, block, H=8):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(H, H), block, nn.Linear(H, H)

    def forward(self, x):
        return self.out(self.block(self.inp(x)))


FUSED_STYLES = {
    "bincount_loop": BincountLoopMoE,
    "one_hot": OneHotMoE,
    "gather_shared": GatherSharedMoE,
    "biased_sigmoid": BiasedSigmoidMoE,
    "stacked_counting": StackedCountingMoE,
}
UNFUSED_STYLES = {"threshold": ThresholdMoE, "detached_router": DetachedRouterMoE}
