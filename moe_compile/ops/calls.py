"""The ops whose implementation is Python code of a registered module, found by a string key: each is one opaque
graph node, so that Dynamo never traces the module's data-dependent body, and a node the backend does not rewrite
computes exactly what eager does.

- ``moe_compile::experts_call``: an experts module captured whole (the ``@moe_compile.experts`` decorator, HF experts
  modules under a moe compile; ``moe_compile.capture``); runs the module's own forward.
- ``moe_compile::block_call``: an HF MoE block captured whole (``moe_compile.capture_blocks``); its own forward.
- ``moe_compile::dispatch_combine``: experts whose bodies are not a recognisable MLP: the dispatch (one sort, one
  gather) and the combine (one weighted index_add) fused around the user's own expert modules
  (``moe_compile.user_experts``), each run once on its contiguous slice of rows.

Each has a backward op, ``torch.func.vjp`` of the same code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import capture, capture_blocks, kernels
from ..kernels.common import check_routing
from ..user_experts import find_expert_list, run_user_experts


def keyed_experts_op(name: str, run):
    """Define ``moe_compile::<name>(x, topk_idx, topk_weights, params, key) -> [T, H]`` computing
    ``run(key, params, x, topk_idx, topk_weights)`` (Python code of a registered module), with a fake, and a
    backward op ``<name>_backward`` that is ``torch.func.vjp`` of ``run`` for x, the weights and the params."""

    @torch.library.custom_op(f"moe_compile::{name}", mutates_args=())
    def op(x: Tensor, topk_idx: Tensor, topk_weights: Tensor, params: list[Tensor], key: str) -> Tensor:
        with torch.no_grad():
            out = run(key, params, x, topk_idx, topk_weights)
        return out.clone() if out is x else out

    @op.register_fake
    def _fake(x, topk_idx, topk_weights, params, key):
        return torch.empty_like(x)

    @torch.library.custom_op(f"moe_compile::{name}_backward", mutates_args=())
    def backward_op(
        grad: Tensor, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, params: list[Tensor], key: str
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        def f(x_, w_, ps):
            return run(key, ps, x_, topk_idx, w_)

        with torch.enable_grad():
            _, vjp = torch.func.vjp(f, x, topk_weights, list(params))
            dx, dw, dps = vjp(grad)
        if not topk_weights.dtype.is_floating_point:
            dw = torch.zeros_like(topk_weights)
        # a custom op may not return its inputs
        return dx, dw, [g.clone() if g is p else g for g, p in zip(dps, params)]

    @backward_op.register_fake
    def _backward_fake(grad, x, topk_idx, topk_weights, params, key):
        return torch.empty_like(x), torch.empty_like(topk_weights), [torch.empty_like(p) for p in params]

    def setup(ctx, inputs, output):
        x, idx, w, params, key = inputs
        ctx.key = key
        ctx.save_for_backward(x, idx, w, *params)

    def backward(ctx, grad):
        x, idx, w, *params = ctx.saved_tensors
        dx, dw, dps = backward_op(grad, x, idx, w, params, ctx.key)
        return dx, None, dw, dps, None

    op.register_autograd(backward, setup_context=setup)
    return op


experts_call = keyed_experts_op(
    "experts_call", lambda key, params, x, idx, w: capture.call_module(capture.module_for(key), params, x, idx, w))
block_call = keyed_experts_op("block_call", capture_blocks.run_block)


def _run_dispatch_combine(key, params, x, idx, w):
    module = capture.module_for(key)
    _, experts = find_expert_list(module)
    check_routing(idx, w, x, len(experts))
    names = [n for n, _ in module.named_parameters()]
    return run_user_experts(module, experts, names, params, x, idx, w, kernels.plan(x, idx, len(experts)))


dispatch_combine = keyed_experts_op("dispatch_combine", _run_dispatch_combine)
