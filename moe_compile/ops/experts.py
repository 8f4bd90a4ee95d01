"""``moe_compile::experts``: dispatch -> expert MLPs -> weighted combine, fused, and its backward.

The forward returns the combined output and two tensors the backward reuses, one row per (token, slot) in sorted
order: the first GEMM's output ``h`` and a ``[T*k, H]`` tensor whose meaning is the kernel backend's
(``moe_compile.kernels``: the ATen backend saves the gathered inputs, Triton the unweighted expert outputs).
Forward and backward of one call choose the same backend (``kernels.select``: by device, dtype and spec).
``moe_compile::experts_backward`` is an op of its own so that AOT autograd never traces Python with
data-dependent shapes. Both have fake implementations (shapes only) and work under aot_autograd and inductor.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..kernels.common import canonical_weights, check_routing, weight_grads
from ..spec import MoESpec

# --------------------------------------------------------------------------------------------- fused experts


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
    check_routing(topk_idx, topk_weights, x, s.num_experts)
    wts = canonical_weights(s, gate, up, down, b_gate, b_up, b_down)
    out, h, r = kernels.forward(s, x, topk_idx, topk_weights, wts)
    return out, pad_rows(h, topk_idx.numel()), pad_rows(r, topk_idx.numel())


def pad_rows(t: Tensor, rows: int) -> Tensor:
    """Saved activations have one row per (token, slot); dropped pairs sit at the tail as zeros."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


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
    wts = canonical_weights(s, gate, up, down, b_gate, b_up, b_down)
    n_valid = int((topk_idx < s.num_experts).sum())
    dx, dw, dwts = kernels.backward(s, grad_out, x, topk_idx, topk_weights, wts, h[:n_valid], y[:n_valid])
    return (dx, dw, *weight_grads(s, dwts, gate, up, down, b_gate, b_up, b_down))


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


def register_autograd(op, backward_op) -> None:
    """Autograd for an op ``(a, b, c, gate[], up[], down[], b_gate[], b_up[], b_down[], spec) -> (out, h, y)``
    whose backward op is ``(grad, a, b, c, *lists, h, y, spec) -> (da, dc, *dlists)``; ``b`` (expert ids, or
    the 0/1 dispatch tensor) gets no gradient."""

    def setup(ctx, inputs, output):
        a, b_, c, *lists, spec = inputs
        _, h, y = output
        ctx.spec = spec
        ctx.n = tuple(len(t) for t in lists)
        ctx.save_for_backward(a, b_, c, h, y, *[t for l in lists for t in l])

    def backward(ctx, grad, _grad_h, _grad_y):
        a, b_, c, h, y, *flat = ctx.saved_tensors
        lists, i = [], 0
        for n in ctx.n:
            lists.append(flat[i: i + n])
            i += n
        da, dc, *dlists = backward_op(grad, a, b_, c, *lists, h, y, ctx.spec)
        return (da, None, dc, *dlists, None)

    op.register_autograd(backward, setup_context=setup)


register_autograd(experts_op, experts_backward_op)


def fused_experts(spec: MoESpec, x, topk_idx, topk_weights, gate=(), up=(), down=(), b_gate=(), b_up=(), b_down=()):
    """Call the fused op; returns ``[T, H]``."""
    return torch.ops.moe_compile.experts(
        x, topk_idx, topk_weights, list(gate), list(up), list(down), list(b_gate), list(b_up), list(b_down),
        spec.to_json(),
    )[0]

