"""``parallelize``, ``set_parallel`` and the helpers around them (tags, reports, full state dicts)."""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..codegen import cpu
from . import cost, op
from .comm import AllToAll, Comm, Traffic
from .find import Found, expert_list, find_experts
from .layout import Layout, ParallelError, check_sizes
from .state import MODES, SLOTS, ParallelState

_GROUPS: dict[tuple[int, ...], object] = {}  # subgroups by global ranks (created once per process)
_RATES: dict[tuple, cost.Rates] = {}  # measured rates by (global ranks, ranks per node)


# --------------------------------------------------------------------------------------------- small helpers
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


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: parallelize the module inside
    if isinstance(model, DistributedDataParallel):
        raise ParallelError(
            "moe_compile.parallelize got a model already wrapped in DistributedDataParallel, which has broadcast "
            "and hooked every parameter, experts included. Fix: call moe_compile.parallelize(model) before "
            "DistributedDataParallel(model) (and torch.compile after both)")
    return model


def _subgroup(ranks: list[int]):
    """A process group of ``ranks`` (global), created by its members only, once."""
    key = tuple(ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _GROUPS[key]


def _ranks_per_node(granks: list[int], per_node: int) -> tuple[int, str]:
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
    p = nn.Parameter(value.detach().contiguous(), requires_grad=requires_grad)
    setattr(owner, attr, p)
    if isinstance(owner, nn.Linear) and attr == "weight":
        owner.out_features, owner.in_features = p.shape
    return p


def _tag(p: nn.Parameter, path: str, sharded: bool) -> None:
    if type(p) is nn.Parameter:  # a subclass the user chose is left as it is (tags kept, but lost by deepcopy)
        p.__class__ = ExpertParameter
    p._moe_expert = True
    p._moe_expert_module = path
    if sharded:  # what DistributedDataParallel._set_params_and_buffers_to_ignore_for_model sets (DDPOptimizer reads it)
        p._ddp_ignored = True


def _retag_after_load(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post hook of an experts module: ``load_state_dict(..., assign=True)`` replaces the
    parameters with new ones; tag those again."""
    for p in module.parameters():
        _tag(p, module._moe_expert_path, module._moe_expert_sharded)


def _tag_module(module: nn.Module, path: str, sharded: bool) -> None:
    module._moe_expert_path = path
    module._moe_expert_sharded = sharded
    for p in module.parameters():
        _tag(p, path, sharded)
    if not getattr(module, "_moe_retag_hook", False):
        module.register_load_state_dict_post_hook(_retag_after_load)
        module._moe_retag_hook = True


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
                dp_group=None, mesh=None) -> nn.Module:
    """Shard every experts module of ``model`` over ``group`` (default: the world) and return ``model``.

    Call it on every rank of the group, after building (or loading) the model and before wrapping it in
    ``DistributedDataParallel``, ``torch.compile`` and creating the optimizer.

    - Finds the experts modules eagerly (``find.find_experts``); ``example_inputs`` (args tuple, kwargs dict or one
      tensor) adds those the model calls with the experts contract.
    - Broadcasts each experts module's weights from the group's first rank (as DDP does for dense weights), then
      keeps this rank's part: ``E/W`` whole experts, or when ``E < W`` one expert's ``1/(W/E)`` hidden slice.
    - Tags the expert parameters (``is_expert_param``) and lists their names in
      ``model._ddp_params_and_buffers_to_ignore``, so DDP neither broadcasts nor all-reduces them.
    - Replaces each experts module's forward with one ``moe_compile::parallel_experts`` call that runs ``mode``
      ("expert", "data", "tensor" when ``E < W``, or "auto"), switchable with :func:`set_parallel`.

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
    root = _unwrap(model)
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
    if mode not in MODES:
        errors.append(f"unknown parallel mode {mode!r}; known: {MODES}")
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
            L, why = _ranks_per_node(dist.get_process_group_ranks(group), per_node)
            if why:
                notes.append(why)
    for f in found:
        s = f.match.spec
        dtypes = {p.dtype for p in f.module.parameters()}
        if len(dtypes) != 1:
            errors.append(f"{f.path}: expert parameters of mixed dtypes {sorted(map(str, dtypes))}")
        if W > 1 and mode in MODES:
            why = check_sizes(s.num_experts, W, s.ffn)
            if why:
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
            _tag_module(f.module, f.path, sharded=False)
        if notes:
            warnings.warn("moe_compile.parallelize: " + "; ".join(notes), stacklevel=2)
        return model

    # every rank checks the others' view before anything changes (one small all-gather of a description)
    sig = {"mode": mode, "W": W, "L": L,
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
    if mode == "auto" and rkey not in _RATES:
        s0 = found[0].match.spec
        _RATES[rkey] = cost.measure_rates(
            world0, s0.hidden, s0.ffn, next(found[0].module.parameters()).dtype,
            Comm(intra) if intra is not None else None, Comm(inter) if inter is not None else None,
            device=next(found[0].module.parameters()).device)
    parents = {id(c): m for m in root.modules() for c in m.children()}
    ignore = list(getattr(root, "_ddp_params_and_buffers_to_ignore", []))
    for f in found:
        cf = capacity_factor if capacity_factor is not None else _router_capacity(f, parents)
        names = _shard_module(f, group, granks, rank, W, L, intra, inter, mode, cf, rkey, dp_group)
        ignore += [f"{f.path}.{n}" if f.path else n for n in names]
    root._ddp_params_and_buffers_to_ignore = ignore
    if notes:
        warnings.warn("moe_compile.parallelize: " + "; ".join(notes), stacklevel=2)
    return model


def _shard_module(f: Found, group, granks, rank, W, L, intra, inter, mode, cf, rkey, dp_group) -> list[str]:
    m, spec, slots = f.module, f.match.spec, f.match.slots
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
    full = cpu.canonical_weights(spec, *[[params[n].detach() for n in slots[s]] for s in SLOTS])
    local = lay.shard(full, rank)
    local_spec = dataclasses.replace(spec, num_experts=lay.El, ffn=lay.Fl)
    per = 1 if spec.stacked else lay.El
    like = [[torch.empty(0, dtype=dtype)] * (per if slots[s] else 0) for s in SLOTS]
    values = cpu.weight_grads(local_spec, local, *like)

    if spec.stacked:
        local_names = {s: list(slots[s]) for s in SLOTS}
    else:
        list_prefix, lst = expert_list(m)
        owned = list(range(lay.first_expert(rank), lay.first_expert(rank) + lay.El))
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
    for p in params.values():  # the unsharded parameters: only a DDP built too early would still hold them
        p._moe_replaced = True
    flat_names = []
    for s, vals in zip(SLOTS, values):
        for n, v, old in zip(local_names[s], vals, [params[o] for o in slots[s]]):
            _set_param(m, n, v, old.requires_grad)
            flat_names.append(n)
    _tag_module(m, f.path, sharded=True)

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
        rates=_RATES.get(rkey, cost.Rates()), traffic=traffic,
        weight_itemsize=torch.empty(0, dtype=dtype).element_size(),
        dp=Comm(dp_group, traffic) if dp_group is not None else None)
    m._moe_parallel = state
    m._moe_parallel_key = key
    m._moe_parallel_names = tuple(flat_names)
    m.forward = functools.partial(op.call, m)
    return flat_names


# --------------------------------------------------------------------------------------------- set_parallel
def _states(model: nn.Module) -> list[ParallelState]:
    out, seen = [], set()
    for m in model.modules():
        st = getattr(m, "_moe_parallel", None)
        if st is not None and id(st) not in seen:
            seen.add(id(st))
            out.append(st)
    return out


def set_parallel(model: nn.Module, mode: str) -> nn.Module:
    """Run ``mode`` from the next experts call on (every parallelized experts module of ``model``).

    Call it on every rank with the same mode, between steps. It checks agreement with one tiny all-gather and
    raises on every rank, changing nothing, when a rank asks for another mode or a mode a module cannot run.
    Compiled graphs are not recompiled: the mode is read when the op runs.
    """
    states = _states(model)
    if not states:
        noop = [m for m in model.modules() if getattr(m, "_moe_parallel_noop", False)]
        if not noop:
            raise ParallelError("moe_compile.set_parallel: the model has no parallelized experts modules; call "
                                "moe_compile.parallelize(model) first")
        if mode not in MODES:
            raise ParallelError(f"moe_compile.set_parallel: unknown parallel mode {mode!r}; known: {MODES}")
        for m in noop:
            m._moe_parallel_mode = mode
        return model
    local_err = [st.path for st in states if mode not in st.valid_modes()] if mode in MODES else []
    code = MODES.index(mode) if mode in MODES else -1
    groups = []
    for st in states:
        if not any(st.world.group is g for g in groups):
            groups.append(st.world.group)
    for g in groups:
        c = Comm(g)
        table = c.all_gather(torch.tensor([code, len(local_err)], dtype=torch.long,
                                          device=_device_of(states))).view(c.size, 2).tolist()
        names = [MODES[t[0]] if t[0] >= 0 else "<unknown>" for t in table]
        if any(t != table[0] for t in table) or code < 0 or local_err:
            if any(n != names[0] for n in names):
                why = "ranks disagree on the parallel mode: " + ", ".join(
                    f"rank {r} {n!r}" for r, n in enumerate(names))
            elif code < 0:
                why = f"unknown parallel mode {mode!r}; known: {MODES}"
            else:
                lay = next(st.layout for st in states if st.path in local_err)
                why = (f"mode {mode!r} is not available for {', '.join(local_err)} (E={lay.E}, W={lay.W}): "
                       "'tensor' needs fewer experts than ranks")
            raise ParallelError("moe_compile.set_parallel: " + why + "; nothing was changed")
    if mode == "auto":
        for st in states:
            if not st.rates.measured:
                _measure(st)
    for st in states:
        st.mode = mode
    return model


def _device_of(states: list[ParallelState]) -> torch.device:
    backend = dist.get_backend(states[0].world.group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _measure(st: ParallelState) -> None:
    granks = tuple(st.world.ranks)
    rkey = (granks, st.local_world_size)
    if rkey not in _RATES:
        intra = Comm(st.a2a.intra.group) if st.a2a.hierarchical else None
        inter = Comm(st.a2a.inter.group) if st.a2a.hierarchical else None
        _RATES[rkey] = cost.measure_rates(Comm(st.world.group), st.layout.H, st.layout.F, torch.float32, intra, inter,
                                          device=_device_of([st]))
    st.rates = _RATES[rkey]


def get_parallel(model: nn.Module) -> str | None:
    """The mode set on ``model``'s experts modules (None if it was never parallelized)."""
    states = _states(model)
    if states:
        return states[0].mode
    noop = [m for m in model.modules() if getattr(m, "_moe_parallel_noop", False)]
    return noop[0]._moe_parallel_mode if noop else None


def set_rates(model: nn.Module, rates: cost.Rates) -> None:
    """Use ``rates`` (instead of measured ones) in ``model``'s auto decisions (same on every rank)."""
    for st in _states(model):
        st.rates = rates


# --------------------------------------------------------------------------------------------- report
@dataclass
class BlockReport:
    path: str
    experts: int
    world: int
    storage: str
    mode: str
    last: str | None
    calls: dict[str, int]
    estimate: dict[str, float]
    bytes_sent: int
    hierarchical: bool  # multi-node: hierarchical all-to-all available (and the default)
    last_hierarchical: bool
    capacity: int | None


@dataclass
class ParallelReport:
    blocks: list[BlockReport] = field(default_factory=list)
    rates: str = ""

    def __str__(self) -> str:
        if not self.blocks:
            return "moe_compile.parallel: no parallelized experts modules"
        lines = [f"moe_compile.parallel: {len(self.blocks)} experts module(s); rates {self.rates}"]
        for b in self.blocks:
            chosen = f"auto -> {b.last}" if b.mode == "auto" and b.last else (b.last or b.mode)
            line = (f"  {b.path}: {b.storage}; mode {b.mode}, last call {chosen}; calls {b.calls}; "
                    f"sent {b.bytes_sent / 1e6:.3f} MB; all-to-all "
                    + (f"hierarchical available, last call {'hierarchical' if b.last_hierarchical else 'flat'}"
                       if b.hierarchical else "flat"))
            if b.capacity is not None:
                line += f"; padded to capacity {b.capacity}"
            if b.estimate:
                line += "; auto estimate " + ", ".join(f"{m} {s * 1e3:.3f} ms" for m, s in b.estimate.items())
            lines.append(line)
        return "\n".join(lines)


def parallel_report(model: nn.Module) -> ParallelReport:
    """What each parallelized experts module holds, the mode it runs, what ``auto`` chose and why, bytes sent."""
    rep = ParallelReport()
    for st in _states(model):
        lay = st.layout
        storage = (f"{lay.El} of {lay.E} experts per rank" if lay.E >= lay.W
                   else f"1/{lay.S} of one expert's hidden size ({lay.Fl} of {lay.F}) per rank")
        if st.DP > 1:
            storage += f", {st.DP} replicas"
        rep.blocks.append(BlockReport(st.path, lay.E, lay.W, storage, st.mode, st.stats.last_mode,
                                      dict(st.stats.calls), dict(st.stats.last_estimate), st.traffic.total,
                                      st.a2a.hierarchical, st.stats.last_hierarchical, st.stats.capacity))
        rep.rates = st.rates.describe()
    return rep


# --------------------------------------------------------------------------------------------- full state dicts
def _modules(model: nn.Module):
    return [(p, m) for p, m in model.named_modules() if getattr(m, "_moe_parallel", None) is not None]


def _root(model: nn.Module) -> nn.Module:
    """The module inside torch.compile / DistributedDataParallel wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


def _full_from_local(st: ParallelState, tensors: list[torch.Tensor], dst: int | None = None
                     ) -> dict[str, torch.Tensor]:
    """Whole tensors under the unparallelized module's parameter names, from this rank's tensors shaped like its
    local parameters (the parameters themselves, or per-element optimizer state): a collective over the group.
    ``dst`` (a global rank in the group): gathered to that rank only; the others get ``{}``."""
    local = cpu.canonical_weights(st.local_spec, *st._lists([t.detach() for t in tensors]))
    full = st._gather(local, Comm(st.world.group), list(range(st.W)), dst)
    if full is None:
        return {}
    dtype = tensors[0].dtype
    like = [[torch.empty(0, dtype=dtype)] * ((1 if st.spec.stacked else st.layout.E) if st.full_names[s] else 0)
            for s in SLOTS]
    values = cpu.weight_grads(st.spec, full, *like)
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
    model = _root(model)
    distributed = dist.is_available() and dist.is_initialized()
    keep = not rank0_only or not distributed or dist.get_rank() == 0
    sd = dict(model.state_dict()) if keep else {}
    for path, m in _modules(model):
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
    local = st.layout.shard(cpu.canonical_weights(st.spec, *lists), st.rank)
    params = [module.get_parameter(n) for n in st.local_names]
    values = cpu.weight_grads(st.local_spec, local, *st._lists(params))
    return dict(zip(st.local_names, (v for vals in values for v in vals)))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a whole-model state dict (as :func:`full_state_dict` or an unparallelized model writes it): every
    rank keeps its own part of each experts module's weights."""
    model = _root(model)
    sd = dict(state_dict)
    for path, m in _modules(model):
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
    for path, m in _modules(root):
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
    root = _root(model)
    names = {id(p): n for n, p in root.named_parameters()}
    owners = _expert_owners(root)
    state: dict[str, dict] = {}
    groups = []
    module_group: dict[int, int] = {}
    for gi, g in enumerate(optimizer.param_groups):
        fqns: list[str] = []
        for p in g["params"]:
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

    for path, m in _modules(root):  # the same order on every rank of a group
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
    root = _root(model)
    names = {id(p): n for n, p in root.named_parameters()}
    owners = _expert_owners(root)
    if len(osd["param_groups"]) != len(optimizer.param_groups):
        raise ParallelError(f"moe_compile.load_full_optim_state_dict: {len(osd['param_groups'])} parameter groups "
                            f"in the dict, {len(optimizer.param_groups)} in the optimizer")
    full_state = osd["state"]
    local_state: dict[str, dict] = {}
    for path, m in _modules(root):
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

        mesh = DeviceMesh.from_group(st.world.group, _device_of([st]).type)
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

    root = _root(model)
    sd = dict(root.state_dict())
    for path, m in _modules(root):
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

    root = _root(model)
    sd = dict(state_dict)
    out = {}
    for path, m in _modules(root):
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
