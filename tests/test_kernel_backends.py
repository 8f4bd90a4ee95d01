"""The kernel-backend interface (``moe_compile.kernels``): a third backend, registered here, receives every call of
every op and every parallel mode, and the numbers stay those of the ATen backend it delegates to."""
import copy
import os

import pytest
import torch
import torch.distributed as dist

import moe_compile
from moe_compile import kernels
from moe_compile.spec import MoESpec

import models
import parallel_harness as testing
from helpers import recording_backend


@pytest.fixture
def recording():
    backend = kernels.register(recording_backend())
    try:
        yield backend
    finally:
        kernels.unregister("recording")


def _train_step(model, x):
    out = model(x)
    out.square().mean().backward()
    return out


def _compiled_vs_eager(model, x, backend):
    eager = copy.deepcopy(model)
    ref = _train_step(eager, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    out = _train_step(compiled, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    return [c[:2] for c in backend.calls]


def test_experts_op_reaches_the_registered_backend(recording):
    torch.manual_seed(0)
    model = models.Net(models.MoELayer(models.DecoratedLoopExperts(4, 16, 24), 16, 4, 2), 16)
    calls = _compiled_vs_eager(model, torch.randn(2, 7, 16), recording)
    assert ("forward", "topk") in calls and ("backward", "topk") in calls, calls


def test_slots_op_reaches_the_registered_backend(recording):
    torch.manual_seed(0)
    model = models.GShardMoE(4, 16, 24, k=2, capacity_factor=2.0)
    calls = _compiled_vs_eager(model, torch.randn(2, 8, 16), recording)
    assert moe_compile.backend.last_regions[0].spec.dispatch == "slots"
    assert ("forward", "slots") in calls and ("backward", "slots") in calls and ("plan", "") in calls, calls


def test_dispatch_combine_plans_on_the_registered_backend(recording):
    torch.manual_seed(0)
    model = models.Net(models.MoELayer(models.NormedExperts(4, 16, 24), 16, 4, 2), 16)
    calls = _compiled_vs_eager(model, torch.randn(2, 7, 16), recording)
    assert moe_compile.backend.last_regions[0].spec.expert_body == "user"
    assert ("plan", "") in calls, calls


def test_select_order_forcing_and_errors(recording):
    spec = MoESpec(num_experts=2, top_k=1, hidden=4, ffn=4)
    x = torch.randn(3, 4)
    assert kernels.select(spec, x) is recording  # registered first
    with kernels.use("aten"):
        assert kernels.select(spec, x).name == "aten"
    assert kernels.select(spec, x) is recording
    with pytest.raises(ValueError, match="registered already"):
        kernels.register(recording_backend())
    with pytest.raises(TypeError, match="KernelBackend"):
        kernels.register(object())
    with pytest.raises(KeyError, match="no kernel backend named"):
        with kernels.use("nope"):
            pass
    with pytest.raises(ValueError, match="cannot be unregistered"):
        kernels.unregister("aten")


def test_builtin_selection_without_triton_interpreter():
    spec = MoESpec(num_experts=2, top_k=1, hidden=4, ffn=4)
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter makes Triton take CPU tensors")
    assert kernels.select(spec, torch.randn(3, 4)).name == "aten"
    assert kernels.select(spec, torch.randn(3, 4, dtype=torch.float64)).name == "aten"
    with pytest.raises(RuntimeError, match="cannot compute this block"):
        with kernels.use("triton"):
            kernels.select(spec, torch.randn(3, 4))


# --------------------------------------------------------------------------------------------- parallel modes
def _w_parallel_modes(kind):
    backend = kernels.register(recording_backend())
    try:
        res = {}
        for mode in ("expert", "data", "tensor"):
            backend.calls.clear()
            r = testing.compare(dict(kind=kind, E=4 if mode != "tensor" else 1, k=2 if mode != "tensor" else 1,
                                     tokens=[5, 3], modes=[mode, mode]))
            res[mode] = (r["errors"], [c[:2] for c in backend.calls])
        return res
    finally:
        kernels.unregister("recording")
        dist.barrier()


def test_every_parallel_mode_computes_on_the_registered_backend(pool2):
    for rank_res in pool2.run(_w_parallel_modes, "stacked"):
        for mode, (errs, calls) in rank_res.items():
            assert max(errs.values()) < 1e-5, (mode, errs)
            assert ("forward", "topk") in calls and ("backward", "topk") in calls, (mode, calls)
