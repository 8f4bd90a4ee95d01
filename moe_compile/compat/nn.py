"""``torch.nn`` internals: what decides whether a module may be captured (see :mod:`moe_compile.compat`)."""
from __future__ import annotations

import torch

from . import CompatError, torch_version

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
_DROPOUT = getattr(torch.nn.modules.dropout, "_DropoutNd", None)
if _DROPOUT is None:  # every dropout class torch ships derives from it; without it, name them
    _DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def dropouts(module: torch.nn.Module) -> list[str]:
    """Paths of the dropout modules with ``p > 0`` in ``module``."""
    return [n for n, m in module.named_modules() if isinstance(m, _DROPOUT) and m.p > 0]


def hooked(module: torch.nn.Module) -> list[str]:
    """Paths of the modules in ``module`` with forward, forward-pre or backward hooks of their own."""
    return [n or "<module>" for n, m in module.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]


def check() -> None:
    """Raise unless ``nn.Module`` keeps its hooks where :func:`hooked` looks (checked once, on import)."""
    missing = [a for a in _HOOK_DICTS if not hasattr(torch.nn.Linear(1, 1), a)]
    if missing:
        raise CompatError(f"moe_compile: torch {torch_version()} nn.Module has no {missing}: whether a module has "
                          "hooks (which a captured call would not run) cannot be told")


check()
