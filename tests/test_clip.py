"""Gradient clipping by the global norm on parallelized models (moe_compile.clip_grad_norm_).

torch.nn.utils.clip_grad_norm_ on a sharded model sees each rank's expert shards only: the ranks clip by
different norms and the dense weights drift apart. moe_compile.clip_grad_norm_ counts every gradient element of
the unparallelized model once over the ranks, so W ranks training with it equal one process training with torch's
clipping on the global batch. Functions prefixed ``_w_`` run inside the gloo workers.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import moe_compile
from moe_compile import parallel as mp_
import parallel_harness as testing

TOL = 1e-5
CLIP = 0.05  # far below the toy models' gradient norms (~0.3-2): every step is really clipped


@pytest.fixture
def pool2():
    return testing.shared_pool(2)


@pytest.fixture
def pool4():
    return testing.shared_pool(4)


def _check(results, max_norm=CLIP):
    """Every rank followed the single-process clipped run; every step was clipped; the ranks clipped alike."""
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["errors"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad} per step {r['per_step']}"
        assert set(r["errors"]) == {"loss", "dense_grad", "expert_grad", "weights", "optim_state", "clip_norm"}
        for s in r["per_step"]:
            assert s["norm_ref"] > 3 * max_norm, s  # the clip really scaled the gradients
    assert all([s["norm"] for s in r["per_step"]] == [s["norm"] for s in results[0]["per_step"]] for r in results)


# --------------------------------------------------------------------------------------------- the bug
def _w_norms(norm_type):
    """After one DDP backward on each rank's tokens: torch's norm of the local gradients, ours, the single-process
    norm on the global batch, and how far the ranks' dense weights are apart after one SGD step clipped by torch's
    function and by ours."""
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = testing.ToyMoE("stacked", E=4)
    x = torch.randn(4 * W, 16, generator=torch.Generator().manual_seed(3))
    ref(x).pow(2).mean().backward()
    out = {"ref": float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()], norm_type))}
    for how in ("torch", "moe"):
        torch.manual_seed(0)
        model = mp_.parallelize(testing.ToyMoE("stacked", E=4), mode="expert")
        ddp = DistributedDataParallel(model)
        ddp(x[4 * rank:4 * (rank + 1)]).pow(2).mean().backward()
        if how == "torch":
            out[how] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-2, norm_type))
        else:
            out[how] = float(moe_compile.clip_grad_norm_(ddp, 1e-2, norm_type))
        torch.optim.SGD(model.parameters(), lr=10.0).step()
        ws = [torch.empty_like(model.inp.weight) for _ in range(W)]
        dist.all_gather(ws, model.inp.weight.detach())
        out[how + "_drift"] = max(float((w - ws[0]).abs().max()) for w in ws)
    return out


def test_torch_clip_grad_norm_sees_only_local_shards(pool2):
    """The issue: torch's norm differs per rank and from the single-process norm, and the replicated dense weights
    drift apart; ours is the single-process norm on every rank and the dense weights stay equal. Training with
    torch's clipping on the local parameters then leaves the single-process run."""
    for norm_type in (2.0, 1.0):
        res = pool2.run(_w_norms, norm_type)
        ref = res[0]["ref"]
        assert all(abs(r["torch"] - ref) > 1e-2 * ref for r in res), res  # torch: the local shards' norm
        assert res[0]["torch"] != res[1]["torch"] and all(r["torch_drift"] > 1e-6 for r in res), res
        assert all(r["moe"] == res[0]["moe"] and r["moe_drift"] == 0.0 for r in res), res
        assert math.isclose(res[0]["moe"], ref, rel_tol=1e-6), res
    res = pool2.run(testing.ddp_compare, dict(kind="mixtral", E=4, tokens=4, modes=["expert"] * 3, clip=CLIP,
                                               clip_on="torch"))
    for r in res:  # the gradients after clipping are 0.17% off (the dense ones dominate this model's norm)
        assert min(r["errors"][k] for k in ("clip_norm", "dense_grad", "expert_grad")) > 100 * TOL, r["errors"]


# --------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("mode", ["expert", "data", "tensor", "auto"])
def test_clipped_training_w2(pool2, mode):
    """W = 2, 3 steps with clipping: 4 experts (whole experts per rank), or for tensor one expert split over the
    two ranks (hidden slices; the down-projection bias held whole by both, counted once)."""
    E, k, kind = (1, 1, "stacked_bias") if mode == "tensor" else (4, 2, "mixtral")
    optim = "adamw" if mode in ("data", "tensor") else "sgd"
    clip_on = {"expert": "run", "data": "params", "tensor": "ddp", "auto": "run"}[mode]
    _check(pool2.run(testing.ddp_compare, dict(kind=kind, E=E, k=k, tokens=4, modes=[mode] * 3, optim=optim,
                                               clip=CLIP, clip_on=clip_on)))


@pytest.mark.parametrize("mode", ["expert", "data", "tensor", "auto"])
def test_clipped_training_w4(pool4, mode):
    """W = 4, 2 experts: each split over 2 ranks (E < W), the down-projection bias replicated on both shards."""
    optim = "sgd" if mode in ("expert", "auto") else "adamw"
    _check(pool4.run(testing.ddp_compare, dict(kind="stacked_bias", E=2, tokens=3, modes=[mode] * 3, optim=optim,
                                               clip=CLIP, clip_on="params" if mode == "auto" else "ddp")))


def test_clipped_training_w4_whole_experts_list(pool4):
    """W = 4, an nn.ModuleList of 4 experts with biases (one whole expert per rank), modes switched per step."""
    _check(pool4.run(testing.ddp_compare, dict(kind="list", E=4, tokens=3, modes=["expert", "data", "auto"],
                                               optim="adamw", clip=CLIP)))


def test_clipped_training_mesh(pool4):
    """A 2 x 2 data x expert mesh: replicas hold equal expert gradients, counted once; whole experts (DeviceMesh)
    and one expert in hidden slices (two process groups, the bias replicated over shards and replicas)."""
    _check(pool4.run(testing.ddp_compare, dict(kind="mixtral", E=4, tokens=3, ep=2, optim="adamw", clip=CLIP,
                                               modes=["expert", "data", "auto"])))
    _check(pool4.run(testing.ddp_compare, dict(kind="stacked_bias", E=1, k=1, tokens=3, ep=2, optim="sgd",
                                               mesh="groups", clip=CLIP, clip_on="params",
                                               modes=["tensor", "expert", "data"])))


def _w_expert_norms(norm_type):
    """The norm of the expert parameters only (whole kinds of parameters: a valid subset), after one DDP backward
    of 2 experts split over 4 ranks: (torch's norm of the local shards, ours, the single-process one)."""
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = testing.ToyMoE("stacked_bias", E=2)
    ddp = DistributedDataParallel(mp_.parallelize(copy.deepcopy(ref), mode="tensor"))
    x = torch.randn(3 * W, 16, generator=torch.Generator().manual_seed(5))
    ddp(x[3 * rank:3 * (rank + 1)]).pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    mine = [p for p in ddp.parameters() if mp_.is_expert_param(p)]
    want = [p.grad for n, p in ref.named_parameters() if ".experts." in n]
    return (float(torch.nn.utils.get_total_norm([p.grad for p in mine], norm_type)),
            float(moe_compile.grad_norm(mine, norm_type)), float(torch.nn.utils.get_total_norm(want, norm_type)))


def test_inf_norm(pool4):
    """norm_type=inf is the largest gradient element over every rank's shards. On the experts alone the largest
    element lies on some ranks only (torch's local max is smaller elsewhere); with the dense weights (the toy
    models' largest gradients are in the input layer) clipped training equals the single process too."""
    for norm_type in (math.inf, 2.0):
        res = pool4.run(_w_expert_norms, norm_type)
        ref = res[0][2]
        assert all(r[1] == res[0][1] for r in res) and math.isclose(res[0][1], ref, rel_tol=1e-6), res
        assert any(r[0] < ref * (1 - 1e-3) for r in res), res
    _check(pool4.run(testing.ddp_compare, dict(kind="stacked_bias", E=2, tokens=3, modes=["tensor", "data", "expert"],
                                               optim="sgd", clip=0.01, norm_type=math.inf)), max_norm=0.01)


def test_clipped_training_compiled(pool2):
    """torch.compile(DDP(model), backend="moe") given to clip_grad_norm_ (the wrappers looked through)."""
    _check(pool2.run(testing.ddp_compare, dict(kind="stacked", E=4, tokens=3, compile="aot_eager", optim="adamw",
                                               modes=["expert", "data", "auto"], clip=CLIP)))


# --------------------------------------------------------------------------------------------- errors
def _w_mistakes():
    torch.manual_seed(0)
    model = mp_.parallelize(testing.ToyMoE("list", E=4, layers=1), mode="expert")  # 2 whole experts per rank
    ddp = DistributedDataParallel(model)
    ddp(torch.randn(4, 16)).pow(2).mean().backward()
    before = [p.grad.clone() for p in model.parameters()]
    out = {}
    for name, params in {
        "part": list(model.blocks[0].experts.experts[0].parameters()),  # one of this rank's two experts
        "differ": list(model.parameters())[dist.get_rank():],  # rank 1 leaves out a dense parameter
        "zero_norm": list(model.parameters()),
    }.items():
        try:
            moe_compile.clip_grad_norm_(params, 1e-3, 0.0 if name == "zero_norm" else 2.0)
            out[name] = None
        except mp_.ParallelError as e:
            out[name] = str(e)
    out["unchanged"] = all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    return out


def test_mistakes_are_errors_on_every_rank(pool2):
    res = pool2.run(_w_mistakes)
    assert "hold 1 of the 2 local parameters" in res[0]["part"] and "pass all of them" in res[0]["part"], res
    for r in res:
        assert "Every rank must pass the same parameters" in r["part"]
        assert "different parameters" in r["differ"], r
        assert "norm_type 0.0 is not supported" in r["zero_norm"], r
        assert r["unchanged"]


def _w_copies():
    """Parameters, not the model: the tags that tell clip_grad_norm_ a shard's module and kind survive deepcopy and
    load_state_dict(assign=True); the norm is the one computed from the model's modules."""
    torch.manual_seed(0)
    model = mp_.parallelize(testing.ToyMoE("stacked_bias", E=1, k=1), mode="tensor")  # hidden slices, b_down whole
    copied = copy.deepcopy(model)
    assigned = copy.deepcopy(model)
    assigned.load_state_dict({n: t.clone() for n, t in model.state_dict().items()}, assign=True)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    out = []
    for m in (model, copied, assigned):
        DistributedDataParallel(m)(x).pow(2).mean().backward()
        out.append((float(moe_compile.grad_norm(m)), float(moe_compile.grad_norm(iter(m.parameters())))))
    return out


def test_parameters_of_copies_keep_their_tags(pool2):
    res = pool2.run(_w_copies)
    assert all(r == res[0] for r in res)
    assert all(by_model == by_params == res[0][0][0] for by_model, by_params in res[0]), res


def test_unsharded_model_is_torch_clip():
    """No process group: the model is only tagged, and the norm and clipped gradients are torch's."""
    torch.manual_seed(0)
    a = mp_.parallelize(testing.ToyMoE("stacked_bias", E=2), mode="expert")
    b = copy.deepcopy(a)
    x = torch.randn(6, 16)
    for m in (a, b):
        m(x).pow(2).sum().backward()
    want = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.1)
    got = moe_compile.clip_grad_norm_(b, 0.1)
    assert torch.equal(got, want) and float(want) > 0.1
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
