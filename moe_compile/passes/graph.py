"""What every pass shares: the report row (:class:`Region`), the fused ops' targets, and helpers over Dynamo
(torch-level) FX graphs: op matching in all of Dynamo's spellings, module paths, parameter placeholders, the
extraction of a region as a graph of its own (the float64 proof's reference).

Never run ``eliminate_dead_code`` on Dynamo graphs (it deletes in-place ``call_method`` nodes).
"""
from __future__ import annotations

import operator
import re
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import capture
from ..compat import dynamo
from ..spec import MoESpec

EXPERTS_CALL = torch.ops.moe_compile.experts_call.default
BLOCK_CALL = torch.ops.moe_compile.block_call.default
EXPERTS = torch.ops.moe_compile.experts.default
DISPATCH_COMBINE = torch.ops.moe_compile.dispatch_combine.default
EXPERTS_SLOTS = torch.ops.moe_compile.experts_slots.default
FUSED_TARGETS: list = [EXPERTS_CALL, EXPERTS, DISPATCH_COMBINE, EXPERTS_SLOTS]
"""Call targets that hold experts already (captured or fused); modules that add one register it here."""
PREFUSED: dict = {}
"""Fused experts ops that reach the backend already in the graph, put there by the model's own forward (the
``moe_compile::parallel_experts`` call of a parallelized experts module): ``target -> describe(key)``, returning
``(pattern, MoESpec)`` for the node's key (its 5th argument). Registered by the package that owns the op; the
passes report such nodes as fused and leave them as they are."""


def parallel_experts_op():
    """``moe_compile::parallel_experts`` (registered by ``moe_compile.parallel``), or None before it is."""
    parallel = getattr(torch.ops.moe_compile, "parallel_experts", None)
    return parallel.default if parallel is not None else None


def experts_ops() -> tuple:
    parallel = parallel_experts_op()
    return tuple(FUSED_TARGETS) + ((parallel,) if parallel is not None else ())


@dataclass
class Region:
    module_path: str  # relative to the module Dynamo traced (a frame's ``self``)
    pattern: str
    fused: bool
    reason: str = ""
    spec: MoESpec | None = None
    module: "weakref.ref | None" = field(default=None, repr=False, compare=False)  # the captured module, if one
    weights: tuple = field(default=(), repr=False, compare=False)  # weakrefs to the experts' live parameters
    slots: dict = field(default_factory=dict, repr=False, compare=False)  # op slot -> the weights' names (inline)


def weight_refs(placeholders) -> tuple:
    """Weak references to the live parameters behind Dynamo's parameter placeholders (for ``Region.weights``)."""
    out = []
    for p in placeholders:
        ex = dynamo.live_value(p)
        if isinstance(ex, torch.nn.Parameter):
            out.append(weakref.ref(ex))
    return tuple(out)



# --------------------------------------------------------------------------------------------- helpers
def captured_calls(gm: fx.GraphModule, target):
    """``(node, args, module)`` for every call of a keyed capture op ``target`` (``args`` = its ``(x, a, b,
    params, key)``, ``module`` the live module behind ``key``), in graph order, safe to rewrite while iterating."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is target:
            yield node, node.args, capture.module_for(node.args[4])


def is_op(node: fx.Node, *names: str) -> bool:
    """Does ``node`` call one of the ops ``names`` in any of Dynamo's spellings (function, method, aten)?"""
    if node.op == "call_method":
        return node.target in names
    if node.op != "call_function":
        return False
    return dynamo.op_name(node.target) in names


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    path = list(stack.values())[-1][0]
    return clean_path(path)


def clean_path(path: str) -> str:
    return dynamo.strip_root(path)


def ancestors_of(node: fx.Node, stop: set | None = None) -> list[fx.Node]:
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


def param_path(node: fx.Node):
    """``(module path, parameter name)`` of a parameter placeholder (the path as Dynamo names it, from the frame's
    root: ``compat.dynamo.param_source``), or None."""
    return dynamo.param_source(node)


def expert_lists(gm: fx.GraphModule):
    """{list path: {expert index: {layer path: {"weight"|"bias": placeholder}}}} for ModuleLists of experts."""
    lists = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for node in gm.graph.nodes:
        pp = param_path(node)
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
            if w is None or set(ps) - {"weight", "bias"} or live_value(w).dim() != 2:
                return False
            if b is not None and live_value(b).dim() != 1:
                return False
    return True


def live_value(placeholder: fx.Node) -> torch.Tensor:
    return dynamo.live_value(placeholder)


def stack_paths(node: fx.Node) -> list[str]:
    return [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]


def example_value(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


_CHECKS = ("_assert_scalar", "_check", "_check_is_size", "sym_constrain_range", "sym_constrain_range_for_size",
           "_assert_async")


def size_checks(region: list[fx.Node]) -> set[fx.Node]:
    """Dynamo's runtime assertions on traced sizes and the size arithmetic that only they use: not the experts'
    work (erased with the region, left out of the reference, which runs at other sizes)."""
    checks = {n for n in region if is_op(n, *_CHECKS)}
    for n in reversed(region):
        if n not in checks and n.users and not isinstance(example_value(n), torch.Tensor) and all(u in checks for u in n.users):
            checks.add(n)
    return checks


def _grouped_mm_any(a, b, offs=None, bias=None, out_dtype=None):
    """``torch._grouped_mm`` for the reference: float64 (which it refuses) runs as one matmul per group."""
    if a.dtype != torch.float64 or offs is None or bias is not None or a.dim() != 2 or b.dim() != 3:
        return torch._grouped_mm(a, b, offs=offs, bias=bias, out_dtype=out_dtype)
    ends = offs.tolist()
    parts = [a[s:e] @ b[g] for g, (s, e) in enumerate(zip([0] + ends[:-1], ends))]
    return torch.cat(parts) if parts else a.new_zeros(0, b.shape[-1])


def _identity_cast(n: fx.Node, work: torch.dtype) -> bool:
    """A float cast that is exact (to the same or a wider float type) or back to the block's working dtype
    ``work`` (rounding the fused op does in that dtype too): an identity in the float64 reference."""
    if not is_op(n, "to", "float", "type", "type_as", "half", "bfloat16", "double"):
        return False
    src, out = example_value(n.args[0]) if n.args else None, example_value(n)
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.device == out.device
            and src.is_floating_point() and out.is_floating_point()):
        return False
    a, b = torch.finfo(src.dtype), torch.finfo(out.dtype)
    return out.dtype in (src.dtype, work) or (b.bits >= a.bits and b.eps <= a.eps and b.max >= a.max)


def extract_region(region: list[fx.Node], inputs: list[fx.Node], output: fx.Node, sizes=None) -> fx.GraphModule:
    """The region as a graph over ``inputs``; ``sizes`` maps external size nodes to ``(input position, dim,
    factor)``: ``inputs[pos].size(dim) * factor`` at run time."""
    g = fx.Graph()
    env = {n: g.placeholder(f"in{i}") for i, n in enumerate(inputs)}
    for node, (pos, dim, factor) in (sizes or {}).items():
        env[node] = g.call_method("size", (env[inputs[pos]], dim))
        if factor != 1:
            env[node] = g.call_function(operator.mul, (env[node], factor))
    checks = size_checks(region)
    for n in region:
        if n in checks:
            continue
        if _identity_cast(n, example_value(inputs[0]).dtype):
            env[n] = env[n.args[0]]
        elif n.op == "call_function" and n.target is torch._grouped_mm:
            env[n] = g.call_function(_grouped_mm_any, tuple(fx.map_arg(n.args, lambda a: env[a])),
                                     dict(fx.map_arg(n.kwargs, lambda a: env[a])))
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[output])
    return fx.GraphModule(torch.nn.Module(), g)


