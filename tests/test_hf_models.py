"""HF transformers 5 MoE models: every block found and fused, training step equal to eager."""
import functools
import pytest
import torch

pytest.importorskip("transformers")

import moe_compile  # noqa: E402
from helpers import HF_FAMILIES, VOCAB, assert_same_training_step, count_op_calls, loss_and_grads, tiny_hf_model  # noqa: E402

IMPLS = ["eager", "batched_mm", "grouped_mm"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ids(seq=10, batch=2, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_family_fused_and_equal(family, impl):
    model = tiny_hf_model(family, impl)
    ids = _ids()
    ref = loss_and_grads(model, ids, labels=ids)
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    got = loss_and_grads(compiled, ids, labels=ids)
    assert_same_training_step(ref, got)
    regions = moe_compile.backend.last_regions
    assert [r.module_path for r in regions if r.fused] == [f"model.layers.{i}.mlp.experts" for i in range(2)], regions
    assert all(r.fused for r in regions), regions
    # expert weights really receive gradient through the fused op
    assert all(got[1][n].abs().sum() > 0 for n in got[1] if "experts" in n)
    with torch.no_grad():
        assert count_op_calls(lambda: compiled(ids)) >= 2


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_explain_lists_every_block_fused_without_breaks(family):
    model = tiny_hf_model(family, "eager")
    report = moe_compile.explain(model, _ids())
    assert len(report.regions) == 2 and all(r.fused for r in report.regions), str(report)
    assert report.graph_breaks == 0, str(report)
    assert "2/2 MoE regions fused" in str(report)


def test_router_description():
    report = moe_compile.explain(tiny_hf_model("deepseek_v3"), _ids())
    router = report.regions[0].spec.router
    assert (router.score, router.bias_correction, router.group_limited, router.renormalize) == (
        "sigmoid", True, True, True)
    gpt = moe_compile.explain(tiny_hf_model("gpt_oss"), _ids()).regions[0].spec
    assert (gpt.activation, gpt.gate_layout, gpt.weight_layout, gpt.has_bias) == (
        "swiglu_oai", "interleaved", "in_out", True)
    assert gpt.router.order == "topk->score"


def test_changing_sizes_does_not_recompile_every_step():
    model = tiny_hf_model("mixtral", "eager")
    calls = []

    @functools.wraps(moe_compile.moe_backend)  # a backend of one's own around moe's: marked as moe's by __wrapped__
    def counting(gm, example_inputs):
        calls.append(1)
        return moe_compile.moe_backend(gm, example_inputs, options={"compiler": "aot_eager"})

    compiled = torch.compile(model, backend=counting)
    sizes = [(2, 5), (3, 7), (1, 9), (2, 12), (3, 16), (1, 3), (2, 21), (3, 4), (4, 11), (1, 6)]
    for step, (batch, seq) in enumerate(sizes):
        ids = _ids(seq=seq, batch=batch)
        assert_same_training_step(loss_and_grads(model, ids, labels=ids), loss_and_grads(compiled, ids, labels=ids))
        if step == 5:
            warm = len(calls)  # static, then dynamic shapes, then Dynamo's size-1 specialisation
    assert warm <= 3, f"compiled {warm} times for the first 6 sizes"
    assert len(calls) == warm, "new batch sizes and sequence lengths recompiled"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_inductor(family):
    model = tiny_hf_model(family, "grouped_mm")
    ids = _ids()
    ref = loss_and_grads(model, ids, labels=ids)
    compiled = torch.compile(model, backend="moe")
    assert_same_training_step(ref, loss_and_grads(compiled, ids, labels=ids))
    assert sum(r.fused for r in moe_compile.backend.last_regions) == 2
