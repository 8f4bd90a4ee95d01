"""Hand-written experts that Dynamo traced inline (no decorator, no HF module): find the region, prove, fuse.

A user's MoE layer with an ``nn.ModuleList`` of expert MLPs, dispatched with ``torch.where``/``nonzero``/indexing and
combined with ``index_add_``/``scatter_add_``, traces (with ``capture_dynamic_output_shape_ops``) into an unrolled
loop. ``fuse_inline_experts(gm)``:

1. groups the parameter placeholders of each ModuleList by expert and layer (from their Dynamo source names);
2. takes the region: the nodes of the module that holds the list, minus the router (the top-k, what it depends on,
   and what is computed from the top-k values alone, such as renormalisation), minus trailing reshapes;
3. requires the region's inputs to be exactly hidden ``[T, H]``, expert ids ``[T, k]`` (integer), routing weights
   ``[T, k]`` and the experts' parameters, and its output one ``[T, H]`` tensor;
4. runs the region itself, extracted as a graph, in float64 as the reference for ``detect.prove``;
5. replaces the region with ``moe_compile::experts`` when the proof holds; otherwise leaves it and says why.
"""
from __future__ import annotations

import operator
import re
from collections import defaultdict

import torch
import torch.fx as fx

from .detect import SLOTS, _stacked_candidates, layer_candidates, prove, with_top_k
from .rewrite import EXPERTS, Region, _experts_ops, _ancestors, _clean_path, _is, describe_router

_MODULES = re.compile(r"\._modules\['([^']+)'\]")
_PARAM = re.compile(r"^(.*)\._parameters\['([^']+)'\]$")
_SHAPE_OPS = ("reshape", "view", "view_as", "contiguous")


def _param_path(node: fx.Node):
    ga = node.meta.get("grapharg")
    if node.op != "placeholder" or ga is None:
        return None
    m = _PARAM.match(_MODULES.sub(r".\1", ga.source.name))
    return (m.group(1), m.group(2)) if m else None  # ("L['self'].moe.experts.0.w1", "weight")


def _expert_lists(gm: fx.GraphModule):
    """{list path: {expert index: {layer path: {"weight"|"bias": placeholder}}}} for ModuleLists of experts."""
    lists = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for node in gm.graph.nodes:
        pp = _param_path(node)
        if pp is None:
            continue
        mod, pname = pp
        # every numeric component may be the list's index (model.layers.0.mlp.experts.3.w1 -> two candidates)
        for m in re.finditer(r"\.(\d+)(?=\.|$)", mod):
            lists[mod[: m.start()]][int(m.group(1))][mod[m.end() + 1:]][pname] = node
    return {k: v for k, v in lists.items() if sorted(v) == list(range(len(v))) and _looks_like_experts(v)}


def _looks_like_experts(experts) -> bool:
    """Every element is 2 or 3 linear layers (2D weight, optional 1D bias) with the same names (decoder-layer
    lists and the like are not experts, and are not reported)."""
    names = {tuple(sorted(e)) for e in experts.values()}
    if len(names) != 1 or len(next(iter(names))) not in (2, 3):
        return False
    for e in experts.values():
        for ps in e.values():
            w, b = ps.get("weight"), ps.get("bias")
            if w is None or set(ps) - {"weight", "bias"} or _value_of(w).dim() != 2:
                return False
            if b is not None and _value_of(b).dim() != 1:
                return False
    return True


def _value_of(placeholder: fx.Node) -> torch.Tensor:
    return placeholder.meta["grapharg"].example


def _paths(node: fx.Node) -> list[str]:
    return [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _value(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _region(gm: fx.GraphModule, parent: str, list_path: str):
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and parent in _paths(n)]
    topks = [n for n in nodes if _is(n, "topk")]
    router: set[fx.Node] = set()
    from_topk: set[fx.Node] = set()
    for t in topks:
        router |= set(_ancestors(t)) | {t} | set(t.users)
        from_topk |= {t} | set(t.users)
    # what the top-k values alone feed (renormalisation, scaling) is router too
    for n in nodes:
        if n in router or (list_path and list_path in " ".join(_paths(n))):
            continue
        ins = n.all_input_nodes
        if _is(n, "unsqueeze", "view", "reshape", "expand", "getitem", "__getitem__", "index_select"):
            continue  # reshaping the routing weights for the combine belongs to the experts' region
        if (ins and all(a in router for a in ins) and any(a in from_topk for a in ins)
                and not any(isinstance(_value(a), torch.Tensor) and not _value(a).is_floating_point() for a in ins)):
            router.add(n)
            from_topk.add(n)
    region = [n for n in nodes if n not in router]
    inside = set(region)
    # size arithmetic on tensors from outside (x.shape for a final reshape) is not the experts' work
    for n in region:
        if not isinstance(_value(n), torch.Tensor) and not any(a in inside for a in n.all_input_nodes):
            inside.discard(n)
    region = [n for n in region if n in inside]
    # trailing shape ops stay outside: the fused op returns [T, H]
    while region:
        last = [n for n in region if any(u not in inside for u in n.users)]
        if len(last) == 1 and _is(last[0], *_SHAPE_OPS) and last[0].all_input_nodes[0] in inside:
            inside.discard(last[0])
            region.remove(last[0])
        else:
            break
    return region


def _extract(region: list[fx.Node], inputs: list[fx.Node], output: fx.Node) -> fx.GraphModule:
    g = fx.Graph()
    env = {n: g.placeholder(f"in{i}") for i, n in enumerate(inputs)}
    for n in region:
        if n.op == "call_function" and n.target is torch.ops.aten._assert_scalar.default:
            continue  # shape bounds of the traced sizes; the probes use other sizes
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[output])
    return fx.GraphModule(torch.nn.Module(), g)


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
    live = {n: p.meta["grapharg"].example for n, p in names.items()}
    cands, why = layer_candidates(layers, live)
    return names, cands, why


def _stacked_groups(gm: fx.GraphModule):
    """{module path: {param name: placeholder}} for modules owning stacked [E, ., .] expert weights."""
    groups = defaultdict(dict)
    for node in gm.graph.nodes:
        pp = _param_path(node)
        if pp is not None:
            groups[pp[0]][pp[1]] = node
    return {m: ps for m, ps in groups.items() if any(_value_of(p).dim() == 3 for p in ps.values())}


def _groups(gm: fx.GraphModule):
    """(parent module path, path of the experts' own nodes, pattern, names -> placeholder, candidates, why)."""
    for list_path, experts in _expert_lists(gm).items():
        names, cands, why = _list_group(experts)
        yield list_path.rsplit(".", 1)[0], list_path, f"inline nn.ModuleList of {len(experts)} experts", names, cands, why
    for owner, ps in _stacked_groups(gm).items():
        live = {n: _value_of(p) for n, p in ps.items()}
        cands, why = _stacked_candidates(object(), live)
        yield owner, None, "inline stacked [E, ., .] expert weights gathered per token", ps, cands, why


def fuse_inline_experts(gm: fx.GraphModule, rewrite: bool = True, skip=()) -> list[Region]:
    """``skip``: module paths other passes already matched."""
    regions = []
    for parent, list_path, pattern, names, cands, why in _groups(gm):
        if _clean_path(parent) in skip:
            continue
        region = _region(gm, parent, list_path)
        if not region or any(n.op == "call_function" and n.target in _experts_ops() for n in region):
            continue  # nothing there, or experts already captured as one node
        inside = set(region)
        outputs = [n for n in region if any(u not in inside for u in n.users)]
        params = set(names.values())
        ext = []
        for n in region:
            for a in n.all_input_nodes:
                if a not in inside and a not in params and a not in ext:
                    ext.append(a)
        where = _clean_path(parent)

        def reject(reason):
            regions.append(Region(where, pattern, False, reason))

        tensors = [a for a in ext if isinstance(_value(a), torch.Tensor)]
        if len(outputs) != 1 or len(tensors) != 3 or len(ext) != 3:
            reject(f"the region's inputs and outputs are not (hidden, expert ids, routing weights) -> hidden: "
                   f"{len(ext)} inputs, {len(outputs)} outputs")
            continue
        ints = [a for a in tensors if not _value(a).is_floating_point()]
        floats = [a for a in tensors if _value(a).is_floating_point()]
        if len(ints) != 1 or len(floats) != 2:
            reject("expected one integer input (expert ids) and two float inputs (hidden, routing weights)")
            continue
        idx = ints[0]
        w = next((a for a in floats if _value(a).dim() == 2 and _value(a).shape == _value(idx).shape), None)
        x = next((a for a in floats if a is not w), None)
        out = outputs[0]
        if w is None or x is None or _value(x).dim() != 2 or tuple(_value(out).shape) != tuple(_value(x).shape):
            reject("the region does not map hidden [T, H] with routing [T, k] to [T, H]")
            continue
        if not cands:
            reject(why)
            continue
        live = {n: p.meta["grapharg"].example for n, p in names.items()}
        sub = _extract(region, [x, idx, w, *names.values()], out)
        order = list(names)

        def reference(params64, xx, ii, ww, sub=sub, order=order):
            return sub(xx, ii, ww, *[params64[n] for n in order])

        k = int(_value(idx).shape[-1])
        match = prove(cands, live, reference, k, pattern)
        if not match.ok:
            reject(match.reason)
            continue
        router, _ = describe_router(x, idx, w)
        spec = with_top_k(match.spec, match.spec.top_k, router)
        if rewrite:
            last = region[-1]
            with gm.graph.inserting_after(last):
                fused = gm.graph.call_function(
                    EXPERTS, (x, idx, w, *[[names[n] for n in match.slots[s]] for s in SLOTS], spec.to_json()))
            with gm.graph.inserting_after(fused):
                res = gm.graph.call_function(operator.getitem, (fused, 0))
            res.meta.update(out.meta)
            fused.meta["nn_module_stack"] = out.meta.get("nn_module_stack", {})
            for u in list(out.users):
                if u not in inside:
                    u.replace_input_with(out, res)
            for n in reversed(region):
                gm.graph.erase_node(n)
        regions.append(Region(where, f"{pattern}, {spec.activation}, router {router.score}", True, "", spec))
    return regions
