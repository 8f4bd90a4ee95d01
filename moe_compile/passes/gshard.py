"""GShard / fairseq / DeepSpeed-MoE style layers: one-hot dispatch and combine tensors over capacity slots.

The layer computes ``y = experts(dispatch^T x)`` and ``out = combine y`` over ``[S, E, C]`` dispatch/combine tensors,
whatever router built them (a Top1Gate/Top2Gate module, argmax or topk, a capacity factor, dropped tokens, an aux
loss). Both products may be written as einsums (``"sec,sm->ecm"`` / ``"sec,ecm->sm"`` in any letters) or as
matrix products on the flattened mask (``dispatch.reshape(S, E*C).t() @ x`` / ``combine.reshape(S, E*C) @
y.reshape(E*C, H)``). The region from the dispatch product to the combine product is cut out of the graph
(with the layout ops on the two masks and what the expert weights alone compute, e.g. ``b.unsqueeze(1)``), its
experts (an ``nn.ModuleList`` of MLPs applied per chunk, or stacked ``[E, ., .]`` weights under ``bmm``) read and
proven against the region itself in float64 on routings that respect the capacity (at the traced sizes, and at
other sizes when the graph is dynamic), and replaced by ``moe_compile::experts_slots``, which runs only the occupied
slots and computes the dense formula itself if the tensors ever hold more than one token per slot. Stacked biases
stored as ``[E, 1, N]`` (for ``baddbmm``) reach the op squeezed to ``[E, N]``. Sizes the region reads from outside
(``reshape(S, E * C)``) must be sizes of dispatch, x or combine; the reference recomputes them from its inputs.

Several such layers in one graph are each fused: a dispatch product is paired with the first combine product its
experts feed, and the search stops there (the next layer's products belong to the next layer).
"""
from __future__ import annotations

import dataclasses
import operator

import sympy
import torch
import torch.fx as fx

from .autocast import region_mode, with_autocast
from ..recognise.experts import SLOTS, layer_candidates, prove, random_routing, stacked_candidates
from .graph import (EXPERTS_SLOTS, Region, ancestors_of, example_value, expert_lists, extract_region, live_value,
                    module_path, weight_refs)

_LAYOUT_OPS = ("reshape", "view", "t", "transpose", "permute", "flatten", "contiguous")
_LAYOUT_FUNCTIONS = (torch.reshape, torch.t, torch.transpose, torch.permute, torch.flatten)
_MATMULS = (torch.mm, torch.matmul, operator.matmul)


# --------------------------------------------------------------------------------------------- sizes
def _expr(d):
    return sympy.Integer(d) if isinstance(d, int) else d.node.expr


def _same(a, b) -> bool:
    """Are two sizes (ints or SymInts) equal for every value of the shape symbols? (No guard is added.)"""
    try:
        return sympy.expand(_expr(a) - _expr(b)) == 0
    except Exception:  # noqa: BLE001 - a size sympy cannot compare is not the same size
        return False


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _agree(a, b) -> bool:
    """Equal for every value of the shape symbols, or equal now where the tensors came from other frames with
    symbols of their own (``moe_compile::experts_slots`` checks at run time that they agree)."""
    return _same(a, b) or (not isinstance(a, int) or not isinstance(b, int)) and _hint(a) == _hint(b)


def _agree_shape(a, b) -> bool:
    return len(a) == len(b) and all(_agree(x, y) for x, y in zip(a, b))


def _hint(d) -> int:
    return d if isinstance(d, int) else int(d.node.hint)


# --------------------------------------------------------------------------------------------- the two products
@dataclasses.dataclass
class _Site:
    """A dispatch or combine product: its node, the ``[S, E, C]`` mask it reads, its other operand (x or y) and
    the layout ops between the mask and the node."""

    node: fx.Node
    slots: fx.Node
    other: fx.Node
    prefix: list


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


def _matmul_operands(node: fx.Node):
    if node.op == "call_function" and node.target in _MATMULS and len(node.args) == 2 and not node.kwargs:
        return node.args
    if node.op == "call_method" and node.target in ("mm", "matmul", "__matmul__") and len(node.args) == 2:
        return node.args
    return None


def _is_layout(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_method" and node.target in _LAYOUT_OPS) or (
        node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS)


def _layout_chain(node):
    """(the nearest 3D tensor ``node`` is a pure re-layout of, the layout ops in between) or (None, [])."""
    chain = []
    while _is_layout(node):
        v = example_value(node)
        if isinstance(v, torch.Tensor) and v.dim() == 3:
            break
        chain.append(node)
        node = node.args[0] if node.args else None
    v = example_value(node)
    if not chain or not isinstance(v, torch.Tensor) or v.dim() != 3:
        return None, []
    return node, chain[::-1]


def _dims(node):
    v = example_value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dispatch_site(node: fx.Node) -> _Site | None:
    """``einsum("sec,sm->ecm", dispatch, x)`` or ``(dispatch.reshape(S, E*C).t() @ x)`` (any layout ops)."""
    dx = _dispatch_operands(node)
    if dx is not None:
        return _Site(node, dx[0], dx[1], [])
    ab = _matmul_operands(node)
    if ab is None:
        return None
    mask, chain = _layout_chain(ab[0])
    m, x, out = _dims(mask) if mask is not None else None, _dims(ab[1]), _dims(node)
    if m is None or x is None or out is None or len(x) != 2 or len(out) != 2:
        return None
    S, E, C = m
    if _same(x[0], S) and _same_shape(_dims(ab[0]), (E * C, S)) and _same_shape(out, (E * C, x[1])):
        return _Site(node, mask, ab[1], chain)
    return None


def combine_site(node: fx.Node) -> _Site | None:
    """``einsum("sec,ecm->sm", combine, y)`` or ``combine.reshape(S, E*C) @ y.reshape(E*C, H)``."""
    cy = _combine_operands(node)
    if cy is not None:
        return _Site(node, cy[0], cy[1], [])
    ab = _matmul_operands(node)
    if ab is None:
        return None
    mask, chain = _layout_chain(ab[0])
    m, y, out = _dims(mask) if mask is not None else None, _dims(ab[1]), _dims(node)
    if m is None or y is None or out is None or len(y) != 2 or len(out) != 2:
        return None
    S, E, C = m
    if _same_shape(_dims(ab[0]), (S, E * C)) and _same(y[0], E * C) and _same_shape(out, (S, y[1])):
        return _Site(node, mask, ab[1], chain)
    return None


# --------------------------------------------------------------------------------------------- the region
def _pairs(gm: fx.GraphModule):
    """[(dispatch site, combine site, nodes the dispatch feeds before that combine)], one per layer, in graph order.

    A product whose other operand is fed by an open dispatch (one not yet combined) is that dispatch's combine;
    otherwise it may open a dispatch. This tells the two apart when the sizes make both readings possible
    (S == E * C), and stops the search from one layer at the next layer's dispatch."""
    open_, sites, combine_of = {}, {}, {}
    for n in gm.graph.nodes:
        ins = set().union(*(open_.get(a, set()) for a in n.all_input_nodes)) if n.all_input_nodes else set()
        cs = combine_site(n)
        if cs is not None and open_.get(cs.other):
            if len(open_[cs.other]) == 1:  # one layer's experts (two dispatches into one combine: left alone)
                combine_of.setdefault(next(iter(open_[cs.other])), cs)
            open_[n] = ins - open_[cs.other]
            continue
        ds = dispatch_site(n)
        if ds is not None:
            sites[n] = ds
            ins = ins | {n}
        open_[n] = ins
    out = []
    for d, ds in sites.items():
        cs = combine_of.get(d)
        if cs is not None:
            out.append((ds, cs, {n for n, o in open_.items() if d in o} | {cs.node}))
    return out


def _is_param(node: fx.Node) -> bool:
    return isinstance(live_value(node), torch.nn.Parameter)


def _weights_only(node: fx.Node) -> bool:
    """Does ``node`` compute from parameters (and sizes) alone, e.g. ``self.b1.unsqueeze(1)``?"""
    if node.op not in ("call_function", "call_method") or not isinstance(example_value(node), torch.Tensor):
        return False
    ancestors = ancestors_of(node)
    if not any(_is_param(a) for a in ancestors):
        return False
    for a in ancestors:
        if a.op == "placeholder" and not _is_param(a) and isinstance(example_value(a), torch.Tensor):
            return False
        if a.op not in ("placeholder", "call_function", "call_method"):
            return False
    return True


def _external(nodes: list, inside: set) -> list:
    ext = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in ext:
                ext.append(a)
    return ext


def _cut(gm, ds: _Site, cs: _Site, down: set):
    """(region nodes in graph order, the nodes between the products, external inputs)."""
    between = (set(ancestors_of(cs.other)) | {cs.other}) & down
    inside = between | {cs.node} | set(ds.prefix) | set(cs.prefix)
    while True:  # pull in what the expert weights alone compute
        more = {a for a in _external(list(inside), inside) if _weights_only(a)}
        if not more:
            break
        inside |= more
    region = [n for n in gm.graph.nodes if n in inside]
    return region, between, _external(region, inside)


def _size_reader(node: fx.Node, tensors: list):
    """A function of the region's tensor inputs giving the size ``node`` holds, for every value of the shape
    symbols (a dimension of one of them, or a product of two), or None."""
    v = example_value(node)
    if isinstance(v, int) and not isinstance(v, bool):
        return lambda ts, v=v: v  # a traced constant (static graph)
    if not isinstance(v, torch.SymInt):
        return None
    dims = [(i, j, d) for i, t in enumerate(tensors) for j, d in enumerate(example_value(t).shape)]
    for i, j, d in dims:
        if _same(v, d):
            return lambda ts, i=i, j=j: ts[i].shape[j]
    for a, (i, j, d) in enumerate(dims):
        for k, l, e in dims[a:]:
            if _same(v, d * e):
                return lambda ts, i=i, j=j, k=k, l=l: ts[i].shape[j] * ts[k].shape[l]
    return None


# --------------------------------------------------------------------------------------------- proof
def _slot_probes(S: int, E: int, C: int, H: int, device):
    """float64 (x, idx, w) routings of S tokens that fit C slots per expert (later choices dropped first, as GShard
    does), and the matching (dispatch, combine)."""
    probes = []
    for seed, k in ((0, min(2, E)), (1, 1)):
        x, idx, w = random_routing(E, k, H, device, seed=seed)
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


def _probe_sizes(dshape) -> dict[int, int]:
    """{S: C} to probe: the traced sizes, and, where S or C is symbolic (a dynamic graph), other ones too."""
    S, _, C = dshape
    sizes = {_hint(S): _hint(C)}
    if not (isinstance(S, int) and isinstance(C, int)):
        S2 = _hint(S) + 3 if not isinstance(S, int) else _hint(S)
        C2 = S2 if _same(S, C) else (_hint(C) + 1 if not isinstance(C, int) else _hint(C))
        sizes[S2] = C2
    return sizes


def _param_groups(params: list[fx.Node], gm: fx.GraphModule):
    """The experts' parameters as layer lists (ModuleList) or a name->tensor dict of stacked weights."""
    live = {p.name: live_value(p) for p in params}
    if any(t.dim() == 3 for t in live.values()):
        return "stacked", live, {p.name: p for p in params}
    for _, experts in expert_lists(gm).items():
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


def _check_inputs(ds: _Site, cs: _Site, ext: list):
    """(parameters, size inputs with their readers) or a reason the region's inputs are not the layer's."""
    params = [a for a in ext if _is_param(a)]
    tensors = [a for a in ext if a not in params and isinstance(example_value(a), torch.Tensor)]
    rest = [a for a in ext if a not in params and a not in tensors]
    data = [ds.slots, ds.other, cs.slots]
    if len(set(data)) != 3 or set(tensors) != set(data):
        return f"the experts between dispatch and combine read more than (dispatch, x, combine, parameters): " \
               f"{[a.name for a in tensors if a not in data]}"
    dv, xv, cv = (example_value(n) for n in data)
    if xv.dim() != 2 or dv.dim() != 3 or not _agree_shape(dv.shape, cv.shape) or not _agree(xv.shape[0], dv.shape[0]):
        return "dispatch/combine are not [tokens, experts, capacity] and x is not [tokens, hidden]"
    if dv.requires_grad:
        return "the dispatch tensor requires grad (only the combine weights may)"
    if not dv.dtype.is_floating_point:
        return "the dispatch tensor is not floating point"
    if not isinstance(dv.shape[1], int) or not isinstance(xv.shape[1], int):
        return "the number of experts and the hidden size must be static"
    sizes = []
    for a in rest:
        read = _size_reader(a, data)
        if read is None:
            return f"the experts read {a.name}, which is not a size of dispatch, x or combine"
        sizes.append((a, read))
    return params, sizes


def _row_biases(live: dict) -> set:
    """Names of ``[E, 1, N]`` biases (added to ``bmm`` outputs by broadcasting) next to 2-3 stacked weights."""
    rows = {n for n, t in live.items() if t.dim() == 3 and t.shape[1] == 1}
    weights = [t for n, t in live.items() if n not in rows and t.dim() == 3 and min(t.shape[1:]) > 1]
    return rows if rows and 2 <= len(weights) <= 3 else set()


def _candidates(params, gm):
    """(candidate readings, name -> placeholder, name -> live tensor as the candidates read it, names of row
    biases read as ``[E, N]``, reason when there is no candidate)."""
    kind, structure, by_name = _param_groups(params, gm)
    if kind is None:
        why = "the experts' parameters are neither stacked [E, ., .] nor one nn.ModuleList of MLPs"
        return None, None, None, set(), why
    live = {n: live_value(p) for n, p in by_name.items()}
    rows = _row_biases(live) if kind == "stacked" else set()
    live = {n: t.detach()[:, 0] if n in rows else t for n, t in live.items()}
    cands, why = stacked_candidates(object(), live) if kind == "stacked" else layer_candidates(structure, live)
    return cands, by_name, live, rows, why


def _operand_lists(gm, by_name, slots, rows, before):
    """The fused op's tensor lists; row biases squeezed to ``[E, N]`` (their gradient flows back through it)."""
    views = {}
    for n in rows:
        with gm.graph.inserting_before(before):
            views[n] = gm.graph.call_function(torch.squeeze, (by_name[n], 1))
    return [[views.get(n, by_name[n]) for n in slots[s]] for s in SLOTS]


def _rewrite(gm, ds: _Site, cs: _Site, region, lists, spec) -> None:
    with gm.graph.inserting_after(cs.node):
        fused = gm.graph.call_function(EXPERTS_SLOTS, (ds.other, ds.slots, cs.slots, *lists, spec.to_json()))
    with gm.graph.inserting_after(fused):
        out = gm.graph.call_function(operator.getitem, (fused, 0))
    out.meta.update(cs.node.meta)
    fused.meta["nn_module_stack"] = cs.node.meta.get("nn_module_stack", {})
    cs.node.replace_all_uses_with(out)
    for n in reversed(region):  # layout ops and weight views that something else still reads stay
        if not n.users:
            gm.graph.erase_node(n)


def _fuse_one(gm, ds: _Site, cs: _Site, down: set, rewrite: bool) -> Region:
    """Prove and (``rewrite``) fuse the layer from dispatch product ``ds`` to combine product ``cs``."""
    form = "einsums" if _equation(ds.node) else "matmuls"
    pattern = f"GShard dispatch/combine {form} over capacity slots"
    where = module_path(ds.node)
    region, between, ext = _cut(gm, ds, cs, down)
    checked = _check_inputs(ds, cs, ext)
    if isinstance(checked, str):
        return Region(where, pattern, False, checked)
    params, sizes = checked
    if any(u not in region for n in between if n is not cs.node for u in n.users):
        return Region(where, pattern, False, "values computed between dispatch and combine are used elsewhere")
    cands, by_name, live, rows, why = _candidates(params, gm)
    if not cands:
        return Region(where, pattern, False, why)
    dv, xv = example_value(ds.slots), example_value(ds.other)
    E, H = dv.shape[1], xv.shape[1]
    names = list(by_name)
    sub = extract_region(region, [ds.slots, ds.other, cs.slots, *[a for a, _ in sizes], *by_name.values()], cs.node)
    caps = _probe_sizes(tuple(dv.shape))

    def reference(params64, xx, ii, ww):
        d, c = topk_to_slots(ii, ww, E, caps[xx.shape[0]])
        ps = [params64[n].unsqueeze(1) if n in rows else params64[n] for n in names]
        return sub(d, xx, c, *[read((d, xx, c)) for _, read in sizes], *ps)

    device = next(iter(live.values())).device
    probes = [p for S, C in caps.items() for p in _slot_probes(S, E, C, H, device)]
    match = prove(cands, live, reference, E, pattern, probes=probes)
    if not match.ok:
        return Region(where, pattern, False, match.reason)
    spec = with_autocast(dataclasses.replace(match.spec, top_k=E, dispatch="slots"),
                         region_mode(region, ds.other, cs.node))
    if rewrite:
        _rewrite(gm, ds, cs, region, _operand_lists(gm, by_name, match.slots, rows, cs.node), spec)
    return Region(where, f"{pattern}, {spec.activation}", True, "", spec, weights=weight_refs(by_name.values()))


def fuse_slot_experts(gm: fx.GraphModule, rewrite: bool = True) -> list[Region]:
    return [_fuse_one(gm, ds, cs, down, rewrite) for ds, cs, down in _pairs(gm)]
