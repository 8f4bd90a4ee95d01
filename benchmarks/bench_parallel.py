"""Parallel modes: measured time and traffic per step on CPU (gloo), and the cost model's projection to GPUs.

    python benchmarks/bench_parallel.py                       # W = 2 and 4 on this machine, then the projection
    python benchmarks/bench_parallel.py --no-run              # the projection only (plot: benchmarks/out/)

Part 1 runs one MoE layer (router + experts, forward + backward) on W gloo processes, for each parallel mode and
for "auto", and reports the time per step (slowest rank, median of --steps) and the bytes each rank sent per step.
The row marked ``*`` is the mode "auto" chose.

Part 2 projects the same comparison with the cost model (``moe_compile.parallel.cost``) for 8 to 1024 GPUs,
first all on NVLink, then 8 GPUs per node joined by InfiniBand (hierarchical all-to-all, and flat for
comparison), for two layer shapes: few large experts (Mixtral-8x7B-like) and many small ones (DeepSeek-V3-like).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from moe_compile.parallel import cost
from moe_compile.parallel.layout import Layout

# the gloo worker pool and toy models live with the tests (test support is not shipped in the wheel)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


# --------------------------------------------------------------------------------------------- part 1: measured
def bench_worker(cfg: dict) -> dict:
    from moe_compile import parallel
    import parallel_harness as testing

    torch.manual_seed(0)
    W = dist.get_world_size()
    model = testing.ToyMoE("stacked", E=cfg["experts"], H=cfg["hidden"], F=cfg["ffn"], k=cfg["k"], layers=1)
    parallel.parallelize(model, mode="auto")
    states = [m._moe_parallel for m in model.modules() if getattr(m, "_moe_parallel", None) is not None]
    x = torch.randn(cfg["tokens"], cfg["hidden"], generator=torch.Generator().manual_seed(dist.get_rank()))
    modes = ["expert", "data"] + (["tensor"] if cfg["experts"] < W else []) + ["auto"]
    out = {}
    for mode in modes:
        parallel.set_parallel(model, mode)
        for _ in range(2):  # warm up
            model(x).square().mean().backward()
        times, sent0 = [], sum(s.traffic.total for s in states)
        for _ in range(cfg["steps"]):
            dist.barrier()
            t0 = time.perf_counter()
            model(x).square().mean().backward()
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(float(t))
        sent = (sum(s.traffic.total for s in states) - sent0) / cfg["steps"]
        out[mode] = {"ms": 1e3 * statistics.median(times), "bytes": sent, "ran": states[0].stats.last_mode,
                     "estimate": dict(states[0].stats.last_estimate)}
        model.zero_grad(set_to_none=True)
    return out


def run_measured(args) -> list[dict]:
    from parallel_harness import WorkerPool

    cfg = dict(tokens=args.tokens, hidden=args.hidden, ffn=args.ffn, experts=args.experts, k=args.k,
               steps=args.steps)
    rows = []
    for W in args.worlds:
        with WorkerPool(W, timeout=600) as pool:
            res = pool.run(bench_worker, cfg)
        chosen = res[0]["auto"]["ran"]
        print(f"\nW = {W} (gloo, CPU): {args.tokens} tokens/rank, H={args.hidden}, F={args.ffn}, E={args.experts}, "
              f"k={args.k}; auto chose {chosen!r}")
        print(f"  {'mode':<8} {'ms/step':>9} {'MB sent/step/rank':>18}")
        for mode, r in res[0].items():
            mb = statistics.mean(rr[mode]["bytes"] for rr in res) / 1e6
            mark = "*" if mode == chosen else " "
            print(f" {mark}{mode:<8} {r['ms']:9.2f} {mb:18.3f}")
            rows.append({"W": W, "mode": mode, "ms": r["ms"], "MB": mb, "auto_choice": chosen})
    return rows


# --------------------------------------------------------------------------------------------- part 2: projected
SHAPES = {
    "mixtral-8x7b (E=8, H=4096, F=14336, k=2)": dict(E=8, H=4096, F=14336, k=2),
    "deepseek-v3 (E=256, H=7168, F=2048, k=8)": dict(E=256, H=7168, F=2048, k=8),
}
WORLDS = [8, 16, 32, 64, 128, 256, 512, 1024]


def _layout(shape: dict, W: int) -> Layout | None:
    E, F = shape["E"], shape["F"]
    if (E >= W and E % W) or (E < W and (W % E or F % (W // E))):
        return None
    return Layout(E, W, shape["H"], F, "concat", False, False)


def projection(tokens: int) -> list[dict]:
    rows = []
    for name, shape in SHAPES.items():
        for net, rates, L in (("nvlink", cost.NVLINK, None), ("infiniband", cost.INFINIBAND, 8)):
            for W in WORLDS:
                lay = _layout(shape, W)
                if lay is None:
                    continue
                per_node = W if L is None else L
                est = cost.project(lay, tokens, shape["k"], rates, per_node, itemsize=2, hierarchical=True)
                flat = cost.project(lay, tokens, shape["k"], rates, per_node, itemsize=2, hierarchical=False)
                best = min(est, key=est.get)
                rows.append({"shape": name, "network": net, "W": W, "auto": best,
                             **{f"{m}_ms": 1e3 * s for m, s in est.items()},
                             "expert_flat_ms": 1e3 * flat["expert"]})
    return rows


def print_projection(rows: list[dict], tokens: int) -> None:
    print(f"\nCost-model projection: {tokens} tokens per GPU, bf16, forward + backward of one MoE layer (ms); "
          "NVLink = every GPU on one NVLink domain, InfiniBand = 8 GPUs per node (hierarchical all-to-all; "
          "'flat' = one-level all-to-all)")
    for name in SHAPES:
        for net in ("nvlink", "infiniband"):
            sel = [r for r in rows if r["shape"] == name and r["network"] == net]
            print(f"\n  {name}, {net}")
            head = f"  {'GPUs':>6} {'expert':>9} {'data':>9} {'tensor':>9}"
            head += f" {'flat a2a':>9}" if net == "infiniband" else ""
            print(head + "   auto")
            for r in sel:
                t = f"{r['tensor_ms']:9.2f}" if "tensor_ms" in r else f"{'-':>9}"
                line = f"  {r['W']:>6} {r['expert_ms']:9.2f} {r['data_ms']:9.2f} {t}"
                line += f" {r['expert_flat_ms']:9.2f}" if net == "infiniband" else ""
                print(line + f"   {r['auto']}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SHAPES), 2, figsize=(12, 4.5 * len(SHAPES)), squeeze=False)
    for i, name in enumerate(SHAPES):
        for j, net in enumerate(("nvlink", "infiniband")):
            ax = axes[i][j]
            sel = [r for r in rows if r["shape"] == name and r["network"] == net]
            keys = ["expert", "data", "tensor"] + (["expert_flat"] if net == "infiniband" else [])
            for key in keys:
                pts = [(r["W"], r[f"{key}_ms"]) for r in sel if f"{key}_ms" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=key.replace("_flat", " (flat a2a)"))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("GPUs")
            ax.set_ylabel("ms per layer step (fwd + bwd)")
            ax.set_title(f"{name}\n{net}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank (measured part)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gpu-tokens", type=int, default=4096, help="tokens per GPU (projection)")
    ap.add_argument("--no-run", dest="run", action="store_false", help="skip the measured part")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                   "bench_parallel.png"),
                    help="where to write the projection plot ('' = none)")
    ap.add_argument("--json", default=None, help="also write all rows as JSON here")
    args = ap.parse_args()

    measured = run_measured(args) if args.run else []
    proj = projection(args.gpu_tokens)
    print_projection(proj, args.gpu_tokens)
    if args.plot:
        plot(proj, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": measured, "projection": proj}, f, indent=1)


if __name__ == "__main__":
    main()
