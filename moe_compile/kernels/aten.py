"""The ATen kernel backend (CPU, and any device torch runs; float64 too): sort once, grouped GEMMs, one gather and one index_add.

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
it) the same math runs as one matmul per expert slice. On CPU with more than one torch thread, large grouped GEMMs
and the sort run on single-threaded worker threads instead, one equal share each (see ``EXPERT_THREADS``).
"""
from __future__ import annotations

import math
import os
import threading
import types
import warnings

import torch

from .. import activations
from ..compat import dynamo
from ..spec import MoESpec
from .common import Plan, Weights, make_plan
from .interface import KernelBackend

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    pool = _gemm_pool(a, b, offs_list)
    if pool is not None:
        return pool.grouped_mm(a, b, offs_list)
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


# ----------------------------------------------------------------------------------------------- expert threads
EXPERT_THREADS = os.environ.get("MOE_COMPILE_CPU_EXPERT_THREADS", "auto")
"""How the CPU grouped GEMMs use the cores. ``torch._grouped_mm`` on CPU is a loop of one ``mm`` per expert, each
spread over all of torch's threads: at 64 experts that is 64 OpenMP parallel regions per GEMM, each ending in a
barrier, which is cheap on an idle machine and very slow on a busy one (a thread that waits at a barrier spins on
the core its descheduled partner needs: 3-4x the dense GEMM's time measured under load 6 on 2 cores). ``auto``:
with ``torch.get_num_threads() > 1``, split each grouped GEMM into that many equal shares (rows for the row-grouped
GEMMs, output rows for the weight gradients), one per worker thread, each worker running single-threaded ``mm``
calls: one hand-off and one join per GEMM. ``0`` (or ``off``): the loop of multi-threaded ``mm`` calls. A number:
that many workers."""
MIN_POOL_FLOPS = 1 << 24
"""Grouped GEMMs with fewer multiply-adds than this run in the calling thread (the hand-off costs ~50 us)."""


class _GemmPool:
    """Worker threads with one intra-op thread each (``torch.set_num_threads(1)`` inside each worker: OpenMP's and
    MKL's thread counts are per thread; the process-wide default it also sets is restored at once)."""

    def __init__(self, n: int):
        from concurrent.futures import ThreadPoolExecutor

        self.n, self.pid = n, os.getpid()
        self.ex = ThreadPoolExecutor(n, thread_name_prefix="moe_compile-gemm")
        ready = threading.Barrier(n)

        def init():
            torch.set_num_threads(1)
            ready.wait()  # every worker is started and set before any task runs

        main_threads = torch.get_num_threads()
        for f in [self.ex.submit(init) for _ in range(n)]:
            f.result()
        torch.set_num_threads(main_threads)  # the default for threads started later, as it was

    def run(self, tasks: list) -> None:
        inference = torch.is_inference_mode_enabled()  # (outputs made in inference mode are written in it)

        def call(task):
            with torch.inference_mode(inference), torch.no_grad():
                task()

        for f in [self.ex.submit(call, t) for t in tasks]:
            f.result()

    def grouped_mm(self, a: torch.Tensor, b: torch.Tensor, offs_list: list[int]) -> torch.Tensor:
        starts = [0] + offs_list[:-1]
        spans = [(e, s, t) for e, (s, t) in enumerate(zip(starts, offs_list)) if t > s]
        n = self.n
        if b.dim() == 3:  # rows grouped: worker j takes rows [S j / n, S (j+1) / n) of every expert they cross
            out = a.new_empty(a.shape[0], b.shape[-1])
            rows = offs_list[-1]
            cuts = [rows * j // n for j in range(n + 1)]

            def share(lo, hi):
                def task():
                    for e, s, t in spans:
                        s, t = max(s, lo), min(t, hi)
                        if t > s:
                            torch.mm(a[s:t], b[e], out=out[s:t])
                return task

            self.run([share(cuts[j], cuts[j + 1]) for j in range(n)])
            return out
        # reduction grouped: worker j computes output rows [M j / n, M (j+1) / n) of every expert
        out = a.new_empty(len(offs_list), a.shape[0], b.shape[-1])
        m = a.shape[0]
        cuts = [m * j // n for j in range(n + 1)]
        hit = [False] * len(offs_list)
        for e, _, _ in spans:
            hit[e] = True
        for e, h in enumerate(hit):
            if not h:
                out[e].zero_()

        def share_w(lo, hi):
            def task():
                for e, s, t in spans:
                    torch.mm(a[lo:hi, s:t], b[s:t], out=out[e, lo:hi])
            return task

        self.run([share_w(cuts[j], cuts[j + 1]) for j in range(n) if cuts[j + 1] > cuts[j]])
        return out


_POOL: list = [None]
_POOL_LOCK = threading.Lock()


def _expert_threads() -> int:
    if EXPERT_THREADS in ("0", "off"):
        return 0
    if EXPERT_THREADS == "auto":
        n = torch.get_num_threads()
        return n if n > 1 else 0
    return int(EXPERT_THREADS)


def _gemm_pool(a: torch.Tensor, b: torch.Tensor, offs_list: list[int]) -> "_GemmPool | None":
    """The worker pool for this grouped GEMM, or None: run it in the calling thread."""
    if a.device.type != "cpu" or len(offs_list) < 2 or torch.compiler.is_compiling():
        return None
    n = _expert_threads()
    if n < 2 or threading.current_thread().name.startswith("moe_compile-gemm"):
        return None
    if a.shape[0] * a.shape[1] * b.shape[-1] < MIN_POOL_FLOPS:  # S K N or M S N multiply-adds
        return None
    return _pool(n)


def _pool(n: int) -> _GemmPool:
    pool = _POOL[0]
    if pool is None or pool.n != n or pool.pid != os.getpid():  # (a fork leaves the parent's threads behind)
        with _POOL_LOCK:
            pool = _POOL[0]
            if pool is None or pool.n != n or pool.pid != os.getpid():
                if pool is not None and pool.pid == os.getpid():
                    pool.ex.shutdown(wait=False)
                pool = _POOL[0] = _GemmPool(n)
    return pool


def plan_for(idx: torch.Tensor, num_experts: int) -> Plan:
    """``common.make_plan`` (the stable sort by expert); on CPU with expert threads, computed in one worker:
    torch's multi-threaded sort of ~10^4-10^5 keys has several parallel regions and measured 0.3 ms on one thread
    but 50-400 ms on two threads of a loaded 2-core machine."""
    idx = idx.long()
    n = _expert_threads()
    if (idx.device.type != "cpu" or n < 2 or idx.numel() < 4096 or torch.compiler.is_compiling()
            or threading.current_thread().name.startswith("moe_compile-gemm")):
        return make_plan(idx, num_experts)
    box = []
    _pool(n).run([lambda: box.append(make_plan(idx, num_experts))])
    return box[0]


# ----------------------------------------------------------------------------------------------- elementwise
# The work between the GEMMs, as two functions per activation: ``act_forward(h, ws, aw)`` writes act(h) * ws into
# ``aw``; ``act_backward(h, daw, ws, dh, aw, dws)`` writes d h, act(h) * ws and d ws into its last three. The
# derivatives are written out: one pass over h instead of autograd's slice buffers. Large inputs run them compiled
# by inductor (one fused C++ loop each, ~3x faster than the eager ops), small ones eagerly; same formula.
KERNELS = os.environ.get("MOE_COMPILE_CPU_KERNELS", "auto")
"""``auto``: inductor-compiled elementwise kernels for inputs of at least ``MIN_COMPILED_ELEMENTS`` elements of
h, eager below; ``inductor``: always compiled; ``eager``: never (e.g. where no C++ compiler exists)."""
MIN_COMPILED_ELEMENTS = 1 << 20


def _elementwise(spec: MoESpec):
    """The eager ``(act_forward, act_backward)`` pair for ``spec``'s activation and gate layout."""
    name, alpha, limit = spec.activation, float(spec.act_alpha), float(spec.act_limit)
    interleaved = spec.gate_layout == "interleaved"
    act = None if name == "swiglu_oai" else activations.elementwise(name)  # looked up once, not per call

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
        def value_and_grads(h):
            g, u = split(h)
            v, dv = act.value_and_grad(g)
            return v * u, dv * u, v
    else:
        def value_and_grads(h):
            v, dv = act.value_and_grad(h)
            return v, dv, None

    def act_forward(h, ws, aw):
        if name == "swiglu_oai":
            a = value_and_grads(h)[0]  # (inductor drops the unused derivatives)
        elif not spec.gated:
            a = act.forward(h)
        else:
            g, u = split(h)
            a = act.forward(g) * u
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
_OPTIONS = dynamo.inductor_options(cpp_cache_precompile_headers=False, fx_graph_cache=False)
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
    plan = plan_for(idx, spec.num_experts)
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
    plan = plan_for(idx, spec.num_experts)
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


# ----------------------------------------------------------------------------------------------- the backend
class AtenBackend(KernelBackend):
    """Every device torch runs and every dtype (float64 too); the only one for ``score_on_input``."""

    name = "aten"

    def accepts(self, spec, x) -> bool:
        return True

    def forward(self, spec, x, idx, w, wts, *, keep_outputs=False):
        out, (h, r) = experts_forward(spec, x, idx, w, wts, save_y=keep_outputs)
        return out, h, r

    def backward(self, spec, grad, x, idx, w, wts, h, r, *, kept_outputs=False, forward_b2=True):
        return experts_backward(spec, grad, x, idx, w, wts, h, None if kept_outputs else r, forward_b2=forward_b2)

    def plan(self, idx, num_experts):
        return plan_for(idx, num_experts)
