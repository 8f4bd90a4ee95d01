"""parallelize on the most common hand-written MoE layer: router, nn.ModuleList of experts and the dispatch loop in
one forward (``parallel_harness.InlineBlock``). parallelize traces each such block as the backend does, proves it,
shards the list in place (other ranks' experts become placeholders), and the backend's inline pass runs the block's
experts as ``moe_compile::parallel_experts``. W ranks equal one process on the global batch, in every mode.
Functions prefixed ``_w_`` run inside the gloo workers."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import moe_compile
import parallel_harness as testing
from moe_compile import parallel as mp_
from moe_compile.parallel import ParallelError

TOL = 1e-5


def _check(results, tol=TOL):
    for r in results:
        assert r["errors"], r
        bad = {k: v for k, v in r["errors"].items() if not v <= tol}
        assert not bad, (bad, r["where"], r["reports"][-1])


@pytest.mark.parametrize("kind", ["inline", "inline_bias"])
def test_inline_block_every_mode_equals_one_process(pool2, pool4, kind):
    for pool, E, tokens in ((pool2, 4, [7, 5]), (pool4, 4, [5, 0, 9, 3]), (pool4, 8, [6, 6, 4, 7])):
        case = dict(kind=kind, E=E, tokens=tokens, modes=["expert", "data", "auto", "expert"], compile="aot_eager")
        res = pool.run(testing.compare, case)
        _check(res)
        assert res[0]["graphs"] == 1  # one graph for every mode: switching never recompiles
        assert set(res[0]["modes_run"]) <= {"expert", "data"}
        assert "of %d experts per rank" % E in res[0]["reports"][-1]


def test_inline_block_under_ddp_adamw_with_clipping(pool2, pool4):
    for pool in (pool2, pool4):
        res = pool.run(testing.ddp_compare, dict(kind="inline", E=4, tokens=6, modes=["expert", "data", "auto"],
                                                 compile="aot_eager", optim="adamw", clip=0.05,
                                                 clip_on="params"))
        for r in res:
            bad = {k: v for k, v in r["errors"].items() if not v <= TOL}
            assert not bad, r


def test_inline_block_data_x_expert_mesh(pool4):
    res = pool4.run(testing.ddp_compare, dict(kind="inline", E=4, tokens=6, modes=["expert", "data"], ep=2,
                                              compile="aot_eager", optim="sgd"))
    for r in res:
        bad = {k: v for k, v in r["errors"].items() if not v <= TOL}
        assert not bad, r


@pytest.mark.slow
def test_inline_block_inductor(pool2):
    _check(pool2.run(testing.compare, dict(kind="inline", E=4, tokens=[8, 6], modes=["expert", "data"],
                                           compile="inductor")))


# --------------------------------------------------------------------------------------------- what a rank holds
def _w_storage():
    torch.manual_seed(0)
    model = testing.ToyInlineMoE(E=4, layers=1)
    full = {n: p.detach().clone() for n, p in model.state_dict().items()}
    ids = {id(p) for p in model.parameters()}
    mp_.parallelize(model, mode="expert")
    lst = model.blocks[0].experts
    rank = dist.get_rank()
    mine = [2 * rank, 2 * rank + 1]
    out = {"ignored": sorted(model._ddp_params_and_buffers_to_ignore),
           "placeholder_bytes": sum(p.untyped_storage().nbytes() for e in range(4) if e not in mine
                                    for p in lst[e].parameters()),
           "local_equal": all(torch.equal(lst[e].w1.weight, full[f"blocks.0.experts.{e}.w1.weight"]) for e in mine),
           "sd_keys": sorted(k for k in model.state_dict() if ".experts." in k),
           "dense_kept": id(model.inp.weight) in ids}
    try:  # eager: the placeholders would compute wrong numbers, so calling the block raises
        model(torch.randn(5, 16))
        out["eager"] = "ran"
    except ParallelError as e:
        out["eager"] = str(e)
    sd = {n: v.clone() for n, v in full.items()}  # a whole, unparallelized state dict: each rank keeps its part
    for n in sd:
        sd[n].add_(1.0)
    missing = model.load_state_dict(sd, strict=True)
    out["load_missing"] = list(missing.missing_keys)
    out["loaded"] = all(torch.equal(lst[e].w2.weight, sd[f"blocks.0.experts.{e}.w2.weight"]) for e in mine)
    whole = mp_.full_state_dict(model)
    out["full_equal"] = sorted(whole) == sorted(full) and all(torch.equal(whole[n], sd[n]) for n in sd)
    return out


def test_sharded_inline_storage_names_and_loads(pool2):
    res = pool2.run(_w_storage)
    for rank, r in enumerate(res):
        mine = [2 * rank, 2 * rank + 1]
        assert r["local_equal"] and r["dense_kept"] and r["loaded"] and r["full_equal"], r
        assert r["placeholder_bytes"] <= 6 * 4, r  # one element per placeholder
        assert r["sd_keys"] == sorted(f"blocks.0.experts.{e}.{l}.weight" for e in mine for l in ("w1", "w2", "w3"))
        plain = [n for n in r["ignored"] if not n.startswith("_orig_mod.")]  # (also as read through torch.compile)
        assert len(plain) == 12  # every expert parameter, placeholders included: DDP leaves them alone
        assert r["load_missing"] == []
        assert "lives on another rank" in r["eager"] and 'backend="moe"' in r["eager"], r["eager"]


def _w_explain():
    torch.manual_seed(0)
    model = testing.ToyInlineMoE(E=4, layers=2)
    mp_.parallelize(model, mode="expert")
    rep = moe_compile.explain(model, torch.randn(6, 16))
    return str(rep), [(r.module_path, r.fused, r.pattern) for r in rep.regions]


def test_explain_lists_sharded_inline_blocks_fused(pool2):
    text, regions = pool2.run(_w_explain)[0]
    assert [(p, f) for p, f, _ in regions] == [("blocks.0", True), ("blocks.1", True)], text
    assert all("parallel" in pat for _, _, pat in regions), text


# --------------------------------------------------------------------------------------------- refusals
class _TwoArgBlock(testing.InlineBlock):
    """An inline block whose forward also takes a mask: parallelize cannot make up its arguments."""

    def forward(self, hidden, keep):
        return super().forward(hidden * keep)


class _TwoArgNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _TwoArgBlock(4, 16, 8, 2)

    def forward(self, x):
        return self.block(x, torch.ones_like(x))


class _ScaledBlock(testing.InlineBlock):
    """Experts whose outputs are squared before the combine: not the experts contract, never fused."""

    def forward(self, hidden):
        x = hidden
        w, idx = torch.topk(F.softmax(self.gate(x), dim=-1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, expert(x[tok]).square() * w[tok, slot, None])
        return out


def _w_refusals():
    out = {}
    torch.manual_seed(0)
    for name, model, kw in [("two_args", _TwoArgNet(), {}),
                            ("two_args_example", _TwoArgNet(), {"example_inputs": torch.randn(6, 16)}),
                            ("unfusable", nn.Sequential(_ScaledBlock(4, 16, 8, 2)), {}),
                            ("too_few_experts", testing.ToyInlineMoE(E=1, k=1, layers=1), {})]:
        before = {n: p for n, p in model.named_parameters()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mp_.parallelize(model, mode="expert", **kw)
            out[name] = "ok"
        except ParallelError as e:
            out[name] = str(e)
            unchanged = {n: p for n, p in model.named_parameters()} == before
            out[name + "_unchanged"] = unchanged and not hasattr(model, "_ddp_params_and_buffers_to_ignore")
    return out


def test_blocks_that_cannot_be_sharded_are_refused_before_any_change(pool2):
    for r in pool2.run(_w_refusals):
        assert "pass example_inputs" in r["two_args"] and "block" in r["two_args"], r["two_args"]
        assert r["two_args_example"] == "ok", r["two_args_example"]
        assert "0: the backend does not fuse this block" in r["unfusable"], r["unfusable"]
        assert "at least as many experts as ranks" in r["too_few_experts"], r["too_few_experts"]
        assert r["two_args_unchanged"] and r["unfusable_unchanged"] and r["too_few_experts_unchanged"], r


# --------------------------------------------------------------------------------------------- one process
def test_single_process_parallelize_tags_and_the_block_still_runs_eagerly():
    torch.manual_seed(0)
    model = testing.ToyInlineMoE(E=4, layers=1)
    ref = copy.deepcopy(model)
    mp_.parallelize(model)
    assert all(mp_.is_expert_param(p) for p in model.blocks[0].experts.parameters())
    assert not mp_.is_expert_param(model.inp.weight)
    x = torch.randn(9, 16)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_a_block_compiled_on_its_own_is_fused():
    """torchtitan compiles each block separately: the block is then Dynamo's root module, whose own nodes carry no
    module path."""
    torch.manual_seed(0)
    block = testing.InlineBlock(4, 16, 8, 2)
    rep = moe_compile.explain(block, torch.randn(2, 5, 16))
    assert [r.fused for r in rep.regions] == [True], str(rep)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ref = copy.deepcopy(block)
    xr = x.detach().clone().requires_grad_()
    out = torch.compile(block, backend="moe", options={"compiler": "aot_eager"})(x)
    out_ref = ref(xr)
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (n, p), q in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_moe_blocks_parallelize_cannot_shard_are_named_not_left_replicated():
    """Blocks the backend fuses but parallelize does not shard yet (GShard capacity dispatch, experts gathered per
    token from stacked weights) raise, naming the block, instead of staying replicated without a word."""
    from models import GShardMoE, InlineGatherMoE

    torch.manual_seed(0)
    for model, what in [(nn.Sequential(GShardMoE(4, 16, 8)), "capacity dispatch"),
                        (nn.Sequential(GShardMoE(4, 16, 8, stacked=True)), "cannot shard"),
                        (nn.Sequential(InlineGatherMoE(4, 16, 8, 2)), "cannot shard")]:
        before = dict(model.named_parameters())
        with pytest.raises(ParallelError, match="0: .*" + what):
            mp_.parallelize(model)
        assert dict(model.named_parameters()) == before
        assert not any(mp_.is_expert_param(p) for p in model.parameters())


def test_inline_block_with_ddp_optimizer_buckets(pool2):
    """DDPOptimizer cuts the compiled graph at bucket boundaries (300-byte buckets: several cuts); the inline block's
    experts region is fused before the cut and stays one node."""
    res = pool2.run(testing.ddp_compare, dict(kind="inline", E=4, tokens=6, modes=["expert", "data"], optim="sgd",
                                              compile="aot_eager", optimize_ddp=True, bucket_cap_mb=0.0003))
    for r in res:
        bad = {k: v for k, v in r["errors"].items() if not v <= TOL}
        assert not bad, r
        assert r["aot_graphs"] >= 2, r  # the graph really was cut


def test_blocks_alike_are_traced_once(monkeypatch):
    import sys

    from moe_compile.parallel import find

    explain_mod = sys.modules["moe_compile.explain"]  # (the package's `explain` attribute is the function)

    calls = []
    real = explain_mod.regions_of
    monkeypatch.setattr(explain_mod, "regions_of", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(find, "_INLINE_PROOFS", {})
    torch.manual_seed(0)
    mp_.parallelize(testing.ToyInlineMoE(E=4, layers=3))
    assert len(calls) == 1
    mp_.parallelize(testing.ToyInlineMoE(E=4, layers=1, gated=False))  # another structure: traced again
    assert len(calls) == 2
