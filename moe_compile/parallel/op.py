"""The forward installed on a parallelized experts module: one ``moe_compile::parallel_experts`` call (the op is
defined in ``moe_compile.ops.parallel``)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..capture import bind_experts_args


PARALLEL_EXPERTS = torch.ops.moe_compile.parallel_experts.default


def call(module: torch.nn.Module, *args, **kwargs) -> Tensor:
    """The forward installed on a parallelized experts module: (hidden, topk_idx, topk_weights) bound by the
    module's own forward signature (``m(x, topk_weights=w, topk_idx=idx)`` works)."""
    forward = getattr(type(module), "_moe_compile_original_forward", type(module).forward)
    x, idx, w = bind_experts_args(forward, module, args, kwargs)
    params = [module.get_parameter(n) for n in module._moe_parallel_names]
    return PARALLEL_EXPERTS(x, idx, w, params, module._moe_parallel_key)[0]
