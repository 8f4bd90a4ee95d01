"""GShard / fairseq / DeepSpeed-MoE style layers: one-hot dispatch and combine tensors over capacity slots.

The layer computes ``y = experts(einsum("sec,sm->ecm", dispatch, x))`` and ``einsum("sec,ecm->sm", combine, y)``,
whatever router built ``dispatch``/``combine`` (top-1, top-2, a capacity factor, dropped tokens). The region between
the two einsums is cut out of the graph, its experts (an ``nn.ModuleList`` of MLPs, or stacked ``[E, ., .]``
weights) read and proven against the region itself in float64 on routings that respect the capacity, and replaced by
``moe_compile::experts_slots``, which runs only the occupied slots (no padded rows, no dense einsums) and computes
the dense formula itself if the tensors ever hold more than one token per slot.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .detect import SLOTS, _random_routing, _stacked_candidates, layer_candidates, prove
from .inline import _expert_lists, _extract, _value
from .rewrite import Region, _ancestors, module_path

EXPERTS_SLOTS = torch.ops.moe_compile.experts_slots.default


def _equation(node: fx.Node):
    if node.op != "call_function" or getattr(node.target, "__name__", "") != "einsum":
        return None
    eq = node.args[0] if node.args and isinstance(node.args[0], str) else None
    if eq is None or "->" not in eq:
        return None
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    lhs, out = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    return (terms, out, list(ops)) if len(terms) == 2 == len(ops) else None


def _dispatch_operands(node):
    """(dispatch, x) when ``node`` is einsum("sec,sm->ecm") in any letters and operand order."""
    eq = _equation(node)
    if eq is None:
        return None
    (a, b), out, ops = eq
    for (t3, t2), (o3, o2) in (((a, b), (ops[0], ops[1])), ((b, a), (ops[1], ops[0]))):
        if len(t3) == 3 and len(t2) == 2 and t3[0] == t2[0] and out == t3[1] + t3[2] + t2[1]:
            return o3, o2
    return None


def _combine_operands(node):
    """(combine, y) when ``node`` is einsum("sec,ecm->sm") in any letters and operand order."""
    eq = _equation(node)
    if eq is None:
        return None
    (a, b), out, ops = eq
    for (ta, tb), (oa, ob) in (((a, b), (ops[0], ops[1])), ((b, a), (ops[1], ops[0]))):
        if len(ta) == 3 == len(tb) and ta[1:] == tb[:2] and out == ta[0] + tb[2]:
            return oa, ob
    return None


def _slot_probes(S: int, E: int, C: int, H: int, device):
    """float64 (x, idx, w) routings of S tokens that fit C slots per expert (later choices dropped first, as GShard
    does), and the matching (dispatch, combine)."""
    probes = []
    for seed, k in ((0, min(2, E)), (1, 1)):
        x, idx, w = _random_routing(E, k, H, device, seed=seed)
        x, idx, w = x[:S], idx[:S], w[:S]
        if x.shape[0] < S:  # more tokens than the default probe: repeat with other scales
            reps = -(-S // x.shape[0])
            x = torch.cat([x * (i + 1) for i in range(reps)])[:S]
            idx, w = idx.repeat(reps, 1)[:S], w.repeat(reps, 1)[:S]
        idx = idx.clone()
        fill = [0] * E
        for j in range(idx.shape[1]):
            for t in range(S):
                e = int(idx[t, j])
                if fill[e] < C:
                    fill[e] += 1
                else:
                    idx[t, j] = E
        probes.append((x, idx, w))
    return probes


def topk_to_slots(idx, w, E: int, C: int):
    """Inverse of ``ops.slots_to_topk``: place (token, choice) pairs in slots, earlier choices first; pairs beyond
    an expert's C slots are dropped."""
    S = idx.shape[0]
    dispatch = torch.zeros(S, E, C, dtype=w.dtype, device=w.device)
    combine = torch.zeros_like(dispatch)
    fill = [0] * E
    for j in range(idx.shape[1]):
        for t in range(S):
            e = int(idx[t, j])
            if e < E and fill[e] < C:
                dispatch[t, e, fill[e]] = 1
                combine[t, e, fill[e]] = w[t, j]
                fill[e] += 1
    return dispatch, combine


def _param_groups(params: list[fx.Node], gm: fx.GraphModule):
    """The experts' parameters as layer lists (ModuleList) or a name->tensor dict of stacked weights."""
    live = {p.name: p.meta["grapharg"].example for p in params}
    if any(t.dim() == 3 for t in live.values()):
        return "stacked", live, {p.name: p for p in params}
    for _, experts in _expert_lists(gm).items():
        nodes = {n for e in experts.values() for layer in e.values() for n in layer.values()}
        if nodes == set(params):
            layers, by_name = [], {}
            for i in range(len(experts)):
                row = []
                for lname in sorted(experts[i]):
                    ps = experts[i][lname]
                    row.append((ps["weight"].name, ps["bias"].name if "bias" in ps else None))
                    by_name.update({n.name: n for n in ps.values()})
                layers.append(row)
            return "list", layers, by_name
    return None, None, None


def _hint(d) -> int:
    return d if isinstance(d, int) else int(d.node.hint)


def fuse_slot_experts(gm: fx.GraphModule, rewrite: bool = True) -> list[Region]:
    regions = []
    for D in list(gm.graph.nodes):
        dx = _dispatch_operands(D)
        if dx is None:
            continue
        dispatch, x = dx
        down = {D}
        for n in gm.graph.nodes:  # graph order: descendants of D
            if n is not D and any(a in down for a in n.all_input_nodes):
                down.add(n)
        combines = [n for n in down if _combine_operands(n) and _combine_operands(n)[1] in down]
        if len(combines) != 1:
            continue
        Cb = combines[0]
        combine, y = _combine_operands(Cb)
        between = (set(_ancestors(y)) | {y}) & down
        region = [n for n in gm.graph.nodes if n in between or n is Cb]
        inside = set(region)
        where = module_path(D)
        pattern = "GShard dispatch/combine einsums over capacity slots"

        def reject(reason):
            regions.append(Region(where, pattern, False, reason))

        ext = []
        for n in region:
            for a in n.all_input_nodes:
                if a not in inside and a not in ext:
                    ext.append(a)
        params = [a for a in ext if a.op == "placeholder" and "grapharg" in a.meta
                  and isinstance(a.meta["grapharg"].example, torch.nn.Parameter)]
        others = [a for a in ext if a not in params]
        if set(others) != {dispatch, x, combine} or len(others) != 3:
            reject(f"the experts between the einsums read more than (dispatch, x, combine, parameters): "
                   f"{[a.name for a in others]}")
            continue
        if any(u not in inside for n in region if n is not Cb for u in n.users):
            reject("values computed between the einsums are used elsewhere")
            continue
        dv, xv, cv = _value(dispatch), _value(x), _value(combine)
        if dv is None or xv is None or cv is None or xv.dim() != 2 or dv.dim() != 3 or tuple(dv.shape) != tuple(cv.shape):
            reject("dispatch/combine are not [tokens, experts, capacity] and x is not [tokens, hidden]")
            continue
        if dv.requires_grad:
            reject("the dispatch tensor requires grad (only the combine weights may)")
            continue
        if not isinstance(dv.shape[1], int) or not isinstance(xv.shape[1], int):
            reject("the number of experts and the hidden size must be static")
            continue
        # the region reads nothing but tensors, so it holds for any S and C: probe at the traced (hinted) sizes
        S, E, C = (_hint(d) for d in dv.shape)
        H = xv.shape[1]
        kind, structure, by_name = _param_groups(params, gm)
        if kind is None:
            reject("the experts' parameters are neither stacked [E, ., .] nor one nn.ModuleList of MLPs")
            continue
        live = {n: p.meta["grapharg"].example for n, p in by_name.items()}
        if kind == "stacked":
            cands, why = _stacked_candidates(object(), live)
        else:
            cands, why = layer_candidates(structure, live)
        if not cands:
            reject(why)
            continue
        names = list(by_name)
        sub = _extract(region, [dispatch, x, combine, *by_name.values()], Cb)

        def reference(params64, xx, ii, ww, sub=sub, names=names, E=E, C=C):
            d, c = topk_to_slots(ii, ww, E, C)
            return sub(d, xx, c, *[params64[n] for n in names])

        device = next(iter(live.values())).device
        match = prove(cands, live, reference, E, pattern, probes=_slot_probes(S, E, C, H, device))
        if not match.ok:
            reject(match.reason)
            continue
        spec = dataclasses.replace(match.spec, top_k=E, dispatch="slots")
        if rewrite:
            lists = [[by_name[n] for n in match.slots[s]] for s in SLOTS]
            with gm.graph.inserting_after(Cb):
                fused = gm.graph.call_function(EXPERTS_SLOTS, (x, dispatch, combine, *lists, spec.to_json()))
            with gm.graph.inserting_after(fused):
                out = gm.graph.call_function(operator.getitem, (fused, 0))
            out.meta.update(Cb.meta)
            fused.meta["nn_module_stack"] = Cb.meta.get("nn_module_stack", {})
            Cb.replace_all_uses_with(out)
            for n in reversed(region):
                gm.graph.erase_node(n)
        regions.append(Region(where, f"{pattern}, {spec.activation}", True, "", spec))
    return regions
