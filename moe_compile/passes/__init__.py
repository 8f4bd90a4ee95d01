"""The passes, in the order the backend runs them: each a function over a Dynamo GraphModule that rewrites it in
place (``rewrite=True``) or only reports (``rewrite=False``, for ``explain``), returning the regions it found.

1. ``normalise.inline_identity_functions``: value- and gradient-preserving spellings made plain (always runs);
   ``found.report_found_blocks``: blocks found by structure, traced fused already (``capture_found``), reported;
2. ``blocks.fuse_block_calls``: HF MoE blocks captured whole (``capture_blocks``);
3. ``experts_calls.report_prefused_calls``: experts calls already fused by the model's forward (parallelized
   experts modules), reported as they are; ``experts_calls.fuse_experts_calls``: captured experts modules;
4. ``gshard.fuse_slot_experts``: dispatch/combine tensors over capacity slots;
5. ``inline.fuse_inline_experts``: experts traced inline (ModuleList loops, stacked weights, sorted dispatch);
6. ``unfused.report_unfused_topk``: routers left unfused, reported.
"""
from __future__ import annotations

import torch.fx as fx

from ..compat import dynamo, turn_off

from .blocks import fuse_block_calls
from .found import report_found_blocks
from .experts_calls import fuse_experts_calls, report_prefused_calls
from .graph import Region
from .gshard import fuse_slot_experts
from .inline import fuse_inline_experts
from .normalise import inline_identity_functions
from .unfused import report_unfused_topk

__all__ = ["PIPELINE", "Region", "fuse_moe"]

PIPELINE = (report_found_blocks, fuse_block_calls, report_prefused_calls, fuse_experts_calls, fuse_slot_experts, fuse_inline_experts)


def fuse_moe(gm: fx.GraphModule, rewrite: bool = True) -> list[Region]:
    """Run every pass over ``gm``; returns what each found. A graph whose placeholders do not carry what the passes
    read (``compat.dynamo.check_graph_args``) turns the passes over code traced inline off, loudly; captured calls
    are still fused."""
    why = dynamo.check_graph_args(gm)
    if why:
        turn_off("fusion of MoE code traced inline", f"{why}; only captured experts modules and blocks are fused")
    inline_identity_functions(gm)
    regions: list[Region] = []
    for fuse in PIPELINE:
        if fuse in (fuse_slot_experts, fuse_inline_experts) and why:
            continue
        if fuse is fuse_inline_experts:
            regions += fuse(gm, rewrite, skip=[r.module_path for r in regions])
        else:
            regions += fuse(gm, rewrite)
    regions += report_unfused_topk(gm, regions)
    if rewrite:
        gm.graph.lint()
        gm.recompile()
    return regions
