"""The Triton path of the fused MoE experts op (CUDA tensors; under ``TRITON_INTERPRET=1`` also CPU tensors).

Same contract as :mod:`.cpu` (``experts_forward`` / ``experts_backward``), computed by five GEMM-shaped kernels
that share one dispatch plan, in the style of Triton's matmul tutorial (constexpr blocks, explicit masks, grouped
program ordering) with the ScatterMoE / vLLM ``fused_moe`` ideas:

    plan      order = stable argsort of idx.flatten(); sorted_ids = the sorted row list, each expert's slice padded
              to BLOCK_M with a sentinel (vLLM's moe_align_block_size); block_expert = the expert of each row block.
              Activations are never copied into a padded buffer: kernels gather rows through the index list.
    forward   _gemm1_kernel        h = x[order // k] @ W1[e] (+ b1)  -> writes h and a = act(h)
              _gemm_scatter_kernel y = a @ W2[e] (+ b2)              -> writes y and y * w into a [T*k, H] buffer
              out = buffer.view(T, k, H).sum(1)                      (deterministic; atomics only when asked)
    backward  _gemm_dact_kernel    da = (grad_out[tok] @ W2[e]^T) * w  -> writes dh = act'(h, da), recomputed a,
                                   and d(routing weight) = <grad_out[tok], y> in the same pass over grad_out
              _wgrad_kernel        dW1 = x[tok]^T dh, db1 = sum dh; dW2 = a^T (grad_out[tok] * w), db2 = sum ...
                                   (one program per (expert, output tile), looping over that expert's rows)
              _gemm_scatter_kernel dx = dh @ W1[e]^T scattered per (token, slot), summed over k

Plus a routing kernel (logits -> scores -> optional group-limited top-k -> weights) and its torch reference.
All GEMMs accumulate in float32; inputs may be float32, bfloat16 or float16.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..spec import MoESpec
from . import cpu

try:  # the module imports without triton; is_available() then says False
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    triton = tl = None
    _HAS_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ACT_CODES = {n: i for i, n in enumerate(("silu", "gelu", "gelu_tanh", "relu", "sigmoid", "identity", "swiglu_oai"))}


def is_available(x: torch.Tensor) -> bool:
    """Whether this path can run ``x``: a CUDA tensor of a dtype the kernels take, with triton importable."""
    return _HAS_TRITON and x.is_cuda and x.dtype in _DTYPES


def fix_old_interpreter() -> None:
    """For TRITON_INTERPRET runs (tests, dry runs) only: triton < 3.7's interpreter turns a scalar into a loop bound
    with ``int(array of shape (1,))``, an error from numpy 2.4 on, so even tutorial 03's
    ``for k in range(tl.cdiv(K, BLOCK_K))`` fails there. Patches in the later releases' ``squeeze()``; a no-op
    where the interpreter already has it. Never called by the kernels' own code."""
    import inspect

    from triton.runtime import interpreter

    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_moe_fixed", False) or "squeeze" in inspect.getsource(orig):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._moe_fixed = True
    interpreter._patch_lang_tensor = patched


def _jit(fn):
    return triton.jit(fn) if _HAS_TRITON else fn


def _autotune(configs, key, **kw):
    return (lambda fn: triton.autotune(configs=configs, key=key, **kw)(fn)) if _HAS_TRITON else (lambda fn: fn)


def _configs(rows: list[tuple], names: tuple[str, ...]) -> list:
    """``(block..., num_warps, num_stages)`` tuples -> ``triton.Config`` list."""
    if not _HAS_TRITON:
        return []
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


# Row-block GEMMs (BLOCK_M comes from the plan, see _block_m): (BLOCK_N, BLOCK_K, GROUP_M, warps, stages), the
# first of each list a sound default. The interpreter runs one small config (fast on CPU, and smaller than the test
# shapes so that the masks are exercised).
_ROW_CFG = [(32, 32, 4, 4, 1)] if _INTERPRET else [
    (128, 64, 8, 8, 3), (64, 64, 8, 4, 4), (128, 32, 8, 4, 4), (256, 64, 8, 8, 3), (64, 128, 8, 4, 3)]
_GATED_CFG = [(32, 32, 4, 4, 1)] if _INTERPRET else [  # two accumulators: half the BLOCK_N of _ROW_CFG
    (64, 64, 8, 8, 3), (64, 64, 8, 4, 4), (128, 64, 8, 8, 3), (32, 64, 8, 4, 4), (64, 128, 8, 8, 3)]
# Weight-gradient GEMMs: (BLOCK_M, BLOCK_N, BLOCK_K over the expert's rows, GROUP_M, warps, stages).
_WGRAD_CFG = [(32, 32, 16, 4, 4, 1)] if _INTERPRET else [
    (128, 128, 32, 8, 8, 3), (128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4),
    (128, 256, 32, 8, 8, 3)]
_ROW_NAMES = ("BLOCK_N", "BLOCK_K", "GROUP_M")
_WGRAD_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


# ============================================================================================ device helpers
@_jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tutorial 03's grouped ordering: GROUP_M row blocks share each column block (better L2 reuse)."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + ((pid % in_group) % size_m), (pid % in_group) // size_m


_UPCAST_BF16_DOT = tl.constexpr(_INTERPRET) if _HAS_TRITON else _INTERPRET


@_jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b``. The interpreter holds bfloat16 as raw uint16 and its dot would multiply those, so under
    TRITON_INTERPRET the operands are upcast first (compiled kernels are unaffected)."""
    if _UPCAST_BF16_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@_jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@_jit
def _act(x, ACT: tl.constexpr):
    """Elementwise activation (codes as _ACT_CODES), float32 in and out."""
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 3:
        y = tl.maximum(x, 0.0)
    elif ACT == 4:
        y = tl.sigmoid(x)
    else:
        y = x
    return y


@_jit
def _act_grad(x, ACT: tl.constexpr):
    """d act / dx, matching autograd (relu: 0 at 0)."""
    if ACT == 0:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 3:
        d = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 4:
        s = tl.sigmoid(x)
        d = s * (1.0 - s)
    else:
        d = x * 0.0 + 1.0
    return d


@_jit
def _glu(g, u, alpha, limit, ACT: tl.constexpr):
    """Gated activation ``act(gate) * up`` (swiglu_oai: clamped, ``(up + 1) * g * sigmoid(alpha * g)``)."""
    if ACT == 6:
        gc = tl.minimum(g, limit)
        a = (tl.minimum(tl.maximum(u, -limit), limit) + 1.0) * gc * tl.sigmoid(gc * alpha)
    else:
        a = _act(g, ACT) * u
    return a


@_jit
def _glu_bwd(g, u, da, alpha, limit, ACT: tl.constexpr):
    """Returns (d gate, d up) of _glu given d out; clamp passes gradient on its closed interval, as autograd."""
    if ACT == 6:
        gc = tl.minimum(g, limit)
        s = tl.sigmoid(gc * alpha)
        du = tl.where((u >= -limit) & (u <= limit), da * gc * s, 0.0)
        up1 = tl.minimum(tl.maximum(u, -limit), limit) + 1.0
        dg = tl.where(g <= limit, da * up1 * (s + gc * alpha * s * (1.0 - s)), 0.0)
    else:
        du = da * _act(g, ACT)
        dg = da * u * _act_grad(g, ACT)
    return dg, du


@_jit
def _plan_rows(sorted_ids_ptr, order_ptr, pid_m, n_valid, top_k, BLOCK_M: tl.constexpr):
    """Rows of one row block: sorted row ids, their validity, (token, slot) pair ids and token ids (int64)."""
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < n_valid
    pair = tl.load(order_ptr + rows, mask=row_ok, other=0)
    return rows.to(tl.int64), row_ok, pair.to(tl.int64), (pair // top_k).to(tl.int64)


# ============================================================================================ routing
@_jit
def _route_kernel(
    logits_ptr, bias_ptr, w_out_ptr, idx_out_ptr, group_size, stride_t, stride_e, scaling,
    K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr, GROUP_TOP2: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One token per program. The row is held as an [n_group, experts per group] tile so that group-limited
    selection is two reductions; top-k is K rounds of argmax (lowest expert id on ties)."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_EG)[None, :]
    valid = (g < N_GROUP) & (j < group_size)
    e = g * group_size + j
    key = tl.where(valid, e, BLOCK_G * BLOCK_EG)  # expert id, or a sentinel above all ids
    x = tl.load(logits_ptr + t * stride_t + e * stride_e, mask=valid, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        s = tl.where(valid, tl.sigmoid(x), 0.0)
    else:
        p = tl.exp(x - tl.max(tl.max(x, 1), 0))
        s = p / tl.sum(tl.sum(p, 1), 0)
    sel = s  # selection score: the score plus the (selection-only) bias correction
    if HAS_BIAS:
        sel = s + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    sel = tl.where(valid, sel, float("-inf"))
    if N_GROUP > 1:
        # group score: best member (DeepSeek-V2), or sum of the best two when a bias is given (DeepSeek-V3)
        best = tl.max(sel, 1)
        gscore = best
        if GROUP_TOP2:
            first = tl.min(tl.where(sel == best[:, None], j, BLOCK_EG), 1)
            gscore = best + tl.max(tl.where(j == first[:, None], float("-inf"), sel), 1)
        gi = tl.arange(0, BLOCK_G)
        gscore = tl.where(gi < N_GROUP, gscore, float("-inf"))
        keep = gi < 0
        for _ in tl.static_range(TOPK_GROUP):
            pick = tl.min(tl.where(gscore == tl.max(gscore, 0), gi, BLOCK_G), 0)
            keep = keep | (gi == pick)
            gscore = tl.where(gi == pick, float("-inf"), gscore)
        sel = tl.where(keep[:, None], sel, float("-inf"))
    kk = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
    for i in tl.static_range(K):
        m = tl.max(tl.max(sel, 1), 0)
        pick = tl.min(tl.min(tl.where(sel == m, key, BLOCK_G * BLOCK_EG), 1), 0)
        top_w = tl.where(kk == i, tl.sum(tl.sum(tl.where(key == pick, s, 0.0), 1), 0), top_w)
        top_i = tl.where(kk == i, pick, top_i)
        sel = tl.where(key == pick, float("-inf"), sel)
    if RENORM:
        top_w = top_w / tl.sum(top_w, 0)
    tl.store(w_out_ptr + t * K + kk, top_w * scaling, mask=kk < K)
    tl.store(idx_out_ptr + t * K + kk, top_i, mask=kk < K)


def _check_route_args(logits, top_k, score, n_group, topk_group):
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got {tuple(logits.shape)}")
    E = logits.shape[1]
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    if E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"{E} experts do not split into {n_group} groups with topk_group={topk_group}")
    if not 1 <= top_k <= topk_group * (E // n_group):
        raise ValueError(f"top_k={top_k} exceeds the {topk_group * (E // n_group)} experts selectable")


def route(logits, top_k, *, score="softmax", renormalize=False, bias=None, n_group=1, topk_group=1, scaling=1.0):
    """Router logits ``[T, E]`` -> ``(topk_weights [T, k] float32, topk_idx [T, k] int64)``, best first.

    ``score``: softmax or sigmoid of the logits. ``bias``: ``[E]`` correction added for selection only (weights
    are the plain scores). ``n_group``/``topk_group``: keep only the best ``topk_group`` of ``n_group`` expert
    groups before top-k (others masked to -inf, as vLLM). ``renormalize``: weights sum to one. ``scaling``: final
    factor. Not differentiable (selection only)."""
    _check_route_args(logits, top_k, score, n_group, topk_group)
    T, E = logits.shape
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return w, idx
    gs = E // n_group
    with _device(logits):
        _route_kernel[(T,)](
            logits, bias if bias is not None else logits, w, idx, gs, logits.stride(0), logits.stride(1),
            float(scaling), K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, SIGMOID=score == "sigmoid",
            HAS_BIAS=bias is not None, GROUP_TOP2=bias is not None, RENORM=bool(renormalize),
            BLOCK_G=triton.next_power_of_2(n_group), BLOCK_EG=triton.next_power_of_2(gs),
            BLOCK_K=triton.next_power_of_2(top_k),
        )
    return w, idx


def route_reference(logits, top_k, *, score="softmax", renormalize=False, bias=None, n_group=1, topk_group=1,
                    scaling=1.0):
    """Torch definition of :func:`route` (float32 math)."""
    _check_route_args(logits, top_k, score, n_group, topk_group)
    T, E = logits.shape
    s = logits.float().softmax(-1) if score == "softmax" else logits.float().sigmoid()
    sel = s if bias is None else s + bias.float()
    if n_group > 1:
        grouped = sel.view(T, n_group, E // n_group)
        gscore = grouped.topk(2, -1).values.sum(-1) if bias is not None else grouped.max(-1).values
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gscore.topk(topk_group, -1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // n_group, 1), float("-inf"))
    idx = sel.topk(top_k, -1).indices
    w = s.gather(1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * scaling, idx


# ============================================================================================ dispatch plan
@_jit
def _align_kernel(starts_ptr, block_starts_ptr, sorted_ids_ptr, block_expert_ptr, n_valid, num_experts,
                  BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program per row block: find its expert (the number of experts whose blocks end at or before it), then
    write the expert id and that block's sorted row ids, padded to BLOCK_M with the sentinel ``n_valid``. Blocks
    past the last expert's get expert -1."""
    b = tl.program_id(0)
    eo = tl.arange(0, BLOCK_E)
    ends = tl.load(block_starts_ptr + 1 + eo, mask=eo < num_experts, other=2147483647)
    e = tl.sum((ends <= b).to(tl.int32), 0)
    used = e < num_experts
    tl.store(block_expert_ptr + b, tl.where(used, e, -1))
    e = tl.minimum(e, num_experts - 1)
    row0 = tl.load(starts_ptr + e)
    row1 = tl.where(used, tl.load(starts_ptr + e + 1), row0)  # unused blocks: all padding
    rows = row0 + (b - tl.load(block_starts_ptr + e)) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(sorted_ids_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M), tl.where(rows < row1, rows, n_valid))


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
            _align_kernel[(self.num_blocks,)](self.starts, self.block_starts, self.sorted_ids, self.block_expert, n, E,
                                              BLOCK_M=bm, BLOCK_E=triton.next_power_of_2(E))


def _block_m(n_valid: int, num_experts: int) -> int:
    """Row block size: small when experts get few rows (less padding), 128 for large per-expert GEMMs."""
    if _INTERPRET:
        return 16
    avg = n_valid / max(num_experts, 1)
    return 16 if avg <= 16 else 32 if avg <= 48 else 64 if avg <= 192 else 128


def make_plan(idx: torch.Tensor, num_experts: int, block_m: int | None = None) -> Plan:
    return Plan(idx, num_experts, block_m)


# ============================================================================================ grouped GEMMs
@_autotune(_configs(_GATED_CFG, _ROW_NAMES), key=["F", "K", "BLOCK_M", "GATE"])
@_jit
def _gemm1_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr, a_ptr, sorted_ids_ptr, order_ptr, block_expert_ptr,
    n_valid, top_k, F, K, up_off, num_m_blocks, alpha, limit,
    stride_xt, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bn,
    stride_hm, stride_hn, stride_am, stride_an,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h = x[tok] @ W1[e] (+ b1) and a = act(h), for one [BLOCK_M, BLOCK_N] tile of a. GATE 0 (plain MLP): h columns
    are a's columns. GATE 1 (concat / separate): a second accumulator for the up columns ``n + up_off``. GATE 2
    (interleaved): one accumulator over the 2 * BLOCK_N contiguous columns (gate, up, gate, ...), split in the
    epilogue (a stride-2 weight load would not vectorise)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m_blocks, tl.cdiv(F, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows, row_ok, pair, tok = _plan_rows(sorted_ids_ptr, order_ptr, pid_m, n_valid, top_k, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of a
    n_ok = offs_n < F
    if GATE == 2:
        cols = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # columns of h and W1 of the main accumulator
        cols_ok = cols < 2 * F
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    else:
        cols = offs_n
        cols_ok = n_ok
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    col_u = offs_n + up_off
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk  # the gather, fused into the load
    w_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    wu_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + col_u[None, :] * stride_wn
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(xt, tl.load(w_ptrs, mask=k_ok[:, None] & cols_ok[None, :], other=0.0), acc, PREC)
        if GATE == 1:
            acc_u = _dot(xt, tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc_u, PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * stride_be + cols * stride_bn, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
        if GATE == 1:
            acc_u += tl.load(b_ptr + e * stride_be + col_u * stride_bn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if WRITE_H:
        tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hn, acc,
                 mask=row_ok[:, None] & cols_ok[None, :])
        if GATE == 1:
            tl.store(h_ptr + rows[:, None] * stride_hm + col_u[None, :] * stride_hn, acc_u,
                     mask=row_ok[:, None] & n_ok[None, :])
    if GATE == 0:
        act = _act(acc, ACT)
    elif GATE == 1:
        act = _glu(acc, acc_u, alpha, limit, ACT)
    else:
        gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
        act = _glu(gate, up, alpha, limit, ACT)
    tl.store(a_ptr + rows[:, None] * stride_am + offs_n[None, :] * stride_an, act,
             mask=row_ok[:, None] & n_ok[None, :])


@_jit
def _gemm_scatter_body(
    a_ptr, w_ptr, b_ptr, y_ptr, out_ptr, rw_ptr, sorted_ids_ptr, order_ptr, block_expert_ptr,
    n_valid, top_k, N, K, num_m_blocks,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_bn,
    stride_ym, stride_yn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, WRITE_Y: tl.constexpr, WEIGHTED: tl.constexpr, ATOMIC: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = a[row] @ W[e] (+ b) on sorted rows; epilogue: optionally store y (sorted), then scale by the routing
    weight and store at the (token, slot) row of a [T*k, N] buffer (or atomically add into out[token])."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows, row_ok, pair, tok = _plan_rows(sorted_ids_ptr, order_ptr, pid_m, n_valid, top_k, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        at = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(at, tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc, PREC)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * stride_be + offs_n * stride_bn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    if WRITE_Y:
        tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc, mask=mask)
    if WEIGHTED:
        acc = acc * tl.load(rw_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if ATOMIC:
        tl.atomic_add(out_ptr + tok[:, None] * stride_om + offs_n[None, :] * stride_on, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptr + pair[:, None] * stride_om + offs_n[None, :] * stride_on, acc, mask=mask)


_SCATTER_KEY = ["N", "K", "BLOCK_M"]
_gemm_scatter_kernel = _autotune(_configs(_ROW_CFG, _ROW_NAMES), key=_SCATTER_KEY)(_gemm_scatter_body)
# the atomic variant accumulates into its output: autotuning must zero it between trials
_gemm_scatter_atomic_kernel = _autotune(_configs(_ROW_CFG, _ROW_NAMES), key=_SCATTER_KEY,
                                        reset_to_zero=["out_ptr"])(_gemm_scatter_body)


@_autotune(_configs(_GATED_CFG, _ROW_NAMES), key=["F", "K", "BLOCK_M", "GATED"])
@_jit
def _gemm_dact_kernel(
    g_ptr, w_ptr, h_ptr, y_ptr, rw_ptr, dh_ptr, a_ptr, dw_ptr, sorted_ids_ptr, order_ptr, block_expert_ptr,
    n_valid, top_k, F, K, up_off, num_m_blocks, alpha, limit,
    stride_gt, stride_gk, stride_we, stride_wk, stride_wn, stride_hm, stride_hn, stride_ym, stride_yk,
    stride_dhm, stride_dhn, stride_am, stride_an,
    ACT: tl.constexpr, GATED: tl.constexpr, COL_MUL: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Backward through the second GEMM and the activation, for one [BLOCK_M, BLOCK_N] tile of a:
    da = w * (grad_out[tok] @ W2[e]^T) (W2^T is read through strides), then dh = act'(h) . da (written at h's gate /
    up columns), a = act(h) recomputed for dW2. Programs of column block 0 also compute d(routing weight) =
    <grad_out[tok], y[row]> while they stream grad_out."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m_blocks, tl.cdiv(F, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows, row_ok, pair, tok = _plan_rows(sorted_ids_ptr, order_ptr, pid_m, n_valid, top_k, BLOCK_M)
    # d(routing weight) rows: only column block 0 computes them (a vector compare: the interpreter mistypes
    # block & scalar-bool)
    y_ok = row_ok & (tl.zeros([BLOCK_M], dtype=tl.int32) + pid_n == 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < F
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + tok[:, None] * stride_gt + offs_k[None, :] * stride_gk
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_k[None, :] * stride_yk
    w_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dot_gy = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        gt = tl.load(g_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(gt, tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc, PREC)
        yt = tl.load(y_ptrs, mask=y_ok[:, None] & k_ok[None, :], other=0.0)  # no traffic unless first
        dot_gy += tl.sum(gt.to(tl.float32) * yt.to(tl.float32), 1)
        g_ptrs += BLOCK_K * stride_gk
        y_ptrs += BLOCK_K * stride_yk
        w_ptrs += BLOCK_K * stride_wk
    tl.store(dw_ptr + pair, dot_gy, mask=y_ok)
    da = acc * tl.load(rw_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    mask = row_ok[:, None] & n_ok[None, :]
    col_g = offs_n * COL_MUL
    hg = tl.load(h_ptr + rows[:, None] * stride_hm + col_g[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        col_u = col_g + up_off
        hu = tl.load(h_ptr + rows[:, None] * stride_hm + col_u[None, :] * stride_hn, mask=mask, other=0.0)
        hu = hu.to(tl.float32)
        dg, du = _glu_bwd(hg, hu, da, alpha, limit, ACT)
        tl.store(dh_ptr + rows[:, None] * stride_dhm + col_u[None, :] * stride_dhn, du, mask=mask)
        act = _glu(hg, hu, alpha, limit, ACT)
    else:
        dg = da * _act_grad(hg, ACT)
        act = _act(hg, ACT)
    tl.store(dh_ptr + rows[:, None] * stride_dhm + col_g[None, :] * stride_dhn, dg, mask=mask)
    tl.store(a_ptr + rows[:, None] * stride_am + offs_n[None, :] * stride_an, act, mask=mask)


@_autotune(_configs(_WGRAD_CFG, _WGRAD_NAMES), key=["M", "N"])
@_jit
def _wgrad_kernel(
    a_ptr, b_ptr, rw_ptr, dw_ptr, db_ptr, starts_ptr, order_ptr, top_k, M, N,
    stride_am, stride_ak, stride_bm, stride_bn, stride_de, stride_dm, stride_dn, stride_dbe, stride_dbn,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, B_WEIGHTED: tl.constexpr, HAS_DB: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dW[e] = A_e^T @ B_e over expert e's rows (the reduction runs over rows: one program per (tile, expert), no
    atomics). A rows / B rows are sorted rows, or gathered token rows (``*_GATHER``); B rows may be scaled by the
    routing weight (``B_WEIGHTED``). With ``HAS_DB`` the first row of tiles also writes db[e] = sum of B_e's rows."""
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.program_id(1).to(tl.int64)
    row0 = tl.load(starts_ptr + e)
    row1 = tl.load(starts_ptr + e + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_r = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(row0, row1, BLOCK_K):
        rows = r0 + offs_r
        r_ok = rows < row1
        pair = tl.load(order_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        a_rows = rows.to(tl.int64)
        b_rows = rows.to(tl.int64)
        if A_GATHER:
            a_rows = pair // top_k
        if B_GATHER:
            b_rows = pair // top_k
        at = tl.load(a_ptr + a_rows[None, :] * stride_am + offs_m[:, None] * stride_ak,
                     mask=r_ok[None, :] & m_ok[:, None], other=0.0)  # A^T tile [BLOCK_M, BLOCK_K]
        bt = tl.load(b_ptr + b_rows[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if B_WEIGHTED:
            rw = tl.load(rw_ptr + pair, mask=r_ok, other=0.0).to(tl.float32)
            bt = (bt.to(tl.float32) * rw[:, None]).to(at.dtype)
        acc = _dot(at, bt, acc, PREC)
        if HAS_DB:
            db += tl.sum(bt.to(tl.float32), 0)
    tl.store(dw_ptr + e * stride_de + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, acc,
             mask=m_ok[:, None] & n_ok[None, :])
    if HAS_DB:
        first = tl.zeros([BLOCK_N], dtype=tl.int32) + pid_m == 0  # a vector: see _gemm_dact_kernel
        tl.store(db_ptr + e * stride_dbe + offs_n * stride_dbn, db, mask=n_ok & first)


_AUTOTUNED = (_gemm1_kernel, _gemm_scatter_kernel, _gemm_scatter_atomic_kernel, _gemm_dact_kernel, _wgrad_kernel)
"""The autotuned kernels (their ``.configs`` may be narrowed, e.g. to skip tuning in a quick check)."""


# ============================================================================================ launchers
def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _precision(dtype: torch.dtype) -> str:
    # float32 follows torch's matmul setting: TF32 only when torch would use it too
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _gate(spec: MoESpec) -> tuple[int, int, int]:
    """(GATE code of _gemm1_kernel, COL_MUL, up_off): the gate column of a's column j is j * COL_MUL, its up column
    j * COL_MUL + up_off."""
    if not spec.gated:
        return 0, 1, 0
    return (2, 2, 1) if spec.gate_layout == "interleaved" else (1, 1, spec.ffn)


def _check(spec: MoESpec, x: torch.Tensor):
    if not _HAS_TRITON:
        raise RuntimeError("the Triton MoE path needs triton")
    if x.dtype not in _DTYPES:
        raise TypeError(f"the Triton MoE path takes {_DTYPES}, got {x.dtype}")
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
        kernel = _gemm_scatter_kernel
    else:
        out = a.new_zeros(T, N, dtype=torch.float32)
        kernel = _gemm_scatter_atomic_kernel
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
    _wgrad_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), E)](
        a, b, rw if rw is not None else a, dw, db if with_db else dw, plan.starts, plan.order, plan.top_k, M, N,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        db.stride(0) if with_db else 0, db.stride(1) if with_db else 0,
        A_GATHER=a_gather, B_GATHER=b_gather, B_WEIGHTED=rw is not None, HAS_DB=with_db, PREC=_precision(a.dtype),
    )
    return dw, db


def experts_forward(spec: MoESpec, x, idx, w, wts: cpu.Weights, *, deterministic: bool = True, save: bool = True):
    """As :func:`cpu.experts_forward`: ``(out [T, H], (h [S, N], y [S, H]))`` with h and y in sorted order.
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
            _gemm1_kernel[_rows_grid(plan, F)](
                x, w1, b1 if b1 is not None else w1, hh, a, plan.sorted_ids, plan.order, plan.block_expert,
                S, plan.top_k, F, H, up_off, plan.num_blocks, float(spec.act_alpha), float(spec.act_limit),
                x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
                b1.stride(0) if b1 is not None else 0, b1.stride(1) if b1 is not None else 0,
                hh.stride(0), hh.stride(1), a.stride(0), a.stride(1),
                ACT=_ACT_CODES[spec.activation], GATE=gate, HAS_BIAS=b1 is not None, WRITE_H=save,
                PREC=_precision(dt), BLOCK_M=plan.block_m,
            )
        out = _scatter(plan, a, w2, wts.b2, y, w.reshape(-1).contiguous(), T, dt, deterministic)
    return out, (h, y)


def experts_backward(spec: MoESpec, grad_out, x, idx, w, wts: cpu.Weights, h, y, *, deterministic: bool = True):
    """As :func:`cpu.experts_backward`: ``(dx, dw shaped like w, Weights(dw1, dw2, db1, db2))``; ``h`` and ``y``
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
            return torch.zeros_like(x), dw.view(w.shape), cpu.Weights(*map(zeros, (w1, w2, wts.b1, wts.b2)))
        # da = w * grad_out[tok] @ W2^T -> dh, a (recomputed) and d(routing weights)
        dh, a = x.new_empty(S, N), x.new_empty(S, F)
        _, col_mul, up_off = _gate(spec)
        _gemm_dact_kernel[_rows_grid(plan, F)](
            g, w2, h, y, rw, dh, a, dw, plan.sorted_ids, plan.order, plan.block_expert,
            S, plan.top_k, F, H, up_off, plan.num_blocks, float(spec.act_alpha), float(spec.act_limit),
            g.stride(0), g.stride(1), w2.stride(0), w2.stride(2), w2.stride(1), h.stride(0), h.stride(1),
            y.stride(0), y.stride(1), dh.stride(0), dh.stride(1), a.stride(0), a.stride(1),
            ACT=_ACT_CODES[spec.activation], GATED=spec.gated, COL_MUL=col_mul, PREC=_precision(dt),
            BLOCK_M=plan.block_m,
        )
        # dW1 = x[tok]^T dh (+ db1 = sum dh); dW2 = a^T (grad_out[tok] * w) (+ db2 = sum of the same)
        dw1, db1 = _wgrad(plan, x, dh, None, H, N, E, True, False, wts.b1 is not None, dt)
        dw2, db2 = _wgrad(plan, a, g, rw, F, H, E, False, True, wts.b2 is not None, dt)
        # dx = sum over slots of dh @ W1[e]^T (W1^T through strides)
        dx = _scatter(plan, dh, w1.transpose(1, 2), None, None, None, T, dt, deterministic)
    return dx, dw.view(w.shape), cpu.Weights(dw1, dw2, db1, db2)
