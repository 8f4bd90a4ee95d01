"""moe_compile: find Mixture-of-Experts blocks in a traced model and run them fused and parallel.

``torch.compile(model, backend="moe")`` is the main entry point (registered through the ``torch_dynamo_backends``
entry point, so importing this package first is optional).

Importing the package changes nothing for other models or backends: the Dynamo settings that hand-written dispatch
code needs (``capture_dynamic_output_shape_ops``, ``capture_scalar_outputs``) and the capture of experts modules hold
only while Dynamo traces a frame for the ``moe`` backend (``moe_compile.scope``).
"""
from __future__ import annotations

from . import ops  # noqa: F401  (registers the moe_compile:: ops)
from . import capture, capture_blocks, capture_found, compat, scope
from .backend import moe_backend
from .passes import fuse_moe
from .capture import experts
from .spec import MoESpec, RouterSpec

__all__ = ["moe_backend", "experts", "explain", "MoESpec", "RouterSpec", "install_capture"]
__version__ = "0.1.0"


def install_capture() -> None:
    """Hook the moe backend's per-frame scope into Dynamo and HF's experts lookup (idempotent; done on import).
    Both hooks do nothing outside frames compiled with ``backend="moe"``. A hook that finds torch or transformers
    not as it expects turns its feature off with a warning (``moe_compile.compat.off()``; explain says so)."""
    scope.install(before_ddp_split=fuse_moe)
    why = capture.install_hf_capture()
    if why:
        compat.turn_off("HF experts capture", f"{why}; HF experts modules run their own code, unfused")
    scope.on_moe_frame(capture_blocks.install)  # HF MoE blocks that are not experts modules (switch, nllb, dbrx)
    scope.on_moe_frame(capture.register_roots)  # after the classes are patched: the modules to capture, by key
    scope.on_moe_frame(capture_found.register_roots)  # MoE blocks of any class, found by structure


install_capture()

from .explain import explain  # noqa: E402
from . import parallel  # noqa: E402  (registers moe_compile::parallel_experts)
from .parallel import (  # noqa: E402
    clip_grad_norm_, fsdp_ignored_params, full_optim_state_dict, full_state_dict, get_parallel, grad_norm, is_expert_param,
    load_full_optim_state_dict, load_full_state_dict, load_sharded_state_dict, optimizer_state_dict_hooks, parallel_report,
    parallelize,
    set_parallel, sharded_state_dict,
)

__all__ += ["parallel", "parallelize", "set_parallel", "get_parallel", "is_expert_param", "parallel_report",
            "full_state_dict", "load_full_state_dict", "full_optim_state_dict", "load_full_optim_state_dict",
            "sharded_state_dict", "load_sharded_state_dict", "clip_grad_norm_", "grad_norm", "fsdp_ignored_params",
            "optimizer_state_dict_hooks"]
