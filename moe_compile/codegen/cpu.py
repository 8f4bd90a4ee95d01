"""The ATen path of the fused MoE experts op: sort once, grouped GEMMs, one gather and one index_add.

Forward, for tokens ``x [T, H]``, expert ids ``idx [T, k]`` (``E`` means "dropped", as HF's sentinel) and routing
weights ``w [T, k]``:

    order   = stable argsort of idx.flatten()        # (token, slot) pairs grouped by expert
    xs      = x[order // k]                          # the one gather
    h       = grouped_mm(xs, W1, offs) + B1[e]       # [S, N], N = 2F when gated
    a       = act(h)                                 # [S, F]
    y       = grouped_mm(a, W2, offs) + B2[e]        # [S, H]
    out     = zeros(T, H).index_add_(0, order // k, y * w.flatten()[order])

Backward reuses the same plan: dX and d(activations) are grouped GEMMs with the transposed weights, dW is a grouped
GEMM over each expert's rows (``torch._grouped_mm`` 2D x 2D with offsets along K), and d(routing weights) is a row
dot product. Where ``torch._grouped_mm`` cannot run (float64, row strides not a multiple of 16 bytes, torch without
it) the same math runs as one matmul per expert slice.
"""
from __future__ import annotations

import math
import os
import threading
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..spec import MoESpec

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------- activations
def _base_act(name: str, t: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(t)
    if name == "gelu":
        return F.gelu(t)
    if name == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    if name == "relu":
        return F.relu(t)
    if name == "sigmoid":
        return torch.sigmoid(t)
    if name == "identity":
        return t
    raise ValueError(f"{name!r} is not an elementwise activation")


def split_gate_up(spec: MoESpec, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.gate_layout == "interleaved":
        return h[..., 0::2], h[..., 1::2]
    return h[..., : spec.ffn], h[..., spec.ffn :]


def activation(spec: MoESpec, h: torch.Tensor) -> torch.Tensor:
    """``[S, N] -> [S, F]``: the expert's activation, gated or not, as the spec says."""
    if not spec.gated:
        return _base_act(spec.activation, h)
    gate, up = split_gate_up(spec, h)
    if spec.activation == "swiglu_oai":
        gate = gate.clamp(max=spec.act_limit)
        up = up.clamp(min=-spec.act_limit, max=spec.act_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * spec.act_alpha))
    return _base_act(spec.activation, gate) * up


# ----------------------------------------------------------------------------------------------- grouped GEMM
def _aligned(t: torch.Tensor) -> bool:
    """What torch._grouped_mm accepts: one unit stride in the matrix, every other stride and both matrix sizes
    a multiple of 16 bytes (conservative: other tensors take the per-expert path)."""
    size = t.element_size()
    s = t.stride()
    if not (s[-1] == 1 or s[-2] == 1):
        return False
    return all(x * size % 16 == 0 for x in s if x != 1) and all(n * size % 16 == 0 for n in t.shape[-2:])


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, offs_list: list[int]) -> torch.Tensor:
    """``a [S, K] x b [E, K, N] -> [S, N]`` (rows grouped by ``offs``), or ``a [M, S] x b [S, N] -> [E, M, N]``
    (the reduction dimension grouped), as ``torch._grouped_mm`` defines them."""
    if (
        _HAS_GROUPED_MM
        and a.dtype in _GROUPED_MM_DTYPES
        and a.dtype == b.dtype
        and a.shape[-1] > 0
        and b.shape[-1] > 0
        and _aligned(a)
        and _aligned(b)
    ):
        return torch._grouped_mm(a, b, offs)
    starts = [0] + offs_list[:-1]
    if b.dim() == 3:
        out = a.new_empty(a.shape[0], b.shape[-1])
        for e, (s, t) in enumerate(zip(starts, offs_list)):
            if t > s:
                torch.mm(a[s:t], b[e], out=out[s:t])
        return out
    out = a.new_zeros(len(offs_list), a.shape[0], b.shape[-1])
    for e, (s, t) in enumerate(zip(starts, offs_list)):
        if t > s:
            torch.mm(a[:, s:t], b[s:t], out=out[e])
    return out


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


# ----------------------------------------------------------------------------------------------- elementwise
# The work between the GEMMs, as two functions per activation: ``act_forward(h, ws, aw)`` writes act(h) * ws into
# ``aw``; ``act_backward(h, daw, ws, dh, aw, dws)`` writes d h, act(h) * ws and d ws into its last three. The
# derivatives are written out: one pass over h instead of autograd's slice buffers. Large inputs run them compiled
# by inductor (one fused C++ loop each, ~3x faster than the eager ops), small ones eagerly; same formula.
KERNELS = os.environ.get("MOE_COMPILE_CPU_KERNELS", "auto")
"""``auto``: inductor-compiled elementwise kernels for inputs of at least ``MIN_COMPILED_ELEMENTS`` elements of
h, eager below; ``inductor``: always compiled; ``eager``: never (e.g. where no C++ compiler exists)."""
MIN_COMPILED_ELEMENTS = 1 << 20


def _gate_fn(name: str, alpha: float):
    """``g -> (act(g), act'(g))`` for the elementwise activations."""

    def silu(g):
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))

    def gelu(g):
        cdf = 0.5 * (1 + torch.erf(g * math.sqrt(0.5)))
        return g * cdf, cdf + g * torch.exp(-0.5 * g * g) * (1 / math.sqrt(2 * math.pi))

    def gelu_tanh(g):
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (g + 0.044715 * g * g * g))
        return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c * (1 + 3 * 0.044715 * g * g)

    def relu(g):
        return torch.relu(g), (g > 0).to(g.dtype)

    def sigmoid(g):
        s = torch.sigmoid(g)
        return s, s * (1 - s)

    def identity(g):
        return g, torch.ones_like(g)

    fns = dict(silu=silu, gelu=gelu, gelu_tanh=gelu_tanh, relu=relu, sigmoid=sigmoid, identity=identity)
    if name not in fns:
        raise ValueError(f"{name!r} is not an elementwise activation")
    return fns[name]


def _elementwise(spec: MoESpec):
    """The eager ``(act_forward, act_backward)`` pair for ``spec``'s activation and gate layout."""
    name, alpha, limit = spec.activation, float(spec.act_alpha), float(spec.act_limit)
    interleaved = spec.gate_layout == "interleaved"

    def split(h):
        if interleaved:
            return h[:, 0::2], h[:, 1::2]
        f = h.shape[1] // 2
        return h[:, :f], h[:, f:]

    if name == "swiglu_oai":  # GPT-OSS: (clamp(up) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)
        def value_and_grads(h):
            g, u = split(h)
            gc, uc = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
            s = torch.sigmoid(alpha * gc)
            glu = gc * s
            d_g = torch.where(g <= limit, (uc + 1) * (s + gc * alpha * s * (1 - s)), 0.0)
            d_u = torch.where((u >= -limit) & (u <= limit), glu, 0.0)
            return (uc + 1) * glu, d_g, d_u
    elif spec.gated:
        base = _gate_fn(name, alpha)

        def value_and_grads(h):
            g, u = split(h)
            v, dv = base(g)
            return v * u, dv * u, v
    else:
        base = _gate_fn(name, alpha)

        def value_and_grads(h):
            v, dv = base(h)
            return v, dv, None

    def act_forward(h, ws, aw):
        if name == "swiglu_oai":
            a = value_and_grads(h)[0]  # (inductor drops the unused derivatives)
        elif not spec.gated:
            a = _base_act(name, h)
        else:
            g, u = split(h)
            a = _base_act(name, g) * u
        aw.copy_(a * ws[:, None])

    def act_backward(h, daw, ws, dh, aw, dws):
        # writes into preallocated outputs: inductor then emits one loop nest writing all three (measured ~25%
        # faster than returning them, which also needs a concatenation for dh)
        a, d_g, d_u = value_and_grads(h)
        da = daw * ws[:, None]
        dws.copy_((daw * a).sum(1, dtype=dws.dtype))
        aw.copy_(a * ws[:, None])
        if d_u is None:
            dh.copy_(da * d_g)
        else:
            dh_gate, dh_up = split(dh)
            dh_gate.copy_(da * d_g)
            dh_up.copy_(da * d_u)

    return act_forward, act_backward


# Inductor's on-disk FX graph cache and precompiled headers went stale on this machine's shared cache (torch 2.13:
# vectorised kernel code compiled without the vector ISA flags it needs, "'at::vec' has not been declared"); these
# kernels skip both (a few seconds of code generation once per process; the compiled .so is still cached)
_OPTIONS = {"cpp_cache_precompile_headers": False, "fx_graph_cache": False} if hasattr(torch._inductor.config, "cpp_cache_precompile_headers") \
    else {}
_EAGER: dict[tuple, tuple] = {}
_COMPILED: dict[tuple, tuple] = {}
_FAILED: set[tuple] = set()


def _key(spec: MoESpec) -> tuple:
    return spec.activation, spec.gated, spec.gate_layout == "interleaved", float(spec.act_alpha), float(spec.act_limit)


def _kernels(spec: MoESpec, h: torch.Tensor):
    """The ``(act_forward, act_backward)`` pair to run on ``h``: compiled or eager, as ``KERNELS`` says."""
    key = _key(spec)
    if key not in _EAGER:
        _EAGER[key] = _elementwise(spec)
    eager = _EAGER[key]
    compiled = (
        KERNELS == "inductor" or (KERNELS == "auto" and h.numel() >= MIN_COMPILED_ELEMENTS)
    ) and h.device.type == "cpu" and key not in _FAILED and not torch.compiler.is_compiling()
    if not compiled:
        return eager
    if key not in _COMPILED:
        _COMPILED[key] = tuple(torch.compile(_own_code(f, key), dynamic=True, fullgraph=True, options=_OPTIONS)
                               for f in eager)
    return tuple(_guarded(key, c, e) for c, e in zip(_COMPILED[key], eager))


def _own_code(f, key: tuple):
    """A copy of ``f`` with a code object of its own: Dynamo caches compiled code (and counts recompiles) per code
    object, and the closures of every activation share one."""
    name = f"{f.__name__}_{'_'.join(str(k) for k in key)}".replace(".", "p").replace("-", "m")
    extra = {"co_qualname": name} if hasattr(f.__code__, "co_qualname") else {}  # Python >= 3.11
    code = f.__code__.replace(co_name=name, **extra)
    return types.FunctionType(code, f.__globals__, name, f.__defaults__, f.__closure__)


def _guarded(key, compiled_fn, eager_fn):
    def run(*args):
        try:
            return compiled_fn(*args)
        except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler: same formula, run eagerly
            _FAILED.add(key)
            warnings.warn(f"moe_compile: compiling the CPU elementwise kernels failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); running them eagerly (same formula, slower). Set "
                          "MOE_COMPILE_CPU_KERNELS=eager to skip the attempt.", RuntimeWarning, stacklevel=3)
            return eager_fn(*args)

    return run


# ----------------------------------------------------------------------------------------------- workspace
WORKSPACE = os.environ.get("MOE_COMPILE_CPU_WORKSPACE", "1") != "0"
"""Reuse the op's CPU temporaries (``aw``, ``gy``, ``dh``, ``d ws``) across calls instead of allocating them each
time: writing a freshly allocated 64 MiB buffer costs ~3.5x writing a reused one here (the kernel zero-fills every
new page). The buffers are per thread and per role, grow to the largest call and stay until
:func:`release_workspace`; ``MOE_COMPILE_CPU_WORKSPACE=0`` turns this off."""
_local = threading.local()


def _scratch(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous ``shape`` tensor for a temporary that dies before the op returns (never an
    output: outputs must not alias each other or later calls)."""
    if not WORKSPACE or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = _local.__dict__.setdefault("bufs", {})
    n = math.prod(shape)
    buf = bufs.get(role)
    # a buffer made under torch.inference_mode is an inference tensor: outside that mode it may not be written in
    # place ("Inplace update to inference tensor outside InferenceMode"), so it is replaced there
    stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
    if buf is None or stale or buf.dtype != dtype or buf.numel() < n:
        buf = bufs[role] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def release_workspace() -> None:
    """Free this thread's reused CPU temporaries (see ``WORKSPACE``)."""
    _local.__dict__.pop("bufs", None)


def workspace_bytes() -> int:
    """Bytes this thread's reused CPU temporaries hold now."""
    return sum(b.numel() * b.element_size() for b in _local.__dict__.get("bufs", {}).values())


# ----------------------------------------------------------------------------------------------- forward / backward
def _wgrad(a: torch.Tensor, b: torch.Tensor, plan: "Plan", stored_out_in: bool) -> torch.Tensor:
    """Per-expert ``a_e^T b_e`` as the canonical ``[E, A, B]`` gradient; computed as ``b_e^T a_e`` (a
    transposed view of ``[E, B, A]``) when the weight is stored out_in, so that mapping it back to the stored
    layout copies nothing."""
    if stored_out_in:
        return grouped_mm(b.t(), a, plan.offs, plan.offs_list).transpose(-1, -2)
    return grouped_mm(a.t(), b, plan.offs, plan.offs_list)


def experts_forward(spec: MoESpec, x, idx, w, wts: Weights, *, save_y: bool = False):
    """Returns ``(out [T, H], saved)``, ``saved = (h, xs)``: the first GEMM's output (bias added) and the gathered
    inputs, in sorted order, which the backward reuses. ``save_y=True`` saves ``(h, y)`` instead, ``y`` the
    unweighted expert outputs (what the slot op and the Triton path's tests need); pass ``xs=None`` to the backward
    then."""
    dt = x.dtype
    plan = make_plan(idx.long(), spec.num_experts)
    xs = x.index_select(0, plan.tokens)
    ws = w.reshape(-1)[plan.order].to(dt)
    if spec.score_on_input:  # the expert runs on w * x; its output is summed as it is
        xs = xs * ws[:, None]
        ws = torch.ones_like(ws)
    h = grouped_mm(xs, wts.w1.to(dt), plan.offs, plan.offs_list)
    if wts.b1 is not None:
        h += wts.b1.to(dt).index_select(0, plan.experts)
    act_forward, _ = _kernels(spec, h)
    w2 = wts.w2.to(dt)
    aw = _scratch("aw", (h.shape[0], spec.ffn), dt, x.device)
    if save_y:  # unweighted y, weighted on the [S, H] side
        act_forward(h, torch.ones_like(ws), aw)
        y = grouped_mm(aw, w2, plan.offs, plan.offs_list)
        if wts.b2 is not None:
            y += wts.b2.to(dt).index_select(0, plan.experts)
        out = torch.zeros_like(x).index_add_(0, plan.tokens, y * ws[:, None])
        return out, (h, y)
    # the routing weight scales the [S, F] activations (fewer elements than [S, H] in fine-grained MoE)
    act_forward(h, ws, aw)
    y = grouped_mm(aw, w2, plan.offs, plan.offs_list)
    if wts.b2 is not None:
        y.addcmul_(wts.b2.to(dt).index_select(0, plan.experts), ws[:, None])
    out = torch.zeros_like(x).index_add_(0, plan.tokens, y)
    return out, (h, xs)


def experts_backward(spec: MoESpec, grad_out, x, idx, w, wts: Weights, h, xs=None, *, forward_b2: bool | None = None):
    """Gradients of ``experts_forward`` for x, w and the canonical weights: ``(dx, dw shaped like w,
    Weights(dw1, dw2, db1, db2))``. ``h`` and ``xs`` are the forward's saved tensors (``xs=None``: gathered
    again). ``forward_b2=False``: the forward ran without ``wts.b2`` (a tensor-parallel shard that does not add the
    bias) but its gradient is wanted: db2 is computed, the routing weights' gradient has no bias term."""
    plan = make_plan(idx.long(), spec.num_experts)
    dt = x.dtype
    out_in = spec.weight_layout == "out_in"
    ws = w.reshape(-1)[plan.order].to(dt)
    if xs is None:
        xs = x.index_select(0, plan.tokens)
        if spec.score_on_input:
            xs = xs * ws[:, None]
    w_in = None
    if spec.score_on_input:  # xs is w * x; the expert's output was not weighted
        w_in, ws = ws, torch.ones_like(ws)
    w2 = wts.w2.to(dt)
    gy = _scratch("gy", (len(plan.tokens), x.shape[1]), dt, x.device)
    torch.index_select(grad_out.to(dt), 0, plan.tokens, out=gy)  # d y, y = (act(h) * w) @ W2 (+ w * b2)
    daw = grouped_mm(gy, w2.transpose(-1, -2), plan.offs, plan.offs_list)  # d (act(h) * w)
    _, act_backward = _kernels(spec, h)
    dh = _scratch("dh", tuple(h.shape), dt, x.device)
    aw = _scratch("aw", tuple(daw.shape), dt, x.device)
    dws = _scratch("dws", (h.shape[0],), torch.promote_types(dt, torch.float32), x.device)
    act_backward(h, daw, ws, dh, aw, dws)
    del daw
    db2 = None
    if wts.b2 is not None:
        b2 = wts.b2.to(dt).index_select(0, plan.experts)
        if forward_b2 is not False and w_in is None:
            dws += (gy * b2).sum(1, dtype=dws.dtype)
        db2 = torch.zeros(wts.b2.shape, dtype=dt, device=x.device).index_add_(0, plan.experts, gy * ws[:, None])
    dw2 = _wgrad(aw, gy, plan, out_in)
    del aw, gy
    db1 = None
    if wts.b1 is not None:
        db1 = torch.zeros(wts.b1.shape, dtype=dt, device=x.device).index_add_(0, plan.experts, dh)
    dxs = grouped_mm(dh, wts.w1.to(dt).transpose(-1, -2), plan.offs, plan.offs_list)
    if w_in is not None:  # d(w * x): to w through <dxs, x>, to x scaled by w
        dws = (dxs * x.index_select(0, plan.tokens)).sum(1, dtype=dws.dtype)
        dxs = dxs * w_in[:, None]
    dx = torch.zeros_like(x).index_add_(0, plan.tokens, dxs)
    del dxs
    dw1 = _wgrad(xs, dh, plan, out_in)
    dw = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
    dw[plan.order] = dws.to(w.dtype)
    return dx, dw.view(w.shape), Weights(dw1, dw2, db1, db2)


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
