"""Gradient clipping by the norm of the whole (unparallelized) model's gradient.

``torch.nn.utils.clip_grad_norm_`` on a parallelized model sees only this rank's expert shards: every rank gets
another norm, clips by another factor, and the replicated dense weights drift apart with no error. Here each
gradient element of the unparallelized model is counted exactly once over the ranks:

- dense parameters (replicated; DDP leaves their gradients equal on every rank): on the first rank of the experts
  group (and of its replica group on a data x expert mesh) only (without DDP, whose all-reduce keeps them equal,
  that rank's dense gradients stand for every rank's);
- expert shards: on every rank of the experts group, each its own part (``layout``): ``E/W`` whole experts, or with
  ``E < W`` one hidden slice of one expert; the second (down-projection) bias, which the ``S = W/E`` ranks of an
  expert each hold whole, only on the expert's first shard;
- replicas of a shard (``dp_group`` / ``mesh``): their gradients are equal (the op sums them over the replicas),
  counted on the first replica only.

Each rank computes the norm of the gradients it counts (``torch.nn.utils.get_total_norm``); the pieces are
all-gathered over the experts group, then over the replica group, and combined in rank order, so every rank gets
the same total bit for bit and clips alike (``torch.nn.utils.clip_grads_with_norm_``). The gradients are whatever
the backward left (``state.py``: inside DDP the experts' are the mean over ranks, like DDP's dense ones), so after a
DDP step the total is the single-process model's gradient norm on the global batch.
"""
from __future__ import annotations

import math
import zlib
from typing import Iterable, Union

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .comm import Comm
from .layout import ParallelError
from .state import SLOTS, ParallelState, state_for
from .tags import device_of, expert_slots, parallel_modules, unwrapped

_WHO = "moe_compile.grad_norm / clip_grad_norm_"
Parameters = Union[nn.Module, Tensor, Iterable[Tensor]]


def _entries(model_or_parameters: Parameters) -> list[tuple[Tensor, ParallelState | None, str | None]]:
    """Each parameter with its sharded experts module's state and slot (``None, None`` for everything else): from
    the model's modules when given a model, else from the tags ``parallelize`` puts on the parameters."""
    if isinstance(model_or_parameters, nn.Module):  # DDP / torch.compile wrappers are looked through
        root = unwrapped(model_or_parameters)
        slots: dict[int, tuple[ParallelState, str]] = {}
        for _, m in parallel_modules(root):
            slots.update(expert_slots(m))
        return [(p, *slots.get(id(p), (None, None))) for p in root.parameters()]
    params = [model_or_parameters] if isinstance(model_or_parameters, Tensor) else list(model_or_parameters)
    out = []
    for p in params:
        key = getattr(p, "_moe_parallel_key", None)
        out.append((p, state_for(key), p._moe_slot) if key is not None else (p, None, None))
    return out


def _groups(states: list[ParallelState]) -> tuple[Comm, Comm | None]:
    """Fresh ``Comm``s (their bytes are not the experts' traffic) of the experts group and the replica group that
    every sharded module shares."""
    first = states[0]
    for st in states[1:]:
        if st.world.ranks != first.world.ranks or (st.dp.ranks if st.dp else None) != (
                first.dp.ranks if first.dp else None):
            raise ParallelError(
                f"{_WHO}: the experts modules {first.path} and {st.path} are sharded over "
                f"different process groups (ranks {first.world.ranks} and {st.world.ranks}); clip the parameters "
                "of each group's modules in separate calls")
    return Comm(first.world.group), (Comm(first.dp.group) if first.dp is not None else None)


def _local_problem(entries) -> str | None:
    """A sharded module given with only some of one kind of its parameters: their norm over the ranks would not
    be the norm of any set of the unparallelized model's parameters."""
    given: dict[tuple[str, str], set[int]] = {}
    states: dict[str, ParallelState] = {}
    for p, st, slot in entries:
        if st is not None:
            given.setdefault((st.key, slot), set()).add(id(p))
            states[st.key] = st
    for (key, slot), ids in given.items():
        st = states[key]
        held = st.slot_counts[SLOTS.index(slot)]
        if len(ids) != held:
            return (f"the parameters given hold {len(ids)} of the {held} local parameters of kind {slot!r} of the "
                    f"experts module {st.path}, which are shards of whole parameters split over the ranks; pass "
                    "all of them (model.parameters(), or the experts module's parameters())")
    return None


def _signature(entries) -> int:
    """A checksum of what this rank passes (shapes, dtypes, the experts' module and slot), equal on every rank that
    passes the same parameters of the same model."""
    items = sorted(repr((st.path if st is not None else "", slot or "", tuple(p.shape), str(p.dtype)))
                   for p, st, slot in entries)
    return zlib.crc32("\n".join(items).encode())


def _counted(st: ParallelState | None, slot: str | None, first_in_mesh: bool) -> bool:
    """Whether this rank counts the parameter's gradient (each element of the whole model once over the ranks)."""
    if st is None:
        return first_in_mesh
    if st.dp is not None and st.dp.rank != 0:
        return False  # another replica of the same shard counts it
    if slot == "b_down" and st.layout.S > 1:
        return st.layout.shard_index(st.rank) == 0  # the S shards of an expert each hold its second bias whole
    return True


def _counted_grad(g: Tensor, st: ParallelState | None, slot: str | None, first_in_mesh: bool) -> Tensor | None:
    """The part of ``g`` this rank counts, or None. A ``DTensor`` gradient (a dense parameter sharded by FSDP2)
    counts its local shard on the first rank of every dimension it is replicated over (HSDP's replicas), so each
    element once over its mesh; its mesh is the experts' mesh (``fsdp_grads`` checks the sizes)."""
    if isinstance(g, DTensor):
        if any(pl.is_partial() for pl in g.placements):
            raise ParallelError(f"{_WHO}: a gradient is a DTensor with a Partial placement (not yet reduced); "
                                "clip after the backward has finished")
        coord = g.device_mesh.get_coordinate() or []
        first = all(c == 0 for c, pl in zip(coord, g.placements) if pl.is_replicate())
        return g.to_local() if first else None
    return g if _counted(st, slot, first_in_mesh) else None


def _clip_with_norm(params: list[Tensor], max_norm: float, total: Tensor, foreach: bool | None) -> None:
    """``torch.nn.utils.clip_grads_with_norm_`` on plain gradients and on each DTensor mesh's separately (torch's
    foreach kernels take no mix of the two)."""
    groups: dict[object, list[Tensor]] = {}
    for p in params:
        g = p.grad
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(p)
    for key, ps in groups.items():
        torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total if key is None else total.detach().clone(), foreach)


def _combine(values: Tensor, p: float) -> Tensor:
    """The total of per-rank pieces (each ``norm ** p``, or a max norm for ``inf``), in rank order."""
    return values.max() if math.isinf(p) else values.sum()


def _gather(comm: Comm, piece: Tensor, flags: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(the group's total, ``[any problem, any signature differing, the first signature]``) from this rank's piece
    and ``flags`` of the same form: one small all-gather, equal on every rank of ``comm``."""
    table = comm.all_gather(torch.cat([piece.reshape(1), flags])).view(comm.size, 4)
    sigs = table[:, 3]
    agreed = torch.stack([table[:, 1].max(), torch.maximum(table[:, 2].max(), (sigs != sigs[0]).any().double()),
                          sigs[0]])
    return _combine(table[:, 0], p), agreed


def grad_norm(model_or_parameters: Parameters, norm_type: float = 2.0, error_if_nonfinite: bool = False,
              foreach: bool | None = None) -> Tensor:
    """The ``norm_type``-norm of the gradients of the unparallelized model's parameters that ``model_or_parameters``
    stands for, equal on every rank: a model (wrapped in ``DistributedDataParallel`` / ``torch.compile`` or not) or
    parameters, as ``torch.nn.utils.get_total_norm`` takes them (parameters without a gradient are skipped).

    With sharded experts modules it is a collective over their experts group (and replica group): every rank of
    it must call it, with the same parameters. Without any (one process, a group of one rank, only dense
    parameters) it is ``torch.nn.utils.get_total_norm`` of the gradients, with no communication.

    ``norm_type``: a positive number or ``inf`` (``-inf`` and ``0`` are not sums over parameters and are refused
    when experts are sharded). Raises ``ParallelError`` on every rank when the ranks pass different parameters or
    only some of a sharded module's parameters of one kind; ``RuntimeError`` (every rank) when
    ``error_if_nonfinite`` and the total is ``nan`` or ``inf``.
    """
    return _total_norm(_entries(model_or_parameters), norm_type, error_if_nonfinite, foreach)


@torch.no_grad()
def _total_norm(entries, norm_type: float, error_if_nonfinite: bool, foreach: bool | None) -> Tensor:
    grads = [p.grad for p, _, _ in entries if p.grad is not None]
    states = list({id(st): st for _, st, _ in entries if st is not None}.values())
    if not states:
        return torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    p = float(norm_type)
    if not (p > 0):
        raise ParallelError(f"{_WHO}: norm_type {norm_type} is not supported with sharded experts; use a "
                            "positive p or inf")
    ep, dp = _groups(states)
    first_in_mesh = ep.rank == 0 and (dp is None or dp.rank == 0)
    counted = [g for g in (_counted_grad(q.grad, st, slot, first_in_mesh) for q, st, slot in entries
                           if q.grad is not None) if g is not None]
    local = torch.nn.utils.get_total_norm(counted, p, False, foreach).double() if counted \
        else torch.zeros((), dtype=torch.float64)
    piece = local if math.isinf(p) else local ** p
    problem = _local_problem(entries)
    device = device_of(states)
    flags = torch.tensor([float(problem is not None), 0.0, float(_signature(entries))], dtype=torch.float64,
                         device=device)
    total, flags = _gather(ep, piece.to(device), flags, p)  # the experts group, then its replicas
    if dp is not None:
        total, flags = _gather(dp, total, flags, p)
    if bool(flags[0]) or bool(flags[1]):
        why = problem or ("a rank passed only part of a sharded experts module's parameters of one kind"
                          if bool(flags[0]) else
                          "the ranks passed different parameters (another number, shape or dtype, or other "
                          "experts modules)")
        raise ParallelError(f"{_WHO}: {why}. Every rank must pass the same parameters of the same model; no "
                            "gradient was changed")
    total = total.cpu() if math.isinf(p) else total.cpu() ** (1.0 / p)
    like = grads[0] if grads else torch.zeros(())
    total = total.to(dtype=like.dtype, device=like.device)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be clipped "
            "(on every rank). To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    return total


def clip_grad_norm_(model_or_parameters: Parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parallelized models: scale every gradient in place by
    ``min(max_norm / (total + 1e-6), 1)``, where ``total`` is :func:`grad_norm`, the norm of the unparallelized
    model's gradient (equal on every rank, so every rank scales alike), and return ``total``.

    A collective when experts are sharded (every rank of their group calls it, with the same parameters); without
    sharded experts it is torch's ``clip_grad_norm_``. Same arguments and errors as :func:`grad_norm`.
    """
    entries = _entries(model_or_parameters)
    total = _total_norm(entries, norm_type, error_if_nonfinite, foreach)
    with_grad = [p for p, _, _ in entries if p.grad is not None]
    if any(isinstance(p.grad, DTensor) for p in with_grad):
        _clip_with_norm(with_grad, max_norm, total, foreach)
    else:
        torch.nn.utils.clip_grads_with_norm_([p for p, _, _ in entries], max_norm, total, foreach)
    return total
