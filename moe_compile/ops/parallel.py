"""``moe_compile::parallel_experts``: a parallelized experts module's call, one opaque graph node.

The op takes the module's local parameters and a string key; its implementation finds the module's parallel state
(``moe_compile.parallel.state.ParallelState``, registered here by key with :func:`register_state`) and runs the
current mode, with its collectives, at run time. A compiled graph therefore holds the same node whatever the mode:
switching modes never recompiles, and DDP's graph splitter cannot cut between dispatch and combine.

The forward returns the output and a small int64 record of the call (mode, capacity, routing counts) that the
backward op (``moe_compile::parallel_experts_backward``) replays, so a mode switch between a forward and its
backward is harmless.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

_STATES: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


def register_state(key: str, state) -> None:
    """``state`` answers ``forward(x, idx, w, params) -> (out, record)``, ``backward(grad, x, idx, w, params,
    record) -> (dx, dw, dparams)`` and ``meta_len()``; the op finds it by ``key`` while it lives."""
    _STATES[key] = state


def state_for(key: str):
    try:
        return _STATES[key]
    except KeyError:
        raise RuntimeError(f"moe_compile.parallel: the parallel experts module {key} no longer exists") from None


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
