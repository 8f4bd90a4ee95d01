"""Captured experts modules (``moe_compile::experts_call`` nodes) -> ``moe_compile::experts`` when the module is
recognised (``recognise.experts.recognise_module``), or ``moe_compile::dispatch_combine`` around expert bodies of the user's own
code; the router upstream is described (``describe_router``) but stays in the graph. Experts calls that arrive
fused (``graph.PREFUSED``: a parallelized experts module's ``moe_compile::parallel_experts``) are reported as they
are."""
from __future__ import annotations

import operator
import weakref

import torch.fx as fx

from ..capture import run_own_code
from .autocast import module_mode, with_autocast
from ..recognise.experts import SLOTS, recognise_module, with_top_k
from .graph import DISPATCH_COMBINE, EXPERTS, EXPERTS_CALL, PREFUSED, Region, captured_calls, module_path, weight_refs
from .router import describe_router


def _replace(gm: fx.GraphModule, node: fx.Node, op, args, index: int | None) -> None:
    """Replace ``node`` by ``op(*args)`` (or its output ``index``), keeping the node's metadata."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, args)
        out = new if index is None else gm.graph.call_function(operator.getitem, (new, index))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _top_k(idx) -> int:
    val = idx.meta.get("example_value") if isinstance(idx, fx.Node) else None
    return int(val.shape[-1]) if val is not None and isinstance(val.shape[-1], int) else 2


def report_prefused_calls(gm: fx.GraphModule, rewrite: bool = True) -> list[Region]:
    """One fused region per call of a ``graph.PREFUSED`` op (the model's forward put it there: nothing to rewrite),
    described by the op's owner (a parallelized experts module: its parallel mode and storage)."""
    regions = []
    for node in gm.graph.nodes:
        describe = PREFUSED.get(node.target) if node.op == "call_function" else None
        if describe is None:
            continue
        x, idx, w, params, key = node.args[:5]
        router, _ = describe_router(x, idx, w)
        pattern, spec = describe(key)
        regions.append(Region(module_path(node), f"{pattern}, router {router.score}", True, "",
                              with_top_k(spec, _top_k(idx), router), weights=weight_refs(params)))
    return regions


def fuse_experts_calls(gm: fx.GraphModule, rewrite: bool = True) -> list[Region]:
    regions = []
    for node, (x, idx, w, params, key), module in captured_calls(gm, EXPERTS_CALL):
        path = module_path(node)
        k = _top_k(idx)
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
        own_code = lambda *a, m=module: run_own_code(m, dict(m.named_parameters()), a)  # noqa: E731
        spec = with_autocast(spec, module_mode(x, spec, own_code))
        by_name = dict(zip([n for n, _ in module.named_parameters()], params))
        lists = [[by_name[n] for n in match.slots[s]] for s in SLOTS]
        if rewrite:
            _replace(gm, node, EXPERTS, (x, idx, w, *lists, spec.to_json()), index=0)
        regions.append(Region(path, f"{match.pattern}, {spec.activation}, router {router.score}", True, "", spec,
                              weakref.ref(module)))
    return regions
