"""The fused ops under ``torch.autocast``: they compute in the dtype the block's own code would.

A ``torch.library.custom_op`` gets its inputs as they are under autocast (fp32), and which dtype it then computes
in depended on the compiler (inductor cast them, aot_eager did not). Each fused op here gets an autocast kernel
(``AutocastCPU`` / ``AutocastCUDA``) that reads the block's ``MoESpec.autocast`` (found by the passes from the
traced dtypes, ``passes/autocast.py``) and, for ``cast`` / ``cast_out``, casts the hidden states and the expert
weights and biases to the autocast dtype as autocast casts ``F.linear``'s operands, runs the op with
autocast off (its kernels compute in the dtype they are given), and returns the output in the input's dtype
(``cast``) or the autocast dtype (``cast_out``); ``none`` runs it on the inputs as they are. Only the hidden
states are cast: the kernel backends cast the weights to the hidden states' dtype and bring each weight's gradient
back to that weight's dtype, as autograd does through autocast's casts in eager (and parallel modes all-reduce
those gradients in the weights' dtype, as DDP does). Routing weights and dispatch / combine tensors are left as
they are (eager multiplies by them in their own dtype).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..spec import MoESpec
from .parallel import state_for

_LIB = torch.library.Library("moe_compile", "FRAGMENT")
_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _cast(t, dtype):
    # autocast casts floating tensors other than float64
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype):
        return t.to(dtype)
    return t


def _run(device_type, mode, op, args):
    """``op(*args)`` with autocast off, the hidden states (``args[0]``) cast first unless ``mode`` is ``none``.
    The kernel backends compute in the hidden states' dtype (weights are cast to it, their gradients cast back to
    the weights' own dtype by ``kernels.common.weight_grads``)."""
    x_dtype = args[0].dtype
    if mode != "none":
        args = (_cast(args[0], torch.get_autocast_dtype(device_type)), *args[1:])
    with torch.autocast(device_type, enabled=False):
        out = op(*args)
    first = out[0]
    if mode == "cast" and first.dtype != x_dtype:
        first = first.to(x_dtype)
    return (first, *out[1:])


def _register(name: str, mode_of) -> None:
    op = getattr(torch.ops.moe_compile, name).default
    for device_type, key in _KEYS.items():
        def kernel(keyset, *args, _device_type=device_type):
            return _run(_device_type, mode_of(args), op, args)

        _LIB.impl(name, kernel, key, with_keyset=True)


# (x, topk_idx, topk_weights, gate, up, down, b_gate, b_up, b_down, spec)
_register("experts", lambda args: MoESpec.from_json(args[-1]).autocast)
# (x, dispatch, combine, gate, up, down, b_gate, b_up, b_down, spec)
_register("experts_slots", lambda args: MoESpec.from_json(args[-1]).autocast)
# (x, topk_idx, topk_weights, params, key)
_register("parallel_experts", lambda args: state_for(args[-1]).spec.autocast)
