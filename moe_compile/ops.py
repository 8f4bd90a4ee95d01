"""The ``moe_compile::`` custom ops: what a rewritten graph calls.

- ``moe_compile::experts``: dispatch -> expert MLPs -> weighted combine, fused (forward); returns the combined
  output and the two GEMM outputs the backward reuses.
- ``moe_compile::experts_backward``: its gradients, as an op of its own so that AOT autograd never traces Python
  with data-dependent shapes.
- ``moe_compile::experts_call`` (+ backward): an experts module captured whole as one graph node (the
  ``@moe_compile.experts`` decorator and HF experts modules under compile). Its implementation runs the module's own
  forward, so a node the backend does not rewrite computes exactly what eager does.

Every op has a fake implementation (shapes only) and works under aot_autograd and inductor.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .codegen import cpu
from .spec import MoESpec

# --------------------------------------------------------------------------------------------- fused experts


def _weights(spec: MoESpec, gate, up, down, b_gate, b_up, b_down) -> cpu.Weights:
    return cpu.canonical_weights(spec, gate, up, down, b_gate, b_up, b_down)


@torch.library.custom_op("moe_compile::experts", mutates_args=())
def experts_op(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    gate: list[Tensor],
    up: list[Tensor],
    down: list[Tensor],
    b_gate: list[Tensor],
    b_up: list[Tensor],
    b_down: list[Tensor],
    spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    s = MoESpec.from_json(spec)
    cpu.check_routing(topk_idx, topk_weights, x, s.num_experts)
    wts = _weights(s, gate, up, down, b_gate, b_up, b_down)
    out, (h, y) = _backend_forward(s, x, topk_idx, topk_weights, wts)
    return out, _pad_rows(h, topk_idx.numel()), _pad_rows(y, topk_idx.numel())


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    # saved activations have one row per (token, slot); dropped pairs sit at the tail as zeros
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _backend_forward(s, x, idx, w, wts):
    return cpu.experts_forward(s, x, idx, w, wts)


@experts_op.register_fake
def _experts_fake(x, topk_idx, topk_weights, gate, up, down, b_gate, b_up, b_down, spec):
    s = MoESpec.from_json(spec)
    rows = topk_idx.numel()
    n = 2 * s.ffn if s.gated else s.ffn
    return torch.empty_like(x), x.new_empty(rows, n), x.new_empty(rows, s.hidden)


@torch.library.custom_op("moe_compile::experts_backward", mutates_args=())
def experts_backward_op(
    grad_out: Tensor,
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    gate: list[Tensor],
    up: list[Tensor],
    down: list[Tensor],
    b_gate: list[Tensor],
    b_up: list[Tensor],
    b_down: list[Tensor],
    h: Tensor,
    y: Tensor,
    spec: str,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    s = MoESpec.from_json(spec)
    wts = _weights(s, gate, up, down, b_gate, b_up, b_down)
    n_valid = int((topk_idx < s.num_experts).sum())
    dx, dw, dwts = cpu.experts_backward(s, grad_out, x, topk_idx, topk_weights, wts, h[:n_valid], y[:n_valid])
    return (dx, dw, *cpu.weight_grads(s, dwts, gate, up, down, b_gate, b_up, b_down))


@experts_backward_op.register_fake
def _experts_backward_fake(grad_out, x, topk_idx, topk_weights, gate, up, down, b_gate, b_up, b_down, h, y, spec):
    like = lambda ts: [torch.empty_like(t) for t in ts]  # noqa: E731
    return (
        torch.empty_like(x),
        torch.empty_like(topk_weights),
        like(gate),
        like(up),
        like(down),
        like(b_gate),
        like(b_up),
        like(b_down),
    )


def _experts_setup_context(ctx, inputs, output):
    x, idx, w, gate, up, down, b_gate, b_up, b_down, spec = inputs
    _, h, y = output
    ctx.spec = spec
    ctx.n = tuple(len(t) for t in (gate, up, down, b_gate, b_up, b_down))
    ctx.save_for_backward(x, idx, w, h, y, *gate, *up, *down, *b_gate, *b_up, *b_down)


def _experts_autograd(ctx, grad_out, _grad_h, _grad_y):
    x, idx, w, h, y, *flat = ctx.saved_tensors
    lists, i = [], 0
    for n in ctx.n:
        lists.append(flat[i : i + n])
        i += n
    dx, dw, *dlists = experts_backward_op(grad_out, x, idx, w, *lists, h, y, ctx.spec)
    return (dx, None, dw, *dlists, None)


experts_op.register_autograd(_experts_autograd, setup_context=_experts_setup_context)


def fused_experts(spec: MoESpec, x, topk_idx, topk_weights, gate=(), up=(), down=(), b_gate=(), b_up=(), b_down=()):
    """Call the fused op; returns ``[T, H]``."""
    return torch.ops.moe_compile.experts(
        x, topk_idx, topk_weights, list(gate), list(up), list(down), list(b_gate), list(b_up), list(b_down),
        spec.to_json(),
    )[0]
