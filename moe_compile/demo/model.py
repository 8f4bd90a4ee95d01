"""A small byte-level MoE transformer, written plainly (in the manner of nanoGPT / gpt-fast).

Token and position embeddings, ``layers`` blocks of pre-norm causal self-attention and a Mixture-of-Experts
feed-forward, a final norm and a linear head over the 256 byte values. The MoE feed-forward is a router
(``nn.Linear`` + softmax + top-k, renormalised) and an experts module with stacked weights that
``moe_compile.parallelize`` can shard and ``backend="moe"`` fuses.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import moe_compile


@dataclass
class Config:
    vocab: int = 256  # bytes
    seq: int = 64  # context length
    dim: int = 128
    heads: int = 4
    layers: int = 2
    experts: int = 4
    top_k: int = 2
    ffn: int = 256  # hidden size of each expert

    def to_dict(self) -> dict:
        return asdict(self)


@moe_compile.experts
class Experts(nn.Module):
    """``E`` gated-SiLU MLPs with stacked weights: ``gate_up [E, 2F, H]`` (gate rows first), ``down [E, H, F]``.

    ``forward(hidden [T, H], topk_idx [T, k], topk_weights [T, k]) -> [T, H]``: each token's output is the weighted
    sum of its ``k`` experts' outputs. The loop below is the reference; under ``torch.compile(backend="moe")`` the
    call is one fused op, and after ``moe_compile.parallelize`` the weights are sharded across ranks.
    """

    def __init__(self, experts: int, dim: int, ffn: int):
        super().__init__()
        self.num_experts = experts
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * ffn, dim) * dim ** -0.5)
        self.down = nn.Parameter(torch.randn(experts, dim, ffn) * ffn ** -0.5)

    def forward(self, hidden, topk_idx, topk_weights):
        out = torch.zeros_like(hidden)
        for e in range(self.num_experts):
            token, slot = torch.where(topk_idx == e)
            gate, up = (hidden[token] @ self.gate_up[e].t()).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.down[e].t()
            out.index_add_(0, token, y * topk_weights[token, slot, None])
        return out


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.dim, cfg.experts, bias=False)
        self.experts = Experts(cfg.experts, cfg.dim, cfg.ffn)

    def forward(self, x):
        B, L, H = x.shape
        x = x.reshape(B * L, H)
        probs = F.softmax(self.router(x), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x, idx, weights).reshape(B, L, H)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x):
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, L, H))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.dim)
        self.moe = MoEFeedForward(cfg)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.ffn_norm(x))


class MoETransformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.seq, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2-like init for the dense weights
            if p.dim() == 2 and "experts" not in name:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, targets=None):
        """Logits ``[B, L, vocab]``; with ``targets``, the mean cross-entropy over every position instead."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
