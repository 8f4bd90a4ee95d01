"""MoE blocks found by structure arrive fused (``capture_found`` traced their proven fused form): report them."""
from __future__ import annotations

import torch.fx as fx

from ..spec import MoESpec
from .graph import EXPERTS, Region, module_path, weight_refs

FOUND = "MoE block found by structure"


def report_found_blocks(gm: fx.GraphModule, rewrite: bool = True) -> list[Region]:
    """One fused region per ``moe_compile::experts`` call whose spec says it came from a block found by
    structure (nothing to rewrite)."""
    regions = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not EXPERTS:
            continue
        spec = MoESpec.from_json(node.args[-1])
        if not spec.pattern.startswith(FOUND):
            continue
        weights = [t for lst in node.args[3:9] for t in lst]
        regions.append(Region(module_path(node), spec.pattern, True, "", spec, weights=weight_refs(weights)))
    return regions
