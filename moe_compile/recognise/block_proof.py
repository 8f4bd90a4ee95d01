"""Prove what a block found by structure computes, from its behaviour: forward AND gradients, on random parameters.

Steps (each failure is the reason explain gives, the block then traces as it is):

1. **run**: the block's own code on probe inputs, in float64 with random parameters and buffers (never their
   values); code that cannot run in float64 (a float32 buffer it creates) is probed in float32 instead, with a
   tolerance for that dtype. Its output must be one tensor shaped like its input.
2. **selection**: which experts each token reaches, read off the gradient of each token's output w.r.t. each
   expert's parameters; every token must reach the same number k.
3. **choice**: which scores pick those experts: top-k of softmax / sigmoid / the raw logits, with or without a
   selection-only ``[E]`` bias (a parameter or buffer).
4. **readings**: the experts' MLP readings (``recognise.experts``) times the weight readings (scores or softmax over
   the k, renormalised or not, a scale the block states, the score on the experts' input or output) times the shared
   children (none, or all of them added); the first whose output equals the block's on the first probe.
5. **buffers**: a buffer the block changes must be a tokens-per-expert count (``Routing.counts``), else no reading.
6. **proof**: that reading on every draw (``PARAM_DRAWS`` x 2 inputs): the output and the vector-Jacobian product
   for a random cotangent w.r.t. the input and every parameter (what tells a ``.detach()`` from plain code).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import capture
from ..compat import dynamo
from ..spec import MoESpec
from .experts import (PARAM_DRAWS, SLOTS, expert_trials, fused_output, layer_candidates, module_layers,
                      random_parameters, stacked_candidates, swiglu_params)
from .readings import SCORES, BlockReading, Routing, fused_block, route
from .structure import BlockStructure

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
FP32_NEAR = 1e-5
"""A float64 miss below this is float32 rounding inside the block's code: the proof is redone in float32."""
MAX_TRIALS = 4000
"""Fused forwards tried at most per block in step 4 (each on one small probe)."""


@dataclass
class BlockMatch:
    reading: BlockReading | None
    reason: str = ""
    seconds: float = 0.0
    best: float | None = float("inf")  # the closest reading's error (None: the code did not run)

    @property
    def ok(self) -> bool:
        return self.reading is not None


# --------------------------------------------------------------------------------------------- running the code
@contextlib.contextmanager
def _own_code():
    old, capture.ENABLED = capture.ENABLED, False
    try:
        yield
    finally:
        capture.ENABLED = old


def _run(module, tensors: dict, x):
    with _own_code():
        return torch.func.functional_call(module, tensors, (x,), strict=False)


def _draw(module, dtype, seed: int) -> dict:
    """Random parameters (float64 values cast to ``dtype``) and random floating buffers, by name."""
    params = {n: p for n, p in module.named_parameters()}
    out = {n: t.to(dtype) for n, t in random_parameters(params, seed).items()}
    g = torch.Generator().manual_seed(99 + seed)
    for n, b in module.named_buffers():
        if b.is_floating_point():
            out[n] = (torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(b.device)
        else:
            out[n] = b.clone()
    return out


def _inputs(rank: int, H: int, dtype, device, seed: int):
    g = torch.Generator().manual_seed(7 + seed)
    T = (13, 17)[seed % 2]
    scale = torch.exp(torch.empty(T, 1, dtype=torch.float64).uniform_(-1.5, 1.5, generator=g))
    x = (torch.randn(T, H, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    return x.view(*([1] * (rank - 2)), T, H)


def _rel(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


# --------------------------------------------------------------------------------------------- steps
def _expert_params(module, s: BlockStructure) -> list[list[str]]:
    """Per expert, the names of the block parameters that belong to it only (stacked: all of them)."""
    names = [n for n, _ in module.named_parameters()]
    if s.stacked:
        return [list(s.stacked)] * s.num_experts
    experts = module.get_submodule(s.experts) if s.experts else module
    keys = [k for k, _ in experts.named_children()]
    prefix = f"{s.experts}." if s.experts else ""
    return [[n for n in names if n.startswith(f"{prefix}{k}.")] for k in keys]


def _selection(module, s: BlockStructure, tensors: dict, x):
    """``[T]`` sets of the experts each token's output depends on (from per-token gradients)."""
    per_expert = _expert_params(module, s)
    leaves = {n: t.detach().requires_grad_(True) for n, t in tensors.items() if t.is_floating_point()
              and any(n in group for group in per_expert)}
    with torch.enable_grad():
        out = _run(module, {**tensors, **leaves}, x).reshape(-1, s.hidden)
        names = list(leaves)
        sets = []
        for t in range(out.shape[0]):
            grads = torch.autograd.grad(out[t].sum(), [leaves[n] for n in names], retain_graph=True,
                                        allow_unused=True)
            g = dict(zip(names, grads))
            chosen = set()
            for e, group in enumerate(per_expert):
                for n in group:
                    if g[n] is None:
                        continue
                    part = g[n][e] if s.stacked else g[n]
                    if bool(part.abs().max() > 0):
                        chosen.add(e)
                        break
            sets.append(frozenset(chosen))
    return sets


def _logits(s: BlockStructure, tensors: dict, x):
    """The router's logits ``[T, E]`` for the probe ``x``."""
    return F.linear(x.reshape(-1, s.hidden), tensors[s.router], tensors[s.router_bias] if s.router_bias else None)


def _choices(s: BlockStructure, tensors: dict, logits, sets, k: int):
    """``(score, selection bias)`` pairs whose top-k picks exactly ``sets``."""
    out = []
    for bias in (None, *s.vectors):
        for score in SCORES:
            idx, _ = route(logits, k, score, tensors[bias] if bias else None)
            if all(frozenset(row.tolist()) == want for row, want in zip(idx, sets)):
                out.append((score, bias))
    return out


def _hints(module):
    """Attributes the block states (ints, floats, bools, strings of it and its children), to order readings."""
    vals = {}
    for m in module.modules():
        for a, v in vars(m).items():
            if not a.startswith("_") and isinstance(v, (bool, int, float, str)):
                vals.setdefault(a, v)
    return vals


def _scales(hints) -> list[float]:
    found = [float(v) for a, v in hints.items() if not isinstance(v, bool) and isinstance(v, (int, float))
             and ("scal" in a.lower()) and v not in (0, 1)]
    return [1.0, *dict.fromkeys(found)]


def _expert_readings(module, s: BlockStructure):
    params = {n: p for n, p in module.named_parameters()}
    if s.stacked:
        owner = module.get_submodule(s.experts) if s.experts else module
        cands, why = stacked_candidates(owner, {n: params[n] for n in s.stacked})
        hint = owner
    else:
        experts = module.get_submodule(s.experts)
        layers = module_layers(list(experts.children()), params)
        if layers is None:
            return None, "an expert holds parameters outside nn.Linear layers"
        cands, why = layer_candidates(layers, params)
        hint = next(iter(experts.children()))
    if not cands:
        return None, why
    return expert_trials(cands, hint, swiglu_params(hint)), ""


def _behaviour_key(module) -> tuple:
    """What a proof on random values depends on: the code, the names, shapes and dtypes, the plain attributes."""
    return (type(module), type(module).forward,
            tuple((n, tuple(t.shape), t.dtype) for n, t in [*module.named_parameters(), *module.named_buffers()]),
            tuple((type(m), tuple(sorted((a, v) for a, v in vars(m).items() if not a.startswith("_")
                                         and isinstance(v, (bool, int, float, str)))))
                  for m in module.modules()))


_CACHE: dict = {}
_BY_MODULE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prove_block(module, s: BlockStructure, rank: int) -> BlockMatch:
    """The proven reading of ``module`` (a block found by structure, called on ``[..., H]`` inputs of ``rank``),
    cached per behaviour key (two layers of one class and config are proven once)."""
    key = (_behaviour_key(module), s, rank)
    if key not in _CACHE:
        t0 = time.perf_counter()
        try:
            with dynamo.real_tensors():
                match = _prove(module, s, rank)
        except Exception as e:  # noqa: BLE001 - reported; the block traces as it is
            match = BlockMatch(None, f"probing the block failed: {type(e).__name__}: {str(e).splitlines()[0]}")
        match.seconds = time.perf_counter() - t0
        if match.ok:  # what was proven, and how, goes into the spec's pattern (explain's row)
            proof = f"{match.reading.proof}, {match.seconds:.2f} s"
            spec = MoESpec.from_json(match.reading.spec)
            spec = dataclasses.replace(spec, pattern=f"{spec.pattern}, {spec.activation} [proven: {proof}]")
            match.reading = dataclasses.replace(match.reading, proof=proof, spec=spec.to_json())
        _CACHE[key] = match
    _BY_MODULE[module] = _CACHE[key]
    return _CACHE[key]


def _prove(module, s: BlockStructure, rank: int) -> BlockMatch:
    """In float64; again in float32 when the code cannot run in float64 or misses a reading only by float32
    rounding (it computes in float32 somewhere: ``.float()``, ``softmax(dtype=torch.float)``)."""
    match = _prove_in(module, s, rank, torch.float64)
    if match.ok or not (match.best is None or match.best < FP32_NEAR):
        return match
    again = _prove_in(module, s, rank, torch.float32)
    if again.ok:
        return again
    return match if match.best is not None else again


def _prove_in(module, s: BlockStructure, rank: int, dtype) -> BlockMatch:
    device = next(module.parameters()).device
    # 1. run
    tensors = _draw(module, dtype, 0)
    x = _inputs(rank, s.hidden, dtype, device, 0)
    try:
        out = _run(module, {k: v.clone() for k, v in tensors.items()}, x)
    except Exception as e:  # noqa: BLE001 - reported (and float32 tried after float64)
        return BlockMatch(None, f"the block's code failed on {str(dtype).replace('torch.', '')} probe inputs "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})", best=None)
    if not isinstance(out, torch.Tensor):
        return BlockMatch(None, f"the block returns {type(out).__name__}, not one tensor (extra outputs such as aux "
                          "losses have no reading yet)")
    if out.shape != x.shape:
        return BlockMatch(None, f"the block returns {tuple(out.shape)} for an input {tuple(x.shape)}")
    # 2. selection, 3. choice
    sets = _selection(module, s, {k: v.clone() for k, v in tensors.items()}, x)
    ks = {len(c) for c in sets}
    if len(ks) != 1 or 0 in ks:
        return BlockMatch(None, f"tokens reach different numbers of experts ({sorted(ks)}): capacity, dropping or "
                          "a threshold, which no whole-block reading covers yet")
    k = ks.pop()
    logits = _logits(s, tensors, x)
    choices = _choices(s, tensors, logits, sets, k)
    if not choices:
        return BlockMatch(None, f"no top-{k} of softmax, sigmoid or the logits of the [{s.num_experts}, {s.hidden}] "
                          f"router {s.router}" + (f" (with or without {', '.join(s.vectors)})" if s.vectors else "")
                          + " picks the experts the block uses")
    # 5. buffers the block changes
    before = {n: t.clone() for n, t in tensors.items()}
    after = {n: t.clone() for n, t in tensors.items()}
    _run(module, after, x)
    changed = [n for n, _ in module.named_buffers() if not torch.equal(before[n], after[n])]
    counts = None
    if changed:
        idx, _ = route(logits, k, choices[0][0], tensors[choices[0][1]] if choices[0][1] else None)
        n_e = torch.bincount(idx.reshape(-1), minlength=s.num_experts)
        counted = [n for n in changed if after[n].shape == (s.num_experts,)
                   and torch.equal((after[n] - before[n]).to(torch.float64), n_e.to(torch.float64))]
        if len(changed) != 1 or not counted:
            return BlockMatch(None, f"the block changes buffer(s) {changed} in its forward in a way no reading covers "
                              "(only a tokens-per-expert count is known)")
        counts = counted[0]
    # 4. readings
    trials, why = _expert_readings(module, s)
    if trials is None:
        return BlockMatch(None, why)
    hints = _hints(module)
    routings = [Routing(k=k, score=score, select_bias=bias, renormalize=renorm, scale=scale, score_on_input=soi,
                        shared=shared, counts=counts, fp32_scores=fp32)
                for soi in _input_first(hints) for score, bias in choices for fp32 in (False, True)
                for renorm in (False, True) for scale in _scales(hints) for shared in ((), s.others)]
    match, tried, best = _search(module, s, trials, routings, tensors, x, logits, out, TOL[dtype], k)
    if match is not None:
        return _final_proof(module, s, match, rank, dtype, TOL[dtype])
    return BlockMatch(None, f"no reading equals the block's output in {str(dtype).replace('torch.', '')} (best of "
                      f"{tried} tried: rel. error {best:.1e}); routing read from its gradients: top-{k} by "
                      + ", ".join(f"{sc}{' + ' + b if b else ''}" for sc, b in choices), best=best)


def _input_first(hints) -> tuple:
    """Score on the experts' output first, unless the block states it scores their input."""
    says = [v for a, v in hints.items() if isinstance(v, bool) and "score" in a.lower()
            and ("before" in a.lower() or "input" in a.lower())]
    return (True, False) if any(says) else (False, True)


def _search(module, s: BlockStructure, trials, routings, tensors, x, logits, ref, tol, k):
    """The first (experts reading, routing) whose output equals ``ref`` on this probe. Scores on the experts'
    output cost one experts evaluation per experts reading (every expert on every token, then each routing is a
    weighted sum); scores on their input one per pair."""
    x2 = x.reshape(-1, s.hidden)
    T, E = x2.shape[0], s.num_experts
    shared_out = {(): 0}
    if s.others:
        shared_out[s.others] = sum(_run(module.get_submodule(n), _sub(tensors, n), x2) for n in s.others)
    target = ref.reshape(-1, s.hidden)
    tried, best = 0, float("inf")
    for kw, slots in trials:
        spec = MoESpec(top_k=1, pattern="", **kw)
        slot_names = tuple(tuple(slots[n]) for n in SLOTS)
        every = None
        for r in routings:
            tried += 1
            if tried > MAX_TRIALS:
                return None, tried - 1, best
            idx, w = route(logits, k, r.score, tensors[r.select_bias] if r.select_bias else None, r.renormalize,
                           r.scale, r.fp32_scores)
            w = w.to(x2.dtype)
            try:
                if r.score_on_input:
                    routed = fused_output(dataclasses.replace(spec, top_k=k, score_on_input=True), slots, tensors,
                                          x2, idx, w)
                else:
                    if every is None:  # [T, E, H]: every expert on every token
                        every = fused_output(spec, slots, tensors, x2.repeat_interleave(E, 0),
                                             torch.arange(E, device=x2.device).repeat(T)[:, None],
                                             torch.ones(T * E, 1, dtype=x2.dtype, device=x2.device)).view(T, E, -1)
                    routed = (every.gather(1, idx[..., None].expand(-1, -1, every.shape[-1])) * w[..., None]).sum(1)
            except Exception:  # noqa: BLE001 - this experts reading does not fit the shapes
                break
            err = _rel(routed + shared_out[r.shared], target)
            best = min(best, err)
            if err <= tol:
                return _reading(s, r, slot_names, dataclasses.replace(spec, top_k=k)), tried, best
    return None, tried, best


def _sub(tensors: dict, name: str) -> dict:
    return {n[len(name) + 1:]: t for n, t in tensors.items() if n.startswith(name + ".")}


def _reading(s: BlockStructure, r: Routing, slot_names, spec: MoESpec) -> BlockReading:
    pattern = f"MoE block found by structure: {s.describe()}; {r.describe()}"
    spec = dataclasses.replace(spec, router=r.router_spec(), shared_experts=bool(r.shared),
                               score_on_input=r.score_on_input, pattern=pattern)
    return BlockReading(hidden=s.hidden, router=s.router, router_bias=s.router_bias, routing=r, slots=slot_names,
                        spec=spec.to_json())


def _fused(module, reading: BlockReading, tensors: dict, x):
    def shared(name):  # a shared child, called functionally on these tensors
        return lambda z: _run(module.get_submodule(name), _sub(tensors, name), z)

    return fused_block(x, tensors, shared, *reading.as_args())


def _final_proof(module, s, reading: BlockReading, rank: int, dtype, tol) -> BlockMatch:
    device = next(module.parameters()).device
    param_names = [n for n, _ in module.named_parameters()]
    worst = 0.0
    for draw in range(PARAM_DRAWS):
        for seed in (0, 1):
            base = _draw(module, dtype, draw)
            x = _inputs(rank, s.hidden, dtype, device, seed + 2 * draw)
            g = torch.Generator().manual_seed(31 + draw * 2 + seed)
            sides = []
            for fn in (_run, _fused_run(reading)):
                tensors = {n: t.clone() for n, t in base.items()}
                leaves = {n: tensors[n].requires_grad_(True) for n in param_names}
                xi = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    out = fn(module, {**tensors, **leaves}, xi)
                    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
                    g.manual_seed(31 + draw * 2 + seed)  # the same cotangent for both sides
                    grads = torch.autograd.grad(out, [xi, *leaves.values()], cot, allow_unused=True)
                grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, [xi, *leaves.values()])]
                bufs = [tensors[n] for n, _ in module.named_buffers()]
                sides.append((out.detach(), grads, bufs))
            (o1, g1, b1), (o2, g2, b2) = sides
            names = ["input", *param_names]
            for what, a, b in [("output", o2, o1), *[(f"gradient of {n}", b_, a_) for n, a_, b_ in zip(names, g1, g2)],
                               *[("buffer", bb, ba) for ba, bb in zip(b1, b2)]]:
                err = _rel(a, b) if b.abs().max() > 0 or a.abs().max() > 0 else 0.0
                worst = max(worst, err)
                if err > tol:
                    return BlockMatch(None, f"the reading ({reading.routing.describe()}) matches the output on one "
                                      f"probe but not the {what} on draw {draw} (rel. error {err:.1e}): the block "
                                      "computes something else (a .detach(), a straight-through estimator?)")
    proof = f"{str(dtype).replace('torch.', '')}, {PARAM_DRAWS} draws x 2 inputs, out + all grads {worst:.0e}"
    return BlockMatch(dataclasses.replace(reading, proof=proof))


def _fused_run(reading):
    def run(module, tensors, x):
        return _fused(module, reading, tensors, x)
    return run


def match_of(module) -> BlockMatch | None:
    """The last proof made for ``module`` (for explain), or None."""
    return _BY_MODULE.get(module)
