"""What an MoE block is, from a module's parameters alone: a router weight ``[E, H]`` and E experts that map H -> H.

``find_blocks(root)`` scans a module tree (no tracing, no running) for every module that holds

- **experts**: an ``nn.ModuleList`` / ``nn.ModuleDict`` of E >= 2 children of one class with parameters of the same
  shapes, made of ``nn.Linear`` layers that read and write a common size H; or one module owning two or three
  stacked ``[E, ., .]`` parameters in which H appears (HF experts modules, torchtitan's ``GroupedExperts``);
- **a router** of the same E and H outside the experts: an ``[E, H]`` parameter (an ``nn.Linear(H, E)``'s weight,
  its ``[E]`` bias with it, or a bare parameter);

and is the lowest module holding both. Nothing is decided by a class or parameter name: a candidate is only a
candidate, and what it computes is proven from its behaviour (``recognise.blocks``). A list of attention heads or of
layers has no ``[E, H]`` router beside it and is no candidate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BlockStructure:
    """One candidate MoE block. Names are relative to the block (``""``: the block itself)."""

    path: str  # from the scanned root ("" = the root)
    num_experts: int
    hidden: int
    router: str  # the [E, H] router weight
    router_bias: str | None  # the [E] bias of the router's nn.Linear, if it has one
    experts: str  # the ModuleList / ModuleDict, or the module owning the stacked weights
    stacked: tuple[str, ...]  # the stacked [E, ., .] weights (and [E, .] biases) when the experts are stacked
    others: tuple[str, ...]  # children holding parameters that are neither router nor experts (shared experts, norms)
    vectors: tuple[str, ...]  # other [E] parameters and floating buffers (selection-bias candidates)

    def describe(self) -> str:
        what = "stacked experts [E, ., .]" if self.stacked else f"{self.num_experts} experts ({self.experts})"
        return f"router [{self.num_experts}, {self.hidden}] ({self.router}), {what}"


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _rel(path: str, base: str) -> str:
    return path[len(base) + 1:] if base and path.startswith(base + ".") else ("" if path == base else path)


def _inside(path: str, base: str) -> bool:
    return not base or path == base or path.startswith(base + ".")


def _experts_groups(root: nn.Module):
    """``(path, E, {H candidates}, stacked names)`` for every experts group in ``root``."""
    for path, m in root.named_modules():
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            kids = list(m.children())
            if len(kids) < 2 or len({type(k) for k in kids}) != 1:
                continue
            shapes = [tuple(tuple(p.shape) for p in k.parameters()) for k in kids]
            if not shapes[0] or any(s != shapes[0] for s in shapes):
                continue
            lins = [c for c in kids[0].modules() if isinstance(c, nn.Linear)]
            hs = {c.in_features for c in lins} & {c.out_features for c in lins}
            if lins and hs:
                yield path, len(kids), hs, ()
            continue
        own = [(n, p) for n, p in m.named_parameters(recurse=False)]
        w3 = [(n, p) for n, p in own if p.dim() == 3]
        if len(w3) < 2 or len({p.shape[0] for _, p in w3}) != 1 or w3[0][1].shape[0] < 2:
            continue
        E = w3[0][1].shape[0]
        hs = set(w3[0][1].shape[1:])
        for _, p in w3[1:]:
            hs &= set(p.shape[1:])
        stacked = tuple(n for n, p in own if p.shape[:1] == (E,) and p.dim() in (2, 3))
        if hs:
            yield path, E, hs, stacked


def _routers(root: nn.Module, E: int, H: int, experts_path: str, stacked: tuple[str, ...]):
    """``(weight path, bias path | None)`` of every ``[E, H]`` parameter outside the experts."""
    modules = dict(root.named_modules())
    out = []
    for name, p in root.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if tuple(p.shape) != (E, H):
            continue
        if stacked and owner == experts_path and leaf in stacked:
            continue
        if not stacked and _inside(owner, experts_path):
            continue
        m = modules.get(owner)
        bias = None
        if isinstance(m, nn.Linear) and m.weight is p and m.bias is not None:
            bias = _join(owner, "bias")
        out.append((name, bias))
    return out


def _common(a: str, b: str) -> str:
    pa, pb = a.split(".") if a else [], b.split(".") if b else []
    common = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def find_blocks(root: nn.Module, finer=None) -> list[BlockStructure]:
    """Every candidate MoE block in ``root`` (see the module docstring), outermost first. ``finer(module)``: True
    for a module that another capture already takes whole (an HF experts module, a decorated one, an HF block):
    a candidate at or inside one is skipped."""
    modules = dict(root.named_modules())
    found: dict[str, BlockStructure] = {}
    for ex_path, E, hs, stacked in _experts_groups(root):
        for H in sorted(hs):
            for rw, rb in _routers(root, E, H, ex_path, stacked):
                block = _common(rw.rpartition(".")[0], ex_path)
                if isinstance(modules[block], (nn.ModuleList, nn.ModuleDict)):
                    continue
                if finer is not None and any(finer(modules[p]) for p in modules
                                             if _inside(block, p) or _inside(ex_path, p)):
                    continue
                if block in found:
                    continue
                bm = modules[block]
                taken = {_rel(ex_path, block), _rel(rw.rpartition(".")[0], block)}
                others = tuple(n for n, c in bm.named_children()
                               if n not in taken and not any(t == n or t.startswith(n + ".") for t in taken if t)
                               and any(True for _ in c.parameters()))
                skip = {_rel(rw, block), _rel(rb, block) if rb else None}
                vectors = tuple(n for n, t in [*bm.named_parameters(), *bm.named_buffers()]
                                if t.is_floating_point() and tuple(t.shape) == (E,) and n not in skip
                                and not _inside(_join(block, n), ex_path))
                found[block] = BlockStructure(
                    path=block, num_experts=E, hidden=H, router=_rel(rw, block),
                    router_bias=_rel(rb, block) if rb else None, experts=_rel(ex_path, block),
                    stacked=tuple(_rel(_join(ex_path, s), block) for s in stacked), others=others, vectors=vectors)
    # a block inside another candidate is the finer one: keep the innermost
    paths = sorted(found, key=lambda p: -len(p))
    keep: list[str] = []
    for p in paths:
        if not any(_inside(k, p) and k != p for k in keep):
            keep.append(p)
    return [found[p] for p in sorted(keep, key=len)]


def block_of(module: nn.Module, finer=None) -> BlockStructure | None:
    """``module``'s own structure when ``module`` itself is a candidate block (its path ``""``), else None."""
    for b in find_blocks(module, finer):
        if b.path == "":
            return b
    return None
