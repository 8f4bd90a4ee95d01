"""``moe_compile.explain``: what the backend would fuse in a model, and why anything is left alone."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .passes.rewrite import Region, fuse_moe
from .scope import moe_scope


@dataclass
class Report:
    regions: list[Region] = field(default_factory=list)
    graph_breaks: int = 0
    break_reasons: list[str] = field(default_factory=list)
    graphs: int = 0
    parallel: object = None  # moe_compile.parallel.ParallelReport of a parallelized model (what "auto" chose)

    @property
    def fused(self) -> list[Region]:
        return [r for r in self.regions if r.fused]

    def __str__(self) -> str:
        rows = [("module", "pattern", "fused", "reason")]
        rows += [(r.module_path, r.pattern, "yes" if r.fused else "no", r.reason) for r in self.regions]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"moe_compile.explain: {len(self.fused)}/{len(self.regions)} MoE regions fused, "
                 f"{self.graphs} graph(s), {self.graph_breaks} graph break(s)"]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + ("  " + r[3] if r[3] else ""))
        for reason in self.break_reasons:
            lines.append(f"graph break: {reason}")
        if self.parallel is not None and getattr(self.parallel, "blocks", None):
            lines.append(str(self.parallel))
        return "\n".join(lines)


def explain(model, *args, **kwargs) -> Report:
    """Trace ``model(*args, **kwargs)`` as ``torch.compile(model, backend="moe")`` would, without compiling or
    running the fused ops, and report every MoE region: fused or not, and why. It resets Dynamo's caches (a model
    compiled earlier recompiles on its next call). For a parallelized model it also reports each block's parallel
    mode and what ``auto`` chose; it runs the model, so every rank must call it."""
    from . import install_capture

    install_capture()
    report = Report()

    def collect(gm, example_inputs):
        report.graphs += 1
        report.regions += fuse_moe(gm, rewrite=False)
        return gm.forward

    with moe_scope():
        out = torch._dynamo.explain(model)(*args, **kwargs)
    report.graph_breaks = out.graph_break_count
    report.break_reasons = [str(b.reason) for b in out.break_reasons]
    torch._dynamo.reset()
    with moe_scope():
        torch.compile(model, backend=collect)(*args, **kwargs)
    torch._dynamo.reset()
    from .parallel import parallel_report

    report.parallel = parallel_report(model)
    return report
