"""DDP's and FSDP2's private attributes, ``torch.compile``'s wrapper, functional collectives (see
:mod:`moe_compile.compat`).

Where a wrong guess would change numbers (which DDP forward is running, what FSDP2 divides gradients by), a
missing attribute raises :class:`~moe_compile.compat.CompatError` naming the torch version; nothing here returns a
default in its place.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol  # noqa: F401  (re-exported for parallel.comm)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import CompatError, torch_version

COMPILED_PREFIX = "_orig_mod."
"""What ``torch.compile``'s wrapper module puts before the names of the parameters of the module it wraps."""

all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def wait(t: torch.Tensor) -> torch.Tensor:
    """The value of a functional collective's result (waits for it)."""
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


def _missing(what: str, lost: str) -> CompatError:
    return CompatError(f"moe_compile: torch {torch_version()} has no {what}; {lost}. Use a torch that moe_compile "
                       "supports (pyproject.toml), or report this torch version")


# --------------------------------------------------------------------------------------------- torch.compile
def compiled_inner(model: nn.Module) -> nn.Module | None:
    """The module inside a ``torch.compile`` wrapper module, or None when ``model`` is not one."""
    return getattr(model, "_orig_mod", None)


# --------------------------------------------------------------------------------------------- DDP
IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"
"""Where DDP reads the names it must leave alone (named in error messages)."""


def ddp_ignored_names(root: nn.Module) -> list[str]:
    """The names DDP will leave alone when built around ``root`` (its ignore list)."""
    return list(getattr(root, IGNORE_ATTR, []))


def set_ddp_ignored_names(root: nn.Module, names: list[str]) -> None:
    """Make DDP, when built around ``root`` later, neither broadcast nor all-reduce ``names`` (torch's own
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``)."""
    setter = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if setter is None:
        raise _missing("DistributedDataParallel._set_params_and_buffers_to_ignore_for_model",
                       "DDP cannot be told to leave the sharded experts alone")
    setter(root, names)


def mark_ddp_ignored(p: nn.Parameter) -> None:
    """What DDP's ignore-list setter marks each ignored parameter with (DDPOptimizer reads it)."""
    p._ddp_ignored = True


def is_ddp_ignored(p: torch.Tensor) -> bool:
    return bool(getattr(p, "_ddp_ignored", False))


def active_ddp() -> DistributedDataParallel | None:
    """The DDP module whose forward is running (None outside every DDP forward)."""
    if not hasattr(DistributedDataParallel, "_active_ddp_module"):
        raise _missing("DistributedDataParallel._active_ddp_module",
                       "whether a DDP forward is running (by which the experts' gradients are averaged) is unknown")
    return DistributedDataParallel._active_ddp_module


def ddp_parameters(ddp: DistributedDataParallel) -> list[nn.Parameter]:
    """The parameters ``ddp`` broadcasts and all-reduces."""
    return getattr(ddp, "_module_parameters", None) or list(ddp.parameters())


# --------------------------------------------------------------------------------------------- FSDP2
def fsdp_param_group(module: nn.Module):
    """The parameter group of an FSDP2 module (None when ``fully_shard`` gave it no parameters of its own)."""
    get_state = getattr(module, "_get_fsdp_state", None)
    if get_state is None:
        raise _missing("FSDPModule._get_fsdp_state", "what FSDP2 divides the gradients by cannot be read")
    state = get_state()
    if not hasattr(state, "_fsdp_param_group"):
        raise _missing("FSDPState._fsdp_param_group", "what FSDP2 divides the gradients by cannot be read")
    return state._fsdp_param_group


def fsdp_data_parallel_size(group) -> int:
    """How many ranks FSDP2 reduces a parameter group's gradients over (shard x replicate)."""
    mi = getattr(group, "mesh_info", None)
    if mi is None or not hasattr(mi, "shard_mesh_size"):
        raise _missing("FSDPParamGroup.mesh_info.shard_mesh_size", "over how many ranks FSDP2 reduces is unknown")
    return int(mi.shard_mesh_size) * int(getattr(mi, "replicate_mesh_size", 1))


def fsdp_gradient_divide_factor(group) -> float | None:
    """The factor given to ``FSDPModule.set_gradient_divide_factor`` (None: FSDP2's default, the data-parallel
    size)."""
    if not hasattr(group, "gradient_divide_factor"):
        raise _missing("FSDPParamGroup.gradient_divide_factor", "what FSDP2 divides the gradients by is unknown")
    return group.gradient_divide_factor


# --------------------------------------------------------------------------------------------- tensors
def clear_grad(p: torch.Tensor) -> None:
    """``p.grad = None`` by the tensor's own slot, also for a parameter class whose ``grad`` property raises."""
    torch._C.TensorBase.grad.__set__(p, None)
