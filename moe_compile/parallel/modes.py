"""``set_parallel`` / ``get_parallel`` / ``set_rates``: the mode every parallelized experts module runs next."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import cost
from .comm import Comm
from .layout import ParallelError
from .state import MODES, ParallelState
from .tags import device_of, parallel_states, replicated_records

def set_parallel(model: nn.Module, mode: str) -> nn.Module:
    """Run ``mode`` from the next experts call on (every parallelized experts module of ``model``).

    Call it on every rank with the same mode, between steps. It checks agreement with one tiny all-gather and
    raises on every rank, changing nothing, when a rank asks for another mode or a mode a module cannot run:
    ``tensor`` with ``E >= W``; ``expert``/``data``/``tensor`` on a module ``parallelize`` kept replicated;
    ``replicate`` on a sharded one (storage is chosen by ``parallelize`` only). ``auto`` runs on either.
    Compiled graphs are not recompiled: the mode is read when the op runs.
    """
    states = parallel_states(model)
    replicated = replicated_records(model)
    if not states and not replicated:
        noop = [m for m in model.modules() if getattr(m, "_moe_parallel_noop", False)]
        if not noop:
            raise ParallelError("moe_compile.set_parallel: the model has no parallelized experts modules; call "
                                "moe_compile.parallelize(model) first")
        if mode not in MODES:
            raise ParallelError(f"moe_compile.set_parallel: unknown parallel mode {mode!r}; known: {MODES}")
        for m in noop:
            m._moe_parallel_mode = mode
        return model
    records = states + replicated
    by_problem: dict[str, list[str]] = {}
    for r in records if mode in MODES else []:
        why = r.mode_problem(mode)
        if why:
            by_problem.setdefault(why, []).append(r.path)
    problems = [f"{', '.join(paths)}: {why}" for why, paths in by_problem.items()]
    code = MODES.index(mode) if mode in MODES else -1
    groups = []
    for g in [st.world.group for st in states] + [r.group for r in replicated]:
        if g is not None and not any(g is h for h in groups):
            groups.append(g)
    tables = []
    for g in groups:
        c = Comm(g)
        device = torch.device("cuda", torch.cuda.current_device()) if _on_cuda(g) else torch.device("cpu")
        tables.append(c.all_gather(torch.tensor([code, len(problems)], dtype=torch.long,
                                                device=device)).view(c.size, 2).tolist())
    if not tables:  # replicated modules only, unpickled (no process group): this rank's view
        tables = [[[code, len(problems)]]]
    for table in tables:
        names = [MODES[t[0]] if t[0] >= 0 else "<unknown>" for t in table]
        if any(t != table[0] for t in table) or code < 0 or problems:
            if any(n != names[0] for n in names):
                why = "ranks disagree on the parallel mode: " + ", ".join(
                    f"rank {r} {n!r}" for r, n in enumerate(names))
            elif code < 0:
                why = f"unknown parallel mode {mode!r}; known: {MODES}"
            else:
                why = "; ".join(problems)
            raise ParallelError("moe_compile.set_parallel: " + why + "; nothing was changed")
    if mode == "auto":
        for st in states:
            if not st.rates.measured and not st.rates_fixed:
                _measure(st)
    for r in records:
        r.mode = mode
    return model


def _on_cuda(group) -> bool:
    return dist.get_backend(group) == "nccl" and torch.cuda.is_available()


def _measure(st: ParallelState) -> None:
    granks = tuple(st.world.ranks)
    rkey = (granks, st.local_world_size)
    if rkey not in cost.RATES:
        intra = Comm(st.a2a.intra.group) if st.a2a.hierarchical else None
        inter = Comm(st.a2a.inter.group) if st.a2a.hierarchical else None
        cost.RATES[rkey] = cost.measure_rates(Comm(st.world.group), st.layout.H, st.layout.F, torch.float32, intra, inter,
                                          device=device_of([st]))
    st.rates = cost.RATES[rkey]


def get_parallel(model: nn.Module) -> str | None:
    """The mode set on ``model``'s experts modules (None if it was never parallelized)."""
    records = parallel_states(model) + replicated_records(model)
    if records:
        return records[0].mode
    noop = [m for m in model.modules() if getattr(m, "_moe_parallel_noop", False)]
    return noop[0]._moe_parallel_mode if noop else None


def set_rates(model: nn.Module, rates: cost.Rates) -> None:
    """Use ``rates`` (instead of measured ones) in ``model``'s per-call auto decisions (same on every rank);
    ``set_parallel(model, "auto")`` then measures nothing. The storage layout was chosen by ``parallelize``
    (with its ``rates=``) and does not change."""
    for st in parallel_states(model):
        st.rates, st.rates_fixed = rates, True
