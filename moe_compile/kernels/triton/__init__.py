"""The Triton kernel backend: CUDA tensors in float32 / bfloat16 / float16 (and CPU tensors of those dtypes under
``TRITON_INTERPRET=1``, which is what the interpreter is for: tests and the GPU check's dry run).

``kernels.py`` holds the jit kernels, ``launch.py`` the dispatch plan and the launchers (forward, backward). The
backend saves the unweighted expert outputs ``y`` as its ``r`` (its backward reads d(routing weight) as
``<grad, y>``), so ``keep_outputs`` costs nothing here, and a forward that ran without ``b2`` (``forward_b2=False``)
is handled by construction: ``y`` then holds no bias term.
"""
from __future__ import annotations

from ..common import make_plan as sorted_plan
from ..interface import KernelBackend
from . import launch
from .kernels import DTYPES, HAS_TRITON, INTERPRET


class TritonBackend(KernelBackend):
    name = "triton"

    def accepts(self, spec, x) -> bool:
        # score_on_input (the score scales the experts' input) has no kernel: the ATen backend computes it
        return (HAS_TRITON and x.dtype in DTYPES and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))
                and not (spec is not None and spec.score_on_input))

    def forward(self, spec, x, idx, w, wts, *, keep_outputs=False):
        out, (h, y) = launch.experts_forward(spec, x, idx, w, wts)
        return out, h, y

    def backward(self, spec, grad, x, idx, w, wts, h, r, *, kept_outputs=False, forward_b2=True):
        return launch.experts_backward(spec, grad, x, idx, w, wts, h, r)

    def plan(self, idx, num_experts):
        return sorted_plan(idx.long(), num_experts)
