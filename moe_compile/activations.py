"""Each expert activation once: its name, its torch formula, its derivative, and the code the Triton kernels use.

A new activation is one row here (its torch forward and ``g -> (act(g), act'(g))``), plus a branch in the Triton
kernels' ``_act`` / ``_act_grad`` under its ``code`` if it should run there. The spec (``MoESpec.activation``), the
ATen path, the Triton launchers and the proof's readings (``recognise/experts.py``) all read this table.

``swiglu_oai`` is GPT-OSS's clamped SwiGLU, gated only, with two parameters (``MoESpec.act_alpha``,
``act_limit``): ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``;
the ATen path spells out its derivative itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def _silu(g):
    s = torch.sigmoid(g)
    return g * s, s * (1 + g * (1 - s))


def _gelu(g):
    cdf = 0.5 * (1 + torch.erf(g * math.sqrt(0.5)))
    return g * cdf, cdf + g * torch.exp(-0.5 * g * g) * (1 / math.sqrt(2 * math.pi))


def _gelu_tanh(g):
    c = math.sqrt(2 / math.pi)
    t = torch.tanh(c * (g + 0.044715 * g * g * g))
    return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c * (1 + 3 * 0.044715 * g * g)


def _relu(g):
    return torch.relu(g), (g > 0).to(g.dtype)  # 0 at 0, as autograd


def _sigmoid(g):
    s = torch.sigmoid(g)
    return s, s * (1 - s)


def _identity(g):
    return g, torch.ones_like(g)


@dataclass(frozen=True)
class Activation:
    name: str
    code: int  # the Triton kernels' ACT constexpr
    forward: Callable | None  # t -> act(t) (None: gated-only, spelled out where it is used)
    value_and_grad: Callable | None  # g -> (act(g), act'(g)), written out for the ATen path's backward
    gated_only: bool = False
    hints: tuple[str, ...] = ()  # substrings of an activation module's class name that make this reading first


TABLE: dict[str, Activation] = {a.name: a for a in (
    Activation("silu", 0, F.silu, _silu),
    Activation("gelu", 1, F.gelu, _gelu, hints=("gelu",)),
    Activation("gelu_tanh", 2, lambda t: F.gelu(t, approximate="tanh"), _gelu_tanh,
               hints=("tanh", "new", "fast", "pytorch")),  # HF's NewGELU, FastGELU, PytorchGELUTanh
    Activation("relu", 3, F.relu, _relu, hints=("relu",)),
    Activation("sigmoid", 4, torch.sigmoid, _sigmoid),
    Activation("identity", 5, lambda t: t, _identity),
    Activation("swiglu_oai", 6, None, None, gated_only=True),
)}
NAMES = tuple(TABLE)


def get(name: str) -> Activation:
    if name not in TABLE:
        raise ValueError(f"unknown activation {name!r}; known: {NAMES}")
    return TABLE[name]


def elementwise(name: str) -> Activation:
    """The entry of an elementwise (not gated-only) activation."""
    a = get(name)
    if a.forward is None:
        raise ValueError(f"{name!r} is not an elementwise activation")
    return a


def reading_order(hint: str) -> list[str]:
    """The elementwise activations in the order a proof tries them, for an activation module named ``hint``
    (lower case): the one whose hints match goes first; later rows of the table are the more specific ones and win
    (``gelutanh`` is gelu_tanh, not gelu)."""
    names = [a.name for a in TABLE.values() if not a.gated_only]
    first = next((a.name for a in reversed(TABLE.values()) if any(h in hint for h in a.hints)), None)
    if first is not None:
        names.remove(first)
        names.insert(0, first)
    return names
