"""The Triton MoE kernels against float64 torch references, run by Triton's interpreter on CPU tensors.

Triton picks interpreter or compiled mode when a kernel is decorated, and decorates its own library (tl.sum,
tl.cdiv, ...) when it is imported: one process runs either interpreted or compiled Triton, never both. So this file
runs in this process only where that is safe -- TRITON_INTERPRET=1 was given, or nothing has imported triton yet on a
machine without CUDA -- and otherwise (e.g. the full suite, where importing moe_compile imports inductor and so
triton) in a fresh process, by test_in_fresh_process.

Shapes are small and deliberately not multiples of the interpreter's block sizes (16 rows, 32 columns, 32 / 16 K).
Every config the autotuner can pick on a GPU (``kernels.py``'s ``ROW_CFG``, ``GATED_CFG``, ``WGRAD_CFG``) is forced in
turn at shapes with more than one block, and a partial block, in every dimension of every kernel
(test_each_gpu_config). Errors are ``max |err| / max |ref|`` of each tensor on its own (:func:`rel_err`), against a
float64 reference computed from the same (rounded) inputs, with tolerances per dtype (:data:`TOL`).

The ops (``moe_compile::experts``, ``experts_slots``, ``dispatch_combine``) are also called directly under
``kernels.use("triton")``, forward and backward, against the ATen backend (test_ops_on_triton_*).
"""
import math
import os
import subprocess
import sys

import torch

IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" or (
    "triton" not in sys.modules and not torch.cuda.is_available())
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402

pytest.importorskip("triton")

from moe_compile import kernels  # noqa: E402
from moe_compile.kernels import aten as cpu  # noqa: E402
from moe_compile.kernels import common  # noqa: E402
from moe_compile.kernels.triton import kernels as tk  # noqa: E402
from moe_compile.kernels.triton import launch as tm  # noqa: E402
from moe_compile.spec import MoESpec  # noqa: E402

if IN_PROCESS:
    tk.fix_old_interpreter()  # triton < 3.7's interpreter with numpy >= 2.4


@pytest.fixture(autouse=True)
def _in_process_only(request):
    if not IN_PROCESS and request.node.originalname != "test_in_fresh_process":
        pytest.skip("triton runs compiled in this process: the file runs in a fresh one (test_in_fresh_process)")


def test_in_fresh_process():
    """This whole file under TRITON_INTERPRET=1 in its own process, where the current one cannot interpret."""
    if IN_PROCESS:
        pytest.skip("this process runs the interpreter itself")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider"],
                       cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


# Tolerances on max |err| / max |ref| per tensor, the reference in float64 from the same rounded inputs. The kernels
# accumulate in float32 and round each stored intermediate (h, a = act(h), y, dh, the output) to the dtype, unit
# roundoff u = 2^-24 (fp32), 2^-11 (fp16), 2^-8 (bf16); a gradient passes through ~4 such roundings, each amplified
# by O(1) (the tensors are O(1)-scaled), so a few u, and the tolerance is 8u: bf16 3e-2, fp16 4e-3. fp32 adds the
# GEMMs' accumulation error (~sqrt(K) u, K <= 300 here) and the activations' float32 formulas: 2e-5 (~300u).
# Measured worst cases in this file: fp32 3.2e-6, bf16 1.6e-2, fp16 8.4e-4 (out of ~10 tensors a case). A wrong mask,
# block or stride gives errors of O(1), so every tolerance fails it.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def rel_err(actual, ref) -> float:
    """max |actual - ref| / max |ref| over one tensor (a zero reference: 0 if actual is zero too, else inf)."""
    if ref.numel() == 0:
        return 0.0
    err = (actual.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    if scale == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / scale


def _close(actual, ref, tol=TOL[torch.float32], what=""):
    assert actual is not None and ref is not None, what
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    e = rel_err(actual, ref)
    assert e <= tol, f"{what}: max |err| / max |ref| = {e:.3g} > {tol:g} (max |ref| {ref.abs().max().item():.3g})"


def test_close_is_relative_per_tensor():
    """A small tensor (a bias gradient of scale 1e-3) that is 100% wrong fails; so does anything against zero."""
    small = torch.full((4, 3), 1e-3) * torch.arange(1, 13).view(4, 3)
    _close(small * (1 + 1e-6), small)
    for wrong in (2 * small, torch.zeros_like(small), small + 1e-4):
        with pytest.raises(AssertionError):
            _close(wrong, small)
    _close(torch.zeros(3), torch.zeros(3))
    with pytest.raises(AssertionError):
        _close(torch.full((3,), 1e-30), torch.zeros(3))


def _routing(T, E, k, pattern, g):
    """Expert ids [T, k]: distinct experts per token, then reshaped by the pattern; E means dropped."""
    if pattern == "one":  # every slot of every token on one expert
        return torch.full((T, k), E - 1, dtype=torch.long)
    if pattern == "all_dropped":
        return torch.full((T, k), E, dtype=torch.long)
    if pattern == "skewed":  # only experts 1 .. E-3 get tokens: 0, E-2 and E-1 stay empty
        return torch.rand(T, E - 3, generator=g).argsort(1)[:, :k] + 1
    idx = torch.rand(T, E, generator=g).argsort(1)[:, :k]
    if pattern == "dropped":
        idx[torch.rand(T, k, generator=g) < 0.3] = E
    return idx


def _inputs(spec, T, pattern, bias, strided, w1_scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, k, H, F = spec.num_experts, spec.top_k, spec.hidden, spec.ffn
    N = 2 * F if spec.gated else F
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if strided:  # column slice of a wider buffer (row stride > H), and out_in weights seen through a transpose
        x = rnd(T, H + 5)[:, 2 : H + 2]
        w1 = rnd(E, N, H).transpose(1, 2) * w1_scale
    else:
        x = rnd(T, H)
        w1 = rnd(E, H, N) * w1_scale
    wts = common.Weights(w1, rnd(E, F, H) * 0.2, rnd(E, N) * 0.5 if bias else None, rnd(E, H) * 0.5 if bias else None)
    idx = _routing(T, E, k, pattern, g)
    w = torch.rand(T, k, generator=g)
    grad = rnd(T, H)
    return x, idx, w, wts, grad


def _f64(wts):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return common.Weights(d(wts.w1), d(wts.w2), d(wts.b1), d(wts.b2))


# (id, spec kwargs, T, routing pattern, bias, strided inputs, w1 scale)
CASES = [
    ("concat-silu", dict(num_experts=4, top_k=2, hidden=48, ffn=40), 37, "random", False, True, 0.3),
    ("interleaved-swiglu_oai-dropped", dict(num_experts=4, top_k=2, hidden=32, ffn=24, activation="swiglu_oai",
                                            gate_layout="interleaved"), 21, "dropped", True, False, 1.5),
    ("separate-gelu_tanh-empty_experts", dict(num_experts=6, top_k=2, hidden=40, ffn=20, activation="gelu_tanh",
                                              gate_layout="separate"), 30, "skewed", True, True, 0.3),
    ("none-relu-bias", dict(num_experts=4, top_k=2, hidden=24, ffn=36, activation="relu", gate_layout="none"),
     25, "random", True, False, 0.3),
    ("none-sigmoid-T1-k1", dict(num_experts=3, top_k=1, hidden=20, ffn=18, activation="sigmoid", gate_layout="none"),
     1, "random", False, True, 0.3),
    ("concat-gelu-k8", dict(num_experts=8, top_k=8, hidden=24, ffn=20, activation="gelu"), 9, "random", True, True,
     0.3),
    ("concat-silu-E128", dict(num_experts=128, top_k=4, hidden=16, ffn=16), 20, "random", True, False, 0.3),
    ("interleaved-gelu-E1", dict(num_experts=1, top_k=1, hidden=36, ffn=17, activation="gelu",
                                 gate_layout="interleaved"), 19, "random", True, True, 0.3),
    ("concat-identity-one_expert", dict(num_experts=4, top_k=2, hidden=32, ffn=24, activation="identity"), 40, "one",
     False, True, 0.3),
    ("none-silu-all_dropped", dict(num_experts=4, top_k=2, hidden=16, ffn=16, gate_layout="none"), 5, "all_dropped",
     True, False, 0.3),
]


def _cast(wts, dtype):
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return common.Weights(c(wts.w1), c(wts.w2), c(wts.b1), c(wts.b2))


def check_against_float64(spec, x, idx, w, wts, grad, dtype, check_padding=False):
    """Forward (out, h, y) and backward (dx, d routing weights, dW1, dW2, db1, db2) of the Triton launchers in
    ``dtype`` against the ATen backend in float64 on the same rounded inputs, each tensor on its own scale.
    Returns {name: relative error}."""
    tol = TOL[dtype]
    x, grad, wts = x.to(dtype), grad.to(dtype), _cast(wts, dtype)
    ref_out, (ref_h, ref_y) = cpu.experts_forward(spec, x.double(), idx, w.double(), _f64(wts), save_y=True)
    out, (h, y) = tm.experts_forward(spec, x, idx, w, wts)
    assert out.dtype == h.dtype == y.dtype == dtype
    dx, dw, dwts = tm.experts_backward(spec, grad, x, idx, w, wts, h, y)
    rdx, rdw, rdwts = cpu.experts_backward(spec, grad.double(), x.double(), idx, w.double(), _f64(wts), ref_h)
    assert dx.dtype == dwts.w1.dtype == dwts.w2.dtype == dtype and dw.dtype == w.dtype
    pairs = [("out", out, ref_out), ("h", h, ref_h), ("y", y, ref_y), ("dx", dx, rdx), ("d routing weights", dw, rdw),
             ("dw1", dwts.w1, rdwts.w1), ("dw2", dwts.w2, rdwts.w2)]
    if wts.b1 is not None:
        pairs += [("db1", dwts.b1, rdwts.b1), ("db2", dwts.b2, rdwts.b2)]
    else:
        assert dwts.b1 is None and dwts.b2 is None
    for name, got, want in pairs:
        _close(got, want, tol, f"{name} ({dtype})")
    if check_padding:  # the op hands back h and y zero-padded to T*k rows; the padding is never read
        pad = lambda t: torch.cat([t, t.new_zeros(idx.numel() - t.shape[0], t.shape[1])])  # noqa: E731
        dx_p, dw_p, _ = tm.experts_backward(spec, grad, x, idx, w, wts, pad(h), pad(y))
        assert torch.equal(dx_p, dx) and torch.equal(dw_p, dw)
    return {name: rel_err(got, want) for name, got, want in pairs}


# Half precision on one case of each gate layout. Not the clamped swiglu_oai one: there h is stored in the dtype
# and an h within one ulp of the clamp limit (bf16: 0.03 at 7) flips the clamp's gradient mask, a discontinuity
# (dW1 errors of ~0.17 in bf16), not a rounding error; its kernels are the fp32 case's.
HALF_CASES = {"concat-silu", "interleaved-gelu-E1", "separate-gelu_tanh-empty_experts", "none-relu-bias"}
DTYPE_CASES = [(c, torch.float32) for c in CASES] + [
    (c, dt) for dt in (torch.bfloat16, torch.float16) for c in CASES if c[0] in HALF_CASES]


@pytest.mark.parametrize("case,dtype", DTYPE_CASES, ids=[f"{c[0]}-{str(d)[6:]}" for c, d in DTYPE_CASES])
def test_experts_forward_backward(case, dtype):
    _, kw, T, pattern, bias, strided, w1_scale = case
    spec = MoESpec(**kw)
    x, idx, w, wts, grad = _inputs(spec, T, pattern, bias, strided, w1_scale)
    if T * spec.top_k <= 40 and dtype == torch.float32:  # the per-token definition, as a check of the check
        ref_out, _ = cpu.experts_forward(spec, x.double(), idx, w.double(), _f64(wts))
        _close(ref_out, common.reference_experts(spec, x.double(), idx, w.double(), _f64(wts)), 1e-10, "reference")
    check_against_float64(spec, x, idx, w, wts, grad, dtype, check_padding=pattern == "dropped")


# Shapes for the GPU configs: every dimension spans more than one block of the largest config and ends in a
# partial block (H = 264 > 256 = the widest BLOCK_N, 2F = 272; F = 136 > 128; 70 rows per expert > 64 = the widest
# wgrad BLOCK_K; 10 row blocks > GROUP_M = 8). Row blocks are the interpreter's 16 (BLOCK_M comes from the plan).
CONFIG_SPECS = [
    ("concat-silu-bias", dict(num_experts=2, top_k=2, hidden=264, ffn=136, has_bias=True), True),
    ("interleaved-swiglu_oai", dict(num_experts=2, top_k=2, hidden=264, ffn=136, activation="swiglu_oai",
                                    gate_layout="interleaved"), False),
    ("none-gelu-bias", dict(num_experts=2, top_k=2, hidden=264, ffn=136, activation="gelu", gate_layout="none"),
     True),
]
N_CONFIGS = max(len(tk.ROW_CFG), len(tk.GATED_CFG), len(tk.WGRAD_CFG))


def test_gpu_config_tables():
    """What the test below forces is what the GPU autotuner picks from: the kernels' tables, one per kernel."""
    assert len(tk.GPU_TABLES) == len(tk.AUTOTUNED)
    assert {id(t[0]) for t in tk.GPU_TABLES} == {id(tk.ROW_CFG), id(tk.GATED_CFG), id(tk.WGRAD_CFG)}
    assert all(len(r) == len(n) + 2 for rows, n in tk.GPU_TABLES for r in rows)
    # the shapes of CONFIG_SPECS exceed every block of every config
    assert max(r[0] for r in tk.ROW_CFG + tk.GATED_CFG) < 264 and max(r[1] for r in tk.ROW_CFG + tk.GATED_CFG) < 264
    assert max(r[0] for r in tk.GATED_CFG) < 136 and max(r[1] for r in tk.WGRAD_CFG) < 264
    assert max(r[2] for r in tk.WGRAD_CFG) <= 64 and max(r[0] for r in tk.WGRAD_CFG) < 136


@pytest.mark.parametrize("config", range(N_CONFIGS))
@pytest.mark.parametrize("which", CONFIG_SPECS, ids=[c[0] for c in CONFIG_SPECS])
def test_each_gpu_config(which, config):
    """Config ``config`` of every autotuned kernel's GPU table forced at once (num_warps / num_stages mean nothing
    to the interpreter: the blocks are what it runs), forward + backward against float64; bf16 too for the first
    spec."""
    _, kw, bias = which
    spec = MoESpec(**kw)
    x, idx, w, wts, grad = _inputs(spec, 70, "random", bias, True, 1.5 if spec.activation == "swiglu_oai" else 0.3)
    assert torch.bincount(idx.flatten(), minlength=2).min() > 64  # more rows per expert than the widest BLOCK_K
    with tk.forced_configs(config):
        forced = [k.configs[0].kwargs for k in tk.AUTOTUNED]
        check_against_float64(spec, x, idx, w, wts, grad, torch.float32)
        if which is CONFIG_SPECS[0] and config == N_CONFIGS - 1:
            check_against_float64(spec, x, idx, w, wts, grad, torch.bfloat16)
    assert forced[0]["BLOCK_N"] == tk.GATED_CFG[min(config, len(tk.GATED_CFG) - 1)][0]
    assert forced[4]["BLOCK_K"] == tk.WGRAD_CFG[min(config, len(tk.WGRAD_CFG) - 1)][2]
    assert all(len(k.configs) == 1 and k.configs[0].kwargs == tk.configs(d[:1], n)[0].kwargs
               for k, (d, n) in zip(tk.AUTOTUNED, [(tk.INTERPRET_GATED_CFG, tk.ROW_NAMES),
                                                   (tk.INTERPRET_ROW_CFG, tk.ROW_NAMES),
                                                   (tk.INTERPRET_ROW_CFG, tk.ROW_NAMES),
                                                   (tk.INTERPRET_GATED_CFG, tk.ROW_NAMES),
                                                   (tk.INTERPRET_WGRAD_CFG, tk.WGRAD_NAMES)]))  # restored


def test_swiglu_oai_case_hits_the_clamps():
    # the swiglu_oai case above is only meaningful if gate and up values fall outside [-limit, limit]
    spec = MoESpec(**CASES[1][1])
    x, idx, w, wts, _ = _inputs(spec, 21, "dropped", True, False, 1.5)
    _, (h, _) = tm.experts_forward(spec, x, idx, w, wts)
    gate, up = common.split_gate_up(spec, h)
    assert (gate > spec.act_limit).any() and (up.abs() > spec.act_limit).any()


def test_atomic_combine_matches_deterministic():
    spec = MoESpec(num_experts=5, top_k=3, hidden=40, ffn=24, has_bias=True)
    x, idx, w, wts, grad = _inputs(spec, 23, "dropped", True, True)
    out, (h, y) = tm.experts_forward(spec, x, idx, w, wts)
    out_a, (h_a, y_a) = tm.experts_forward(spec, x, idx, w, wts, deterministic=False)
    _close(out_a, out, 1e-6, "out")
    assert torch.equal(h_a, h) and torch.equal(y_a, y)
    dx, dw, _ = tm.experts_backward(spec, grad, x, idx, w, wts, h, y)
    dx_a, dw_a, _ = tm.experts_backward(spec, grad, x, idx, w, wts, h, y, deterministic=False)
    _close(dx_a, dx, 1e-6, "dx")
    assert torch.equal(dw_a, dw)


@pytest.mark.parametrize("E,k,T,pattern", [(5, 2, 37, "dropped"), (6, 2, 30, "skewed"), (4, 2, 3, "one"),
                                             (4, 1, 4, "all_dropped"), (128, 4, 20, "random")])
def test_plan(E, k, T, pattern):
    idx = _routing(T, E, k, pattern, torch.Generator().manual_seed(1))
    plan = tm.make_plan(idx, E, block_m=16)
    flat = idx.flatten()
    order = torch.sort(flat, stable=True).indices
    n = int((flat < E).sum())
    assert plan.n_valid == n and torch.equal(plan.order.long(), order[:n])
    counts = torch.bincount(flat, minlength=E + 1)[:E]
    assert torch.equal(plan.starts[1:].long() - plan.starts[:-1].long(), counts)
    used = int(plan.block_starts[-1])
    assert used == int(((counts + 15) // 16).sum()) <= plan.num_blocks
    assert (plan.block_expert[used:] == -1).all()
    blocks = plan.sorted_ids[: used * 16].view(used, 16).long()
    for b in range(used):  # each block: one expert, that expert's rows in order, then padding
        e = int(plan.block_expert[b])
        rows = blocks[b][blocks[b] < n]
        assert rows.numel() and (flat[order[rows]] == e).all()
        assert torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + rows.numel()))
        assert (blocks[b][rows.numel():] == n).all()
    # every sorted row appears exactly once
    assert torch.equal(torch.sort(blocks[blocks < n]).values, torch.arange(n))


def test_is_available_needs_cuda():
    assert not tk.is_available(torch.randn(2, 2))


def test_inference_forward_writes_no_activations():
    spec = MoESpec(**CASES[1][1])
    x, idx, w, wts, _ = _inputs(spec, 21, "dropped", True, False, 1.5)
    out, _ = tm.experts_forward(spec, x, idx, w, wts)
    out_i, saved = tm.experts_forward(spec, x, idx, w, wts, save=False)
    assert saved == (None, None) and torch.equal(out_i, out)


# ============================================================================ backend choice and the ops on Triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_select_picks_triton_under_the_interpreter(dtype):
    spec = MoESpec(num_experts=4, top_k=2, hidden=16, ffn=8)
    x = torch.zeros(3, 16, dtype=dtype)
    assert kernels.select(spec, x).name == "triton"
    assert kernels.select(None, x).name == "triton"  # the plan only (dispatch_combine)


def test_select_falls_back_to_aten():
    spec = MoESpec(num_experts=4, top_k=2, hidden=16, ffn=8)
    assert kernels.select(spec, torch.zeros(3, 16, dtype=torch.float64)).name == "aten"
    score_in = MoESpec(num_experts=4, top_k=2, hidden=16, ffn=8, score_on_input=True)
    assert kernels.select(score_in, torch.zeros(3, 16)).name == "aten"
    with kernels.use("triton"), pytest.raises(RuntimeError, match="cannot compute"):
        kernels.select(score_in, torch.zeros(3, 16))


def _op_weights(spec, g, dtype):
    """The op's weight lists for ``spec`` (stacked or one tensor per expert, out_in or in_out), float64 masters."""
    E, H, F = spec.num_experts, spec.hidden, spec.ffn
    n_up = 2 * F if spec.gated and spec.gate_layout != "separate" else F

    def w(n_out, n_in, scale):
        shape = (n_out, n_in) if spec.weight_layout == "out_in" else (n_in, n_out)
        t = torch.randn(E, *shape, generator=g, dtype=torch.float64) * scale
        return [t] if spec.stacked else list(t.unbind(0))

    def b(n):
        if not spec.has_bias:
            return []
        t = torch.randn(E, n, generator=g, dtype=torch.float64) * 0.3
        return [t] if spec.stacked else list(t.unbind(0))

    gate = w(F, H, H ** -0.5) if spec.gate_layout == "separate" else []
    b_gate = b(F) if spec.gate_layout == "separate" else []
    lists = [gate, w(n_up, H, H ** -0.5), w(H, F, F ** -0.5), b_gate, b(n_up), b(H)]
    return [[t.to(dtype) for t in l] for l in lists]


OP_SPECS = [
    ("concat-silu-stacked", dict(num_experts=4, top_k=2, hidden=24, ffn=20)),
    ("concat-silu-bias-in_out", dict(num_experts=4, top_k=2, hidden=24, ffn=20, has_bias=True, weight_layout="in_out")),
    ("separate-gelu-bias-list", dict(num_experts=3, top_k=2, hidden=20, ffn=12, activation="gelu",
                                     gate_layout="separate", stacked=False, has_bias=True)),
    ("interleaved-swiglu_oai-bias", dict(num_experts=4, top_k=2, hidden=16, ffn=12, activation="swiglu_oai",
                                         gate_layout="interleaved", has_bias=True)),
    ("none-gelu-bias", dict(num_experts=4, top_k=1, hidden=20, ffn=28, activation="gelu", gate_layout="none",
                            has_bias=True)),
]


def _grads_on(backend, fn, inputs, grad):
    """``fn(*inputs)`` and the gradients of ``<out, grad>`` for every input, computed under kernels.use(backend)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with kernels.use(backend):
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    return out.detach(), grads


def _compare_op(fn, inputs, grad, dtype, names):
    """``fn`` on Triton in ``dtype`` vs the ATen backend in float64 on the same rounded inputs."""
    out, grads = _grads_on("triton", fn, inputs, grad)
    ref, ref_grads = _grads_on("aten", fn, [t.double() for t in inputs], grad.double())
    assert out.dtype == dtype
    _close(out, ref, TOL[dtype], "out")
    for name, a, r in zip(names, grads, ref_grads):
        _close(a, r, TOL[dtype], f"d {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", OP_SPECS, ids=[c[0] for c in OP_SPECS])
def test_ops_on_triton_experts(which, dtype):
    spec = MoESpec(**which[1])
    g = torch.Generator().manual_seed(5)
    T = 19
    lists = _op_weights(spec, g, dtype)
    sizes = [len(l) for l in lists]
    x, grad = torch.randn(T, spec.hidden, generator=g).to(dtype), torch.randn(T, spec.hidden, generator=g)
    idx = _routing(T, spec.num_experts, spec.top_k, "dropped", g)
    w = torch.rand(T, spec.top_k, generator=g).to(dtype)

    def fn(x_, w_, *flat):
        ls, i = [], 0
        for n in sizes:
            ls.append(list(flat[i: i + n]))
            i += n
        return torch.ops.moe_compile.experts(x_, idx, w_, *ls, spec.to_json())[0]

    flat = [t for l in lists for t in l]
    names = ["x", "w"] + [f"{n}[{j}]" for n, l in zip(["gate", "up", "down", "b_gate", "b_up", "b_down"], lists)
                          for j in range(len(l))]
    _compare_op(fn, [x, w, *flat], grad, dtype, names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_on_triton_experts_slots(dtype):
    """GShard capacity slots, one token per slot (the op's top-k form, k = E), with capacity drops."""
    from moe_compile.passes.gshard import topk_to_slots

    spec = MoESpec(num_experts=3, top_k=3, hidden=20, ffn=12, activation="gelu", gate_layout="none", has_bias=True)
    g = torch.Generator().manual_seed(6)
    S, E, C = 17, 3, 8
    idx = torch.rand(S, E, generator=g).argsort(-1)[:, :2]
    dispatch, combine = topk_to_slots(idx, torch.rand(S, 2, generator=g), E, C)  # 34 choices, 24 slots: drops
    assert int(dispatch.sum()) < 2 * S
    _, up, down, _, b_up, b_down = _op_weights(spec, g, dtype)
    x, grad = torch.randn(S, spec.hidden, generator=g).to(dtype), torch.randn(S, spec.hidden, generator=g)

    def fn(x_, c_, u, d, bu, bd):
        return torch.ops.moe_compile.experts_slots(x_, dispatch.to(x_.dtype), c_, [], [u], [d], [], [bu], [bd],
                                                   spec.to_json())[0]

    _compare_op(fn, [x, combine.to(dtype), *up, *down, *b_up, *b_down], grad, dtype,
                ["x", "combine", "up", "down", "b_up", "b_down"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_on_triton_dispatch_combine(dtype):
    """The user's own experts between a fused dispatch and combine: only the plan is the backend's, so Triton's and
    ATen's runs are bitwise equal in the same dtype (and within the dtype tolerance of float64)."""
    import copy

    from models import LoopExperts

    from moe_compile import capture

    torch.manual_seed(7)
    mod = LoopExperts(4, 16, 12).to(dtype)
    mod64 = copy.deepcopy(mod).double()
    g = torch.Generator().manual_seed(7)
    T = 15
    x, grad = torch.randn(T, 16, generator=g).to(dtype), torch.randn(T, 16, generator=g)
    idx = _routing(T, 4, 2, "dropped", g)
    w = torch.rand(T, 2, generator=g).to(dtype)

    def run(m):
        key, names = capture.module_key(m), [n for n, _ in m.named_parameters()]
        return (lambda x_, w_, *ps: torch.ops.moe_compile.dispatch_combine(x_, idx, w_, list(ps), key)), names

    fn, names = run(mod)
    params = [p.detach() for p in mod.parameters()]
    out_t, grads_t = _grads_on("triton", fn, [x, w, *params], grad)
    out_a, grads_a = _grads_on("aten", fn, [x, w, *params], grad)
    assert torch.equal(out_t, out_a) and all(torch.equal(a, b) for a, b in zip(grads_t, grads_a))
    fn64, _ = run(mod64)
    ref, ref_grads = _grads_on("aten", fn64, [x.double(), w.double(), *[p.detach() for p in mod64.parameters()]],
                               grad.double())
    _close(out_t, ref, TOL[dtype], "out")
    for name, a, r in zip(["x", "w", *names], grads_t, ref_grads):
        _close(a, r, TOL[dtype], f"d {name}")
