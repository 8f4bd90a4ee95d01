"""The Triton MoE kernels against float64 torch references, run by Triton's interpreter on CPU tensors.

Triton picks interpreter or compiled mode when a kernel is decorated, and decorates its own library (tl.sum,
tl.cdiv, ...) when it is imported: one process runs either interpreted or compiled Triton, never both. So this file
runs in this process only where that is safe -- TRITON_INTERPRET=1 was given, or nothing has imported triton yet on a
machine without CUDA -- and otherwise (e.g. the full suite, where importing moe_compile imports inductor and so
triton) in a fresh process, by test_in_fresh_process.

Shapes are small and deliberately not multiples of the interpreter's block sizes (16 rows, 32 columns, 32 / 16 K).
"""
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


def _close(actual, ref, tol=1e-4, what=""):
    assert actual is not None and ref is not None, what
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    err = (actual.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


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


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_experts_forward_backward(case):
    _, kw, T, pattern, bias, strided, w1_scale = case
    spec = MoESpec(**kw)
    x, idx, w, wts, grad = _inputs(spec, T, pattern, bias, strided, w1_scale)
    ref_out, (ref_h, ref_y) = cpu.experts_forward(spec, x.double(), idx, w.double(), _f64(wts), save_y=True)
    if T * spec.top_k <= 40:  # the per-token definition, as a check of the check
        _close(ref_out, common.reference_experts(spec, x.double(), idx, w.double(), _f64(wts)), 1e-10, "reference")

    out, (h, y) = tm.experts_forward(spec, x, idx, w, wts)
    assert out.dtype == x.dtype and h.dtype == y.dtype == x.dtype
    _close(h, ref_h, what="h")
    _close(y, ref_y, what="y")
    _close(out, ref_out, what="out")

    dx, dw, dwts = tm.experts_backward(spec, grad, x, idx, w, wts, h, y)
    rdx, rdw, rdwts = cpu.experts_backward(spec, grad.double(), x.double(), idx, w.double(), _f64(wts), ref_h)
    _close(dx, rdx, what="dx")
    _close(dw, rdw, what="d routing weights")
    _close(dwts.w1, rdwts.w1, what="dw1")
    _close(dwts.w2, rdwts.w2, what="dw2")
    if pattern == "dropped":  # the op hands back h and y zero-padded to T*k rows; the padding is never read
        pad = lambda t: torch.cat([t, t.new_zeros(idx.numel() - t.shape[0], t.shape[1])])  # noqa: E731
        dx_p, dw_p, _ = tm.experts_backward(spec, grad, x, idx, w, wts, pad(h), pad(y))
        assert torch.equal(dx_p, dx) and torch.equal(dw_p, dw)
    if bias:
        _close(dwts.b1, rdwts.b1, what="db1")
        _close(dwts.b2, rdwts.b2, what="db2")
    else:
        assert dwts.b1 is None and dwts.b2 is None


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    spec = MoESpec(num_experts=4, top_k=2, hidden=48, ffn=40)
    x, idx, w, wts, grad = _inputs(spec, 33, "dropped", True, True)
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    wts_h = common.Weights(c(wts.w1), c(wts.w2), c(wts.b1), c(wts.b2))
    ref_out, (ref_h, ref_y) = cpu.experts_forward(spec, c(x).double(), idx, w.double(), _f64(wts_h),
                                                  save_y=True)
    out, (h, y) = tm.experts_forward(spec, c(x), idx, w, wts_h)
    assert out.dtype == dtype
    _close(out, ref_out, 2e-2, "out")
    _close(h, ref_h, 2e-2, "h")
    dx, dw, dwts = tm.experts_backward(spec, c(grad), c(x), idx, w, wts_h, h, y)
    rdx, rdw, rdwts = cpu.experts_backward(spec, c(grad).double(), c(x).double(), idx, w.double(), _f64(wts_h),
                                           ref_h)
    assert dx.dtype == dwts.w1.dtype == dtype and dw.dtype == w.dtype
    for name, a, r in [("dx", dx, rdx), ("dw", dw, rdw), ("dw1", dwts.w1, rdwts.w1), ("dw2", dwts.w2, rdwts.w2),
                       ("db1", dwts.b1, rdwts.b1), ("db2", dwts.b2, rdwts.b2)]:
        _close(a, r, 3e-2, name)


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
