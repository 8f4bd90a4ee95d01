"""What an FSDP2 (``torch.distributed.fsdp.fully_shard``) model divides its gradients by, for the experts op.

FSDP2 reduce-scatters (and, with a replicate dimension, all-reduces) each dense gradient and divides the sum over
the ranks by its *gradient divide factor*: by default the data-parallel size of its mesh (shard x replicate), or
the factor given to ``FSDPModule.set_gradient_divide_factor``. The experts op (``state.ParallelState``) sums each
expert gradient over the ranks itself and divides by the same factor, read here from the innermost FSDP module
that holds the experts module, so a step equals the single-process step on the global batch exactly as under
DDP. Only torch's own objects are read (through ``compat.distributed``, which raises where one is not as
expected); nothing here imports the rest of the package but ``layout`` and ``compat``.
"""
from __future__ import annotations

import weakref

from torch import nn

from ..compat import distributed as torch_dist
from .layout import ParallelError


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


def fsdp_modules_in(model: nn.Module) -> list[str]:
    """Paths of the modules of ``model`` that ``fully_shard`` was applied to ("" for ``model`` itself)."""
    cls = _fsdp_module_class()
    return [] if cls is None else [p for p, m in model.named_modules() if isinstance(m, cls)]


def _chain(root: nn.Module, path: str) -> list[nn.Module]:
    """``root`` and every module on the way to ``path`` (``path``'s module last)."""
    out, m = [root], root
    for part in path.split(".") if path else []:
        m = getattr(m, part)
        out.append(m)
    return out


def set_model(state, root: nn.Module, path: str) -> None:
    """Remember where ``state``'s experts module lives (``parallelize`` calls this once per sharded module)."""
    state._fsdp_root = weakref.ref(root)
    state._fsdp_path = path


def _holders(state) -> tuple[list[nn.Module], list[nn.Module]]:
    """(the FSDP2 modules holding ``state``'s experts module, outermost first; the chain root -> module)."""
    cls = _fsdp_module_class()
    ref = getattr(state, "_fsdp_root", None)
    root = ref() if ref is not None else None
    if cls is None or root is None:
        return [], []
    try:
        chain = _chain(root, state._fsdp_path)
    except AttributeError:  # the model was restructured after parallelize: no FSDP module can be found
        return [], []
    return [m for m in chain if isinstance(m, cls)], chain


def held_by_fsdp(state) -> bool:
    """Whether an FSDP2 module holds ``state``'s experts module."""
    return bool(_holders(state)[0])


def grad_divisor(state) -> float | None:
    """The gradient divide factor of the innermost FSDP2 module holding ``state``'s experts module (its own
    parameter group's, else the next one out), or None when no FSDP2 module holds it. Raises
    ``ParallelError`` when FSDP2 manages the expert parameters themselves, or reduces over another number of
    ranks than the experts' mesh holds."""
    holders, chain = _holders(state)
    if not holders:
        return None
    experts = chain[-1]
    for n in state.local_names:
        p = experts.get_parameter(n)
        if not getattr(p, "_moe_expert", False) or type(p).__name__ == "DTensor" or hasattr(p, "_local_tensor"):
            raise ParallelError(
                f"moe_compile.parallel ({state.path}): fully_shard manages the sharded expert parameter {n} (FSDP2 "
                "would shard it again and average every rank's different experts together). Fix: pass "
                "ignored_params=moe_compile.fsdp_ignored_params(model) to every fully_shard call (the blocks and "
                "the model)")
    for m in reversed(holders):
        group = torch_dist.fsdp_param_group(m)
        if group is None:  # fully_shard on a module without parameters of its own: the next one out decides
            continue
        size = torch_dist.fsdp_data_parallel_size(group)
        if size != state.W * state.DP:
            raise ParallelError(
                f"moe_compile.parallel ({state.path}): FSDP2 reduces the dense gradients over {size} ranks, but the "
                f"experts are sharded over {state.W} ranks with {state.DP} replica(s) each. Fix: fully_shard over "
                "every rank that trains on its own data (the default mesh, or parallelize's 2D mesh), and pass "
                "parallelize(model, mesh=...) (or group= with dp_group=) covering the same ranks")
        factor = torch_dist.fsdp_gradient_divide_factor(group)
        return float(size) if factor is None else float(factor)
    return None
