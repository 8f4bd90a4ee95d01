"""``moe_compile::experts_slots``: GShard / fairseq / Tutel capacity-slot experts, fused.

GShard / fairseq / Tutel dispatch: ``dispatch`` and ``combine`` are [S, E, C] tensors over capacity slots, the
experts run on ``einsum("sec,sm->ecm", dispatch, x)`` and the output is ``einsum("sec,ecm->sm", combine, y)``.
When every slot holds at most one token, every token at most one slot per expert, dispatch is 0/1 and combine is
zero off dispatch (what those routers build), the same output is the top-k form with k = E: no padded rows, no
dense einsums. Otherwise the op computes the dense formula itself (same numbers, slower).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..kernels.common import Weights, activation, canonical_weights, weight_grads
from ..spec import MoESpec
from .experts import pad_rows, register_autograd


def slots_to_topk(dispatch: Tensor, combine: Tensor) -> tuple[bool, Tensor, Tensor]:
    """``(one_token_per_slot, idx [S, E], w [S, E])``: expert e of token s, or E when s has no slot at e."""
    S, E, _ = dispatch.shape
    occ = dispatch != 0
    ok = bool(
        ((dispatch == 0) | (dispatch == 1)).all()
        and (occ.sum(-1) <= 1).all()
        and (occ.sum(0) <= 1).all()
        and (combine.masked_fill(occ, 0) == 0).all()
    )
    has = occ.any(-1)
    experts = torch.arange(E, device=dispatch.device).expand(S, E)
    idx = torch.where(has, experts, torch.full_like(experts, E))
    return ok, idx, (combine * occ).sum(-1)


def _dense_slots(s: MoESpec, x, dispatch, combine, lists):
    """The formula itself: einsum dispatch, batched expert MLP, einsum combine (differentiable)."""
    wts = canonical_weights(s, *lists)
    d = torch.einsum("sec,sm->ecm", dispatch.to(x.dtype), x)
    h = torch.bmm(d, wts.w1.to(x.dtype))
    if wts.b1 is not None:
        h = h + wts.b1.to(x.dtype)[:, None]
    y = torch.bmm(activation(s, h), wts.w2.to(x.dtype))
    if wts.b2 is not None:
        y = y + wts.b2.to(x.dtype)[:, None]
    return torch.einsum("sec,ecm->sm", combine.to(x.dtype), y)


def _empty_slot_output(s: MoESpec, wts: Weights, dtype) -> Tensor:
    """[E, H]: what each expert returns for an all-zero row (an empty slot)."""
    h = torch.zeros(wts.w1.shape[0], 1, wts.w1.shape[-1], dtype=dtype, device=wts.w1.device)
    if wts.b1 is not None:
        h = h + wts.b1.to(dtype)[:, None]
    y = torch.bmm(activation(s, h), wts.w2.to(dtype))
    if wts.b2 is not None:
        y = y + wts.b2.to(dtype)[:, None]
    return y[:, 0]


@torch.library.custom_op("moe_compile::experts_slots", mutates_args=())
def experts_slots(
    x: Tensor, dispatch: Tensor, combine: Tensor, gate: list[Tensor], up: list[Tensor], down: list[Tensor],
    b_gate: list[Tensor], b_up: list[Tensor], b_down: list[Tensor], spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    s = MoESpec.from_json(spec)
    if dispatch.shape != combine.shape or dispatch.shape[0] != x.shape[0]:
        raise RuntimeError(
            f"moe_compile::experts_slots: dispatch {tuple(dispatch.shape)} and combine {tuple(combine.shape)} "
            f"[tokens, experts, capacity] and x {tuple(x.shape)} [tokens, hidden] disagree; the block was fused "
            "because they agreed when traced. Compile with another backend to run this model's own code")
    lists = (gate, up, down, b_gate, b_up, b_down)
    ok, idx, w = slots_to_topk(dispatch, combine)
    rows = idx.numel()
    if not ok:
        out = _dense_slots(s, x, dispatch, combine, lists)
        return out, x.new_zeros(rows, 2 * s.ffn if s.gated else s.ffn), x.new_zeros(rows, s.hidden)
    out, h, y = kernels.forward(s, x, idx, w.to(x.dtype), canonical_weights(s, *lists), keep_outputs=True)
    return out, pad_rows(h, rows), pad_rows(y, rows)


@experts_slots.register_fake
def _experts_slots_fake(x, dispatch, combine, gate, up, down, b_gate, b_up, b_down, spec):
    s = MoESpec.from_json(spec)
    rows = dispatch.shape[0] * dispatch.shape[1]
    return torch.empty_like(x), x.new_empty(rows, 2 * s.ffn if s.gated else s.ffn), x.new_empty(rows, s.hidden)


@torch.library.custom_op("moe_compile::experts_slots_backward", mutates_args=())
def experts_slots_backward(
    grad: Tensor, x: Tensor, dispatch: Tensor, combine: Tensor, gate: list[Tensor], up: list[Tensor],
    down: list[Tensor], b_gate: list[Tensor], b_up: list[Tensor], b_down: list[Tensor], h: Tensor, y: Tensor, spec: str,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    s = MoESpec.from_json(spec)
    lists = (gate, up, down, b_gate, b_up, b_down)
    ok, idx, w = slots_to_topk(dispatch, combine)
    if not ok:
        with torch.enable_grad():
            _, vjp = torch.func.vjp(lambda x_, c_, ls: _dense_slots(s, x_, dispatch, c_, ls), x, combine,
                                    [list(t) for t in lists])
            dx, dc, dls = vjp(grad)
        return (dx, dc, *[[t.clone() for t in l] for l in dls])
    wts = canonical_weights(s, *lists)
    n_valid = int((idx < s.num_experts).sum())
    h, y = h[:n_valid], y[:n_valid]
    dx, _, dwts = kernels.backward(s, grad, x, idx, w.to(x.dtype), wts, h, y, kept_outputs=True)
    # d combine[s, e, c] = <grad[s], expert e's output at slot c>, for every slot (empty ones give MLP_e(0))
    E, C = dispatch.shape[1], dispatch.shape[2]
    y_slots = _empty_slot_output(s, wts, x.dtype)[:, None, :].expand(E, C, s.hidden).clone()
    plan = kernels.plan(x, idx, E, s)
    slot = dispatch.argmax(-1)[plan.tokens, plan.experts]
    y_slots[plan.experts, slot] = y
    d_combine = torch.einsum("sm,ecm->sec", grad.to(x.dtype), y_slots).to(combine.dtype)
    return (dx, d_combine, *weight_grads(s, dwts, *lists))


@experts_slots_backward.register_fake
def _experts_slots_backward_fake(grad, x, dispatch, combine, gate, up, down, b_gate, b_up, b_down, h, y, spec):
    like = lambda ts: [torch.empty_like(t) for t in ts]  # noqa: E731
    return (torch.empty_like(x), torch.empty_like(combine), like(gate), like(up), like(down), like(b_gate),
            like(b_up), like(b_down))


register_autograd(experts_slots, experts_slots_backward)
