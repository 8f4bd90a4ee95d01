"""The kernel-backend interface (the registry and the contract are in ``moe_compile.kernels``)."""
from __future__ import annotations

from ..spec import MoESpec
from .common import Plan, Weights


class KernelBackend:
    """The interface; see the module docstring for the contract of each method."""

    name = "abstract"

    def accepts(self, spec: MoESpec, x) -> bool:
        raise NotImplementedError

    def forward(self, spec: MoESpec, x, idx, w, wts: Weights, *, keep_outputs: bool = False):
        raise NotImplementedError

    def backward(self, spec: MoESpec, grad, x, idx, w, wts: Weights, h, r, *, kept_outputs: bool = False,
                 forward_b2: bool = True):
        raise NotImplementedError

    def plan(self, idx, num_experts: int) -> Plan:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<moe_compile kernel backend {self.name!r}>"
