"""The router's description for reports (``RouterSpec``): read from the nodes between the hidden states and the
routing weights. The router itself stays in the graph, where inductor fuses it."""
from __future__ import annotations

import torch.fx as fx

from ..spec import RouterSpec
from .graph import ancestors_of, is_op


def describe_router(x: fx.Node, idx: fx.Node, w: fx.Node) -> tuple[RouterSpec, int | None]:
    """Read the router's kind from the nodes between the hidden states ``x`` and the routing weights (reports)."""
    upstream = set(ancestors_of(x)) | {x} if isinstance(x, fx.Node) else set()
    anc = ancestors_of(w, upstream) + [w]
    topk = next((n for n in anc if is_op(n, "topk")), None)
    k = None
    if topk is not None:
        k_arg = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
        k = k_arg if isinstance(k_arg, int) else None
    before = set(ancestors_of(topk, upstream)) if topk is not None else set()
    soft = next((n for n in anc if is_op(n, "softmax", "_softmax")), None)
    sig = next((n for n in anc if is_op(n, "sigmoid")), None)
    score_node = soft or sig
    score = "softmax" if soft else "sigmoid" if sig else "unknown"
    order = "unknown"
    if score_node is not None and topk is not None:
        order = "score->topk" if score_node in before else "topk->score"
    renorm = any(is_op(n, "div", "truediv", "div_", "itruediv") for n in anc) if topk is not None else None
    group = sum(1 for n in anc if is_op(n, "topk")) > 1
    bias = any(is_op(n, "add", "add_") for n in before) and sig is not None
    return RouterSpec(score=score, order=order, renormalize=renorm, bias_correction=bias, group_limited=group), k
