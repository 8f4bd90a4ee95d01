"""Normalising passes: rewrite spellings the matchers need not know into plain ops, changing no value or gradient.

``inline_identity_functions(gm)``: an ``autograd.Function`` whose forward and backward are both a copy of their one
tensor (DeepSpeed's all-to-all around the experts on a single rank, where it exchanges nothing) traces as
``higher_order.autograd_function_apply(fwd_body, bwd_body, x)``. It is replaced by ``x.clone()``: the same value, the
same (identity) gradient, no aliasing with ``x``. Functions that do anything else (a real collective, a
straight-through estimator whose backward is not the forward's derivative) are left alone.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..compat import dynamo

_QUIET = dynamo.GRAD_MODE_TARGETS
_COPIES = ("clone", "contiguous")


def _copy_of_input(body: fx.GraphModule) -> bool:
    """Does ``body`` take one tensor and return it, or a copy of it (nested in tuples), computing nothing else?"""
    nodes = list(body.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    same = {inputs[0]}
    for n in nodes:
        if n.op in ("placeholder", "output"):
            continue
        if n.op == "call_function" and n.target in _QUIET:
            continue
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if name in _COPIES and n.args and n.args[0] in same and len(n.args) == 1 and not n.kwargs:
            same.add(n)
            continue
        return False
    out = nodes[-1].args[0]
    while isinstance(out, (tuple, list)) and out and isinstance(out[0], (tuple, list, fx.Node)):
        rest = [o for o in out[1:] if o not in ((), [])]
        if rest:
            return False
        out = out[0]
    return isinstance(out, fx.Node) and out in same


def inline_identity_functions(gm: fx.GraphModule) -> int:
    """Replace identity ``autograd.Function`` calls by a copy of their input; returns how many."""
    apply = getattr(torch.ops.higher_order, "autograd_function_apply", None)
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or apply is None or node.target is not apply or len(node.args) != 3:
            continue
        fwd, bwd, x = node.args
        if any(v not in (None, [], (), False) for v in node.kwargs.values()):
            continue  # non-differentiable or dirty outputs, saved tensors: not a plain copy
        if not all(isinstance(b, fx.Node) and b.op == "get_attr" for b in (fwd, bwd)) or not isinstance(x, fx.Node):
            continue
        if not (_copy_of_input(getattr(gm, fwd.target)) and _copy_of_input(getattr(gm, bwd.target))):
            continue
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue
        with gm.graph.inserting_before(node):
            copy = gm.graph.call_method("clone", (x,))
        copy.meta.update({k: v for k, v in users[0].meta.items()} if users else {})
        for u in users:
            u.replace_all_uses_with(copy)
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
        for b in (fwd, bwd):
            if not b.users:
                gm.graph.erase_node(b)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
