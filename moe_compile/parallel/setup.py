"""``parallelize``: check every rank's view, then shard each experts module over its group and install the op."""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .. import scope
from ..compat import distributed as torch_dist
from ..capture import run_own_code
from ..kernels.common import canonical_weights, weight_grads
from ..passes.autocast import eager_mode, with_autocast
from . import cost, fsdp_grads, op
from .checkpoint import install_state_dict_hooks
from .comm import AllToAll, Comm, Traffic
from .find import Found, expert_list, find_experts
from .layout import Layout, ParallelError, check_sizes
from .replicate import choose_layouts, replicate_module
from .state import MODES, SLOTS, ParallelState
from .tags import ddp_ignore_names, mark_replaced, tag_inline_list, tag_module, unwrap_for_parallelize

_GROUPS: dict[tuple[int, ...], object] = {}  # subgroups by global ranks (created once per process)


def _subgroup(ranks: list[int]):
    """A process group of ``ranks`` (global), created by its members only, once."""
    key = tuple(ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _GROUPS[key]


def ranks_per_node(granks: list[int], per_node: int) -> tuple[int, str]:
    """How many of the group's ranks share each node (torchrun numbers ranks node by node, ``per_node`` each), or
    the group size when the group sits on one node or spreads unevenly (flat all-to-all, with a note)."""
    nodes: dict[int, list[int]] = {}
    for i, g in enumerate(granks):
        nodes.setdefault(g // per_node, []).append(i)
    if len(nodes) == 1:
        return len(granks), ""
    blocks = list(nodes.values())
    size = len(blocks[0])
    if all(len(b) == size and b == list(range(b[0], b[0] + size)) for b in blocks):
        return size, ""
    return len(granks), ("the group's ranks are not spread evenly and in order over the nodes "
                         f"({per_node} ranks per node): all-to-alls stay flat")


def _router_capacity(found: Found, parents: dict[int, nn.Module]) -> float | None:
    """The capacity factor of the router next to an experts module (an attribute ``capacity_factor``)."""
    parent = parents.get(id(found.module))
    owners = [found.module] + ([parent] + list(parent.children()) if parent is not None else [])
    for o in owners:
        for holder in (o, getattr(o, "config", None)):
            v = getattr(holder, "capacity_factor", None)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return float(v)
    return None


def _set_param(module: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    # a copy: the shard is often a view of the whole weights, whose storage it would otherwise keep alive
    p = nn.Parameter(value.detach().clone(memory_format=torch.contiguous_format), requires_grad=requires_grad)
    setattr(owner, attr, p)
    if isinstance(owner, nn.Linear) and attr == "weight":
        owner.out_features, owner.in_features = p.shape
    return p


def _groups_of_mesh(mesh):
    """(expert-parallel group, replica group or None) of a 1D or 2D DeviceMesh."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if mesh.ndim == 1:
        return mesh.get_group(), None
    if mesh.ndim != 2:
        raise ParallelError(f"moe_compile.parallelize: a mesh of {mesh.ndim} dimensions; expected 1 (experts) or "
                            "2 (replicas x experts)")
    ep = names.index("ep") if "ep" in names else 1
    return mesh.get_group(ep), mesh.get_group(1 - ep)


def _check_replicas(sig, group, dp_group, rank, W, DP, why: str | None) -> str | None:
    """Every replica of this rank (its dp_group) must hold the same model and the same shard (the same rank in an
    expert group of the same size), from expert groups that do not overlap. Returns the problems of the whole mesh
    (``why`` included), gathered over the replica group, then over the expert group, so every rank raises."""
    mine = (sig, rank, tuple(dist.get_process_group_ranks(group)), why)
    views: list = [None] * DP
    dist.all_gather_object(views, mine, group=dp_group)
    errs = [v[3] for v in views if v[3]]
    if not errs:
        if any(v[0] != sig for v in views):
            errs.append("replicas (dp_group) disagree on the model or arguments")
        if any(v[1] != rank for v in views):
            errs.append("the ranks of a dp_group must hold the same expert shard (the same rank in their expert "
                        f"groups); got expert-group ranks {[v[1] for v in views]}")
        members = [g for v in views for g in v[2]]
        if len(set(members)) != len(members):
            errs.append("the expert groups of a dp_group's ranks overlap: group and dp_group must be the two "
                        "dimensions of one mesh")
    agreed: list = [None] * W
    dist.all_gather_object(agreed, errs, group=group)
    all_errs = list(dict.fromkeys(e for es in agreed for e in es))
    return "; ".join(all_errs) if all_errs else None


# --------------------------------------------------------------------------------------------- parallelize
def parallelize(model: nn.Module, mode: str = "auto", group=None, example_inputs=None, *,
                local_world_size: int | None = None, capacity_factor: float | None = None,
                dp_group=None, mesh=None, tokens_per_call: int | None = None,
                rates: cost.Rates | None = None) -> nn.Module:
    """Shard every experts module of ``model`` over ``group`` (default: the world), or keep it replicated, and
    return ``model``.

    Call it on every rank of the group, after building (or loading) the model and before wrapping it in
    ``DistributedDataParallel``, ``torch.compile`` and creating the optimizer.

    - Finds the experts modules eagerly (``find.find_experts``); ``example_inputs`` (args tuple, kwargs dict or one
      tensor) adds those the model calls with the experts contract.
    - Broadcasts each experts module's weights from the group's first rank (as DDP does for dense weights), then
      keeps this rank's part: ``E/W`` whole experts, or when ``E < W`` one expert's ``1/(W/E)`` hidden slice.
    - Tags the expert parameters (``is_expert_param``) and lists their names in
      DDP's ignore list of ``model`` (``compat.distributed.set_ddp_ignored_names``), so DDP neither broadcasts
      nor all-reduces them.
    - Replaces each experts module's forward with one ``moe_compile::parallel_experts`` call that runs ``mode``
      ("expert", "data", "tensor" when ``E < W``, or "auto"), switchable with :func:`set_parallel`.
    - A layer that dispatches inline (router + ``nn.ModuleList`` of experts + the loop in its forward) is traced
      once as the backend traces it and proved; its list is sharded in place (other ranks' experts become
      placeholders) and the backend replaces the proven region by the same op: such a layer then runs only
      compiled with ``backend="moe"``. A routed MoE block that can be neither (or a layer the backend does not
      fuse) is an error naming it.
    - ``mode="replicate"`` keeps every experts module whole on every rank instead (tagged, not ignored by DDP,
      its own forward: plain DDP's step). ``mode="auto"`` chooses per module between replicated and sharded
      storage with the cost model (``cost.choose_layout``), for ``tokens_per_call`` tokens per experts call,
      else the count the ``example_inputs`` trace saw; without either it shards, as before. ``rates``
      (a ``cost.Rates``, the same on every rank) replaces the rates measured on the group for that choice and
      for the per-call ones. :func:`parallel_report` says which layout each module got and why.

    Without a process group (or a group of one rank) nothing is sharded; parameters are still tagged.
    ``local_world_size`` (default: ``$LOCAL_WORLD_SIZE`` as torchrun sets it) makes the all-to-alls
    hierarchical when the group spans several nodes. ``capacity_factor`` (default: the router's
    ``capacity_factor`` attribute, if any) pads the all-to-all splits to an even capacity.

    Data x expert parallel (a 2D mesh): ``group`` is this rank's expert-parallel group (the ranks that split the
    experts between them) and ``dp_group`` its replica group (the ranks holding the same shard, one per
    expert-parallel group); or pass ``mesh``, a 2D ``DeviceMesh`` whose dimension named ``"ep"`` (else the last)
    shards the experts and whose other dimension replicates them. The experts' backward then also sums their
    gradients over the replica group, scaled so that a step equals the single-process step on the global batch.

    Errors (bad sizes, experts of different shapes, ranks that disagree) are raised on every rank before anything
    changes.
    """
    root = unwrap_for_parallelize(model)
    distributed = dist.is_available() and dist.is_initialized()
    if mesh is not None:
        if group is not None or dp_group is not None:
            raise ParallelError("moe_compile.parallelize: pass either mesh or group / dp_group, not both")
        group, dp_group = _groups_of_mesh(mesh)
    if (group is not None or dp_group is not None) and not distributed:
        raise ParallelError("moe_compile.parallelize: a group was given but torch.distributed is not initialized")
    W, rank, DP = 1, 0, 1
    if distributed:
        group = group if group is not None else dist.group.WORLD
        rank = dist.get_rank(group)
        if rank < 0:
            raise ParallelError(
                f"moe_compile.parallelize: this process (global rank {dist.get_rank()}) is not a member of the group "
                f"{dist.get_process_group_ranks(group)}; call parallelize only on the group's ranks")
        W = dist.get_world_size(group)
        if dp_group is not None:
            if dist.get_rank(dp_group) < 0:
                raise ParallelError(
                    f"moe_compile.parallelize: this process (global rank {dist.get_rank()}) is not a member of its "
                    f"dp_group {dist.get_process_group_ranks(dp_group)}")
            DP = dist.get_world_size(dp_group)
    if W == 1 or DP == 1:
        dp_group, DP = None, 1  # experts not sharded: DDP all-reduces them like any weight; or no replicas

    errors: list[str] = []
    sharded_by_fsdp = fsdp_grads.fsdp_modules_in(root)
    if sharded_by_fsdp:
        errors.append(
            f"fully_shard was already applied to {['<model>' if not p else p for p in sharded_by_fsdp][:4]}: FSDP2 "
            "has sharded every parameter, experts included. Fix: call moe_compile.parallelize(model) first, then "
            "fully_shard(block, ignored_params=moe_compile.fsdp_ignored_params(model)) on the blocks and the model")
    if mode not in MODES:
        errors.append(f"unknown parallel mode {mode!r}; known: {MODES}")
    if tokens_per_call is not None and (not isinstance(tokens_per_call, int) or isinstance(tokens_per_call, bool)
                                        or tokens_per_call < 1):
        errors.append(f"tokens_per_call must be a positive int (tokens per experts call), got {tokens_per_call!r}")
    if rates is not None and not isinstance(rates, cost.Rates):
        errors.append(f"rates must be a moe_compile.parallel.Rates, got {type(rates).__name__}")
    if mode == "replicate" and dp_group is not None:
        errors.append("mode 'replicate' keeps every expert on every rank; mesh= / dp_group= only shape sharded "
                      "experts: drop them, or use a sharded mode")
    try:
        found, problems, notes = find_experts(root, example_inputs)
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        found, problems, notes = [], [f"finding the experts modules failed: {type(e).__name__}: {e}"], []
    errors += problems
    if not found and not problems:
        errors.append("no experts module found" + (": " + "; ".join(notes) if notes else
                      " (an experts module has forward(hidden, topk_idx, topk_weights); decorate custom ones with "
                      "@moe_compile.experts, or pass example_inputs)"))
    per_node = local_world_size if local_world_size is not None else int(os.environ.get("LOCAL_WORLD_SIZE", 0) or 0)
    L = W
    if W > 1 and per_node:
        if per_node < 1:
            errors.append(f"ranks per node must be positive, got {per_node}")
        else:
            L, why = ranks_per_node(dist.get_process_group_ranks(group), per_node)
            if why:
                notes.append(why)
    unshardable: dict[int, str] = {}  # under auto: replicated instead of an error
    for i, f in enumerate(found):
        s = f.match.spec
        dtypes = {p.dtype for p in f.module.parameters()}
        if len(dtypes) != 1:
            errors.append(f"{f.path}: expert parameters of mixed dtypes {sorted(map(str, dtypes))}")
        if W > 1 and mode in MODES and mode != "replicate":
            why = check_sizes(s.num_experts, W, s.ffn) or _inline_problem(f, W)
            if why and mode == "auto" and dp_group is None:
                unshardable[i] = why
                notes.append(f"{f.path}: {why}; auto keeps it replicated")
            elif why:
                errors.append(f"{f.path}: {why}")
            elif mode == "tensor" and s.num_experts >= W:
                errors.append(f"{f.path}: mode 'tensor' splits experts over ranks and needs fewer experts than ranks "
                              f"(E={s.num_experts}, W={W}); use 'expert', 'data' or 'auto'")

    if W == 1:
        if errors:
            raise ParallelError("moe_compile.parallelize: " + "; ".join(errors))
        for f in found:
            f.module._moe_parallel_noop = True
            f.module._moe_parallel_mode = mode
            tag_module(f.module, f.path, sharded=False)
        if notes:
            warnings.warn("moe_compile.parallelize: " + "; ".join(notes), stacklevel=2)
        return model

    # every rank checks the others' view before anything changes (one small all-gather of a description)
    sig = {"mode": mode, "W": W, "L": L, "rates": rates,
           "blocks": [(f.path, f.match.spec.to_json(), str(next(f.module.parameters()).dtype)) for f in found]}
    views: list = [None] * W
    dist.all_gather_object(views, (sig, errors), group=group)
    reported: dict[str, list[int]] = {}
    for r, (_, errs) in enumerate(views):
        for e in errs:
            reported.setdefault(e, []).append(r)
    why = None
    if reported:
        why = "; ".join(e if len(rs) == W else f"{e} (on rank(s) {rs})" for e, rs in reported.items())
    elif any(v[0] != views[0][0] for v in views):
        diff = [r for r in range(W) if views[r][0] != views[0][0]]
        why = (f"ranks disagree on the model or arguments: rank 0 has {views[0][0]}, "
               + "; ".join(f"rank {r} has {views[r][0]}" for r in diff))
    if dp_group is not None:  # every rank of the mesh takes part, so that all of them raise together
        why = _check_replicas(sig, group, dp_group, rank, W, DP, why)
    if why:
        raise ParallelError("moe_compile.parallelize: " + why)

    # ---------------------------------------------------------------------------------------- from here on, changes
    granks = dist.get_process_group_ranks(group)
    world0 = Comm(group)
    intra = inter = None
    if 1 < L < W:
        n, l = divmod(rank, L)
        intra = _subgroup([granks[n * L + j] for j in range(L)])
        inter = _subgroup([granks[m * L + l] for m in range(W // L)])
    rkey = (tuple(granks), L)
    if mode == "auto" and rates is None and rkey not in cost.RATES:
        s0 = found[0].match.spec
        cost.RATES[rkey] = cost.measure_rates(
            world0, s0.hidden, s0.ffn, next(found[0].module.parameters()).dtype,
            Comm(intra) if intra is not None else None, Comm(inter) if inter is not None else None,
            device=next(found[0].module.parameters()).device)
    run_rates = rates if rates is not None else cost.RATES.get(rkey, cost.Rates())
    choices = choose_layouts(found, mode, world0, L, run_rates, tokens_per_call, intra is not None,
                             dp_group is not None, unshardable)
    parents = {id(c): m for m in root.modules() for c in m.children()}
    ignore = torch_dist.ddp_ignored_names(root)
    for f, choice in zip(found, choices):
        if choice.layout == "replicated":
            replicate_module(f, choice, world0, run_rates, rates is not None, mode)
            continue
        cf = capacity_factor if capacity_factor is not None else _router_capacity(f, parents)
        names = _shard_module(f, group, granks, rank, W, L, intra, inter, mode, cf, rkey, dp_group)
        ignore += [f"{f.path}.{n}" if f.path else n for n in names]
        fsdp_grads.set_model(f.module._moe_parallel, root, f.path)
        install_state_dict_hooks(f.module)  # DTensors for torch.distributed.checkpoint.state_dict under FSDP2
        f.module._moe_parallel.layout_choice = choice
        if rates is not None:
            f.module._moe_parallel.rates, f.module._moe_parallel.rates_fixed = rates, True
    torch_dist.set_ddp_ignored_names(root, ddp_ignore_names(ignore))
    if notes:
        warnings.warn("moe_compile.parallelize: " + "; ".join(notes), stacklevel=2)
    return model


def _inline_problem(f: Found, W: int) -> str | None:
    """Why the list of a block that dispatches inline cannot be sharded over ``W`` ranks, or None."""
    s = f.match.spec
    if f.block is None:
        return None
    if s.num_experts < W:
        return (f"the experts of a block that dispatches inline are sharded whole, which needs at least as many "
                f"experts as ranks (E={s.num_experts}, W={W}); for fewer experts than ranks move them into an "
                "experts module (forward(hidden, topk_idx, topk_weights), or @moe_compile.experts), whose hidden "
                "size can be split")
    if s.score_on_input:
        return "the routing weight scales the experts' input; the parallel modes apply it to their output only"
    return None


def _shard_module(f: Found, group, granks, rank, W, L, intra, inter, mode, cf, rkey, dp_group) -> list[str]:
    m, spec, slots = f.module, f.match.spec, f.match.slots
    if f.block is None:  # what its own code does under autocast (an inline list's: read by the pass that fuses it)
        p0 = m.get_parameter(slots["up"][0])
        spec = with_autocast(spec, eager_mode(spec, p0.dtype, p0.device,
                                              lambda *a: run_own_code(m, dict(m.named_parameters()), a)))
    lay = Layout(spec.num_experts, W, spec.hidden, spec.ffn, spec.gate_layout,
                 has_b1=bool(slots["b_up"]), has_b2=bool(slots["b_down"]))
    names = [n for s in SLOTS for n in slots[s]]
    params = {n: m.get_parameter(n) for n in names}
    dtype = params[names[0]].dtype
    with torch.no_grad():  # replicas first (from the replica group's first rank), then within the group
        for n in names:
            if dp_group is not None:
                dist.broadcast(params[n].data, src=dist.get_process_group_ranks(dp_group)[0], group=dp_group)
            dist.broadcast(params[n].data, src=granks[0], group=group)
    full = canonical_weights(spec, *[[params[n].detach() for n in slots[s]] for s in SLOTS])
    local = lay.shard(full, rank)
    local_spec = dataclasses.replace(spec, num_experts=lay.El, ffn=lay.Fl)
    per = 1 if spec.stacked else lay.El
    like = [[torch.empty(0, dtype=dtype)] * (per if slots[s] else 0) for s in SLOTS]
    values = weight_grads(local_spec, local, *like)

    owned = list(range(lay.first_expert(rank), lay.first_expert(rank) + lay.El))
    if spec.stacked:
        local_names = {s: list(slots[s]) for s in SLOTS}
    elif f.block is not None:  # an inline block's list: this rank's experts keep their places (and names)
        local_names = {s: [slots[s][e] for e in owned] if slots[s] else [] for s in SLOTS}
    else:
        list_prefix, lst = expert_list(m)
        owner_path, _, attr = list_prefix.rpartition(".")
        owner = m.get_submodule(owner_path) if owner_path else m
        setattr(owner, attr, nn.ModuleList([lst[e] for e in owned]))
        local_names = {}
        for s in SLOTS:
            local_names[s] = []
            for i, e in enumerate(owned if slots[s] else []):
                orig = slots[s][e]
                head = f"{list_prefix}.{e}."
                assert orig.startswith(head), (orig, head)
                local_names[s].append(f"{list_prefix}.{i}.{orig[len(head):]}")
    for n, p in params.items():  # the unsharded parameters: only a DDP or optimizer built too early holds them
        mark_replaced(p, f"{f.path}.{n}" if f.path else n)
    flat_names = []
    for s, vals in zip(SLOTS, values):
        for n, v, old in zip(local_names[s], vals, [params[o] for o in slots[s]]):
            _set_param(m, n, v, old.requires_grad)
            flat_names.append(n)
    remote = _placeholders(m, [e for e in range(lay.E) if e not in owned], f.path) if f.block is not None else []

    traffic = Traffic()
    world = Comm(group, traffic)
    hier = AllToAll(world, Comm(intra, traffic), Comm(inter, traffic)) if intra is not None else AllToAll(world)
    shard = None
    if lay.S > 1:
        shard = Comm(_subgroup([granks[r] for r in lay.shard_group(rank)]), traffic)
    key = f"{f.path or type(m).__name__}@{id(m):x}"
    state = ParallelState(
        key=key, path=f.path or "<model>", spec=spec, layout=lay, world=world, a2a=hier, shard=shard,
        local_world_size=L, mode=mode, capacity_factor=cf,
        slot_counts=tuple(len(local_names[s]) for s in SLOTS), local_names=flat_names,
        full_names={s: list(slots[s]) for s in SLOTS},
        rates=cost.RATES.get(rkey, cost.Rates()), traffic=traffic,
        weight_itemsize=torch.empty(0, dtype=dtype).element_size(),
        dp=Comm(dp_group, traffic) if dp_group is not None else None)
    m._moe_parallel = state
    m._moe_parallel_key = key
    m._moe_parallel_names = tuple(flat_names)
    tag_module(m, f.path, sharded=True)  # after the state: the tags name its key and each parameter's slot
    if f.block is None:
        m.forward = functools.partial(op.call, m)
        return flat_names
    expected = {"spec": {k: getattr(spec, k) for k in _READING}, "slots": {s: list(v) for s, v in slots.items()}}
    tags = {n: (key, i, expected) for i, n in enumerate(flat_names)}
    tags.update({n: (key, -1, expected) for n in remote})
    tag_inline_list(m, tags, remote)
    return flat_names + remote


_READING = ("num_experts", "top_k", "hidden", "ffn", "activation", "gate_layout", "weight_layout", "stacked",
            "has_bias", "act_alpha", "act_limit", "score_on_input")
"""What the backend's inline pass must read again, compiling a sharded inline block, for the storage to hold."""


def _placeholders(lst: nn.Module, remote: list[int], path: str) -> list[str]:
    """Other ranks' experts in an inline block's list: each parameter becomes a placeholder of the same shape over
    one element (zeros, expanded; no gradient), so the block traces as before and costs no memory; calling such an
    expert outside a moe-compiled graph raises (its numbers would be wrong). Returns the placeholders' names."""
    names = []
    for e in remote:
        expert = lst[e]
        for n, p in list(expert.named_parameters()):
            owner_path, _, attr = n.rpartition(".")
            owner = expert.get_submodule(owner_path) if owner_path else expert
            stand_in = nn.Parameter(torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape),
                                    requires_grad=False)
            stand_in._moe_remote = True
            setattr(owner, attr, stand_in)
            names.append(f"{e}.{n}")
        expert._moe_remote_expert = f"{path}.{e}" if path else str(e)
        expert.register_forward_pre_hook(_remote_expert_called)
    return names


def _remote_expert_called(module: nn.Module, args) -> None:
    if not scope.active():
        raise ParallelError(
            f"moe_compile.parallel: expert {module._moe_remote_expert} lives on another rank (parallelize sharded "
            "the block that holds it, which computes its experts inline); such a block runs only compiled: "
            "torch.compile(model, backend=\"moe\") (in eager, or under another backend, its numbers would be wrong)")
