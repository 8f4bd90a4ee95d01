"""The kernel backends: what every ``moe_compile::`` op and every parallel mode calls to compute experts.

A backend computes the expert MLPs of rows that are already routed, for tokens ``x [T, H]``, expert ids
``idx [T, k]`` (``E`` = dropped) and routing weights ``w [T, k]``, with the canonical weights
(:class:`~moe_compile.kernels.common.Weights`: ``w1 [E, H, N]``, ``w2 [E, F, H]``, biases ``b1 [E, N]``,
``b2 [E, H]``). Its contract (:class:`KernelBackend`):

- ``forward(spec, x, idx, w, wts, keep_outputs=False) -> (out [T, H], h, r)``: ``h [S, N]`` is the first GEMM's
  output in sorted order (``S`` = pairs not dropped); ``r [S, H]`` is whatever that backend's backward needs
  (the ATen backend: the gathered inputs; Triton: the unweighted expert outputs), or, with ``keep_outputs=True``,
  the unweighted expert outputs ``y`` on every backend (the capacity-slot op needs them).
- ``backward(spec, grad, x, idx, w, wts, h, r, kept_outputs=False, forward_b2=True) -> (dx, dw, Weights)``:
  gradients for ``x``, ``w`` (shaped like ``w``) and the canonical weights. ``forward_b2=False``: the forward
  ran without ``wts.b2`` (a tensor-parallel shard that does not add the bias) but its gradient is wanted.
- ``plan(idx, num_experts) -> common.Plan``: the dispatch plan (pairs sorted by expert), for the ops that run the
  user's own expert modules between a fused dispatch and combine.
- ``accepts(spec, x) -> bool``: whether it can compute this spec on this tensor (device, dtype, features);
  ``spec=None`` asks for the plan only.

:func:`select` is the one place a backend is chosen: the first of :data:`BACKENDS` that accepts, ATen last
(it accepts everything). Forward and backward of one call choose alike, so the saved ``h, r`` always mean what the
backend that wrote them says. A third backend is one new module with a :class:`KernelBackend` subclass, registered
with :func:`register` (a test does exactly that, and checks that every op and parallel mode reaches it).
:func:`use` forces a backend by name within a ``with`` block (tests, the GPU check's dry run).
"""
from __future__ import annotations

import contextlib

import torch

from ..spec import MoESpec
from .common import Plan, Weights
from .interface import KernelBackend


BACKENDS: list[KernelBackend] = []
"""Tried in order by :func:`select`; ATen is last."""
_FORCED: list[str] = []


def register(backend: KernelBackend, *, first: bool = True) -> KernelBackend:
    """Add ``backend`` to :data:`BACKENDS` (before the others, or just before ATen with ``first=False``)."""
    if not isinstance(backend, KernelBackend):
        raise TypeError(f"a kernel backend subclasses moe_compile.kernels.KernelBackend; got {type(backend).__name__}")
    if any(b.name == backend.name for b in BACKENDS):
        raise ValueError(f"a kernel backend named {backend.name!r} is registered already; unregister it first")
    BACKENDS.insert(0 if first else max(len(BACKENDS) - 1, 0), backend)
    return backend


def unregister(name: str) -> None:
    if name == "aten":
        raise ValueError("the ATen backend is the one every spec can run on; it cannot be unregistered")
    BACKENDS[:] = [b for b in BACKENDS if b.name != name]


def by_name(name: str) -> KernelBackend:
    for b in BACKENDS:
        if b.name == name:
            return b
    raise KeyError(f"no kernel backend named {name!r}; registered: {[b.name for b in BACKENDS]}")


@contextlib.contextmanager
def use(name: str):
    """Within the block, every op and mode computes on backend ``name`` (an error where it cannot)."""
    by_name(name)
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def select(spec: MoESpec | None, x) -> KernelBackend:
    """The backend for ``spec`` on tensors like ``x`` (``spec=None``: the plan only)."""
    if _FORCED:
        b = by_name(_FORCED[-1])
        if not b.accepts(spec, x):
            raise RuntimeError(
                f"kernel backend {b.name!r} (forced by moe_compile.kernels.use) cannot compute this block on "
                f"{x.dtype} {x.device.type} tensors; leave the `use` block to let moe_compile choose")
        return b
    for b in BACKENDS:
        if b.accepts(spec, x):
            return b
    raise RuntimeError("no kernel backend accepts this block; the ATen backend was unregistered")  # pragma: no cover


def _no_autocast(x):
    """Backends compute in the dtype of the tensors they are given (the ops' autocast kernels chose it): an
    autocast region around an op's backward must not recast their GEMMs."""
    on = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    return torch.autocast(x.device.type, enabled=False) if on else contextlib.nullcontext()


def forward(spec: MoESpec, x, idx, w, wts: Weights, *, keep_outputs: bool = False):
    with _no_autocast(x):
        return select(spec, x).forward(spec, x, idx, w, wts, keep_outputs=keep_outputs)


def backward(spec: MoESpec, grad, x, idx, w, wts: Weights, h, r, *, kept_outputs: bool = False,
             forward_b2: bool = True):
    with _no_autocast(x):
        return select(spec, x).backward(spec, grad, x, idx, w, wts, h, r, kept_outputs=kept_outputs,
                                        forward_b2=forward_b2)


def plan(x, idx, num_experts: int, spec: MoESpec | None = None) -> Plan:
    """The dispatch plan of ``idx`` for tokens like ``x`` (``spec=None``: for experts that are the user's own
    modules, where only the plan is the backend's)."""
    return select(spec, x).plan(idx, num_experts)


def _register_builtin() -> None:
    from .aten import AtenBackend
    from .triton import TritonBackend

    BACKENDS.extend([TritonBackend(), AtenBackend()])


_register_builtin()
