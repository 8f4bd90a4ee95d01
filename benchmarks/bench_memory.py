"""Memory per rank, DDP vs FSDP2, with the experts sharded by moe_compile.parallelize in both.

    python benchmarks/bench_memory.py            # W = 2 and 4 (1D, and a 2 x 2 dp x ep mesh at W = 4)

Each rank builds the same model (a dense input layer, then blocks of a dense MLP and an MoE layer), parallelizes
it, wraps it in DistributedDataParallel or fully_shard's it (blocks, then the model, with
``ignored_params=moe_compile.fsdp_ignored_params(model)``), runs one AdamW step, and counts the bytes of tensor
storage each rank holds for parameters, gradients and optimizer state (each storage once; a DTensor's local
shard, with FSDP2's padding). Not counted: activations, DDP's gradient buckets (a second copy of the dense
gradients under DDP), FSDP2's all-gather buffers while a block runs.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


class Block(nn.Module):
    def __init__(self, E, H, F, dense_ffn):
        import parallel_harness as testing

        super().__init__()
        self.mlp = testing.MLP(H, dense_ffn)
        self.moe = testing.MoEBlock(testing.StackedExperts(E, H, F), E, H, k=2)

    def forward(self, x):
        return self.moe(x + self.mlp(x))


class Model(nn.Module):
    def __init__(self, E, H, F, dense_ffn, layers):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.blocks = nn.ModuleList(Block(E, H, F, dense_ffn) for _ in range(layers))

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return x


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def worker(cfg: dict) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import moe_compile
    import parallel_harness as testing

    torch.manual_seed(0)
    W = dist.get_world_size()
    model = Model(cfg["E"], cfg["H"], cfg["F"], cfg["dense_ffn"], cfg["layers"])
    kw = {}
    if cfg["ep"] < W:
        kw["mesh"] = testing.mesh_groups(cfg["ep"])[2]
    moe_compile.parallelize(model, mode="expert", **kw)
    if cfg["how"] == "ddp":
        run = DistributedDataParallel(model)
    else:
        ignored = moe_compile.fsdp_ignored_params(model)
        for b in model.blocks:
            fully_shard(b, ignored_params=ignored)
        run = fully_shard(model, ignored_params=ignored)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(cfg["tokens"], cfg["H"], generator=torch.Generator().manual_seed(dist.get_rank()))
    run(x).square().mean().backward()
    opt.step()
    params = list(model.parameters())
    expert = [p for p in params if moe_compile.is_expert_param(p)]
    dense = [p for p in params if not moe_compile.is_expert_param(p)]
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return {"params_dense": _nbytes(dense), "params_expert": _nbytes(expert),
            "grads": _nbytes(p.grad for p in params), "optim": _nbytes(state)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--dense-ffn", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    import parallel_harness as testing

    base = dict(E=args.experts, H=args.hidden, F=args.ffn, dense_ffn=args.dense_ffn, layers=args.layers,
                tokens=args.tokens)
    one = Model(args.experts, args.hidden, args.ffn, args.dense_ffn, args.layers)
    n_exp = sum(p.numel() for n, p in one.named_parameters() if ".experts." in n)
    n_dense = sum(p.numel() for p in one.parameters()) - n_exp
    print(f"model: {n_dense / 1e6:.2f} M dense + {n_exp / 1e6:.2f} M expert parameters (fp32); one process holds "
          f"{4 * (n_dense + n_exp) / 2**20:.1f} MiB of parameters, as much of gradients, twice of AdamW state")
    MiB = 2 ** 20
    print("| W | mesh (dp x ep) | wrapper | dense params | expert params | gradients | AdamW state | total MiB/rank |")
    print("|---|---|---|---|---|---|---|---|")
    d, e = 4 * n_dense / MiB, 4 * n_exp / MiB
    print(f"| 1 | - | none | {d:.2f} | {e:.2f} | {d + e:.2f} | {2 * (d + e):.2f} | {4 * (d + e):.2f} |")
    for W, ep in ((2, 2), (4, 4), (4, 2)):
        with testing.WorkerPool(W, timeout=600) as pool:
            for how in ("ddp", "fsdp"):
                res = pool.run(worker, dict(base, how=how, ep=ep))
                r = max(res, key=lambda d: sum(d.values()))  # the fullest rank
                tot = sum(r.values())
                print(f"| {W} | {W // ep} x {ep} | {'DDP' if how == 'ddp' else 'FSDP2'} | "
                      f"{r['params_dense'] / MiB:.2f} | {r['params_expert'] / MiB:.2f} | {r['grads'] / MiB:.2f} | "
                      f"{r['optim'] / MiB:.2f} | {tot / MiB:.2f} |", flush=True)


if __name__ == "__main__":
    main()
