"""The Triton kernel backend's launchers: the dispatch plan and the forward / backward of the fused experts
(CUDA tensors; under ``TRITON_INTERPRET=1`` also CPU tensors).

Same contract as the ATen backend (``moe_compile.kernels.aten``), computed by five GEMM-shaped kernels
that share one dispatch plan, in the style of Triton's matmul tutorial (constexpr blocks, explicit masks, grouped
program ordering) with the ScatterMoE / vLLM ``fused_moe`` ideas:

    plan      order = stable argsort of idx.flatten(); sorted_ids = the sorted row list, each expert's slice padded
              to BLOCK_M with a sentinel (vLLM's moe_align_block_size); block_expert = the expert of each row block.
              Activations are never copied into a padded buffer: kernels gather rows through the index list.
    forward   gemm1_kernel        h = x[order // k] @ W1[e] (+ b1)  -> writes h and a = act(h)
              gemm_scatter_kernel y = a @ W2[e] (+ b2)              -> writes y and y * w into a [T*k, H] buffer
              out = buffer.view(T, k, H).sum(1)                      (deterministic; atomics only when asked)
    backward  gemm_dact_kernel    da = (grad_out[tok] @ W2[e]^T) * w  -> writes dh = act'(h, da), recomputed a,
                                   and d(routing weight) = <grad_out[tok], y> in the same pass over grad_out
              wgrad_kernel        dW1 = x[tok]^T dh, db1 = sum dh; dW2 = a^T (grad_out[tok] * w), db2 = sum ...
                                   (one program per (expert, output tile), looping over that expert's rows)
              gemm_scatter_kernel dx = dh @ W1[e]^T scattered per (token, slot), summed over k

"""
from __future__ import annotations

import contextlib

import torch

from ... import activations
from ...spec import MoESpec
from ..common import Weights
from .kernels import (
    DTYPES, HAS_TRITON, INTERPRET, align_kernel, gemm1_kernel, gemm_dact_kernel, gemm_scatter_atomic_kernel,
    gemm_scatter_kernel, triton, wgrad_kernel,
)


# ============================================================================================ dispatch plan
class Plan:
    """Dispatch plan shared by all kernels of one forward or backward.

    ``order [S]`` (int32): flat (token, slot) index of each sorted row, S = number of non-dropped pairs;
    ``starts [E+1]`` (int32): first sorted row of each expert; ``sorted_ids [num_blocks * BLOCK_M]`` (int32):
    sorted row ids per row block, ``S`` as padding; ``block_expert [num_blocks]`` (int32): expert of each row
    block, -1 for the unused tail (``num_blocks`` is an upper bound, so no second host sync is needed)."""

    def __init__(self, idx: torch.Tensor, num_experts: int, block_m: int | None = None):
        flat = idx.reshape(-1)
        if flat.dtype not in (torch.int32, torch.int64):
            flat = flat.long()
        E = num_experts
        self.top_k = idx.shape[-1] if idx.dim() > 1 else 1
        sorted_e, order = torch.sort(flat, stable=True)  # deterministic; dropped (== E) pairs sort last
        bounds = torch.arange(E + 1, device=flat.device, dtype=sorted_e.dtype)
        self.starts = torch.searchsorted(sorted_e, bounds).to(torch.int32)
        self.n_valid = n = int(self.starts[-1])  # the one host sync: output shapes depend on it
        self.order = order[:n].to(torch.int32)
        self.block_m = bm = block_m or _block_m(n, E)
        counts = self.starts[1:] - self.starts[:-1]
        self.block_starts = torch.zeros(E + 1, dtype=torch.int32, device=flat.device)
        self.block_starts[1:] = torch.cumsum((counts + bm - 1) // bm, 0)
        self.num_blocks = (n + bm - 1) // bm + min(E, n)  # >= sum over experts of ceil(count / bm)
        self.sorted_ids = torch.empty(self.num_blocks * bm, dtype=torch.int32, device=flat.device)
        self.block_expert = torch.empty(self.num_blocks, dtype=torch.int32, device=flat.device)
        if n:
            align_kernel[(self.num_blocks,)](self.starts, self.block_starts, self.sorted_ids, self.block_expert, n, E,
                                              BLOCK_M=bm, BLOCK_E=triton.next_power_of_2(E))


def _block_m(n_valid: int, num_experts: int) -> int:
    """Row block size: small when experts get few rows (less padding), 128 for large per-expert GEMMs."""
    if INTERPRET:
        return 16
    avg = n_valid / max(num_experts, 1)
    return 16 if avg <= 16 else 32 if avg <= 48 else 64 if avg <= 192 else 128


def make_plan(idx: torch.Tensor, num_experts: int, block_m: int | None = None) -> Plan:
    return Plan(idx, num_experts, block_m)



# ============================================================================================ launchers
def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _precision(dtype: torch.dtype) -> str:
    # float32 follows torch's matmul setting: TF32 only when torch would use it too
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _gate(spec: MoESpec) -> tuple[int, int, int]:
    """(GATE code of gemm1_kernel, COL_MUL, up_off): the gate column of a's column j is j * COL_MUL, its up column
    j * COL_MUL + up_off."""
    if not spec.gated:
        return 0, 1, 0
    return (2, 2, 1) if spec.gate_layout == "interleaved" else (1, 1, spec.ffn)


def _check(spec: MoESpec, x: torch.Tensor):
    if not HAS_TRITON:
        raise RuntimeError("the Triton MoE path needs triton")
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton MoE path takes {DTYPES}, got {x.dtype}")
    if spec.activation == "swiglu_oai" and not spec.gated:
        raise ValueError("swiglu_oai needs a gated layout")


def _rows_grid(plan: Plan, n_cols: int):
    return lambda meta: (plan.num_blocks * triton.cdiv(n_cols, meta["BLOCK_N"]),)


def _scatter(plan, a, w, b, y, rw, out_rows: int, out_dtype, deterministic: bool):
    """Launch the scatter GEMM: ``a [S, K] @ w[e] (+ b) [* rw]`` summed per token -> ``[T, N]``; stores the
    unweighted product into ``y`` when given."""
    k, N, K = plan.top_k, w.shape[-1], w.shape[-2]
    T = out_rows
    if deterministic:  # one row per (token, slot), then a plain sum over slots
        buf = a.new_zeros if plan.n_valid < T * k else a.new_empty
        out = buf(T * k, N, dtype=out_dtype)
        kernel = gemm_scatter_kernel
    else:
        out = a.new_zeros(T, N, dtype=torch.float32)
        kernel = gemm_scatter_atomic_kernel
    if plan.n_valid:
        bias = b if b is not None else w
        kernel[_rows_grid(plan, N)](
            a, w, bias, y if y is not None else out, out, rw if rw is not None else out, plan.sorted_ids, plan.order,
            plan.block_expert, plan.n_valid, k, N, K, plan.num_blocks,
            a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
            bias.stride(0) if b is not None else 0, bias.stride(-1) if b is not None else 0,
            y.stride(0) if y is not None else 0, y.stride(1) if y is not None else 0, out.stride(0), out.stride(1),
            HAS_BIAS=b is not None, WRITE_Y=y is not None, WEIGHTED=rw is not None, ATOMIC=not deterministic,
            PREC=_precision(a.dtype), BLOCK_M=plan.block_m,
        )
    if not deterministic:
        return out.to(out_dtype)
    return out if k == 1 else out.view(T, k, N).sum(1)


def _wgrad(plan, a, b, rw, M: int, N: int, E: int, a_gather: bool, b_gather: bool, with_db: bool, dtype):
    dw = a.new_empty(E, M, N, dtype=dtype)
    db = a.new_empty(E, N, dtype=dtype) if with_db else None
    wgrad_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), E)](
        a, b, rw if rw is not None else a, dw, db if with_db else dw, plan.starts, plan.order, plan.top_k, M, N,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        db.stride(0) if with_db else 0, db.stride(1) if with_db else 0,
        A_GATHER=a_gather, B_GATHER=b_gather, B_WEIGHTED=rw is not None, HAS_DB=with_db, PREC=_precision(a.dtype),
    )
    return dw, db


def experts_forward(spec: MoESpec, x, idx, w, wts: Weights, *, deterministic: bool = True, save: bool = True):
    """As the ATen backend's forward: ``(out [T, H], (h [S, N], y [S, H]))`` with h and y in sorted order.
    ``deterministic=False`` combines with float atomics instead of the [T*k, H] buffer; ``save=False`` (inference)
    writes neither h nor y and returns ``(out, (None, None))``."""
    _check(spec, x)
    dt = x.dtype
    T, H = x.shape
    F = spec.ffn
    w1, w2 = wts.w1.to(dt), wts.w2.to(dt)
    N = w1.shape[-1]
    with _device(x):
        plan = make_plan(idx, spec.num_experts)
        S = plan.n_valid
        a = x.new_empty(S, F)
        h, y = (x.new_empty(S, N), x.new_empty(S, H)) if save else (None, None)
        if S:
            gate, _, up_off = _gate(spec)
            b1, hh = wts.b1, h if save else a
            gemm1_kernel[_rows_grid(plan, F)](
                x, w1, b1 if b1 is not None else w1, hh, a, plan.sorted_ids, plan.order, plan.block_expert,
                S, plan.top_k, F, H, up_off, plan.num_blocks, float(spec.act_alpha), float(spec.act_limit),
                x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
                b1.stride(0) if b1 is not None else 0, b1.stride(1) if b1 is not None else 0,
                hh.stride(0), hh.stride(1), a.stride(0), a.stride(1),
                ACT=activations.get(spec.activation).code, GATE=gate, HAS_BIAS=b1 is not None, WRITE_H=save,
                PREC=_precision(dt), BLOCK_M=plan.block_m,
            )
        out = _scatter(plan, a, w2, wts.b2, y, w.reshape(-1).contiguous(), T, dt, deterministic)
    return out, (h, y)


def experts_backward(spec: MoESpec, grad_out, x, idx, w, wts: Weights, h, y, *, deterministic: bool = True):
    """As the ATen backend's backward: ``(dx, dw shaped like w, Weights(dw1, dw2, db1, db2))``; ``h`` and ``y``
    are the forward's (rows past S, as the op's zero padding, are not read)."""
    _check(spec, x)
    dt = x.dtype
    T, H = x.shape
    F, E = spec.ffn, spec.num_experts
    w1, w2 = wts.w1.to(dt), wts.w2.to(dt)
    N = w1.shape[-1]
    g = grad_out.to(dt)
    rw = w.reshape(-1).contiguous()
    with _device(x):
        plan = make_plan(idx, E)
        S = plan.n_valid
        dw = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        if not S:  # every pair dropped
            zeros = lambda t: None if t is None else torch.zeros(t.shape, dtype=dt, device=x.device)  # noqa: E731
            return torch.zeros_like(x), dw.view(w.shape), Weights(*map(zeros, (w1, w2, wts.b1, wts.b2)))
        # da = w * grad_out[tok] @ W2^T -> dh, a (recomputed) and d(routing weights)
        dh, a = x.new_empty(S, N), x.new_empty(S, F)
        _, col_mul, up_off = _gate(spec)
        gemm_dact_kernel[_rows_grid(plan, F)](
            g, w2, h, y, rw, dh, a, dw, plan.sorted_ids, plan.order, plan.block_expert,
            S, plan.top_k, F, H, up_off, plan.num_blocks, float(spec.act_alpha), float(spec.act_limit),
            g.stride(0), g.stride(1), w2.stride(0), w2.stride(2), w2.stride(1), h.stride(0), h.stride(1),
            y.stride(0), y.stride(1), dh.stride(0), dh.stride(1), a.stride(0), a.stride(1),
            ACT=activations.get(spec.activation).code, GATED=spec.gated, COL_MUL=col_mul, PREC=_precision(dt),
            BLOCK_M=plan.block_m,
        )
        # dW1 = x[tok]^T dh (+ db1 = sum dh); dW2 = a^T (grad_out[tok] * w) (+ db2 = sum of the same)
        dw1, db1 = _wgrad(plan, x, dh, None, H, N, E, True, False, wts.b1 is not None, dt)
        dw2, db2 = _wgrad(plan, a, g, rw, F, H, E, False, True, wts.b2 is not None, dt)
        # dx = sum over slots of dh @ W1[e]^T (W1^T through strides)
        dx = _scatter(plan, dh, w1.transpose(1, 2), None, None, None, T, dt, deterministic)
    return dx, dw.view(w.shape), Weights(dw1, dw2, db1, db2)
