"""Readings of a whole MoE block (router, experts, shared experts, buffers) and the fused form each one stands for.

A :class:`BlockReading` says what a block found by structure (``recognise.structure``) computes:

    logits = x @ router.T (+ router bias)
    scores = softmax(logits) | sigmoid(logits)            (``score``; "softmax_topk": the raw logits)
    idx    = top-k of scores (+ a selection-only bias)     (the bias never weights anything)
    w      = scores[idx] | softmax(logits[idx])            ("softmax_topk"), renormalised to sum 1 if
             ``renormalize``, times ``scale``
    out    = sum_j w_j * expert_{idx_j}(x)                 (``score_on_input``: sum_j expert_{idx_j}(w_j * x))
             + the outputs of the ``shared`` children, each called on x
    and, if ``counts`` names a buffer, buffer += tokens per expert (its own code's bookkeeping, kept).

:func:`fused_block` computes it with the router in plain torch and the experts as one ``moe_compile::experts`` op;
``recognise.blocks`` proves, on random parameters, that a reading equals the block's own code, forward and
gradients, and only then does the capture (``capture_found``) trace the fused form instead of the block's code.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops  # noqa: F401  (moe_compile::experts)
from ..spec import RouterSpec

SCORES = ("softmax", "sigmoid", "softmax_topk")
SLOTS = ("gate", "up", "down", "b_gate", "b_up", "b_down")


@dataclass(frozen=True)
class Routing:
    k: int
    score: str  # SCORES
    select_bias: str | None = None  # an [E] parameter or buffer added to the scores for the choice only
    renormalize: bool = False
    scale: float = 1.0
    score_on_input: bool = False
    shared: tuple[str, ...] = ()  # children of the block whose outputs are added to the routed output
    counts: str | None = None  # a buffer the block adds its tokens-per-expert counts to
    fp32_scores: bool = False  # the scores are computed in float32 whatever the input's dtype (``.float()``)

    def describe(self) -> str:
        what = {"softmax": "softmax -> top-k", "sigmoid": "sigmoid -> top-k",
                "softmax_topk": "top-k -> softmax over the k"}[self.score]
        parts = [f"{what} (k={self.k})"]
        if self.select_bias:
            parts.append(f"selection bias {self.select_bias}")
        if self.renormalize:
            parts.append("renormalised")
        if self.scale != 1.0:
            parts.append(f"scale {self.scale:g}")
        if self.score_on_input:
            parts.append("score on the experts' input")
        if self.shared:
            parts.append(f"shared {', '.join(self.shared)}")
        if self.counts:
            parts.append(f"counts into {self.counts}")
        if self.fp32_scores:
            parts.append("scores in float32")
        return ", ".join(parts)

    def router_spec(self) -> RouterSpec:
        return RouterSpec(score="softmax" if self.score != "sigmoid" else "sigmoid",
                          order="topk->score" if self.score == "softmax_topk" else "score->topk",
                          renormalize=self.renormalize, bias_correction=self.select_bias is not None,
                          scaling=self.scale if self.scale != 1.0 else None)


@dataclass(frozen=True)
class BlockReading:
    """A proven reading of one block (a plain value: it is baked into the traced graph as a JSON string)."""

    hidden: int
    router: str
    router_bias: str | None
    routing: Routing
    slots: tuple[tuple[str, ...], ...]  # per SLOTS, the block's parameter names that fill the op's slot
    spec: str  # the MoESpec's JSON
    proof: str = ""  # what the proof ran (dtype, draws, seconds), for explain

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def as_args(self) -> tuple:
        """The reading as the plain values :func:`fused_block` takes after ``(x, tensors, shared_child)``."""
        r = self.routing
        return (self.hidden, self.router, self.router_bias, r.k, r.score, r.select_bias, r.renormalize, r.scale,
                r.score_on_input, tuple(r.shared), r.counts, r.fp32_scores, tuple(tuple(s) for s in self.slots),
                self.spec)

    @staticmethod
    def from_json(text: str) -> "BlockReading":
        d = json.loads(text)
        d["routing"] = Routing(**{**d["routing"], "shared": tuple(d["routing"]["shared"])})
        d["slots"] = tuple(tuple(s) for s in d["slots"])
        return BlockReading(**d)


def route(logits: Tensor, k: int, score: str, select_bias: Tensor | None = None, renormalize: bool = False,
          scale: float = 1.0, fp32_scores: bool = False):
    """``(idx [T, k], w [T, k])`` from the router's ``logits [T, E]`` (scores in float32 at least; in float32
    exactly with ``fp32_scores``)."""
    low = logits.dtype in (torch.float16, torch.bfloat16)
    z = logits.float() if low or fp32_scores else logits
    if score == "softmax_topk":
        choice = z if select_bias is None else z + select_bias
        idx = choice.topk(k, dim=-1).indices
        w = torch.softmax(z.gather(-1, idx), dim=-1)
    else:
        s = torch.softmax(z, dim=-1) if score == "softmax" else torch.sigmoid(z)
        choice = s if select_bias is None else s + select_bias
        idx = choice.topk(k, dim=-1).indices
        w = s.gather(-1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    if scale != 1.0:
        w = w * scale
    return idx, w


def fused_block(x: Tensor, tensors: dict, shared_child, hidden: int, router: str, router_bias, k: int,
                score: str, select_bias, renormalize: bool, scale: float, score_on_input: bool, shared: tuple,
                counts, fp32_scores: bool, slots: tuple, spec: str) -> Tensor:
    """The block's output by a reading, given as plain values (``BlockReading.as_args()``: Dynamo traces this with
    them as constants): ``tensors`` maps the block's parameter and buffer names to tensors, ``shared_child(name)``
    gives the callable that runs a shared child on ``x2`` (the module itself while tracing, ``get_submodule``; a
    functional call in the proof). Updates the counts
    buffer in place, as the block's own code does. ``score_on_input`` is part of ``spec`` (the op reads it there)."""
    x2 = x.reshape(-1, hidden)
    logits = F.linear(x2, tensors[router], tensors[router_bias] if router_bias else None)
    idx, w = route(logits, k, score, tensors[select_bias] if select_bias else None, renormalize, scale, fp32_scores)
    lists = [[tensors[n] for n in names] for names in slots]
    out = torch.ops.moe_compile.experts.default(x2, idx, w.to(x2.dtype), *lists, spec)[0]
    for name in shared:
        out = out + shared_child(name)(x2)
    if counts:
        buf = tensors[counts]
        flat = idx.reshape(-1)
        with torch.no_grad():  # a static [E] shape (bincount's would depend on the values)
            buf.add_(flat.new_zeros(logits.shape[-1]).scatter_add_(0, flat, torch.ones_like(flat)).to(buf.dtype))
    return out.reshape(x.shape)
