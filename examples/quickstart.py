"""Quickstart: compile a tiny Mixtral with backend="moe", check one training step against eager, show what was fused.

Run: python examples/quickstart.py
"""
import torch
import transformers

import moe_compile

config = transformers.MixtralConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config)
ids = torch.randint(0, config.vocab_size, (4, 32))

print(moe_compile.explain(model, ids))

def step(m):
    m.zero_grad(set_to_none=True)
    loss = m(ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in m.named_parameters()}

loss_eager, grads_eager = step(model)
compiled = torch.compile(model, backend="moe")
loss_moe, grads_moe = step(compiled)
worst = max(float((grads_moe[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in grads_eager.items())
print(f"loss eager {loss_eager:.6f}  moe {loss_moe:.6f}  worst gradient relative error {worst:.1e}")
assert abs(loss_eager - loss_moe) <= 1e-4 * abs(loss_eager) and worst <= 1e-4
