"""HF MoE families whose MoE is not an ``@use_experts_implementation`` experts module: captured whole under
backend="moe", fused where proven, training step equal to eager, untouched by other backends."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import moe_compile  # noqa: E402
from helpers import VOCAB, assert_same_training_step, count_op_calls, loss_and_grads  # noqa: E402

ENC_DEC = ("switch_transformers", "nllb_moe")


def tiny(family: str, seed: int = 0):
    T = transformers
    if family == "switch_transformers":
        cfg = T.SwitchTransformersConfig(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4,
            num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, dropout_rate=0.0, router_jitter_noise=0.0,
            expert_capacity=64, decoder_start_token_id=0, pad_token_id=0)
        model = T.SwitchTransformersForConditionalGeneration
    elif family == "nllb_moe":
        cfg = T.NllbMoeConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=48, decoder_ffn_dim=48,
            encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4, expert_capacity=64,
            encoder_sparse_step=1, decoder_sparse_step=1, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            moe_token_dropout=0.0, max_position_embeddings=64, decoder_start_token_id=2, pad_token_id=1)
        model = T.NllbMoeForConditionalGeneration
    elif family == "dbrx":
        cfg = T.DbrxConfig(
            vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),  # clip_qkv=None fails to trace in HF
            ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2, moe_jitter_eps=None))
        model = T.DbrxForCausalLM
    elif family == "llama4":
        cfg = T.Llama4TextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=24, intermediate_size_mlp=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=1, max_position_embeddings=64)
        model = T.Llama4ForCausalLM
    else:
        cfg = T.JetMoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                             kv_channels=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=64)
        model = T.JetMoeForCausalLM
    torch.manual_seed(seed)
    m = model(cfg)
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point() and t.dim() >= 1 and t.abs().sum() == 0:
                t.normal_(std=0.5)  # zero-initialised router biases would hide their paths
    return m


BLOCKS = {  # family: (MoE blocks in the tiny model, fused?)
    "switch_transformers": (2, True), "nllb_moe": (2, True), "dbrx": (2, True), "jetmoe": (2, True),
    "llama4": (2, True),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(family):
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    if family in ENC_DEC:
        return (ids,), dict(labels=ids[:, :6].contiguous())
    return (ids,), dict(labels=ids)


def _forward_kwargs(family, kw):
    return dict(decoder_input_ids=kw["labels"]) if family in ENC_DEC else {}


@pytest.mark.parametrize("family", sorted(BLOCKS))
def test_family_training_step_explain_and_ops(family):
    n_blocks, fused = BLOCKS[family]
    model = tiny(family)
    args, kw = _inputs(family)
    ref = loss_and_grads(model, *args, **kw)
    compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
    got = loss_and_grads(compiled, *args, **kw)
    # an expert no token reaches gets grad None in eager (its module never runs) and exact zeros from the fused op
    # (same function). HF's NllbMoeExperts indexes experts by the VALUES of the top-1 mask (0/1): experts 2.. never run
    extra = set(got[1]) - set(ref[1])
    assert all(".experts.expert_" in n and not got[1][n].any() for n in extra), extra
    if family == "nllb_moe":
        assert extra
    got = (got[0], {n: g for n, g in got[1].items() if n in ref[1]})
    assert_same_training_step(ref, got, tol=1e-5)
    assert all(got[1][n].abs().sum() > 0 for n in ref[1] if "expert" in n)

    fkw = _forward_kwargs(family, kw)
    with torch.no_grad():
        calls = count_op_calls(lambda: compiled(*args, **fkw))
    assert calls >= (n_blocks if fused else 0), calls
    if not fused:
        assert calls == 0

    torch._dynamo.reset()
    report = moe_compile.explain(model, *args, **fkw)
    text = str(report)
    moe = [r for r in report.regions if r.fused] if fused else report.regions
    assert len([r for r in report.regions if r.fused]) == (n_blocks if fused else 0), text
    assert len(moe) >= n_blocks, text
    assert all(r.fused or r.reason for r in report.regions), text
    if fused:  # each block once, under its path in the model (not twice, as a fused region and an unfused one)
        assert not [r for r in report.regions if r.pattern.startswith("MoE-like block")], text
        assert all(r.module_path in dict(model.named_modules()) for r in report.regions if r.fused), text
    # no graph break inside an MoE block (the encoder-decoders' remaining breaks are HF's output capturing)
    assert not any("expert" in b for b in report.break_reasons), text
    if family not in ENC_DEC:
        assert report.graph_breaks == 0, text

    # plain torch.compile of the same model, after import: no moe_compile op runs, same numbers
    torch._dynamo.reset()
    plain = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert count_op_calls(lambda: plain(*args, **fkw)) == 0
