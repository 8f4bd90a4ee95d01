"""Capturing experts modules whole: one graph node per experts call.

Under ``torch.compile`` an experts module's data-dependent loop (HF's ``for expert_idx in expert_hit``, a user's own
dispatch) would break the graph and leave the expert matmuls in no graph at all. Instead, while Dynamo traces, the
call is routed to ``moe_compile::experts_call(hidden, topk_idx, topk_weights, params, key)``: one opaque node whose
implementation runs the module's own forward (eager numerics, by construction), and which the backend rewrites into
the fused op when it recognises the module.

Ways in (see also ``capture_blocks`` for HF MoE blocks outside experts modules):
- ``@moe_compile.experts`` on a class with ``forward(hidden [T, H], topk_idx [T, k], topk_weights [T, k]) -> [T, H]``.
- HF transformers experts modules (``@use_experts_implementation``): their implementation lookup is routed here while
  compiling, whatever ``experts_implementation`` they are set to.
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

_MODULES: "weakref.WeakValueDictionary[str, torch.nn.Module]" = weakref.WeakValueDictionary()
ENABLED = True  # moe_compile.capture.ENABLED = False turns capture off (Dynamo then traces modules as they are)


@torch.compiler.assume_constant_result
def module_key(module: torch.nn.Module) -> str:
    """A stable name for ``module`` that the graph carries as a constant; Dynamo calls this at trace time."""
    key = f"{type(module).__qualname__}@{id(module):x}"
    _MODULES[key] = module
    return key


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
    parameter's or a buffer's value, may decide the proof)."""
    with uncaptured():
        return torch.func.functional_call(module, {**random_buffers(module), **params}, tuple(args), strict=False)


def uncapturable(module: torch.nn.Module) -> str:
    """Why a call of ``module`` must run as it is, uncaptured ("" if it may be captured): a captured call's backward
    recomputes the forward, so a module with dropout (p > 0) would draw another mask, and hooks registered on it or
    below it (HF's output recorders, the user's) would not run on the captured code's inner calls."""
    drop = [n for n, m in module.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
    if drop or (getattr(module, "moe_token_dropout", 0) or 0) > 0:
        return (f"dropout inside the experts ({drop[0] if drop else 'moe_token_dropout'}, p > 0): a captured call's "
                "backward would recompute it with another random mask; set the dropout to 0 to capture it")
    hooked = [n or "<module>" for n, m in module.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    if hooked:
        return f"hooks registered on {hooked[0]} would not run on the captured code; remove them to capture it"
    return ""


def captured_call(module: torch.nn.Module, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """What a captured experts module runs while Dynamo traces it."""
    # moe_compile::experts_call is defined in moe_compile.ops.calls (registered when moe_compile imports)
    return torch.ops.moe_compile.experts_call.default(x, idx, w, [p for _, p in module.named_parameters()],
                                                      module_key(module))


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
        if (ENABLED and torch.compiler.is_compiling() and scope.active() and type(self).forward is forward
                and not uncapturable(self)):
            return captured_call(self, *bind_experts_args(original, self, args, kwargs))
        return original(self, *args, **kwargs)

    cls.forward = forward
    cls._moe_compile_experts = True
    cls._moe_compile_original_forward = original
    return cls


def is_captured_class(module: torch.nn.Module) -> bool:
    return getattr(type(module), "_moe_compile_experts", False) or _is_hf_experts(module)


# --------------------------------------------------------------------------------------------- HF transformers
def _is_hf_experts(module) -> bool:
    return hasattr(module, "config") and hasattr(module, "has_gate") and hasattr(module, "is_transposed")


_HF_PATCHED = False


def install_hf_capture() -> bool:
    """Route HF experts modules to ``captured_call`` while compiling. Idempotent; False if transformers is absent."""
    global _HF_PATCHED
    if _HF_PATCHED:
        return True
    try:
        from transformers.integrations import moe as hf_moe
    except Exception:  # transformers not installed, or too old to have ExpertsInterface
        return False
    interface = getattr(hf_moe, "ExpertsInterface", None)
    if interface is None:
        return False
    original = interface.get_interface

    @functools.wraps(original)
    def get_interface(self, experts_implementation, default):
        fn = original(self, experts_implementation, default)
        if ENABLED and torch.compiler.is_compiling() and scope.active():
            return functools.partial(_hf_captured, fn)
        return fn

    interface.get_interface = get_interface
    _HF_PATCHED = True
    return True


def _hf_captured(fn, module, *args, **kwargs):
    """HF's experts implementation ``fn`` for ``module``, captured unless the module cannot be (``uncapturable``),
    or the instance's own forward is not HF's wrapper (a subclass's forward calling it through ``super()`` has
    transformed the arguments already, and the captured op reruns the whole module)."""
    if uncapturable(module) or getattr(type(module).forward, "__wrapped__", None) is None:
        return fn(module, *args, **kwargs)
    return captured_call(module, *bind_experts_args(type(module).forward, module, args, kwargs))
