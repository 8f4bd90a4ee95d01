"""Which parameters are experts (the tags DDP and the checkpoint helpers read), and finding the parallelized
modules inside torch.compile / DistributedDataParallel wrappers."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from .layout import ParallelError
from .state import SLOTS, ParallelState

class ExpertParameter(nn.Parameter):
    """The class ``parallelize`` gives the parameters of experts modules (plain ``nn.Parameter`` ones): an
    ``nn.Parameter`` whose ``copy.deepcopy`` keeps the tags in its ``__dict__`` (``nn.Parameter.__deepcopy__``
    drops them). Nothing else differs; ``torch.save`` stores it as a plain ``nn.Parameter`` with its tags."""

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = super().__deepcopy__(memo)
        result.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return result


def is_expert_param(p: torch.Tensor) -> bool:
    """True for the parameters of experts modules that ``parallelize`` found (sharded or not)."""
    return bool(getattr(p, "_moe_expert", False))


def unwrap_for_parallelize(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: parallelize the module inside
    if isinstance(model, DistributedDataParallel):
        raise ParallelError(
            "moe_compile.parallelize got a model already wrapped in DistributedDataParallel, which has broadcast "
            "and hooked every parameter, experts included. Fix: call moe_compile.parallelize(model) before "
            "DistributedDataParallel(model) (and torch.compile after both)")
    return model


def tag(p: nn.Parameter, path: str, sharded: bool, key: str | None = None, slot: str | None = None) -> None:
    """Tag an experts module's parameter; ``key`` / ``slot``: the sharded module's ``ParallelState`` key and the
    parameter's slot in it (``state.SLOTS``), by which ``clip.grad_norm`` counts each shard once when it is given
    parameters rather than the model."""
    if type(p) is nn.Parameter:  # a subclass the user chose is left as it is (tags kept, but lost by deepcopy)
        p.__class__ = ExpertParameter
    p._moe_expert = True
    p._moe_expert_module = path
    if sharded:  # what DistributedDataParallel._set_params_and_buffers_to_ignore_for_model sets (DDPOptimizer reads it)
        p._ddp_ignored = True
    if key is not None:
        p._moe_parallel_key = key
        p._moe_slot = slot


def _retag_after_load(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post hook of an experts module: ``load_state_dict(..., assign=True)`` replaces the
    parameters with new ones; tag those again."""
    tag_module(module, module._moe_expert_path, module._moe_expert_sharded)


def expert_slots(module: nn.Module) -> dict[int, tuple[ParallelState, str]]:
    """id(parameter) -> (its ``ParallelState``, its slot in ``state.SLOTS``) for a sharded experts module whose
    state is installed (empty for any other module)."""
    st = getattr(module, "_moe_parallel", None)
    if st is None:
        return {}
    names = iter(st.local_names)
    return {id(module.get_parameter(next(names))): (st, slot) for slot, n in zip(SLOTS, st.slot_counts)
            for _ in range(n)}


def tag_module(module: nn.Module, path: str, sharded: bool) -> None:
    module._moe_expert_path = path
    module._moe_expert_sharded = sharded
    slots = expert_slots(module)
    for p in module.parameters():
        st, slot = slots.get(id(p), (None, None))
        tag(p, path, sharded, st.key if st is not None else None, slot)
    if not getattr(module, "_moe_retag_hook", False):
        module.register_load_state_dict_post_hook(_retag_after_load)
        module._moe_retag_hook = True


def parallel_states(model: nn.Module) -> list[ParallelState]:
    out, seen = [], set()
    for m in model.modules():
        st = getattr(m, "_moe_parallel", None)
        if st is not None and id(st) not in seen:
            seen.add(id(st))
            out.append(st)
    return out


def device_of(states: list[ParallelState]) -> torch.device:
    backend = dist.get_backend(states[0].world.group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def parallel_modules(model: nn.Module):
    return [(p, m) for p, m in model.named_modules() if getattr(m, "_moe_parallel", None) is not None]


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside torch.compile / DistributedDataParallel wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner
