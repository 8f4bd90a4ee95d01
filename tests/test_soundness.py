"""The proof cannot be fooled by the weights' current values.

Each model starts from a degenerate initialisation under which several readings compute the same thing today (a
zero output projection makes every activation look alike; identical experts; a zero router). It is compiled, checked
against eager, trained one SGD step (the compiled graph is not rebuilt: Dynamo does not guard on weight values), and
checked again: a reading proven only on today's values would now differ from eager.
"""

import pytest
import torch
import torch.nn as nn

import moe_compile
from helpers import count_op_calls, grads_equal, out_and_grads, rel_err
from models import ACTS, DecoratedLoopExperts, InlineMoE, LoopExperts, MoELayer, Net

H, FF, E, K = 8, 12, 4, 2


@moe_compile.experts
class StackedExperts(nn.Module):
    """Stacked [E, F, H] / [E, H, F] weights, an activation chosen at construction, a loop over experts."""

    def __init__(self, act="gelu", gated=False):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(E, (2 if gated else 1) * FF, H) / H**0.5)
        self.w_out = nn.Parameter(torch.randn(E, H, FF) / FF**0.5)
        self.act, self.gated = ACTS[act](), gated

    def forward(self, hidden, topk_idx, topk_weights):
        out = torch.zeros_like(hidden)
        for e in range(self.w_in.shape[0]):
            tok, slot = torch.where(topk_idx == e)
            h = hidden[tok] @ self.w_in[e].t()
            if self.gated:
                g, u = h.chunk(2, dim=-1)
                h = self.act(g) * u
            else:
                h = self.act(h)
            out.index_add_(0, tok, (h @ self.w_out[e].t()) * topk_weights[tok, slot, None])
        return out


def _zero_outputs(model):
    """Zero every expert's output projection (a common init: the block starts as the identity)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("w2.weight", "w_out", "down_proj")):
                p.zero_()


def _identical_experts(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.ModuleList) and len(m) > 1 and all(isinstance(e, type(m[0])) for e in m):
                for e in m[1:]:
                    e.load_state_dict(m[0].state_dict())


def _train_and_compare(model, make_x, steps=2, tol=1e-5, blocks=1):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps + 1):
        x = make_x(step)
        (o0, g0), (o1, g1) = out_and_grads(model, x), out_and_grads(compiled, x)
        assert rel_err(o1, o0) <= tol, (step, rel_err(o1, o0))
        assert set(g0) == set(g1) and not grads_equal(g0, g1, tol), (step, grads_equal(g0, g1, tol))
        if step == 0:
            regions = list(moe_compile.backend.last_regions)
            assert sum(r.fused for r in regions) == blocks, regions
            with torch.no_grad():
                assert count_op_calls(lambda: compiled(x)) >= blocks
        # move the weights as training does (grads of the eager model, which equal the compiled ones)
        out_and_grads(model, x)
        opt.step()
    return regions


def _x(shape):
    return lambda step: torch.randn(*shape, generator=torch.Generator().manual_seed(100 + step))


@pytest.mark.parametrize("act", ["gelu", "relu", "sigmoid", "silu"])
@pytest.mark.parametrize("gated", [False, True])
def test_zero_output_modulelist_inline(act, gated):
    torch.manual_seed(0)
    model = Net(InlineMoE(E, H, FF, K, act=act, gated=gated), H)
    _zero_outputs(model)
    regions = _train_and_compare(model, _x((2, 6, H)))
    assert regions[0].spec.activation == act


@pytest.mark.parametrize("act", ["gelu", "relu", "sigmoid"])
@pytest.mark.parametrize("experts_cls", [LoopExperts, DecoratedLoopExperts])  # found inline / captured
def test_zero_output_modulelist_experts_module(act, experts_cls):
    torch.manual_seed(1)
    model = Net(MoELayer(experts_cls(E, H, FF, act=act, gated=False), H, E, K), H)
    _zero_outputs(model)
    regions = _train_and_compare(model, _x((2, 5, H)))
    assert regions[0].spec.activation == act


@pytest.mark.parametrize("act,gated", [("gelu", False), ("relu", False), ("sigmoid", True), ("gelu", True)])
def test_zero_output_decorated_stacked(act, gated):
    torch.manual_seed(3)
    model = Net(MoELayer(StackedExperts(act, gated), H, E, K), H)
    _zero_outputs(model)
    regions = _train_and_compare(model, _x((2, 5, H)))
    assert regions[0].spec.activation == act


def test_identical_experts_and_zero_outputs():
    torch.manual_seed(4)
    model = Net(InlineMoE(E, H, FF, K, act="gelu", gated=True, bias=True), H)
    _identical_experts(model)
    _zero_outputs(model)
    _train_and_compare(model, _x((2, 6, H)))


def test_zero_router():
    """All router scores equal: top-k breaks the ties the same way in eager and compiled code."""
    torch.manual_seed(5)
    model = Net(MoELayer(DecoratedLoopExperts(E, H, FF, act="relu", gated=False), H, E, K), H)
    with torch.no_grad():
        model.moe.router.weight.zero_()
    _zero_outputs(model)
    _train_and_compare(model, _x((2, 5, H)))


def test_hf_zero_down_proj():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, hidden_act="gelu", max_position_embeddings=32)
    torch.manual_seed(6)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.set_experts_implementation("eager")
    _zero_outputs(model)
    assert any(n.endswith("down_proj") for n, _ in model.named_parameters())

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids).logits

    ids = lambda step: torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(step))
    regions = _train_and_compare(Wrap(model), ids)
    assert regions[0].spec.activation == "gelu"


def test_proof_ignores_parameter_values():
    """The same module proven with any values of its weights gives the same reading (proof on random draws)."""
    from moe_compile.recognise.experts import detect_experts_module

    m = LoopExperts(E, H, FF, act="relu", gated=False)
    first = detect_experts_module(m, top_k=K)
    _zero_outputs(m)
    assert first.ok and detect_experts_module(m, top_k=K).spec == first.spec
    assert first.spec.activation == "relu"


@moe_compile.experts
class BufferScaledExperts(nn.Module):
    """An MLP whose output is scaled by a buffer: what the fused op cannot carry, so it must not be fused."""

    def __init__(self):
        super().__init__()
        self.inner = LoopExperts(E, H, FF, act="relu", gated=False)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, hidden, topk_idx, topk_weights):
        return self.inner(hidden, topk_idx, topk_weights) * self.scale


def test_buffer_values_never_decide_the_proof():
    torch.manual_seed(7)
    model = Net(MoELayer(BufferScaledExperts(), H, E, K), H)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    x = torch.randn(2, 5, H)
    compiled(x)
    assert not any(r.fused and r.spec.expert_body == "mlp" for r in moe_compile.backend.last_regions)
    model.moe.experts.scale.fill_(2.0)  # what a later step may do to a buffer
    assert rel_err(compiled(x), model(x)) <= 1e-6


@moe_compile.experts
class DropoutExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = LoopExperts(E, H, FF, act="relu", gated=False)
        self.drop = nn.Dropout(0.5)

    def forward(self, hidden, topk_idx, topk_weights):
        return self.drop(self.inner(hidden, topk_idx, topk_weights))


def test_experts_with_dropout_run_their_own_code():
    torch.manual_seed(8)
    model = Net(MoELayer(DropoutExperts(), H, E, K), H).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    x = torch.randn(2, 5, H)
    assert rel_err(compiled(x), model(x)) <= 1e-6
    model.train()  # eval -> train: dropout must act in the compiled model as it does in eager
    torch.manual_seed(0)
    a = compiled(x)
    torch.manual_seed(0)
    b = model(x)
    assert rel_err(a, b) <= 1e-6
    # the decorated module is not captured (its inner loop may still fuse inline: the dropout is outside it)
    assert count_op_calls(lambda: compiled(x), "moe_compile::experts_call") == 0


def test_subclass_calling_super_forward_is_not_captured_twice():
    class Doubled(DecoratedLoopExperts):
        def forward(self, hidden, topk_idx, topk_weights):
            return super().forward(2 * hidden, topk_idx, topk_weights)

    torch.manual_seed(9)
    model = Net(MoELayer(Doubled(E, H, FF), H, E, K), H)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    x = torch.randn(2, 5, H)
    (o0, g0), (o1, g1) = out_and_grads(model, x), out_and_grads(compiled, x)
    assert rel_err(o1, o0) <= 1e-6 and not grads_equal(g0, g1, 1e-6)
