"""Dynamo settings and capture that hold only for frames compiled with ``backend="moe"``.

Hand-written dispatch code (``torch.where`` on masks, ``nonzero``, ``.tolist()`` splits) traces into one graph only
with two Dynamo settings on, ``capture_dynamic_output_shape_ops`` and ``capture_scalar_outputs``; without them a
graph break inside the experts loop makes Dynamo skip the whole frame and the block silently runs eager. Torch
offers no per-backend scope for Dynamo's settings (``torch.compile`` wraps a custom backend in
``_TorchCompileWrapper``, which drops ``backend_ctx_ctor``), so this module wraps Dynamo's per-frame entry,
``torch._dynamo.convert_frame.compile_frame``: for a frame whose backend is ``moe`` (or inside :func:`moe_scope`,
which ``explain`` uses) the settings are patched for that frame's trace, and :func:`active` is true, which is what
turns on the capture of experts modules (``moe_compile.capture``). Every other frame, under any other backend,
is compiled exactly as torch would: same settings, no capture.

If a frame fails to trace under those settings with a data-dependent error (a capacity computed as a 0-d tensor and
used as ``F.one_hot(..., num_classes=capacity)`` becomes an unbacked size), the frame is traced again with torch's
defaults, as plain ``torch.compile`` would, and :data:`fallbacks` records it (the last 100).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading

import torch

SETTINGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
"""The Dynamo settings frames compiled with ``backend="moe"`` trace under."""

fallbacks: list[str] = []
"""Frames that were traced with torch's default settings after failing under :data:`SETTINGS` (code name: error)."""

_state = threading.local()
_ON_MOE_FRAME: list = []


def on_moe_frame(fn) -> None:
    """Call ``fn()`` as each outermost moe scope starts (before Dynamo traces the frame): capture uses it to patch
    the classes it captures by name only in processes that compile with ``backend="moe"``."""
    if fn not in _ON_MOE_FRAME:
        _ON_MOE_FRAME.append(fn)


def _depth() -> int:
    return getattr(_state, "depth", 0)


@contextlib.contextmanager
def moe_scope(settings: bool = True):
    """Trace as the ``moe`` backend does: capture on, and Dynamo's :data:`SETTINGS` patched (``settings=False``:
    the values they had outside every moe scope, torch's defaults unless the user set them)."""
    if _depth() == 0:
        _state.outside = {k: getattr(torch._dynamo.config, k) for k in SETTINGS}
        for fn in _ON_MOE_FRAME:
            fn()
    values = SETTINGS if settings else _state.outside
    _state.depth = _depth() + 1
    try:
        with torch._dynamo.config.patch(**values):
            yield
    finally:
        _state.depth -= 1


@torch.compiler.assume_constant_result
def active() -> bool:
    """Is Dynamo tracing a frame for the ``moe`` backend? Evaluated once at trace time and baked into the graph
    (no guard): frames of other backends never see it true."""
    return _depth() > 0


# --------------------------------------------------------------------------------------------- which backend
_WRAPPER_ATTRS = ("_torchdynamo_orig_backend", "compiler_fn", "backend_compile_fn", "__wrapped__", "func", "__self__")


def _chain(compiler_fn):
    """``compiler_fn`` and everything it wraps (Dynamo's debug wrapper, torch.compile's, DDPOptimizer's)."""
    todo, seen = [compiler_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen or len(seen) > 32:
            continue
        seen.add(id(fn))
        yield fn
        todo.extend(getattr(fn, a, None) for a in _WRAPPER_ATTRS)


def is_moe_backend(compiler_fn) -> bool:
    """Does ``compiler_fn`` (as Dynamo holds it: wrapped for debugging, by ``torch.compile``, by DDPOptimizer) end
    in :func:`moe_compile.backend.moe_backend`? A backend of one's own that calls ``moe_backend`` counts when it
    says so the standard way, ``@functools.wraps(moe_compile.moe_backend)`` (its ``__wrapped__``)."""
    # moe_compile_backend is set on moe_backend (and copied by functools.wraps)
    return any(getattr(fn, "moe_compile_backend", False) is True for fn in _chain(compiler_fn))


def _data_dependent(err: BaseException) -> bool:
    """Is ``err`` (or what caused it) a guard on a data-dependent size, the error the two settings can cause?"""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, GuardOnDataDependentSymNode):
            return True
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return False


def _ddp_optimizer_in(compiler_fn) -> bool:
    from torch._dynamo.backends.distributed import DDPOptimizer

    return any(isinstance(fn, DDPOptimizer) for fn in _chain(compiler_fn))


def _fuse_before_ddp_split(signature, args, kwargs):
    """Under ``torch.compile(DistributedDataParallel(model), backend="moe")`` Dynamo hands each frame's graph to
    DDPOptimizer, which cuts it at gradient-bucket boundaries before the moe backend sees the pieces: a cut inside
    an MoE block traced inline (its experts loop) would leave it unfused. The MoE blocks are fused on the whole
    graph first (``passes.fuse_moe``); the fused op is one node, which the cuts go around."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return args, kwargs
    compiler_fn = bound.arguments.get("compiler_fn")
    if compiler_fn is None or not _ddp_optimizer_in(compiler_fn):
        return args, kwargs

    @functools.wraps(compiler_fn)
    def fuse_then_split(gm, example_inputs, *rest, **kw):
        from .passes import fuse_moe

        fuse_moe(gm)
        return compiler_fn(gm, example_inputs, *rest, **kw)

    bound.arguments["compiler_fn"] = fuse_then_split
    return bound.args, bound.kwargs


# --------------------------------------------------------------------------------------------- the frame hook
_INSTALLED = False


def install() -> None:
    """Wrap Dynamo's per-frame compile once (idempotent). Frames of other backends pass through untouched."""
    global _INSTALLED
    if _INSTALLED:
        return
    from torch._dynamo import convert_frame

    original = convert_frame.compile_frame
    signature = inspect.signature(original)

    @functools.wraps(original)
    def compile_frame(*args, **kwargs):
        if _depth() == 0:
            try:
                compiler_fn = signature.bind(*args, **kwargs).arguments.get("compiler_fn")
            except TypeError:
                compiler_fn = None
            if not is_moe_backend(compiler_fn):
                return original(*args, **kwargs)
        args, kwargs = _fuse_before_ddp_split(signature, args, kwargs)
        try:
            with moe_scope():
                return original(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is the settings' fault
            if not _data_dependent(e):
                raise
            code = args[0] if args else kwargs.get("code")
            fallbacks.append(f"{getattr(code, 'co_name', code)}: {str(e).splitlines()[0][:200]}")
            del fallbacks[:-100]
        with moe_scope(settings=False):
            return original(*args, **kwargs)

    compile_frame._moe_compile_original = original
    convert_frame.compile_frame = compile_frame
    _INSTALLED = True
