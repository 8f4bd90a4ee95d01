"""``moe_compile.explain``: what the backend would fuse in a model, and why anything is left alone."""
from __future__ import annotations

import os
import types
from dataclasses import dataclass, field

import torch

from . import compat
from .compat import dynamo
from .passes import Region, fuse_moe
from .recognise.block_proof import match_of
from .recognise.structure import find_blocks
from .scope import moe_scope


@dataclass
class Report:
    regions: list[Region] = field(default_factory=list)
    graph_breaks: int = 0
    break_reasons: list[str] = field(default_factory=list)
    graphs: int = 0
    parallel: object = None  # moe_compile.parallel.ParallelReport of a parallelized model (what "auto" chose)
    off: dict = field(default_factory=dict)  # features off on this torch / transformers (compat.off()): why

    @property
    def fused(self) -> list[Region]:
        return [r for r in self.regions if r.fused]

    def __str__(self) -> str:
        rows = [("module", "pattern", "fused", "reason")]
        rows += [(r.module_path, r.pattern, "yes" if r.fused else "no", r.reason) for r in self.regions]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"moe_compile.explain: {len(self.fused)}/{len(self.regions)} MoE regions fused, "
                 f"{self.graphs} graph(s), {self.graph_breaks} graph break(s)"]
        lines += [f"{feature} off: {why}" for feature, why in self.off.items()]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + ("  " + r[3] if r[3] else ""))
        for reason in self.break_reasons:
            lines.append(f"graph break: {reason}")
        if self.parallel is not None and getattr(self.parallel, "blocks", None):
            lines.append(str(self.parallel))
        return "\n".join(lines)


def moe_like_blocks(model: torch.nn.Module) -> dict[str, str]:
    """{module path: what it holds} for every candidate MoE block of ``model`` found from its structure alone
    (``recognise.structure.find_blocks``: a router ``[E, H]`` beside E experts), so that explain lists every such
    block, also one that no graph holds whole. Experts without a router beside them are no candidate."""
    return {b.path or "<top>": b.describe() for b in find_blocks(model)}


def _root_path(model: torch.nn.Module, region: Region) -> str | None:
    """The region's module path from ``model``'s root: its captured module's, or else the module above the experts'
    parameters (the parent of their list, or their owner); None when neither is known."""
    m = region.module() if region.module is not None else None
    if m is not None:
        found = [p for p, mod in model.named_modules() if mod is m]
        return (found[0] or "<top>") if found else None
    ids = {id(ref()) for ref in region.weights if ref() is not None}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    if not names:
        return None
    owners = [n.split(".")[:-1] for n in names]
    common = os.path.commonprefix(owners)  # works on lists: the longest common run of path components
    while common and isinstance(model.get_submodule(".".join(common)), (torch.nn.ModuleList, torch.nn.ModuleDict)):
        common = common[:-1]  # a list of experts: the block is the module that holds it
    return ".".join(common) or "<top>"


def _covered(path: str, regions) -> bool:
    return any(r.module_path == path or r.module_path.startswith(path + ".") or path.startswith(r.module_path + ".")
               for r in regions)


def regions_of(module: torch.nn.Module, *args, **kwargs) -> list[Region]:
    """The MoE regions the backend finds in ``module(*args, **kwargs)``, traced once by Dynamo as a moe frame and
    run unfused (nothing rewritten). Unlike :func:`explain` it resets no Dynamo cache: it traces a copy of the
    forward's code object, whose compiled entries die with it, so no other compiled code is touched or kept."""
    forward = type(module).forward
    code = forward.__code__.replace()  # a distinct code object: Dynamo's cache entries hang on it
    copy = types.FunctionType(code, forward.__globals__, forward.__name__, forward.__defaults__, forward.__closure__)
    copy.__kwdefaults__ = forward.__kwdefaults__
    found: list[Region] = []

    def collect(gm, example_inputs):
        found.extend(fuse_moe(gm, rewrite=False))
        return gm.forward

    with moe_scope():
        torch.compile(copy, backend=collect)(module, *args, **kwargs)
    return found


def explain(model, *args, **kwargs) -> Report:
    """Trace ``model(*args, **kwargs)`` as ``torch.compile(model, backend="moe")`` would, without compiling or
    running the fused ops, and report every MoE region: fused or not, and why. It resets Dynamo's caches (a model
    compiled earlier recompiles on its next call). ``model`` may be wrapped in ``torch.compile`` and / or
    ``DistributedDataParallel``: the module inside is traced (paths are its own). For a parallelized model each
    parallelized experts module is one fused ``moe_compile::parallel_experts`` call, listed with its parallel mode
    and storage, and the report adds what ``auto`` chose; it runs the model, so every rank must call it."""
    from . import install_capture
    from .parallel.tags import unwrapped

    install_capture()
    model = unwrapped(model)
    report = Report()

    def collect(gm, example_inputs):
        report.graphs += 1
        report.regions += fuse_moe(gm, rewrite=False)
        return gm.forward

    with moe_scope():
        out = dynamo.explain(model)(*args, **kwargs)
    report.graph_breaks = out.graph_break_count
    report.break_reasons = [str(b.reason) for b in out.break_reasons]
    dynamo.reset()
    with moe_scope():
        torch.compile(model, backend=collect)(*args, **kwargs)
    dynamo.reset()
    report.off = compat.off()
    modules = dict(model.named_modules())
    for r in report.regions:  # a frame's paths are relative to its own module: name such blocks from the root
        if r.module_path == "<top>" or r.module_path not in modules:
            path = _root_path(model, r)
            r.module_path = path if path is not None else r.module_path
    for b in find_blocks(model):
        path = b.path or "<top>"
        if _covered(path, report.regions):
            continue
        match = match_of(model.get_submodule(b.path))
        breaks = ("no traced graph holds it whole: " + report.break_reasons[0].splitlines()[0]
                  if report.break_reasons else "Dynamo traced no graph that holds it")
        if match is not None and not match.ok:
            why = f"found by structure, not fused: {match.reason}; its own code ran ({breaks})"
        else:
            why = (f"{breaks}; capture its experts whole with @moe_compile.experts on a module with "
                   "forward(hidden, topk_idx, topk_weights), or remove the graph break")
        report.regions.append(Region(path, f"MoE-like block ({b.describe()})", False, why))
    from .parallel import parallel_report

    report.parallel = parallel_report(model)
    return report
