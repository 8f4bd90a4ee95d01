"""Hand-written MoE layers with no decorator: the inline region is found, proven and fused."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_compile
from helpers import out_and_grads as _step, grads_equal, rel_err
from models import GatherExperts, InlineGatherMoE, InlineMoE, LoopExperts, MoELayer, Net




def _check(model, xs, compiler="aot_eager", tol=1e-4):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": compiler})
    for x in xs:
        (o0, g0), (o1, g1) = _step(model, x), _step(compiled, x)
        assert rel_err(o1, o0) <= tol
        assert set(g0) == set(g1) and not grads_equal(g0, g1, tol)
        regions = moe_compile.backend.last_regions
        assert regions and all(r.fused for r in regions), regions
    return regions


@pytest.mark.parametrize("dispatch", ["where", "nonzero"])
@pytest.mark.parametrize("combine", ["index_add", "scatter_add"])
def test_inline_variants(dispatch, combine):
    torch.manual_seed(0)
    model = Net(InlineMoE(4, 8, 12, 2, dispatch=dispatch, combine=combine), 8)
    regions = _check(model, [torch.randn(2, 5, 8), torch.randn(3, 4, 8)])
    assert regions[0].module_path == "moe" and regions[0].spec.router.renormalize


def test_undecorated_experts_module():
    torch.manual_seed(0)
    model = Net(MoELayer(LoopExperts(3, 8, 12, bias=True), 8, 3, 2), 8)
    regions = _check(model, [torch.randn(2, 5, 8), torch.randn(1, 9, 8)])
    assert regions[0].module_path == "moe.experts"


def test_explain_reports_inline_block():
    torch.manual_seed(0)
    report = moe_compile.explain(Net(InlineMoE(4, 8, 12, 2), 8), torch.randn(2, 5, 8))
    assert [r.fused for r in report.regions] == [True] and report.graph_breaks == 0, str(report)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    E=st.integers(1, 6), k=st.integers(1, 3), T=st.integers(1, 9), H=st.sampled_from([4, 6, 8]),
    F=st.sampled_from([3, 8]), score=st.sampled_from(["softmax", "sigmoid"]), renorm=st.booleans(),
    act=st.sampled_from(["silu", "gelu", "relu"]), gated=st.booleans(), bias=st.booleans(),
    dispatch=st.sampled_from(["where", "nonzero"]),
)
def test_inline_property(E, k, T, H, F, score, renorm, act, gated, bias, dispatch):
    k = min(k, E)
    torch.manual_seed(E * 31 + T)
    model = Net(InlineMoE(E, H, F, k, act, gated, bias, score, renorm, dispatch), H)
    regions = _check(model, [torch.randn(1, T, H)])
    spec = regions[0].spec
    assert (spec.num_experts, spec.top_k, spec.activation, spec.gated, spec.has_bias) == (E, k, act, gated, bias)


@pytest.mark.slow
def test_inline_inductor():
    torch.manual_seed(0)
    _check(Net(InlineMoE(4, 16, 32, 2, act="gelu"), 16), [torch.randn(2, 6, 16), torch.randn(3, 5, 16)],
           compiler="inductor")


@pytest.mark.parametrize("bias", [False, True])
def test_inline_gather_of_stacked_weights(bias):
    torch.manual_seed(0)
    model = Net(InlineGatherMoE(4, 8, 6, 2, bias), 8)
    regions = _check(model, [torch.randn(2, 5, 8), torch.randn(3, 4, 8)])
    spec = regions[0].spec
    assert (spec.stacked, spec.gate_layout, spec.weight_layout, spec.has_bias) == (True, "concat", "out_in", bias)
    assert spec.router.score == "sigmoid"


def test_undecorated_gather_experts_module():
    torch.manual_seed(0)
    experts = GatherExperts(4, 8, 6)
    plain = type("PlainGather", (torch.nn.Module,), {"forward": GatherExperts._moe_compile_original_forward})()
    plain.w_in, plain.w_out = experts.w_in, experts.w_out
    regions = _check(Net(MoELayer(plain, 8, 4, 2), 8), [torch.randn(2, 5, 8)])
    assert regions[0].module_path == "moe.experts" and regions[0].spec.activation == "gelu"
