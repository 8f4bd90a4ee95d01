"""``auto`` chooses the storage layout at parallelize time: replicated experts (plain DDP's step) or sharded.

The choice is made deterministic with explicit ``rates=`` (a link of 1 MB/s, no latency, free GEMMs: bytes
decide): a small experts module (E=4, H=16, F=8: 6 KB of weights) at 64 tokens per call all-reduces fewer bytes
replicated than the all-to-alls move sharded; a large one (F=256: 196 KB) at 16 tokens per call is sharded.
Functions prefixed ``_w_`` run inside the gloo workers (``parallel_harness.shared_pool``).
"""
from __future__ import annotations

import copy
import io
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moe_compile import parallel as mp_
from moe_compile.parallel import cost
from moe_compile.parallel.layout import Layout
import parallel_harness as testing

TOL = 1e-5
BYTES = cost.Rates(bandwidth=1e6, latency=0.0, inter_bandwidth=1e6, inter_latency=0.0, gemm_flops=1e15)
SMALL = dict(tokens_per_call=64, rates=BYTES)  # -> replicated
LARGE_F, LARGE = 256, dict(tokens_per_call=16, rates=BYTES)  # -> sharded


_catch = testing.catch


def _check(results):
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["errors"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad} per step {r['per_step']}"
        assert set(r["errors"]) == {"loss", "dense_grad", "expert_grad", "weights", "optim_state"}, r["errors"]


def _mixed(seed=0):
    """Two MoE blocks: block 0 small (replicated under SMALL rates and 64 tokens), block 1 with F=256."""
    torch.manual_seed(seed)
    model = testing.ToyMoE("stacked", E=4, layers=2)
    model.blocks[1] = testing.MoEBlock(testing.make_experts("stacked", 4, 16, LARGE_F), 4, 16, 2)
    return model


# --------------------------------------------------------------------------------------------- the cost model
def test_choose_layout_crosses_over_with_tokens_and_weights():
    lay = Layout(8, 2, 256, 512, "concat", False, False)
    r = cost.Rates(bandwidth=0.66e9, latency=6e-4, inter_bandwidth=0.66e9, inter_latency=6e-4, gemm_flops=80e9)
    t = cost.replicated_from(lay, 2, r, 2, 4, False)
    assert t is not None and 1 < t < 2 ** 24
    assert cost.choose_layout(lay, t, 2, r, 2, 4, False).layout == "replicated"  # from the crossover on ...
    assert cost.choose_layout(lay, 4 * t, 2, r, 2, 4, False).layout == "replicated"
    below = cost.choose_layout(lay, t // 2, 2, r, 2, 4, False)  # ... and sharded below it
    assert below.layout == "sharded" and set(below.estimates) == {"replicated", "expert", "data"}
    unknown = cost.choose_layout(lay, None, 2, r, 2, 4, False)  # no count: sharded, and the reason says so
    assert unknown.layout == "sharded" and "tokens_per_call=" in unknown.reason and f"about {t} tokens" in \
        unknown.reason
    # the replicated all-reduce moves 2/3 of the bytes of data mode's gathers and reduce-scatter, 3 GEMM passes
    # instead of 4: replicated is never dearer than data
    for T in (1, 64, 4096):
        est = cost.layout_estimates(lay, T, 2, r, 2, 4, False)
        assert est["replicated"] < est["data"]
    # Mixtral-8x7B-like experts on 8 NVLink GPUs at 4096 tokens: sharded (expert); a small layer there: replicated
    big = Layout(8, 8, 4096, 14336, "concat", False, False)
    c = cost.choose_layout(big, 4096, 2, cost.NVLINK, 8, 2, False)
    assert c.layout == "sharded" and min((m for m in c.estimates if m != "replicated"), key=c.estimates.get) == \
        "expert"
    assert cost.choose_layout(Layout(8, 8, 512, 1024, "concat", False, False), 4096, 2, cost.NVLINK, 8, 2,
                              False).layout == "replicated"


# --------------------------------------------------------------------------------------------- DDP equivalence
def test_auto_replicates_a_small_model_and_a_ddp_step_equals_one_process(pool2, pool4):
    """3 steps of SGD (momentum) / AdamW in mode auto: every experts module replicated, nothing ignored by DDP,
    weights, gradients and optimizer state equal one process on the global batch; compiled too."""
    for pool, optim in ((pool2, "sgd"), (pool4, "adamw")):
        res = pool.run(testing.ddp_compare, dict(kind="mixtral", E=4, tokens=4, modes=["auto"] * 3, optim=optim,
                                                  parallelize=SMALL))
        _check(res)
        for r in res:
            assert r["report"].count("replicated by auto") == 2, r["report"]
            assert "at 64 tokens per call" in r["report"] and "replicated is cheapest" in r["report"]
    res = pool2.run(testing.ddp_compare, dict(kind="stacked", E=4, tokens=3, compile="aot_eager",
                                               modes=["auto", "replicate", "auto"], parallelize=SMALL))
    _check(res)
    assert all(r["graphs"] == 1 for r in res), [r["graphs"] for r in res]


def test_auto_shards_a_large_model(pool2, pool4):
    for pool in (pool2, pool4):
        res = pool.run(testing.ddp_compare, dict(kind="stacked", E=4, F=LARGE_F, tokens=3,
                                                  modes=["auto", "expert", "auto"], parallelize=LARGE))
        _check(res)
        for r in res:
            assert r["report"].count("sharded by auto") == 2 and "expert is cheapest" in r["report"], r["report"]


def _w_plain_and_replicated(mode, kw):
    """Plain DDP and DDP over parallelize(mode, **kw), 2 SGD steps on the same batches: bitwise equal."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = testing.ToyMoE("stacked", E=4, layers=2)
    rep = mp_.parallelize(copy.deepcopy(model), mode=mode, **kw)
    facts = {"ignored": list(getattr(rep, "_ddp_params_and_buffers_to_ignore", [])),
             "tagged": sorted(n for n, p in rep.named_parameters() if mp_.is_expert_param(p)),
             "report": str(mp_.parallel_report(rep)), "mode": mp_.get_parallel(rep)}
    ddps = [DistributedDataParallel(m) for m in (model, rep)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, rep)]
    for step in range(2):
        x = torch.randn(6, 16, generator=torch.Generator().manual_seed(10 * step + rank))
        for ddp, opt in zip(ddps, opts):
            ddp(x).pow(2).mean().backward()
            opt.step()
    facts["equal"] = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rep.state_dict().values()))
    facts["managed"] = not ddps[1].parameters_to_ignore
    return facts


def test_replicated_experts_step_like_plain_ddp(pool2):
    for mode, kw in (("auto", SMALL), ("replicate", {})):
        for f in pool2.run(_w_plain_and_replicated, mode, kw):
            assert f["equal"] and f["managed"] and f["ignored"] == [], f
            assert f["tagged"] == [f"blocks.{i}.experts.{w}" for i in range(2) for w in ("down", "gate_up")]
            assert f["mode"] == ("auto" if mode == "auto" else "replicate")
            want = "replicated by auto" if mode == "auto" else "replicated by mode='replicate'"
            assert f["report"].count(want) == 2, f["report"]


def _w_mixed_step():
    """Block 0 replicated, block 1 sharded: a DDP step equals one process on the global batch."""
    rank, W = dist.get_rank(), dist.get_world_size()
    ref = _mixed()
    par = mp_.parallelize(copy.deepcopy(ref), mode="auto", **SMALL)
    ddp = DistributedDataParallel(par)
    x = torch.randn(4 * W, 16, generator=torch.Generator().manual_seed(3))
    ddp(x[4 * rank:4 * (rank + 1)]).pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    opt_ref, opt_par = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, par))
    opt_ref.step()
    opt_par.step()
    full = mp_.full_state_dict(par)
    err = max(testing.rel(full[n], v) for n, v in ref.state_dict().items())
    return (err, sorted(par._ddp_params_and_buffers_to_ignore), str(mp_.parallel_report(par)),
            full, mp_.full_optim_state_dict(par, opt_par), mp_.full_optim_state_dict(ref, opt_ref))


def _w_load_mixed(sd, osd, mode, x):
    """Load a checkpoint of the mixed model into one parallelized with ``mode`` (any world size)."""
    rank = dist.get_rank()
    torch.manual_seed(123)  # other weights: everything comes from the checkpoint
    model = mp_.parallelize(_mixed(seed=7), mode=mode, **(SMALL if mode == "auto" else {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mp_.load_full_state_dict(model, sd)
    mp_.load_full_optim_state_dict(model, opt, osd)
    back, oback = mp_.full_state_dict(model), mp_.full_optim_state_dict(model, opt)
    with torch.no_grad():
        out = model(x[3 * rank:3 * (rank + 1)])
    return back, oback, out


def test_mixed_layouts_step_and_checkpoints_round_trip(pool2, pool4):
    """A model with one replicated and one sharded experts module: a DDP step equals one process; its full model
    and optimizer state (the replicated module's parameters are plain entries) load at W=4 sharded and at W=2
    mixed again, and come back unchanged."""
    res = pool2.run(_w_mixed_step)
    for err, ignored, report, *_ in res:
        assert err <= TOL
        plain = [n for n in ignored if not n.startswith("_orig_mod.")]  # (also listed as read through compile)
        assert plain == ["blocks.1.experts.down", "blocks.1.experts.gate_up"]
        assert "blocks.0.experts: replicated" in report and "layout: sharded by auto" in report, report
    _, _, _, sd, osd, ref_osd = res[0]
    for n, st in ref_osd["state"].items():
        assert all(testing.rel(osd["state"][n][k], v) <= TOL for k, v in st.items()), n
    single = _mixed(seed=5)
    single.load_state_dict(sd)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = single(x)
    for pool, mode, xs in ((pool4, "expert", x), (pool2, "auto", x[:6])):
        for r, (back, oback, out) in enumerate(pool.run(_w_load_mixed, sd, osd, mode, xs)):
            assert set(back) == set(sd) and all(torch.equal(back[n], sd[n]) for n in sd)
            for n, st in osd["state"].items():
                assert all(torch.equal(torch.as_tensor(oback["state"][n][k]), torch.as_tensor(v))
                           for k, v in st.items()), n
            assert testing.rel(out, want[3 * r:3 * (r + 1)]) <= TOL


def _w_dcp_mixed(path, save):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = mp_.parallelize(_mixed(seed=0 if save else 9), mode="auto" if save else "expert", **SMALL)
    if save:
        dcp.save(mp_.sharded_state_dict(model), checkpoint_id=path)
    else:
        sd = mp_.sharded_state_dict(model)
        dcp.load(sd, checkpoint_id=path)
        mp_.load_sharded_state_dict(model, sd)
    return mp_.full_state_dict(model)


def test_dcp_round_trip_with_replicated_experts(pool2, pool4, tmp_path):
    """sharded_state_dict of the mixed model (replicated parameters are plain replicated entries for DCP), saved
    at W=2, loaded into a W=4 model whose experts are all sharded: the same whole model."""
    path = str(tmp_path / "dcp")
    saved = pool2.run(_w_dcp_mixed, path, True)[0]
    assert all(torch.equal(saved[n], v) for n, v in _mixed().state_dict().items())
    for got in pool4.run(_w_dcp_mixed, path, False):
        assert set(got) == set(saved) and all(torch.equal(got[n], saved[n]) for n in saved)


# --------------------------------------------------------------------------------------------- set_parallel, report
def _w_modes_on_replicated():
    torch.manual_seed(0)
    model = mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), mode="auto", **SMALL)
    errs = {m: _catch(lambda: mp_.set_parallel(model, m)) for m in ("expert", "data", "tensor")}
    still = mp_.get_parallel(model)
    ok = [_catch(lambda: mp_.set_parallel(model, m)) for m in ("replicate", "auto")]
    sharded = mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), mode="expert")
    errs["replicate on sharded"] = _catch(lambda: mp_.set_parallel(sharded, "replicate"))
    buf = io.BytesIO()  # a replicated model can be saved whole (the record drops its process group)
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    errs["unpickled"] = _catch(lambda: mp_.set_parallel(loaded, "data"))
    ok.append(_catch(lambda: mp_.set_parallel(loaded, "auto")))
    return errs, still, ok, mp_.get_parallel(sharded)


def test_set_parallel_refuses_sharded_modes_on_replicated_experts(pool2):
    for errs, still, ok, sharded_mode in pool2.run(_w_modes_on_replicated):
        for m in ("expert", "data", "tensor"):
            e = errs[m]
            assert e.startswith("ParallelError") and "kept replicated by auto" in e, e
            assert f"parallelize(model, mode={m!r})" in e and "nothing was changed" in e, e
        assert still == "auto" and ok == [None, None, None]
        assert "its experts are sharded" in errs["replicate on sharded"] and sharded_mode == "expert"
        assert "kept replicated by auto" in errs["unpickled"]


def _w_tokens_and_rates(tokens_per_call):
    """Measured rates (no rates=): the same on every rank, and so the same layout choices."""
    torch.manual_seed(0)
    kw = {} if tokens_per_call is None else dict(tokens_per_call=tokens_per_call[dist.get_rank()])
    x = torch.randn(64, 16)
    model = mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), mode="auto",
                            example_inputs=None if kw else (x,), **kw)
    rep = mp_.parallel_report(model)
    st = next(iter(mp_.tags.parallel_states(model)), None)
    rec = next(iter(mp_.tags.replicated_records(model)), None)
    rates = (st or rec).rates
    return rates, rep.blocks[0].layout, rep.blocks[0].layout_reason


def test_layout_decisions_agree_on_every_rank(pool2):
    """The tokens per call come from the example_inputs trace (64 here) or tokens_per_call= (the largest over the
    ranks); the rates measured in parallelize are agreed by all-reduce: every rank chooses alike."""
    for tokens in (None, [2, 64]):
        res = pool2.run(_w_tokens_and_rates, tokens)
        assert all(r == res[0] for r in res), res
        rates, layout, reason = res[0]
        assert rates.measured and layout == "replicated" and "at 64 tokens per call" in reason, reason


def _w_unshardable_auto():
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mp_.parallelize(testing.ToyMoE("stacked", E=3, k=2, layers=1), mode="auto")
    no_count = mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), mode="auto", rates=BYTES)
    bad = [_catch(lambda: mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), tokens_per_call=0)),
           _catch(lambda: mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), mode="replicated"))]
    mesh = testing.mesh_groups(2)[2]
    bad.append(_catch(lambda: mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), mode="replicate",
                                              mesh=mesh)))
    on_mesh = mp_.parallelize(testing.ToyMoE("stacked", E=4, layers=1), mesh=mesh, **SMALL)
    return ([str(w.message) for w in caught], str(mp_.parallel_report(model)), str(mp_.parallel_report(no_count)),
            bad, str(mp_.parallel_report(on_mesh)))


def test_auto_replicates_what_cannot_be_sharded_and_shards_without_a_count(pool4):
    """E=3 at W=4 under auto: replicated, with a warning (an error in the sharded modes); no token count: sharded,
    the report naming the fix; a data x expert mesh: sharded; bad arguments raise on every rank."""
    for caught, report, no_count, bad, on_mesh in pool4.run(_w_unshardable_auto):
        assert any("3 experts cannot be sharded over 4 ranks" in w and "auto keeps it replicated" in w
                   for w in caught), caught
        assert "replicated by auto: 3 experts cannot be sharded" in report, report
        assert "sharded by auto: no token count" in no_count and "tokens_per_call=" in no_count, no_count
        assert "tokens_per_call must be a positive int" in bad[0]
        assert "unknown parallel mode 'replicated'" in bad[1] and "'replicate'" in bad[1]
        assert "mode 'replicate' keeps every expert on every rank" in bad[2] and "mesh" in bad[2]
        assert "sharded by auto: a data x expert mesh was given" in on_mesh, on_mesh
