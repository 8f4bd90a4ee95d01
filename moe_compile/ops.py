"""The ``moe_compile::`` custom ops: what a rewritten graph calls.

- ``moe_compile::experts``: dispatch -> expert MLPs -> weighted combine, fused (forward); returns the combined
  output and two tensors the backward reuses, one row per (token, slot) in sorted order: the first GEMM's output
  ``h`` and a ``[T*k, H]`` tensor that depends on the path (the ATen path: the gathered inputs; Triton: the
  unweighted expert outputs). Forward and backward of one call always take the same path (the device decides).
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

from .capture import keyed_experts_op
from .user_experts import find_expert_list, run_user_experts
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


def _path(x: Tensor, s: MoESpec | None = None):
    """The Triton kernels for CUDA tensors (fp32/bf16/fp16) when triton imports, else the ATen path (always for
    ``score_on_input``, which only the ATen path implements)."""
    if x.is_cuda and not (s is not None and s.score_on_input):
        from .codegen import triton_moe

        if triton_moe.is_available(x):
            return triton_moe
    return cpu


def _backend_forward(s, x, idx, w, wts):
    return _path(x, s).experts_forward(s, x, idx, w, wts)


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
    dx, dw, dwts = _path(x, s).experts_backward(s, grad_out, x, topk_idx, topk_weights, wts, h[:n_valid], y[:n_valid])
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


def _register_autograd(op, backward_op) -> None:
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


_register_autograd(experts_op, experts_backward_op)


def fused_experts(spec: MoESpec, x, topk_idx, topk_weights, gate=(), up=(), down=(), b_gate=(), b_up=(), b_down=()):
    """Call the fused op; returns ``[T, H]``."""
    return torch.ops.moe_compile.experts(
        x, topk_idx, topk_weights, list(gate), list(up), list(down), list(b_gate), list(b_up), list(b_down),
        spec.to_json(),
    )[0]


# --------------------------------------------------------------------------------------------- dispatch + combine
# Experts whose bodies are not a recognisable MLP: the dispatch (one sort, one gather) and the combine (one weighted
# index_add) are fused around the user's own expert modules, each run once on its contiguous slice of rows.


def _list_of(key: str) -> tuple[torch.nn.Module, list[str]]:
    from .capture import module_for

    module = module_for(key)
    _, experts = find_expert_list(module)
    return module, experts


def _run_dispatch_combine(key, params, x, idx, w):
    module, experts = _list_of(key)
    cpu.check_routing(idx, w, x, len(experts))
    names = [n for n, _ in module.named_parameters()]
    return run_user_experts(module, experts, names, params, x, idx, w)


dispatch_combine = keyed_experts_op("dispatch_combine", _run_dispatch_combine)


# --------------------------------------------------------------------------------------------- capacity slots
# GShard / fairseq / Tutel dispatch: ``dispatch`` and ``combine`` are [S, E, C] tensors over capacity slots, the
# experts run on ``einsum("sec,sm->ecm", dispatch, x)`` and the output is ``einsum("sec,ecm->sm", combine, y)``.
# When every slot holds at most one token, every token at most one slot per expert, dispatch is 0/1 and combine is
# zero off dispatch (what those routers build), the same output is the top-k form with k = E: no padded rows, no
# dense einsums. Otherwise the op computes the dense formula itself (same numbers, slower).


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
    wts = _weights(s, *lists)
    d = torch.einsum("sec,sm->ecm", dispatch.to(x.dtype), x)
    h = torch.bmm(d, wts.w1.to(x.dtype))
    if wts.b1 is not None:
        h = h + wts.b1.to(x.dtype)[:, None]
    y = torch.bmm(cpu.activation(s, h), wts.w2.to(x.dtype))
    if wts.b2 is not None:
        y = y + wts.b2.to(x.dtype)[:, None]
    return torch.einsum("sec,ecm->sm", combine.to(x.dtype), y)


def _empty_slot_output(s: MoESpec, wts: cpu.Weights, dtype) -> Tensor:
    """[E, H]: what each expert returns for an all-zero row (an empty slot)."""
    h = torch.zeros(wts.w1.shape[0], 1, wts.w1.shape[-1], dtype=dtype, device=wts.w1.device)
    if wts.b1 is not None:
        h = h + wts.b1.to(dtype)[:, None]
    y = torch.bmm(cpu.activation(s, h), wts.w2.to(dtype))
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
    out, (h, y) = cpu.experts_forward(s, x, idx, w.to(x.dtype), _weights(s, *lists), save_y=True)
    return out, _pad_rows(h, rows), _pad_rows(y, rows)


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
    wts = _weights(s, *lists)
    n_valid = int((idx < s.num_experts).sum())
    h, y = h[:n_valid], y[:n_valid]
    dx, _, dwts = cpu.experts_backward(s, grad, x, idx, w.to(x.dtype), wts, h)
    # d combine[s, e, c] = <grad[s], expert e's output at slot c>, for every slot (empty ones give MLP_e(0))
    E, C = dispatch.shape[1], dispatch.shape[2]
    y_slots = _empty_slot_output(s, wts, x.dtype)[:, None, :].expand(E, C, s.hidden).clone()
    plan = cpu.make_plan(idx, E)
    slot = dispatch.argmax(-1)[plan.tokens, plan.experts]
    y_slots[plan.experts, slot] = y
    d_combine = torch.einsum("sm,ecm->sec", grad.to(x.dtype), y_slots).to(combine.dtype)
    return (dx, d_combine, *cpu.weight_grads(s, dwts, *lists))


@experts_slots_backward.register_fake
def _experts_slots_backward_fake(grad, x, dispatch, combine, gate, up, down, b_gate, b_up, b_down, h, y, spec):
    like = lambda ts: [torch.empty_like(t) for t in ts]  # noqa: E731
    return (torch.empty_like(x), torch.empty_like(combine), like(gate), like(up), like(down), like(b_gate),
            like(b_up), like(b_down))


_register_autograd(experts_slots, experts_slots_backward)
