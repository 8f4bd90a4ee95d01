"""DDP with parallel experts (issue 5): parallelize -> DistributedDataParallel -> torch.compile.

One step on W ranks (loss averaged over each rank's tokens) equals the single-process step on the global batch
(loss averaged over all tokens): DDP averages the dense gradients, the experts op averages the expert ones.
Functions prefixed ``_w_`` run inside the gloo workers (shared with test_parallel.py).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moe_compile import parallel as mp_
import parallel_harness as testing

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(results):
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["errors"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad} per step {r['per_step']}"
        assert set(r["errors"]) == {"loss", "dense_grad", "expert_grad", "weights", "optim_state"}
    return max(max(r["errors"].values()) for r in results)


def test_ddp_step_equals_single_process_global_batch(pool2, pool4):
    _check(pool2.run(testing.ddp_compare, dict(kind="mixtral", E=4, tokens=6, modes=["expert", "data", "auto"])))
    # 4 steps of SGD with momentum at lr 0.05: fp32 rounding compounds over this trajectory (to ~6e-5 in the
    # expert gradients by step 4), so in fp32 each step starts again from the reference's weights (resync) ...
    case = dict(kind="stacked_bias", E=2, tokens=3, modes=["tensor", "expert", "data", "auto"])
    _check(pool4.run(testing.ddp_compare, dict(case, resync=True)))
    # ... and the whole trajectory, not resynced, is exact in float64
    for r in pool4.run(testing.ddp_compare, dict(case, float64=True)):
        assert max(r["errors"].values()) <= 1e-12, r["errors"]


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_three_steps_per_mode_equal_single_process(pool2, pool4, optim):
    """3 steps of SGD (momentum 0.9) or AdamW in each mode, no resync: the weights, gradients and the optimizer
    state (gathered by name) follow the single-process run on the global batch at every step."""
    for pool, kind, E in ((pool2, "mixtral", 4), (pool4, "stacked_bias", 2)):
        modes = ["expert", "data", "auto"] + (["tensor"] if E < pool.world_size else [])
        for mode in modes:
            res = pool.run(testing.ddp_compare, dict(kind=kind, E=E, tokens=4, modes=[mode] * 3, optim=optim))
            _check(res)
            # each rank's optimizer holds state for its own shards only
            for r in res:
                assert r["local_state_shapes_ok"]
                assert r["expert_state_numel"] * pool.world_size >= r["ref_expert_state_numel"]
                assert r["expert_state_numel"] < r["ref_expert_state_numel"]


def test_ddp_compiled_switching_modes(pool2):
    res = pool2.run(testing.ddp_compare, dict(kind="stacked", E=4, tokens=5, compile="aot_eager",
                                               modes=["expert", "data", "auto", "expert"]))
    _check(res)
    assert all(r["graphs"] == 1 for r in res), [r["graphs"] for r in res]


@pytest.mark.parametrize("optimize_ddp", [True, False])
def test_compiled_ddp_with_and_without_ddp_optimizer(pool2, optimize_ddp):
    """torch.compile(DDP(model)) with torch._dynamo.config.optimize_ddp on and off. Buckets of 300 bytes make
    DDPOptimizer split the graph (2 graphs reach aot_autograd); the experts op is one node, never cut."""
    res = pool2.run(testing.ddp_compare, dict(kind="stacked", E=4, tokens=3, compile="aot_eager", optim="adamw",
                                               optimize_ddp=optimize_ddp, bucket_cap_mb=0.0003,
                                               modes=["expert", "data", "auto"]))
    _check(res)
    assert [(r["graphs"], r["aot_graphs"]) for r in res] == [(1, 2 if optimize_ddp else 1)] * 2


@pytest.mark.slow
def test_compiled_ddp_inductor(pool2):
    res = pool2.run(testing.ddp_compare, dict(kind="stacked", E=4, tokens=3, compile="inductor", optim="adamw",
                                               optimize_ddp=True, bucket_cap_mb=0.0003, micro=2,
                                               modes=["expert", "data", "expert"]))
    _check(res)
    assert [(r["graphs"], r["aot_graphs"]) for r in res] == [(1, 2)] * 2


# --------------------------------------------------------------------------------------------- accumulation, 2D mesh
def test_no_sync_gradient_accumulation(pool2, pool4):
    """2 (or 3) micro-batches per rank, all but the last under ddp.no_sync(), each loss divided by their number:
    the step equals one process on all micro-batches of all ranks. The experts' gradients are complete after every
    backward (their exchanges are inside the op), so accumulating them neither skips nor double-counts any."""
    _check(pool2.run(testing.ddp_compare, dict(kind="stacked", E=4, tokens=3, micro=2, optim="sgd",
                                               modes=["expert", "data", "auto"])))
    _check(pool2.run(testing.ddp_compare, dict(kind="mixtral", E=4, tokens=2, micro=3, optim="adamw",
                                               compile="aot_eager", modes=["data", "expert", "auto"])))
    _check(pool4.run(testing.ddp_compare, dict(kind="stacked_bias", E=2, tokens=2, micro=2, optim="adamw",
                                               modes=["tensor", "expert", "data"])))


def test_data_x_expert_mesh(pool4):
    """A 2 x 2 mesh: experts sharded over {0,1} and {2,3}, replicated over {0,2} and {1,3}; DDP all-reduces the
    dense weights over all 4. Given as a DeviceMesh or as two process groups; with and without no_sync; E >= EP
    (whole experts) and E < EP (hidden slices); full_state_dict gathers the whole model on every rank (checked at
    every step against the single-process weights)."""
    _check(pool4.run(testing.ddp_compare, dict(kind="mixtral", E=4, tokens=3, ep=2, optim="adamw",
                                               modes=["expert", "data", "auto"])))
    _check(pool4.run(testing.ddp_compare, dict(kind="list", E=2, tokens=2, ep=2, micro=2, optim="sgd",
                                               mesh="groups", modes=["expert", "data", "auto"])))
    _check(pool4.run(testing.ddp_compare, dict(kind="stacked_bias", E=1, k=1, tokens=3, ep=2, micro=2,
                                               optim="sgd", modes=["tensor", "expert", "data"])))
    for err, reported in pool4.run(_w_mesh_without_ddp):
        assert err <= TOL and reported


def _w_mesh_without_ddp():
    """Outside DDP the expert gradient is the SUM over all ranks of the mesh (the gradient of the sum of the ranks'
    losses), as on a 1D group."""
    rank, W = dist.get_rank(), dist.get_world_size()
    _, _, mesh = testing.mesh_groups(2)
    torch.manual_seed(0)
    ref = testing.ToyMoE("stacked", E=4, layers=1)
    model = mp_.parallelize(copy.deepcopy(ref), mode="data", mesh=mesh)
    x = torch.randn(4 * W, 16, generator=torch.Generator().manual_seed(9))
    model(x[4 * rank:4 * (rank + 1)]).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    m = model.blocks[0].experts
    want = mp_.checkpoint.local_from_full(m, {"gate_up": ref.blocks[0].experts.gate_up.grad,
                                       "down": ref.blocks[0].experts.down.grad})
    return (max(testing.rel(m.get_parameter(n).grad, v) for n, v in want.items()),
            "2 of 4 experts per rank, 2 replicas" in str(mp_.parallel_report(model)))


def _w_mesh_mistakes():
    ep_group, dp_group, _ = testing.mesh_groups(2, "groups")
    torch.manual_seed(0)
    # the experts group without its replica group, under a DDP over all 4 ranks: the first forward says so
    model = mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), mode="expert", group=ep_group)
    no_dp = _catch(lambda: DistributedDataParallel(model)(torch.randn(3, 16)))
    # a "replica group" that is the experts group itself: raised on every rank, nothing changed
    fresh = testing.ToyMoE("stacked", E=4, layers=1)
    overlap = _catch(lambda: mp_.parallelize(fresh, group=ep_group, dp_group=ep_group))
    return no_dp, overlap, mp_.is_expert_param(fresh.blocks[0].experts.gate_up)


def test_data_x_expert_mesh_mistakes_are_errors(pool4):
    for no_dp, overlap, tagged in pool4.run(_w_mesh_mistakes):
        assert "DistributedDataParallel averages over 4 ranks" in no_dp and "dp_group" in no_dp, no_dp
        assert "must hold the same expert shard" in overlap and "overlap" in overlap, overlap
        assert not tagged


_catch = testing.catch


def _w_wrong_order():
    torch.manual_seed(0)
    model = testing.ToyMoE("stacked", E=4, layers=1)
    ddp = DistributedDataParallel(model)
    early = _catch(lambda: mp_.parallelize(ddp))
    mp_.parallelize(model, mode="expert")  # too late for the DDP built above
    late = _catch(lambda: ddp(torch.randn(3, 16)))
    return early, late


def test_ddp_built_before_parallelize_is_an_error_naming_the_fix(pool2):
    for early, late in pool2.run(_w_wrong_order):
        assert "Fix: call moe_compile.parallelize(model) before DistributedDataParallel(model)" in early
        assert "DistributedDataParallel was built before moe_compile.parallelize" in late
        assert "Fix: call moe_compile.parallelize(model) first" in late


def _w_save(rank0_only):
    torch.manual_seed(0)
    model = mp_.parallelize(testing.ToyMoE("gpt_oss", E=4, layers=2), mode="expert")
    ddp = DistributedDataParallel(model)  # keeps the dense weights equal on every rank
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    (ddp(x) ** 2).mean().backward()
    opt.step()
    return mp_.full_state_dict(model, rank0_only=rank0_only)


def _w_load(sd, x):
    torch.manual_seed(123)  # other weights: everything must come from the state dict
    model = mp_.parallelize(testing.ToyMoE("gpt_oss", E=4, layers=2), mode="data")
    mp_.load_full_state_dict(model, sd)
    with torch.no_grad():
        return model(x[dist.get_rank()::dist.get_world_size()])


def test_full_state_dict_moves_between_world_sizes(pool2, pool4):
    """Saved at W=4 (one expert per rank), loaded at W=2 and W=1: the same outputs."""
    sds = pool4.run(_w_save, False)
    assert all(set(s) == set(sds[0]) and all(torch.equal(s[n], sds[0][n]) for n in s) for s in sds)
    single = testing.ToyMoE("gpt_oss", E=4, layers=2)
    want_shapes = {n: t.shape for n, t in single.state_dict().items()}
    assert {n: t.shape for n, t in sds[0].items()} == want_shapes  # the unparallelized model's names and shapes
    only0 = pool4.run(_w_save, True)  # gathered to rank 0 only: the same dict there, nothing elsewhere
    assert only0[1:] == [{}] * 3
    assert set(only0[0]) == set(sds[0]) and all(torch.equal(only0[0][n], sds[0][n]) for n in sds[0])
    single.load_state_dict(sds[0])
    x = torch.randn(12, 16)
    with torch.no_grad():
        want = single(x)
    outs = pool2.run(_w_load, sds[0], x)
    for r, out in enumerate(outs):
        assert testing.rel(out, want[r::2]) <= TOL


@pytest.mark.slow
def test_example_train_ddp_runs_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "train_ddp.py"), "--steps", "4", "--compiler", "aot_eager"]
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # this checkout, installed or not
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3" in proc.stdout and "equal to one process" in proc.stdout, proc.stdout[-3000:]


# --------------------------------------------------------------------------------------------- DCP checkpoints
def _w_dcp_save(kind, E, path, full_path, ep=None):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    mesh = testing.mesh_groups(ep)[2] if ep else None
    model = mp_.parallelize(testing.ToyMoE(kind, E=E, layers=2), mode="expert", mesh=mesh)
    DistributedDataParallel(model)(torch.randn(4, 16)).pow(2).mean().backward()  # gradients, weights untouched
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)  # a step: the saved weights are not the seed's
    dcp.save(mp_.sharded_state_dict(model), checkpoint_id=path)  # each rank writes its own shards
    full = mp_.full_state_dict(model)
    dcp.save(full, checkpoint_id=full_path)  # the whole model on every rank: DCP writes each tensor once
    with torch.no_grad():
        out = model(_X[dist.get_rank()::dist.get_world_size()])
    return full, out


def _w_dcp_load(kind, E, path, full_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(123)  # other weights: everything must come from the checkpoint
    model = mp_.parallelize(testing.ToyMoE(kind, E=E, layers=2), mode="expert")
    sd = mp_.sharded_state_dict(model)  # the template: this model's own shards
    dcp.load(sd, checkpoint_id=path)
    mp_.load_sharded_state_dict(model, sd)
    with torch.no_grad():
        out = model(_X[dist.get_rank()::dist.get_world_size()])
    got = mp_.full_state_dict(model)
    # the whole-model checkpoint: loaded into a whole-model template, then each rank keeps its part
    torch.manual_seed(321)
    other = mp_.parallelize(testing.ToyMoE(kind, E=E, layers=2), mode="expert")
    template = testing.ToyMoE(kind, E=E, layers=2).state_dict()
    dcp.load(template, checkpoint_id=full_path)
    mp_.load_full_state_dict(other, template)
    via_full = mp_.full_state_dict(other)
    return got, out, via_full


_X = torch.randn(12, 16, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind,E", [("stacked", 4), ("list", 4), ("gpt_oss", 2)])
def test_dcp_round_trip(pool2, pool4, tmp_path, kind, E):
    """torch.distributed.checkpoint: sharded_state_dict saved at W=2 loads back at W=2 with bitwise identical
    weights and outputs, and at W=4 (a resharded load: DTensor Shard(0) for stacked experts, per-expert names for
    a ModuleList, whole weights for E < W); a full_state_dict saved with DCP loads at W=4 too."""
    path, full_path = str(tmp_path / "sharded"), str(tmp_path / "full")
    saved = pool2.run(_w_dcp_save, kind, E, path, full_path)
    want = saved[0][0]
    same_w = pool2.run(_w_dcp_load, kind, E, path, full_path)
    for (got, out, via_full), (_, out_saved) in zip(same_w, saved):
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
        assert torch.equal(out, out_saved)
        assert all(torch.equal(via_full[n], want[n]) for n in want)
    single = testing.ToyMoE(kind, E=E, layers=2)
    single.load_state_dict(want)
    with torch.no_grad():
        ref = single(_X)
    for r, (got, out, via_full) in enumerate(pool4.run(_w_dcp_load, kind, E, path, full_path)):
        assert all(torch.equal(got[n], want[n]) for n in want)
        assert all(torch.equal(via_full[n], want[n]) for n in want)
        assert testing.rel(out, ref[r::4]) <= TOL


@pytest.mark.parametrize("kind,E", [("stacked", 4), ("list", 2)])
def test_dcp_from_data_x_expert_mesh(pool2, pool4, tmp_path, kind, E):
    """Saved on a 2 x 2 mesh (replicas write the same chunks; DCP keeps one), loaded at W=2 (1D)."""
    path, full_path = str(tmp_path / "sharded"), str(tmp_path / "full")
    saved = pool4.run(_w_dcp_save, kind, E, path, full_path, 2)
    want = saved[0][0]
    assert all(torch.equal(s[0][n], want[n]) for s in saved for n in want)
    for got, _, via_full in pool2.run(_w_dcp_load, kind, E, path, full_path):
        assert all(torch.equal(got[n], want[n]) and torch.equal(via_full[n], want[n]) for n in want)


def _w_dcp_naive(path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), mode="expert")
    dcp.save(model.state_dict(), checkpoint_id=path)
    sd = mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), mode="expert").state_dict()
    dcp.load(sd, checkpoint_id=path)
    return torch.equal(sd["blocks.0.experts.gate_up"], model.blocks[0].experts.gate_up)


def test_dcp_of_plain_state_dict_loses_shards(pool2, tmp_path):
    """Why sharded_state_dict exists: model.state_dict() holds each rank's shard under the same name and shape,
    DCP takes such tensors for replicas and writes one of them, so some rank loads another's experts."""
    assert not all(pool2.run(_w_dcp_naive, str(tmp_path / "naive")))


# --------------------------------------------------------------------------------------------- optimizer state
def _batches(step, n):
    g = torch.Generator().manual_seed(77 + step)
    return torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)


def _w_train(sd, osd, steps, modes):
    """AdamW steps on a 8-token global batch split over the ranks; resumes from full model + optimizer state."""
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = mp_.parallelize(testing.ToyMoE("list", E=2, layers=2), mode=modes[0])
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    if sd is not None:
        mp_.load_full_state_dict(model, sd)
        mp_.load_full_optim_state_dict(model, opt, osd)
    for step, mode in zip(steps, modes):
        mp_.set_parallel(model, mode)
        x, c = _batches(step, 8)
        sl = slice(rank * 8 // W, (rank + 1) * 8 // W)
        (0.5 * ((ddp(x[sl]) - c[sl]) ** 2).sum(-1).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    shapes_ok = all(tuple(v.shape) == tuple(p.shape) for p, st in opt.state.items() for v in st.values()
                    if v.dim() > 0)
    return mp_.full_state_dict(model), mp_.full_optim_state_dict(ddp, opt), shapes_ok


def _assert_same_training_state(got, want):
    (sd, osd), (rsd, rosd) = got, want
    assert set(sd) == set(rsd) and max(testing.rel(sd[n], rsd[n]) for n in rsd) <= TOL
    assert set(osd["state"]) == set(rosd["state"])
    for n, st in rosd["state"].items():
        assert set(osd["state"][n]) == set(st)
        for k, v in st.items():
            assert testing.rel(osd["state"][n][k], v) <= TOL, (n, k)


def test_full_optimizer_state_moves_between_world_sizes(pool2, pool4):
    """2 AdamW steps at W=4 (E=2: hidden slices), the whole model and optimizer state saved by name, loaded at
    W=2 (whole experts), 1 more step: equal to 3 single-process steps on the global batches, weights and
    exp_avg / exp_avg_sq / step alike."""
    torch.manual_seed(0)
    ref = testing.ToyMoE("list", E=2, layers=2)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.01)
    states = []
    for step in range(3):
        x, c = _batches(step, 8)
        (0.5 * ((ref(x) - c) ** 2).sum(-1).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        states.append(({n: v.clone() for n, v in ref.state_dict().items()}, copy.deepcopy(
            mp_.full_optim_state_dict(ref, opt))))
    at4 = pool4.run(_w_train, None, None, [0, 1], ["tensor", "auto"])
    assert all(ok for _, _, ok in at4)  # each rank's state is shaped like its shards
    sd, osd, _ = at4[0]
    _assert_same_training_state((sd, osd), states[1])
    at2 = pool2.run(_w_train, sd, osd, [2], ["expert"])
    for got_sd, got_osd, ok in at2:
        assert ok
        _assert_same_training_state((got_sd, got_osd), states[2])
    # the full optimizer state also loads into the unparallelized model's optimizer
    single = testing.ToyMoE("list", E=2, layers=2)
    single.load_state_dict(sd)
    sopt = torch.optim.AdamW(single.parameters(), lr=0.01, weight_decay=0.01)
    mp_.load_full_optim_state_dict(single, sopt, osd)
    x, c = _batches(2, 8)
    (0.5 * ((single(x) - c) ** 2).sum(-1).mean()).backward()
    sopt.step()
    _assert_same_training_state((single.state_dict(), mp_.full_optim_state_dict(single, sopt)), states[2])


# --------------------------------------------------------------------------------------------- expert tags
def _expert_names(model):
    return {n for n, p in model.named_parameters() if mp_.is_expert_param(p)}


def test_expert_tags_survive_copies_moves_and_loads():
    """In one process (parallelize only tags): deepcopy, .to(dtype) and back, .to(same device), state_dict
    round trips (in place and assign=True) and torch.save of the whole model keep is_expert_param."""
    import io

    torch.manual_seed(0)
    for kind in ("stacked", "list"):
        model = mp_.parallelize(testing.ToyMoE(kind, E=4, layers=2))
        names = _expert_names(model)
        assert names and all(".experts." in n for n in names)
        assert _expert_names(copy.deepcopy(model)) == names
        model.to(torch.float64)
        assert _expert_names(model) == names
        assert all(p.dtype == torch.float64 for p in model.parameters())
        model.to(torch.float32).to("cpu")
        assert _expert_names(model) == names
        sd = model.state_dict()
        other = mp_.parallelize(testing.ToyMoE(kind, E=4, layers=2))
        other.load_state_dict(sd)
        assert _expert_names(other) == names
        other.load_state_dict(sd, assign=True)  # new parameter objects: tagged again by a load hook
        assert _expert_names(other) == names
        assert all(torch.equal(p, sd[n]) for n, p in other.named_parameters())
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        assert _expert_names(torch.load(buf, weights_only=False)) == names


def _w_tags_sharded():
    torch.manual_seed(0)
    ref = testing.ToyMoE("mixtral", E=4, layers=2)
    model = mp_.parallelize(copy.deepcopy(ref), mode="expert")
    names, ignored = _expert_names(model), list(model._ddp_params_and_buffers_to_ignore)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    with torch.no_grad():
        out = model(x)
    facts = {}
    twin = copy.deepcopy(model)  # shares the process groups; its own parameters
    ddp = DistributedDataParallel(twin)  # ignores the twin's experts as well
    facts["deepcopy"] = (_expert_names(twin) == names and twin._ddp_params_and_buffers_to_ignore == ignored
                         and set(ddp.parameters_to_ignore) == set(ignored)
                         and not any(mp_.is_expert_param(p) for p in ddp._module_parameters)
                         and all(getattr(p, "_ddp_ignored", False) for p in twin.parameters()
                                 if mp_.is_expert_param(p)))
    with torch.no_grad():
        facts["deepcopy_out"] = torch.equal(ddp(x), out)
    model.to(torch.float64)
    with torch.no_grad():
        facts["float64"] = (_expert_names(model) == names,
                            testing.rel(model(x.double()), ref.double()(x.double())))
    model.to(torch.float32)
    sd = model.state_dict()
    again = mp_.parallelize(testing.ToyMoE("mixtral", E=4, layers=2), mode="data")
    again.load_state_dict(sd)
    with torch.no_grad():
        facts["state_dict"] = (_expert_names(again) == names and again._ddp_params_and_buffers_to_ignore == ignored,
                               testing.rel(again(x), out))
    return facts


def test_expert_tags_survive_on_sharded_models(pool2):
    for facts in pool2.run(_w_tags_sharded):
        assert facts["deepcopy"] and facts["deepcopy_out"]
        tags, err = facts["float64"]
        assert tags and err <= 1e-12  # the parallel op runs in float64 after .to(float64), exact
        tags, err = facts["state_dict"]
        assert tags and err <= TOL


# --------------------------------------------------------------------------------------------- HF aux loss
def _tiny_mixtral():
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                     router_aux_loss_coef=0.1)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg)


def _w_hf_aux(mode):
    rank, W = dist.get_rank(), dist.get_world_size()
    model = _tiny_mixtral()
    ref = copy.deepcopy(model)
    mp_.parallelize(model, mode=mode)
    ddp = DistributedDataParallel(model)
    ids = torch.randint(0, 64, (W, 2, 12), generator=torch.Generator().manual_seed(3))
    out = ddp(input_ids=ids[rank], labels=ids[rank])
    out.loss.backward()
    # single process: each rank's batch on its own (the aux loss is a per-batch statistic), losses averaged
    refs = [ref(input_ids=ids[r], labels=ids[r]) for r in range(W)]
    (sum(o.loss for o in refs) / W).backward()
    errs = {"aux": testing.rel(out.aux_loss, refs[rank].aux_loss), "loss": testing.rel(out.loss, refs[rank].loss)}
    grads = {n: p.grad for n, p in ref.named_parameters()}
    floor = 1e-2 * max(float(g.abs().max()) for g in grads.values())
    errs["dense_grad"] = max(testing.rel(p.grad, grads[n], floor) for n, p in model.named_parameters()
                             if not mp_.is_expert_param(p))
    expert = 0.0
    for path, m in mp_.tags.parallel_modules(model):
        full = {n: grads[f"{path}.{n}"] for s in m._moe_parallel.full_names.values() for n in s}
        for n, v in mp_.checkpoint.local_from_full(m, full).items():
            expert = max(expert, testing.rel(m.get_parameter(n).grad, v, floor))
    errs["expert_grad"] = expert
    # the aux term is in the loss and has a gradient (through the routers)
    errs["aux_nonzero"] = out.aux_loss.item() > 0
    rep = mp_.parallel_report(model)
    errs["ran"] = len(rep.blocks) == 2 and all(b.last == mode for b in rep.blocks)
    return errs


@pytest.mark.parametrize("mode", ["expert", "data"])
def test_hf_router_aux_loss_keeps_its_meaning(pool2, mode):
    """HF Mixtral with output_router_logits=True: the load-balancing loss each rank computes is the one the
    unparallelized model computes on that rank's tokens (the routers are not sharded), and the gradients of
    the loss (cross-entropy + coef * aux, averaged over ranks) equal the single-process ones."""
    for errs in pool2.run(_w_hf_aux, mode):
        assert errs.pop("aux_nonzero") and errs.pop("ran")
        assert max(errs.values()) <= TOL, errs
