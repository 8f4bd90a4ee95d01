"""``moe_compile::parallel_experts``: a parallelized experts module's call, one opaque graph node.

The op takes the module's local parameters and a string key; its implementation finds the module's
:class:`~moe_compile.parallel.state.ParallelState` by key and runs the current mode, with its collectives, at run
time. A compiled graph therefore holds the same node whatever the mode: switching modes never recompiles, and
DDP's graph splitter cannot cut between dispatch and combine.

The forward returns the output and a small int64 record of the call (mode, capacity, routing counts) that the
backward op (``moe_compile::parallel_experts_backward``) replays, so a mode switch between a forward and its
backward is harmless.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..capture import bind_experts_args
from .state import state_for


@torch.library.custom_op("moe_compile::parallel_experts", mutates_args=())
def parallel_experts(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, params: list[Tensor], key: str
) -> tuple[Tensor, Tensor]:
    return state_for(key).forward(x, topk_idx, topk_weights, list(params))


@parallel_experts.register_fake
def _parallel_experts_fake(x, topk_idx, topk_weights, params, key):
    return torch.empty_like(x), x.new_empty(state_for(key).meta_len(), dtype=torch.long)


@torch.library.custom_op("moe_compile::parallel_experts_backward", mutates_args=())
def parallel_experts_backward(
    grad: Tensor, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, params: list[Tensor], key: str, record: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    return state_for(key).backward(grad, x, topk_idx, topk_weights, list(params), record)


@parallel_experts_backward.register_fake
def _parallel_experts_backward_fake(grad, x, topk_idx, topk_weights, params, key, record):
    return torch.empty_like(x), torch.empty_like(topk_weights), [torch.empty_like(p) for p in params]


def _setup(ctx, inputs, output):
    x, idx, w, params, key = inputs
    ctx.key = key
    ctx.save_for_backward(x, idx, w, output[1], *params)


def _backward(ctx, grad, _grad_record):
    x, idx, w, record, *params = ctx.saved_tensors
    dx, dw, dps = parallel_experts_backward(grad, x, idx, w, params, ctx.key, record)
    return dx, None, (dw if w.dtype.is_floating_point else None), dps, None


parallel_experts.register_autograd(_backward, setup_context=_setup)

PARALLEL_EXPERTS = torch.ops.moe_compile.parallel_experts.default


def call(module: torch.nn.Module, *args, **kwargs) -> Tensor:
    """The forward installed on a parallelized experts module: (hidden, topk_idx, topk_weights) bound by the
    module's own forward signature (``m(x, topk_weights=w, topk_idx=idx)`` works)."""
    forward = getattr(type(module), "_moe_compile_original_forward", type(module).forward)
    x, idx, w = bind_experts_args(forward, module, args, kwargs)
    params = [module.get_parameter(n) for n in module._moe_parallel_names]
    return parallel_experts(x, idx, w, params, module._moe_parallel_key)[0]
