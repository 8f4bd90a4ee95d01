"""Detect what an experts module computes, by structure, and prove it numerically.

``detect_experts_module(module)`` looks at the module's parameters (never at its class name):
- stacked experts: 3D parameters ``[E, ...]`` (HF transformers, GPT-OSS, torchtitan-style), 2D biases ``[E, ...]``;
- an ``nn.ModuleList`` of E identical expert MLPs made of 2 or 3 ``nn.Linear`` (hand-written MoE layers).
From the shapes it enumerates the few ways the weights can be read (which projection is first, storage layout,
gate/up layout, activation), orders them by the hints the module gives (``act_fn``, ``is_transposed``,
``is_concatenated``...), and keeps the first candidate whose fused computation equals the module's own forward in
float64 on random routing (tokens of very different scales, so clamps and activations are exercised; one expert
left without tokens). A module for which no candidate is exact is left alone, with the reason.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .. import capture
from ..codegen import cpu
from ..spec import MoESpec, RouterSpec

SLOTS = ("gate", "up", "down", "b_gate", "b_up", "b_down")
_MAX_CANDIDATES = 96
_TOL = 1e-9


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
    names = ["silu", "gelu", "gelu_tanh", "relu", "sigmoid", "identity"]
    hint = type(getattr(module, "act_fn", None) or getattr(module, "act", None) or object()).__name__.lower()
    if "tanh" in hint or "new" in hint or "fast" in hint or "pytorch" in hint:
        names.remove("gelu_tanh")
        names.insert(0, "gelu_tanh")
    elif "gelu" in hint:
        names.remove("gelu")
        names.insert(0, "gelu")
    elif "relu" in hint:
        names.remove("relu")
        names.insert(0, "relu")
    return names


def _swiglu_params(module):
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
        return float(alpha), float(limit)
    return None


@dataclass
class _Candidate:
    spec_kw: dict
    slots: dict[str, list[str]]


def _stacked_candidates(module, params: dict[str, torch.Tensor]):
    w3 = [n for n, p in params.items() if p.dim() == 3]
    b2 = [n for n, p in params.items() if p.dim() == 2]
    other = [n for n, p in params.items() if p.dim() not in (2, 3)]
    if other or len(w3) not in (2, 3) or len(b2) not in (0, len(w3)):
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
            for bias_order in itertools.permutations(b2) if b2 else [()]:
                slots = {"gate": [gate] if gate else [], "up": [first], "down": [down]}
                if bias_order:
                    bias_names = list(bias_order)
                    want = ([F] if gate else []) + [N, h_in]
                    if [params[n].shape[1] for n in bias_names] != want:
                        continue
                    if gate:
                        slots["b_gate"] = [bias_names.pop(0)]
                    slots["b_up"], slots["b_down"] = [bias_names[0]], [bias_names[1]]
                for gl in gls:
                    kw = dict(num_experts=E, hidden=h_in, ffn=F, gate_layout=gl, weight_layout=layout,
                              stacked=True, has_bias=bool(b2))
                    out.append(_Candidate(kw, {s: slots.get(s, []) for s in SLOTS}))
    return out, "" if out else "stacked weight shapes do not chain as hidden -> ffn -> hidden"


def _linears(expert: torch.nn.Module):
    lins = [m for m in expert.modules() if isinstance(m, torch.nn.Linear)]
    owned = {id(p) for m in lins for p in m.parameters()}
    if any(id(p) not in owned for p in expert.parameters()):
        return None
    return lins


def _list_candidates(module, prefix: str, experts: torch.nn.ModuleList, params):
    E = len(experts)
    per = [_linears(e) for e in experts]
    if any(p is None for p in per):
        return None, "an expert holds parameters outside nn.Linear layers"
    n_lin = len(per[0])
    if n_lin not in (2, 3) or any(len(p) != n_lin for p in per):
        return None, "experts are not all made of 2 or 3 nn.Linear layers"
    name_of = {id(p): n for n, p in params.items()}
    shapes = [tuple(tuple(l.weight.shape) for l in p) for p in per]
    if any(s != shapes[0] for s in shapes):
        return None, "experts have different shapes"
    biases = {l.bias is not None for p in per for l in p}
    if len(biases) != 1:
        return None, "some expert layers have biases and others not"
    has_bias = biases.pop()
    out = []
    for order in itertools.permutations(range(n_lin)):
        if n_lin == 2:
            first, down = order
            gate = None
        else:
            gate, first, down = order
        (n_out, h_in), (h_out, f_in) = shapes[0][first], shapes[0][down]
        if h_in != h_out or n_out != f_in:
            continue
        if gate is not None and shapes[0][gate] != shapes[0][first]:
            continue

        def names(i, what="weight"):
            return [name_of[id(getattr(p[i], what))] for p in per]

        slots = {s: [] for s in SLOTS}
        slots["up"], slots["down"] = names(first), names(down)
        if gate is not None:
            slots["gate"] = names(gate)
        if has_bias:
            slots["b_up"], slots["b_down"] = names(first, "bias"), names(down, "bias")
            if gate is not None:
                slots["b_gate"] = names(gate, "bias")
        kw = dict(num_experts=E, hidden=h_in, ffn=f_in, gate_layout="separate" if gate is not None else "none",
                  weight_layout="out_in", stacked=False, has_bias=has_bias)
        out.append(_Candidate(kw, slots))
    return out, "" if out else "expert Linear shapes do not chain as hidden -> ffn -> hidden"


def _find_expert_list(module):
    lists = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if len(lists) != 1:
        return None, None
    return lists[0]


# --------------------------------------------------------------------------------------------- verification
def _random_routing(E: int, k: int, H: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = max(2 * E, 12)
    scale = torch.exp(torch.empty(T, 1).uniform_(-2.5, 2.5, generator=g))
    x = (torch.randn(T, H, generator=g, dtype=torch.float64) * scale).to(device)
    # the last expert gets no tokens (when there is more than k experts) to exercise empty groups
    pool = E - 1 if E > k else E
    idx = torch.rand(T, pool, generator=g).argsort(-1)[:, :k].to(device)
    w = torch.rand(T, k, generator=g, dtype=torch.float64).to(device)
    return x, idx, w


def _module_output(module, params64, x, idx, w):
    old = capture.ENABLED
    capture.ENABLED = False
    try:
        with torch.no_grad():
            return torch.func.functional_call(module, params64, (x, idx, w), strict=False)
    finally:
        capture.ENABLED = old


def _fused_output(spec: MoESpec, slots, params64, x, idx, w):
    lists = [[params64[n] for n in slots[s]] for s in SLOTS]
    wts = cpu.canonical_weights(spec, *lists)
    return cpu.experts_forward(spec, x, idx, w, wts)[0]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def detect_experts_module(module: torch.nn.Module, top_k: int = 2) -> ExpertsMatch:
    """Recognise ``module`` (contract ``forward(hidden, topk_idx, topk_weights) -> hidden``) as fused experts."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    params = dict(module.named_parameters())
    if not params:
        return ExpertsMatch(None, reason="the module has no parameters")
    dtypes = {p.dtype for p in params.values()}
    if not all(d.is_floating_point for d in dtypes):
        return ExpertsMatch(None, reason=f"unsupported parameter dtypes {sorted(map(str, dtypes))}")
    if getattr(module, "has_post_expert_norm", False):
        return ExpertsMatch(None, reason="a norm after each expert (has_post_expert_norm) is not fused")

    if any(p.dim() == 3 for p in params.values()):
        cands, why = _stacked_candidates(module, params)
        pattern = "stacked experts [E, ., .]"
    else:
        prefix, experts = _find_expert_list(module)
        if experts is None:
            return ExpertsMatch(None, reason="no stacked [E, ., .] weights and no single nn.ModuleList of experts")
        cands, why = _list_candidates(module, prefix, experts, params)
        pattern = f"nn.ModuleList of {len(experts)} MLP experts"
    if not cands:
        return ExpertsMatch(None, reason=why, pattern=pattern)

    acts = _act_order(module)
    swiglu = _swiglu_params(module)
    trials = []
    for c in cands:
        gated = c.spec_kw["gate_layout"] != "none"
        names = (["swiglu_oai"] if swiglu and gated else []) + acts
        for a in names:
            kw = dict(c.spec_kw, activation=a)
            if a == "swiglu_oai":
                kw.update(act_alpha=swiglu[0], act_limit=swiglu[1])
            trials.append((kw, c.slots))
    trials = trials[:_MAX_CANDIDATES]

    device = next(iter(params.values())).device
    best = float("inf")
    with unset_fake_temporarily():
        params64 = {n: p.detach().to(torch.float64) for n, p in params.items()}
        H = trials[0][0]["hidden"]
        E = trials[0][0]["num_experts"]
        k = max(1, min(top_k, E))
        x, idx, w = _random_routing(E, k, H, device)
        try:
            ref = _module_output(module, params64, x, idx, w)
        except Exception as e:  # noqa: BLE001 - reported, module left alone
            return ExpertsMatch(None, reason=f"the module's forward failed on float64 probe inputs: {e}", pattern=pattern)
        if not isinstance(ref, torch.Tensor) or ref.shape != x.shape:
            return ExpertsMatch(None, reason="the module does not return one [tokens, hidden] tensor", pattern=pattern)
        for kw, slots in trials:
            spec = MoESpec(top_k=k, pattern=pattern, **kw)
            err = _relative_error(_fused_output(spec, slots, params64, x, idx, w), ref)
            best = min(best, err)
            if err <= _TOL:
                # a second, independent probe with other routing and k
                x2, idx2, w2 = _random_routing(E, min(E, k + 1), H, device, seed=1)
                ref2 = _module_output(module, params64, x2, idx2, w2)
                if _relative_error(_fused_output(spec, slots, params64, x2, idx2, w2), ref2) <= _TOL:
                    return ExpertsMatch(spec, slots, pattern=pattern)
    return ExpertsMatch(
        None,
        reason=f"no fused form equals the module's forward (best of {len(trials)} candidates: rel. error {best:.1e})",
        pattern=pattern,
    )


def with_top_k(spec: MoESpec, k: int, router: RouterSpec | None = None) -> MoESpec:
    import dataclasses

    return dataclasses.replace(spec, top_k=k, router=router or spec.router)
