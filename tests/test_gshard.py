"""GShard/fairseq one-hot dispatch and combine with capacity: found between the einsums, proven, fused."""
import pytest
import torch

import moe_compile
from helpers import out_and_grads as _step, grads_equal, rel_err
from models import GShardMoE, Net
from moe_compile.ops import experts_slots, slots_to_topk
from moe_compile.passes.gshard import topk_to_slots
from moe_compile.spec import MoESpec




@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("capacity_factor", [0.5, 2.0])
def test_gshard_layer_fused_and_equal(k, stacked, capacity_factor):
    torch.manual_seed(k + 2 * stacked)
    model = Net(GShardMoE(4, 8, 12, k, capacity_factor, stacked), 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    for shape in [(2, 6, 8), (3, 5, 8), (1, 11, 8)]:  # new sizes: dynamic shapes after the first
        x = torch.randn(*shape)
        (o0, g0), (o1, g1) = _step(model, x), _step(compiled, x)
        assert rel_err(o1, o0) <= 1e-5
        assert not grads_equal(g0, g1, 1e-5)
        regions = moe_compile.backend.last_regions
        assert len(regions) == 1 and regions[0].fused and regions[0].spec.dispatch == "slots", regions
    assert g1["moe.wg.weight"].abs().sum() > 0  # the router's gradient flows through the fused combine weights


def test_slots_round_trip_and_dense_fallback_is_exact():
    torch.manual_seed(0)
    S, E, C, H, F = 9, 3, 4, 6, 5
    idx = torch.rand(S, E).argsort(-1)[:, :2]
    w = torch.rand(S, 2, dtype=torch.float64)
    dispatch, combine = topk_to_slots(idx, w, E, C)
    ok, idx2, w2 = slots_to_topk(dispatch, combine)
    assert ok
    for t in range(S):  # every kept choice is there with its weight
        kept = {int(e): float(v) for e, v in zip(idx2[t], w2[t]) if e < E}
        placed = {int(e): float(combine[t, e].sum()) for e in range(E) if dispatch[t, e].any()}
        assert kept == placed
    spec = MoESpec(num_experts=E, top_k=E, hidden=H, ffn=F, activation="gelu", gate_layout="none", has_bias=True)
    up = [torch.randn(E, F, H, dtype=torch.float64, requires_grad=True)]
    down = [torch.randn(E, H, F, dtype=torch.float64, requires_grad=True)]
    bu = [torch.randn(E, F, dtype=torch.float64, requires_grad=True)]
    bd = [torch.randn(E, H, dtype=torch.float64, requires_grad=True)]
    x = torch.randn(S, H, dtype=torch.float64, requires_grad=True)

    def dense(d, c):
        h = torch.bmm(torch.einsum("sec,sm->ecm", d, x), up[0].transpose(1, 2)) + bu[0][:, None]
        y = torch.bmm(torch.nn.functional.gelu(h), down[0].transpose(1, 2)) + bd[0][:, None]
        return torch.einsum("sec,ecm->sm", c, y)

    for d in (dispatch, dispatch.clone().index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(3)),
                                                   torch.tensor(1.0, dtype=torch.float64))):
        c = (combine + 0).requires_grad_()
        out = experts_slots(x, d, c, [], up, down, [], bu, bd, spec.to_json())[0]
        ref = dense(d, c)
        g = torch.randn_like(out)
        ins = [x, c, *up, *down, *bu, *bd]
        got, want = torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g)
        assert rel_err(out, ref) <= 1e-12 and all(rel_err(a, b) <= 1e-12 for a, b in zip(got, want))
