"""The ``moe`` torch.compile backend.

``torch.compile(model, backend="moe", options={...})`` hands each Dynamo graph to :func:`moe_backend`, which fuses
the MoE blocks it recognises (``passes.fuse_moe``) and passes the graph on to the compiler named by
``options["compiler"]``: ``"inductor"`` (default), ``"aot_eager"`` or ``"eager"`` (debugging).
"""
from __future__ import annotations

import torch

from .compat import dynamo
from .passes import Region, fuse_moe

COMPILERS = ("inductor", "aot_eager", "eager")
OPTIONS = {"compiler": "inductor"}
"""Defaults for options; ``torch.compile(..., options={"compiler": "eager"})`` overrides them per call."""

last_regions: list[Region] = []
"""What the most recent graph handed to the backend contained (for tests and debugging)."""


def _check_options(options: dict | None) -> dict:
    opts = dict(OPTIONS)
    for key, value in (options or {}).items():
        if key not in OPTIONS:
            raise ValueError(f"moe backend: unknown option {key!r}; known options: {sorted(OPTIONS)}")
        opts[key] = value
    if opts["compiler"] not in COMPILERS:
        raise ValueError(f"moe backend: options['compiler'] must be one of {COMPILERS}, got {opts['compiler']!r}")
    return opts


def moe_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None):
    """Fuse MoE blocks in ``gm``, then compile the graph with the chosen compiler."""
    opts = _check_options(options)
    regions = fuse_moe(gm)
    last_regions[:] = regions
    if opts["compiler"] == "eager":
        return gm.forward
    if opts["compiler"] == "aot_eager":
        return dynamo.aot_eager(gm, example_inputs)
    return dynamo.inductor(gm, example_inputs)


moe_backend.moe_compile_backend = True  # how moe_compile.scope recognises the backend behind Dynamo's wrappers
