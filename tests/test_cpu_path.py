"""The ATen path (``kernels/aten.py``): forward and hand-written backward against autograd through the per-token
definition, in float64, for every activation and gate layout, with the elementwise work run eagerly and compiled
by inductor (the path large inputs take)."""
from __future__ import annotations

import pytest
import torch

from moe_compile.kernels import aten as cpu
from moe_compile.kernels import common
from moe_compile.spec import MoESpec

ACTS = [  # (activation, gated, gate_layout)
    ("silu", True, "concat"),
    ("silu", True, "interleaved"),
    ("gelu", True, "concat"),
    ("gelu_tanh", False, "none"),
    ("relu", False, "none"),
    ("sigmoid", True, "concat"),
    ("identity", False, "none"),
    ("swiglu_oai", True, "interleaved"),
]


def _case(act, gated, layout, bias, weight_layout, T=13, E=5, k=2, H=8, F=6, seed=0):
    extra = dict(act_alpha=1.702, act_limit=0.7) if act == "swiglu_oai" else {}
    spec = MoESpec(num_experts=E, top_k=k, hidden=H, ffn=F, activation=act, gate_layout=layout,
                   weight_layout=weight_layout, stacked=True, has_bias=bias, **extra)
    g = torch.Generator().manual_seed(seed)
    N = 2 * F if gated else F
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, grad = rnd(T, H), rnd(T, H)
    w, idx = rnd(T, E).softmax(-1).topk(k)
    idx[0, 1] = E  # a dropped (token, slot) pair
    idx[1:4, 0] = 0  # an expert with several rows, others possibly empty
    w1, w2 = rnd(E, H, N) * 0.5, rnd(E, F, H) * 0.5
    b1, b2 = (rnd(E, N), rnd(E, H)) if bias else (None, None)
    return spec, x, idx, w, common.Weights(w1, w2, b1, b2), grad


def _reference(spec, x, idx, w, wts, grad):
    leaves = [t.detach().requires_grad_() for t in (x, w, wts.w1, wts.w2)]
    b = [None if t is None else t.detach().requires_grad_() for t in (wts.b1, wts.b2)]
    out = common.reference_experts(spec, leaves[0], idx, leaves[1], common.Weights(*leaves[2:], *b))
    ins = leaves + [t for t in b if t is not None]
    grads = torch.autograd.grad(out, ins, grad, allow_unused=True)
    return out.detach(), grads


def _check(spec, x, idx, w, wts, grad, tol=1e-10):
    ref_out, ref = _reference(spec, x, idx, w, wts, grad)
    out, (h, xs) = cpu.experts_forward(spec, x, idx, w, wts)
    dx, dw, d = cpu.experts_backward(spec, grad, x, idx, w, wts, h, xs)
    got = [dx, dw, d.w1, d.w2] + [t for t in (d.b1, d.b2) if t is not None]
    names = ["dx", "dw", "dw1", "dw2", "db1", "db2"]
    err = lambda a, r: float((a - r).abs().max() / r.abs().max().clamp_min(1e-30))  # noqa: E731
    assert err(out, ref_out) <= tol, ("out", err(out, ref_out))
    for n, a, r in zip(names, got, ref):
        r = torch.zeros_like(a) if r is None else r
        assert a.shape == r.shape, n
        assert err(a, r) <= tol, (n, err(a, r))
    # the same backward with xs gathered again, and the forward that saves y instead
    _, (h2, y) = cpu.experts_forward(spec, x, idx, w, wts, save_y=True)
    assert torch.equal(h2, h) and y.shape == xs.shape
    dx2, dw2, _ = cpu.experts_backward(spec, grad, x, idx, w, wts, h)
    assert torch.equal(dx2, dx) and torch.equal(dw2, dw)


@pytest.mark.parametrize("act,gated,layout", ACTS, ids=[f"{a}-{l}" for a, _, l in ACTS])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_layout", ["in_out", "out_in"])
def test_eager_kernels_match_autograd(monkeypatch, act, gated, layout, bias, weight_layout):
    monkeypatch.setattr(cpu, "KERNELS", "eager")
    _check(*_case(act, gated, layout, bias, weight_layout))


@pytest.mark.parametrize("act,gated,layout", [ACTS[0], ACTS[3], ACTS[7]])
def test_one_kernel_pair_serves_every_size(monkeypatch, act, gated, layout):
    monkeypatch.setattr(cpu, "KERNELS", "eager")
    for H, F in [(8, 6), (12, 10), (4, 3)]:
        _check(*_case(act, gated, layout, False, "out_in", H=H, F=F))


def test_swiglu_oai_case_reaches_the_clamps():
    spec, x, idx, w, wts, _ = _case("swiglu_oai", True, "interleaved", True, "in_out")
    _, (h, _) = cpu.experts_forward(spec, x, idx, w, wts)
    gate, up = common.split_gate_up(spec, h)
    assert (gate > spec.act_limit).any() and (up.abs() > spec.act_limit).any() and (gate < spec.act_limit).any()


COMPILED = [ACTS[0], ACTS[7]]
SLOW_COMPILED = [a for a in ACTS if a not in COMPILED]


def _compiled_check(monkeypatch, act, gated, layout):
    monkeypatch.setattr(cpu, "KERNELS", "inductor")
    with _no_fallback():
        _check(*_case(act, gated, layout, True, "out_in", T=40), tol=1e-9)
        # other sizes (one kernel pair serves every size of an activation and layout)
        _check(*_case(act, gated, layout, False, "in_out", T=7, H=12, F=10, seed=1), tol=1e-9)
    assert not cpu._FAILED


class _no_fallback:
    """Fail if the compiled kernels fell back to eager (they warn when they do)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings(record=True)
        self.records = self._w.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
        bad = [str(r.message) for r in self.records if "elementwise kernels failed" in str(r.message)]
        assert not bad, bad


@pytest.mark.parametrize("act,gated,layout", COMPILED, ids=[f"{a}-{l}" for a, _, l in COMPILED])
def test_compiled_kernels_match_autograd(monkeypatch, act, gated, layout):
    _compiled_check(monkeypatch, act, gated, layout)


@pytest.mark.slow
@pytest.mark.parametrize("act,gated,layout", SLOW_COMPILED, ids=[f"{a}-{l}" for a, _, l in SLOW_COMPILED])
def test_compiled_kernels_match_autograd_all_activations(monkeypatch, act, gated, layout):
    _compiled_check(monkeypatch, act, gated, layout)


def test_compiled_and_eager_kernels_agree_in_fp32(monkeypatch):
    spec, x, idx, w, wts, grad = _case("silu", True, "concat", False, "out_in", T=64, H=32, F=16)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    args = (spec, x.float(), idx, w.float(), common.Weights(*map(f32, (wts.w1, wts.w2, wts.b1, wts.b2))))
    results = {}
    for mode in ("eager", "inductor"):
        monkeypatch.setattr(cpu, "KERNELS", mode)
        out, (h, xs) = cpu.experts_forward(*args)
        dx, dw, d = cpu.experts_backward(*args[:1], grad.float(), *args[1:], h, xs)
        results[mode] = [out, dx, dw, d.w1, d.w2]
    for a, b in zip(results["eager"], results["inductor"]):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-5


def test_kernel_choice_by_size(monkeypatch):
    spec = MoESpec(num_experts=2, top_k=1, hidden=4, ffn=4)
    small, big = torch.zeros(4, 8), torch.zeros(cpu.MIN_COMPILED_ELEMENTS // 8, 8)
    monkeypatch.setattr(cpu, "KERNELS", "auto")
    eager = cpu._kernels(spec, small)
    assert eager is cpu._EAGER[cpu._key(spec)]
    assert cpu._kernels(spec, big) is not eager  # compiled (lazily: nothing is compiled until called)
    monkeypatch.setattr(cpu, "KERNELS", "eager")
    assert cpu._kernels(spec, big) is eager


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_compiled_kernels_inside_an_inductor_compiled_model(monkeypatch, family):
    """The elementwise kernels compile at run time inside the op, which itself runs inside an inductor-compiled
    graph: the training step still equals eager, and nothing falls back."""
    pytest.importorskip("transformers")
    from helpers import VOCAB, assert_same_training_step, loss_and_grads, tiny_hf_model

    monkeypatch.setattr(cpu, "KERNELS", "inductor")
    torch._dynamo.reset()
    model = tiny_hf_model(family, "grouped_mm")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = loss_and_grads(model, ids, labels=ids)
    with _no_fallback():
        got = loss_and_grads(torch.compile(model, backend="moe"), ids, labels=ids)
    assert_same_training_step(ref, got)
    assert not cpu._FAILED
    torch._dynamo.reset()


def test_reused_temporaries_never_leak_into_results(monkeypatch):
    """Two layers' forwards, then their backwards in reverse order (as autograd runs them), with the workspace on:
    every result equals the run that allocates each temporary afresh, and no result shares memory with it."""
    monkeypatch.setattr(cpu, "KERNELS", "eager")
    cases = [_case("silu", True, "concat", True, "out_in", T=30, seed=s) for s in (0, 1)]
    cases[1] = _case("gelu", True, "interleaved", False, "in_out", T=50, H=12, F=10, seed=1)

    def run():
        saved = [cpu.experts_forward(sp, x, idx, w, wts) for sp, x, idx, w, wts, _ in cases]
        grads = [cpu.experts_backward(sp, g, x, idx, w, wts, *saved[i][1])
                 for i, (sp, x, idx, w, wts, g) in reversed(list(enumerate(cases)))]
        return [t for out, sv in saved for t in (out, *sv)] + [
            t for dx, dw, d in grads for t in (dx, dw, d.w1, d.w2, d.b1, d.b2) if t is not None]

    monkeypatch.setattr(cpu, "WORKSPACE", False)
    fresh = run()
    monkeypatch.setattr(cpu, "WORKSPACE", True)
    cpu.release_workspace()
    reused = run()
    assert cpu.workspace_bytes() > 0
    bufs = [b.untyped_storage().data_ptr() for b in cpu._local.bufs.values()]
    for a, b in zip(fresh, reused):
        assert torch.equal(a, b)
        assert b.untyped_storage().data_ptr() not in bufs
    cpu.release_workspace()
    assert cpu.workspace_bytes() == 0
