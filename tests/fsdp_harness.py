"""FSDP2 training checks for the parallel tests (test support, run inside the gloo workers of
``parallel_harness``): ``parallelize -> fully_shard (blocks, model) -> (torch.compile)`` against one process on
the global batch."""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist

import moe_compile
from moe_compile import parallel as api
import parallel_harness as testing


def full(t):
    """A DTensor's whole value (FSDP2's dense parameters, gradients, optimizer state); anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def build(case: dict):
    """(reference model, parallelized + fully_shard'ed model, the model to call, mesh) for ``case`` (see
    :func:`fsdp_compare`)."""
    from torch.distributed.fsdp import fully_shard

    W = dist.get_world_size()
    ep = case.get("ep", W)
    torch.manual_seed(case.get("seed", 0))
    model = testing.toy_model({**case, "routing": "router", "capacity_factor": None})
    ref = copy.deepcopy(model)
    mesh = None
    if ep < W:
        _, _, mesh = testing.mesh_groups(ep)
        kw = dict(mesh=mesh)
    else:
        kw = {}
    par = api.parallelize(copy.deepcopy(model), mode=case["modes"][0], **kw)
    ignored = moe_compile.fsdp_ignored_params(par)
    fsdp_mesh = mesh if case.get("fsdp_mesh") == "2d" else None  # 2d: HSDP, replicated over dp, sharded over ep
    fs = dict(mesh=fsdp_mesh, ignored_params=ignored, reshard_after_forward=case.get("reshard", True))
    if case.get("per_block", True):
        for b in par.blocks:
            fully_shard(b, **fs)
    fully_shard(par, **fs)
    if case.get("divide_factor") is not None:
        for m in [par, *par.blocks]:
            m.set_gradient_divide_factor(case["divide_factor"])
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM: divide, then sum
    run = par
    if case.get("compile"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run = torch.compile(par, backend="moe", options={"compiler": case["compile"]})
    return ref, par, run, mesh


def _float64(fn):
    """``fn(case, ...)`` in float64 when ``case["float64"]`` (the state-dict checks then see no fp32 rounding of
    AdamW's early steps)."""
    import functools

    @functools.wraps(fn)
    def run(case, *args):
        if not case.get("float64"):
            return fn(case, *args)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return fn(case, *args)
        finally:
            torch.set_default_dtype(old)
    return run


@_float64
def fsdp_compare(case: dict) -> dict:
    """Run on every rank. ``case``: kind, E, H, F, k, layers, tokens (per rank), modes (one per step), seed, ep
    (experts group size; < W: a (W/ep) x ep mesh), fsdp_mesh ("world": fully_shard's default 1D mesh; "2d": the
    same dp x ep mesh, HSDP), per_block (fully_shard each block, then the model; else the model only), compile
    (None, "aot_eager", "inductor"), optim ("adamw" / "sgd"), lr, divide_factor (set_gradient_divide_factor on
    every FSDP module; the loss is then the per-rank mean times W / factor on the reference too), clip (max norm:
    moe_compile.clip_grad_norm_ on the model vs torch's on the reference), micro (micro-batches; all but the last
    with set_requires_gradient_sync(False)), float64 (everything in float64).
    Returns the largest relative differences (loss, dense_grad, expert_grad, weights, optim_state[, clip_norm])."""
    rank, W = dist.get_rank(), dist.get_world_size()
    T, H, micro = case["tokens"], case.get("H", 16), case.get("micro", 1)
    ref, par, run, _ = build(case)
    optim = case.get("optim", "adamw")
    lr = case.get("lr", 0.01)
    opt_ref = testing._optimizer(optim, ref.parameters(), lr)
    opt_par = testing._optimizer(optim, par.parameters(), lr)
    # FSDP2 divides the summed gradient by its factor (W by default): the reference's loss scaled alike
    scale = W / case["divide_factor"] if case.get("divide_factor") is not None else 1.0
    errs: dict[str, float] = {}
    per_step: list[dict] = []

    def note(name, value):
        errs[name] = value if math.isnan(value) else max(errs.get(name, 0.0), value)
        per_step[-1][name] = max(per_step[-1].get(name, 0.0), value)

    for step, mode in enumerate(case["modes"]):
        per_step.append({"mode": mode})
        api.set_parallel(par, mode)
        g = torch.Generator().manual_seed(1000 * case.get("seed", 0) + step)
        x_all = torch.randn(W * micro * T, H, generator=g)
        c_all = torch.randn(W * micro * T, H, generator=g)
        opt_ref.zero_grad(set_to_none=True)
        loss_ref = scale * 0.5 * ((ref(x_all) - c_all) ** 2).sum(-1).mean()
        loss_ref.backward()
        if case.get("clip") is not None:
            norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), case["clip"])
        opt_par.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for j in range(micro):
            last = j == micro - 1
            par.set_requires_gradient_sync(last)
            sl = slice((rank * micro + j) * T, (rank * micro + j + 1) * T)
            loss = 0.5 * ((run(x_all[sl]) - c_all[sl]) ** 2).sum(-1).mean() / micro
            loss.backward()
            total += loss.detach()
        if case.get("clip") is not None:
            norm = moe_compile.clip_grad_norm_(run, case["clip"])
            note("clip_norm", testing.rel(norm, norm_ref))
            per_step[-1].update(norm=float(norm), norm_ref=float(norm_ref))
        dist.all_reduce(total)
        note("loss", testing.rel(scale * total / W, loss_ref.detach()))
        ref_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ref.named_parameters()}
        floor = max(1e-2 * max(float(v.abs().max()) for v in ref_grads.values()), 1e-12)
        for n, p in par.named_parameters():
            if not api.is_expert_param(p) or not getattr(p, "_ddp_ignored", False):
                assert hasattr(p, "full_tensor"), (n, type(p))  # FSDP2 sharded it (a DTensor)
                note("dense_grad", testing.rel(full(p.grad), ref_grads[n], floor))
            else:
                assert not hasattr(p, "full_tensor"), n  # our shard, left alone by FSDP2
        for path, m in api.tags.parallel_modules(par):
            want = {n: ref_grads[f"{path}.{n}"] for s in m._moe_parallel.full_names.values() for n in s}
            for n, v in api.checkpoint.local_from_full(m, want).items():
                note("expert_grad", testing.rel(m.get_parameter(n).grad, v, floor))
        opt_ref.step()
        opt_par.step()
        got = {n: full(v) for n, v in api.full_state_dict(par).items()}
        note("weights", max(testing.rel(got[n], v) for n, v in ref.state_dict().items()))
        fos, ros = api.full_optim_state_dict(par, opt_par), api.full_optim_state_dict(ref, opt_ref)
        assert set(fos["state"]) == set(ros["state"]), set(fos["state"]) ^ set(ros["state"])
        for n, st in ros["state"].items():
            for key, v in st.items():
                note("optim_state", testing.rel(torch.as_tensor(full(fos["state"][n][key])), torch.as_tensor(v)))
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) if case.get("compile") else 0
    return {"errors": errs, "per_step": per_step, "graphs": graphs, "report": str(api.parallel_report(par))}


# --------------------------------------------------------------------------------------------- DCP state dicts
G = 12  # global batch (tokens per step, split over the ranks): the same steps at every world size


def batch(step: int, H: int = 16):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(G, H, generator=g), torch.randn(G, H, generator=g)


def train_steps(model, run, opt, steps, case: dict) -> None:
    """AdamW steps ``steps`` on this rank's share of the global batches (mean loss over the rank's tokens),
    gradient-clipped by moe_compile when ``case["clip"]``. One process: ``run`` is the whole model."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    W, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    for step in steps:
        x, c = batch(step, case.get("H", 16))
        sl = slice(rank * G // W, (rank + 1) * G // W)
        opt.zero_grad(set_to_none=True)
        (0.5 * ((run(x[sl]) - c[sl]) ** 2).sum(-1).mean()).backward()
        if case.get("clip") is not None:
            moe_compile.clip_grad_norm_(run, case["clip"])
        opt.step()


def reference(case: dict, steps):
    """The single-process model and AdamW after ``steps`` on the whole global batches."""
    torch.manual_seed(case.get("seed", 0))
    ref = testing.toy_model({**case, "routing": "router", "capacity_factor": None})
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.01)
    for step in steps:
        x, c = batch(step, case.get("H", 16))
        opt.zero_grad(set_to_none=True)
        (0.5 * ((ref(x) - c) ** 2).sum(-1).mean()).backward()
        if case.get("clip") is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), case["clip"])
        opt.step()
    return ref, opt


def _rel_dicts(got: dict, want: dict) -> float:
    assert set(got) == set(want), set(got) ^ set(want)
    return max(testing.rel(full(got[n]).cpu(), want[n]) for n in want)


def _optim_errors(osd: dict, ref, opt_ref) -> float:
    """Largest difference between a DCP optimizer state dict (by FQN) and the single-process optimizer's."""
    want = {n: opt_ref.state[p] for n, p in ref.named_parameters()}
    assert set(osd["state"]) == set(want), set(osd["state"]) ^ set(want)
    errs = {(n, k): testing.rel(torch.as_tensor(full(osd["state"][n][k])).cpu(), torch.as_tensor(v))
            for n, st in want.items() for k, v in st.items()}
    return max(errs.values())


def model_and_optim(case: dict, seed: int):
    """A parallelized, fully_shard'ed model (weights from ``seed``), its AdamW with moe_compile's optimizer hooks."""
    ref, par, run, _ = build({**case, "seed": seed})
    opt = moe_compile.optimizer_state_dict_hooks(par, torch.optim.AdamW(par.parameters(), lr=0.01,
                                                                          weight_decay=0.01))
    return par, run, opt


@_float64
def dcp_save(case: dict, path: str) -> dict:
    """Train 2 steps at this world size; check torch's full model / optimizer state dicts against one process,
    round-trip them into a freshly built model at the same world size (which then trains one more step equal to
    one process), and save the sharded state dicts with ``dcp.save`` to ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    par, run, opt = model_and_optim(case, 0)
    train_steps(par, run, opt, [0, 1], case)
    ref, opt_ref = reference(case, [0, 1])
    opts = StateDictOptions(full_state_dict=True)
    msd, osd = get_model_state_dict(par, options=opts), get_optimizer_state_dict(par, opt, options=opts)
    out = {"full_model": _rel_dicts(msd, ref.state_dict()), "full_optim": _optim_errors(osd, ref, opt_ref)}
    # the same world size: full dicts into a model built from other weights
    par2, run2, opt2 = model_and_optim(case, 7)
    set_model_state_dict(par2, msd, options=opts)
    # a copy: torch's Optimizer.load_state_dict keeps the dict's 0-d "step" tensors, which would then be shared
    # with (and stepped by) the optimizer they came from
    set_optimizer_state_dict(par2, opt2, copy.deepcopy(osd), options=opts)
    train_steps(par2, run2, opt2, [2], case)
    ref, opt_ref = reference(case, [0, 1, 2])
    out["roundtrip_model"] = _rel_dicts(get_model_state_dict(par2, options=opts), ref.state_dict())
    out["roundtrip_optim"] = _optim_errors(get_optimizer_state_dict(par2, opt2, options=opts), ref, opt_ref)
    # sharded: every rank writes its own shards
    dcp.save({"model": get_model_state_dict(par), "optim": get_optimizer_state_dict(par, opt)}, checkpoint_id=path)
    return out


@_float64
def dcp_load(case: dict, path: str) -> dict:
    """Load ``dcp_save``'s checkpoint (2 steps, saved at another world size) into a model built from other weights
    at this world size (or, without a process group, the plain model); train one more step; compare with one
    process after 3 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if dist.is_initialized():
        par, run, opt = model_and_optim(case, 7)
    else:
        torch.manual_seed(7)
        par = run = testing.toy_model({**case, "routing": "router", "capacity_factor": None})
        opt = torch.optim.AdamW(par.parameters(), lr=0.01, weight_decay=0.01)
    sd = {"model": get_model_state_dict(par), "optim": get_optimizer_state_dict(par, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(par, sd["model"])
    set_optimizer_state_dict(par, opt, sd["optim"])
    ref, opt_ref = reference(case, [0, 1])
    opts = StateDictOptions(full_state_dict=True)
    out = {"loaded_model": _rel_dicts(get_model_state_dict(par, options=opts), ref.state_dict()),
           "loaded_optim": _optim_errors(get_optimizer_state_dict(par, opt, options=opts), ref, opt_ref)}
    train_steps(par, run, opt, [2], case)
    ref, opt_ref = reference(case, [0, 1, 2])
    out["continued_model"] = _rel_dicts(get_model_state_dict(par, options=opts), ref.state_dict())
    out["continued_optim"] = _optim_errors(get_optimizer_state_dict(par, opt, options=opts), ref, opt_ref)
    return out


def list_checkpoints(case: dict, path: str) -> dict:
    """An nn.ModuleList experts module under FSDP2: torch's DCP state-dict functions refuse it, naming the fix;
    moe_compile.sharded_state_dict with dcp.save / dcp.load and load_sharded_state_dict round-trip it into a model
    built from other weights; full_optim_state_dict / load_full_optim_state_dict the optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    par, run, opt = model_and_optim(case, 0)
    train_steps(par, run, opt, [0], case)
    out = {"model_refused": testing.catch(lambda: get_model_state_dict(par)),
           "optim_refused": testing.catch(lambda: get_optimizer_state_dict(par, opt))}
    dcp.save(api.sharded_state_dict(par), checkpoint_id=path)
    osd = api.full_optim_state_dict(par, opt)
    par2, run2, opt2 = model_and_optim(case, 7)
    sd = api.sharded_state_dict(par2)
    dcp.load(sd, checkpoint_id=path)
    api.load_sharded_state_dict(par2, sd)
    api.load_full_optim_state_dict(par2, opt2, osd)
    train_steps(par, run, opt, [1], case)
    train_steps(par2, run2, opt2, [1], case)
    want, got = api.full_state_dict(par), api.full_state_dict(par2)
    out["weights"] = max(testing.rel(got[n], v) for n, v in want.items())
    return out
