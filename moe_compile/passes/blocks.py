"""``moe_compile::block_call`` nodes (``moe_compile.capture_blocks``) -> the fused experts op, where proven.

For each captured block the reading its kind names (see ``capture_blocks``) is enumerated from the parameter shapes
and proven with ``recognise.experts.prove``: the fused computation, fed through the same argument conversion the rewritten
graph uses, must equal the module's own forward in float64 on random parameters and random routings. A node
without a proof keeps running the module's own code, and its region says why.
"""
from __future__ import annotations

import weakref

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import capture, capture_blocks
from ..recognise.readings import route
from ..spec import RouterSpec
from ..recognise.experts import (SLOTS, ExpertsMatch, cached_proof, module_layers, stacked_candidates, layer_candidates, prove,
                     random_parameters, with_top_k)
from .graph import BLOCK_CALL, EXPERTS, FUSED_TARGETS, Region, captured_calls, clean_path, module_path
from .router import describe_router



# --------------------------------------------------------------------------------------------- graph side
def mask_to_topk(mask: torch.Tensor, w: torch.Tensor):
    """``mask [T, j, E]``, ``w [T, j]`` -> ``idx, w [T, j*E]``: slot ``(j, e)`` is expert e where the mask is set,
    else ``E`` (dropped), with weight ``w[t, j]``."""
    T, j, E = mask.shape
    experts = torch.arange(E, device=mask.device).expand(T, j, E)
    idx = torch.where(mask != 0, experts, torch.full_like(experts, E)).reshape(T, j * E)
    return idx, w.reshape(T, j, 1).expand(T, j, E).reshape(T, j * E)


def route_topk_softmax(x: torch.Tensor, weight: torch.Tensor, k: int):
    """Linear router, top-k of the logits, softmax over the k chosen logits in float32 (JetMoE's gating)."""
    idx, w = route(F.linear(x, weight), k, "softmax_topk", fp32_scores=True)
    return idx, w.type_as(x)


def _views(params, recipe):
    """Per op slot, its tensors: ``(param index, view shape or None, transposed)`` applied to ``params``."""
    out = []
    for slot in recipe:
        ts = []
        for i, shape, transposed in slot:
            t = params[i] if shape is None else params[i].view(shape)
            # contiguous: the op's fake gradients are empty_like(input) (its strides) and its real ones contiguous;
            # with a transposed input they would differ and the view's backward would fail
            ts.append(t.transpose(1, 2).contiguous() if transposed else t)
        out.append(ts)
    return out


def fused_block(x, a, b, params, kind: str, recipe, spec: str, router: tuple):
    """What a proven ``block_call`` node becomes (traced by AOT like any graph code; the experts are one op)."""
    x2 = x.reshape(-1, x.shape[-1])
    if kind == "mask":
        idx, w = mask_to_topk(a, b)
    elif kind == "index":
        idx, w = a, b
    else:
        idx, w = route_topk_softmax(x2, params[router[0]], router[1])
    out = EXPERTS(x2, idx, w, *_views(params, recipe), spec)[0]
    if kind == "block" and router[2] is not None:
        out = out + params[router[2]]
    return out.reshape(x.shape)


FUSED_TARGETS.extend([BLOCK_CALL, fused_block])


# --------------------------------------------------------------------------------------------- proofs
def _call(module, params64, *args):
    return capture.run_own_code(module, params64, args)


def _x(T: int, H: int, g, device):
    scale = torch.exp(torch.empty(T, 1, dtype=torch.float64).uniform_(-2.0, 2.0, generator=g))
    return (torch.randn(T, H, generator=g, dtype=torch.float64) * scale).to(device)


def _expert_children(module):
    return [m for m in module.children() if any(True for _ in m.parameters())]


def _num_expert_hints(module, rows: int | None = None) -> list[int]:
    """Expert counts the module states (attributes), to try first; the proof decides."""
    hints = [getattr(m, a, None) for m in module.modules() for a in ("num_experts", "moe_num_experts")]
    return [h for h in dict.fromkeys(hints) if isinstance(h, int) and h > 0 and (rows is None or rows % h == 0)]


def _flat_candidates(module, params):
    """Weights flattened as ``[E*F, H]`` (dbrx): candidates over the ``[E, F, H]`` views and their transposes."""
    if len(params) not in (2, 3) or any(p.dim() != 2 for p in params.values()):
        return None, None, "parameters are not 2-3 flattened [E*F, H] expert weights"
    rows = {p.shape[0] for p in params.values()}
    if len(rows) != 1:
        return None, None, "flattened expert weights disagree on their rows"
    rows = rows.pop()
    names = list(params)
    out = []
    for E in _num_expert_hints(module, rows):
        for mask in range(2 ** len(names)):
            virtual, recipe = {}, {}
            for i, n in enumerate(names):
                v = params[n].view(E, rows // E, params[n].shape[1])
                t = bool(mask >> i & 1)
                vn = n + ("^T" if t else "")
                virtual[vn] = v.transpose(1, 2) if t else v
                recipe[vn] = (i, (E, rows // E, params[n].shape[1]), t)
            cands, _ = stacked_candidates(module, virtual)
            out += [(c, virtual, recipe) for c in cands or []]
    if not out:
        return None, None, "no [E, F, H] view of the flattened weights chains as hidden -> ffn -> hidden"
    return out, names, ""


def _prove_flat(module, params, reference, k, pattern, probes):
    cands, names, why = _flat_candidates(module, params)
    if cands is None:
        return ExpertsMatch(None, reason=why, pattern=pattern), None
    by_virtual = {}
    for c, virtual, recipe in cands:
        by_virtual.setdefault(tuple(virtual), (virtual, recipe, []))[2].append(c)
    best = None
    for virtual, recipe, cs in by_virtual.values():
        vparams = {n: t.detach() for n, t in virtual.items()}

        def ref(draw, x, idx, w, recipe=recipe):  # the module's own parameters, rebuilt from the virtual draw
            orig = {}
            for vn, (i, shape, t) in recipe.items():
                d = draw[vn].transpose(1, 2) if t else draw[vn]
                orig[names[i]] = d.reshape(params[names[i]].shape)
            return reference(orig, x, idx, w)

        match = prove(cs, vparams, ref, k, pattern, act_hint=module, probes=probes)
        if match.ok:
            return match, {vn: r for vn, r in recipe.items()}
        best = match
    return best, None


def _index_probes(E, k, H, dropped: bool, device):
    g = torch.Generator().manual_seed(7)
    out = []
    for T in (13, 17):
        x = _x(T, H, g, device)
        idx = torch.randint(0, E + 1 if dropped else E, (T, k), generator=g)
        out.append((x, idx.to(device), torch.rand(T, k, generator=g, dtype=torch.float64).to(device)))
    return out


def match_block(module, kind: str, a_shape: tuple, H: int):
    """``(ExpertsMatch, recipe, router)`` for a captured module, cached per module and call shape."""
    def prove_it():
        try:
            return _match(module, kind, a_shape, H)
        except Exception as e:  # noqa: BLE001 - reported, the module keeps running its own code
            return ExpertsMatch(None, reason=f"probing the block failed: {e}", pattern=kind), None, None

    return cached_proof(module, ("block", kind, a_shape, H), prove_it)


def _match(module, kind, a_shape, H):
    params = {n: p for n, p in module.named_parameters()}
    device = next(iter(params.values())).device  # probes where the parameters (and their random draws) live
    rank = type(module)._moe_compile_block[1]

    def shaped(x):  # probe inputs [T, H] in the rank the class is called with
        return x.view(*([1] * (rank - 2)), *x.shape)

    if kind == "mask":
        kk, E = a_shape[-2], a_shape[-1]
        experts = _expert_children(module)
        pattern = f"{len(experts)} experts selected by a [tokens, {kk}, {E}] mask"
        layers = module_layers(experts, params) if len(experts) == E else None
        if layers is None:
            return ExpertsMatch(None, reason=f"the mask names {E} experts; the module does not hold {E} experts made "
                                "of nn.Linear layers only", pattern=pattern), None, None
        cands, why = layer_candidates(layers, params)
        if not cands:
            return ExpertsMatch(None, reason=why, pattern=pattern), None, None
        g, probes, orig = torch.Generator().manual_seed(5), [], {}
        for T in (13, 17):
            mask = (torch.rand(T, kk, E, generator=g) < 0.4).long().to(device)
            wj = torch.rand(T, kk, generator=g, dtype=torch.float64).to(device)
            idx, w = mask_to_topk(mask, wj)
            orig[id(idx)] = (mask, wj)
            probes.append((_x(T, H, g, device), idx, w))
        match = prove(cands, params, lambda d, x, idx, w: _call(module, d, x, *orig[id(idx)]), kk * E, pattern,
                      act_hint=experts[0], probes=probes)
        return match, _recipe_of(match, params), None

    if kind == "index":
        k = a_shape[-1]
        stacked = any(p.dim() == 3 for p in params.values())
        experts = _expert_children(module)
        dropped = _accepts_dropped(module, params, k, H, shaped)

        def reference(d, x, idx, w):
            return _call(module, d, shaped(x), idx, w).reshape(x.shape)

        probes = None
        if stacked:
            cands, why = stacked_candidates(module, params)
            pattern = "stacked experts [E, ., .]"
        elif len(experts) > 1 and module_layers(experts, params) is not None:
            cands, why = layer_candidates(module_layers(experts, params), params)
            pattern = f"{len(experts)} MLP experts"
        else:
            pattern = "flattened [E*F, H] expert weights"
            E = _num_expert_hints(module, next(iter(params.values())).shape[0])[:1] or [1]
            probes = _index_probes(E[0], k, H, dropped, device)
            match, recipe = _prove_flat(module, params, reference, k, pattern, probes)
            return match, _recipe_views(match, recipe, list(params)), None
        if not cands:
            return ExpertsMatch(None, reason=why, pattern=pattern), None, None
        E = cands[0].spec_kw["num_experts"]
        probes = _index_probes(E, k, H, dropped, device)
        match = prove(cands, params, reference, k, pattern, act_hint=experts[0] if experts else module, probes=probes)
        return match, _recipe_of(match, params), None

    # a whole block with its router inside
    pattern = "MoE block with its router inside (linear, top-k, softmax over k)"
    stacked = {n: p for n, p in params.items() if p.dim() == 3}
    two = [n for n, p in params.items() if p.dim() == 2]
    one = [n for n, p in params.items() if p.dim() == 1]
    if not stacked or len(two) != 1 or len(one) > 1:
        return ExpertsMatch(None, reason="parameters are not stacked experts, one [E, H] router weight and an "
                            "optional [H] bias", pattern=pattern), None, None
    E = next(iter(stacked.values())).shape[0]
    rname, bname = two[0], (one[0] if one else None)
    if tuple(params[rname].shape) != (E, H) or (bname and tuple(params[bname].shape) != (H,)):
        return ExpertsMatch(None, reason="router weight is not [E, H] or bias not [H]", pattern=pattern), None, None
    ks = [getattr(m, "top_k", None) for m in module.modules()]
    ks = [k for k in dict.fromkeys(ks) if isinstance(k, int) and 0 < k <= E] or [2]
    cands, why = stacked_candidates(module, stacked)
    if not cands:
        return ExpertsMatch(None, reason=why, pattern=pattern), None, None
    g = torch.Generator().manual_seed(11)
    side = {n: p for n, p in params.items() if n in (rname, bname)}
    match = None
    for k in ks:
        probes, orig = [], {}
        for seed, T in enumerate((13, 17)):
            x = _x(T, H, g, device)
            rnd = random_parameters(side, 100 + seed)
            idx, w = route_topk_softmax(x, rnd[rname], k)
            orig[id(idx)] = rnd
            probes.append((x, idx, w))

        def reference(d, x, idx, w, orig=orig):
            rnd = orig[id(idx)]
            out = _call(module, {**d, **rnd}, shaped(x)).reshape(x.shape)
            return out - rnd[bname] if bname else out

        match = prove(cands, stacked, reference, k, pattern, act_hint=module, probes=probes)
        if match.ok:
            names = list(params)
            router = (names.index(rname), k, names.index(bname) if bname else None)
            return match, _recipe_of(match, params), router
    return match, None, None


def _accepts_dropped(module, params, k, H, shaped) -> bool:
    """Does the module's code take expert id ``E`` (HF's "dropped" sentinel)? Then the proof probes it too."""
    try:
        E = max(_num_expert_hints(module) or [0])
        if not E:
            return False
        d = random_parameters(params, 0)
        dev = next(iter(params.values())).device
        _call(module, d, shaped(torch.randn(3, H, dtype=torch.float64, device=dev)),
              torch.full((3, k), E, device=dev), torch.rand(3, k, dtype=torch.float64, device=dev))
        return True
    except Exception:  # noqa: BLE001 - the sentinel is not supported: probe ids in [0, E) only
        return False


def _recipe_of(match, params):
    if not match.ok:
        return None
    names = list(params)
    return tuple(tuple((names.index(n), None, False) for n in match.slots[s]) for s in SLOTS)


def _recipe_views(match, recipe, names):
    if not match.ok:
        return None
    return tuple(tuple(recipe[n] for n in match.slots[s]) for s in SLOTS)


# --------------------------------------------------------------------------------------------- the pass
def _example(n):
    return n.meta.get("example_value") if isinstance(n, fx.Node) else None


def fuse_block_calls(gm: fx.GraphModule, rewrite: bool = True) -> list[Region]:
    regions = []
    for node, (x, a, b, params, key), module in captured_calls(gm, BLOCK_CALL):
        kind = type(module)._moe_compile_block[0]
        path = module_path(node)
        xv, av = _example(x), _example(a)
        try:
            a_shape, H = tuple(int(s) for s in av.shape[1:]), int(xv.shape[-1])
        except (TypeError, AttributeError):
            regions.append(Region(path, kind, False, "captured; the routing or hidden sizes are not static",
                                  module=weakref.ref(module)))
            continue
        match, recipe, router = match_block(module, kind, a_shape, H)
        if not match.ok:
            regions.append(Region(path, match.pattern, False, f"captured whole, runs its own code: {match.reason}",
                                  module=weakref.ref(module)))
            continue
        if kind == "block":
            rspec, k = RouterSpec(score="softmax", order="topk->score", renormalize=False), router[1]
        else:
            rspec, _ = describe_router(x, a, b)
            k = a_shape[-2] * a_shape[-1] if kind == "mask" else a_shape[-1]
        spec = with_top_k(match.spec, k, rspec)
        if rewrite:
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(fused_block, (x, a, b, params, kind, recipe, spec.to_json(), router))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        regions.append(Region(path, f"{match.pattern}, {spec.activation}", True, "", spec, weakref.ref(module)))
    return regions + report_skipped(gm, regions)


def report_skipped(gm: fx.GraphModule, found) -> list[Region]:
    """Modules of a captured class left uncaptured in this trace (``capture.SKIPPED``), once per path."""
    skipped = dict(capture.SKIPPED)
    if not skipped:
        return []
    seen, out = {r.module_path for r in found}, []
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
            name = name.rsplit(".", 1)[-1]
            p = clean_path(path)
            if name in skipped and p not in seen:
                seen.add(p)
                out.append(Region(p, name, False, f"not captured: {skipped[name]}"))
    return out
