"""Checkpoints that load at any world size: whole state dicts, optimizer state, and DCP (sharded) state dicts."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..kernels.common import canonical_weights, weight_grads
from . import fsdp_grads
from .comm import Comm
from .layout import ParallelError
from .state import SLOTS, ParallelState
from .tags import device_of, parallel_modules, unwrapped

_LOCAL_ONLY = [0]  # > 0 while this module's own functions read model.state_dict() (this rank's shards wanted)


def _local_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with this rank's expert shards as they are (no FSDP2 presentation, no collective)."""
    _LOCAL_ONLY[0] += 1
    try:
        return dict(model.state_dict())
    finally:
        _LOCAL_ONLY[0] -= 1


def _whole(v):
    """A ``DTensor``'s whole value (a collective over its mesh), anything else as it is."""
    from torch.distributed.tensor import DTensor

    return v.full_tensor() if isinstance(v, DTensor) else v


def _whole_dtensors(d: dict) -> dict:
    return {k: _whole(v) for k, v in d.items()}


def _like_param(v, p: torch.Tensor):
    """A whole tensor ``v`` for parameter ``p``: ``p``'s local shard of it when ``p`` is a DTensor (FSDP2), cut
    locally (no communication); anything else as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.dim() > 0:
        return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return v


def _full_from_local(st: ParallelState, tensors: list[torch.Tensor], dst: int | None = None
                     ) -> dict[str, torch.Tensor]:
    """Whole tensors under the unparallelized module's parameter names, from this rank's tensors shaped like its
    local parameters (the parameters themselves, or per-element optimizer state): a collective over the group.
    ``dst`` (a global rank in the group): gathered to that rank only; the others get ``{}``."""
    local = canonical_weights(st.local_spec, *st._lists([t.detach() for t in tensors]))
    full = st._gather(local, Comm(st.world.group), list(range(st.W)), dst)
    if full is None:
        return {}
    dtype = tensors[0].dtype
    like = [[torch.empty(0, dtype=dtype)] * ((1 if st.spec.stacked else st.layout.E) if st.full_names[s] else 0)
            for s in SLOTS]
    values = weight_grads(st.spec, full, *like)
    return {n: v for s, vals in zip(SLOTS, values) for n, v in zip(st.full_names[s], vals)}


def _full_expert_tensors(st: ParallelState, module: nn.Module, dst: int | None = None) -> dict[str, torch.Tensor]:
    return _full_from_local(st, [module.get_parameter(n) for n in st.local_names], dst)


def full_state_dict(model: nn.Module, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded experts module's weights gathered whole, under the names the
    unparallelized model uses (loadable into it, or into a model parallelized over any number of ranks with
    :func:`load_full_state_dict`). A collective: call it on every rank.

    Experts modules are gathered one at a time, so besides the result a rank holds at most one module's whole
    weights at once. ``rank0_only=False``: every rank gets the whole dict. ``rank0_only=True``: global rank 0 gets
    it and every other rank gets ``{}`` (each experts group gathers to its member of lowest global rank, so on a
    data x expert mesh the first rank of every replica gathers too, then drops it). Dense ``DTensor`` entries
    (FSDP2's shards) are gathered whole too, on every rank (``full_tensor``)."""
    model = unwrapped(model)
    distributed = dist.is_available() and dist.is_initialized()
    keep = not rank0_only or not distributed or dist.get_rank() == 0
    sd = _whole_dtensors(_local_state_dict(model))  # every rank: gathering a DTensor is a collective
    if not keep:
        sd = {}
    for path, m in parallel_modules(model):
        st = m._moe_parallel
        pre = f"{path}." if path else ""
        for n in st.local_names:
            sd.pop(pre + n, None)
        dst = min(dist.get_process_group_ranks(st.world.group)) if rank0_only else None
        full = _full_expert_tensors(st, m, dst)
        if keep:
            sd.update({pre + n: v for n, v in full.items()})
    return sd


def local_from_full(module: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of a parallelized experts module's weights (or gradients), from the whole ones given by
    the unparallelized module's parameter names; keys are the module's (local) parameter names. No collective."""
    st = module._moe_parallel
    lists = [[full[n] for n in st.full_names[s]] for s in SLOTS]
    local = st.layout.shard(canonical_weights(st.spec, *lists), st.rank)
    params = [module.get_parameter(n) for n in st.local_names]
    values = weight_grads(st.local_spec, local, *st._lists(params))
    return dict(zip(st.local_names, (v for vals in values for v in vals)))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a whole-model state dict (as :func:`full_state_dict` or an unparallelized model writes it): every
    rank keeps its own part of each experts module's weights."""
    model = unwrapped(model)
    sd = dict(state_dict)
    for path, m in parallel_modules(model):
        st = m._moe_parallel
        pre = f"{path}." if path else ""
        missing = [pre + n for s in SLOTS for n in st.full_names[s] if pre + n not in sd]
        if missing:
            raise KeyError(f"moe_compile.load_full_state_dict: missing expert weights {missing[:4]}...")
        full = {n: sd.pop(pre + n) for s in SLOTS for n in st.full_names[s]}
        for n, v in local_from_full(m, full).items():
            sd[pre + n] = v
    params = dict(model.named_parameters())
    sd = {k: _like_param(v, params[k]) if k in params else v for k, v in sd.items()}  # FSDP2: this rank's shard
    return model.load_state_dict(sd, strict=strict)


# --------------------------------------------------------------------------------------------- optimizer state
def _expert_owners(root: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Local parameter name (in ``root``) of every sharded expert parameter -> (module path, module)."""
    out = {}
    for path, m in parallel_modules(root):
        pre = f"{path}." if path else ""
        for n in m._moe_parallel.local_names:
            out[pre + n] = (path, m)
    return out


def _full_param_names(path: str, m: nn.Module) -> list[str]:
    pre = f"{path}." if path else ""
    return [pre + n for s in SLOTS for n in m._moe_parallel.full_names[s]]


def _is_elementwise(v, p: torch.Tensor) -> bool:
    """Optimizer state shaped like its parameter (momentum, exp_avg, ...), as opposed to a scalar (step)."""
    return isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape)


def full_optim_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state for the whole model, keyed by the unparallelized model's parameter names:
    ``{"state": {name: {key: value}}, "param_groups": [{...hyperparameters, "params": [name, ...]}]}``.

    Each rank's optimizer holds state for its own shards only (its parameters are the shards); per-element state
    (SGD's ``momentum_buffer``, Adam's ``exp_avg`` / ``exp_avg_sq`` ...) of sharded experts is gathered whole like
    the weights in :func:`full_state_dict`, scalar state (``step``) is kept (it must be equal over a module's
    parameters). A collective over every experts group: call it on every rank; every rank gets the whole dict.
    Load it with :func:`load_full_optim_state_dict` at any world size (or into an unparallelized model)."""
    root = unwrapped(model)
    names = {id(p): n for n, p in root.named_parameters()}
    owners = _expert_owners(root)
    state: dict[str, dict] = {}
    groups = []
    module_group: dict[int, int] = {}
    for gi, g in enumerate(optimizer.param_groups):
        fqns: list[str] = []
        for p in g["params"]:
            if getattr(p, "_moe_remote", False):  # another rank's expert, a placeholder: never stepped, no state
                continue
            n = names.get(id(p))
            if n is None:
                raise ParallelError("moe_compile.full_optim_state_dict: the optimizer holds a parameter that is not "
                                    "in the model (build the optimizer after parallelize, on the model's parameters)")
            if n in owners:
                path, m = owners[n]
                if module_group.setdefault(id(m), gi) != gi:
                    raise ParallelError(f"moe_compile.full_optim_state_dict: the parameters of {path} are in "
                                        "different parameter groups; keep each experts module in one group")
                for f in _full_param_names(path, m):
                    if f not in fqns:
                        fqns.append(f)
                continue
            fqns.append(n)
            if p in optimizer.state and optimizer.state[p]:
                state[n] = _whole_dtensors(optimizer.state[p])  # FSDP2's shards gathered (every rank)
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": fqns})

    for path, m in parallel_modules(root):  # the same order on every rank of a group
        st = m._moe_parallel
        params = [m.get_parameter(n) for n in st.local_names]
        local = [optimizer.state.get(p, {}) for p in params]
        keys = sorted({k for s_ in local for k in s_})
        desc = []
        for k in keys:
            vals = [s_.get(k) for s_ in local]
            if any(v is None for v in vals):
                desc.append((k, "partial"))
            elif all(_is_elementwise(v, p) for v, p in zip(vals, params)):
                desc.append((k, "elementwise"))
            else:
                plain = [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for v in vals]
                desc.append((k, ("scalar", plain[0]) if all(v == plain[0] for v in plain) else "unequal"))
        views: list = [None] * st.W
        dist.all_gather_object(views, desc, group=st.world.group)
        bad = [k for k, kind in desc if kind in ("partial", "unequal")]
        if bad or any(v != views[0] for v in views):
            raise ParallelError(
                f"moe_compile.full_optim_state_dict: {path}: the optimizer state of the experts differs between "
                f"their parameters or ranks ({views}); every expert parameter must have been stepped alike")
        full_names = _full_param_names(path, m)
        per: dict[str, dict] = {f: {} for f in full_names}
        pre = f"{path}." if path else ""
        for k, kind in desc:
            if kind == "elementwise":
                for n, v in _full_from_local(st, [s_[k] for s_ in local]).items():
                    per[pre + n][k] = v
            else:
                for f in full_names:
                    v = local[0][k]
                    per[f][k] = v.clone() if isinstance(v, torch.Tensor) else v
        for f in full_names:
            if per[f]:
                state[f] = per[f]
    return {"state": state, "param_groups": groups}


def load_full_optim_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> None:
    """Load a dict written by :func:`full_optim_state_dict` (at any world size) into ``optimizer``, whose
    parameters are ``model``'s (parallelized over any number of ranks, or not at all): every rank keeps the state
    of its own shards. The hyperparameters of the i-th parameter group come from the dict's i-th group. No
    collective."""
    root = unwrapped(model)
    names = {id(p): n for n, p in root.named_parameters()}
    owners = _expert_owners(root)
    if len(osd["param_groups"]) != len(optimizer.param_groups):
        raise ParallelError(f"moe_compile.load_full_optim_state_dict: {len(osd['param_groups'])} parameter groups "
                            f"in the dict, {len(optimizer.param_groups)} in the optimizer")
    full_state = osd["state"]
    local_state: dict[str, dict] = {}
    for path, m in parallel_modules(root):
        full_names = _full_param_names(path, m)
        have = [f for f in full_names if f in full_state]
        if not have:
            continue
        if len(have) != len(full_names):
            raise KeyError(f"moe_compile.load_full_optim_state_dict: {path}: state for only some experts "
                           f"parameters ({len(have)} of {len(full_names)})")
        pre = f"{path}." if path else ""
        keys = list(full_state[full_names[0]])
        per: dict[str, dict] = {n: {} for n in m._moe_parallel.local_names}
        for k in keys:
            vals = {f[len(pre):]: full_state[f][k] for f in full_names}
            if all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in vals.values()):
                for n, v in local_from_full(m, vals).items():
                    per[n][k] = v
            else:
                for n in per:
                    v = vals[full_names[0][len(pre):]]
                    per[n][k] = v.clone() if isinstance(v, torch.Tensor) else v
        for n, v in per.items():
            local_state[pre + n] = v
    _LOCAL_ONLY[0] += 1  # only the parameter indices are read: no presentation by optimizer_state_dict_hooks
    try:
        indexed = optimizer.state_dict()["param_groups"]
    finally:
        _LOCAL_ONLY[0] -= 1
    new_state, new_groups = {}, []
    for g, ig, fg in zip(optimizer.param_groups, indexed, osd["param_groups"]):
        for idx, p in zip(ig["params"], g["params"]):
            if getattr(p, "_moe_remote", False):
                continue
            n = names.get(id(p))
            if n is None:
                raise ParallelError("moe_compile.load_full_optim_state_dict: the optimizer holds a parameter that "
                                    "is not in the model")
            v = local_state.get(n) if n in owners else full_state.get(n)
            if v is not None:  # copies: training must not write into the caller's dict (or its shared memory)
                new_state[idx] = {k: _like_param(t.clone(), p) if isinstance(t, torch.Tensor) else t
                                  for k, t in v.items()}
        new_groups.append({**{k: v for k, v in fg.items() if k != "params"}, "params": list(ig["params"])})
    optimizer.load_state_dict({"state": new_state, "param_groups": new_groups})


# ------------------------------------------------------------------------------------ sharded (DCP) state dicts
def _ep_mesh(st: ParallelState):
    """A 1D DeviceMesh over the module's experts group (made once)."""
    mesh = getattr(st, "_device_mesh", None)
    if mesh is None:
        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh.from_group(st.world.group, device_of([st]).type)
        st._device_mesh = mesh
    return mesh


def _list_names(st: ParallelState) -> list[tuple[str, str]]:
    """(local name, unparallelized name) of an ``nn.ModuleList`` experts module's parameters (``E >= W``)."""
    first = st.layout.first_expert(st.rank)
    pairs, i = [], 0
    for s, count in zip(SLOTS, st.slot_counts):
        for j in range(count):
            pairs.append((st.local_names[i], st.full_names[s][first + j]))
            i += 1
    return pairs


def sharded_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` for ``torch.distributed.checkpoint`` (DCP): each rank's own expert weights, under
    the unparallelized model's names and global shapes, so that ``dcp.save`` writes every shard once and
    ``dcp.load`` fills the shards of a model parallelized over any number of ranks:

    - stacked experts with ``E >= W``: a ``DTensor`` sharded along the experts dimension (``Shard(0)``) on the
      experts group (replicas of a data x expert mesh write the same chunk; DCP keeps one);
    - ``nn.ModuleList`` experts with ``E >= W``: this rank's whole experts under their own names;
    - ``E < W`` (hidden slices, not one rectangular block per rank): the whole weights, gathered (a collective,
      as in :func:`full_state_dict`).

    Dense entries are ``model.state_dict()``'s (replicated; DCP writes them once). Call it on every rank; load with
    ``dcp.load(sd, ...)`` on a dict this function made for the target model, then :func:`load_sharded_state_dict`.
    """
    from torch.distributed.tensor import DTensor, Shard

    root = unwrapped(model)
    sd = _local_state_dict(root)
    for path, m in parallel_modules(root):
        st = m._moe_parallel
        pre = f"{path}." if path else ""
        local = {n: m.get_parameter(n).detach() for n in st.local_names}
        for n in local:
            sd.pop(pre + n, None)
        if st.layout.E >= st.W and st.spec.stacked:
            mesh = _ep_mesh(st)
            for n, t in local.items():
                sd[pre + n] = DTensor.from_local(t, mesh, [Shard(0)], run_check=False)
        elif st.layout.E >= st.W:
            for n, full in _list_names(st):
                sd[pre + full] = local[n]
        else:
            for n, v in _full_from_local(st, list(local.values())).items():
                sd[pre + n] = v
    return sd


def load_sharded_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a dict shaped as :func:`sharded_state_dict` made it for ``model`` (typically filled by ``dcp.load``):
    every rank keeps its own part. No collective."""
    from torch.distributed.tensor import DTensor

    root = unwrapped(model)
    sd = dict(state_dict)
    out = {}
    for path, m in parallel_modules(root):
        st = m._moe_parallel
        pre = f"{path}." if path else ""
        if st.layout.E >= st.W and st.spec.stacked:
            vals = {n: sd.pop(pre + n) for n in st.local_names}
            if all(isinstance(v, DTensor) for v in vals.values()):
                out.update({pre + n: v.to_local() for n, v in vals.items()})
            else:  # whole tensors (a full state dict)
                out.update({pre + n: v for n, v in local_from_full(m, vals).items()})
        elif st.layout.E >= st.W:
            for n, full in _list_names(st):
                out[pre + n] = sd.pop(pre + full)
        else:
            full = {n: sd.pop(pre + n) for s in SLOTS for n in st.full_names[s]}
            for n, v in local_from_full(m, full).items():
                out[pre + n] = v
    out.update(sd)
    return root.load_state_dict(out, strict=strict)


# ------------------------------------------------------------- torch.distributed.checkpoint.state_dict under FSDP2
# Under FSDP2 the dense entries of model.state_dict() are DTensors, which torch's get_/set_model_state_dict and
# get_/set_optimizer_state_dict reshard. A stacked experts module presents its shards the same way there: DTensors
# sharded along the experts dimension on the experts group (E >= W), or the whole tensors (E < W: hidden slices,
# gathered, a collective); loading takes DTensors, whole tensors or this rank's own shards.
def presents_dtensors(st: ParallelState) -> bool:
    """Whether the module's state dicts present DTensors / whole tensors: a stacked experts module that an FSDP2
    module holds (``model.state_dict()`` elsewhere keeps this rank's shards, as documented for DDP)."""
    return not _LOCAL_ONLY[0] and st.spec.stacked and fsdp_grads.held_by_fsdp(st)


def _present(st: ParallelState, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``local`` (local parameter name -> tensor shaped like that parameter: a weight or per-element optimizer
    state) as the module's DCP entries, by the same names."""
    from torch.distributed.tensor import DTensor, Shard

    if st.layout.E >= st.W:
        mesh = _ep_mesh(st)
        return {n: DTensor.from_local(t.detach(), mesh, [Shard(0)], run_check=False) for n, t in local.items()}
    return _full_from_local(st, [local[n] for n in st.local_names])


def _take(module: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's local tensors from presented ``values`` (local name -> DTensor, whole tensor or local shard)."""
    from torch.distributed.tensor import DTensor

    st = module._moe_parallel
    out = {n: v.to_local() if isinstance(v, DTensor) else v for n, v in values.items()}
    shapes = {n: tuple(module.get_parameter(n).shape) for n in out}
    if all(tuple(v.shape) == shapes[n] for n, v in out.items()):
        return out  # this rank's own shards (equal to the whole tensors where the two shapes agree)
    whole = {n: out[n] for n in st.local_names}  # stacked: the local names are the unparallelized ones
    return local_from_full(module, whole)


def _model_post_hook(module, state_dict, prefix, local_metadata) -> None:
    st = module._moe_parallel
    if not presents_dtensors(st):
        return
    local = {n: state_dict[prefix + n] for n in st.local_names if prefix + n in state_dict}
    if len(local) == len(st.local_names):
        for n, v in _present(st, local).items():
            state_dict[prefix + n] = v


def _model_load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
    st = module._moe_parallel
    if not st.spec.stacked:
        return
    values = {n: state_dict[prefix + n] for n in st.local_names if prefix + n in state_dict}
    if len(values) != len(st.local_names):
        return  # missing keys: load_state_dict reports them
    for n, v in _take(module, values).items():
        state_dict[prefix + n] = v


def _unpresentable(st: ParallelState) -> ParallelError:
    return ParallelError(
        f"moe_compile: {st.path} holds its experts as an nn.ModuleList sharded by parallelize (each rank keeps its "
        "own experts under its own names), which torch.distributed.checkpoint.state_dict cannot reshard: under "
        "FSDP2 its state_dict() would hold this rank's experts under names that mean other experts on other ranks. "
        "Fix: checkpoint with moe_compile.sharded_state_dict(model) and dcp.save, load with dcp.load and "
        "moe_compile.load_sharded_state_dict (or full_state_dict / load_full_state_dict), and the optimizer with "
        "full_optim_state_dict / load_full_optim_state_dict")


def _list_post_hook(module, state_dict, prefix, local_metadata) -> None:
    st = module._moe_parallel
    if not _LOCAL_ONLY[0] and fsdp_grads.held_by_fsdp(st):
        raise _unpresentable(st)


def install_state_dict_hooks(module: nn.Module) -> None:
    """The hooks by which a sharded stacked experts module's ``state_dict()`` / ``load_state_dict()`` present
    DTensors under FSDP2 and load DTensors, whole tensors or local shards; for an ``nn.ModuleList`` of experts
    (or an inline block's list), one that refuses ``state_dict()`` under FSDP2, naming moe_compile's checkpoint
    functions (``parallelize`` installs them)."""
    if not module._moe_parallel.spec.stacked:
        module.register_state_dict_post_hook(_list_post_hook)
        return
    module.register_state_dict_post_hook(_model_post_hook)
    module.register_load_state_dict_pre_hook(_model_load_pre_hook)


def _optim_params(optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _expert_owner_map(root: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    out = {}
    for _, m in parallel_modules(root):
        if m._moe_parallel.spec.stacked:
            for n in m._moe_parallel.local_names:
                out[id(m.get_parameter(n))] = (m, n)
    return out


def _optim_post_hook(root_ref, optimizer, state_dict):
    root = root_ref()
    if root is None or _LOCAL_ONLY[0]:
        return state_dict
    for _, m in parallel_modules(root):
        if not m._moe_parallel.spec.stacked and fsdp_grads.held_by_fsdp(m._moe_parallel):
            raise _unpresentable(m._moe_parallel)
    owners = _expert_owner_map(root)
    params = _optim_params(optimizer)
    by_module: dict[int, tuple[nn.Module, dict[str, object]]] = {}
    for idx, p in enumerate(params):
        if id(p) in owners and idx in state_dict["state"]:
            m, n = owners[id(p)]
            by_module.setdefault(id(m), (m, {}))[1][n] = idx
    for m, names in by_module.values():  # module order: the same on every rank (collectives when E < W)
        st = m._moe_parallel
        if not presents_dtensors(st) or len(names) != len(st.local_names):
            continue
        for i in names.values():  # Optimizer.state_dict() shares the inner dicts with optimizer.state: copies
            state_dict["state"][i] = dict(state_dict["state"][i])
        keys = sorted({k for i in names.values() for k in state_dict["state"][i]})
        for k in keys:
            local = {n: state_dict["state"][i].get(k) for n, i in names.items()}
            if all(_is_elementwise(v, m.get_parameter(n)) for n, v in local.items()):
                for n, v in _present(st, local).items():
                    state_dict["state"][names[n]][k] = v
    return state_dict


def _optim_load_pre_hook(root_ref, optimizer, state_dict):
    root = root_ref()
    if root is None:
        return state_dict
    from torch.distributed.tensor import DTensor

    owners = _expert_owner_map(root)
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = _optim_params(optimizer)
    by_module: dict[int, tuple[nn.Module, dict[str, object]]] = {}
    for key, p in zip(saved_ids, params):
        if id(p) in owners and key in state_dict["state"]:
            m, n = owners[id(p)]
            by_module.setdefault(id(m), (m, {}))[1][n] = key
    state = dict(state_dict["state"])
    for m, names in by_module.values():
        keys = sorted({k for i in names.values() for k in state[i]})
        new = {i: dict(state[i]) for i in names.values()}
        for k in keys:
            vals = {n: state[i].get(k) for n, i in names.items()}
            if any(not isinstance(v, torch.Tensor) or v.dim() == 0 for v in vals.values()):
                continue
            if len(names) != len(m._moe_parallel.local_names):
                raise ParallelError(f"moe_compile: the optimizer state dict holds state for only some expert "
                                    f"parameters of {m._moe_parallel.path}")
            if not any(isinstance(v, DTensor) for v in vals.values()) and all(
                    tuple(v.shape) == tuple(m.get_parameter(n).shape) for n, v in vals.items()):
                continue
            for n, v in _take(m, vals).items():
                new[names[n]][k] = v
        state.update(new)
    return {**state_dict, "state": state}


def optimizer_state_dict_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Register on ``optimizer`` (built on a parallelized, ``fully_shard``-ed ``model``'s parameters) the hooks
    that let ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` / ``set_optimizer_state_dict``
    reshard the per-element state of sharded stacked experts modules: ``optimizer.state_dict()`` presents it as
    the model's state dict presents the weights (DTensors sharded along the experts dimension, or whole tensors
    when ``E < W``), and ``optimizer.load_state_dict`` takes DTensors, whole tensors or this rank's shards.
    Returns ``optimizer``. Without FSDP2 (DDP) the presented state is unchanged: use
    :func:`full_optim_state_dict` there."""
    import functools
    import weakref

    ref = weakref.ref(unwrapped(model))
    optimizer.register_state_dict_post_hook(functools.partial(_optim_post_hook, ref))
    optimizer.register_load_state_dict_pre_hook(functools.partial(_optim_load_pre_hook, ref))
    return optimizer
