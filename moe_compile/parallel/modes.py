"""``set_parallel`` / ``get_parallel`` / ``set_rates``: the mode every parallelized experts module runs next."""
from __future__ import annotations

import torch
from torch import nn

from . import cost
from .comm import Comm
from .layout import ParallelError
from .state import MODES, ParallelState
from .tags import device_of, parallel_states

def set_parallel(model: nn.Module, mode: str) -> nn.Module:
    """Run ``mode`` from the next experts call on (every parallelized experts module of ``model``).

    Call it on every rank with the same mode, between steps. It checks agreement with one tiny all-gather and
    raises on every rank, changing nothing, when a rank asks for another mode or a mode a module cannot run.
    Compiled graphs are not recompiled: the mode is read when the op runs.
    """
    states = parallel_states(model)
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
                                          device=device_of(states))).view(c.size, 2).tolist()
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
    states = parallel_states(model)
    if states:
        return states[0].mode
    noop = [m for m in model.modules() if getattr(m, "_moe_parallel_noop", False)]
    return noop[0]._moe_parallel_mode if noop else None


def set_rates(model: nn.Module, rates: cost.Rates) -> None:
    """Use ``rates`` (instead of measured ones) in ``model``'s auto decisions (same on every rank)."""
    for st in parallel_states(model):
        st.rates = rates
