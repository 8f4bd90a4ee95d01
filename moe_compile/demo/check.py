"""The demo's equivalence check: one training step on ``nproc`` ranks equals one process on the global batch.

The step is the demo's own (``parallelize`` in the run's mode -> DDP -> ``torch.compile(backend="moe")`` ->
backward -> ``moe_compile.clip_grad_norm_`` -> AdamW, from the run's starting weights and optimizer state), taken
on a float64 copy of the model before training starts; the reference is the unparallelized copy on one process,
eager, with ``torch.nn.utils.clip_grad_norm_``, on every rank's batch at once.

Why float64 and a copy rather than the first fp32 training step: AdamW's first update is ``lr * g / (|g| + eps)``,
about ``lr * sign(g)``, so a gradient element that sums to ~1e-8 (an embedding row of a rare byte) and rounds 1%
differently over 2 ranks than over 1 moves its weight by 1% of ``lr``: fp32 parameters after one AdamW step
differ by ~1e-4 relative with correct parallel code (their gradients agree to ~1e-6). In float64 rounding is ~1e-16,
so any difference above the tolerance is a real one. The copy is compiled with ``options={"compiler": "eager"}``
(the moe backend's graph rewrite and the parallel experts op, without inductor's code generation) and the experts
op's CPU path runs its eager elementwise formula (``moe_compile.kernels.aten.KERNELS = "eager"``, the documented
``MOE_COMPILE_CPU_KERNELS`` switch, for the check only), so it costs seconds, not inductor compiles in float64.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import moe_compile
from moe_compile.kernels import aten

TOLERANCE = 1e-5  # largest relative difference allowed; float64 rounding alone gives about 1e-15


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to ``b``'s largest magnitude."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@dataclass
class Verdict:
    step: int
    loss: float
    loss_ref: float
    loss_rel: float
    norm_rel: float | None  # the gradient norm clip_grad_norm_ returned (None: clipping off)
    params_rel: float  # every parameter after the optimizer step, relative to its tensor's largest magnitude
    worst_param: str
    tolerance: float = TOLERANCE
    wrapper: str = "DDP"  # or "FSDP2" (--fsdp)

    @property
    def passed(self) -> bool:
        return max(self.loss_rel, self.norm_rel or 0.0, self.params_rel) <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def describe(self, world: int) -> str:
        norm = "" if self.norm_rel is None else f", gradient norm {self.norm_rel:.1e}"
        return (f"equivalence check (step {self.step}, float64): {world} rank(s) (parallelize + {self.wrapper} + "
                f"backend=\"moe\" "
                f"+ clip + AdamW) vs one process on the global batch (eager, unparallelized): loss {self.loss:.6f} vs "
                f"{self.loss_ref:.6f}; largest relative difference: loss {self.loss_rel:.1e}{norm}, parameters "
                f"after the step {self.params_rel:.1e} ({self.worst_param}): "
                f"{'PASS' if self.passed else 'FAIL'} (tolerance {self.tolerance:.0e})")


def one_step(run, model, opt, x, y, max_norm: float, clip):
    loss = run(x, y)
    loss.backward()
    norm = clip(model, max_norm) if max_norm > 0 else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), norm


def step_check(model, make_optimizer, opts: dict, ckpt: dict | None, batches, step: int, device) -> Verdict | None:
    """Run on every rank with the unparallelized model the run starts from (left untouched). Returns the verdict
    on rank 0, None elsewhere."""
    rank, world = dist.get_rank(), dist.get_world_size()
    par = copy.deepcopy(model).double()
    ref = copy.deepcopy(par) if rank == 0 else None
    x, y = (t.to(device) for t in batches.rank_batch(step, rank, world))
    moe_compile.parallelize(par, mode=opts["mode"], tokens_per_call=x.numel())  # the run's layout choice
    run = torch.compile(wrap(par, opts.get("fsdp", False)), backend="moe", options={"compiler": "eager"})
    opt = make_optimizer(par.parameters(), opts)
    if ckpt:
        moe_compile.load_full_optim_state_dict(par, opt, ckpt["optim"])  # cast to float64 by the optimizer
    with eager_kernels():
        loss, norm = one_step(run, par, opt, x, y, opts["max_norm"], moe_compile_clip)
    mean = loss.clone()
    dist.all_reduce(mean)
    mean /= world
    full = moe_compile.full_state_dict(par, rank0_only=True)  # a collective
    verdict = None
    if rank == 0:
        ref_opt = make_optimizer(ref.parameters(), opts)
        if ckpt:
            moe_compile.load_full_optim_state_dict(ref, ref_opt, ckpt["optim"])
        X, Y = (t.to(device) for t in batches.global_batch_at(step))
        ref_loss, ref_norm = one_step(ref, ref, ref_opt, X, Y, opts["max_norm"], torch_clip)
        worst, worst_name = -1.0, ""
        for name, v in ref.state_dict().items():
            d = rel(full[name], v)
            if d > worst:
                worst, worst_name = d, name
        norm_rel = None if norm is None else rel(norm, ref_norm)
        verdict = Verdict(step, float(mean), float(ref_loss), rel(mean, ref_loss), norm_rel, worst, worst_name,
                          wrapper="FSDP2" if opts.get("fsdp") else "DDP")
    dist.barrier()
    del run, par, opt, ref
    torch.compiler.reset()  # drop the check's graphs before the run compiles its own
    return verdict


def wrap(model, fsdp: bool):
    """``DistributedDataParallel(model)``, or with ``fsdp`` FSDP2: ``fully_shard`` on every block, then on the
    model, the expert shards left to ``parallelize`` (``moe_compile.fsdp_ignored_params``). ``model`` is
    parallelized already."""
    if not fsdp:
        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    ignored = moe_compile.fsdp_ignored_params(model)
    for block in model.blocks:
        fully_shard(block, ignored_params=ignored)
    return fully_shard(model, ignored_params=ignored)


@contextlib.contextmanager
def eager_kernels():
    old, aten.KERNELS = aten.KERNELS, "eager"
    try:
        yield
    finally:
        aten.KERNELS = old


def moe_compile_clip(model, max_norm):
    return moe_compile.clip_grad_norm_(model, max_norm)


def torch_clip(model, max_norm):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
