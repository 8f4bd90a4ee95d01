"""The only modules of moe_compile that touch torch's or transformers' private APIs.

Everything else in the package calls these functions; none of it imports ``torch._dynamo``, ``torch._inductor``,
``torch._subclasses``, ``torch._C``, FSDP2's or DDP's private attributes, Dynamo's frame entry or HF's experts
interface internals itself. Each hook checks, when it is installed or first used, that what it relies on has the
shape it expects (a signature, an attribute, a class). When it does not, the hook either raises
:class:`CompatError` (where going on would change numbers: FSDP2's gradient divide factor, DDP's active-module
record) or turns its feature off with a warning naming the torch version and what is lost (capture, the Dynamo
settings scope); :func:`off` then lists the feature and ``moe_compile.explain`` prints ``capture off: <reason>``.
Never a silent no-op.

What is used, and why (tested: torch 2.13.0 + transformers 5.25.0, the whole suite; torch 2.11.0 + transformers
5.17.0, the quickstart and the capture / scope / compat / call-order tests: ``.ci/run``, ``tests/test_compat.py``):

``dynamo.py``
- ``torch._dynamo.convert_frame.compile_frame`` (by its parameters ``code``, ``globals``, ``locals``, ``closure``,
  ``compiler_fn``): the per-frame entry. Torch has no per-backend scope for Dynamo settings (``torch.compile`` wraps
  a custom backend in ``_TorchCompileWrapper``, which drops ``backend_ctx_ctor``), so frames whose backend is
  ``moe`` are traced inside the moe scope from here; their locals, globals and closure are where the captured
  modules are found and registered before the trace.
- Dynamo's backend wrappers' attributes (``_torchdynamo_orig_backend``, ``compiler_fn``, ``backend_compile_fn``,
  ``__wrapped__``, ``func``, ``__self__``) and ``torch._dynamo.backends.distributed.DDPOptimizer``: which backend
  a frame is compiled for, and whether DDPOptimizer will split its graph (the MoE blocks are fused before it).
- ``torch._dynamo.config.capture_dynamic_output_shape_ops`` / ``capture_scalar_outputs``: the two settings moe
  frames trace under (``torch._dynamo.config.patch``).
- ``torch._dynamo.explain``: explain's graph-break count and reasons.
- ``torch._inductor.compile_fx.compile_fx``, ``torch._dynamo.backends.debugging.aot_eager``: the compilers the
  backend hands the fused graph to; ``torch._inductor.config`` keys for the ATen path's small compiled kernels.
- ``torch._subclasses.fake_tensor.unset_fake_temporarily`` / ``FakeTensorMode``: the float64 proofs run on real
  tensors while Dynamo's fake mode is active; ``parallelize`` traces a model once on fake tensors.
- FX ``node.meta["grapharg"]`` (``.example``: the live parameter behind a placeholder; ``.source.name()``: its
  path, ``L['self']._modules['moe']._parameters['w']``), and the ``L['self']`` root of Dynamo's module paths.
- ``torch._C._set_grad_enabled``: a graph node that Dynamo inserts around ``no_grad`` regions.
- ``torch.utils._python_dispatch.TorchDispatchMode``: records which GEMM dtypes a block's own code computes in.

``distributed.py``
- DDP: ``module._ddp_params_and_buffers_to_ignore`` (through ``DistributedDataParallel.
  _set_params_and_buffers_to_ignore_for_model``), ``param._ddp_ignored``, ``DistributedDataParallel.
  _active_ddp_module`` (which DDP forward is running: the experts' gradient divisor), ``ddp._module_parameters``.
- FSDP2: ``FSDPModule._get_fsdp_state()._fsdp_param_group`` with ``.mesh_info`` (``shard_mesh_size``,
  ``replicate_mesh_size``) and ``.gradient_divide_factor``: what FSDP2 divides the dense gradients by.
- ``torch.compile``'s wrapper attribute ``_orig_mod`` (and the ``_orig_mod.`` prefix of its parameter names).
- ``torch.distributed._functional_collectives``: all-to-all and all-gather that trace into graphs, with autograd.
- ``torch._C.TensorBase.grad``'s setter: clearing ``.grad`` of a parameter whose class overrides ``grad``.

``hf.py``
- ``transformers.integrations.moe.ExpertsInterface.get_interface(self, experts_implementation, default)``:
  wrapped so that experts modules (``@use_experts_implementation``) are captured while compiling.
- ``config._experts_implementation``: the proof runs HF's eager loop (the implementations' common definition).
- the modeling modules and class names of the HF MoE blocks outside experts modules (switch_transformers,
  nllb_moe, dbrx, jetmoe) and the attributes that mark an experts module (``config``, ``has_gate``,
  ``is_transposed``).

``nn.py``
- ``torch.nn.modules.dropout._DropoutNd`` and ``Module._forward_hooks`` / ``_forward_pre_hooks`` /
  ``_backward_hooks``: whether a module may be captured (dropout or hooks inside may not).
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["CompatError", "off", "turn_off", "torch_version"]


class CompatError(RuntimeError):
    """A torch or transformers internal that moe_compile relies on is not what it expects on this version."""


_OFF: dict[str, str] = {}


def torch_version() -> str:
    return torch.__version__


def turn_off(feature: str, reason: str) -> None:
    """Record that ``feature`` is off on this torch / transformers, and warn once, naming the version and what is
    lost. :func:`off` lists it, and explain prints it."""
    if feature in _OFF:
        return
    _OFF[feature] = reason
    warnings.warn(f"moe_compile: {feature} off on torch {torch_version()}: {reason}", RuntimeWarning, stacklevel=3)


def off() -> dict[str, str]:
    """{feature: why it is off} for every hook that found torch or transformers not as it expects."""
    return dict(_OFF)


def restore(feature: str) -> None:
    """Forget that ``feature`` was turned off (tests that broke a hook on purpose and put it back)."""
    _OFF.pop(feature, None)
