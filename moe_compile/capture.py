"""Capturing experts modules whole: one graph node per experts call.

Under ``torch.compile`` an experts module's data-dependent loop (HF's ``for expert_idx in expert_hit``, a user's own
dispatch) would break the graph and leave the expert matmuls in no graph at all. Instead, while Dynamo traces, the
call is routed to ``moe_compile::experts_call(hidden, topk_idx, topk_weights, params, key)``: one opaque node whose
implementation runs the module's own forward (eager numerics, by construction), and which the backend rewrites into
the fused op when it recognises the module.

Ways in (see also ``capture_blocks`` for HF MoE blocks outside experts modules):
- ``@moe_compile.experts`` on a class with ``forward(hidden [T, H], topk_idx [T, k], topk_weights [T, k]) -> [T, H]``.
- HF transformers experts modules (HF's experts-implementation decorator): their implementation lookup is routed
  here while compiling (``compat.hf``), whatever ``experts_implementation`` they are set to.
Capture happens only while Dynamo traces a frame for the ``moe`` backend (``moe_compile.scope.active``): in eager
mode, and under ``torch.compile`` with any other backend, these modules run exactly their own code.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import weakref

import torch
from torch import Tensor

from . import scope
from .compat import hf, nn as compat_nn

_MODULES: "weakref.WeakValueDictionary[str, torch.nn.Module]" = weakref.WeakValueDictionary()
ENABLED = True  # moe_compile.capture.ENABLED = False turns capture off (Dynamo then traces modules as they are)


SKIPPED: dict[str, str] = {}
"""Captured classes (by ``__qualname__``) a call of which was left uncaptured while tracing, with the reason
(reported by explain)."""


@torch.compiler.assume_constant_result
def record_skip(qualname: str, why: str) -> bool:
    """Keep why a call of class ``qualname`` was left uncaptured (runs once at trace time, as a constant)."""
    SKIPPED[qualname] = why
    return True


def module_key(module: torch.nn.Module) -> str:
    """Register ``module`` under a stable name that a graph carries as a constant, and return the name."""
    key = _key_text(type(module).__qualname__, id(module))
    _MODULES[key] = module
    return key


def _key_text(qualname: str, ident: int) -> str:
    return f"{qualname}@{ident:x}"


@torch.compiler.assume_constant_result
def _registered_key(qualname: str, ident: int) -> str:
    """The registered name of the module ``(type qualname, id)`` ("" if it is not registered), called while Dynamo
    traces: its arguments are constants on every supported torch (a module itself is not, on torch 2.11)."""
    key = _key_text(qualname, ident)
    return key if key in _MODULES else ""


def traced_key(module: torch.nn.Module) -> str:
    """``module``'s registered name while Dynamo traces it ("" when it was not registered before the trace: it
    was not reachable from the compiled frame's locals, closure or globals, see :func:`register_roots`)."""
    return _registered_key(type(module).__qualname__, id(module))


NOT_REGISTERED = ("the module was not reachable from the compiled frame (its locals, closure or globals) when the "
                  "trace began, so no captured call can find it; compile a function or module that holds it")


def modules_in(obj):
    """The modules among ``obj`` (a module, or a list, tuple or dict holding modules)."""
    if isinstance(obj, torch.nn.Module):
        yield obj
    elif isinstance(obj, (list, tuple)):
        yield from (o for o in obj if isinstance(o, torch.nn.Module))
    elif isinstance(obj, dict):
        yield from (o for o in obj.values() if isinstance(o, torch.nn.Module))


def register_roots(roots) -> None:
    """Register every capturable module inside the modules among ``roots`` (and one level of lists, tuples and
    dicts of them): what a moe frame's code can reach, registered before Dynamo traces it
    (``scope.on_moe_frame``)."""
    seen = set()
    for obj in roots:
        for root in modules_in(obj):
            if id(root) in seen:
                continue
            seen.add(id(root))
            for m in root.modules():
                if is_captured_class(m) or getattr(type(m), "_moe_compile_block", None):
                    module_key(m)


def module_for(key: str) -> torch.nn.Module:
    try:
        return _MODULES[key]
    except KeyError:
        raise RuntimeError(f"moe_compile: the experts module {key} behind a compiled graph no longer exists") from None


def _param_names(module: torch.nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters()]


def call_module(module, params: list[Tensor], x, idx, w):
    """``module(x, idx, w)`` with ``params`` for its parameters, in named_parameters order."""
    names = _param_names(module)
    return torch.func.functional_call(module, dict(zip(names, params)), (x, idx, w), strict=False)


def random_buffers(module: torch.nn.Module) -> dict[str, Tensor]:
    """float64 random values for ``module``'s floating buffers, by name (what proofs run with instead of theirs)."""
    g = torch.Generator().manual_seed(12345)
    return {n: torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.device)
            for n, b in module.named_buffers() if b.is_floating_point()}


@contextlib.contextmanager
def uncaptured():
    """Run experts modules by their own code, uncaptured, and without autograd (what proofs compare against)."""
    global ENABLED
    old, ENABLED = ENABLED, False
    try:
        with torch.no_grad():
            yield
    finally:
        ENABLED = old


def run_own_code(module: torch.nn.Module, params: dict, args) -> Tensor:
    """``module(*args)`` by its own code, uncaptured and without autograd, its parameters replaced by ``params`` and
    its floating buffers by random values (what recognition proves against: nothing a later step can change, a
    parameter's or a buffer's value, may decide the proof). An HF experts module given float64 parameters runs
    HF's eager loop, the common definition of its implementations (``grouped_mm`` has no float64 kernel on every
    torch / transformers release)."""
    f64 = any(p.dtype == torch.float64 for p in params.values())
    with uncaptured(), (hf.eager_experts(module) if f64 else contextlib.nullcontext()):
        return torch.func.functional_call(module, {**random_buffers(module), **params}, tuple(args), strict=False)


def uncapturable(module: torch.nn.Module) -> str:
    """Why a call of ``module`` must run as it is, uncaptured ("" if it may be captured): a captured call's backward
    recomputes the forward, so a module with dropout (p > 0) would draw another mask, and hooks registered on it or
    below it (HF's output recorders, the user's) would not run on the captured code's inner calls."""
    drop = compat_nn.dropouts(module)
    if drop or (getattr(module, "moe_token_dropout", 0) or 0) > 0:
        return (f"dropout inside the experts ({drop[0] if drop else 'moe_token_dropout'}, p > 0): a captured call's "
                "backward would recompute it with another random mask; set the dropout to 0 to capture it")
    hooked = compat_nn.hooked(module)
    if hooked:
        return f"hooks registered on {hooked[0]} would not run on the captured code; remove them to capture it"
    return ""


def captured_call(module: torch.nn.Module, key: str, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """What a captured experts module runs while Dynamo traces it (``key``: its :func:`traced_key`)."""
    # moe_compile::experts_call is defined in moe_compile.ops.calls (registered when moe_compile imports)
    return torch.ops.moe_compile.experts_call.default(x, idx, w, [p for _, p in module.named_parameters()], key)


def capture_key(module: torch.nn.Module) -> str:
    """While tracing: ``module``'s key if this call may be captured, else "" (the reason kept in SKIPPED)."""
    why = uncapturable(module)
    key = "" if why else traced_key(module)
    if not why and not key:
        why = NOT_REGISTERED
    if why:
        record_skip(type(module).__qualname__, why)
    return key


def bind_experts_args(forward, module, args, kwargs) -> list:
    """(hidden, topk_idx, topk_weights) from a call's arguments, bound by ``forward``'s own signature (so
    ``m(x, topk_weights=w, topk_idx=idx)`` means what it means in eager mode): its first three parameters after
    ``self``. Any other argument passed explicitly cannot travel through the captured op: a TypeError says so."""
    sig = inspect.signature(forward)
    try:
        bound = sig.bind(module, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{type(module).__qualname__}.forward{sig}: {e}") from None
    names = list(sig.parameters)[1:]
    if len(names) < 3 or any(sig.parameters[n].kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                             inspect.Parameter.POSITIONAL_ONLY) for n in names[:3]):
        raise TypeError(f"{type(module).__qualname__}.forward{sig} must take (hidden, topk_idx, topk_weights) as "
                        "its first three parameters")
    missing = [n for n in names[:3] if n not in bound.arguments]
    extra = [n for n in bound.arguments if n not in names[:3] and n != next(iter(sig.parameters))]
    if missing or extra:
        raise TypeError(f"moe_compile captures {type(module).__qualname__}.forward{sig} with exactly its arguments "
                        f"{names[:3]} (hidden, topk_idx, topk_weights); "
                        + (f"missing {missing}" if missing else f"also got {extra}, which the fused op cannot carry")
                        + ": pass only those three, or leave the class undecorated")
    return [bound.arguments[n] for n in names[:3]]


# --------------------------------------------------------------------------------------------- the decorator
def experts(cls):
    """Mark a custom experts module so that ``torch.compile(..., backend="moe")`` captures and fuses it.

    Contract: ``forward(hidden [T, H], topk_idx [T, k] int, topk_weights [T, k]) -> [T, H]``. In eager mode the
    class behaves exactly as before.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"@moe_compile.experts decorates an nn.Module subclass, not {cls!r}")
    params = list(inspect.signature(cls.forward).parameters)
    if len(params) < 4:
        raise TypeError(
            f"{cls.__qualname__}.forward must take (hidden, topk_idx, topk_weights); its parameters are {params[1:]}"
        )
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        # captured only as the instance's own forward: a subclass's forward calling this one through super() has
        # transformed the arguments already, and the captured op reruns the whole module
        if ENABLED and torch.compiler.is_compiling() and scope.active() and type(self).forward is forward:
            key = capture_key(self)
            if key:
                return captured_call(self, key, *bind_experts_args(original, self, args, kwargs))
        return original(self, *args, **kwargs)

    cls.forward = forward
    cls._moe_compile_experts = True
    cls._moe_compile_original_forward = original
    return cls


def is_captured_class(module: torch.nn.Module) -> bool:
    return getattr(type(module), "_moe_compile_experts", False) or hf.is_experts_module(module)


# --------------------------------------------------------------------------------------------- HF transformers
def _route_hf(fn):
    """What HF's experts lookup returns for an experts implementation ``fn``: ``fn``, or while a moe frame is
    traced, ``fn`` behind the capture."""
    if ENABLED and torch.compiler.is_compiling() and scope.active():
        return functools.partial(_hf_captured, fn)
    return fn


def install_hf_capture() -> str:
    """Route HF experts modules to ``captured_call`` while compiling. Idempotent. Returns "" when installed (or
    when transformers has no experts modules), else why not (the caller turns the capture of HF experts off)."""
    return hf.install_experts_hook(_route_hf)


def _hf_captured(fn, module, *args, **kwargs):
    """HF's experts implementation ``fn`` for ``module``, captured unless the module cannot be (``capture_key``),
    or the instance's own forward is not HF's wrapper (a subclass's forward calling it through ``super()`` has
    transformed the arguments already, and the captured op reruns the whole module)."""
    if not hf.forward_is_hf_wrapper(type(module)):
        return fn(module, *args, **kwargs)
    key = capture_key(module)
    if not key:
        return fn(module, *args, **kwargs)
    return captured_call(module, key, *bind_experts_args(type(module).forward, module, args, kwargs))
