"""HF transformers internals: the experts interface, ``_experts_implementation``, the MoE block classes.

See :mod:`moe_compile.compat`. Without transformers nothing here does anything; with a transformers 5 whose
internals differ, the experts capture is turned off loudly (``compat.off()``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys

import torch

_MARK = "_moe_compile_original"
INTERFACE_PARAMS = ("self", "experts_implementation", "default")

BLOCKS = {
    "transformers.models.switch_transformers.modeling_switch_transformers": {"SwitchTransformersExperts": ("mask", 2)},
    "transformers.models.nllb_moe.modeling_nllb_moe": {"NllbMoeExperts": ("index", 2)},
    "transformers.models.dbrx.modeling_dbrx": {"DbrxExperts": ("index", 3)},
    "transformers.models.jetmoe.modeling_jetmoe": {"JetMoeMoE": ("block", 3)},
}
"""HF modeling module -> {class name: (kind, rank of the hidden states the call must have to be captured)}: the MoE
blocks HF keeps outside experts modules (``capture_blocks`` says what each kind means)."""


def _transformers_major() -> int | None:
    mod = sys.modules.get("transformers")
    try:
        return int(str(getattr(mod, "__version__", "0")).split(".")[0]) if mod is not None else None
    except ValueError:
        return None


def install_experts_hook(route) -> str:
    """Wrap ``ExpertsInterface.get_interface`` so that the implementation it returns for an experts module goes
    through ``route(fn)`` (which returns ``fn`` or what to call instead). Idempotent. Returns "" when installed or
    when there is nothing to hook (no transformers, or a transformers before 5, which has no experts modules);
    otherwise why it could not be installed."""
    try:
        from transformers.integrations import moe as hf_moe
    except ImportError:
        return ""
    interface = getattr(hf_moe, "ExpertsInterface", None)
    if interface is None:
        major = _transformers_major()
        return "" if major is not None and major < 5 else \
            "transformers.integrations.moe has no ExpertsInterface (HF experts modules are not captured)"
    original = getattr(interface, "get_interface", None)
    if original is None:
        return "ExpertsInterface has no get_interface"
    if getattr(original, _MARK, None) is not None:
        return ""
    params = list(inspect.signature(original).parameters)
    if params[:3] != list(INTERFACE_PARAMS):
        return f"ExpertsInterface.get_interface{tuple(params)} no longer takes {INTERFACE_PARAMS}"

    @functools.wraps(original)
    def get_interface(self, experts_implementation, default):
        return route(original(self, experts_implementation, default))

    setattr(get_interface, _MARK, original)
    interface.get_interface = get_interface
    return ""


def is_experts_module(module: torch.nn.Module) -> bool:
    """Is ``module`` an HF experts module (``@use_experts_implementation``)? By the attributes HF gives them."""
    return hasattr(module, "config") and hasattr(module, "has_gate") and hasattr(module, "is_transposed")


def forward_is_hf_wrapper(cls: type) -> bool:
    """Is ``cls.forward`` HF's ``use_experts_implementation`` wrapper itself (not a subclass's own forward)?"""
    return getattr(cls.forward, "__wrapped__", None) is not None


@contextlib.contextmanager
def eager_experts(module: torch.nn.Module):
    """Run ``module``'s experts by HF's eager loop for the duration (``config._experts_implementation``): the
    implementations' common definition, and the one with a float64 kernel."""
    cfg = getattr(module, "config", None)
    impl = getattr(cfg, "_experts_implementation", None)
    if impl is None or impl == "eager":
        yield
        return
    cfg._experts_implementation = "eager"
    try:
        yield
    finally:
        cfg._experts_implementation = impl


def block_classes():
    """``(class, kind, rank)`` for every HF MoE block class of :data:`BLOCKS` whose modeling module is imported."""
    for name, classes in BLOCKS.items():
        mod = sys.modules.get(name)
        if mod is None:
            continue
        for cls_name, (kind, rank) in classes.items():
            cls = getattr(mod, cls_name, None)
            if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
                yield cls, kind, rank
