"""GPU check of the Triton MoE path (``moe_compile.codegen.triton_moe``): correctness, then a benchmark table.

Run on one H100 / H200 from the repository root (about 3 minutes, most of it kernel compilation and autotuning):

    PYTHONPATH=. python benchmarks/gpu_check.py            # correctness + benchmark table
    PYTHONPATH=. python benchmarks/gpu_check.py --quick    # skip the 16k-token Mixtral-8x7B shape

(a) correctness: forward (out, h, y) and backward (dx, d routing weights, dW1, dW2, db1, db2) of the Triton path
    in bfloat16 and float32 against the float64 torch path (``codegen.cpu``), as max |error| / max |reference|;
    also determinism (two runs bitwise equal), the atomic combine, and the routing kernel. Exits 1 if anything is
    off.
(b) benchmark: forward and forward+backward time, TFLOP/s (forward 2*T*k*3*H*F for SwiGLU, backward twice that),
    the fraction of a dense bf16 torch.matmul rate with the same FLOPs measured in the same run, and the
    torch._grouped_mm path (``codegen.cpu``, HF's grouped_mm style) for comparison. Printed as markdown.

``--dry-run`` runs the same code on CPU under TRITON_INTERPRET=1 at tiny sizes (checks this script, not speed).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

# (name, MoESpec kwargs, tokens, bias, w1 scale, dropped fraction, dtypes)
CHECKS = [
    ("concat-silu", dict(num_experts=8, top_k=2, hidden=256, ffn=384), 1000, False, 1.0, 0.0, ("bf16", "fp32")),
    ("concat-silu-dropped+bias", dict(num_experts=8, top_k=2, hidden=256, ffn=384), 600, True, 1.0, 0.25,
     ("bf16",)),
    ("interleaved-swiglu_oai+bias", dict(num_experts=4, top_k=2, hidden=256, ffn=192, activation="swiglu_oai",
                                         gate_layout="interleaved"), 700, True, 4.0, 0.0, ("bf16", "fp32")),
    ("none-gelu+bias", dict(num_experts=8, top_k=2, hidden=256, ffn=320, activation="gelu", gate_layout="none"),
     900, True, 1.0, 0.0, ("bf16",)),
    ("fine-grained", dict(num_experts=64, top_k=8, hidden=256, ffn=128), 2048, False, 1.0, 0.0, ("bf16",)),
    ("decode", dict(num_experts=8, top_k=2, hidden=256, ffn=384), 5, False, 1.0, 0.0, ("bf16",)),
]
TOL = {"bf16": 3e-2, "fp32": 2e-4}  # max |err| / max |ref|; fp32 runs with TF32 off (IEEE dots)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# (name, tokens, hidden, ffn, experts, top_k), all SwiGLU (concat gate/up), bf16, nn.Linear-layout weights
SHAPES = [
    ("mixtral-like small", 4096, 512, 1792, 8, 2),
    ("mixtral-like small", 16384, 512, 1792, 8, 2),
    ("fine-grained", 4096, 512, 256, 64, 8),
    ("mixtral-8x7B", 16384, 4096, 14336, 8, 2),
]


def rel_err(a, ref) -> float:
    if ref is None or ref.numel() == 0:
        return 0.0
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def make_inputs(tm, cpu, spec, T, dtype, device, bias=False, w1_scale=1.0, dropped=0.0, seed=0):
    """Weights in nn.Linear layout (w1 reaches the kernels as a transposed view), routing from tm.route."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, k, H, F = spec.num_experts, spec.top_k, spec.hidden, spec.ffn
    N = 2 * F if spec.gated else F
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    wts = cpu.Weights(rnd(E, N, H, scale=w1_scale * H**-0.5).transpose(1, 2), rnd(E, F, H, scale=F**-0.5),
                      rnd(E, N, scale=0.5) if bias else None, rnd(E, H, scale=0.5) if bias else None)
    w, idx = tm.route(torch.randn(T, E, generator=g, device=device), k, renormalize=True)
    if dropped:
        idx[torch.rand(T, k, generator=g, device=device) < dropped] = E
    return rnd(T, H), idx, w, wts, rnd(T, H)


def f64(cpu, wts):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return cpu.Weights(d(wts.w1), d(wts.w2), d(wts.b1), d(wts.b2))


def run_path(fwd, bwd, spec, x, idx, w, wts, grad):
    """Forward and backward of one path -> dict of named results. For the ATen path (``fwd`` is
    ``cpu.experts_forward``) y is saved as the unweighted expert outputs, as the Triton path saves it."""
    if getattr(fwd, "__module__", "").endswith("codegen.cpu"):
        out, (h, y) = fwd(spec, x, idx, w, wts, save_y=True)
        dx, dw, d = bwd(spec, grad, x, idx, w, wts, h)
    else:
        out, (h, y) = fwd(spec, x, idx, w, wts)
        dx, dw, d = bwd(spec, grad, x, idx, w, wts, h, y)
    return dict(out=out, h=h, y=y, dx=dx, dw=dw, dw1=d.w1, dw2=d.w2, db1=d.b1, db2=d.b2)


@contextlib.contextmanager
def first_config_only(tm):
    """Skip autotuning (each kernel runs its first, default config): correctness needs no tuning."""
    saved = [(k, k.configs) for k in tm._AUTOTUNED]
    for k, c in saved:
        k.configs = c[:1]
    try:
        yield
    finally:
        for k, c in saved:
            k.configs = c


def check_correctness(tm, cpu, MoESpec, device, dry) -> bool:
    print("## Correctness: max |err| / max |float64 reference|\n")
    names = ["out", "h", "y", "dx", "dw", "dw1", "dw2", "db1", "db2"]
    print("| case | dtype | " + " | ".join(names) + " | worst | torch path worst | ok |")
    print("|" + "---|" * (len(names) + 5))
    ok = True
    for name, kw, T, bias, w1_scale, dropped, dts in CHECKS:
        if dry:  # tiny sizes for the CPU interpreter
            kw = dict(kw, hidden=40, ffn=24, num_experts=min(kw["num_experts"], 8), top_k=min(kw["top_k"], 4))
            T = min(T, 24)
        spec = MoESpec(**kw)
        for dn in dts:
            dt = DTYPES[dn]
            x, idx, w, wts, grad = make_inputs(tm, cpu, spec, T, dt, device, bias, w1_scale, dropped)
            ref = run_path(cpu.experts_forward, cpu.experts_backward, spec, x.double(), idx, w.double(),
                           f64(cpu, wts), grad.double())
            got = run_path(tm.experts_forward, tm.experts_backward, spec, x, idx, w, wts, grad)
            errs = [rel_err(got[n], ref[n]) if ref[n] is not None else None for n in names]
            worst = max(e for e in errs if e is not None)
            try:  # the ATen path in the same dtype, for scale
                base = run_path(cpu.experts_forward, cpu.experts_backward, spec, x, idx, w, wts, grad)
                base_worst = f"{max(rel_err(base[n], ref[n]) for n in names if ref[n] is not None):.2e}"
            except Exception as exc:  # noqa: BLE001 - e.g. a dtype torch._grouped_mm lacks
                base_worst = f"n/a ({type(exc).__name__})"
            good = worst <= TOL[dn] and all(got[n].dtype == (w.dtype if n == "dw" else dt)
                                            for n in names if got[n] is not None)
            ok &= good
            cells = " | ".join("-" if e is None else f"{e:.1e}" for e in errs)
            print(f"| {name} | {dn} | {cells} | {worst:.1e} | {base_worst} | {'yes' if good else '**NO**'} |")

    # determinism (default combine) and the atomic combine
    spec = MoESpec(**dict(CHECKS[1][1], hidden=40, ffn=24) if dry else CHECKS[1][1])
    x, idx, w, wts, grad = make_inputs(tm, cpu, spec, 24 if dry else 600, torch.bfloat16, device, True, 1.0, 0.25)
    a = run_path(tm.experts_forward, tm.experts_backward, spec, x, idx, w, wts, grad)
    b = run_path(tm.experts_forward, tm.experts_backward, spec, x, idx, w, wts, grad)
    det = all(torch.equal(a[n], b[n]) for n in a if a[n] is not None)
    out_at, _ = tm.experts_forward(spec, x, idx, w, wts, deterministic=False)
    dx_at = tm.experts_backward(spec, grad, x, idx, w, wts, a["h"], a["y"], deterministic=False)[0]
    at_err = max(rel_err(out_at, a["out"]), rel_err(dx_at, a["dx"]))
    print(f"\ndeterministic (two runs bitwise equal): {det}; atomic combine vs default: {at_err:.1e}")
    ok &= det and at_err <= 2e-2

    # routing kernel against its torch reference (float32 logits: no ties)
    for label, E, k, kw in [("softmax top-2 renorm", 8, 2, dict(renormalize=True)),
                            ("deepseek-v3 sigmoid+bias, 8 groups", 256, 8,
                             dict(score="sigmoid", n_group=8, topk_group=4, renormalize=True, scaling=2.5))]:
        T = 64 if dry else 4096
        if dry:
            E = min(E, 64)
        g = torch.Generator(device=device).manual_seed(3)
        logits = torch.randn(T, E, generator=g, device=device)
        if "n_group" in kw:
            kw = dict(kw, bias=torch.randn(E, generator=g, device=device) * 0.1)
        wt, it = tm.route(logits, k, **kw)
        wr, ir = tm.route_reference(logits, k, **kw)
        mismatch = (it != ir).any(-1).float().mean().item()
        same = (it == ir).all(-1)
        werr = (wt[same] - wr[same]).abs().max().item() if same.any() else 0.0
        t_k = bench(lambda: tm.route(logits, k, **kw), device)
        t_r = bench(lambda: tm.route_reference(logits, k, **kw), device)
        print(f"route {label}: rows differing {mismatch:.1e}, weight err {werr:.1e}; "
              f"{t_k * 1e3:.0f} us vs torch {t_r * 1e3:.0f} us (T={T})")
        ok &= mismatch <= 1e-3 and werr <= 1e-5
    return ok


def bench(fn, device) -> float:
    """Milliseconds per call (median)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def dense_tflops(S, H, N, F, device, dry) -> float:
    """bf16 torch.matmul rate on the forward's dense equivalent: [S, H] @ [H, N] and [S, F] @ [F, H]."""
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    a1, b1 = torch.randn(S, H, device=device, dtype=dt), torch.randn(H, N, device=device, dtype=dt)
    a2, b2 = torch.randn(S, F, device=device, dtype=dt), torch.randn(F, H, device=device, dtype=dt)
    ms = bench(lambda: (a1 @ b1, a2 @ b2), device)
    return (2 * S * H * N + 2 * S * F * H) / ms / 1e9


def bench_shape(tm, cpu, MoESpec, device, dry, name, T, H, F, E, k) -> str:
    """One table row (its tensors are freed on return)."""
    spec = MoESpec(num_experts=E, top_k=k, hidden=H, ffn=F)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    x, idx, w, wts, grad = make_inputs(tm, cpu, spec, T, dt, device)
    flops = 2 * T * k * 3 * H * F
    _, (h, y) = tm.experts_forward(spec, x, idx, w, wts)  # compiles and autotunes
    tm.experts_backward(spec, grad, x, idx, w, wts, h, y)
    fwd = bench(lambda: tm.experts_forward(spec, x, idx, w, wts), device)
    bwd = bench(lambda: tm.experts_backward(spec, grad, x, idx, w, wts, h, y), device)
    try:
        _, (bh, by) = cpu.experts_forward(spec, x, idx, w, wts)
        b_fwd = bench(lambda: cpu.experts_forward(spec, x, idx, w, wts), device)
        b_bwd = bench(lambda: cpu.experts_backward(spec, grad, x, idx, w, wts, bh, by), device)
        base = f"{b_fwd:.3f} | {b_fwd + b_bwd:.3f} | {(b_fwd + b_bwd) / (fwd + bwd):.2f}x"
    except Exception as exc:  # noqa: BLE001
        base = f"n/a ({type(exc).__name__}) | - | -"
    dense = dense_tflops(T * k, H, 2 * F, F, device, dry)
    tf_f, tf_t = flops / fwd / 1e9, 3 * flops / (fwd + bwd) / 1e9
    return (f"| {name} | {T} | {H} | {F} | {E} | {k} | {fwd:.3f} | {fwd + bwd:.3f} | {tf_f:.0f} | {tf_t:.0f} "
            f"| {dense:.0f} | {100 * tf_f / dense:.0f}% | {100 * tf_t / dense:.0f}% | {base} |")


def benchmark(tm, cpu, MoESpec, device, dry, quick):
    print("\n## Benchmark: bf16, SwiGLU, forward and forward+backward (backward = 2x forward FLOPs)\n")
    print("| shape | T | H | F | E | k | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | dense bf16 TFLOP/s "
          "| fwd % dense | fwd+bwd % dense | grouped_mm fwd ms | grouped_mm fwd+bwd ms | triton speedup fwd+bwd |")
    print("|" + "---|" * 16)
    for name, T, H, F, E, k in SHAPES:
        if quick and H >= 4096:
            continue
        if dry:
            T, H, F, E, k = min(T, 64), 32, 48, min(E, 8), min(k, 4)
        print(bench_shape(tm, cpu, MoESpec, device, dry, name, T, H, F, E, k), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="skip the 16k-token Mixtral-8x7B shape")
    p.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1 at tiny sizes")
    args = p.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
        device = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU (H100 / H200); use --dry-run to exercise it on CPU")
    else:
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare IEEE dots
    from moe_compile.codegen import cpu
    from moe_compile.codegen import triton_moe as tm
    from moe_compile.spec import MoESpec

    if args.dry_run:
        tm.fix_old_interpreter()
    if device == "cuda" and not tm.is_available(torch.empty(1, device="cuda")):
        sys.exit("triton is not importable")
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreter dry run)'}\n")
    t0 = time.time()
    with first_config_only(tm):
        ok = check_correctness(tm, cpu, MoESpec, device, args.dry_run)
    print(f"\ncorrectness: {'PASS' if ok else 'FAIL'} ({time.time() - t0:.0f} s)")
    if not ok:
        sys.exit(1)
    t1 = time.time()
    benchmark(tm, cpu, MoESpec, device, args.dry_run, args.quick)
    print(f"\nbenchmark: {time.time() - t1:.0f} s (compilation and autotuning included); "
          f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
