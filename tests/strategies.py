"""Hypothesis strategies that BUILD MoE models in every style the backend recognises, and the checks the property
tests run on them (test support: tests/test_equivalence.py, tests/test_edge_cases.py).

A drawn :class:`Case` names everything about one example: the style, sizes, activation, biases, routing (softmax,
sigmoid or DeepSeek-style group-limited top-k, renormalised or not), where the score is applied, a shared expert,
how the weights are initialised (random, or degenerate: zero output projection, identical experts, zero router),
the dtype and the token count. ``build(case)`` makes the model; ``check_case(case)`` compiles it with
``backend="moe"`` and checks output and every gradient against eager, then once more after an SGD step.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from hypothesis import strategies as st

import moe_compile
from helpers import rel_err
from models import ACTS, MLP, DecoratedLoopExperts, GroupedExperts, GShardMoE

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


def budget(ci: int, fuzz: int) -> int:
    """Examples for one property test under the active profile (registered in conftest.py)."""
    return fuzz if PROFILE == "fuzz" else ci


STYLES = ("loop", "decorated_list", "decorated_stacked", "sorted", "gshard", "hf_mixtral")
FUSED_ACTS = ("silu", "gelu", "relu", "sigmoid")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
"""fp32: the fused op sums in another order than eager (~1e-7 relative per GEMM; 2e-5 leaves room for the
router's softmax gradient, which subtracts nearly equal terms). bf16: compared against float64 (``assert_equal``),
2e-2 on top of twice eager's own error: a few bf16 roundings (2^-8 = 4e-3 relative each) placed differently."""


# --------------------------------------------------------------------------------------------- model parts
@moe_compile.experts
class StackedExperts(nn.Module):
    """Decorated experts with stacked ``[E, N, H]`` / ``[E, H, F]`` weights (``N = 2F`` when gated: [gate | up])."""

    def __init__(self, E, H, Fd, act="silu", gated=True, bias=False):
        super().__init__()
        n = 2 * Fd if gated else Fd
        self.w_in = nn.Parameter(torch.randn(E, n, H) / H ** 0.5)
        self.w_out = nn.Parameter(torch.randn(E, H, Fd) / Fd ** 0.5)
        self.b_in = nn.Parameter(torch.randn(E, n) * 0.1) if bias else None
        self.b_out = nn.Parameter(torch.randn(E, H) * 0.1) if bias else None
        self.act, self.gated = ACTS[act](), gated

    def forward(self, hidden, topk_idx, topk_weights):
        out = torch.zeros_like(hidden)
        for e in range(self.w_in.shape[0]):
            tok, slot = torch.where(topk_idx == e)
            h = hidden[tok] @ self.w_in[e].t()
            if self.b_in is not None:
                h = h + self.b_in[e]
            if self.gated:
                g, u = h.chunk(2, dim=-1)
                h = self.act(g) * u
            else:
                h = self.act(h)
            y = h @ self.w_out[e].t()
            if self.b_out is not None:
                y = y + self.b_out[e]
            out.index_add_(0, tok, y * topk_weights[tok, slot, None])
        return out


class SortedExperts(GroupedExperts):
    """torchtitan's grouped experts: stacked SwiGLU ``w1/w3 [E, F, H]``, ``w2 [E, H, F]`` over rows sorted by
    expert, a loop over ``split(counts.tolist())`` (``tests/models.py``'s ``GroupedExperts``)."""


class GenMoE(nn.Module):
    """Router -> top-k -> experts of ``case.style`` (+ a shared expert) on ``[B, S, H]`` hidden states."""

    def __init__(self, c: "Case"):
        super().__init__()
        E, H, Fd = c.E, c.H, c.F
        self.c = c
        self.gate = nn.Linear(H, E, bias=False)
        if c.style == "loop":
            self.experts = nn.ModuleList(MLP(H, Fd, c.act, c.gated, c.bias) for _ in range(E))
        elif c.style == "decorated_list":
            self.experts = DecoratedLoopExperts(E, H, Fd, c.act, c.gated, c.bias)
        elif c.style == "decorated_stacked":
            self.experts = StackedExperts(E, H, Fd, c.act, c.gated, c.bias)
        elif c.style == "sorted":
            self.experts = SortedExperts(E, H, Fd)
        elif c.style == "hf_mixtral":
            from parallel_harness import hf_experts

            self.experts = hf_experts("mixtral", E, H, Fd)
            self.experts.config._experts_implementation = "eager"  # as a full model sets it (None: no dispatch)
        else:
            raise ValueError(c.style)
        self.shared = MLP(H, Fd, "silu", True, False) if c.shared else None

    def route(self, x):
        c = self.c
        logits = self.gate(x)
        scores = torch.softmax(logits, dim=-1) if c.score == "softmax" else torch.sigmoid(logits)
        if c.groups > 1:  # DeepSeek's group-limited greedy: keep the best groups' experts, top-k among them
            T = x.shape[0]
            best = scores.view(T, c.groups, c.E // c.groups).max(dim=-1).values  # (-1 fails at T = 0)
            gidx = torch.topk(best, c.topk_group, dim=-1).indices
            gmask = torch.zeros_like(best).scatter_(1, gidx, 1.0)
            smask = gmask.unsqueeze(-1).expand(T, c.groups, c.E // c.groups).reshape(T, c.E)
            scores = scores.masked_fill(~smask.bool(), 0.0)
        w, idx = torch.topk(scores, c.k, dim=-1)
        if c.renorm and c.k > 1:
            w = w / w.sum(-1, keepdim=True)
        return w, idx

    def forward(self, hidden):
        B, S, H = hidden.shape
        x = hidden.reshape(-1, H)
        w, idx = self.route(x)
        style = self.c.style
        if style == "loop":
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                tok, slot = torch.where(idx == e)
                out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        elif style == "sorted":
            counts = torch.histc(idx.view(-1).float(), bins=self.c.E, min=0, max=self.c.E)
            order = torch.argsort(idx.view(-1), stable=True)
            scores = w.reshape(-1)[order]
            xs = x[order // self.c.k]
            if self.c.score_first:
                xs = xs * scores.reshape(-1, 1)
            ys = self.experts(xs, counts)
            if not self.c.score_first:
                ys = ys * scores.reshape(-1, 1)
            unsorted = torch.zeros_like(ys)
            unsorted[order] = ys
            out = unsorted.reshape(-1, self.c.k, H).sum(dim=1)
        else:
            out = self.experts(x, idx, w.to(x.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(B, S, H)


class Net(nn.Module):
    """A dense layer in front (so the router input is not the raw input) and one behind, residual MoE."""

    def __init__(self, moe, H):
        super().__init__()
        self.inp, self.moe, self.out = nn.Linear(H, H), moe, nn.Linear(H, H)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h))


# --------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    style: str
    E: int
    k: int
    H: int = 8
    F: int = 12
    act: str = "silu"
    gated: bool = True
    bias: bool = False
    score: str = "softmax"
    renorm: bool = True
    groups: int = 1  # > 1: group-limited routing over this many groups
    topk_group: int = 1
    score_first: bool = False  # sorted style: the score scales the experts' input
    shared: bool = False
    capacity_factor: float = 1.0  # gshard style
    init: str = "random"  # random | zero_out | identical | zero_router
    dtype: str = "float32"
    tokens: int = 6
    compiler: str = "aot_eager"
    seed: int = 0


@st.composite
def cases(draw, styles=STYLES, max_experts=64, dtypes=("float32", "bfloat16"), compilers=("aot_eager", "eager")):
    style = draw(st.sampled_from(styles))
    E = draw(st.integers(1, 8) | st.integers(1, max_experts))
    if style == "gshard":
        k = draw(st.integers(1, min(2, E)))  # GShard/fairseq gates are top-1 or top-2
    else:
        k = draw(st.integers(1, min(8, E)))
    gated = style in ("sorted", "hf_mixtral") or draw(st.booleans())
    act = "silu" if style in ("sorted", "hf_mixtral") else draw(st.sampled_from(FUSED_ACTS))
    if style == "gshard":
        act = draw(st.sampled_from(("relu", "gelu", "silu")))
    bias = style in ("loop", "decorated_list", "decorated_stacked") and draw(st.booleans())
    groups, topk_group = 1, 1
    if style != "gshard" and E >= 4 and E % 2 == 0 and draw(st.booleans()):
        groups = draw(st.sampled_from([g for g in (2, 4, 8) if E % g == 0 and g < E]))
        topk_group = draw(st.integers(1, groups))
        k = min(k, topk_group * (E // groups))
    tokens = draw(st.sampled_from([0, 1, 2, 3, 5, 7, 9]) | st.integers(0, 40))
    return Case(style=style, E=E, k=k, H=draw(st.sampled_from([4, 8, 12])), F=draw(st.sampled_from([4, 6, 16])),
                act=act, gated=gated, bias=bias, score=draw(st.sampled_from(["softmax", "sigmoid"])),
                renorm=draw(st.booleans()), groups=groups, topk_group=topk_group,
                score_first=style == "sorted" and draw(st.booleans()),
                shared=style != "gshard" and draw(st.booleans()),
                capacity_factor=draw(st.sampled_from([0.25, 0.5, 1.0, 2.0])),
                init=draw(st.sampled_from(["random", "random", "zero_out", "identical", "zero_router"])),
                dtype=draw(st.sampled_from(dtypes)), tokens=tokens, compiler=draw(st.sampled_from(compilers)),
                seed=draw(st.integers(0, 2 ** 16)))


def _degenerate(model: nn.Module, init: str) -> None:
    with torch.no_grad():
        if init == "zero_out":  # every expert's output projection zero: all activations look alike today
            for name, p in model.named_parameters():
                if name.startswith("moe.") and name.endswith(("w2.weight", "w_out", "down_proj", "w2", "2.weight")):
                    p.zero_()
        elif init == "identical":  # every expert a copy of the first
            for m in model.modules():
                if isinstance(m, nn.ModuleList) and len(m) > 1:
                    for e in m[1:]:
                        e.load_state_dict(m[0].state_dict())
            for name, p in model.named_parameters():
                if name.startswith("moe.experts.") and p.dim() >= 2 and "." not in name[len("moe.experts."):]:
                    p.copy_(p[:1].expand_as(p))
        elif init == "zero_router":  # every score equal: top-k decides by its tie rule alone
            for name, p in model.named_parameters():
                if name in ("moe.gate.weight", "moe.wg.weight"):
                    p.zero_()


def build(c: Case) -> nn.Module:
    torch.manual_seed(c.seed)
    if c.style == "gshard":
        moe = GShardMoE(c.E, c.H, c.F, c.k, c.capacity_factor, stacked=c.gated, act=c.act)
    else:
        moe = GenMoE(c)
    model = Net(moe, c.H)
    _degenerate(model, c.init)
    return model.to(getattr(torch, c.dtype))


def inputs(c: Case, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(c.seed * 7 + step)
    return torch.randn(1, c.tokens, c.H, generator=g).to(getattr(torch, c.dtype))


# --------------------------------------------------------------------------------------------- checks
def compile_moe(model: nn.Module, compiler: str = "aot_eager", **kw):
    torch._dynamo.reset()
    return torch.compile(model, backend="moe", options={"compiler": compiler}, **kw)


def run_and_grads(model, x):
    """``model(x)``, backward of ``sum(out * c)`` for a fixed random ``c`` (a sum, so 0 tokens give 0, not a mean's
    NaN); the output and every parameter gradient by (unwrapped) name."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    c = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out.dtype)
    (out * c).sum().backward()
    return out.detach(), {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def _err(got, ref, floor=1e-30) -> float:
    """rel_err, NaN-aware: NaN where the two put NaN / inf in different places, else the error of the rest."""
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.equal(got.isnan(), ref.isnan()) or not torch.equal(got.isinf(), ref.isinf()):
        return float("nan")
    ok = torch.isfinite(ref)
    if not torch.equal(got[~ok].nan_to_num(0.0, 1.0, -1.0), ref[~ok].nan_to_num(0.0, 1.0, -1.0)):  # inf signs
        return float("nan")
    return rel_err(got[ok], ref[ok], floor)


def _errors(ref: dict, got: dict) -> dict:
    """Relative difference per gradient, judged against 1e-3 of the model's largest gradient where one is ~0."""
    finite = [float(g[torch.isfinite(g)].abs().max()) for g in ref.values() if torch.isfinite(g).any()]
    scale = max(finite, default=0.0)
    return {n: _err(got[n], ref[n], max(1e-3 * scale, 1e-30)) for n in ref}


def assert_equal(eager, compiled, x, tol: float, what: str = "", truth=None) -> None:
    """Output and every gradient of ``compiled`` equal ``eager``'s to ``tol`` (NaN and inf in the same places).
    With ``truth`` (a float64 copy of the eager model: the bf16 cases) the compiled model must instead be about as
    close to the float64 result as eager is: error <= 2 x eager's error + ``tol`` (bf16 eager and the fused op round
    at different places, and a small gradient such as the router's, a difference of nearly equal terms, keeps only
    a few bits in both)."""
    (o0, g0), (o1, g1) = run_and_grads(eager, x), run_and_grads(compiled, x)
    assert o1.dtype == o0.dtype and o1.shape == o0.shape, (what, o0.shape, o1.shape)
    # docs/design.md, "What differs from eager": a parameter the eager code never used (an expert no token reaches,
    # under a loop that skips such experts; every expert and the router with no tokens at all) has .grad None in
    # eager and an exact zero from the fused op. Anything else must match name for name.
    only_compiled = set(g1) - set(g0)
    assert set(g0) <= set(g1), (what, "gradients only in eager", set(g0) - set(g1))
    assert all(not g1[n].any() for n in only_compiled), (what, "non-zero gradients eager has not", only_compiled)
    g1 = {n: v for n, v in g1.items() if n in g0}
    if truth is None:
        e1 = _errors(g0, g1)
        e1["out"] = _err(o1, o0)
        bad = {n: e for n, e in e1.items() if not e <= tol}
        assert not bad, (what, "compiled against eager", bad)
        return
    ot, gt = run_and_grads(truth, x.double())
    gt = {n: gt.get(n, torch.zeros_like(g0[n], dtype=torch.float64)) for n in g0}
    e0, e1 = _errors(gt, g0), _errors(gt, g1)
    e0["out"], e1["out"] = _err(o0, ot), _err(o1, ot)
    bad = {n: (e1[n], e0[n]) for n in e1 if not e1[n] <= 2 * e0[n] + tol}
    assert not bad, (what, "(compiled, eager) error against float64", bad)


def fused_count() -> int:
    return sum(r.fused for r in moe_compile.backend.last_regions)


def check_case(c: Case) -> list:
    """Compiled == eager (output, every gradient); then an SGD step on the eager model, its new weights copied
    into the compiled one (the graph is not rebuilt: Dynamo does not guard on weight values), and the two compared
    again on a new input. Returns the regions the backend reported for the model."""
    model = build(c)
    eager = copy.deepcopy(model)
    compiled = compile_moe(model, c.compiler)
    dtype = getattr(torch, c.dtype)
    tol = TOL[dtype]
    truth = (lambda: copy.deepcopy(eager).double()) if dtype != torch.float32 else (lambda: None)
    x = inputs(c)
    assert_equal(eager, compiled, x, tol, "before the step", truth())
    regions = list(moe_compile.backend.last_regions)
    opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt.step()
    with torch.no_grad():
        model.load_state_dict(eager.state_dict())
    assert_equal(eager, compiled, inputs(c, 1), tol, "after the step", truth())
    return regions


def expected_fused(c: Case) -> bool:
    """Whether the backend is documented to fuse this case (README, 'What it finds')."""
    return c.tokens > 0 or c.style != "gshard"


@st.composite
def op_cases(draw, dtype=torch.float64):
    """An op-level case: a MoESpec and random inputs for ``moe_compile::experts``: (spec, x, idx, w, up, down,
    b_up, b_down), weights stacked ``[E, ., .]`` in the spec's layout."""
    from moe_compile.spec import MoESpec

    E = draw(st.integers(1, 64))
    k = draw(st.integers(1, min(8, E)))
    H, Fd = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    act = draw(st.sampled_from(["silu", "gelu", "gelu_tanh", "relu", "sigmoid", "identity", "swiglu_oai"]))
    layout = "interleaved" if act == "swiglu_oai" else draw(st.sampled_from(["none", "concat", "interleaved"]))
    bias = draw(st.booleans())
    wl = draw(st.sampled_from(["out_in", "in_out"]))
    extra = dict(act_alpha=1.702, act_limit=draw(st.sampled_from([0.5, 7.0]))) if act == "swiglu_oai" else {}
    spec = MoESpec(num_experts=E, top_k=k, hidden=H, ffn=Fd, activation=act, gate_layout=layout,
                   weight_layout=wl, stacked=True, has_bias=bias,
                   score_on_input=draw(st.booleans()) and act != "swiglu_oai", **extra)
    T = draw(st.sampled_from([0, 1, 2, 3, 5]) | st.integers(0, 64))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    N = 2 * Fd if layout != "none" else Fd
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = rnd(T, H) * math.exp(draw(st.floats(-2.5, 2.5)))
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    how = draw(st.sampled_from(["random", "one_expert", "drop_some", "all_dropped"]))
    if how == "one_expert" and T:
        idx[:, 0] = draw(st.integers(0, E - 1))
        idx = torch.stack([torch.cat([r[:1], r[1:][r[1:] != r[0]], r.new_full((1,), E)])[:k] for r in idx])
    elif how == "drop_some" and T:
        idx = torch.where(torch.rand(T, k, generator=g) < 0.3, torch.full_like(idx, E), idx)
    elif how == "all_dropped":
        idx = torch.full_like(idx, E)
    w = torch.rand(T, k, generator=g, dtype=dtype)
    shape_in = (E, N, H) if wl == "out_in" else (E, H, N)
    shape_out = (E, H, Fd) if wl == "out_in" else (E, Fd, H)
    up, down = rnd(*shape_in) / max(H, 1) ** 0.5, rnd(*shape_out) / max(Fd, 1) ** 0.5
    b_up, b_down = ([rnd(E, N) * 0.1], [rnd(E, H) * 0.1]) if bias else ([], [])
    return spec, x, idx, w, [up], [down], b_up, b_down
