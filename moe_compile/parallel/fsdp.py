"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the dense weights, ``parallelize`` for the experts.

    moe_compile.parallelize(model, mesh=mesh)                 # the experts: sharded over mesh["ep"]
    ignored = moe_compile.fsdp_ignored_params(model)          # ... so FSDP2 must leave them alone
    for block in model.blocks:
        fully_shard(block, ignored_params=ignored)            # the dense weights: sharded over every rank
    fully_shard(model, ignored_params=ignored)
    model = torch.compile(model, backend="moe")

The experts op reads FSDP2's gradient divide factor (``fsdp_grads``) so expert gradients are scaled like the
dense ones. For ``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict`` / ``set_model_state_dict``
and, with ``checkpoint.optimizer_state_dict_hooks``, the optimizer's) stacked experts modules present their shards
as ``DTensor``s (``checkpoint.install_state_dict_hooks``).
"""
from __future__ import annotations

from torch import nn

from ..compat import distributed as torch_dist
from .layout import ParallelError
from .tags import parallel_states, unwrapped


def fsdp_ignored_params(model: nn.Module) -> set[nn.Parameter]:
    """The parameters ``fully_shard`` must leave alone on a parallelized ``model``: every sharded expert parameter
    (this rank's shard, already split over the experts group by ``parallelize``; its gradient is reduced and scaled
    by the experts op) and the placeholders of other ranks' experts in blocks that dispatch inline. Pass it as
    ``ignored_params=`` to every ``fully_shard`` call on the model or its submodules. Replicated experts modules'
    parameters (``mode="replicate"`` or ``auto``'s choice) are not in it: FSDP2 shards those like dense weights.

    Call it after ``parallelize`` and before the first ``fully_shard``; without a process group (nothing
    sharded) it is empty."""
    root = unwrapped(model)
    states = parallel_states(root)
    if not states and not any(getattr(p, "_moe_expert", False) for p in root.parameters()):
        raise ParallelError(
            "moe_compile.fsdp_ignored_params: the model has no expert parameters tagged by moe_compile.parallelize. "
            "Fix: call moe_compile.parallelize(model, ...) first (before fully_shard)")
    for st in states:
        ref = getattr(st, "_fsdp_root", None)
        if ref is not None and ref() is not root:
            raise ParallelError(
                f"moe_compile.fsdp_ignored_params: the experts module {st.path} belongs to another model: this one "
                "is a copy (copy.deepcopy) of a parallelized model, and its experts share the original's parallel "
                "state, which finds the FSDP2 modules (and their gradient divide factor) through the original. "
                "Fix: fully_shard the model moe_compile.parallelize was called on (copy the model before "
                "parallelize, and parallelize the copy)")

    def ignored(p) -> bool:
        sharded = getattr(p, "_moe_expert", False) and torch_dist.is_ddp_ignored(p)
        return sharded or getattr(p, "_moe_remote", False)  # a placeholder of another rank's expert

    return {p for m in root.modules() for p in m.parameters(recurse=False) if ignored(p)}
