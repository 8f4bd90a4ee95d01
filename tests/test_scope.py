"""Nothing process-wide: moe_compile's Dynamo settings and capture hold only for frames compiled with backend="moe"."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moe_compile
from helpers import count_op_calls, grads_equal, out_and_grads, rel_err
from models import AuxNet, DecoratedLoopExperts, DeepSpeedMoE, MoELayer, Net

SETTINGS = ("capture_scalar_outputs", "capture_dynamic_output_shape_ops")
HERE = os.path.dirname(__file__)


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    for k in ("TORCHDYNAMO_CAPTURE_SCALAR_OUTPUTS", "TORCHDYNAMO_CAPTURE_DYNAMIC_OUTPUT_SHAPE_OPS"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_import_and_moe_compile_leave_dynamo_config_at_defaults():
    out = _run("""
        import torch
        from torch._dynamo import config
        names = ("capture_scalar_outputs", "capture_dynamic_output_shape_ops")
        before = [getattr(config, n) for n in names]
        import moe_compile
        after_import = [getattr(config, n) for n in names]
        from models import InlineMoE, Net
        torch.manual_seed(0)
        m = Net(InlineMoE(4, 8, 12, 2), 8)
        torch.compile(m, backend="moe", options={"compiler": "eager"})(torch.randn(2, 5, 8))
        assert moe_compile.backend.last_regions and moe_compile.backend.last_regions[0].fused
        after_compile = [getattr(config, n) for n in names]
        moe_compile.explain(m, torch.randn(2, 5, 8))
        after_explain = [getattr(config, n) for n in names]
        print(before, after_import, after_compile, after_explain)
        assert before == after_import == after_compile == after_explain == [False, False]
    """)
    assert "[False, False]" in out


def test_other_backends_trace_as_torch_does():
    """A hand-written loop with torch.where breaks the graph under plain torch.compile, as it does without
    moe_compile: another model's compile is not given moe's settings."""
    from models import InlineMoE

    torch.manual_seed(0)
    model = Net(InlineMoE(4, 8, 12, 2), 8)
    torch._dynamo.reset()
    torch.compile(model, backend="moe", options={"compiler": "eager"})(torch.randn(2, 5, 8))
    torch._dynamo.reset()
    out = torch._dynamo.explain(Net(InlineMoE(4, 8, 12, 2), 8))(torch.randn(2, 5, 8))
    assert out.graph_break_count >= 1  # torch's defaults: nonzero/where is a graph break
    assert all(not getattr(torch._dynamo.config, n) for n in SETTINGS)


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_decorated_experts_not_captured_under_other_backends(backend):
    torch.manual_seed(0)
    model = Net(MoELayer(DecoratedLoopExperts(4, 8, 12), 8, 4, 2), 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 5, 8)
    (o0, g0), (o1, g1) = out_and_grads(model, x), out_and_grads(compiled, x)
    assert rel_err(o1, o0) <= 1e-6 and not grads_equal(g0, g1, 1e-6)
    assert count_op_calls(lambda: compiled(x)) == 0


def test_hf_experts_not_captured_under_other_backends():
    pytest.importorskip("transformers")
    from helpers import VOCAB, loss_and_grads, tiny_hf_model

    model = tiny_hf_model("mixtral", "grouped_mm")
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    ref, got = loss_and_grads(model, ids, labels=ids), loss_and_grads(compiled, ids, labels=ids)
    assert rel_err(got[0], ref[0]) <= 1e-5 and not grads_equal(ref[1], got[1], 1e-5)
    with torch.no_grad():
        assert count_op_calls(lambda: compiled(ids)) == 0
    torch._dynamo.reset()
    moe = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    with torch.no_grad():
        assert count_op_calls(lambda: moe(ids)) >= 2  # the same model under moe: both blocks captured


def test_deepspeed_style_gate_compiles_with_moe():
    """A 0-d capacity used as one_hot's num_classes: plain torch.compile compiles it; so does backend="moe", with
    the same numbers (its frame is traced with torch's defaults when moe's settings make the capacity unbacked)."""
    torch.manual_seed(0)
    model = AuxNet(DeepSpeedMoE(8, 12, 4), 8)
    for backend, opts in (("aot_eager", None), ("moe", {"compiler": "aot_eager"})):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, options=opts)
        for shape in ((2, 6, 8), (3, 5, 8)):
            x = torch.randn(*shape)
            (o0, g0), (o1, g1) = out_and_grads(model, x), out_and_grads(compiled, x)
            assert rel_err(o1, o0) <= 1e-6, backend
            assert set(g0) == set(g1) and not grads_equal(g0, g1, 1e-6), backend
        if backend == "moe":  # fused too: the one-rank all-to-all Functions are copies, the experts one op
            with torch.no_grad():
                assert count_op_calls(lambda: compiled(x), "moe_compile::experts_slots") >= 1
    assert all(not getattr(torch._dynamo.config, n) for n in SETTINGS)
    report = moe_compile.explain(model, torch.randn(2, 6, 8))
    assert [(r.module_path, r.fused) for r in report.regions] == [("moe", True)], str(report)


def test_decorator_binds_by_signature():
    torch.manual_seed(0)
    experts = DecoratedLoopExperts(4, 8, 12)
    x, idx, w = torch.randn(6, 8), torch.rand(6, 4).argsort(-1)[:, :2], torch.rand(6, 2)

    class ByKeyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = experts

        def forward(self, x, idx, w):
            return self.experts(x, topk_weights=w, topk_idx=idx)

    ref = experts(x, idx, w)
    assert torch.equal(ByKeyword()(x, idx, w), ref)
    torch._dynamo.reset()
    compiled = torch.compile(ByKeyword(), backend="moe", options={"compiler": "aot_eager"})
    assert rel_err(compiled(x, idx, w), ref) <= 1e-6
    assert moe_compile.backend.last_regions[0].fused

    class Extra(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = experts

        def forward(self, x, idx, w):
            return self.experts(x, idx, w, 3)

    torch._dynamo.reset()
    # the same TypeError as in eager mode (Dynamo runs the call eagerly once binding fails), never a wrong binding
    with pytest.raises(TypeError, match=r"takes 4 positional arguments but 5 were given|too many positional"):
        torch.compile(Extra(), backend="moe", options={"compiler": "aot_eager"})(x, idx, w)


class _SignSTE(torch.autograd.Function):
    """A straight-through estimator: forward sign, backward identity (not the forward's derivative)."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _Twice(torch.autograd.Function):
    """A copy forward whose backward doubles the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class _CopyNoGrad(torch.autograd.Function):
    """A copy whose output is marked non-differentiable."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        ctx.mark_non_differentiable(out)
        return (out,)

    @staticmethod
    def backward(ctx, g):
        return g


def test_only_identity_autograd_functions_are_inlined():
    from models import AllToAllIdentity
    from moe_compile.passes.normalise import inline_identity_functions

    def graph_of(fn):
        graphs = []

        def keep(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        x = torch.randn(3, 4, requires_grad=True)
        torch.compile(fn, backend=keep, fullgraph=True)(x)
        return graphs[0], x

    for fn, inlined in ((lambda x: AllToAllIdentity.apply(x) * 3, 1), (lambda x: _SignSTE.apply(x) * 3, 0),
                        (lambda x: _Twice.apply(x) * 3, 0), (lambda x: _CopyNoGrad.apply(x)[0] * 3 + x, 0)):
        gm, x = graph_of(fn)
        x2 = x.detach().clone().requires_grad_()
        assert inline_identity_functions(gm) == inlined
        out = gm(x2)[0]
        out.sum().backward()
        ref = fn(x)
        ref.sum().backward()
        assert torch.equal(out, ref) and torch.equal(x2.grad, x.grad)
