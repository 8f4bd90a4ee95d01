"""Which parameters are experts (the tags DDP and the checkpoint helpers read), and finding the parallelized
modules inside torch.compile / DistributedDataParallel wrappers."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from ..compat import distributed as torch_dist
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


class ReplacedParameter(nn.Parameter):
    """The class ``parallelize`` gives each unsharded expert parameter it replaces by this rank's shard. The
    model no longer holds it and it never gets a gradient, so whatever still holds it was built before
    ``parallelize`` (an optimizer, most likely: it would silently never update the experts). Reading its ``.grad``
    (as ``optimizer.zero_grad()`` and ``optimizer.step()`` do, before they change anything) raises, naming the fix;
    setting it to ``None`` is allowed."""

    @property
    def grad(self):
        raise ParallelError(
            f"moe_compile.parallelize replaced the expert parameter {self._moe_replaced_name} "
            f"{tuple(self.shape)} by this rank's shard, but something still uses the old one (an optimizer built "
            "before parallelize? it would never update the experts). Fix: build the optimizer after "
            "moe_compile.parallelize(model), on model.parameters()")

    @grad.setter
    def grad(self, value):
        if value is not None:
            self.grad  # noqa: B018 - raises, naming the problem
        torch_dist.clear_grad(self)


def mark_replaced(p: nn.Parameter, name: str) -> None:
    """Mark ``p`` as replaced by a shard (``_moe_replaced``, read by the DDP check); a plain or expert parameter
    also becomes a :class:`ReplacedParameter`, whose use by an optimizer raises."""
    p._moe_replaced = True
    p._moe_replaced_name = name
    torch_dist.clear_grad(p)  # a gradient from before parallelize: of the unsharded weights
    if type(p) in (nn.Parameter, ExpertParameter):  # a subclass the user chose is left as it is
        p.__class__ = ReplacedParameter


def is_expert_param(p: torch.Tensor) -> bool:
    """True for the parameters of experts modules that ``parallelize`` found (sharded or not)."""
    return bool(getattr(p, "_moe_expert", False))


def ddp_ignore_names(names: list[str]) -> list[str]:
    """DDP's ignore list for expert parameter ``names``: each name as it is, and as it reads through a
    ``torch.compile`` wrapper (``compat.distributed.COMPILED_PREFIX`` + name), so that a DDP built around the
    compiled model (``DistributedDataParallel(torch.compile(model))``) leaves the experts alone too."""
    out = list(dict.fromkeys(names))
    pre = torch_dist.COMPILED_PREFIX
    return out + [f"{pre}{n}" for n in out if not n.startswith(pre) and f"{pre}{n}" not in out]


def unwrap_for_parallelize(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    model = torch_dist.compiled_inner(model) or model  # a torch.compile'd model: parallelize the module inside
    inner = vars(model).get("_modules", {}).get("module") if isinstance(model, DistributedDataParallel) else None
    if inner is not None and parallel_states(inner):
        raise ParallelError(
            "moe_compile.parallelize: the model inside this DistributedDataParallel is already parallelized "
            "(parallelize runs once per model; change the mode with moe_compile.set_parallel(model, mode))")
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
        torch_dist.mark_ddp_ignored(p)
    if key is not None:
        p._moe_parallel_key = key
        p._moe_slot = slot


def _retag_after_load(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post hook of an experts module: ``load_state_dict(..., assign=True)`` replaces the
    parameters with new ones; tag those again."""
    tag_module(module, module._moe_expert_path, module._moe_expert_sharded)
    inline = getattr(module, "_moe_inline_tags", {})
    for n, p in module.named_parameters():
        if n in inline:
            p._moe_inline = inline[n]
    remote = getattr(module, "_moe_remote_names", ())
    if remote:  # placeholders are never loaded: not missing
        prefix = getattr(module, "_moe_load_prefix", "")
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                             if not (k.startswith(prefix) and k[len(prefix):] in remote)]


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


def _drop_remote(module, state_dict, prefix, local_metadata) -> None:
    for n in module._moe_remote_names:
        state_dict.pop(prefix + n, None)


def _skip_remote(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    module._moe_load_prefix = prefix
    for n in module._moe_remote_names:
        state_dict.pop(prefix + n, None)


def tag_inline_list(module: nn.Module, tags: dict[str, tuple], remote: list[str]) -> None:
    """The ModuleList of a block that dispatches inline, sharded in place: ``tags`` (parameter name -> ``(key, op
    index or -1, expected reading)``) tell the backend's inline pass which parameters are this rank's experts and
    which are placeholders (``remote``). Placeholders are left out of ``state_dict()`` and never loaded, so
    ``load_state_dict`` of a whole (unparallelized) state dict keeps this rank's part, and a saved per-rank state
    dict does not load into an unparallelized model without an error."""
    module._moe_inline_tags = dict(tags)
    module._moe_remote_names = tuple(remote)
    for n, t in tags.items():
        module.get_parameter(n)._moe_inline = t
    module.register_state_dict_post_hook(_drop_remote)
    module.register_load_state_dict_pre_hook(_skip_remote)


def _records(model: nn.Module, attr: str) -> list:
    """Each distinct object ``model``'s modules hold under ``attr``, in module order (modules may share one)."""
    out, seen = [], set()
    for m in model.modules():
        rec = getattr(m, attr, None)
        if rec is not None and id(rec) not in seen:
            seen.add(id(rec))
            out.append(rec)
    return out


def parallel_states(model: nn.Module) -> list[ParallelState]:
    return _records(model, "_moe_parallel")


def replicated_records(model: nn.Module) -> list:
    """The ``replicate.Replicated`` records of ``model``'s replicated experts modules, in module order."""
    return _records(model, "_moe_replicated")


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
        inner = torch_dist.compiled_inner(model)
        if inner is None and isinstance(model, DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner
