"""FX passes over Dynamo (torch-level) graphs: find MoE regions, replace recognised ones with the fused op.

``fuse_moe(gm) -> list[Region]`` rewrites ``gm`` in place and returns what it found. Each pass is small:
- ``experts_call`` nodes (captured experts modules) -> ``moe_compile::experts`` when ``detect`` recognises the
  module; the router upstream is described (``describe_router``) but stays in the graph, where inductor fuses it;
- ``topk`` nodes whose results reach no experts op are reported as MoE-like regions that were not fused.
Never runs ``eliminate_dead_code`` (it deletes in-place ``call_method`` nodes of Dynamo graphs).
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import capture
from ..spec import MoESpec, RouterSpec
from .detect import SLOTS, recognise_module, with_top_k

EXPERTS_CALL = torch.ops.moe_compile.experts_call.default
EXPERTS = torch.ops.moe_compile.experts.default
DISPATCH_COMBINE = torch.ops.moe_compile.dispatch_combine.default


@dataclass
class Region:
    module_path: str  # relative to the module Dynamo traced (a frame's ``self``)
    pattern: str
    fused: bool
    reason: str = ""
    spec: MoESpec | None = None
    module: "weakref.ref | None" = field(default=None, repr=False, compare=False)  # the captured module, if one
    weights: tuple = field(default=(), repr=False, compare=False)  # weakrefs to the experts' live parameters


def weight_refs(placeholders) -> tuple:
    """Weak references to the live parameters behind Dynamo's parameter placeholders (for ``Region.weights``)."""
    out = []
    for p in placeholders:
        ex = getattr(p.meta.get("grapharg"), "example", None) if isinstance(p, fx.Node) else None
        if isinstance(ex, torch.nn.Parameter):
            out.append(weakref.ref(ex))
    return tuple(out)


# --------------------------------------------------------------------------------------------- helpers
def _is(node: fx.Node, *names: str) -> bool:
    """Does ``node`` call one of the ops ``names`` in any of Dynamo's spellings (function, method, aten)?"""
    if node.op == "call_method":
        return node.target in names
    if node.op != "call_function":
        return False
    t = node.target
    tname = getattr(t, "__name__", "") or ""
    if isinstance(t, torch._ops.OpOverload):
        tname = t._schema.name.split("::")[-1]
    return tname in names


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    for prefix in ("L['self'].", "L['self']"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path or "<top>"


def _ancestors(node: fx.Node, stop: set | None = None) -> list[fx.Node]:
    """Every node ``node`` depends on, not looking past the nodes in ``stop``."""
    stop = stop or set()
    seen, todo, out = set(stop), [node], []
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                out.append(a)
                todo.append(a)
    return out


def describe_router(x: fx.Node, idx: fx.Node, w: fx.Node) -> tuple[RouterSpec, int | None]:
    """Read the router's kind from the nodes between the hidden states ``x`` and the routing weights (reports)."""
    upstream = set(_ancestors(x)) | {x} if isinstance(x, fx.Node) else set()
    anc = _ancestors(w, upstream) + [w]
    topk = next((n for n in anc if _is(n, "topk")), None)
    k = None
    if topk is not None:
        k_arg = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
        k = k_arg if isinstance(k_arg, int) else None
    before = set(_ancestors(topk, upstream)) if topk is not None else set()
    soft = next((n for n in anc if _is(n, "softmax", "_softmax")), None)
    sig = next((n for n in anc if _is(n, "sigmoid")), None)
    score_node = soft or sig
    score = "softmax" if soft else "sigmoid" if sig else "unknown"
    order = "unknown"
    if score_node is not None and topk is not None:
        order = "score->topk" if score_node in before else "topk->score"
    renorm = any(_is(n, "div", "truediv", "div_", "itruediv") for n in anc) if topk is not None else None
    group = sum(1 for n in anc if _is(n, "topk")) > 1
    bias = any(_is(n, "add", "add_") for n in before) and sig is not None
    return RouterSpec(score=score, order=order, renormalize=renorm, bias_correction=bias, group_limited=group), k


# --------------------------------------------------------------------------------------------- passes
def _replace(gm: fx.GraphModule, node: fx.Node, op, args, index: int | None) -> None:
    """Replace ``node`` by ``op(*args)`` (or its output ``index``), keeping the node's metadata."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, args)
        out = new if index is None else gm.graph.call_function(operator.getitem, (new, index))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def fuse_experts_calls(gm: fx.GraphModule, rewrite: bool = True) -> list[Region]:
    regions = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not EXPERTS_CALL:
            continue
        x, idx, w, params, key = node.args
        module = capture.module_for(key)
        path = module_path(node)
        val = idx.meta.get("example_value") if isinstance(idx, fx.Node) else None
        k = int(val.shape[-1]) if val is not None and isinstance(val.shape[-1], int) else 2
        router, _ = describe_router(x, idx, w)
        match = recognise_module(module, k)
        if not match.ok:
            xv = x.meta.get("example_value") if isinstance(x, fx.Node) else None
            hidden = int(xv.shape[-1]) if xv is not None and isinstance(xv.shape[-1], int) else None
            around = recognise_module(module, k, hidden) if hidden else match
            if around.ok:
                if rewrite:
                    _replace(gm, node, DISPATCH_COMBINE, (x, idx, w, params, key), index=None)
                regions.append(Region(path, around.pattern, True, f"expert bodies run as your code: {match.reason}",
                                      with_top_k(around.spec, k, router), weakref.ref(module)))
            else:
                regions.append(Region(path, match.pattern or type(module).__name__, False, match.reason,
                                      module=weakref.ref(module)))
            continue
        spec = with_top_k(match.spec, k, router)
        by_name = dict(zip([n for n, _ in module.named_parameters()], params))
        lists = [[by_name[n] for n in match.slots[s]] for s in SLOTS]
        if rewrite:
            _replace(gm, node, EXPERTS, (x, idx, w, *lists, spec.to_json()), index=0)
        regions.append(Region(path, f"{match.pattern}, {spec.activation}, router {router.score}", True, "", spec,
                              weakref.ref(module)))
    return regions


def _experts_ops() -> tuple:
    parallel = getattr(torch.ops.moe_compile, "parallel_experts", None)  # registered by moe_compile.parallel
    slots = torch.ops.moe_compile.experts_slots.default
    from .blocks import BLOCK_CALL, fused_block  # captured non-experts-module blocks (moe_compile.capture_blocks)

    return (EXPERTS_CALL, EXPERTS, DISPATCH_COMBINE, slots, BLOCK_CALL, fused_block) + (
        (parallel.default,) if parallel is not None else ())


def report_unfused_topk(gm: fx.GraphModule, fused: list[Region] = ()) -> list[Region]:
    """Top-k routers whose results reach no experts op and lie in no fused region: MoE-like regions left alone."""
    fused_paths = [r.module_path for r in fused if r.fused]
    regions = []
    for node in gm.graph.nodes:
        if not _is(node, "topk"):
            continue
        path = module_path(node)
        if any(p == path or p.startswith(path + ".") or path.startswith(p + ".") for p in fused_paths):
            continue
        todo, seen, reaches = [node], {node}, False
        while todo and not reaches:
            n = todo.pop()
            for u in n.users:
                if u.op == "call_function" and u.target in _experts_ops():
                    reaches = True
                    break
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        if reaches:
            continue
        # a top-k feeding scatter/index/one_hot dispatch looks like a router
        dispatchy = any(_is(n, "index_add_", "index_add", "scatter_add_", "one_hot", "where", "nonzero", "einsum")
                        for n in seen)
        if dispatchy:
            regions.append(Region(
                module_path(node), "top-k router with inline dispatch", False,
                "experts are computed inline (no experts module the backend can capture); mark the experts module "
                "with @moe_compile.experts or use an nn.ModuleList of MLPs inside it",
            ))
    return regions


def fuse_moe(gm: fx.GraphModule, rewrite: bool = True) -> list[Region]:
    from .gshard import fuse_slot_experts
    from .inline import fuse_inline_experts

    from .blocks import fuse_block_calls
    from .normalise import inline_identity_functions

    inline_identity_functions(gm)  # value- and gradient-preserving, so also when only reporting
    regions = fuse_block_calls(gm, rewrite)
    regions += fuse_experts_calls(gm, rewrite)
    regions += fuse_slot_experts(gm, rewrite)
    regions += fuse_inline_experts(gm, rewrite, skip=[r.module_path for r in regions])
    regions += report_unfused_topk(gm, regions)
    if rewrite:
        gm.graph.lint()
        gm.recompile()
    return regions
