"""Experts whose bodies are the user's own code (not a recognisable MLP): the dispatch (one sort, one gather) and
the combine (one weighted ``index_add``) around the user's expert modules, each run once on its slice of rows.
Used by ``moe_compile::dispatch_combine`` (ops) and by the proof that it equals the module (recognition)."""
from __future__ import annotations

import torch



def find_expert_list(module):
    """The one ``nn.ModuleList`` inside ``module`` as (name, list), or (None, None)."""
    lists = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if len(lists) != 1:
        return None, None
    return lists[0]


def run_user_experts(module, experts, names, params, x, idx, w, plan):
    """out[t] = sum_j w[t, j] * experts[idx[t, j]](x[t]), with parameters ``params`` (functional); ``plan`` is
    the dispatch plan of ``idx`` (``moe_compile.kernels.plan``)."""
    values = dict(zip(names, params))
    xs = x[plan.tokens]
    ys, start = [], 0
    prefix = {id(e): f"{n}." for n, e in module.named_modules() if any(e is ex for ex in experts)}
    for e, end in enumerate(plan.offs_list):
        if end > start:
            p = prefix[id(experts[e])]
            own = {n[len(p):]: v for n, v in values.items() if n.startswith(p)}
            ys.append(torch.func.functional_call(experts[e], own, (xs[start:end],), strict=False))
        start = end
    y = torch.cat(ys) if ys else xs.new_zeros(0, x.shape[-1])
    ws = w.reshape(-1)[plan.order]
    return torch.zeros_like(x).index_add(0, plan.tokens, (y * ws.unsqueeze(-1)).to(x.dtype))
