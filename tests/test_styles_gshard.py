"""fairseq/GShard-style MoE layers written the common ways: each block fused, forward, aux loss and every gradient
equal to eager, before and after an SGD step; blocks that cannot be fused stay eager and are explained."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_compile
from helpers import count_op_calls, grads_equal, rel_err

E, H, FFN = 4, 8, 12
TOL = 1e-5


# --------------------------------------------------------------------------------------------- gates
def _queue_positions(mask):
    """Position of each token in its expert's queue (tokens in order)."""
    return torch.cumsum(mask, dim=0) - 1


class Top1Gate(nn.Module):
    """Top-1 gate holding the router; capacity = cf * ceil(S / E); returns (l_aux, combine, dispatch, metadata)."""

    def __init__(self, dim, num_experts, capacity_factor=1.0, select="argmax"):
        super().__init__()
        self.wg = nn.Linear(dim, num_experts, bias=False)
        self.capacity_factor, self.select = capacity_factor, select

    def forward(self, x):
        gates = F.softmax(self.wg(x), dim=1)
        S, n = gates.shape
        capacity = max(1, int(self.capacity_factor * math.ceil(S / n)))
        top = torch.argmax(gates, dim=1) if self.select == "argmax" else torch.topk(gates, 1, dim=1).indices[:, 0]
        mask = F.one_hot(top, num_classes=n)
        l_aux = torch.mean(gates.mean(0) * mask.to(gates.dtype).mean(0)) * n * n
        pos = _queue_positions(mask)
        mask = mask * torch.lt(pos, capacity)
        slot = torch.sum(pos * mask, dim=1)
        gate_s = (gates * mask).sum(dim=1)
        gate_se = gate_s.unsqueeze(-1) * mask.to(gate_s.dtype)
        slot_sc = F.one_hot(slot, num_classes=capacity).to(gates.dtype)
        combine = torch.bmm(gate_se.unsqueeze(-1), slot_sc.unsqueeze(1))  # [S, E, C]
        metadata = {"entropy": -(gates * torch.log(gates + 1e-9)).sum(-1).mean(),
                    "unused_experts": (mask.sum(0) == 0).float().mean()}
        return l_aux, combine, combine.bool(), metadata


class Top2Gate(nn.Module):
    """Top-2 gate: second choice by argmax over the logits without the first (or one topk), normalised weights,
    capacity = 2 * cf * ceil(S / E), second choices queue after all first choices."""

    def __init__(self, dim, num_experts, capacity_factor=1.0, select="argmax"):
        super().__init__()
        self.wg = nn.Linear(dim, num_experts, bias=False)
        self.capacity_factor, self.select = capacity_factor, select

    def forward(self, x):
        logits = self.wg(x)
        gates = F.softmax(logits, dim=1)
        S, n = gates.shape
        capacity = max(1, int(2 * self.capacity_factor * math.ceil(S / n)))
        if self.select == "argmax":
            i1 = torch.argmax(gates, dim=1)
            i2 = torch.argmax(logits.masked_fill(F.one_hot(i1, n).bool(), float("-inf")), dim=1)
        else:
            top = torch.topk(logits, 2, dim=1).indices
            i1, i2 = top[:, 0], top[:, 1]
        m1, m2 = F.one_hot(i1, n), F.one_hot(i2, n)
        p1 = _queue_positions(m1)
        p2 = _queue_positions(m2) + torch.sum(m1, dim=0, keepdim=True)
        l_aux = (gates.mean(0) * m1.to(gates.dtype).mean(0)).mean() * n * n
        m1, m2 = m1 * (p1 < capacity), m2 * (p2 < capacity)
        g1, g2 = (gates * m1).sum(1), (gates * m2).sum(1)
        denom = torch.clamp(g1 + g2, min=torch.finfo(gates.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
        s1, s2 = (p1 * m1).sum(1), (p2 * m2).sum(1)
        combine = ((g1[:, None] * m1)[:, :, None] * F.one_hot(s1, capacity)[:, None, :]
                   + (g2[:, None] * m2)[:, :, None] * F.one_hot(s2, capacity)[:, None, :])
        metadata = {"overflow": 1 - (m1.sum() + m2.sum()) / (2 * S)}
        return l_aux, combine, combine.bool(), metadata


# --------------------------------------------------------------------------------------------- experts
class FeedForward(nn.Module):
    def __init__(self, dim, ffn, act=F.gelu):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, ffn), nn.Linear(ffn, dim), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NormedFeedForward(FeedForward):
    """An expert with a LayerNorm inside: not an MLP the fused op computes."""

    def __init__(self, dim, ffn):
        super().__init__(dim, ffn)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return super().forward(self.norm(x))


class BmmExperts(nn.Module):
    """Stacked expert weights applied to [E, C, H] with torch.bmm; biases [E, F] or, broadcast as stored, [E, 1, F]."""

    def __init__(self, num_experts, dim, ffn, row_bias=False):
        super().__init__()
        shape = (lambda n: (num_experts, 1, n)) if row_bias else (lambda n: (num_experts, n))
        self.row_bias = row_bias
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, ffn) / dim ** 0.5)
        self.b1 = nn.Parameter(torch.randn(*shape(ffn)) * 0.1)
        self.w2 = nn.Parameter(torch.randn(num_experts, ffn, dim) / ffn ** 0.5)
        self.b2 = nn.Parameter(torch.randn(*shape(dim)) * 0.1)

    def forward(self, d):
        if self.row_bias:
            return torch.baddbmm(self.b2, F.relu(torch.baddbmm(self.b1, d, self.w1)), self.w2)
        h = F.relu(torch.bmm(d, self.w1) + self.b1.unsqueeze(1))
        return torch.bmm(h, self.w2) + self.b2[:, None, :]


# --------------------------------------------------------------------------------------------- layer and model
class MOELayer(nn.Module):
    """gate -> dispatch (einsum or matmul on the flattened mask) -> experts -> combine; returns (out, l_aux)."""

    def __init__(self, gate, experts, product="einsum", chunks="plain"):
        super().__init__()
        self.gate, self.experts, self.product, self.chunks = gate, experts, product, chunks

    def run_experts(self, d):
        if not isinstance(self.experts, nn.ModuleList):
            return self.experts(d)
        n, C = len(self.experts), d.shape[1]
        if self.chunks == "plain":
            return torch.cat([e(c) for e, c in zip(self.experts, d.chunk(n, dim=0))], dim=0)
        # as with an all-to-all over one rank: [world, local experts, C, H], one chunk per local expert
        grouped = d.reshape(1, n, -1, d.shape[-1]).chunk(n, dim=1)
        return torch.cat([e(c) for e, c in zip(self.experts, grouped)], dim=1).reshape(n, C, -1)

    def forward(self, x):
        shape = x.shape
        xs = x.reshape(-1, shape[-1])
        l_aux, combine, dispatch_mask, metadata = self.gate(xs)
        self.metadata = {k: v.detach() for k, v in metadata.items()}  # kept for logging
        S, n, C = combine.shape
        if self.product == "einsum":
            d = torch.einsum("sec,sm->ecm", dispatch_mask.to(xs.dtype), xs)
        else:
            d = (dispatch_mask.to(xs.dtype).reshape(S, n * C).t() @ xs).reshape(n, C, xs.shape[1])
        y = self.run_experts(d)
        if self.product == "einsum":
            out = torch.einsum("sec,ecm->sm", combine, y)
        else:
            out = torch.mm(combine.reshape(S, n * C), y.reshape(n * C, -1))
        return out.reshape(shape), l_aux


class Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.norm, self.moe = nn.LayerNorm(H), moe

    def forward(self, x):
        y, l_aux = self.moe(self.norm(x))
        return x + y, l_aux


class Model(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        h, aux = self.inp(x), 0
        for b in self.blocks:
            h, l_aux = b(h)
            aux = aux + l_aux
        return h, aux


def block(gate="top2", select="argmax", product="einsum", experts="list", cf=1.0, chunks="plain", act=F.gelu):
    g = (Top1Gate if gate == "top1" else Top2Gate)(H, E, cf, select)
    if experts == "list":
        ex = nn.ModuleList(FeedForward(H, FFN, act) for _ in range(E))
    elif experts == "normed":
        ex = nn.ModuleList(NormedFeedForward(H, FFN) for _ in range(E))
    else:
        ex = BmmExperts(E, H, FFN, row_bias=experts == "bmm_rowbias")
    return Block(MOELayer(g, ex, product, chunks))


# --------------------------------------------------------------------------------------------- checks
def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out, aux = model(x)
    (out.pow(2).mean() + 0.1 * aux).backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), aux.detach(), grads


def assert_equal(ref, got, x):
    (o0, a0, g0), (o1, a1, g1) = loss_and_grads(ref, x), loss_and_grads(got, x)
    assert rel_err(o1, o0) <= TOL and rel_err(a1, a0) <= TOL, (rel_err(o1, o0), rel_err(a1, a0))
    assert set(g0) == set(g1) == {n for n, _ in ref.named_parameters()}, set(g0) ^ set(g1)
    bad = grads_equal(g0, g1, TOL)
    assert not bad, bad
    return g0, g1


@torch.no_grad()
def tokens_dropped(model, x):
    """How many (token, choice) pairs the gates dropped for capacity, over all blocks (eager)."""
    dropped, h = 0, model.inp(x)
    for b in model.blocks:
        xs = b.norm(h).reshape(-1, H)
        _, combine, dispatch, _ = b.moe.gate(xs)
        k = 1 if isinstance(b.moe.gate, Top1Gate) else 2
        dropped += k * xs.shape[0] - int(dispatch.sum())
        h, _ = b(h)
    return dropped


def check(model, xs, fused_paths, unfused_paths=(), steps=1, compiler="aot_eager"):
    """Compile once; equal to eager on every x (first sizes static, later ones dynamic), each expected block fused
    and running the fused op, then again after ``steps`` identical SGD steps on both copies."""
    torch._dynamo.reset()
    got = copy.deepcopy(model)
    compiled = torch.compile(got, backend="moe", options={"compiler": compiler})
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (model, got)]
    for step in range(steps + 1):
        for x in xs:
            g0, g1 = assert_equal(model, compiled, x)
            regions = moe_compile.backend.last_regions
            fused = {r.module_path for r in regions if r.fused}
            assert fused == set(fused_paths), regions
            for p in unfused_paths:
                assert any(r.module_path == p and not r.fused and r.reason for r in regions), (p, regions)
            assert count_op_calls(lambda: compiled(x)) >= len(fused_paths)  # the fused op runs, once per block
        if step < steps:
            for m, opt, g in ((model, opts[0], g0), (got, opts[1], g1)):
                for n, p in m.named_parameters():
                    p.grad = g[n].clone()
                opt.step()
    return compiled


X1, X2 = (2, 6, H), (3, 5, H)


@pytest.mark.parametrize("gate,select,product,experts,chunks", [
    ("top1", "argmax", "einsum", "list", "plain"),
    ("top1", "topk", "matmul", "bmm", "plain"),
    ("top2", "argmax", "matmul", "list", "fairseq"),
    ("top2", "topk", "einsum", "bmm_rowbias", "plain"),
    ("top2", "topk", "matmul", "list", "plain"),
])
def test_gate_module_styles_fused_and_equal(gate, select, product, experts, chunks):
    torch.manual_seed(1)
    model = Model([block(gate, select, product, experts, cf=1.0, chunks=chunks)])
    xs = [torch.randn(*X1)]
    assert tokens_dropped(model, xs[0]) > 0  # capacity really drops tokens here
    compiled = check(model, xs, ["blocks.0.moe"], steps=1)
    spec = next(r.spec for r in moe_compile.backend.last_regions if r.fused)
    assert spec.dispatch == "slots" and spec.num_experts == E
    assert compiled.blocks[0].moe.gate.wg.weight.grad.abs().sum() > 0  # router grad through combine and l_aux


def test_stacked_blocks_all_fused_dynamic_sizes():
    """Two identical einsum layers (only the last was fused before) and a matmul one; new sizes recompile dynamic."""
    torch.manual_seed(2)
    model = Model([block("top2", "argmax", "einsum", "list", cf=0.5), block("top2", "argmax", "einsum", "list"),
                   block("top1", "argmax", "matmul", "list", chunks="fairseq")])
    xs = [torch.randn(*X1), torch.randn(*X2)]
    assert tokens_dropped(model, xs[0]) > 0
    check(model, xs, ["blocks.0.moe", "blocks.1.moe", "blocks.2.moe"], steps=1)


def test_unfusable_blocks_stay_eager_and_are_explained():
    torch.manual_seed(4)
    model = Model([block("top1", "topk", "einsum", "bmm"), block("top2", "argmax", "einsum", "list", act=torch.tanh),
                   block("top1", "argmax", "matmul", "normed"), block("top2", "topk", "einsum", "list")])
    x = torch.randn(*X1)
    report = moe_compile.explain(model, x)
    by_path = {}
    for r in report.regions:
        by_path.setdefault(r.module_path, []).append(r)
    assert [r.fused for r in by_path["blocks.0.moe"]] == [r.fused for r in by_path["blocks.3.moe"]] == [True]
    assert "no fused form equals" in " ".join(r.reason for r in by_path["blocks.1.moe"] if not r.fused)
    assert not any(r.fused for r in by_path["blocks.1.moe"] + by_path["blocks.2.moe"])
    assert "neither stacked" in " ".join(r.reason for r in by_path["blocks.2.moe"])
    assert set(by_path) == {f"blocks.{i}.moe" for i in range(4)}, report  # nothing else reported (e.g. the gates)
    check(model, [x], ["blocks.0.moe", "blocks.3.moe"], unfused_paths=["blocks.1.moe", "blocks.2.moe"], steps=1)


class ScaledMOELayer(MOELayer):
    """Expert outputs scaled by a buffer between dispatch and combine: the region reads a tensor of its own."""

    def __init__(self, gate, experts):
        super().__init__(gate, experts)
        self.register_buffer("scale", torch.rand(E, 1, H) + 0.5)

    def run_experts(self, d):
        return super().run_experts(d) * self.scale


def test_region_reading_other_tensors_is_not_fused():
    torch.manual_seed(5)
    experts = nn.ModuleList(FeedForward(H, FFN) for _ in range(E))
    model = Model([Block(ScaledMOELayer(Top2Gate(H, E), experts))])
    check(model, [torch.randn(*X1)], [], unfused_paths=["blocks.0.moe"], steps=0)
    reason = next(r.reason for r in moe_compile.backend.last_regions if r.module_path == "blocks.0.moe")
    assert "read more than" in reason and "scale" in reason, reason


@pytest.mark.slow
def test_two_blocks_inductor():
    torch.manual_seed(6)
    model = Model([block("top2", "topk", "matmul", "bmm"), block("top1", "argmax", "einsum", "list")])
    check(model, [torch.randn(*X1)], ["blocks.0.moe", "blocks.1.moe"], steps=1, compiler="inductor")
