"""The one description of a matched MoE block.

Detection (``moe_compile.recognise``) fills a :class:`MoESpec`; the ops and kernel backends
(``moe_compile.ops``, ``moe_compile.kernels``) read it.
The spec travels inside the graph as a JSON string argument of the ``moe_compile::`` ops, so it must stay a
plain, hashable, JSON-serialisable value.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

from . import activations

ACTIVATIONS = activations.NAMES
"""Activations the kernels know (``moe_compile.activations`` defines each once)."""

GATE_LAYOUTS = ("none", "concat", "interleaved", "separate")
"""How the first projection carries gate and up: ``none`` (plain MLP), ``concat`` ([gate | up] along the output
dimension, HF's default), ``interleaved`` (gate0, up0, gate1, ... as GPT-OSS), ``separate`` (two weights)."""

AUTOCAST_MODES = ("cast", "cast_out", "none")
"""What a block's eager code does under ``torch.autocast`` (the fused ops do the same; ``ops/autocast.py``):
``cast``: its expert GEMMs run in the autocast dtype and its output keeps the input's dtype (HF experts modules,
loops that ``index_add_`` into ``zeros_like(x)``); ``cast_out``: the output is in the autocast dtype too (GShard's
einsum combine, a sum over k of the experts' outputs); ``none``: the code does not autocast (``torch._grouped_mm``,
code under ``autocast(enabled=False)``): it computes in the input's dtype."""

WEIGHT_LAYOUTS = ("out_in", "in_out")
"""``out_in``: a weight maps x as ``x @ W.T`` (nn.Linear, HF's default); ``in_out``: ``x @ W`` (GPT-OSS)."""


@dataclass(frozen=True)
class RouterSpec:
    """What the router upstream of the experts does (reported by explain; the router itself stays in the graph,
    where inductor fuses it, and its gradient reaches it through the routing weights)."""

    score: str = "unknown"  # softmax | sigmoid | unknown
    order: str = "unknown"  # "score->topk" | "topk->score" | unknown
    renormalize: bool | None = None
    bias_correction: bool = False  # DeepSeek-V3 e_score_correction_bias
    group_limited: bool = False  # DeepSeek grouped top-k
    scaling: float | None = None  # routed scaling factor


@dataclass(frozen=True)
class MoESpec:
    """One matched MoE block.

    Expert weights reach the fused op as tensor lists: ``stacked`` means each list holds one ``[E, ...]`` tensor,
    otherwise each holds ``E`` per-expert 2D tensors (an ``nn.ModuleList`` of ``nn.Linear``).
    """

    num_experts: int
    top_k: int
    hidden: int
    ffn: int
    activation: str = "silu"
    gate_layout: str = "concat"
    weight_layout: str = "out_in"
    stacked: bool = True
    has_bias: bool = False
    act_alpha: float = 1.702
    act_limit: float = 7.0
    capacity_factor: float | None = None  # None: dropless
    router: RouterSpec = RouterSpec()
    shared_experts: bool = False
    dispatch: str = "topk"  # "topk": ids + weights [T, k]; "slots": GShard dispatch/combine tensors [T, E, capacity]
    expert_body: str = "mlp"  # "mlp": fused GEMMs; "user": the user's expert modules run inside dispatch+combine
    score_on_input: bool = False  # expert e sees w * x and its output is summed unweighted (torchtitan's
    # score-before-experts, Llama-4); otherwise w scales the expert's output. ATen path only (ops routes there)
    autocast: str = "cast"  # under torch.autocast, what the block's own code does (AUTOCAST_MODES)
    pattern: str = ""  # which detector matched, for explain

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {ACTIVATIONS}")
        if self.gate_layout not in GATE_LAYOUTS:
            raise ValueError(f"unknown gate layout {self.gate_layout!r}; known: {GATE_LAYOUTS}")
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"unknown weight layout {self.weight_layout!r}; known: {WEIGHT_LAYOUTS}")
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"unknown autocast mode {self.autocast!r}; known: {AUTOCAST_MODES}")
        if self.expert_body not in ("mlp", "user"):
            raise ValueError(f"expert_body must be 'mlp' or 'user', got {self.expert_body!r}")
        if self.num_experts < 1 or self.top_k < 1 or self.hidden < 1 or (self.ffn < 1 and self.expert_body == "mlp"):
            raise ValueError(f"sizes must be positive: {self}")

    @property
    def gated(self) -> bool:
        return self.gate_layout != "none"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "MoESpec":
        return _from_json(text)


@functools.lru_cache(maxsize=256)
def _from_json(text: str) -> MoESpec:
    d = json.loads(text)
    d["router"] = RouterSpec(**d["router"])
    return MoESpec(**d)
