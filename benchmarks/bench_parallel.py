"""Parallel modes: measured time and traffic per step on CPU (gloo), and the cost model's projection to GPUs.

    python benchmarks/bench_parallel.py                       # W = 2 and 4 on this machine, then the projection
    python benchmarks/bench_parallel.py --no-run              # the projection only (plot: benchmarks/out/)
    python benchmarks/bench_parallel.py --no-run --crossover  # the measured layout crossover (W = 2), projection

Part 1 runs one MoE layer (router + experts, forward + backward) on W gloo processes, for each parallel mode and
for "auto", and reports the time per step (slowest rank, median of --steps) and the bytes each rank sent per step.
The row marked ``*`` is the mode "auto" chose.

Part 1b (``--crossover``) measures where replicated experts stop paying: one MoE layer under DDP (compiled with
``backend="moe"``, forward + backward, slowest rank, median), for experts modules from small to large (``--sizes``,
E:H:F), at W = 2: plain DDP (the unparallelized model), replicated (``parallelize(mode="replicate")``), sharded in
``expert`` and in ``data`` mode, and ``parallelize(mode="auto", tokens_per_call=...)``, each as a time ratio to
plain DDP, with the layout auto chose and the cost model's estimates behind it.

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


# --------------------------------------------------------------------------------------------- part 1b: crossover
VARIANTS = ("plain", "replicated", "expert", "data", "auto")


def _one_step(run, model, x) -> float:
    """One timed forward + backward, the slowest rank's seconds."""
    model.zero_grad(set_to_none=True)
    dist.barrier()
    t0 = time.perf_counter()
    run(x).square().mean().backward()
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def crossover_worker(cfg: dict) -> list[dict]:
    """Per size: build the variants, compile and warm each up, then time them round-robin (one step of each per
    round, so that the machine's load drifts over all of them alike)."""
    import copy

    from torch.nn.parallel import DistributedDataParallel

    from moe_compile import parallel
    import parallel_harness as testing

    T, rows = cfg["tokens"], []
    for E, H, F in cfg["sizes"]:
        torch.manual_seed(0)
        base = testing.ToyMoE("stacked", E=E, H=H, F=F, k=cfg["k"], layers=1)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(dist.get_rank()))
        row = {"E": E, "H": H, "F": F, "MB": sum(p.numel() * 4 for p in base.blocks[0].experts.parameters()) / 1e6}
        cost.RATES.clear()  # auto measures the rates with this size's GEMM, as it would for a user's model
        built = {}
        for name, mode in (("plain", None), ("replicated", "replicate"), ("sharded", "expert"), ("auto", "auto")):
            model = copy.deepcopy(base)
            if mode is not None:
                parallel.parallelize(model, mode=mode, **({"tokens_per_call": T} if mode == "auto" else {}))
            run = DistributedDataParallel(model)
            if cfg["compiler"] != "none":
                torch.compiler.reset()  # a fresh cache per model: no recompile limit across the variants
                run = torch.compile(run, backend="moe", options={"compiler": cfg["compiler"]})
            built[name] = (run, model)
        plan = [(v, built["sharded" if v in ("expert", "data") else v], v if v in ("expert", "data") else None)
                for v in VARIANTS]
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for rnd in range(cfg["warmup"] + cfg["steps"]):
            for v, (run, model), mode in plan:
                if mode is not None:
                    parallel.set_parallel(model, mode)
                t = _one_step(run, model, x)
                if rnd >= cfg["warmup"]:
                    times[v].append(t)
        for v in VARIANTS:
            row[v] = 1e3 * statistics.median(times[v])
            row[v + "_min"] = 1e3 * min(times[v])
        rep = parallel.parallel_report(built["auto"][1])
        b = rep.blocks[0]
        row["auto_ran"] = "replicated" if b.layout == "replicated" else f"sharded, {b.last}"
        row["estimate"] = {m: 1e3 * v for m, v in b.layout_estimate.items()}
        row["rates"] = rep.rates
        rows.append(row)
    return rows


def run_crossover(args) -> list[dict]:
    from parallel_harness import WorkerPool

    cfg = dict(tokens=args.cross_tokens, k=args.k, sizes=args.sizes, compiler=args.compiler, warmup=2,
               steps=args.steps)
    with WorkerPool(2, timeout=1800) as pool:
        rows = pool.run(crossover_worker, cfg, timeout=1800)[0]
    print(f"\nCrossover at W = 2 (gloo, CPU, torch.compile(DDP(model), backend='moe', compiler {args.compiler})): "
          f"one MoE layer, {args.cross_tokens} tokens/rank, k={args.k}, forward + backward, {args.steps} rounds "
          "(slowest rank); ms and time / plain DDP's")
    for stat, key in (("median", ""), ("min", "_min")):
        print(f"\n  {stat} of the rounds:")
        head = f"  {'E':>4} {'H':>5} {'F':>5} {'experts MB':>10}  {'plain DDP':>9}"
        print(head + "".join(f"  {m:>16}" for m in VARIANTS[1:]) + "   auto chose")
        for r in rows:
            line = f"  {r['E']:>4} {r['H']:>5} {r['F']:>5} {r['MB']:>10.2f}  {r['plain' + key]:>9.1f}"
            for m in VARIANTS[1:]:
                line += f"  {r[m + key]:>8.1f} ({r[m + key] / r['plain' + key]:.2f}x)"
            print(line + f"   {r['auto_ran']}")
    print("\n  the cost model's estimates behind auto's choice (ms per forward + backward of the experts call) and "
          "the rates measured by parallelize:")
    print(f"  {'E':>4} {'H':>5} {'F':>5}  {'replicated':>10} {'expert':>10} {'data':>10}   rates")
    for r in rows:
        est = r["estimate"]
        print(f"  {r['E']:>4} {r['H']:>5} {r['F']:>5}  "
              + " ".join(f"{est[m]:>10.2f}" if m in est else f"{'-':>10}" for m in ("replicated", "expert", "data"))
              + f"   {r['rates']}")
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
                rep = cost.replicated_seconds(lay, tokens, shape["k"], rates, per_node, 2)
                rows.append({"shape": name, "network": net, "W": W,
                             "auto": "replicated" if rep < est[best] else best, "replicated_ms": 1e3 * rep,
                             **{f"{m}_ms": 1e3 * s for m, s in est.items()},
                             "expert_flat_ms": 1e3 * flat["expert"]})
    return rows


def print_projection(rows: list[dict], tokens: int) -> None:
    print(f"\nCost-model projection: {tokens} tokens per GPU, bf16, forward + backward of one MoE layer (ms); "
          "NVLink = every GPU on one NVLink domain, InfiniBand = 8 GPUs per node (hierarchical all-to-all; "
          "'flat' = one-level all-to-all); replicated = every GPU holds all experts, DDP all-reduces their "
          "gradients (auto's choice at parallelize time when cheapest)")
    for name in SHAPES:
        for net in ("nvlink", "infiniband"):
            sel = [r for r in rows if r["shape"] == name and r["network"] == net]
            print(f"\n  {name}, {net}")
            head = f"  {'GPUs':>6} {'replicated':>10} {'expert':>9} {'data':>9} {'tensor':>9}"
            head += f" {'flat a2a':>9}" if net == "infiniband" else ""
            print(head + "   auto")
            for r in sel:
                t = f"{r['tensor_ms']:9.2f}" if "tensor_ms" in r else f"{'-':>9}"
                line = f"  {r['W']:>6} {r['replicated_ms']:10.2f} {r['expert_ms']:9.2f} {r['data_ms']:9.2f} {t}"
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
            keys = ["replicated", "expert", "data", "tensor"] + (["expert_flat"] if net == "infiniband" else [])
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
    ap.add_argument("--crossover", action="store_true", help="measure the replicated / sharded crossover (W = 2)")
    ap.add_argument("--sizes", default="2:64:128,8:128:256,32:128:256,64:256:512,128:256:512",
                    type=lambda s: [tuple(int(v) for v in t.split(":")) for t in s.split(",")],
                    help="crossover experts sizes, E:H:F,...")
    ap.add_argument("--cross-tokens", type=int, default=256, help="tokens per rank (crossover)")
    ap.add_argument("--compiler", default="aot_eager", choices=["aot_eager", "inductor", "eager", "none"],
                    help="crossover: torch.compile(DDP(model), backend='moe') with this compiler ('none': eager)")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                   "bench_parallel.png"),
                    help="where to write the projection plot ('' = none)")
    ap.add_argument("--json", default=None, help="also write all rows as JSON here")
    args = ap.parse_args()

    measured = run_measured(args) if args.run else []
    crossover = run_crossover(args) if args.crossover else []
    proj = projection(args.gpu_tokens)
    print_projection(proj, args.gpu_tokens)
    if args.plot:
        plot(proj, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": measured, "crossover": crossover, "projection": proj}, f, indent=1)


if __name__ == "__main__":
    main()
