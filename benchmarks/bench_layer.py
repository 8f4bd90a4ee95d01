"""One MoE layer, forward + backward: HF transformers' implementations vs ``backend="moe"`` vs a dense floor.

Run from the repository root (fp32 on CPU by default; about 4-6 minutes on 2 cores, most of it the eager loop and
three inductor compiles per shape):

    PYTHONPATH=. python benchmarks/bench_layer.py                     # all shapes, 5 repetitions
    PYTHONPATH=. python benchmarks/bench_layer.py --quick             # small sizes: a smoke run (~1 minute)
    PYTHONPATH=. python benchmarks/bench_layer.py --shapes fine --reps 9
    PYTHONPATH=. python benchmarks/bench_layer.py --device cuda       # bf16 on a GPU

Variants, all on the same weights, input and output gradient:

1. ``hf_eager``      HF block, experts implementation ``eager`` (a Python loop over the experts that were hit)
2. ``hf_grouped_mm`` the same block, implementation ``grouped_mm`` (sort + grouped GEMM)
3. ``inductor``      ``torch.compile(block)`` of the ``grouped_mm`` block (inductor; moe_compile's capture off)
4. ``ours``          ``torch.compile(block, backend="moe")``: the experts module is captured and fused into
                     ``moe_compile::experts`` (checked with ``moe_compile.backend.last_regions``)
5. ``dense_floor``   one dense SwiGLU MLP (hidden H, ffn F) over tokens*k rows, plus the shared expert's MLP over
                     tokens rows where the shape has one: the same FLOPs as the layer's experts, no routing,
                     compiled by inductor. What an MoE layer would cost if dispatch were free.

Blocks: ``MixtralSparseMoeBlock`` built from a ``MixtralConfig``; for the DeepSeek-like shape ``DeepseekV3MoE``
(sigmoid router with group limit and score-correction bias, plus a shared expert). Every step is
``out = block(x); out.backward(g)`` with the gradients of x and of every parameter freshly allocated.

Method: compile and warm every variant up, check that ``ours`` equals ``hf_eager`` (output and input gradient,
max |err| / max |ref| <= 1e-4 in fp32), then time ``--reps`` repetitions with the variants interleaved (the order
rotates every repetition, so a burst of load from another process hits all variants alike) and report medians.
Peak memory is measured in a separate, untimed step per variant: on CUDA ``torch.cuda.max_memory_allocated`` minus
what was allocated before the step; on CPU the running sum of the allocations and frees that ``torch.profiler``
(``profile_memory=True``) records during the step (the CPU analogue: bytes held by tensors allocated inside the
step, above what existed before it; weights and the input are not counted, their gradients are).

Also printed per shape: where ``ours`` spends its time (one profiled step, ``torch.profiler``), broken down by the
ATen ops that run inside ``moe_compile::experts`` and ``moe_compile::experts_backward``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


@dataclass
class Shape:
    key: str
    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    k: int
    shared_ffn: int = 0  # DeepSeek-like: the shared expert's ffn (a DeepseekV3MoE block); 0: a Mixtral block
    n_group: int = 1
    topk_group: int = 1

    def label(self) -> str:
        s = f"{self.name} ({self.tokens}, {self.hidden}, {self.ffn}, {self.experts}, {self.k}"
        return s + (f", shared {self.shared_ffn})" if self.shared_ffn else ")")


SHAPES = {
    "mixtral": Shape("mixtral", "Mixtral-like", 4096, 512, 1024, 8, 2),
    "fine": Shape("fine", "fine-grained", 4096, 512, 256, 64, 8),
    "deepseek": Shape("deepseek", "DeepSeek-like", 4096, 512, 256, 64, 6, shared_ffn=512, n_group=8, topk_group=4),
}
QUICK = {
    "mixtral": Shape("mixtral", "Mixtral-like (quick)", 256, 64, 128, 8, 2),
    "fine": Shape("fine", "fine-grained (quick)", 256, 64, 32, 16, 4),
    "deepseek": Shape("deepseek", "DeepSeek-like (quick)", 256, 64, 32, 16, 4, shared_ffn=64, n_group=4,
                      topk_group=2),
}
VARIANTS = ["hf_eager", "hf_grouped_mm", "inductor", "ours", "dense_floor"]
LABELS = {
    "hf_eager": "HF eager loop",
    "hf_grouped_mm": "HF grouped_mm",
    "inductor": "inductor(HF grouped_mm)",
    "ours": "ours (backend=moe)",
    "dense_floor": "dense floor",
}


# ------------------------------------------------------------------------------------------------ building
def build_block(shape: Shape, impl: str, dtype, device, seed: int = 0) -> nn.Module:
    """An HF MoE block of ``shape`` with experts implementation ``impl`` and random weights (seeded)."""
    if shape.shared_ffn:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        if shape.shared_ffn % shape.ffn:
            raise ValueError("the shared expert's ffn must be a multiple of ffn (n_shared_experts * ffn)")
        cfg = DeepseekV3Config(hidden_size=shape.hidden, moe_intermediate_size=shape.ffn, intermediate_size=4 * shape.hidden,
                               n_routed_experts=shape.experts, num_experts_per_tok=shape.k,
                               n_shared_experts=shape.shared_ffn // shape.ffn, n_group=shape.n_group,
                               topk_group=shape.topk_group, norm_topk_prob=True, routed_scaling_factor=2.5,
                               hidden_act="silu")
        cfg._experts_implementation = impl
        block = DeepseekV3MoE(cfg)
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn, num_local_experts=shape.experts,
                            num_experts_per_tok=shape.k, router_jitter_noise=0.0, hidden_act="silu")
        cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():  # [.., out, in] layouts: std 1/sqrt(in)
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for b in block.buffers():  # DeepSeek's e_score_correction_bias: non-zero so its path is exercised
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return block.to(device=device, dtype=dtype).train()


def set_impl(block: nn.Module, impl: str) -> nn.Module:
    block.experts.config._experts_implementation = impl
    if getattr(block, "config", None) is not None:
        block.config._experts_implementation = impl
    return block


class DenseFloor(nn.Module):
    """One SwiGLU MLP over tokens*k rows (hidden H, ffn F), plus the shared expert's MLP over tokens rows."""

    def __init__(self, shape: Shape):
        super().__init__()
        H, Fh = shape.hidden, shape.ffn
        self.w1 = nn.Linear(H, 2 * Fh, bias=False)
        self.w2 = nn.Linear(Fh, H, bias=False)
        self.shared = shape.shared_ffn
        if self.shared:
            self.s1 = nn.Linear(H, 2 * self.shared, bias=False)
            self.s2 = nn.Linear(self.shared, H, bias=False)

    @staticmethod
    def _mlp(x, w1, w2):
        gate, up = w1(x).chunk(2, dim=-1)
        return w2(F.silu(gate) * up)

    def forward(self, xk, x):
        out = self._mlp(xk, self.w1, self.w2)
        if self.shared:
            return out, self._mlp(x, self.s1, self.s2)
        return (out,)


# ------------------------------------------------------------------------------------------------ variants
@dataclass
class Variant:
    name: str
    module: nn.Module
    inputs: list[torch.Tensor]  # leaves with requires_grad
    grads: list[torch.Tensor]  # output gradients, one per output
    capture: bool = True  # moe_compile.capture.ENABLED while this variant runs (traces)
    params: list[nn.Parameter] = field(default_factory=list)

    def __post_init__(self):
        self.params = list(self.module.parameters())

    def step(self):
        """forward + backward with fresh gradients; returns (outputs, input gradients)."""
        import moe_compile.capture as capture

        capture.ENABLED = self.capture
        for t in self.inputs:
            t.grad = None
        for p in self.params:
            p.grad = None
        outs = self.module(*self.inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(list(outs), self.grads)
        return outs, [t.grad for t in self.inputs]


def make_variants(shape: Shape, dtype, device) -> tuple[dict[str, Variant], nn.Module]:
    torch.manual_seed(1)
    x = torch.randn(1, shape.tokens, shape.hidden, device=device, dtype=dtype)
    g = torch.randn(1, shape.tokens, shape.hidden, device=device, dtype=dtype)
    base = build_block(shape, "eager", dtype, device)

    def leaf():
        return x.detach().clone().requires_grad_(True)

    v = {}
    v["hf_eager"] = Variant("hf_eager", base, [leaf()], [g])
    v["hf_grouped_mm"] = Variant("hf_grouped_mm", set_impl(copy.deepcopy(base), "grouped_mm"), [leaf()], [g])
    ind = set_impl(copy.deepcopy(base), "grouped_mm")
    v["inductor"] = Variant("inductor", torch.compile(ind), [leaf()], [g], capture=False)
    v["inductor"].params = list(ind.parameters())
    ours = set_impl(copy.deepcopy(base), "grouped_mm")
    v["ours"] = Variant("ours", torch.compile(ours, backend="moe"), [leaf()], [g])
    v["ours"].params = list(ours.parameters())

    dense = DenseFloor(shape).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(std=p.shape[-1] ** -0.5)
    xk = torch.randn(shape.tokens * shape.k, shape.hidden, device=device, dtype=dtype, requires_grad=True)
    gk = torch.randn(shape.tokens * shape.k, shape.hidden, device=device, dtype=dtype)
    xs = x[0].detach().clone().requires_grad_(True)
    grads = [gk, g[0]] if shape.shared_ffn else [gk]
    v["dense_floor"] = Variant("dense_floor", torch.compile(dense), [xk, xs], grads)
    v["dense_floor"].params = list(dense.parameters())
    return v, ours


# ------------------------------------------------------------------------------------------------ measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process, all its threads)


def timed(var: Variant, device) -> float:
    sync(device)
    t0 = CLOCK()
    var.step()
    sync(device)
    return (CLOCK() - t0) * 1e3


def peak_memory(var: Variant, device) -> float:
    """Peak bytes allocated during one step above what existed before it (see the module docstring)."""
    if device.type == "cuda":
        var.step()
        for t in var.inputs:
            t.grad = None
        for p in var.params:
            p.grad = None
        gc.collect()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        var.step()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    var.step()  # the same state as a timed step: the previous step's gradients exist, then are dropped here
    for t in var.inputs:
        t.grad = None
    for p in var.params:
        p.grad = None
    gc.collect()
    # ours reuses its CPU temporaries across steps (kernels.aten.WORKSPACE): free them first, so that the step
    # allocates them again and they count, as held memory, from their allocation to the end of the step
    from moe_compile.kernels import aten as moe_cpu

    moe_cpu.release_workspace()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        var.step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return float(peak)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def profile_ours(var: Variant, device, top: int = 12) -> str:
    """Where one forward+backward of ``ours`` spends its time: per-op self time inside the moe_compile ops, and
    the top ops of the whole step."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        var.step()
        sync(device)
    evs = prof.events()
    total_us = sum(e.self_cpu_time_total for e in evs)
    lines = []
    for opname in ("moe_compile::experts", "moe_compile::experts_backward"):
        roots = [e for e in evs if e.name == opname]
        if not roots:
            lines.append(f"  {opname}: not called")
            continue
        per_op: dict[str, float] = {}

        def walk(e):
            for c in e.cpu_children:
                per_op[c.name] = per_op.get(c.name, 0.0) + c.self_cpu_time_total
                walk(c)

        for r in roots:
            per_op[f"(self {opname})"] = per_op.get(f"(self {opname})", 0.0) + r.self_cpu_time_total
            walk(r)
        tot = sum(r.cpu_time_total for r in roots)
        lines.append(f"  {opname}: {tot / 1e3:.1f} ms total ({len(roots)} call(s)); inside it, self time by op:")
        for name, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {name:<44} {us / 1e3:8.1f} ms  {100 * us / max(tot, 1e-9):5.1f}%")
    lines.append(f"  whole step, top ops by self CPU time (sum of self times {total_us / 1e3:.1f} ms):")
    ka = sorted(prof.key_averages(), key=lambda k: -k.self_cpu_time_total)[:top]
    for k in ka:
        lines.append(f"    {k.key:<44} {k.self_cpu_time_total / 1e3:8.1f} ms  x{k.count}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ one shape
def run_shape(shape: Shape, args, dtype, device) -> dict:
    import moe_compile
    import moe_compile.backend

    tol = 1e-4 if dtype == torch.float32 else 3e-2
    print(f"\n## {shape.label()}  [{dtype}, {device}]", flush=True)
    torch.compiler.reset()
    variants, ours_block = make_variants(shape, dtype, device)

    # compile + warm up; ours first, so last_regions is its graph's
    t0 = time.perf_counter()
    outs_ours, grads_ours = variants["ours"].step()
    regions = list(moe_compile.backend.last_regions)
    print(f"ours compiled in {time.perf_counter() - t0:.1f} s; last_regions:")
    for r in regions:
        print(f"  {r.module_path}: pattern={r.pattern} fused={r.fused} {r.reason}")
    fused = any(r.fused for r in regions)
    if not fused:
        print("  ERROR: the experts were not fused")
    for name in ("inductor", "dense_floor"):
        t0 = time.perf_counter()
        variants[name].step()
        print(f"{name} compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    for name in VARIANTS:  # second warm-up call for all (the compiled ones may specialise once more)
        variants[name].step()

    # correctness: ours (and the other HF variants) against HF eager
    outs_ref, grads_ref = variants["hf_eager"].step()
    outs_ours, grads_ours = variants["ours"].step()
    errs = {"out": rel_err(outs_ours[0], outs_ref[0]), "dx": rel_err(grads_ours[0], grads_ref[0])}
    ref_params = dict(variants["hf_eager"].module.named_parameters())
    errs["dW (max over params)"] = max(rel_err(p.grad, ref_params[n].grad)
                                       for n, p in ours_block.named_parameters() if p.grad is not None)
    ok = fused and errs["out"] <= tol and errs["dx"] <= tol
    print("ours vs HF eager, max|err|/max|ref|: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + f"  (tolerance {tol:g} on out and dx) -> {'OK' if ok else 'FAIL'}")
    for name in ("hf_grouped_mm", "inductor"):
        o, gx = variants[name].step()
        print(f"  ({name} vs HF eager: out {rel_err(o[0], outs_ref[0]):.2e}, dx {rel_err(gx[0], grads_ref[0]):.2e})")

    # timing, interleaved
    times = {n: [] for n in VARIANTS}
    reps = range(args.reps)
    if tqdm is not None:
        reps = tqdm(reps, desc=f"{shape.key} reps", leave=False, file=sys.stdout)
    for i in reps:
        order = VARIANTS[i % len(VARIANTS):] + VARIANTS[: i % len(VARIANTS)]
        for name in order:
            times[name].append(timed(variants[name], device))
    med = {n: statistics.median(t) for n, t in times.items()}
    print("median ms: " + ", ".join(f"{n} {med[n]:.1f} [{min(times[n]):.0f}-{max(times[n]):.0f}]" for n in VARIANTS))

    prof = None
    if not args.no_profile:  # (before the memory step, which frees ours' reused temporaries)
        prof = profile_ours(variants["ours"], device)
        print("profile of ours (one forward+backward, torch.profiler):\n" + prof, flush=True)
    mem = {n: peak_memory(variants[n], device) for n in VARIANTS}
    capture_reset()
    return dict(shape=shape, med=med, times=times, mem=mem, errs=errs, ok=ok, regions=regions, profile=prof)


def capture_reset():
    import moe_compile.capture as capture

    capture.ENABLED = True


# ------------------------------------------------------------------------------------------------ report
def fmt_table(results: list[dict], device) -> str:
    rows = []
    head = ["shape"] + [LABELS[n] + " ms" for n in VARIANTS] + [
        "dense-floor/ours", "best(HF gmm, inductor)/ours", "HF eager/ours"]
    rows.append("| " + " | ".join(head) + " |")
    rows.append("|" + "---|" * len(head))
    for r in results:
        m = r["med"]
        lo = {n: min(t) for n, t in r["times"].items()}

        def ratios(num):
            return f"{num(m) / m['ours']:.2f} ({num(lo) / lo['ours']:.2f})"

        cells = [r["shape"].label()] + [f"{m[n]:.0f} ({lo[n]:.0f})" for n in VARIANTS] + [
            ratios(lambda d: d["dense_floor"]),
            ratios(lambda d: min(d["hf_grouped_mm"], d["inductor"])),
            ratios(lambda d: d["hf_eager"]),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("Times: median (min) ms over the repetitions; ratios: from the medians (from the mins).")
    how = ("torch.cuda.max_memory_allocated during one step, above the allocation before it"
           if device.type == "cuda" else
           "torch.profiler profile_memory=True: peak of the running sum of CPU allocations minus frees during one "
           "step (tensors created inside the step: activations, outputs, gradients; not weights or inputs)")
    rows.append("")
    rows.append(f"Peak memory, MiB ({how}):")
    rows.append("")
    head = ["shape"] + [LABELS[n] for n in VARIANTS] + ["ours/HF grouped_mm"]
    rows.append("| " + " | ".join(head) + " |")
    rows.append("|" + "---|" * len(head))
    for r in results:
        mm = r["mem"]
        cells = [r["shape"].label()] + [f"{mm[n] / 2**20:.0f}" for n in VARIANTS] + [
            f"{mm['ours'] / max(mm['hf_grouped_mm'], 1):.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 3.2 * len(results)), 4.5))
    width = 0.8 / len(VARIANTS)
    for j, name in enumerate(VARIANTS):
        xs = [i + (j - (len(VARIANTS) - 1) / 2) * width for i in range(len(results))]
        ys = [r["med"][name] for r in results]
        bars = ax.bar(xs, ys, width, label=LABELS[name])
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:.0f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([r["shape"].label().replace(" (", "\n(") for r in results], fontsize=8)
    ax.set_ylabel("median ms, forward + backward")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="mixtral,fine,deepseek",
                   help=f"comma-separated, from {sorted(SHAPES)} (default: all)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 5; 2 with --quick)")
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="override the device's default dtype")
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions: a smoke run")
    p.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "bench_layer.png"),
                   help="bar chart path (default benchmarks/out/bench_layer.png); '' for none")
    p.add_argument("--no-profile", action="store_true", help="skip the profile of ours")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: time.perf_counter (default); cpu: time.process_time, the CPU time of this process, "
                        "which other processes' load barely changes (use with --threads 1 on a busy machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.device != "cpu":
            p.error("--clock cpu is for --device cpu")
        global CLOCK
        CLOCK = time.process_time

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    table = QUICK if args.quick else SHAPES
    keys = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in keys if s not in table]
    if bad:
        p.error(f"unknown shapes {bad}; choose from {sorted(table)}")
    if args.reps is None:
        args.reps = 2 if args.quick else 5

    import transformers

    import moe_compile  # noqa: F401  (registers the ops; the "moe" backend)

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    try:
        load = os.getloadavg()
        machine += f", load average at start {load[0]:.1f}"
    except OSError:
        pass
    print(f"# bench_layer: torch {torch.__version__}, transformers {transformers.__version__}, {machine}, "
          f"{dtype}, reps {args.reps}, {args.clock} clock, {time.strftime('%Y-%m-%d %H:%M')}")

    t_start = time.perf_counter()
    results = [run_shape(table[k], args, dtype, device) for k in keys]
    print(f"\n# Results (median of {args.reps} interleaved repetitions, forward + backward, {dtype}, {machine}, "
          f"{'CPU-time' if args.clock == 'cpu' else 'wall'} clock; "
          f"total run {time.perf_counter() - t_start:.0f} s)\n")
    print(fmt_table(results, device))
    if args.png:
        plot(results, args.png, f"one MoE layer fwd+bwd, {dtype}, {machine}, {args.clock} clock, "
                               f"torch {torch.__version__}")
    failed = [r["shape"].key for r in results if not r["ok"]]
    if failed:
        print(f"\nCORRECTNESS FAILED for {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
