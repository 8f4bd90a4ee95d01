"""Finding a model's experts modules eagerly, before any compile.

An experts module has the contract ``forward(hidden [T, H], topk_idx [T, k], topk_weights [T, k]) -> [T, H]``.
Found, in this order:

1. modules the capture already knows: classes decorated with ``@moe_compile.experts`` and HF transformers experts
   modules (``@use_experts_implementation``);
2. modules whose ``forward`` takes exactly three arguments and that hold stacked ``[E, ., .]`` weights or one
   ``nn.ModuleList`` of MLP experts (2-3 ``nn.Linear`` each);
3. with ``example_inputs``: any module the model calls with the experts contract's arguments (a ``[T, H]`` float, a
   ``[T, k]`` integer and a ``[T, k]`` float tensor), seen by forward pre-hooks while the model runs once on fake
   tensors (or on the real inputs under ``no_grad`` when the model's own code needs real values). The calls seen
   also give ``k`` and the tokens per call (``Found.tokens``), which ``auto`` costs its layout choice by.

Each candidate goes through ``passes.detect.recognise_module``, the recognition the backend uses (the same proof on
random parameters, the same cache): that is what fills the spec and the parameter slots. A module found by its shape
alone (three forward arguments and 3D weights, say) that is not proven to be experts is left alone, with a note.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .. import capture
from ..passes.detect import ExpertsMatch, recognise_module


@dataclass
class Found:
    path: str
    module: nn.Module
    match: ExpertsMatch
    top_k: int
    tokens: int | None = None  # tokens per call (the ``[T, k]`` index's T) when the trace saw the module called


def _n_forward_args(module: nn.Module) -> int | None:
    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return None
    ps = list(sig.parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ps):
        return None
    return sum(1 for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _is_mlp(m: nn.Module) -> bool:
    lins = [c for c in m.modules() if isinstance(c, nn.Linear)]
    owned = {id(p) for c in lins for p in c.parameters()}
    return 2 <= len(lins) <= 3 and all(id(p) in owned for p in m.parameters())


def expert_list(module: nn.Module) -> tuple[str, nn.ModuleList] | tuple[None, None]:
    """The one ``nn.ModuleList`` of MLP experts inside ``module`` (name, list), if there is exactly one."""
    lists = [(n, m) for n, m in module.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and all(_is_mlp(e) for e in m)]
    return lists[0] if len(lists) == 1 else (None, None)


def _structural(module: nn.Module) -> bool:
    if any(p.dim() == 3 for p in module.parameters()):
        return True
    return expert_list(module)[0] is not None


def _top_k(module: nn.Module, parent: nn.Module | None) -> int:
    for owner in (module, parent):
        if owner is None:
            continue
        for holder in (owner, getattr(owner, "config", None)):
            for name in ("top_k", "num_experts_per_tok", "topk", "k"):
                v = getattr(holder, name, None)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return 2


def _contract(vals) -> bool:
    if len(vals) != 3 or not all(isinstance(v, torch.Tensor) for v in vals):
        return False
    x, idx, w = vals
    return (x.dim() == 2 and x.is_floating_point() and idx.dim() == 2 and not idx.is_floating_point()
            and idx.dtype != torch.bool and w.shape == idx.shape and w.is_floating_point()
            and idx.shape[0] == x.shape[0])


def _traced(model: nn.Module, example_inputs) -> dict[int, tuple[int, int]]:
    """id(module) -> (k, tokens per call) for every module the model calls with the experts contract's arguments.

    Forward pre-hooks watch every call; the model runs once on fake tensors, or, when its code needs real values
    (a data-dependent experts loop, say), once on the real inputs under ``no_grad``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen: dict[int, tuple[int, int]] = {}

    def hook(m, args, kwargs):
        vals = list(args) + list(kwargs.values())
        if _contract(vals):
            seen[id(m)] = (int(vals[1].shape[-1]), int(vals[1].shape[0]))

    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if m is not model]
    old = capture.ENABLED
    capture.ENABLED = False
    try:
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as fm, torch.no_grad():
                conv = lambda t: fm.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
                model(*[conv(a) for a in args], **{k: conv(v) for k, v in kwargs.items()})
        except Exception:  # noqa: BLE001 - the model needs real values: run it for real
            with torch.no_grad():
                model(*args, **kwargs)
    finally:
        capture.ENABLED = old
        for h in handles:
            h.remove()
    return seen


@contextlib.contextmanager
def _eager_hf_experts(module: nn.Module):
    """HF experts run their ``experts_implementation`` (grouped_mm by default in a full model), which has no
    float64 kernel; the detector's float64 proof runs the eager loop, the implementations' common definition."""
    cfg = getattr(module, "config", None)
    impl = getattr(cfg, "_experts_implementation", None)
    if impl is None or impl == "eager":
        yield
        return
    cfg._experts_implementation = "eager"
    try:
        yield
    finally:
        cfg._experts_implementation = impl


def _probe_failed(match: ExpertsMatch) -> bool:
    return "forward failed" in match.reason or "does not return" in match.reason


def find_experts(model: nn.Module, example_inputs=None) -> tuple[list[Found], list[str], list[str]]:
    """(experts modules found, problems with modules that look like experts but cannot be sharded, notes)."""
    parent: dict[int, nn.Module] = {}
    for m in model.modules():
        for c in m.children():
            parent[id(c)] = m
    traced = _traced(model, example_inputs) if example_inputs is not None else {}
    found, problems, notes = [], [], []
    taken: list[str] = []
    inline: list[tuple[str, str]] = []  # (layer, its expert list) for layers that dispatch inline
    for path, m in model.named_modules():
        if any(path == t or path.startswith(t + ".") for t in taken):
            continue
        if getattr(m, "_moe_parallel_key", None) is not None or getattr(m, "_moe_replicated", None) is not None:
            problems.append(f"{path or '<model>'}: already parallelized")
            taken.append(path)
            continue
        known = capture.is_captured_class(m)
        shaped = _n_forward_args(m) == 3 and _structural(m)
        if not (known or shaped or id(m) in traced):
            lname, lst = expert_list(m)
            router = lst is not None and any(isinstance(c, nn.Linear) and c.out_features == len(lst)
                                              for n, c in m.named_children() if n != lname)
            if router:
                inline.append((path, f"{path}.{lname}" if path else lname))
            continue
        k, tokens = traced.get(id(m), (None, None))
        k = k or _top_k(m, parent.get(id(m)))
        with _eager_hf_experts(m):
            match = recognise_module(m, top_k=k)
        if not match.ok:
            msg = f"{path or '<model>'} ({type(m).__name__}): {match.reason}"
            if known or (id(m) in traced and not _probe_failed(match)):
                problems.append(msg)
                taken.append(path)
            else:  # found by its shape (or call) alone and not proven to be experts: not an experts module to us
                notes.append(f"{msg} (not recognised as an experts module; left alone)")
            continue
        taken.append(path)
        found.append(Found(path, m, match, k, tokens))
    for path, lpath in inline:
        if not any(lpath == t or lpath.startswith(t + ".") for t in taken):
            notes.append(f"{path or '<model>'}: a router beside a ModuleList of experts, but the dispatch is "
                         "computed inline; move the experts into a module with forward(hidden, topk_idx, "
                         "topk_weights) (or decorate one with @moe_compile.experts) to shard them")
    return found, problems, notes
