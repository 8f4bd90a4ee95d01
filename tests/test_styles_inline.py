"""Common ways of writing an MoE block by hand, traced inline (no decorator): each is found, proven on random
weights and fused; outputs and every parameter gradient equal eager's, before and after one SGD step."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_compile
from helpers import count_op_calls, grads_equal, out_and_grads, rel_err
from models import GroupedExperts

TOL = 2e-6


# --------------------------------------------------------------------------------------------- torchtitan style
class TopKRouter(nn.Module):
    """Scores (softmax or sigmoid) -> top-k; an optional expert bias shifts which experts are chosen, not the
    weights; counts per expert with ``torch.histc``."""

    def __init__(self, H, E, k, score="softmax", expert_bias=False):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.E, self.k, self.score = E, k, score
        self.register_buffer("expert_bias", torch.linspace(-0.6, 0.6, E) if expert_bias else None)

    def forward(self, x):
        logits = self.gate(x).float()
        scores = torch.sigmoid(logits) if self.score == "sigmoid" else F.softmax(logits, dim=1)
        if self.expert_bias is not None:
            _, idx = torch.topk(scores + self.expert_bias, k=self.k, dim=1)
            top = scores.gather(dim=1, index=idx)
        else:
            top, idx = torch.topk(scores, k=self.k, dim=1)
        counts = torch.histc(idx.view(-1).float(), bins=self.E, min=0, max=self.E)
        return top, idx, counts


class TitanMoE(nn.Module):
    """Router, tokens sorted by expert (argsort), grouped experts, un-sorted (scatter back), summed over k, plus a
    shared dense expert; the score scales the experts' output, or their input (``score_first``)."""

    def __init__(self, E, H, Fd, k, score="softmax", expert_bias=False, score_first=False, shared=True,
                 track_counts=False):
        super().__init__()
        self.router = TopKRouter(H, E, k, score, expert_bias)
        self.experts = GroupedExperts(E, H, Fd)
        self.shared = nn.Sequential(nn.Linear(H, Fd), nn.SiLU(), nn.Linear(Fd, H)) if shared else None
        self.k, self.score_first = k, score_first
        # torchtitan counts the tokens each expert got (for its load-balancing bias update): a side effect
        self.register_buffer("tokens_per_expert", torch.zeros(E) if track_counts else None)

    def forward(self, x):
        B, S, H = x.shape
        x = x.view(-1, H)
        top, idx, counts = self.router(x)
        if self.tokens_per_expert is not None:
            with torch.no_grad():
                self.tokens_per_expert.add_(counts)
        order = torch.argsort(idx.view(-1), stable=True)
        scores = top.view(-1)[order]
        xs = x[order // self.k]
        if self.score_first:
            xs = (xs.float() * scores.reshape(-1, 1)).to(x.dtype)
        ys = self.experts(xs, counts)
        if not self.score_first:
            ys = (ys.float() * scores.reshape(-1, 1)).to(x.dtype)
        unsorted = torch.zeros_like(ys)
        unsorted[order] = ys
        out = unsorted.reshape(-1, self.k, H).sum(dim=1)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(B, S, H)


# --------------------------------------------------------------------------------------------- hand-written
class FlatGatherExperts(nn.Module):
    """Per (token, choice) rows: the expert weights gathered by id, applied with einsum (GELU MLP with biases)."""

    def __init__(self, E, H, Fd):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, Fd, H) / H**0.5)
        self.b1 = nn.Parameter(torch.randn(E, Fd) * 0.1)
        self.w2 = nn.Parameter(torch.randn(E, H, Fd) / Fd**0.5)

    def forward(self, x, ids):
        h = F.gelu(torch.einsum("nh,nfh->nf", x, self.w1[ids]) + self.b1[ids])
        return torch.einsum("nf,nhf->nh", h, self.w2[ids])


class GatherSumMoE(nn.Module):
    """Rows repeated k times, experts gathered per row, weighted sum over k in the parent:
    ``(y * w).view(T, k, H).sum(1)`` or ``(y.view(T, k, H) * w[..., None]).sum(1)``."""

    def __init__(self, E, H, Fd, k, weight_after_view=False):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = FlatGatherExperts(E, H, Fd)
        self.k, self.after = k, weight_after_view

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T, H = x.shape
        w, idx = torch.topk(self.router(x).softmax(-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = self.experts(x.repeat_interleave(self.k, dim=0), idx.reshape(-1))
        if self.after:
            out = (y.view(T, self.k, H) * w[..., None]).sum(1)
        else:
            out = (y * w.reshape(-1, 1)).view(T, self.k, H).sum(1)
        return out.reshape(shape)


class Expert(nn.Module):
    def __init__(self, H, Fd):
        super().__init__()
        self.gate_proj = nn.Linear(H, Fd, bias=False)
        self.up_proj = nn.Linear(H, Fd, bias=False)
        self.down_proj = nn.Linear(Fd, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SortSplitMoE(nn.Module):
    """``torch.sort`` of the flat expert ids, ``split`` by counts over an ``nn.ModuleList``, rows put back in
    order by the inverse permutation, weighted sum over k."""

    def __init__(self, E, H, Fd, k):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(Expert(H, Fd) for _ in range(E))
        self.E, self.k = E, k

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T, H = x.shape
        w, idx = torch.topk(torch.sigmoid(self.gate(x)), self.k, dim=-1)
        flat = idx.reshape(-1)
        _, order = torch.sort(flat, stable=True)
        counts = (flat[:, None] == torch.arange(self.E, device=x.device)).sum(0)
        chunks = x[order // self.k].split(counts.tolist())
        ys = torch.cat([expert(c) for expert, c in zip(self.experts, chunks)])
        y = ys[torch.argsort(order)]
        return (y.view(T, self.k, H) * w[..., None]).sum(1).reshape(shape)


class Net(nn.Module):
    def __init__(self, hidden, *blocks):
        super().__init__()
        self.inp = nn.Linear(hidden, hidden)
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


# --------------------------------------------------------------------------------------------- checks
def _sgd(model, lr=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def _equal(eager, compiled, x):
    (o0, g0), (o1, g1) = out_and_grads(eager, x), out_and_grads(compiled, x)
    assert rel_err(o1, o0) <= TOL, rel_err(o1, o0)
    assert set(g0) == set(g1), set(g0) ^ set(g1)
    bad = grads_equal(g0, g1, TOL)
    assert not bad, bad


def check_fused(model, xs, blocks=1, compiler="aot_eager"):
    """Compiled == eager (output, every gradient) on each input, again after one SGD step on both copies; each
    block reported fused and running the fused op."""
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": compiler})
    for x in xs:
        _equal(eager, compiled, x)
        regions = list(moe_compile.backend.last_regions)
        assert len(regions) == blocks and all(r.fused for r in regions), regions
        assert count_op_calls(lambda: compiled(x)) >= blocks
        _sgd(eager), _sgd(model)
        _equal(eager, compiled, x)
    return regions


X = [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)),
     torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(2))]


@pytest.mark.parametrize("score,expert_bias,shared", [("softmax", False, True), ("sigmoid", True, True),
                                                      ("sigmoid", False, False)])
def test_titan_score_after(score, expert_bias, shared):
    torch.manual_seed(0)
    regions = check_fused(Net(8, TitanMoE(4, 8, 12, 2, score, expert_bias, shared=shared)), X)
    spec = regions[0].spec
    assert regions[0].module_path == "blocks.0" and not spec.score_on_input
    assert (spec.num_experts, spec.top_k, spec.activation, spec.gate_layout) == (4, 2, "silu", "separate")
    assert spec.router.score == score


def test_titan_with_token_counts_buffer():
    """torchtitan's ``tokens_per_expert.add_(counts)`` stays in the graph beside the fused experts."""
    torch.manual_seed(0)
    model = Net(8, TitanMoE(4, 8, 12, 2, "sigmoid", expert_bias=True, track_counts=True))
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    for x in X:
        _equal(eager, compiled, x)  # one forward and backward of each copy
        assert [r.fused for r in moe_compile.backend.last_regions] == [True], moe_compile.backend.last_regions
        assert torch.equal(model.blocks[0].tokens_per_expert, eager.blocks[0].tokens_per_expert)
    assert float(eager.blocks[0].tokens_per_expert.sum()) == 2 * (10 + 12)  # k choices of every token


def test_titan_score_before_experts():
    """The score scales the expert INPUT: for a SwiGLU expert a different function from scaling the output, fused
    with ``score_on_input``."""
    torch.manual_seed(0)
    regions = check_fused(Net(8, TitanMoE(4, 8, 12, 2, "sigmoid", expert_bias=True, score_first=True)), X)
    assert regions[0].spec.score_on_input and "score on the expert input" in regions[0].pattern


def test_two_titan_blocks_each_fused():
    torch.manual_seed(0)
    model = Net(8, TitanMoE(4, 8, 12, 2), TitanMoE(6, 8, 4, 3, "sigmoid", score_first=True))
    regions = check_fused(model, X[:1], blocks=2)
    assert [r.module_path for r in regions] == ["blocks.0", "blocks.1"]


@pytest.mark.parametrize("after", [False, True])
def test_gather_einsum_view_sum(after):
    torch.manual_seed(0)
    regions = check_fused(Net(8, GatherSumMoE(4, 8, 12, 2, weight_after_view=after)), X)
    spec = regions[0].spec
    assert (spec.activation, spec.gate_layout, spec.has_bias) == ("gelu", "none", True)


def test_sort_split_module_list():
    torch.manual_seed(0)
    regions = check_fused(Net(8, SortSplitMoE(4, 8, 12, 2)), X)
    assert regions[0].spec.router.score == "sigmoid" and not regions[0].spec.stacked


class GroupedMMExperts(GroupedExperts):
    """The same experts through ``torch._grouped_mm`` with offsets (its fake kernel wants bf16 on this build: fp32
    does not trace, under any backend)."""

    def forward(self, x, counts):
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(x, self.w1.transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(x, self.w3.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offs)


def test_titan_grouped_mm_bf16():
    torch.manual_seed(0)
    moe = TitanMoE(4, 8, 16, 2, "sigmoid", expert_bias=True)
    moe.experts = GroupedMMExperts(4, 8, 16)
    model = Net(8, moe).to(torch.bfloat16)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    x = X[0].to(torch.bfloat16)
    (o0, g0), (o1, g1) = out_and_grads(eager, x), out_and_grads(compiled, x)
    regions = moe_compile.backend.last_regions
    assert [r.fused for r in regions] == [True], regions
    assert count_op_calls(lambda: compiled(x)) >= 1
    # bf16: the fused op rounds differently from eager's bf16 GEMMs
    assert rel_err(o1, o0) <= 2e-2 and not grads_equal(g0, g1, 3e-2)


class TanhGroupedExperts(GroupedExperts):
    def forward(self, x, counts):
        return torch.tanh(super().forward(x, counts))


def test_unfusable_block_stays_eager_and_is_explained():
    torch.manual_seed(0)
    moe = TitanMoE(4, 8, 12, 2)
    moe.experts = TanhGroupedExperts(4, 8, 12)
    model = Net(8, moe)
    report = moe_compile.explain(model, X[0])
    assert [(r.module_path, r.fused) for r in report.regions] == [("blocks.0", False)], str(report)
    assert "no fused form equals" in report.regions[0].reason
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    _equal(eager, compiled, X[0])
    assert count_op_calls(lambda: compiled(X[0])) == 0


@pytest.mark.slow
def test_titan_inductor():
    torch.manual_seed(0)
    check_fused(Net(8, TitanMoE(4, 8, 12, 2, "sigmoid", expert_bias=True, score_first=True)), X[:1],
                compiler="inductor")


@pytest.mark.parametrize("make", [
    lambda: Net(8, TitanMoE(4, 8, 12, 2, "sigmoid", expert_bias=True, track_counts=True),
                TitanMoE(6, 8, 4, 3, score_first=True)),
    lambda: Net(8, GatherSumMoE(4, 8, 12, 2)),
    lambda: Net(8, SortSplitMoE(4, 8, 12, 2)),
], ids=["titan", "gather_sum", "sort_split"])
def test_explain_lists_each_block_once_fused(make):
    torch.manual_seed(0)
    model = make()
    report = moe_compile.explain(model, X[0])
    assert [(r.module_path, r.fused) for r in report.regions] == [
        (f"blocks.{i}", True) for i in range(len(model.blocks))], str(report)
    assert report.graph_breaks == 0, str(report)
