"""``parallelize``, ``set_parallel`` and the helpers around them (tags, reports, full state dicts)."""
from __future__ import annotations

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


def _tag(p: nn.Parameter, path: str) -> None:
    p._moe_expert = True
    p._moe_expert_module = path


# --------------------------------------------------------------------------------------------- parallelize
def parallelize(model: nn.Module, mode: str = "auto", group=None, example_inputs=None, *,
                local_world_size: int | None = None, capacity_factor: float | None = None) -> nn.Module:
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
    Errors (bad sizes, experts of different shapes, ranks that disagree) are raised on every rank before anything
    changes.
    """
    root = _unwrap(model)
    distributed = dist.is_available() and dist.is_initialized()
    if group is not None and not distributed:
        raise ParallelError("moe_compile.parallelize: a group was given but torch.distributed is not initialized")
    W, rank = 1, 0
    if distributed:
        group = group if group is not None else dist.group.WORLD
        rank = dist.get_rank(group)
        if rank < 0:
            raise ParallelError(
                f"moe_compile.parallelize: this process (global rank {dist.get_rank()}) is not a member of the group "
                f"{dist.get_process_group_ranks(group)}; call parallelize only on the group's ranks")
        W = dist.get_world_size(group)

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
            for p in f.module.parameters():
                _tag(p, f.path)
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
    if reported:
        raise ParallelError("moe_compile.parallelize: " + "; ".join(
            e if len(rs) == W else f"{e} (on rank(s) {rs})" for e, rs in reported.items()))
    if any(v[0] != views[0][0] for v in views):
        diff = [r for r in range(W) if views[r][0] != views[0][0]]
        raise ParallelError(
            f"moe_compile.parallelize: ranks disagree on the model or arguments: rank 0 has {views[0][0]}, "
            + "; ".join(f"rank {r} has {views[r][0]}" for r in diff))

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
        names = _shard_module(f, group, granks, rank, W, L, intra, inter, mode, cf, rkey)
        ignore += [f"{f.path}.{n}" if f.path else n for n in names]
    root._ddp_params_and_buffers_to_ignore = ignore
    if notes:
        warnings.warn("moe_compile.parallelize: " + "; ".join(notes), stacklevel=2)
    return model


def _shard_module(f: Found, group, granks, rank, W, L, intra, inter, mode, cf, rkey) -> list[str]:
    m, spec, slots = f.module, f.match.spec, f.match.slots
    lay = Layout(spec.num_experts, W, spec.hidden, spec.ffn, spec.gate_layout,
                 has_b1=bool(slots["b_up"]), has_b2=bool(slots["b_down"]))
    names = [n for s in SLOTS for n in slots[s]]
    params = {n: m.get_parameter(n) for n in names}
    dtype = params[names[0]].dtype
    with torch.no_grad():
        for n in names:
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
            p = _set_param(m, n, v, old.requires_grad)
            _tag(p, f.path)
            flat_names.append(n)

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
        weight_itemsize=torch.empty(0, dtype=dtype).element_size())
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
        rep.blocks.append(BlockReport(st.path, lay.E, lay.W, storage, st.mode, st.stats.last_mode,
                                      dict(st.stats.calls), dict(st.stats.last_estimate), st.traffic.total,
                                      st.a2a.hierarchical, st.stats.last_hierarchical, st.stats.capacity))
        rep.rates = st.rates.describe()
    return rep


# --------------------------------------------------------------------------------------------- full state dicts
def _modules(model: nn.Module):
    return [(p, m) for p, m in model.named_modules() if getattr(m, "_moe_parallel", None) is not None]


def _full_expert_tensors(st: ParallelState, module: nn.Module) -> dict[str, torch.Tensor]:
    params = [module.get_parameter(n).detach() for n in st.local_names]
    local = cpu.canonical_weights(st.local_spec, *st._lists(params))
    full = st._gather(local, Comm(st.world.group), list(range(st.W)))
    dtype = params[0].dtype
    like = [[torch.empty(0, dtype=dtype)] * ((1 if st.spec.stacked else st.layout.E) if st.full_names[s] else 0)
            for s in SLOTS]
    values = cpu.weight_grads(st.spec, full, *like)
    return {n: v for s, vals in zip(SLOTS, values) for n, v in zip(st.full_names[s], vals)}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded experts module's weights gathered whole, under the names the
    unparallelized model uses (loadable into it, or into a model parallelized over any number of ranks with
    :func:`load_full_state_dict`). A collective: call it on every rank; every rank gets the whole dict."""
    sd = dict(model.state_dict())
    for path, m in _modules(model):
        st = m._moe_parallel
        pre = f"{path}." if path else ""
        for n in st.local_names:
            sd.pop(pre + n, None)
        for n, v in _full_expert_tensors(st, m).items():
            sd[pre + n] = v
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
