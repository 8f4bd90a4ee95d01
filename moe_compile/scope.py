"""Dynamo settings and capture that hold only for frames compiled with ``backend="moe"``.

Hand-written dispatch code (``torch.where`` on masks, ``nonzero``, ``.tolist()`` splits) traces into one graph only
with two Dynamo settings on, ``capture_dynamic_output_shape_ops`` and ``capture_scalar_outputs``; without them a
graph break inside the experts loop makes Dynamo skip the whole frame and the block silently runs eager. Torch
offers no per-backend scope for Dynamo's settings (``torch.compile`` wraps a custom backend in
``_TorchCompileWrapper``, which drops ``backend_ctx_ctor``), so this module hooks Dynamo's per-frame entry
(``compat.dynamo.install_frame_hook``): for a frame whose backend is ``moe`` (or inside :func:`moe_scope`, which
``explain`` uses) the settings are patched for that frame's trace, the callbacks given to :func:`on_moe_frame` see
the objects the frame can reach (capture registers the modules it captures there), and :func:`active` is true,
which is what turns on the capture of experts modules (``moe_compile.capture``). Every other frame, under any other
backend, is compiled exactly as torch would: same settings, no capture. If the hook cannot be installed on this
torch, capture and the settings are off with a warning (``compat.off()``, and explain says so).

If a frame fails to trace under those settings with a data-dependent error (a capacity computed as a 0-d tensor and
used as ``F.one_hot(..., num_classes=capacity)`` becomes an unbacked size), the frame is traced again with torch's
defaults, as plain ``torch.compile`` would, and :data:`fallbacks` records it (the last 100).
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

from .compat import dynamo, turn_off

SETTINGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
"""The Dynamo settings frames compiled with ``backend="moe"`` trace under."""

fallbacks: list[str] = []
"""Frames that were traced with torch's default settings after failing under :data:`SETTINGS` (code name: error)."""

_state = threading.local()
_ON_MOE_FRAME: list = []
_BEFORE_DDP_SPLIT: list = []  # [fn(gm)]: what runs on a whole graph before DDPOptimizer splits it (install's)


def on_moe_frame(fn) -> None:
    """Call ``fn(roots)`` before Dynamo traces each frame for the ``moe`` backend, ``roots`` being the objects the
    frame's code can reach by name (its locals, closure and globals): capture patches the classes it captures by
    name and registers the modules it will capture (only in processes that compile with ``backend="moe"``)."""
    if fn not in _ON_MOE_FRAME:
        _ON_MOE_FRAME.append(fn)


def _depth() -> int:
    return getattr(_state, "depth", 0)


@contextlib.contextmanager
def moe_scope(settings: bool = True):
    """Trace as the ``moe`` backend does: capture on, and Dynamo's :data:`SETTINGS` patched (``settings=False``:
    the values they had outside every moe scope, torch's defaults unless the user set them)."""
    if _depth() == 0:
        _state.outside = dynamo.settings(SETTINGS)
    values = SETTINGS if settings else _state.outside
    _state.depth = _depth() + 1
    try:
        with dynamo.patch_settings(values):
            yield
    finally:
        _state.depth -= 1


@torch.compiler.assume_constant_result
def active() -> bool:
    """Is Dynamo tracing a frame for the ``moe`` backend? Evaluated once at trace time and baked into the graph
    (no guard): frames of other backends never see it true."""
    return _depth() > 0


# --------------------------------------------------------------------------------------------- which backend
def is_moe_backend(compiler_fn) -> bool:
    """Does ``compiler_fn`` (as Dynamo holds it: wrapped for debugging, by ``torch.compile``, by DDPOptimizer) end
    in :func:`moe_compile.backend.moe_backend`? A backend of one's own that calls ``moe_backend`` counts when it
    says so the standard way, ``@functools.wraps(moe_compile.moe_backend)`` (its ``__wrapped__``)."""
    # moe_compile_backend is set on moe_backend (and copied by functools.wraps)
    return any(getattr(fn, "moe_compile_backend", False) is True for fn in dynamo.backend_chain(compiler_fn))


def _compiler_for(compiler_fn):
    """Under ``torch.compile(DistributedDataParallel(model), backend="moe")`` Dynamo hands each frame's graph to
    DDPOptimizer, which cuts it at gradient-bucket boundaries before the moe backend sees the pieces: a cut inside
    an MoE block traced inline (its experts loop) would leave it unfused. The MoE blocks are fused on the whole
    graph first (the step :func:`install` was given); the fused op is one node, which the cuts go around."""
    if compiler_fn is None or not _BEFORE_DDP_SPLIT or not dynamo.splits_for_ddp(compiler_fn):
        return None

    @functools.wraps(compiler_fn)
    def fuse_then_split(gm, example_inputs, *rest, **kw):
        for fn in _BEFORE_DDP_SPLIT:
            fn(gm)
        return compiler_fn(gm, example_inputs, *rest, **kw)

    return fuse_then_split


# --------------------------------------------------------------------------------------------- the frame hook
def _compile_frame(frame: dynamo.Frame):
    if _depth() == 0 and not is_moe_backend(frame.compiler_fn):
        return frame.compile()
    compiler_fn = _compiler_for(frame.compiler_fn)
    roots = frame.roots()
    for fn in _ON_MOE_FRAME:
        fn(roots)
    try:
        with moe_scope():
            return frame.compile(compiler_fn)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the settings' fault
        if not dynamo.is_data_dependent_error(e):
            raise
        fallbacks.append(f"{getattr(frame.code, 'co_name', frame.code)}: {str(e).splitlines()[0][:200]}")
        del fallbacks[:-100]
    with moe_scope(settings=False):
        return frame.compile(compiler_fn)


def install(before_ddp_split=None) -> bool:
    """Hook the moe scope into Dynamo's per-frame compile (idempotent). Frames of other backends pass through
    untouched. ``before_ddp_split(gm)``: what runs on a moe frame's whole graph before DDPOptimizer splits it (the
    package passes ``passes.fuse_moe``). False, with a warning, when the hook cannot be installed on this torch:
    capture and the settings are then off (``compat.off()``, explain says so)."""
    if before_ddp_split is not None and before_ddp_split not in _BEFORE_DDP_SPLIT:
        _BEFORE_DDP_SPLIT.append(before_ddp_split)
    try:
        dynamo.check_settings(SETTINGS)
        why = dynamo.install_frame_hook(_compile_frame)
    except Exception as e:  # noqa: BLE001 - any failure here is torch not being what the hook expects
        why = f"{type(e).__name__}: {e}"
    if why:
        turn_off("capture", f"{why}; frames compiled with backend='moe' trace without capture and with torch's "
                 "own Dynamo settings (MoE blocks traced whole are still fused)")
        return False
    return True
