"""What a matched block's own code does under ``torch.autocast`` (``MoESpec.autocast``, see ``spec.AUTOCAST_MODES``),
so that the fused op does the same (``ops/autocast.py``).

Dynamo traces under the autocast state of the call and guards on it, so a graph traced with autocast on holds the
dtypes eager computes in: the dtype of the region's expert GEMMs and of its output decide the mode. An experts
module captured whole has no body in the graph: its own code is run once on two tokens under the same autocast
state, and the dtypes of its matrix products and output are read (:func:`module_mode`). With autocast off the
mode is never read, and stays ``cast``.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ..compat import dynamo
from ..spec import MoESpec
from .graph import example_value

_GEMM_FUNCTIONS = {torch.nn.functional.linear, torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.einsum,
                   torch.addmm, torch.baddbmm, getattr(torch, "_grouped_mm", None)} - {None}
_GEMM_METHODS = {"matmul", "mm", "bmm", "__matmul__"}
_GEMM_ATEN = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "_grouped_mm", "matmul", "linear"}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on ``device_type`` now, or None when autocast is off there."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def mode_of(x_dtype: torch.dtype, gemm_dtype: torch.dtype | None, out_dtype: torch.dtype | None,
            cast_to: torch.dtype) -> str:
    if gemm_dtype != cast_to:
        return "none"
    return "cast" if out_dtype == x_dtype else "cast_out"


def _is_gemm(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _GEMM_FUNCTIONS) or (
        n.op == "call_method" and n.target in _GEMM_METHODS)


def region_mode(region: list[fx.Node], x: fx.Node, out: fx.Node) -> str:
    """The mode of a region traced in the graph, from the dtypes Dynamo recorded."""
    xv, ov = example_value(x), example_value(out)
    if not isinstance(xv, torch.Tensor):
        return "cast"
    cast_to = autocast_dtype(xv.device.type)
    if cast_to is None:
        return "cast"
    gemms = [example_value(n) for n in region if _is_gemm(n)]
    gemm = next((v.dtype for v in gemms if isinstance(v, torch.Tensor)), None)
    return mode_of(xv.dtype, gemm, ov.dtype if isinstance(ov, torch.Tensor) else None, cast_to)


class _GemmDtypes(dynamo.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _GEMM_ATEN and isinstance(out, torch.Tensor):
            self.dtypes.append(out.dtype)
        return out


def _probe(spec: MoESpec, x_dtype, device, cast_to, run) -> str:
    with dynamo.real_tensors(), torch.no_grad():
        E, k = spec.num_experts, max(1, min(spec.top_k, spec.num_experts))
        xs = torch.randn(2, spec.hidden, dtype=x_dtype, device=device)
        idx = torch.arange(2 * k, device=device).view(2, k) % E
        w = torch.full((2, k), 1.0 / k, dtype=x_dtype, device=device)
        rec = _GemmDtypes()
        with rec:
            out = run(xs, idx, w)
    gemm = rec.dtypes[0] if rec.dtypes else None
    return mode_of(x_dtype, gemm, out.dtype if isinstance(out, torch.Tensor) else None, cast_to)


def module_mode(x: fx.Node, spec: MoESpec, run) -> str:
    """The mode of an experts module captured whole: ``run(x, idx, w)`` (the module's own code, uncaptured) on two
    tokens like ``x``, under the autocast state of the trace."""
    xv = example_value(x)
    if not isinstance(xv, torch.Tensor):
        return "cast"
    cast_to = autocast_dtype(xv.device.type)
    if cast_to is None:
        return "cast"
    return _probe(spec, xv.dtype, xv.device, cast_to, run)


def eager_mode(spec: MoESpec, dtype: torch.dtype, device: torch.device, run) -> str:
    """The mode of an experts module's own code ``run(x, idx, w)`` under autocast's default lower dtype for
    ``device`` (what ``parallelize`` records before it shards the module: its code no longer runs after)."""
    if device.type not in ("cpu", "cuda") or dtype == torch.float64:
        return "cast"
    with torch.autocast(device.type):
        return _probe(spec, dtype, device, torch.get_autocast_dtype(device.type), run)


def with_autocast(spec: MoESpec, mode: str) -> MoESpec:
    return spec if spec.autocast == mode else dataclasses.replace(spec, autocast=mode)
