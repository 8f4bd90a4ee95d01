"""``parallel_report``: what each experts module ``parallelize`` handled holds, runs and sends, and why it is
sharded or replicated."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..passes.graph import PREFUSED
from ..spec import MoESpec
from .op import PARALLEL_EXPERTS
from .state import ParallelState, state_for


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
    layout: str = "sharded"  # or "replicated" (whole on every rank; DDP all-reduces the gradients)
    layout_reason: str = ""  # who chose the layout and why (cost.LayoutChoice.describe)
    layout_estimate: dict[str, float] = field(default_factory=dict)  # seconds per step, per layout / mode


@dataclass
class ParallelReport:
    blocks: list[BlockReport] = field(default_factory=list)
    rates: str = ""

    def __str__(self) -> str:
        if not self.blocks:
            return "moe_compile.parallel: no parallelized experts modules"
        lines = [f"moe_compile.parallel: {len(self.blocks)} experts module(s); rates {self.rates}"]
        for b in self.blocks:
            if b.layout == "replicated":
                lines.append(f"  {b.path}: {b.storage}; mode {b.mode}, runs its own forward on this rank's tokens; "
                             f"{b.layout_reason}")
                continue
            chosen = f"auto -> {b.last}" if b.mode == "auto" and b.last else (b.last or b.mode)
            line = (f"  {b.path}: {b.storage}; mode {b.mode}, last call {chosen}; calls {b.calls}; "
                    f"sent {b.bytes_sent / 1e6:.3f} MB; all-to-all "
                    + (f"hierarchical available, last call {'hierarchical' if b.last_hierarchical else 'flat'}"
                       if b.hierarchical else "flat"))
            if b.capacity is not None:
                line += f"; padded to capacity {b.capacity}"
            if b.estimate:
                line += "; auto estimate " + ", ".join(f"{m} {s * 1e3:.3f} ms" for m, s in b.estimate.items())
            if b.layout_reason:
                line += f"; layout: {b.layout_reason}"
            lines.append(line)
        return "\n".join(lines)


def storage(st: ParallelState) -> str:
    """What each rank holds of the module's experts, e.g. ``2 of 4 experts per rank``."""
    lay = st.layout
    out = (f"{lay.El} of {lay.E} experts per rank" if lay.E >= lay.W
           else f"1/{lay.S} of one expert's hidden size ({lay.Fl} of {lay.F}) per rank")
    return out + (f", {st.DP} replicas" if st.DP > 1 else "")


def describe_call(key: str) -> tuple[str, MoESpec]:
    """explain's row for a ``moe_compile::parallel_experts`` node: its mode now and its storage, and the whole
    module's spec (the mode can change on any step; the node stays the same)."""
    st = state_for(key)
    kind = "stacked" if st.spec.stacked else "ModuleList"
    return f"parallel {st.mode}, {storage(st)} ({kind} experts, {st.spec.activation})", st.spec


PREFUSED[PARALLEL_EXPERTS] = describe_call  # explain and the passes report the node as a fused experts call


def parallel_report(model: nn.Module) -> ParallelReport:
    """Per experts module: its storage (sharded, or replicated and why), the mode it runs, what ``auto`` chose
    per call and why, bytes sent."""
    rep = ParallelReport()
    seen: set[int] = set()
    for m in model.modules():
        st, rec = getattr(m, "_moe_parallel", None), getattr(m, "_moe_replicated", None)
        if st is not None and id(st) not in seen:
            seen.add(id(st))
            lay = st.layout
            choice = st.layout_choice
            rep.blocks.append(BlockReport(st.path, lay.E, lay.W, storage(st), st.mode, st.stats.last_mode,
                                          dict(st.stats.calls), dict(st.stats.last_estimate), st.traffic.total,
                                          st.a2a.hierarchical, st.stats.last_hierarchical, st.stats.capacity,
                                          "sharded", choice.describe() if choice else "",
                                          dict(choice.estimates) if choice else {}))
            rep.rates = st.rates.describe("given" if st.rates_fixed else None)
        elif rec is not None and id(rec) not in seen:
            seen.add(id(rec))
            whole = (f"replicated: all {rec.experts} experts on each of the {rec.world_size} ranks, gradients "
                     "all-reduced by DDP")
            rep.blocks.append(BlockReport(rec.path, rec.experts, rec.world_size, whole, rec.mode, None, {}, {},
                                          0, False, False, None, "replicated", rec.choice.describe(),
                                          dict(rec.choice.estimates)))
            rep.rates = rep.rates or rec.rates.describe("given" if rec.rates_given else None)
    return rep
