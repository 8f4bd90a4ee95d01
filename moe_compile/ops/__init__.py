"""Every ``moe_compile::`` custom op, one module each (importing this package registers them all):

- ``experts``: ``moe_compile::experts`` (+ backward), the fused dispatch -> expert MLPs -> combine;
- ``slots``: ``moe_compile::experts_slots`` (+ backward), GShard capacity-slot experts;
- ``calls``: ``experts_call``, ``block_call``, ``dispatch_combine``: captured modules' own code, by key;
- ``parallel``: ``moe_compile::parallel_experts`` (+ backward), a parallelized experts module's call.

They compute through ``moe_compile.kernels`` (the kernel backends); ``autocast`` gives the fused ones autocast
kernels that follow what the block's own code does under ``torch.autocast``.
"""
from . import calls, experts, parallel, slots  # noqa: F401
from . import autocast  # noqa: F401  (after the ops it registers kernels for)
from .experts import fused_experts  # noqa: F401
from .slots import experts_slots, slots_to_topk  # noqa: F401
