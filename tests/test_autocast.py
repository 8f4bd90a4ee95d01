"""Under ``torch.autocast`` (CPU, bfloat16) the fused ops compute in the dtype the block's own code does and
return what it returns: compiled vs eager autocast, output dtype, output and every gradient at a bf16 tolerance,
and the dtype the kernels actually ran in (a recording kernel backend). A block whose code does not autocast
(HF's ``grouped_mm`` experts: ``torch._grouped_mm`` has no autocast rule) stays float32, to fp32 precision."""
import copy

import pytest
import torch
import torch.distributed as dist

import moe_compile
from moe_compile import kernels

import models
import parallel_harness as testing
from helpers import recording_backend, tiny_hf_model

BF16 = 3e-2  # max |err| / max |ref|: a few bf16 roundings (eps 2^-8) through two GEMMs and their gradients


@pytest.fixture
def recorder():
    backend = kernels.register(recording_backend("dtype_recorder"))
    try:
        yield backend
    finally:
        kernels.unregister(backend.name)


def _dtypes(recorder):
    return [dtype for method, _, dtype in recorder.calls if method != "plan"]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _step(model, params, x, weight):
    for p in params:
        p.grad = None
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xx)
        out = out[0] if isinstance(out, tuple) else out
        loss = (out.float() * weight).sum()
    loss.backward()
    return out, xx.grad, [p.grad.clone() for p in params]


def _compare(model, x, compiler="aot_eager"):
    """(eager output, compiled output, {quantity: relative difference}) of one autocast training step."""
    torch.manual_seed(1)
    ref_model = copy.deepcopy(model)
    out_ref = ref_model(x)
    out_ref = out_ref[0] if isinstance(out_ref, tuple) else out_ref
    weight = torch.randn(out_ref.shape)
    ref, dx_ref, g_ref = _step(ref_model, list(ref_model.parameters()), x, weight)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": compiler})
    out, dx, g = _step(compiled, list(model.parameters()), x, weight)
    assert all(r.fused for r in moe_compile.backend.last_regions), moe_compile.backend.last_regions
    errs = {"out": _rel(out, ref), "dx": _rel(dx, dx_ref)}
    for (n, p), a, b in zip(model.named_parameters(), g, g_ref):
        assert a.dtype == p.dtype == b.dtype, n
        errs[n] = _rel(a, b)
    return ref, out, errs


class InlineHF(models.InlineMoE):
    """The inline ModuleList loop as HF writes it under autocast: each expert's output cast to the buffer's dtype."""

    def forward(self, x):
        B, S, H = x.shape
        x = x.view(-1, H)
        w, idx = torch.topk(torch.softmax(self.gate(x), dim=-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, (expert(x[tok]) * w[tok, slot, None]).to(out.dtype))
        return out.view(B, S, H)


CASES = {
    # name: (model factory, input, the mode the pass must find)
    "hf_mixtral_eager": (lambda: tiny_hf_model("mixtral", "eager").model.layers[0].mlp, (2, 9, 32), "cast"),
    "decorated_list": (lambda: models.Net(models.MoELayer(models.DecoratedLoopExperts(4, 16, 24), 16, 4, 2), 16),
                       (2, 7, 16), "cast"),
    "inline_list": (lambda: InlineHF(4, 16, 24, 2), (2, 7, 16), "cast"),
    "gshard_einsum": (lambda: models.GShardMoE(4, 16, 24, k=2, capacity_factor=2.0, stacked=True), (2, 8, 16),
                      "cast_out"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_ops_follow_eager_autocast(name, recorder):
    factory, shape, mode = CASES[name]
    torch.manual_seed(0)
    model = factory()
    if name == "hf_mixtral_eager":
        shape = (2, 9, model.gate.weight.shape[1])
    ref, out, errs = _compare(model, torch.randn(*shape))
    assert [r.spec.autocast for r in moe_compile.backend.last_regions] == [mode]
    assert out.dtype == ref.dtype
    assert _dtypes(recorder) and set(_dtypes(recorder)) == {torch.bfloat16}, _dtypes(recorder)
    assert max(errs.values()) < BF16, errs


def test_code_that_does_not_autocast_stays_fp32(recorder):
    torch.manual_seed(0)
    model = tiny_hf_model("mixtral", "grouped_mm").model.layers[0].mlp
    ref, out, errs = _compare(model, torch.randn(2, 9, model.gate.weight.shape[1]))
    assert [r.spec.autocast for r in moe_compile.backend.last_regions] == ["none"]
    assert out.dtype == ref.dtype == torch.float32
    assert set(_dtypes(recorder)) == {torch.float32}, _dtypes(recorder)
    # the experts computed in fp32 as eager's did; only the router's GEMM (and its part of dx) ran in bf16, where
    # the two sides sum bf16-rounded products in another order. Casting the experts would cost ~1e-3 here.
    assert max(v for n, v in errs.items() if n.startswith("experts")) < 1e-5, errs
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.slow
def test_inductor_follows_eager_autocast(recorder):
    """Inductor cast the fused op's inputs itself before (aot_eager did not): both now do what eager does."""
    torch.manual_seed(0)
    model = tiny_hf_model("mixtral", "eager").model.layers[0].mlp
    ref, out, errs = _compare(model, torch.randn(2, 9, model.gate.weight.shape[1]), compiler="inductor")
    assert out.dtype == ref.dtype and set(_dtypes(recorder)) == {torch.bfloat16}, _dtypes(recorder)
    assert max(errs.values()) < BF16, errs


def test_eager_call_of_the_op_follows_autocast():
    """The op called eagerly (a parallelized module's forward is one) casts as the spec says."""
    from moe_compile.spec import MoESpec

    spec = MoESpec(num_experts=4, top_k=2, hidden=16, ffn=8, gate_layout="none", stacked=True)
    g = torch.Generator().manual_seed(0)
    x, idx, w = torch.randn(5, 16, generator=g), torch.randint(0, 4, (5, 2), generator=g), torch.rand(5, 2, generator=g)
    up, down = torch.randn(4, 8, 16, generator=g), torch.randn(4, 16, 8, generator=g)
    for mode, want in (("cast", torch.float32), ("cast_out", torch.bfloat16), ("none", torch.float32)):
        s = moe_compile.passes.autocast.with_autocast(spec, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = moe_compile.ops.fused_experts(s, x, idx, w, (), [up], [down])
        exact = moe_compile.ops.fused_experts(s, x, idx, w, (), [up], [down])
        lowered = moe_compile.ops.fused_experts(s, x.bfloat16(), idx, w, (), [up], [down])
        assert out.dtype == want, mode
        if mode == "none":
            torch.testing.assert_close(out, exact)
        else:
            torch.testing.assert_close(out, lowered.to(want))


# --------------------------------------------------------------------------------------------- parallel
def _w_parallel_autocast(mode, kind):
    """A parallelized model run eagerly under autocast against one process's eager autocast on the global batch."""
    from moe_compile import parallel as api

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = testing.toy_model(dict(kind=kind, E=4, k=2, layers=1))
    ref = copy.deepcopy(model)
    par = api.parallelize(copy.deepcopy(model), mode=mode)
    g = torch.Generator().manual_seed(3)
    x_all, c_all = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    lo, hi = rank * 4, rank * 4 + 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = ref(x_all)
        out = par(x_all[lo:hi])
    (out_ref.float() * c_all).sum().backward()
    (out.float() * c_all[lo:hi]).sum().backward()
    errs = {"out": _rel(out, out_ref[lo:hi]), "dtype": str(out.dtype) == str(out_ref.dtype)}
    specs = [m._moe_parallel.spec.autocast for _, m in api.tags.parallel_modules(par)]
    for path, m in api.tags.parallel_modules(par):
        pre = f"{path}."
        full = {n: dict(ref.named_parameters())[pre + n].grad for s in m._moe_parallel.full_names.values() for n in s}
        for n, v in api.checkpoint.local_from_full(m, full).items():
            errs[n] = _rel(m.get_parameter(n).grad, v)
    return errs, specs


@pytest.mark.parametrize("mode", ["expert", "data"])
def test_parallel_modes_follow_eager_autocast(pool2, mode):
    for errs, specs in pool2.run(_w_parallel_autocast, mode, "mixtral"):
        assert specs == ["cast"], specs
        assert errs.pop("dtype") is True
        assert max(errs.values()) < BF16, errs
