"""Capturing MoE blocks that are not HF experts modules: one graph node per call, fused where proven.

Some HF transformers families keep their MoE outside HF's experts modules: switch_transformers and
nllb_moe loop over ``expert_hit`` (a ``nonzero`` result) and over module names, dbrx loops over ``expert_hit`` with
expert weights flattened to ``[E*F, H]``; Dynamo breaks the graph in those loops, so no block is whole in any graph.
JetMoE's MoE block (its own parallel-experts modules, router inside) traces whole, but no pass reads it inline:
it is captured whole, router included.

Which classes are captured is decided by name (as HF's decorator does); WHAT they compute never is. While Dynamo
traces a frame for the ``moe`` backend (``scope.active()``), a call of such a module becomes
``moe_compile::block_call(x, a, b, params, key)``, whose implementation runs the module's own forward (eager
numerics; its backward is ``torch.func.vjp`` of that code). :func:`fuse_block_calls` then replaces a node by the
fused op only when a float64 proof on random parameters of the same shapes (``recognise.experts.prove``) shows that the fused
form equals the module's code, for the reading of the call's arguments the class's kind names:

- ``mask``: ``forward(x [T, H], mask [T, j, E], w [T, j])``: ``out[t] = sum_{j, e: mask[t, j, e] != 0} w[t, j] *
  expert_e(x[t])`` is the top-k form with ``k = j * E`` (entry ``(j, e)`` is expert e when the mask is set, else
  dropped). Exact for every mask (several experts per token, none), at the cost of ``j * E`` slots per token.
- ``index``: ``forward(x, idx [T, k], w [T, k])`` (expert ids, ``E`` = dropped): the usual top-k form; the weights
  may be stored flattened (``[E*F, H]``): their ``[E, F, H]`` views and the transposes are the candidates.
- ``block``: ``forward(x [B, S, H])`` with its router inside: a linear router, top-k, softmax over the k logits,
  stacked experts, an optional output bias; router and experts are proven together.

A module is not captured (it runs, and breaks the graph, as before) when the call does not have the shape its kind
expects, when it holds dropout with p > 0 (the captured backward recomputes the forward, which would draw another
mask), or when hooks are registered on it or below it (``capture.uncapturable``; HF's output recorders for
``output_router_logits`` are such hooks). Such modules are reported by explain with the reason.
"""
from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor

from . import capture, scope
from .compat import hf

BLOCKS = hf.BLOCKS
"""module -> {class name: (kind, rank of the hidden states the call must have to be captured)}."""


def _args(module, x, a, b):
    return (x,) if getattr(type(module), "_moe_compile_block", ("",))[0] == "block" else (x, a, b)


def run_block(key, params, x, a, b):
    """What ``moe_compile::block_call`` (``ops.calls``) computes: the captured block's own forward."""
    module = capture.module_for(key)
    names = [n for n, _ in module.named_parameters()]
    out = torch.func.functional_call(module, dict(zip(names, params)), _args(module, x, a, b), strict=False)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise RuntimeError(f"moe_compile: captured {type(module).__qualname__} returned "
                           f"{getattr(out, 'shape', type(out))}, not a tensor shaped like its input {tuple(x.shape)}")
    return out




def _patch(cls, kind: str, rank: int) -> None:
    if getattr(cls, "_moe_compile_block", None):
        return
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if capture.ENABLED and torch.compiler.is_compiling() and scope.active() and type(self).forward is forward:
            call = _capturable(self, kind, rank, args, kwargs)
            if isinstance(call, str):
                capture.record_skip(type(self).__qualname__, call)
            else:
                call_key, call = call
                return torch.ops.moe_compile.block_call.default(*call, [p for _, p in self.named_parameters()],
                                                                call_key)
        return original(self, *args, **kwargs)

    cls.forward = forward
    cls._moe_compile_block = (kind, rank)
    cls._moe_compile_original_forward = original


def _capturable(module, kind, rank, args, kwargs):
    """``(key, (x, a, b))`` for the captured op, or why this call cannot be captured."""
    n = 1 if kind == "block" else 3
    if kwargs or len(args) != n or not all(isinstance(t, Tensor) for t in args):
        return f"called with arguments the capture does not carry (expects {n} positional tensors)"
    x = args[0]
    if x.dim() != rank or not x.is_floating_point():
        return f"hidden states of rank {x.dim()} ({x.dtype}); the capture expects a floating [*, H] of rank {rank}"
    why = capture.uncapturable(module)
    key = "" if why else capture.traced_key(module)
    if not key:
        return why or capture.NOT_REGISTERED
    if kind == "block":
        return key, (x, x.new_zeros((0,), dtype=torch.long), x.new_zeros((0,)))
    a, b = args[1], args[2]
    if a.is_floating_point() or not b.is_floating_point():
        return "expects (hidden, integer expert mask or ids, floating routing weights)"
    return key, (x, a, b)


def install(roots=()) -> None:
    """Patch the listed classes whose transformers module is imported by now (idempotent per class; eager
    behaviour is unchanged). Runs as each frame compiled for the ``moe`` backend starts (``scope.on_moe_frame``):
    a model is built, so its modeling module imported, before it is compiled; nothing is patched in a process
    that never compiles with ``backend="moe"``."""
    for cls, kind, rank in hf.block_classes():
        _patch(cls, kind, rank)
