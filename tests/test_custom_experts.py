"""@moe_compile.experts modules and hand-written experts: captured whole, fused when recognisable, equal to eager."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_compile
from helpers import out_and_grads as _step, count_op_calls, grads_equal, rel_err
from models import DecoratedLoopExperts, GatherExperts, LoopExperts, MoELayer, Net, NormedExperts
from moe_compile.recognise.experts import SLOTS, detect_experts_module




def _check_equal(model, x, tol=1e-4):
    ref_out, ref_g = _step(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    out, g = _step(compiled, x)
    assert rel_err(out, ref_out) <= tol
    assert set(g) == set(ref_g)
    assert not grads_equal(ref_g, g, tol)
    return compiled


def test_decorated_eager_behaviour_unchanged():
    torch.manual_seed(0)
    plain, deco = LoopExperts(4, 8, 16), DecoratedLoopExperts(4, 8, 16)
    deco.load_state_dict(plain.state_dict())
    x, idx, w = torch.randn(5, 8), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    assert torch.equal(plain(x, idx, w), deco(x, idx, w))


@pytest.mark.parametrize("experts_cls", [DecoratedLoopExperts, GatherExperts])
def test_decorated_fused(experts_cls):
    torch.manual_seed(0)
    model = Net(MoELayer(experts_cls(4, 16, 24), 16, 4, 2), 16)
    compiled = _check_equal(model, torch.randn(2, 7, 16))
    regions = moe_compile.backend.last_regions
    assert len(regions) == 1 and regions[0].fused, regions
    with torch.no_grad():
        assert count_op_calls(lambda: compiled(torch.randn(2, 7, 16)), "moe_compile::experts") >= 1


def test_not_an_mlp_fuses_dispatch_and_combine_around_user_code():
    torch.manual_seed(0)
    model = Net(MoELayer(NormedExperts(4, 16, 24), 16, 4, 2), 16)
    compiled = _check_equal(model, torch.randn(2, 7, 16))
    region = moe_compile.backend.last_regions[0]
    assert region.fused and region.spec.expert_body == "user" and "outside nn.Linear" in region.reason
    with torch.no_grad():
        assert count_op_calls(lambda: compiled(torch.randn(2, 7, 16)), "moe_compile::dispatch_combine") >= 1
    report = moe_compile.explain(model, torch.randn(2, 7, 16))
    assert report.graph_breaks == 0 and report.regions[0].fused, str(report)


@moe_compile.experts
class NotASum(NormedExperts):
    """Each token's output goes through a nonlinearity after the combine: not a weighted sum of experts."""

    def forward(self, hidden, topk_idx, topk_weights):
        return torch.tanh(super().forward(hidden, topk_idx, topk_weights))


def test_not_a_weighted_sum_is_left_alone_and_explained():
    torch.manual_seed(0)
    model = Net(MoELayer(NotASum(4, 16, 24), 16, 4, 2), 16)
    _check_equal(model, torch.randn(2, 7, 16))
    region = moe_compile.backend.last_regions[0]
    assert not region.fused and region.reason


def _module_grads(module, x, idx, w, g):
    params = list(module.parameters())
    out = module(x, idx, w)
    return out, torch.autograd.grad(out, [x, w, *params], g)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    E=st.integers(1, 9), k=st.integers(1, 4), H=st.integers(1, 12), F=st.integers(1, 12), T=st.integers(0, 20),
    act=st.sampled_from(["silu", "gelu", "relu"]), gated=st.booleans(), bias=st.booleans(), seed=st.integers(0, 99),
)
def test_detect_and_fused_op_equal_module(E, k, H, F, T, act, gated, bias, seed):
    """Property: for any hand-written ModuleList experts, detection finds the MLP and the fused op equals it,
    forward and every gradient (T=0, T=1 and fewer tokens than experts included)."""
    k = min(k, E)
    torch.manual_seed(seed)
    module = LoopExperts(E, H, F, act, gated, bias)
    match = detect_experts_module(module, top_k=k)
    assert match.ok, match.reason
    assert match.spec.activation == act and match.spec.gated == gated and match.spec.has_bias == bias
    x = torch.randn(T, H, requires_grad=True)
    idx = torch.rand(T, E).argsort(-1)[:, :k]
    w = torch.rand(T, k, requires_grad=True)
    g = torch.randn(T, H)
    ref, ref_grads = _module_grads(module, x, idx, w, g)
    # float64 truth: fp32 results are judged against it, no worse than eager fp32 (cancellation in tiny grads)
    m64 = copy.deepcopy(module).double()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth, truth_grads = _module_grads(m64, x64, idx, w64, g.double())
    named = dict(module.named_parameters())
    lists = [[named[n] for n in match.slots[s]] for s in SLOTS]
    out = moe_compile.ops.fused_experts(match.spec, x, idx, w, *lists)
    grads = torch.autograd.grad(out, [x, w, *module.parameters()], g, allow_unused=True)
    for got, eager, exact in zip([out, *grads], [ref, *ref_grads], [truth, *truth_grads]):
        got = got if got is not None else torch.zeros_like(eager)
        assert rel_err(got, exact) <= max(1e-5, 10 * rel_err(eager, exact))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    E=st.integers(1, 6), k=st.integers(1, 3), T=st.integers(1, 9), score=st.sampled_from(["softmax", "sigmoid"]),
    renorm=st.booleans(), act=st.sampled_from(["silu", "gelu", "relu"]), gated=st.booleans(), bias=st.booleans(),
)
def test_compiled_decorated_layer_equals_eager(E, k, T, score, renorm, act, gated, bias):
    k = min(k, E)
    torch.manual_seed(E * 100 + T)
    model = Net(MoELayer(DecoratedLoopExperts(E, 8, 12, act, gated, bias), 8, E, k, score, renorm), 8)
    _check_equal(model, torch.randn(1, T, 8))
    assert all(r.fused for r in moe_compile.backend.last_regions)


@pytest.mark.parametrize("dropped", [False, True])
def test_all_tokens_on_one_expert_and_dropped_tokens(dropped):
    """Every token routed to expert 2 (the other experts get no rows); with ``dropped``, id E (HF's sentinel) on
    every second slot contributes nothing."""
    torch.manual_seed(0)
    E, k, T = 4, 2, 6
    module = LoopExperts(E, 8, 12)
    match = detect_experts_module(module, top_k=k)
    x = torch.randn(T, 8, requires_grad=True)
    idx = torch.full((T, k), 2)
    if dropped:
        idx[:, 1] = E
    w = torch.rand(T, k, requires_grad=True)
    named = dict(module.named_parameters())
    out = moe_compile.ops.fused_experts(match.spec, x, idx, w, *[[named[n] for n in match.slots[s]] for s in SLOTS])
    expert = module.experts[2]
    ref = expert(x) * (w[:, :1] if dropped else w.sum(1, keepdim=True))
    assert rel_err(out, ref) <= 1e-5
    g = torch.randn(T, 8)
    got = torch.autograd.grad(out, [x, *expert.parameters()], g, retain_graph=True)
    want = torch.autograd.grad(ref, [x, *expert.parameters()], g)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, want))
    other = torch.autograd.grad(out, list(module.experts[0].parameters()), g, allow_unused=True)
    assert all(t is None or t.abs().max() == 0 for t in other)
