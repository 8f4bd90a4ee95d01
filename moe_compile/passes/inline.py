"""Hand-written experts that Dynamo traced inline (no decorator, no HF module): find the region, prove, fuse.

A user's MoE layer with an ``nn.ModuleList`` of expert MLPs, dispatched with ``torch.where``/``nonzero``/indexing and
combined with ``index_add_``/``scatter_add_``, traces (with ``capture_dynamic_output_shape_ops``) into an unrolled
loop. ``fuse_inline_experts(gm)``:

1. groups the parameter placeholders of each ModuleList by expert and layer (from their Dynamo source names);
2. takes the region: the nodes of the module that holds the list, minus the router (the top-k, what it depends on,
   and what is computed from the top-k values alone, such as renormalisation), minus trailing reshapes;
3. requires the region's inputs to be exactly hidden ``[T, H]``, expert ids ``[T, k]`` (integer), routing weights
   ``[T, k]`` and the experts' parameters (or hidden and dense ``[T, E]`` scores, Llama-4: then ``k = E``), and its
   output one ``[T, H]`` tensor; in-place updates of module buffers (torchtitan's token counts) and a shared expert
   the routed output is added into stay outside the region;
4. runs the region itself, extracted as a graph, in float64 as the reference for ``recognise.experts.prove``;
5. replaces the region with ``moe_compile::experts`` when the proof holds; otherwise leaves it and says why.

A ModuleList that ``moe_compile.parallelize`` sharded holds this rank's experts and, in the other experts' places,
placeholders of the same shapes (``parallel.setup``; each parameter tagged ``_moe_inline = (key, op index,
expected)``): the region traces as before and is replaced by ``moe_compile::parallel_experts`` over the local
experts' weights. Such a region must be fused, with the reading ``parallelize`` proved: anything else raises.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from ..compat import dynamo
from ..ops.parallel import state_for
from .autocast import region_mode, with_autocast
from ..recognise.experts import SLOTS, Candidate, layer_candidates, prove, stacked_candidates, with_top_k
from .graph import (EXPERTS, Region, ancestors_of, clean_path, example_value, experts_ops, expert_lists,
                    extract_region, is_op, live_value, parallel_experts_op, param_path, size_checks, stack_paths,
                    weight_refs)
from ..spec import RouterSpec
from .router import describe_router

_SHAPE_OPS = ("reshape", "view", "view_as", "contiguous")
_ROOT = dynamo.ROOT  # the compiled module itself: Dynamo leaves its own nodes' module stack empty


def _router(nodes: list[fx.Node], list_path: str | None, parent: str = "") -> set[fx.Node]:
    """The top-k, what it depends on, and what is computed from the top-k values alone (renormalisation, scaling,
    or ``scores.gather(1, idx)`` when a selection-only bias picked the experts); inside a router module of its own
    (below ``parent``), every float it computes from the router alone (Llama-4's dense ``[T, E]`` scores)."""
    topks = [n for n in nodes if is_op(n, "topk")]
    router: set[fx.Node] = set()
    from_topk: set[fx.Node] = set()
    for t in topks:
        router |= set(ancestors_of(t)) | {t} | set(t.users)
        from_topk |= {t} | set(t.users)
    own = {stack_paths(t)[-1] for t in topks if stack_paths(t) and stack_paths(t)[-1] != parent}
    for n in nodes:
        out = example_value(n)
        if (stack_paths(n) and stack_paths(n)[-1] in own and n not in router and n.all_input_nodes
                and all(a in router for a in n.all_input_nodes) and isinstance(out, torch.Tensor)
                and out.is_floating_point()):
            router.add(n)
            from_topk.add(n)
    for n in nodes:
        if n in router or (list_path and list_path in " ".join(stack_paths(n))):
            continue
        ins = n.all_input_nodes
        if is_op(n, "unsqueeze", "view", "reshape", "expand", "getitem", "__getitem__", "index_select"):
            continue  # reshaping the routing weights for the combine belongs to the experts' region
        kinds = [example_value(a).is_floating_point() for a in ins if isinstance(example_value(a), torch.Tensor)]
        out = example_value(n)
        # integer inputs (expert ids) only together with a float one, and a float result: gather(scores, 1, idx)
        if (ins and all(a in router for a in ins) and any(a in from_topk for a in ins)
                and (all(kinds) or (any(kinds) and isinstance(out, torch.Tensor) and out.is_floating_point()))):
            router.add(n)
            from_topk.add(n)
    return router, from_topk


def _depends(region: list[fx.Node], seeds: set[fx.Node]) -> set[fx.Node]:
    """The region's nodes computed from ``seeds`` (expert ids, routing weights, expert parameters)."""
    dep, size, inside = set(), -1, set(region)
    while len(dep) != size:  # until the in-place writes have marked what they write into
        size = len(dep)
        for n in region:
            if any(a in seeds or a in dep for a in n.all_input_nodes):
                dep.add(n)
                if _in_place(n) and isinstance(n.args[0], fx.Node) and n.args[0] in inside:
                    dep.add(n.args[0])
    return dep


def _in_place(n: fx.Node) -> bool:
    """``out.index_add_(...)``, ``out[i] = y`` and the like: they write into their first argument."""
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.startswith("_")
    return n.op == "call_function" and n.target is operator.setitem


def _updates_state(n: fx.Node, params: set[fx.Node]) -> bool:
    """An in-place write into a graph input other than the experts' weights (a buffer of the module)."""
    target = n.args[0] if n.args else None
    return _in_place(n) and isinstance(target, fx.Node) and target.op == "placeholder" and target not in params


def _prune(region: list[fx.Node], seeds: set[fx.Node]) -> list[fx.Node]:
    """Drop what neither depends on the seeds nor feeds what does (a shared expert beside the routed ones)."""
    dep = _depends(region, seeds)
    keep = set(dep)
    for n in reversed(region):
        if n in keep:
            keep |= set(n.all_input_nodes)
    return [n for n in region if n in keep]


def _region(gm: fx.GraphModule, parent: str, list_path: str, params: set[fx.Node]):
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
             and (parent == _ROOT or parent in stack_paths(n))]
    if parent == _ROOT and not any(is_op(n, "topk") for n in nodes):
        return []  # the compiled module itself, with no router in this graph: a piece resumed after a graph break
    router, from_topk = _router(nodes, list_path, parent)
    region = [n for n in nodes if n not in router]
    inside = set(region)
    # size arithmetic on tensors from outside (x.shape for a final reshape) is not the experts' work
    for n in region:
        if not isinstance(example_value(n), torch.Tensor) and not any(a in inside for a in n.all_input_nodes):
            inside.discard(n)
    region = [n for n in region if n in inside]
    seeds = from_topk | params  # expert ids and routing weights, and the experts' weights
    if not from_topk:  # an experts module's own scope: ids and weights come from outside, like the hidden states
        seeds |= {a for n in region for a in n.all_input_nodes if a not in inside}
    region = _prune(region, seeds)
    # trailing shape ops stay outside (the fused op returns [T, H]); so does ``+ shared_expert(x)``
    while region:
        inside = set(region)
        dep = _depends(region, seeds)
        last = [n for n in region if n in dep and any(u not in inside for u in n.users)]
        if len(last) != 1:
            break
        n = last[0]
        if is_op(n, *_SHAPE_OPS) and n.all_input_nodes[0] in inside:
            region.remove(n)
        elif is_op(n, "add", "__add__") and len(n.all_input_nodes) == 2 and sum(a in dep for a in n.all_input_nodes) == 1:
            region = _prune([m for m in region if m is not n], seeds)
        elif (len(adds := [m for m in region if is_op(m, "add_") and m.args[0] is n and len(m.all_input_nodes) == 2])
              == 1 and not any(a in dep for a in n.all_input_nodes)):
            region = _prune([m for m in region if m is not adds[0]], seeds)  # ``shared(x).add_(routed)`` stays
        else:
            break
    return region


def _size_inputs(ext: list[fx.Node], x: fx.Node, idx: fx.Node):
    """External sizes the region uses, as sizes of its inputs: ``{node: (0, 0, 1)}`` for tokens ``T``,
    ``(0, 0, k)`` for ``T * k``; None if one is anything else."""
    T, k = example_value(x).shape[0], int(example_value(idx).shape[-1])
    out = {}
    for a in ext:
        v = example_value(a)
        expr = getattr(getattr(v, "node", None), "expr", None)
        t_expr = getattr(getattr(T, "node", None), "expr", None)
        if expr is None or t_expr is None:
            return None
        if expr == t_expr:
            out[a] = (0, 0, 1)
        elif expr == t_expr * k:
            out[a] = (0, 0, k)
        else:
            return None
    return out


def _probes(E: int, k: int, H: int, tokens: list[int], device):
    """Float64 ``(x, idx, w)`` at the traced token counts (the region may hold them as constants): tokens of very
    different scales, k distinct experts each, the last expert left without tokens when E > k."""
    out = []
    for seed, T in enumerate(tokens):
        g = torch.Generator().manual_seed(seed)
        scale = torch.exp(torch.empty(T, 1, dtype=torch.float64).uniform_(-2.5, 2.5, generator=g))
        x = torch.randn(T, H, generator=g, dtype=torch.float64) * scale
        pool = E - 1 if E > k else E
        idx = torch.rand(T, pool, generator=g).argsort(-1)[:, :k].contiguous()
        w = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1
        out.append((x.to(device), idx.to(device), w.to(device)))
    return out


def _token_counts(x: fx.Node) -> list[int]:
    T = example_value(x).shape[0]
    if isinstance(T, int):
        return [T, T]
    hint = T.node.hint if getattr(T.node, "hint", None) is not None else 8
    return [int(hint), int(hint) + 3]


def _with_score_on_input(cands):
    """Each reading again with the routing weight scaling the expert's input instead of its output (the same
    function only for a linear expert; the proof picks whichever the code computes)."""
    return list(cands) + [Candidate(dict(c.spec_kw, score_on_input=True), c.slots) for c in cands]


def _scope(gm: fx.GraphModule, path: str) -> str:
    """The innermost module at or above ``path`` whose nodes hold a top-k router (torchtitan keeps the router and
    the experts in sibling modules of the MoE block)."""
    topk_paths = [set(stack_paths(n)) | {_ROOT} for n in gm.graph.nodes if is_op(n, "topk")]
    p = path
    while p:
        if any(p in ps for ps in topk_paths):
            return p
        if "." not in p:
            break
        p = p.rsplit(".", 1)[0]
    return path


def _list_group(experts):
    """A ModuleList group as (names -> placeholder, candidates or None, why)."""
    names, layers = {}, []
    for i in range(len(experts)):
        row = []
        for lname in sorted(experts[i]):
            ps = experts[i][lname]
            wn, bn = f"{i}.{lname}.weight", (f"{i}.{lname}.bias" if "bias" in ps else None)
            names[wn] = ps["weight"]
            if bn:
                names[bn] = ps["bias"]
            row.append((wn, bn))
        layers.append(row)
    live = {n: live_value(p) for n, p in names.items()}
    cands, why = layer_candidates(layers, live)
    return names, cands, why


def _stacked_groups(gm: fx.GraphModule):
    """{module path: {param name: placeholder}} for modules owning stacked [E, ., .] expert weights."""
    groups = defaultdict(dict)
    for node in gm.graph.nodes:
        pp = param_path(node)
        if pp is not None:
            groups[pp[0]][pp[1]] = node
    return {m: ps for m, ps in groups.items() if any(live_value(p).dim() == 3 for p in ps.values())}


def _groups(gm: fx.GraphModule):
    """(parent module path, path of the experts' own nodes, pattern, names -> placeholder, candidates, why)."""
    for list_path, experts in expert_lists(gm).items():
        names, cands, why = _list_group(experts)
        yield list_path.rsplit(".", 1)[0], list_path, f"inline nn.ModuleList of {len(experts)} experts", names, cands, why
    for owner, ps in _stacked_groups(gm).items():
        live = {n: live_value(p) for n, p in ps.items()}
        cands, why = stacked_candidates(object(), live)
        yield owner, None, "inline stacked [E, ., .] expert weights gathered per token", ps, cands, why


def _insert_point(gm: fx.GraphModule, nodes: list[fx.Node]) -> fx.Node:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return max(nodes, key=order.__getitem__)


def fuse_inline_experts(gm: fx.GraphModule, rewrite: bool = True, skip=()) -> list[Region]:
    """``skip``: module paths other passes already matched. Each group of expert weights is tried in the module
    that owns it (an experts module called with (hidden, ids, weights)), then, if that fails, in the innermost
    module above it that holds the router (torchtitan: router and experts are siblings in the MoE block)."""
    regions = []
    for owner, list_path, pattern, names, cands, why in _groups(gm):
        scopes = list(dict.fromkeys([owner, _scope(gm, owner)]))
        if any(clean_path(p) in skip for p in scopes):
            continue
        params = set(names.values())
        found = None
        for parent in scopes:
            region = _region(gm, parent, list_path, params)
            if not region or any(n.op == "call_function" and n.target in experts_ops() for n in region):
                continue  # nothing there, or experts already captured as one node
            spec, slots, why_not = _fuse_region(gm, region, names, cands, why, pattern, rewrite)
            found = (clean_path(parent), spec, slots, why_not)
            if spec is not None:
                break
        sharded = _parallel_tag(names)
        if rewrite and sharded is not None and (found is None or found[1] is None):
            raise RuntimeError(
                f"moe_compile: the experts {clean_path(list_path or owner)} were sharded by moe_compile.parallelize "
                "(other ranks' experts are placeholders here), but this graph does not compute them as the block "
                f"parallelize proved: {found[3] if found else 'no MoE region found around them'}. Compile the model "
                "as it was when parallelize ran (same code, no graph break inside the MoE block)")
        if found is None:
            continue
        where, spec, slots, why_not = found
        refs = weight_refs(names.values())
        if spec is None:
            regions.append(Region(where, pattern, False, why_not, weights=refs))
            continue
        extra = ", score on the expert input" if spec.score_on_input else ""
        extra += ", parallel" if sharded is not None else ""
        regions.append(Region(where, f"{pattern}, {spec.activation}, router {spec.router.score}{extra}", True, "",
                              spec, weights=refs, slots=slots))
    return regions


def _inline_tag(placeholder: fx.Node) -> tuple | None:
    """``(key, op index or -1, expected reading)`` on a parameter of a list ``parallelize`` sharded, else None."""
    return getattr(live_value(placeholder), "_moe_inline", None)


def _parallel_tag(names: dict) -> tuple | None:
    """``(key, expected)`` when the experts' parameters belong to a ModuleList ``parallelize`` sharded, else None."""
    tags = [_inline_tag(p) for p in names.values()]
    if all(t is None for t in tags):
        return None
    if any(t is None for t in tags) or len({id(t[2]) for t in tags}) != 1:
        raise RuntimeError("moe_compile: one MoE region mixes experts parallelize sharded with others")
    key, _, expected = tags[0]
    return key, expected


def _fuse_region(gm, region, names, cands, why, pattern, rewrite):
    """Prove ``region`` and replace it by the fused op: ``(spec, slots, "")``, or ``(None, None, reason)`` leaving it
    as is."""
    params = set(names.values())
    # in-place updates of module state (torchtitan's tokens_per_expert.add_(counts)) stay in the graph, as they are
    region = [n for n in region if not _updates_state(n, params)]
    inside = set(region)
    checks = size_checks(region)
    ext = []
    for n in region:
        if n in checks:
            continue
        for a in n.all_input_nodes:
            if a not in inside and a not in params and a not in ext:
                ext.append(a)
    tensors = [a for a in ext if isinstance(example_value(a), torch.Tensor)]
    ints = [a for a in tensors if not example_value(a).is_floating_point()]
    floats = [a for a in tensors if example_value(a).is_floating_point()]
    if cands and len(tensors) == 2 and not ints:
        return _fuse_dense(gm, region, names, cands, pattern, rewrite, floats, checks)
    if len(tensors) != 3 or len(ints) != 1 or len(floats) != 2:
        return None, None, (f"the region's inputs are not (hidden, expert ids, routing weights): {len(ints)} integer "
                            f"and {len(floats)} float tensor inputs")
    idx = ints[0]
    w = next((a for a in floats if example_value(a).dim() == 2 and example_value(a).shape == example_value(idx).shape), None)
    x = next((a for a in floats if a is not w), None)
    dep = _depends(region, params | {idx, w})
    outputs = [n for n in region if n in dep and n not in checks
               and any(u not in inside and not _updates_state(u, params) for u in n.users)]
    if len(outputs) != 1:
        return None, None, f"the region has {len(outputs)} outputs, not one hidden [T, H]"
    out = outputs[0]
    if w is None or x is None or example_value(x).dim() != 2 or tuple(example_value(out).shape) != tuple(example_value(x).shape):
        return None, None, "the region does not map hidden [T, H] with routing [T, k] to [T, H]"
    sizes = _size_inputs([a for a in ext if a not in tensors], x, idx)
    if sizes is None:
        return None, None, "the region uses sizes other than the number of tokens (and tokens * k)"
    if not cands:
        return None, None, why
    live = {n: live_value(p) for n, p in names.items()}
    sub = extract_region(region, [x, idx, w, *names.values()], out, sizes)
    order = list(names)

    def reference(params64, xx, ii, ww):
        return sub(xx, ii, ww, *[params64[n] for n in order])

    k, E = int(example_value(idx).shape[-1]), cands[0].spec_kw["num_experts"]
    device = next(iter(live.values())).device
    with dynamo.real_tensors():
        probes = {H: _probes(E, k, H, _token_counts(x), device) for H in {c.spec_kw["hidden"] for c in cands}}
    H = int(example_value(x).shape[-1])
    if H not in probes:
        return None, None, "no reading of the expert weights has the hidden size of the region's input"
    match = prove(_with_score_on_input(cands), live, reference, k, pattern, probes=probes[H])
    if not match.ok:
        return None, None, match.reason
    router, _ = describe_router(x, idx, w)
    spec = with_autocast(with_top_k(match.spec, k, router), region_mode(region, x, out))
    if rewrite:
        _replace_region(gm, region, out, x, idx, w, names, match.slots, spec)
    return spec, match.slots, ""


def _fuse_dense(gm, region, names, cands, pattern, rewrite, floats, checks):
    """A region over hidden ``x [T, H]`` and dense scores ``s [T, E]`` (every expert weighted, Llama-4): the fused
    op with ``k = E``, expert ids ``0..E-1`` on every token and the scores as weights, when proven."""
    E = cands[0].spec_kw["num_experts"]
    H = cands[0].spec_kw["hidden"]
    xs = [a for a in floats if example_value(a).dim() == 2 and example_value(a).shape[-1] == H]
    ss = [a for a in floats if a not in xs and example_value(a).dim() == 2 and E in tuple(example_value(a).shape)]
    if len(xs) != 1 or len(ss) != 1:
        return None, None, ("the region's inputs are neither (hidden, expert ids, routing weights) nor (hidden, "
                            "[T, E] scores)")
    x, s = xs[0], ss[0]
    T = example_value(x).shape[0]
    transposed = tuple(example_value(s).shape) != (T, E)  # the scores held as [E, T]
    if transposed and tuple(example_value(s).shape) != (E, T):
        return None, None, "the scores are neither [tokens, experts] nor [experts, tokens]"
    inside, params = set(region), set(names.values())
    dep = _depends(region, params | {s})
    outputs = [n for n in region if n in dep and n not in checks
               and any(u not in inside and not _updates_state(u, params) for u in n.users)]
    if len(outputs) != 1 or tuple(example_value(outputs[0]).shape) != tuple(example_value(x).shape):
        return None, None, "the region does not map hidden [T, H] with scores [T, E] to one [T, H] output"
    out = outputs[0]
    live = {n: live_value(p) for n, p in names.items()}
    sub = extract_region(region, [x, s, *names.values()], out)
    order = list(names)

    def reference(params64, xx, ii, ww):  # ids 0..E-1 in order on every token: the scores are the weights
        return sub(xx, ww.t() if transposed else ww, *[params64[n] for n in order])

    device = next(iter(live.values())).device
    with dynamo.real_tensors():
        probes = []
        for px, _, pw in _probes(E, E, H, _token_counts(x), device):
            pw = pw * (torch.rand(pw.shape, generator=torch.Generator().manual_seed(3)) < 0.6).to(pw)  # some zeros
            probes.append((px, torch.arange(E, device=device).expand(px.shape[0], E), pw))
    match = prove(_with_score_on_input(cands), live, reference, E, pattern, probes=probes)
    if not match.ok:
        return None, None, match.reason
    spec = with_top_k(match.spec, E, RouterSpec(score="sigmoid" if any(is_op(n, "sigmoid") for n in ancestors_of(s))
                                                else "unknown", order="topk->score"))
    spec = with_autocast(spec, region_mode(region, x, out))
    if rewrite:
        with gm.graph.inserting_after(_insert_point(gm, [x, s])):
            n_tok = gm.graph.call_method("size", (x, 0))
        with gm.graph.inserting_after(n_tok):
            ar = gm.graph.call_function(torch.arange, (E,), {"device": device})
        with gm.graph.inserting_after(ar):
            idx = gm.graph.call_method("expand", (ar, n_tok, E))
        w = s
        if transposed:
            with gm.graph.inserting_after(idx):
                w = gm.graph.call_method("t", (s,))
        _replace_region(gm, region, out, x, idx, w, names, match.slots, spec)
    return spec, match.slots, ""


def _parallel_args(names, slots, spec, x, idx, w):
    """``parallel_experts``'s arguments over this rank's experts, after checking the reading is the one
    ``parallelize`` proved (the sharded storage follows it)."""
    key, expected = _parallel_tag(names)
    got = {f: getattr(spec, f) for f in expected["spec"]}
    # a graph traced on no tokens (this rank's batch was empty) proves nothing about the reading: the op computes
    # the other ranks' tokens with the reading parallelize proved, which is the one to hold it to
    vacuous = example_value(x).shape[0] == 0
    if not vacuous and (got != expected["spec"] or {s: list(v) for s, v in slots.items()} != expected["slots"]):
        raise RuntimeError(f"moe_compile: the experts sharded by parallelize ({key}) now read as {got}, {slots}; "
                           f"parallelize proved {expected}")
    local = sorted((_inline_tag(p)[1], p) for p in names.values() if _inline_tag(p)[1] >= 0)
    return (x, idx, w, [p for _, p in local], key)


def _replace_region(gm, region, out, x, idx, w, names, slots, spec):
    inside = set(region)
    if _parallel_tag(names) is not None:
        op, args = parallel_experts_op(), _parallel_args(names, slots, spec, x, idx, w)
        state = state_for(args[-1])  # the sharded op follows what this traced code does under autocast
        state.spec = with_autocast(state.spec, spec.autocast)
    else:
        op, args = EXPERTS, (x, idx, w, *[[names[n] for n in slots[s]] for s in SLOTS], spec.to_json())
    with gm.graph.inserting_after(_insert_point(gm, [out, x, idx, w])):
        fused = gm.graph.call_function(op, args)
    with gm.graph.inserting_after(fused):
        res = gm.graph.call_function(operator.getitem, (fused, 0))
    res.meta.update(out.meta)
    fused.meta["nn_module_stack"] = out.meta.get("nn_module_stack", {})
    for u in list(out.users):
        if u not in inside:
            u.replace_input_with(out, res)
    for n in reversed(region):
        if not n.users:
            gm.graph.erase_node(n)
