"""Detect what an experts module computes, by structure, and prove it numerically.

``detect_experts_module(module)`` looks at the module's parameters (never at its class name):
- stacked experts: 3D parameters ``[E, ...]`` (HF transformers, GPT-OSS, torchtitan-style), 2D biases ``[E, ...]``;
- an ``nn.ModuleList`` of E identical expert MLPs made of 2 or 3 ``nn.Linear`` (hand-written MoE layers).
From the shapes it enumerates the few ways the weights can be read (which projection is first, storage layout,
gate/up layout, activation), orders them by the hints the module gives (``act_fn``, ``is_transposed``,
``is_concatenated``...), and keeps the first candidate whose fused computation equals the module's own forward in
float64 on random routing (tokens of very different scales, so clamps and activations are exercised; one expert
left without tokens). A module for which no candidate is exact is left alone, with the reason.

The proof never reads the parameters' values: it runs both sides on several independent draws of RANDOM parameters
of the same shapes (``random_parameters``), so a reading that only holds for today's weights (a zero-initialised
output projection makes every activation look alike; identical experts hide a permuted reading) cannot pass, and
what it proves stays true however training moves the weights.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch

from .. import activations, capture
from ..compat import dynamo
from ..kernels import aten
from ..kernels.common import canonical_weights, make_plan
from ..spec import MoESpec, RouterSpec
from ..user_experts import find_expert_list, run_user_experts

SLOTS = ("gate", "up", "down", "b_gate", "b_up", "b_down")
_MAX_CANDIDATES = 96
_TOL = 1e-9
PARAM_DRAWS = 3
"""Independent random parameter draws every reading is proven on (each with two random routings)."""


@dataclass
class ExpertsMatch:
    """A recognised experts module: the spec and, per op slot, the names of the parameters that fill it."""

    spec: MoESpec | None
    slots: dict[str, list[str]] = field(default_factory=dict)
    reason: str = ""
    pattern: str = ""

    @property
    def ok(self) -> bool:
        return self.spec is not None


# --------------------------------------------------------------------------------------------- candidates
def _act_order(module) -> list[str]:
    hint = type(getattr(module, "act_fn", None) or getattr(module, "act", None) or object()).__name__.lower()
    return activations.reading_order(hint)


def swiglu_params(module):
    """GPT-OSS's clamped SwiGLU ``(alpha, limit)`` when ``module`` states them, else None."""
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
        return float(alpha), float(limit)
    return None


@dataclass
class Candidate:
    spec_kw: dict
    slots: dict[str, list[str]]


def stacked_candidates(module, params: dict[str, torch.Tensor]):
    w3 = [n for n, p in params.items() if p.dim() == 3]
    b2 = [n for n, p in params.items() if p.dim() == 2]
    other = [n for n, p in params.items() if p.dim() not in (2, 3)]
    if other or len(w3) not in (2, 3) or len(b2) > len(w3):
        return None, f"parameters are not 2-3 stacked [E, ., .] weights with optional [E, .] biases: {list(params)}"
    E = params[w3[0]].shape[0]
    if any(params[n].shape[0] != E for n in w3 + b2):
        return None, "stacked parameters disagree on the number of experts"
    hint_layouts = ["in_out", "out_in"] if getattr(module, "is_transposed", False) else ["out_in", "in_out"]
    hint_gates = ["concat", "interleaved"] if getattr(module, "is_concatenated", True) else ["interleaved", "concat"]
    out = []
    for order in itertools.permutations(w3):
        if len(order) == 2:
            first, down = order
            gate = None
        else:
            gate, first, down = order
        for layout in hint_layouts:
            def io(n):  # (in, out) of a stored weight
                s = params[n].shape[1:]
                return (s[1], s[0]) if layout == "out_in" else (s[0], s[1])
            h_in, n_out = io(first)
            f_in, h_out = io(down)
            if h_in != h_out:
                continue
            if gate is not None:
                if io(gate) != (h_in, n_out) or n_out != f_in:
                    continue
                gls, F = ["separate"], f_in
            elif n_out == 2 * f_in:
                gls, F = hint_gates, f_in
            elif n_out == f_in:
                gls, F = ["none"], f_in
            else:
                continue
            N = 2 * F if gls[0] in ("concat", "interleaved") else F
            # each bias goes to one projection of its size (some projections may have none)
            dims = {"b_gate": F, "b_up": N, "b_down": h_in} if gate else {"b_up": N, "b_down": h_in}
            for assign in itertools.permutations(dims, len(b2)):
                if any(params[b].shape[1] != dims[slot] for b, slot in zip(b2, assign)):
                    continue
                if gate and ("b_gate" in assign) != ("b_up" in assign):
                    continue  # a separate gate and up carry biases together or not at all
                slots = {"gate": [gate] if gate else [], "up": [first], "down": [down]}
                slots.update({slot: [b] for b, slot in zip(b2, assign)})
                for gl in gls:
                    kw = dict(num_experts=E, hidden=h_in, ffn=F, gate_layout=gl, weight_layout=layout,
                              stacked=True, has_bias=bool(b2))
                    out.append(Candidate(kw, {s: slots.get(s, []) for s in SLOTS}))
    return out, "" if out else "stacked weight shapes do not chain as hidden -> ffn -> hidden"


def _linears(expert: torch.nn.Module):
    lins = [m for m in expert.modules() if isinstance(m, torch.nn.Linear)]
    owned = {id(p) for m in lins for p in m.parameters()}
    if any(id(p) not in owned for p in expert.parameters()):
        return None
    return lins


def module_layers(experts: torch.nn.ModuleList, params: dict[str, torch.Tensor]):
    """Per expert, its nn.Linear layers as ``(weight_name, bias_name | None)``; None if an expert holds anything
    else."""
    name_of = {id(p): n for n, p in params.items()}
    out = []
    for e in experts:
        lins = _linears(e)
        if lins is None:
            return None
        out.append([(name_of[id(l.weight)], name_of[id(l.bias)] if l.bias is not None else None) for l in lins])
    return out


def layer_candidates(layers: list[list[tuple[str, str | None]]], params: dict[str, torch.Tensor]):
    """Readings of E experts, each a list of 2 or 3 linear layers ``(weight [out, in], bias [out] | None)``."""
    E = len(layers)
    if E == 0:
        return None, "no experts"
    n_lin = len(layers[0])
    if n_lin not in (2, 3) or any(len(l) != n_lin for l in layers):
        return None, "experts are not all made of 2 or 3 linear layers"
    shapes = [tuple(tuple(params[w].shape) for w, _ in l) for l in layers]
    if any(len(s) != 2 for s0 in shapes for s in s0) or any(s != shapes[0] for s in shapes):
        return None, "experts have different shapes"
    biases = {b is not None for l in layers for _, b in l}
    if len(biases) != 1:
        return None, "some expert layers have biases and others not"
    has_bias = biases.pop()
    out = []
    for order in itertools.permutations(range(n_lin)):
        gate, first, down = order if n_lin == 3 else (None, *order)
        (n_out, h_in), (h_out, f_in) = shapes[0][first], shapes[0][down]
        if h_in != h_out or n_out != f_in:
            continue
        if gate is not None and shapes[0][gate] != shapes[0][first]:
            continue
        slots = {s: [] for s in SLOTS}
        for slot, i in (("gate", gate), ("up", first), ("down", down)):
            if i is not None:
                slots[slot] = [l[i][0] for l in layers]
                if has_bias:
                    slots["b_" + slot] = [l[i][1] for l in layers]
        kw = dict(num_experts=E, hidden=h_in, ffn=f_in, gate_layout="separate" if gate is not None else "none",
                  weight_layout="out_in", stacked=False, has_bias=has_bias)
        out.append(Candidate(kw, slots))
    return out, "" if out else "expert layer shapes do not chain as hidden -> ffn -> hidden"


# --------------------------------------------------------------------------------------------- verification
def random_routing(E: int, k: int, H: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = max(2 * E, 12)
    scale = torch.exp(torch.empty(T, 1).uniform_(-2.5, 2.5, generator=g))
    x = (torch.randn(T, H, generator=g, dtype=torch.float64) * scale).to(device)
    # the last expert gets no tokens (when there is more than k experts) to exercise empty groups
    pool = E - 1 if E > k else E
    idx = torch.rand(T, pool, generator=g).argsort(-1)[:, :k].to(device)
    w = torch.rand(T, k, generator=g, dtype=torch.float64).to(device)
    return x, idx, w


def random_parameters(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """float64 random tensors with the shapes (and device) of ``params``, never their values: matrices and stacked
    weights scaled by 1/sqrt(their smaller dimension) so activations see inputs of order one (times the probes'
    token scales), vectors (biases) of order 0.5. Every element nonzero with probability one."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    out = {}
    for name, p in params.items():
        shape = tuple(p.shape)
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) >= 2:
            t /= max(1, min(shape[-2:])) ** 0.5
        else:
            t *= 0.5
        out[name] = t.to(p.device)
    return out


def _module_output(module, params64, x, idx, w):
    return capture.run_own_code(module, params64, (x, idx, w))


def fused_output(spec: MoESpec, slots, params64, x, idx, w):
    """What ``spec`` computes on ``(x, idx, w)`` with the weights ``params64[slots[...]]`` (the ATen definition, no
    autograd)."""
    lists = [[params64[n] for n in slots[s]] for s in SLOTS]
    # the ATen backend defines what a spec computes (float64 here); the others are tested against it
    wts = canonical_weights(spec, *lists)
    return aten.experts_forward(spec, x, idx, w, wts)[0]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def detect_experts_module(module: torch.nn.Module, top_k: int = 2) -> ExpertsMatch:
    """Recognise ``module`` (contract ``forward(hidden, topk_idx, topk_weights) -> hidden``) as fused experts."""
    params = dict(module.named_parameters())
    if not params:
        return ExpertsMatch(None, reason="the module has no parameters")
    if getattr(module, "has_post_expert_norm", False):
        return ExpertsMatch(None, reason="a norm after each expert (has_post_expert_norm) is not fused")
    if any(p.dim() == 3 for p in params.values()):
        cands, why = stacked_candidates(module, params)
        pattern = "stacked experts [E, ., .]"
    else:
        _, experts = find_expert_list(module)
        if experts is None:
            return ExpertsMatch(None, reason="no stacked [E, ., .] weights and no single nn.ModuleList of experts")
        layers = module_layers(experts, params)
        if layers is None:
            return ExpertsMatch(None, reason="an expert holds parameters outside nn.Linear layers",
                                pattern=f"nn.ModuleList of {len(experts)} experts")
        cands, why = layer_candidates(layers, params)
        pattern = f"nn.ModuleList of {len(experts)} MLP experts"
    if not cands:
        return ExpertsMatch(None, reason=why, pattern=pattern)

    def reference(params64, x, idx, w):
        return _module_output(module, params64, x, idx, w)

    return prove(cands, params, reference, top_k, pattern, act_hint=module, swiglu=swiglu_params(module))


def expert_trials(cands, act_hint=None, swiglu=None) -> list[tuple[dict, dict]]:
    """``(MoESpec keywords, slots)`` for every candidate reading times every activation, in the order the hints
    (``act_fn``, GPT-OSS's ``alpha`` / ``limit``) rank them; at most ``_MAX_CANDIDATES``."""
    acts = _act_order(act_hint)
    trials = []
    for c in cands:
        gated = c.spec_kw["gate_layout"] != "none"
        for a in (["swiglu_oai"] if swiglu and gated else []) + acts:
            kw = dict(c.spec_kw, activation=a)
            if a == "swiglu_oai":
                kw.update(act_alpha=swiglu[0], act_limit=swiglu[1])
            trials.append((kw, c.slots))
    return trials[:_MAX_CANDIDATES]


def prove(cands, params, reference, top_k: int, pattern: str, act_hint=None, swiglu=None, probes=None) -> ExpertsMatch:
    """The first candidate reading whose fused computation equals ``reference(params64, x, idx, w)`` in float64 on
    ``PARAM_DRAWS`` independent draws of random parameters shaped like ``params`` (their values are never read),
    each on two independent random routings (or on ``probes``, a list of float64 ``(x, idx, w)``)."""
    dtypes = {p.dtype for p in params.values()}
    if not all(d.is_floating_point for d in dtypes):
        return ExpertsMatch(None, reason=f"unsupported parameter dtypes {sorted(map(str, dtypes))}", pattern=pattern)
    trials = expert_trials(cands, act_hint, swiglu)

    device = next(iter(params.values())).device
    best, failure = float("inf"), ""
    given = probes
    with dynamo.real_tensors():
        draws = [random_parameters(params, seed) for seed in range(PARAM_DRAWS)]
        # the shapes may allow several hidden sizes: probe each with inputs of that size
        for H in dict.fromkeys(kw["hidden"] for kw, _ in trials):
            E = trials[0][0]["num_experts"]
            k = max(1, min(top_k, E))
            if given is not None:
                if given[0][0].shape[-1] != H:
                    continue
                probes = given
            else:
                probes = [random_routing(E, k, H, device), random_routing(E, min(E, k + 1), H, device, seed=1)]
            cases = [(draw, probe) for draw in draws for probe in probes]
            try:
                refs = [reference(draw, *probe) for draw, probe in cases]
            except Exception as e:  # noqa: BLE001 - this hidden size does not fit the code; reported if none does
                failure = f"; the experts code failed on float64 probe inputs: {e}"
                continue
            if not all(isinstance(r, torch.Tensor) and r.shape == probe[0].shape for r, (_, probe) in zip(refs, cases)):
                failure = "; the experts do not return one [tokens, hidden] tensor"
                continue
            for kw, slots in trials:
                if kw["hidden"] != H:
                    continue
                spec = MoESpec(top_k=k, pattern=pattern, **kw)
                worst = 0.0
                for (draw, probe), ref in zip(cases, refs):
                    worst = max(worst, _relative_error(fused_output(spec, slots, draw, *probe), ref))
                    if worst > _TOL:
                        break
                best = min(best, worst)
                if worst <= _TOL:
                    return ExpertsMatch(spec, slots, pattern=pattern)
    return ExpertsMatch(
        None,
        reason=f"no fused form equals the experts code on random weights (best of {len(trials)} candidates: "
        f"rel. error {best:.1e})" + failure,
        pattern=pattern,
    )


def with_top_k(spec: MoESpec, k: int, router: RouterSpec | None = None) -> MoESpec:
    import dataclasses

    return dataclasses.replace(spec, top_k=k, router=router or spec.router)


def detect_dispatch_combine(module: torch.nn.Module, top_k: int = 2, hidden: int | None = None) -> ExpertsMatch:
    """Experts whose bodies are not MLPs: does ``module`` compute ``sum_j w[t, j] * experts[idx[t, j]](x[t])`` over
    its one ``nn.ModuleList`` (each expert mapping [n, H] -> [n, H] row by row)? Proven like the MLP readings."""
    _, experts = find_expert_list(module)
    if experts is None:
        return ExpertsMatch(None, reason="no single nn.ModuleList of experts")
    params = dict(module.named_parameters())
    if not params or not all(p.dtype.is_floating_point for p in params.values()):
        return ExpertsMatch(None, reason="expert parameters are missing or not floating point")
    first = next(iter(params.values()))
    H = hidden
    if H is None:
        return ExpertsMatch(None, reason="the hidden size of the experts' input is unknown")
    E, k = len(experts), max(1, min(top_k, len(experts)))
    pattern = f"dispatch + combine around {E} experts of your own code"
    with dynamo.real_tensors():
        worst = 0.0
        cases = [(draw, kk, seed) for draw in range(PARAM_DRAWS) for seed, kk in ((0, k), (1, min(E, k + 1)))]
        for draw, kk, seed in cases:
            m64 = {**capture.random_buffers(module), **random_parameters(params, draw)}  # both sides, the same
            x, idx, w = random_routing(E, kk, H, first.device, seed=seed)
            try:
                ref = _module_output(module, m64, x, idx, w)
                with capture.uncaptured():
                    got = run_user_experts(module, experts, list(m64), list(m64.values()), x, idx, w,
                                           make_plan(idx.long(), len(experts)))
            except Exception as e:  # noqa: BLE001 - reported, module left alone
                return ExpertsMatch(None, reason=f"probing the experts failed: {e}", pattern=pattern)
            worst = max(worst, _relative_error(got, ref))
    if worst > _TOL:
        return ExpertsMatch(None, reason=f"the module is not a weighted sum of its experts (rel. error {worst:.1e})",
                            pattern=pattern)
    spec = MoESpec(num_experts=E, top_k=k, hidden=H, ffn=0, expert_body="user", pattern=pattern)
    return ExpertsMatch(spec, {}, pattern=pattern)


# --------------------------------------------------------------------------------------------- one recognition
_MATCHES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
"""Proofs per live module. A proof depends on the module's code and its parameters' names, shapes and dtypes, never
on their values (it runs on random parameters), so an optimizer step cannot make a cached proof stale; the entry
goes with the module (no id() that a later module could reuse)."""


def cached_proof(module: torch.nn.Module, key: tuple, prove_it):
    """``prove_it()`` once per live module and ``key``, which is extended with the module's class, forward and
    parameter names, shapes and dtypes (what a proof on random values depends on)."""
    key = (type(module), type(module).forward, *key,
           tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()))
    cache = _MATCHES.setdefault(module, {})
    if key not in cache:
        cache[key] = prove_it()
    return cache[key]


def recognise_module(module: torch.nn.Module, top_k: int, hidden: int | None = None) -> ExpertsMatch:
    """The one recognition of an experts module (``forward(hidden, topk_idx, topk_weights)``), shared by the
    backend's passes and by ``moe_compile.parallelize``: MLP experts (``hidden`` None) or, given the hidden size,
    dispatch + combine around the user's own expert bodies. Cached per module."""
    if hidden is None:
        return cached_proof(module, ("mlp", top_k), lambda: detect_experts_module(module, top_k=top_k))
    return cached_proof(module, ("user", top_k, hidden),
                        lambda: detect_dispatch_combine(module, top_k=top_k, hidden=hidden))
