"""Data, expert and tensor parallelism for experts modules, switchable on every call.

    moe_compile.parallelize(model, mode="auto")     # every rank, before DDP / torch.compile / the optimizer
    model = DistributedDataParallel(model)          # all-reduces the dense parameters only
    model = torch.compile(model, backend="moe")
    ...
    moe_compile.set_parallel(model, "data")         # any step; no recompile

See ``docs/parallel.md``. Modules: ``layout`` (where weights live), ``dispatch`` (where tokens go), ``comm``
(functional collectives, hierarchical all-to-all), ``cost`` (the auto mode's model, per call and for the
storage layout), ``replicate`` (experts ``auto`` keeps whole on every rank), ``state`` (per-mode math),
``op`` (the custom op), ``find`` (finding experts modules); the functions below: ``setup`` (``parallelize``:
checks, sharding), ``modes`` (``set_parallel``), ``tags`` (expert parameters for DDP), ``checkpoint`` (state dicts at
any world size), ``clip`` (gradient clipping by the whole model's norm), ``fsdp`` / ``fsdp_grads`` (FSDP2 for the dense
weights), ``report``.
"""
from __future__ import annotations

from .checkpoint import (
    full_optim_state_dict,
    full_state_dict,
    load_full_optim_state_dict,
    load_full_state_dict,
    load_sharded_state_dict,
    optimizer_state_dict_hooks,
    sharded_state_dict,
)
from .clip import clip_grad_norm_, grad_norm
from .fsdp import fsdp_ignored_params
from .modes import get_parallel, set_parallel, set_rates
from .report import parallel_report
from .setup import parallelize
from .tags import ExpertParameter, is_expert_param
from .cost import INFINIBAND, NVLINK, Rates
from .layout import ParallelError
from .op import PARALLEL_EXPERTS
from .state import MODES

__all__ = [
    "parallelize", "set_parallel", "get_parallel", "is_expert_param", "parallel_report", "full_state_dict",
    "load_full_state_dict", "full_optim_state_dict", "load_full_optim_state_dict", "sharded_state_dict",
    "load_sharded_state_dict", "ExpertParameter", "set_rates", "Rates", "NVLINK", "INFINIBAND", "ParallelError",
    "MODES", "PARALLEL_EXPERTS", "clip_grad_norm_", "grad_norm", "fsdp_ignored_params",
    "optimizer_state_dict_hooks",
]
