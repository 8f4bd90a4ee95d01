"""Checkpoints that load at any world size: whole state dicts, optimizer state, and DCP (sharded) state dicts."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..kernels.common import canonical_weights, weight_grads
from .comm import Comm
from .layout import ParallelError
from .state import SLOTS, ParallelState
from .tags import device_of, parallel_modules, unwrapped

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
    data x expert mesh the first rank of every replica gathers too, then drops it)."""
    model = unwrapped(model)
    distributed = dist.is_available() and dist.is_initialized()
    keep = not rank0_only or not distributed or dist.get_rank() == 0
    sd = dict(model.state_dict()) if keep else {}
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
                state[n] = dict(optimizer.state[p])
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
    indexed = optimizer.state_dict()["param_groups"]
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
                new_state[idx] = {k: t.clone() if isinstance(t, torch.Tensor) else t for k, t in v.items()}
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
    sd = dict(root.state_dict())
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
