"""FSDP2 for the dense weights, parallelize for the experts (issue 13): parallelize -> fully_shard (blocks, model,
ignored_params=moe_compile.fsdp_ignored_params) -> torch.compile.

Every check is against one process on the global batch: the loss, every dense gradient (FSDP2's DTensor shards
gathered), every expert gradient (this rank's shard of the single-process one), the weights and AdamW's state
after each of 3 steps. Functions prefixed ``_w_`` run inside the gloo workers (``parallel_harness``)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import moe_compile
from moe_compile import parallel as mp_
import fsdp_harness as fh
import parallel_harness as testing

TOL = 1e-5
F64 = 1e-12


def _check(results, clip=False):
    want = {"loss", "dense_grad", "expert_grad", "weights", "optim_state"} | ({"clip_norm"} if clip else set())
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["errors"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad} per step {r['per_step']}"
        assert set(r["errors"]) == want, r["errors"]


# --------------------------------------------------------------------------------------------- training
def test_fsdp_w2_modes_and_compile(pool2):
    """W = 2, 4 experts (2 whole experts per rank): modes switched per step, eager and compiled (the whole FSDP2
    model under torch.compile(backend="moe"), aot_eager: Dynamo breaks the graph at FSDP2's hooks)."""
    _check(pool2.run(fh.fsdp_compare, dict(kind="mixtral", E=4, tokens=4, modes=["expert", "data", "auto"])))
    res = pool2.run(fh.fsdp_compare, dict(kind="stacked", E=4, tokens=4, modes=["expert", "data", "auto"],
                                           compile="aot_eager"))
    _check(res)
    assert all(r["graphs"] >= 1 for r in res), [r["graphs"] for r in res]


def test_fsdp_divide_factor_and_accumulation(pool2):
    """set_gradient_divide_factor(3) on every FSDP2 module: dense gradients are the sum over ranks / 3, and so
    are the experts'. Gradient accumulation with set_requires_gradient_sync(False) on all but the last
    micro-batch; hidden slices (E = 1 < W) with the down bias replicated on both shards."""
    _check(pool2.run(fh.fsdp_compare, dict(kind="stacked", E=4, tokens=4, modes=["data", "expert", "auto"],
                                           divide_factor=3.0)))
    _check(pool2.run(fh.fsdp_compare, dict(kind="stacked_bias", E=1, k=1, tokens=3, micro=2,
                                           modes=["expert", "tensor", "data"])))


def test_fsdp_w4_mesh(pool4):
    """W = 4 on a 2 x 2 (dp x ep) mesh: experts sharded over ep, replicated over dp; the dense weights sharded by
    FSDP2 over all 4 ranks (its default mesh) or, HSDP, over ep and replicated over dp (the same 2D mesh, compiled);
    and a 1D group of 4 with 2 experts in hidden slices (E < W)."""
    _check(pool4.run(fh.fsdp_compare, dict(kind="mixtral", E=4, tokens=3, ep=2, modes=["expert", "data", "auto"])))
    _check(pool4.run(fh.fsdp_compare, dict(kind="mixtral", E=4, tokens=3, ep=2, modes=["expert", "data", "auto"],
                                           fsdp_mesh="2d", compile="aot_eager")))
    _check(pool4.run(fh.fsdp_compare, dict(kind="stacked_bias", E=2, tokens=3, modes=["tensor", "expert", "data"])))


def test_fsdp_list_and_inline_experts(pool2):
    """An nn.ModuleList experts module (float64: fp32 rounding of AdamW's first steps on its small bias gradients
    reaches ~1e-5 on its own) and blocks that dispatch inline, compiled (the placeholders of the other rank's
    experts are in fsdp_ignored_params too)."""
    _check(pool2.run(fh.fsdp_compare, dict(kind="list", E=4, tokens=4, modes=["expert", "data", "auto"],
                                           float64=True)))
    _check(pool2.run(fh.fsdp_compare, dict(kind="inline", E=4, tokens=4, modes=["expert", "data", "auto"],
                                           compile="aot_eager")))


@pytest.mark.slow
def test_fsdp_inductor(pool2):
    _check(pool2.run(fh.fsdp_compare, dict(kind="stacked", E=4, tokens=3, modes=["expert", "data", "expert"],
                                           compile="inductor")))


# --------------------------------------------------------------------------------------------- clipping
def test_fsdp_clip(pool2, pool4):
    """moe_compile.clip_grad_norm_ on the compiled FSDP2 model: FSDP2's DTensor gradient shards and the expert
    shards, each element counted once (HSDP's replicas too), equal to torch's clip on one process."""
    _check(pool2.run(fh.fsdp_compare, dict(kind="mixtral", E=4, tokens=4, modes=["expert", "data", "auto"],
                                           clip=0.05)), clip=True)
    _check(pool4.run(fh.fsdp_compare, dict(kind="stacked_bias", E=1, k=1, tokens=3, ep=2, fsdp_mesh="2d",
                                           clip=0.05, modes=["tensor", "expert", "data"])), clip=True)


# --------------------------------------------------------------------------------------------- DCP
def _dcp_ok(results):
    for r in results:
        assert max(r.values()) <= F64, r
    return results


@pytest.mark.parametrize("kind,E", [("mixtral", 4), ("stacked_bias", 2)])
def test_dcp_state_dict_across_world_sizes(pool2, pool4, tmp_path, kind, E):
    """torch.distributed.checkpoint.state_dict: at W = 2 the full model and optimizer state dicts equal the
    single-process ones after 2 AdamW steps and load into a model built from other weights (which then steps like
    one process); the sharded ones, saved with dcp.save, load at W = 4 (for E = 2: hidden slices) and into the
    plain model in this process. float64, so any resharding error shows."""
    case = dict(kind=kind, E=E, modes=["expert"], float64=True)
    _dcp_ok(pool2.run(fh.dcp_save, case, str(tmp_path)))
    _dcp_ok(pool4.run(fh.dcp_load, case, str(tmp_path)))
    _dcp_ok([fh.dcp_load(case, str(tmp_path))])


def test_dcp_state_dict_mesh_to_w2(pool2, pool4, tmp_path):
    """Saved on a 2 x 2 mesh (HSDP for the dense weights, replicas writing the same expert chunks), loaded at
    W = 2 (1D)."""
    case = dict(kind="stacked", E=4, modes=["expert"], float64=True)
    _dcp_ok(pool4.run(fh.dcp_save, dict(case, ep=2, fsdp_mesh="2d"), str(tmp_path)))
    _dcp_ok(pool2.run(fh.dcp_load, case, str(tmp_path)))


def test_list_experts_checkpoint_through_moe_compile(pool2, tmp_path):
    for r in pool2.run(fh.list_checkpoints, dict(kind="list", E=4, modes=["expert"], float64=True), str(tmp_path)):
        for key in ("model_refused", "optim_refused"):
            assert "cannot reshard" in r[key] and "moe_compile.sharded_state_dict(model)" in r[key], r
        assert r["weights"] <= F64, r


# --------------------------------------------------------------------------------------------- errors
def _w_mistakes():
    from torch.distributed.fsdp import fully_shard

    out = {}
    torch.manual_seed(0)
    early = testing.ToyMoE("stacked", E=4)
    fully_shard(early)
    out["before"] = testing.catch(lambda: mp_.parallelize(early, mode="expert"))
    out["untagged"] = testing.catch(lambda: moe_compile.fsdp_ignored_params(testing.ToyMoE("stacked", E=4)))
    torch.manual_seed(0)
    model = mp_.parallelize(testing.ToyMoE("stacked", E=4), mode="expert")
    shapes = [tuple(p.shape) for p in moe_compile.fsdp_ignored_params(model)]
    out["ignored"] = sorted(shapes)
    out["copy"] = testing.catch(lambda: moe_compile.fsdp_ignored_params(copy.deepcopy(model)))
    for b in model.blocks:
        fully_shard(b)  # no ignored_params: FSDP2 takes the expert shards too
    fully_shard(model)
    out["sharded_experts"] = testing.catch(lambda: model(torch.randn(4, 16)))
    return out


def test_mistakes_are_errors(pool2):
    for r in pool2.run(_w_mistakes):
        assert "fully_shard was already applied" in r["before"] and "parallelize(model) first" in r["before"], r
        assert "no expert parameters tagged" in r["untagged"], r
        assert "is a copy (copy.deepcopy) of a parallelized model" in r["copy"], r
        assert r["ignored"] == [(2, 16, 8), (2, 16, 8), (2, 16, 16), (2, 16, 16)], r  # 2 of 4 experts, 2 blocks
        assert "fully_shard manages the sharded expert parameter" in r["sharded_experts"], r
        assert "ignored_params=moe_compile.fsdp_ignored_params(model)" in r["sharded_experts"], r


def _w_ddp_unchanged():
    """Without FSDP2, model.state_dict() keeps this rank's shards (the DDP behaviour documented before)."""
    torch.manual_seed(0)
    model = mp_.parallelize(testing.ToyMoE("stacked", E=4), mode="expert")
    return {n: (type(v).__name__, tuple(v.shape)) for n, v in model.state_dict().items() if "experts" in n}


def test_state_dict_without_fsdp_is_local(pool2):
    for r in pool2.run(_w_ddp_unchanged):
        assert r["blocks.0.experts.gate_up"] == ("Tensor", (2, 16, 16)), r
    assert dist.is_available()
