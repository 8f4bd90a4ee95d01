"""Finding a model's experts modules eagerly, before any compile.

An experts module has the contract ``forward(hidden [T, H], topk_idx [T, k], topk_weights [T, k]) -> [T, H]``.
Found, in this order:

1. modules the capture already knows: classes decorated with ``@moe_compile.experts`` and HF transformers experts
   modules (HF's experts-implementation decorator);
2. modules whose ``forward`` takes exactly three arguments and that hold stacked ``[E, ., .]`` weights or one
   ``nn.ModuleList`` of MLP experts (2-3 ``nn.Linear`` each);
3. with ``example_inputs``: any module the model calls with the experts contract's arguments (a ``[T, H]`` float, a
   ``[T, k]`` integer and a ``[T, k]`` float tensor), seen by forward pre-hooks while the model runs once on fake
   tensors (or on the real inputs under ``no_grad`` when the model's own code needs real values). The calls seen
   also give ``k`` and the tokens per call (``Found.tokens``), which ``auto`` costs its layout choice by.

Each candidate goes through ``recognise.experts.recognise_module``, the recognition the backend uses (the same proof on
random parameters, the same cache): that is what fills the spec and the parameter slots. A module found by its shape
alone (three forward arguments and 3D weights, say) that is not proven to be experts is left alone, with a note.

4. blocks that dispatch inline: a router ``nn.Linear`` with E outputs beside one ``nn.ModuleList`` of E MLP experts,
   the dispatch and combine written in the block's own forward. Such a block is traced once by Dynamo as the
   backend traces it (``explain.regions_of``: the same passes, the same proof), on the arguments ``example_inputs``
   gave it or, when its forward takes one tensor, on random hidden states ``[2, 8, H]`` then ``[16, H]``; the
   region the inline pass fuses gives the spec and the slots. A block the backend does not fuse is a problem
   (``parallelize`` raises, naming it and the reason).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import capture
from ..compat import dynamo
from ..recognise.experts import ExpertsMatch, recognise_module


@dataclass
class Found:
    path: str
    module: nn.Module  # the experts module, or the ModuleList of a block that dispatches inline
    match: ExpertsMatch
    top_k: int
    block: nn.Module | None = None  # the block around an inline ModuleList (None for experts modules)
    tokens: int | None = None  # tokens per call (the ``[T, k]`` index's T) when the trace saw the module called


def _forward_params(module: nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of ``module``'s forward after ``self`` (None when it has no signature to read)."""
    try:
        return list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None


def _positional(p: inspect.Parameter) -> bool:
    return p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)


def _n_forward_args(module: nn.Module) -> int | None:
    ps = _forward_params(module)
    if ps is None or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ps):
        return None
    return sum(1 for p in ps if _positional(p))


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


def _describe(v):
    """A call argument kept as what it looks like (a tensor's shape, dtype and device), to be drawn again at random."""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.device)
    return ("value", v)


def _draw(d):
    if d[0] == "value":
        return d[1]
    _, shape, dtype, device = d
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def _traced(model: nn.Module, example_inputs, watch: dict[int, list] | None = None) -> dict[int, tuple[int, int]]:
    """id(module) -> (k, tokens per call) for every module the model calls with the experts contract's arguments; the first call's
    arguments of the modules in ``watch`` (id -> list to fill with ``(args, kwargs)`` descriptions).

    Forward pre-hooks watch every call; the model runs once on fake tensors, or, when its code needs real values
    (a data-dependent experts loop, say), once on the real inputs under ``no_grad``."""
    seen: dict[int, tuple[int, int]] = {}
    watch = watch if watch is not None else {}

    def hook(m, args, kwargs):
        vals = list(args) + list(kwargs.values())
        if _contract(vals):
            seen[id(m)] = (int(vals[1].shape[-1]), int(vals[1].shape[0]))
        if id(m) in watch and not watch[id(m)]:
            watch[id(m)].append(([_describe(a) for a in args], {k: _describe(v) for k, v in kwargs.items()}))

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
            with dynamo.fake_mode() as fm, torch.no_grad():
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


def _probe_failed(match: ExpertsMatch) -> bool:
    return "forward failed" in match.reason or "does not return" in match.reason


def _inline_candidate(m: nn.Module):
    """(list name, list, router) when ``m`` holds a router Linear with E outputs (its own, or in a router module
    of its own, as torchtitan writes it) beside one ModuleList of E MLPs."""
    lname, lst = expert_list(m)
    if lst is None or not lname or "." in lname:  # a list inside an experts module in the block is its own
        return None
    routers = [c for n, c in m.named_modules() if n and not (n == lname or n.startswith(lname + "."))
               and isinstance(c, nn.Linear) and c.out_features == len(lst)]
    return (lname, lst, routers[0]) if routers else None


def _trial_inputs(block: nn.Module, router: nn.Linear, seen: list) -> list:
    """The argument sets to trace ``block`` on: its first call's in ``example_inputs``, else random hidden states."""
    if seen:
        args, kwargs = seen[0]
        return [(tuple(_draw(a) for a in args), {k: _draw(v) for k, v in kwargs.items()})]
    if _n_required(block) != 1:
        return []
    H, kw = router.in_features, {"dtype": router.weight.dtype, "device": router.weight.device}
    return [((torch.randn(2, 8, H, **kw),), {}), ((torch.randn(16, H, **kw),), {})]


def _n_required(module: nn.Module) -> int | None:
    ps = _forward_params(module)
    return None if ps is None else sum(1 for p in ps if _positional(p) and p.default is p.empty)


_INLINE_PROOFS: dict[tuple, tuple] = {}  # block structure -> the trace's verdict (specs and strings only)


def _block_key(block: nn.Module, lname: str, inputs: list) -> tuple:
    """What the trace of a block depends on: its class and code, its parameters' names, shapes and dtypes, its
    plain attributes (``top_k``...), and the shapes it is traced on. Blocks alike (every layer of a model) are
    traced once."""
    params = tuple((n, tuple(p.shape), str(p.dtype), str(p.device)) for n, p in block.named_parameters())
    attrs = tuple(sorted((k, v) for m in block.modules() for k, v in vars(m).items()
                         if isinstance(v, (bool, int, float, str)) and not k.startswith("_")))
    shapes = tuple((tuple(map(str, a)), tuple(sorted((k, str(v)) for k, v in kw.items()))) for a, kw in
                   (([(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for t in args],
                     {k: (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for k, t in kwargs.items()})
                    for args, kwargs in inputs))
    return type(block), type(block).forward.__code__, lname, params, attrs, shapes


def recognise_inline(path: str, block: nn.Module, lname: str, lst: nn.ModuleList, inputs: list
                     ) -> tuple[Found | None, str]:
    """Trace ``block`` as the backend would and take the region the inline pass fuses over ``lst``: the
    :class:`Found` (spec and slots as the backend proved them), or None and why not."""
    name = path or "<model>"
    if not inputs:
        return None, (f"{name}: a router beside a ModuleList of experts, dispatched inline; its forward takes "
                      "other arguments than one hidden-states tensor: pass example_inputs to parallelize so it can "
                      "trace the block")
    key = _block_key(block, lname, inputs)
    if key not in _INLINE_PROOFS:
        _INLINE_PROOFS[key] = _trace_inline(block, lst, inputs)
    verdict = _INLINE_PROOFS[key]
    if verdict[0] != "ok":
        return None, f"{name}: {verdict[1]}"
    _, spec, slots, pattern = verdict
    match = ExpertsMatch(spec, {s: list(v) for s, v in slots.items()}, "", pattern)  # names in lst
    return Found(f"{path}.{lname}" if path else lname, lst, match, spec.top_k, block), ""


def _trace_inline(block: nn.Module, lst: nn.ModuleList, inputs: list) -> tuple:
    """``("ok", spec, slots, pattern)`` or ``("no", why)``, from tracing ``block`` on each argument set in turn."""
    from ..explain import regions_of

    mine = {id(p) for p in lst.parameters()}
    errors = []
    for args, kwargs in inputs:
        try:
            with torch.no_grad():
                regions = regions_of(block, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the next input shape, or reported
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        ours = [r for r in regions if {id(ref()) for ref in r.weights if ref() is not None} == mine]
        if not ours:
            errors.append("no MoE region over its experts in the traced graph")
            continue
        r = ours[0]
        if not r.fused:
            return "no", f"the backend does not fuse this block, so it cannot be sharded: {r.reason}"
        if r.spec.dispatch != "topk" or not r.slots:
            return "no", (f"the backend fuses this block as {r.pattern}, which parallelize cannot shard yet "
                          "(GShard-style capacity dispatch); move the experts into an experts module (forward("
                          "hidden, topk_idx, topk_weights)) to shard them")
        return "ok", r.spec, {s: list(v) for s, v in r.slots.items()}, r.pattern
    return "no", f"tracing the block for parallelize failed ({'; '.join(errors)}); pass example_inputs"


_ALREADY = ("{}: already parallelized (parallelize runs once per model; change the mode with "
            "moe_compile.set_parallel(model, mode))")


def _parallelized(m: nn.Module) -> bool:
    """Sharded or kept replicated by an earlier ``parallelize``."""
    return any(getattr(m, a, None) is not None for a in ("_moe_parallel_key", "_moe_replicated"))


def find_experts(model: nn.Module, example_inputs=None) -> tuple[list[Found], list[str], list[str]]:
    """(experts modules found, problems with modules that look like experts but cannot be sharded, notes)."""
    parent: dict[int, nn.Module] = {}
    for m in model.modules():
        for c in m.children():
            parent[id(c)] = m
    blocks = {id(m): [] for m in model.modules() if _inline_candidate(m) is not None}
    traced = _traced(model, example_inputs, blocks) if example_inputs is not None else {}
    found, problems, notes = [], [], []
    taken: list[str] = []
    inline: list[tuple[str, str]] = []  # (layer, its expert list) for layers that dispatch inline
    for path, m in model.named_modules():
        if any(path == t or path.startswith(t + ".") for t in taken):
            continue
        if _parallelized(m):
            problems.append(_ALREADY.format(path or "<model>"))
            taken.append(path)
            continue
        known = capture.is_captured_class(m)
        shaped = _n_forward_args(m) == 3 and _structural(m)
        if not (known or shaped or id(m) in traced):
            cand = _inline_candidate(m)
            if cand is not None:
                inline.append((path, m, cand))
            continue
        k, tokens = traced.get(id(m), (None, None))
        k = k or _top_k(m, parent.get(id(m)))
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
        found.append(Found(path, m, match, k, tokens=tokens))
    innermost: dict[str, tuple] = {}  # list path -> the innermost block holding it and its router
    for path, block, (lname, lst, router) in inline:
        lpath = f"{path}.{lname}" if path else lname
        innermost[lpath] = (path, block, (lname, lst, router))  # named_modules lists parents first
    for lpath, (path, block, (lname, lst, router)) in innermost.items():
        if any(lpath == t or lpath.startswith(t + ".") for t in taken):
            continue
        if _parallelized(lst):
            problems.append(_ALREADY.format(lpath))
            continue
        seen = blocks.get(id(block), [])
        f, why = recognise_inline(path, block, lname, lst, _trial_inputs(block, router, seen))
        if f is None:
            problems.append(why)
        else:
            first = next((a for a in seen[0][0] if a[0] == "tensor"), None) if seen else None
            f.tokens = math.prod(first[1][:-1]) if first is not None else None  # the hidden states' tokens
            found.append(f)
        taken.append(lpath)
    problems += _unshardable(model, taken, notes)
    return found, problems, notes


def _unshardable(model: nn.Module, taken: list[str], notes: list[str]) -> list[str]:
    """MoE-like blocks (a router beside stacked experts or a list of expert MLPs) holding none of the experts
    found: parallelize would leave them replicated without a word, so they are reported instead (with the notes
    about modules inside them: why they were not taken for experts modules)."""
    from ..explain import moe_like_blocks

    out = []
    for block, what in moe_like_blocks(model).items():
        prefix = "" if block == "<top>" else block
        if any(not prefix or t == prefix or t.startswith(prefix + ".") for t in taken):
            continue
        inside = [n for n in notes if not prefix or n.startswith(prefix + ".") or n.startswith(prefix + " ")]
        out.append(f"{block}: an MoE block ({what}) that parallelize cannot shard: its experts are neither an "
                   "experts module (forward(hidden, topk_idx, topk_weights); decorate custom ones with "
                   "@moe_compile.experts, or pass example_inputs so that parallelize sees the calls) nor an "
                   "nn.ModuleList of MLPs dispatched inline beside its router (experts gathered per token from "
                   "stacked weights, torchtitan's grouped experts and GShard capacity dispatch are fused by the "
                   "backend but not sharded yet); move the experts into an experts module"
                   + (f" ({'; '.join(inside)})" if inside else ""))
    return out
