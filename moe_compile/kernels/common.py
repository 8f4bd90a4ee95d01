"""What every kernel backend shares: the canonical expert weights and their gradients' way back, the dispatch
plan (stable sort of the (token, slot) pairs by expert), the routing check, the whole activation of a spec (torch
formula) and the per-token reference the tests compare with."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import activations
from ..spec import MoESpec


# ----------------------------------------------------------------------------------------------- activation
def split_gate_up(spec: MoESpec, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.gate_layout == "interleaved":
        return h[..., 0::2], h[..., 1::2]
    return h[..., : spec.ffn], h[..., spec.ffn :]


def activation(spec: MoESpec, h: torch.Tensor) -> torch.Tensor:
    """``[S, N] -> [S, F]``: the expert's activation, gated or not, as the spec says."""
    if not spec.gated:
        return activations.elementwise(spec.activation).forward(h)
    gate, up = split_gate_up(spec, h)
    if spec.activation == "swiglu_oai":
        gate = gate.clamp(max=spec.act_limit)
        up = up.clamp(min=-spec.act_limit, max=spec.act_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * spec.act_alpha))
    return activations.elementwise(spec.activation).forward(gate) * up



# ----------------------------------------------------------------------------------------------- weights
@dataclass
class Weights:
    """Canonical views of the expert weights: ``w1 [E, H, N]``, ``w2 [E, F, H]``, biases ``b1 [E, N]``,
    ``b2 [E, H]`` (or None)."""

    w1: torch.Tensor
    w2: torch.Tensor
    b1: torch.Tensor | None
    b2: torch.Tensor | None


def _stack(spec: MoESpec, ts: list[torch.Tensor]) -> torch.Tensor:
    w = ts[0] if spec.stacked else torch.stack(ts)
    return w.transpose(-1, -2) if spec.weight_layout == "out_in" else w


def _stack_bias(spec: MoESpec, ts: list[torch.Tensor]) -> torch.Tensor | None:
    if not ts:
        return None
    return ts[0] if spec.stacked else torch.stack(ts)


def canonical_weights(spec: MoESpec, gate, up, down, b_gate, b_up, b_down) -> Weights:
    w1 = _stack(spec, up)
    b1 = _stack_bias(spec, b_up)
    if spec.gate_layout == "separate":
        w1 = torch.cat([_stack(spec, gate), w1], dim=-1)
        if b1 is not None:
            b1 = torch.cat([_stack_bias(spec, b_gate), b1], dim=-1)
    return Weights(w1, _stack(spec, down), b1, _stack_bias(spec, b_down))


def _unstack(spec: MoESpec, g: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    if spec.weight_layout == "out_in":
        g = g.transpose(-1, -2)
    if spec.stacked:
        return [g.contiguous().to(like[0].dtype)]
    # unbind gives views of one tensor; a custom op may not return aliases
    return [t.to(r.dtype, copy=True, memory_format=torch.contiguous_format) for t, r in zip(g.unbind(0), like)]


def _unstack_bias(spec: MoESpec, g: torch.Tensor | None, like: list[torch.Tensor]) -> list[torch.Tensor]:
    if not like:
        return []
    if spec.stacked:
        return [g.to(like[0].dtype)]
    return [t.to(r.dtype, copy=True) for t, r in zip(g.unbind(0), like)]


def weight_grads(spec: MoESpec, d: Weights, gate, up, down, b_gate, b_up, b_down):
    """Map gradients of the canonical weights back onto the op's weight inputs, in their own layout."""
    d1, db1 = d.w1, d.b1
    d_gate, d_b_gate = [], []
    if spec.gate_layout == "separate":
        # split into fresh tensors: a custom op may not return two views of one buffer
        d_gate = _unstack(spec, d1[..., : spec.ffn].clone(), gate)
        d1 = d1[..., spec.ffn :].clone()
        if db1 is not None:
            d_b_gate = _unstack_bias(spec, db1[..., : spec.ffn].clone(), b_gate)
            db1 = db1[..., spec.ffn :].clone()
    return (
        d_gate,
        _unstack(spec, d1, up),
        _unstack(spec, d.w2, down),
        d_b_gate,
        _unstack_bias(spec, db1, b_up),
        _unstack_bias(spec, d.b2, b_down),
    )




# ----------------------------------------------------------------------------------------------- dispatch plan
@dataclass
class Plan:
    order: torch.Tensor  # [S_valid] flat (token, slot) positions, grouped by expert
    tokens: torch.Tensor  # [S_valid] token of each sorted row
    experts: torch.Tensor  # [S_valid] expert of each sorted row
    offs: torch.Tensor  # [E] int32 cumulative row counts
    offs_list: list[int]


def make_plan(idx: torch.Tensor, num_experts: int) -> Plan:
    k = idx.shape[-1]
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    offs_list = offs.tolist()
    n_valid = offs_list[-1] if offs_list else 0
    sorted_e, order = torch.sort(flat, stable=True)
    order, sorted_e = order[:n_valid], sorted_e[:n_valid]
    return Plan(order, torch.div(order, k, rounding_mode="floor"), sorted_e, offs, offs_list)


def check_routing(idx: torch.Tensor, w: torch.Tensor, x: torch.Tensor, num_experts: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"hidden states must be [tokens, hidden], got shape {tuple(x.shape)}")
    if idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx must be [tokens={x.shape[0]}, k], got shape {tuple(idx.shape)}")
    if w.shape != idx.shape:
        raise ValueError(f"topk_weights shape {tuple(w.shape)} differs from topk_idx shape {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"topk_idx must be an integer tensor, got {idx.dtype}")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi > num_experts:
            raise ValueError(f"expert ids must lie in [0, {num_experts}] ({num_experts} = dropped), got [{lo}, {hi}]")




# ----------------------------------------------------------------------------------------------- reference
def reference_experts(spec: MoESpec, x, idx, w, wts: Weights) -> torch.Tensor:
    """The definition, one token at a time (for tests; slow)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e == spec.num_experts:
                continue
            xt, wt = (x[t] * w[t, j], 1) if spec.score_on_input else (x[t], w[t, j])
            h = xt @ wts.w1[e]
            if wts.b1 is not None:
                h = h + wts.b1[e]
            y = activation(spec, h) @ wts.w2[e]
            if wts.b2 is not None:
                y = y + wts.b2[e]
            out[t] += y * wt
    return out

