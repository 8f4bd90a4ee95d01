"""Shared builders and checks for the tests."""
from __future__ import annotations

import functools

import torch

HF_FAMILIES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40, intermediate_size=48,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=24)),
    "deepseek_v2": ("DeepseekV2Config", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                             intermediate_size=48, n_shared_experts=1, first_k_dense_replace=0,
                                             kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1,
                                             topk_method="group_limited_greedy", num_key_value_heads=4)),
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                             intermediate_size=48, n_shared_experts=1, first_k_dense_replace=0,
                                             kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1,
                                             routed_scaling_factor=2.5, num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, head_dim=8,
                                     layer_types=["full_attention", "sliding_attention"], sliding_window=8)),
}
VOCAB = 64


def tiny_hf_model(family: str, impl: str = "eager", seed: int = 0):
    """A 2-layer ``AutoModelForCausalLM`` of ``family`` with random, non-zero weights (router biases included)."""
    import transformers

    cname, kw = HF_FAMILIES[family]
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    cfg = getattr(transformers, cname)(**{**base, **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() and t.dim() >= 1 and t.abs().sum() == 0:
                t.normal_(std=0.5)  # zero-initialised router biases / corrections would hide their paths
    model.set_experts_implementation(impl)
    return model


def loss_and_grads(model, *args, **kwargs):
    """One forward + backward; returns the loss and every parameter gradient by (unwrapped) name."""
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out.float().pow(2).mean()
    loss.backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.detach().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """max |a - b| / max |b|; ``floor`` bounds the denominator from below for values that are mathematically zero
    (e.g. the router gradient when k = 1 and weights are renormalised, which eager leaves as rounding noise)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor)) if b.numel() else 0.0


def grads_equal(g_ref: dict, g_got: dict, tol: float = 1e-4) -> dict:
    """Names whose gradients differ by more than ``tol`` relative, judged against the largest gradient of the model
    times 1e-3 where a gradient is itself ~0; returns {} when all agree."""
    scale = max((float(g.abs().max()) for g in g_ref.values() if g.numel()), default=0.0)
    bad = {n: rel_err(g_got[n], g_ref[n], 1e-3 * scale) for n in g_ref}
    return {n: e for n, e in bad.items() if not e <= tol}  # NaN is a difference too


def assert_same_training_step(ref, got, tol=1e-4):
    """``ref`` and ``got`` are (loss, grads) pairs: equal loss, the same set of gradients, each equal."""
    (l0, g0), (l1, g1) = ref, got
    assert rel_err(l1, l0) <= tol, (l0, l1)
    assert set(g0) == set(g1), set(g0) ^ set(g1)
    bad = grads_equal(g0, g1, tol)
    assert not bad, bad


def count_op_calls(fn, op_prefix="moe_compile::") -> int:
    """How many times ops named ``op_prefix...`` ran in ``fn()`` (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith(op_prefix))


def out_and_grads(model, x):
    """``model(x)``, backward of its mean square; the output and every parameter gradient by (unwrapped) name."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.pow(2).mean().backward()
    return out.detach(), {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def recording_backend(name: str = "recording"):
    """A kernel backend (``moe_compile.kernels``) that delegates to the ATen backend and records each call as
    ``(method, spec.dispatch, x.dtype)`` in ``.calls``: register it to see which calls reach a backend."""
    from moe_compile import kernels
    from moe_compile.kernels import aten

    class Recording(kernels.KernelBackend):
        def __init__(self):
            self.name, self.calls, self.inner = name, [], aten.AtenBackend()

        def accepts(self, spec, x) -> bool:
            return True

        def forward(self, spec, x, idx, w, wts, *, keep_outputs=False):
            self.calls.append(("forward", spec.dispatch, x.dtype))
            return self.inner.forward(spec, x, idx, w, wts, keep_outputs=keep_outputs)

        def backward(self, spec, grad, x, idx, w, wts, h, r, **kw):
            self.calls.append(("backward", spec.dispatch, x.dtype))
            return self.inner.backward(spec, grad, x, idx, w, wts, h, r, **kw)

        def plan(self, idx, num_experts):
            self.calls.append(("plan", "", None))
            return self.inner.plan(idx, num_experts)

    return Recording()


@functools.lru_cache(maxsize=None)
def hf_experts_take_dropped_ids() -> bool:
    """Does this transformers' eager experts code accept the "dropped" expert id E (transformers 5.25 does; 5.17's
    ``one_hot(top_k_index, num_classes=E)`` raises)? Where it does not, HF experts cannot be the reference for
    dropped routings."""
    import transformers

    cfg = transformers.MixtralConfig(hidden_size=8, intermediate_size=8, num_local_experts=2, num_experts_per_tok=1)
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    experts = MixtralExperts(cfg)
    experts.set_experts_implementation("eager") if hasattr(experts, "set_experts_implementation") else None
    try:
        with torch.no_grad():
            experts(torch.zeros(2, 8), torch.tensor([[0], [2]]), torch.ones(2, 1))
        return True
    except RuntimeError:
        return False
