"""Top-k routers whose results reach no experts op and lie in no fused region: reported as MoE-like regions that
were left alone (nothing is rewritten)."""
from __future__ import annotations

import torch.fx as fx

from .graph import Region, experts_ops, is_op, module_path


def report_unfused_topk(gm: fx.GraphModule, fused: list[Region] = ()) -> list[Region]:
    """Top-k routers whose results reach no experts op and lie in no fused region: MoE-like regions left alone."""
    fused_paths = [r.module_path for r in fused if r.fused]
    regions = []
    for node in gm.graph.nodes:
        if not is_op(node, "topk"):
            continue
        path = module_path(node)
        if any(p == path or p.startswith(path + ".") or path.startswith(p + ".") for p in fused_paths):
            continue
        todo, seen, reaches = [node], {node}, False
        while todo and not reaches:
            n = todo.pop()
            for u in n.users:
                if u.op == "call_function" and u.target in experts_ops():
                    reaches = True
                    break
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        if reaches:
            continue
        # a top-k feeding scatter/index/one_hot dispatch looks like a router
        dispatchy = any(is_op(n, "index_add_", "index_add", "scatter_add_", "one_hot", "where", "nonzero", "einsum")
                        for n in seen)
        if dispatchy:
            regions.append(Region(
                module_path(node), "top-k router with inline dispatch", False,
                "experts are computed inline (no experts module the backend can capture); mark the experts module "
                "with @moe_compile.experts or use an nn.ModuleList of MLPs inside it",
            ))
    return regions
