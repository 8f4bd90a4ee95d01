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


def fsdp_compare(case: dict) -> dict:
    """Run on every rank. ``case``: kind, E, H, F, k, layers, tokens (per rank), modes (one per step), seed, ep
    (experts group size; < W: a (W/ep) x ep mesh), fsdp_mesh ("world": fully_shard's default 1D mesh; "2d": the
    same dp x ep mesh, HSDP), per_block (fully_shard each block, then the model; else the model only), compile
    (None, "aot_eager", "inductor"), optim ("adamw" / "sgd"), lr, divide_factor (set_gradient_divide_factor on
    every FSDP module; the loss is then the per-rank mean times W / factor on the reference too), clip (max norm:
    moe_compile.clip_grad_norm_ on the model vs torch's on the reference), micro (micro-batches; all but the last
    with set_requires_gradient_sync(False)).
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
