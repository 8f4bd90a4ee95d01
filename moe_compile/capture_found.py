"""Capture of MoE blocks found by structure (any class): the proven fused form is traced instead of the block's code.

Before Dynamo traces a frame for the ``moe`` backend (``scope.on_moe_frame``), the modules the frame can reach are
scanned (``recognise.structure.find_blocks``) for modules that hold a router ``[E, H]`` and E experts and are not
taken whole by a finer capture (HF experts modules, ``@moe_compile.experts``, HF blocks: ``capture``,
``capture_blocks``). Each such module is registered under a key and its class's ``forward`` gets a wrapper that,
only while a moe frame is traced and only for a registered instance called as ``block(x)``, asks for a proof
(``recognise.block_proof.prove_block``, run once at trace time, its answer a constant of the graph):

- proven: Dynamo traces :func:`recognise.readings.fused_block` instead of the block's code: the router in plain
  torch, the experts as one ``moe_compile::experts`` op, the shared children as they are, the counts buffer updated
  as the block updates it. Data-dependent dispatch inside the block (``.tolist()`` loops, ``bincount`` splits) no
  longer matters: it is never traced;
- not proven: the block's own code is traced as before (the inline and GShard passes may still fuse it), and explain
  gives the failed step.

In eager mode, under any other backend, and for instances that were never registered, the wrapper calls the
original ``forward``: nothing changes.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
from torch import Tensor

from . import capture, scope
from .recognise.block_proof import prove_block
from .recognise.readings import fused_block
from .recognise.structure import BlockStructure, find_blocks

_STRUCTURE: "weakref.WeakKeyDictionary[torch.nn.Module, BlockStructure]" = weakref.WeakKeyDictionary()
ENABLED = False
"""Off by default for now: on, it takes blocks whole that ``parallelize`` and the GShard / inline passes expect to see
traced inline (their tests fail with it on). ``moe_compile.capture_found.ENABLED = True`` turns it on (opt-in)."""


def finer(module: torch.nn.Module) -> bool:
    """Is ``module`` taken whole by another capture (an experts module, a decorated one, an HF block)?"""
    return capture.is_captured_class(module) or bool(getattr(type(module), "_moe_compile_block", None))


def register_roots(roots) -> None:
    """Find the blocks inside the modules among ``roots``, patch their classes and register them (idempotent)."""
    if not ENABLED:
        return
    seen = set()
    for obj in roots:
        for root in capture.modules_in(obj):
            if id(root) in seen:
                continue
            seen.add(id(root))
            for s in find_blocks(root, finer):
                block = root.get_submodule(s.path)
                _STRUCTURE[block] = dataclasses.replace(s, path="")
                _patch(type(block))
                capture.module_key(block)


@torch.compiler.assume_constant_result
def _proven(key: str, rank: int) -> tuple:
    """The proven reading of the registered block ``key`` called on rank-``rank`` inputs, as the plain values
    ``fused_block`` takes (``()`` if none; the reason then goes to explain). Runs once at trace time; its answer
    is a constant of the graph."""
    block = capture.module_for(key)
    s = _STRUCTURE.get(block)
    if s is None:
        return ()
    match = prove_block(block, s, rank)
    if not match.ok:
        capture.record_skip(type(block).__qualname__, f"found by structure ({s.describe()}), not fused: "
                            f"{match.reason}; its own code is traced as it is")
        return ()
    return match.reading.as_args()


def _traced(block: torch.nn.Module, reading: tuple, x: Tensor) -> Tensor:
    """What Dynamo traces for a proven block: ``fused_block`` with the block's own tensors and shared children."""
    tensors = dict(block.named_parameters())
    tensors.update(dict(block.named_buffers()))
    return fused_block(x, tensors, block.get_submodule, *reading)


def _patch(cls) -> None:
    if cls.__dict__.get("_moe_compile_found"):
        return
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if (ENABLED and capture.ENABLED and torch.compiler.is_compiling() and scope.active()
                and type(self).forward is forward and len(args) == 1 and not kwargs
                and isinstance(args[0], Tensor) and args[0].is_floating_point()):
            key = capture.traced_key(self)
            if key:
                reading = _proven(key, args[0].dim())
                if reading:
                    return _traced(self, reading, args[0])
        return original(self, *args, **kwargs)

    cls.forward = forward
    cls._moe_compile_found = True
    cls._moe_compile_original_forward = original

