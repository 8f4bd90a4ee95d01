"""The Triton kernels of the fused experts op (``launch.py`` launches them): constexpr blocks, explicit masks,
grouped program ordering, as Triton's matmul tutorial; activation codes are ``moe_compile.activations``' ``code``.
All GEMMs accumulate in float32; inputs may be float32, bfloat16 or float16. The module imports without triton
(``HAS_TRITON`` is then False and the kernels are plain functions that are never launched)."""
from __future__ import annotations

import contextlib
import os

import torch

try:  # the module imports without triton; is_available() then says False
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    triton = tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_available(x: torch.Tensor) -> bool:
    """Whether this path can run ``x``: a CUDA tensor of a dtype the kernels take, with triton importable."""
    return HAS_TRITON and x.is_cuda and x.dtype in DTYPES


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
    return triton.jit(fn) if HAS_TRITON else fn


def _autotune(configs, key, **kw):
    return (lambda fn: triton.autotune(configs=configs, key=key, **kw)(fn)) if HAS_TRITON else (lambda fn: fn)


def configs(rows: list[tuple], names: tuple[str, ...]) -> list:
    """``(block..., num_warps, num_stages)`` tuples -> ``triton.Config`` list."""
    if not HAS_TRITON:
        return []
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


# Row-block GEMMs (BLOCK_M comes from the plan, see launch.py's _block_m): (BLOCK_N, BLOCK_K, GROUP_M, warps,
# stages), the first of each list a sound default. These are what the autotuner picks from on a GPU; they are defined
# in every mode so that the interpreter tests can force each one (tests/test_triton_kernels.py).
ROW_CFG = [(128, 64, 8, 8, 3), (64, 64, 8, 4, 4), (128, 32, 8, 4, 4), (256, 64, 8, 8, 3), (64, 128, 8, 4, 3)]
GATED_CFG = [  # two accumulators: half the BLOCK_N of ROW_CFG
    (64, 64, 8, 8, 3), (64, 64, 8, 4, 4), (128, 64, 8, 8, 3), (32, 64, 8, 4, 4), (64, 128, 8, 8, 3)]
# Weight-gradient GEMMs: (BLOCK_M, BLOCK_N, BLOCK_K over the expert's rows, GROUP_M, warps, stages).
WGRAD_CFG = [(128, 128, 32, 8, 8, 3), (128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4),
             (128, 256, 32, 8, 8, 3)]
# The interpreter's default: one small config each (fast on CPU, and smaller than the test shapes so that the masks
# and several blocks per dimension are exercised).
INTERPRET_ROW_CFG = [(32, 32, 4, 4, 1)]
INTERPRET_GATED_CFG = [(32, 32, 4, 4, 1)]
INTERPRET_WGRAD_CFG = [(32, 32, 16, 4, 4, 1)]
ROW_NAMES = ("BLOCK_N", "BLOCK_K", "GROUP_M")
WGRAD_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
_ROW_DEFAULT = INTERPRET_ROW_CFG if INTERPRET else ROW_CFG
_GATED_DEFAULT = INTERPRET_GATED_CFG if INTERPRET else GATED_CFG
_WGRAD_DEFAULT = INTERPRET_WGRAD_CFG if INTERPRET else WGRAD_CFG


# ============================================================================================ device helpers
@_jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tutorial 03's grouped ordering: GROUP_M row blocks share each column block (better L2 reuse)."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + ((pid % in_group) % size_m), (pid % in_group) // size_m


_UPCAST_BF16_DOT = tl.constexpr(INTERPRET) if HAS_TRITON else INTERPRET


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


# ============================================================================================ dispatch plan
@_jit
def align_kernel(starts_ptr, block_starts_ptr, sorted_ids_ptr, block_expert_ptr, n_valid, num_experts,
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


# ============================================================================================ grouped GEMMs
@_autotune(configs(_GATED_DEFAULT, ROW_NAMES), key=["F", "K", "BLOCK_M", "GATE"])
@_jit
def gemm1_kernel(
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
gemm_scatter_kernel = _autotune(configs(_ROW_DEFAULT, ROW_NAMES), key=_SCATTER_KEY)(_gemm_scatter_body)
# the atomic variant accumulates into its output: autotuning must zero it between trials
gemm_scatter_atomic_kernel = _autotune(configs(_ROW_DEFAULT, ROW_NAMES), key=_SCATTER_KEY,
                                        reset_to_zero=["out_ptr"])(_gemm_scatter_body)


@_autotune(configs(_GATED_DEFAULT, ROW_NAMES), key=["F", "K", "BLOCK_M", "GATED"])
@_jit
def gemm_dact_kernel(
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


@_autotune(configs(_WGRAD_DEFAULT, WGRAD_NAMES), key=["M", "N"])
@_jit
def wgrad_kernel(
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
        first = tl.zeros([BLOCK_N], dtype=tl.int32) + pid_m == 0  # a vector: see gemm_dact_kernel
        tl.store(db_ptr + e * stride_dbe + offs_n * stride_dbn, db, mask=n_ok & first)


AUTOTUNED = (gemm1_kernel, gemm_scatter_kernel, gemm_scatter_atomic_kernel, gemm_dact_kernel, wgrad_kernel)
"""The autotuned kernels (their ``.configs`` may be narrowed, e.g. to skip tuning in a quick check)."""
GPU_TABLES = ((GATED_CFG, ROW_NAMES), (ROW_CFG, ROW_NAMES), (ROW_CFG, ROW_NAMES), (GATED_CFG, ROW_NAMES),
              (WGRAD_CFG, WGRAD_NAMES))
"""The GPU config table and parameter names of each kernel of :data:`AUTOTUNED`, in the same order."""


@contextlib.contextmanager
def forced_configs(index: int | None = None):
    """Within the block every autotuned kernel runs one config, so nothing is tuned: ``index`` picks row ``index``
    of its GPU table (clamped to the table's length), ``None`` keeps its current first config (the mode's default).
    A single config is launched as is by triton's Autotuner (no benchmarking, no cache)."""
    saved = [k.configs for k in AUTOTUNED]
    try:
        for k, (rows, names) in zip(AUTOTUNED, GPU_TABLES):
            k.configs = k.configs[:1] if index is None else configs([rows[min(index, len(rows) - 1)]], names)
        yield
    finally:
        for k, c in zip(AUTOTUNED, saved):
            k.configs = c
