"""GPU check of the Triton kernel backend (``moe_compile/kernels/triton``): every op and parallel mode on the Triton
path against eager torch, then a benchmark table. One prepared run on one H100 / H200, from the repository root:

    PYTHONPATH=. python benchmarks/gpu_check.py            # everything (estimated 5-7 minutes on an H200)
    PYTHONPATH=. python benchmarks/gpu_check.py --quick    # bf16-only config sweep, Mixtral-like at half its ffn
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run  # CPU, TRITON_INTERPRET=1, tiny shapes (checks the script)

Sections, each a markdown table (``benchmarks/README.md`` says what each compares): 1. kernels vs the ATen backend
in float64, every GPU autotuning config forced once; 2. the ops under ``kernels.use("triton")`` vs eager torch, and
an HF Mixtral block under ``torch.compile(backend="moe")`` vs eager; 3. expert / data / tensor modes at W = 2 (two
gloo processes on the one GPU) vs one process; 4. bf16 at 16k tokens: expert-GEMM TFLOP/s and their fraction of a
dense bf16 ``torch.mm`` rate measured in the same run, and the layer forward+backward vs HF ``grouped_mm``. The report
goes to ``$OUT/gpu_check.md`` when ``OUT`` is set (or ``--report``), line by line, so a run cut short keeps what it
printed; past ``--budget`` seconds the remaining config sweeps and benchmark shapes are skipped (and say so). Exits 1
if any check fails. ``--dry-run`` replaces inductor by aot_eager for the rest of the compiled graph (compile time).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]  # bench_layer; parallel_harness, models

KERNEL_TOL = {"fp32": 2e-5, "bf16": 3e-2}  # vs float64 on the same rounded inputs (tests/test_triton_kernels.py)
EAGER_TOL = {"fp32": 1e-4, "bf16": 5e-2}  # vs eager torch in the same dtype: both round, so up to twice the above
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
REPORT: list[str] = []
RUN = {"path": None, "t0": time.time(), "budget": 540.0}  # report file (written line by line), time budget


def say(line: str = "") -> None:
    """Print a report line and append it to the report file at once (a run cut short keeps what it printed)."""
    print(line, flush=True)
    REPORT.append(line)
    if RUN["path"]:
        with open(RUN["path"], "a") as f:
            f.write(line + "\n")


def over_budget(what: str, need: float) -> bool:
    """True (and says so) when fewer than ``need`` seconds of the run's budget are left for ``what``."""
    left = RUN["budget"] - (time.time() - RUN["t0"])
    if left < need:
        say(f"| {what} | skipped: {left:.0f} s of the {RUN['budget']:.0f} s budget left (--budget) |")
        return True
    return False


def rel_err(a, ref) -> float:
    """max |a - ref| / max |ref| of one tensor (0 for empty; inf if ref is zero and a is not)."""
    if ref is None or ref.numel() == 0:
        return 0.0
    err = (a.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return err / scale if scale else (0.0 if err == 0 else float("inf"))


def table(header: list[str]) -> None:
    say("| " + " | ".join(header) + " |")
    say("|" + "---|" * len(header))


# ============================================================================================ 1. kernels
# (name, MoESpec kwargs, tokens, bias, w1 scale, dropped fraction, dtypes)
CHECKS = [
    ("concat-silu", dict(num_experts=8, top_k=2, hidden=256, ffn=384), 1000, False, 1.0, 0.0, ("bf16", "fp32")),
    ("concat-silu-dropped+bias", dict(num_experts=8, top_k=2, hidden=256, ffn=384), 600, True, 1.0, 0.25,
     ("bf16", "fp32")),
    ("separate-gelu_tanh+bias", dict(num_experts=6, top_k=2, hidden=192, ffn=160, activation="gelu_tanh",
                                     gate_layout="separate"), 500, True, 1.0, 0.0, ("bf16", "fp32")),
    ("interleaved-swiglu_oai+bias", dict(num_experts=4, top_k=2, hidden=256, ffn=192, activation="swiglu_oai",
                                         gate_layout="interleaved"), 700, True, 1.0, 0.0, ("bf16", "fp32")),
    ("none-gelu+bias", dict(num_experts=8, top_k=2, hidden=256, ffn=320, activation="gelu", gate_layout="none"),
     900, True, 1.0, 0.0, ("bf16", "fp32")),
    ("fine-grained", dict(num_experts=64, top_k=8, hidden=256, ffn=128), 2048, False, 1.0, 0.0, ("bf16",)),
    ("decode", dict(num_experts=8, top_k=2, hidden=256, ffn=384), 5, False, 1.0, 0.0, ("bf16",)),
]
NAMES = ["out", "h", "y", "dx", "dw", "dw1", "dw2", "db1", "db2"]


def route(logits: torch.Tensor, k: int):
    """Softmax top-k, renormalised (plain torch): ``(weights, ids)``."""
    w, idx = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1)
    return w / w.sum(-1, keepdim=True), idx


def make_inputs(common, spec, T, dtype, device, bias=False, w1_scale=1.0, dropped=0.0, seed=0):
    """Weights in nn.Linear layout (w1 reaches the kernels as a transposed view), softmax top-k routing."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, k, H, F = spec.num_experts, spec.top_k, spec.hidden, spec.ffn
    N = 2 * F if spec.gated else F
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    wts = common.Weights(rnd(E, N, H, scale=w1_scale * H**-0.5).transpose(1, 2), rnd(E, F, H, scale=F**-0.5),
                         rnd(E, N, scale=0.5) if bias else None, rnd(E, H, scale=0.5) if bias else None)
    w, idx = route(torch.randn(T, E, generator=g, device=device), k)
    if dropped:
        idx[torch.rand(T, k, generator=g, device=device) < dropped] = E
    return rnd(T, H), idx, w.to(dtype), wts, rnd(T, H)


def cast(common, wts, dtype):
    return common.Weights(*(None if t is None else t.to(dtype) for t in (wts.w1, wts.w2, wts.b1, wts.b2)))


def run_launchers(launch, spec, x, idx, w, wts, grad, aten=None) -> dict:
    """Forward + backward of the Triton launchers (or of the ATen backend ``aten``, saving y as Triton does)."""
    out, (h, y) = (aten.experts_forward(spec, x, idx, w, wts, save_y=True) if aten else
                   launch.experts_forward(spec, x, idx, w, wts))
    dx, dw, d = (aten.experts_backward(spec, grad, x, idx, w, wts, h) if aten else
                 launch.experts_backward(spec, grad, x, idx, w, wts, h, y))
    return dict(out=out, h=h, y=y, dx=dx, dw=dw, dw1=d.w1, dw2=d.w2, db1=d.b1, db2=d.b2)


def kernel_row(m, spec, T, dn, device, bias, w1_scale, dropped, label) -> bool:
    x, idx, w, wts, grad = make_inputs(m.common, spec, T, DTYPES[dn], device, bias, w1_scale, dropped)
    ref = run_launchers(None, spec, x.double(), idx, w.double(), cast(m.common, wts, torch.float64), grad.double(),
                        aten=m.aten)
    got = run_launchers(m.launch, spec, x, idx, w, wts, grad)
    errs = [rel_err(got[n], ref[n]) if ref[n] is not None else None for n in NAMES]
    worst = max(e for e in errs if e is not None)
    good = worst <= KERNEL_TOL[dn] and all(got[n].dtype == (w.dtype if n == "dw" else DTYPES[dn])
                                           for n in NAMES if got[n] is not None)
    cells = " | ".join("-" if e is None else f"{e:.1e}" for e in errs)
    say(f"| {label} | {dn} | {cells} | {worst:.1e} | {'yes' if good else '**NO**'} |")
    return good


def check_kernels(m, device, dry, quick) -> bool:
    say("## 1. Kernels vs the ATen backend in float64: max |err| / max |ref| per tensor\n")
    table(["case", "dtype", *NAMES, "worst", "ok"])
    ok = True
    with m.tk.forced_configs(None):  # each kernel's default config: correctness needs no tuning
        for name, kw, T, bias, w1_scale, dropped, dts in CHECKS:
            if dry:
                kw = dict(kw, hidden=40, ffn=24, num_experts=min(kw["num_experts"], 8), top_k=min(kw["top_k"], 4))
                T = min(T, 24)
            for dn in dts:
                ok &= kernel_row(m, m.MoESpec(**kw), T, dn, device, bias, w1_scale, dropped, name)
    # every config the autotuner can pick, at a shape with several blocks (and a partial one) in every dimension
    # (the dry run: small blocks' worth only, in the interpreter's time; tests/test_triton_kernels.py runs every
    # config there at the full block sizes)
    kw = dict(num_experts=4, top_k=2, hidden=72 if dry else 520, ffn=40 if dry else 392, has_bias=True)
    n_cfg = max(len(rows) for rows, _ in m.tk.GPU_TABLES)
    for i in range(n_cfg):
        if over_budget(f"GPU config {i}", 300):
            continue
        with m.tk.forced_configs(i):
            blocks = "; ".join(f"{c.kwargs}" for c in [k.configs[0] for k in m.tk.AUTOTUNED][::2])
            for dn in ("fp32",) if dry else ("bf16",) if quick else ("bf16", "fp32"):
                try:
                    ok &= kernel_row(m, m.MoESpec(**kw), 40 if dry else 1500, dn, device, True, 1.0, 0.1,
                                     f"GPU config {i} ({blocks})")
                except m.OutOfResources as exc:  # the autotuner skips such a config the same way
                    say(f"| GPU config {i} ({blocks}) | {dn} | skipped: {exc} (the autotuner skips it too) |")
    # determinism of the default combine, and the atomic combine
    spec = m.MoESpec(**dict(CHECKS[1][1], hidden=40, ffn=24) if dry else CHECKS[1][1])
    x, idx, w, wts, grad = make_inputs(m.common, spec, 24 if dry else 600, torch.bfloat16, device, True, 1.0, 0.25)
    a = run_launchers(m.launch, spec, x, idx, w, wts, grad)
    b = run_launchers(m.launch, spec, x, idx, w, wts, grad)
    det = all(torch.equal(a[n], b[n]) for n in a if a[n] is not None)
    out_at, _ = m.launch.experts_forward(spec, x, idx, w, wts, deterministic=False)
    dx_at = m.launch.experts_backward(spec, grad, x, idx, w, wts, a["h"], a["y"], deterministic=False)[0]
    at_err = max(rel_err(out_at, a["out"]), rel_err(dx_at, a["dx"]))
    say(f"\ndeterministic (two runs bitwise equal): {det}; atomic combine vs default: {at_err:.1e}")
    return ok and det and at_err <= KERNEL_TOL["bf16"]


# ============================================================================================ 2. ops and a model
@contextlib.contextmanager
def count_triton(kernels):
    """Counts the Triton backend's forward and backward calls within the block."""
    b, calls = kernels.by_name("triton"), {"forward": 0, "backward": 0}
    for n in calls:
        setattr(b, n, lambda *a, _n=n, _f=getattr(b, n), **kw: (calls.__setitem__(_n, calls[_n] + 1), _f(*a, **kw))[1])
    try:
        yield calls
    finally:
        for n in calls:
            delattr(b, n)


def op_weights(spec, g, device):
    """The op's weight lists (stacked or per expert, out_in or in_out, separate gate), float32 masters."""
    E, H, F = spec.num_experts, spec.hidden, spec.ffn
    n_up = 2 * F if spec.gated and spec.gate_layout != "separate" else F

    def w(n_out, n_in):
        shape = (n_out, n_in) if spec.weight_layout == "out_in" else (n_in, n_out)
        t = torch.randn(E, *shape, generator=g, device=device) * n_in ** -0.5
        return [t] if spec.stacked else list(t.unbind(0))

    def b(n):
        t = torch.randn(E, n, generator=g, device=device) * 0.3
        return ([t] if spec.stacked else list(t.unbind(0))) if spec.has_bias else []

    sep = spec.gate_layout == "separate"
    return [w(F, H) if sep else [], w(n_up, H), w(H, F), b(F) if sep else [], b(n_up), b(H)]


OP_SPECS = [
    ("experts concat-silu", dict(num_experts=8, top_k=2, hidden=128, ffn=96)),
    ("experts concat-silu in_out+bias", dict(num_experts=8, top_k=2, hidden=128, ffn=96, weight_layout="in_out",
                                             has_bias=True)),
    ("experts separate-gelu list+bias", dict(num_experts=4, top_k=2, hidden=96, ffn=64, activation="gelu",
                                             gate_layout="separate", stacked=False, has_bias=True)),
    ("experts interleaved-swiglu_oai+bias", dict(num_experts=4, top_k=2, hidden=96, ffn=64, activation="swiglu_oai",
                                                 gate_layout="interleaved", has_bias=True)),
    ("experts none-gelu+bias k=1", dict(num_experts=4, top_k=1, hidden=96, ffn=160, activation="gelu",
                                        gate_layout="none", has_bias=True)),
]


def grads_of(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs, grad.to(out.dtype))


def op_row(m, label, fn, ref_fn, inputs, grad, dn) -> bool:
    """``fn`` on Triton in dtype ``dn`` vs ``ref_fn`` (eager torch) in float64 on the same rounded inputs."""
    dt = DTYPES[dn]
    inputs = [t.to(dt) for t in inputs]
    with count_triton(m.kernels) as calls, m.kernels.use("triton"):
        out, grads = grads_of(fn, inputs, grad)
    ref, ref_grads = grads_of(ref_fn, [t.double() for t in inputs], grad.double())
    errs = [rel_err(out, ref)] + [rel_err(a, r) for a, r in zip(grads, ref_grads)]
    ran = calls["forward"] >= 1 and calls["backward"] >= 1
    good = max(errs) <= KERNEL_TOL[dn] and out.dtype == dt and ran
    say(f"| {label} | {dn} | {errs[0]:.1e} | {max(errs[1:]):.1e} ({len(errs) - 1} tensors) | "
        f"{calls['forward']}/{calls['backward']} | {'yes' if good else '**NO**'} |")
    return good


def check_ops(m, device, dry) -> bool:
    say("\n## 2. Ops on kernels.use('triton') vs eager torch in float64, forward and every gradient\n")
    table(["op", "dtype", "out", "worst gradient", "Triton fwd/bwd calls", "ok"])
    ok = True
    g = torch.Generator(device=device).manual_seed(11)
    T = 24 if dry else 128
    for label, kw in OP_SPECS:
        if dry:
            kw = dict(kw, hidden=24, ffn=16)
        spec = m.MoESpec(**kw)
        lists = op_weights(spec, g, device)
        sizes = [len(l) for l in lists]
        idx = torch.rand(T, spec.num_experts, generator=g, device=device).argsort(1)[:, :spec.top_k]
        idx[torch.rand(T, spec.top_k, generator=g, device=device) < 0.2] = spec.num_experts  # dropped pairs
        x, grad = (torch.randn(T, spec.hidden, generator=g, device=device) for _ in range(2))
        w = torch.rand(T, spec.top_k, generator=g, device=device)

        def split(flat):
            ends = [sum(sizes[: j + 1]) for j in range(len(sizes))]
            return [list(flat[e - n: e]) for n, e in zip(sizes, ends)]

        def fn(x_, w_, *flat):
            return torch.ops.moe_compile.experts(x_, idx, w_, *split(flat), spec.to_json())[0]

        def ref(x_, w_, *flat):  # the definition, one token at a time
            return m.common.reference_experts(spec, x_, idx, w_, m.common.canonical_weights(spec, *split(flat)))

        for dn in ("fp32", "bf16"):
            ok &= op_row(m, label, fn, ref, [x, w, *[t for l in lists for t in l]], grad, dn)
    ok &= check_slots(m, device, g, dry)
    ok &= check_dispatch_combine(m, device, g, dry)
    return ok


def check_slots(m, device, g, dry) -> bool:
    from moe_compile.passes.gshard import topk_to_slots

    spec = m.MoESpec(num_experts=4, top_k=4, hidden=24 if dry else 96, ffn=16 if dry else 64, activation="gelu",
                     gate_layout="none", has_bias=True)
    S, E = (20, 4) if dry else (256, 4)
    C = S * 2 // E - 3  # fewer slots than choices: capacity drops
    idx = torch.rand(S, E, generator=g, device=device).argsort(-1)[:, :2]
    dispatch, combine = topk_to_slots(idx, torch.rand(S, 2, generator=g, device=device), E, C)
    _, up, down, _, bu, bd = op_weights(spec, g, device)
    x, grad = (torch.randn(S, spec.hidden, generator=g, device=device) for _ in range(2))

    def fn(x_, c_, u, d, b_u, b_d):
        return torch.ops.moe_compile.experts_slots(x_, dispatch.to(x_.dtype), c_, [], [u], [d], [], [b_u], [b_d],
                                                   spec.to_json())[0]

    def ref(x_, c_, u, d, b_u, b_d):  # GShard's dense formula
        h = torch.bmm(torch.einsum("sec,sm->ecm", dispatch.to(x_.dtype), x_), u.transpose(1, 2)) + b_u[:, None]
        y = torch.bmm(torch.nn.functional.gelu(h), d.transpose(1, 2)) + b_d[:, None]
        return torch.einsum("sec,ecm->sm", c_, y)

    ok = True
    for dn in ("fp32", "bf16"):
        ok &= op_row(m, "experts_slots one-hot, drops", fn, ref, [x, combine, *up, *down, *bu, *bd], grad, dn)
    return ok


def check_dispatch_combine(m, device, g, dry) -> bool:
    """The user's experts between a fused dispatch and combine: only the plan is the backend's."""
    from models import LoopExperts

    from moe_compile import capture

    ok = True
    T, H, F, E = (15, 16, 12, 4) if dry else (256, 96, 64, 8)
    idx = torch.rand(T, E, generator=g, device=device).argsort(1)[:, :2]
    for dn in ("fp32", "bf16"):
        dt = DTYPES[dn]
        torch.manual_seed(3)
        mod = LoopExperts(E, H, F).to(device=device, dtype=dt)
        mod64 = copy.deepcopy(mod).double()
        x, w = torch.randn(T, H, generator=g, device=device).to(dt), torch.rand(T, 2, generator=g, device=device)
        grad = torch.randn(T, H, generator=g, device=device)
        key = capture.module_key(mod)
        with m.kernels.use("triton"):
            out, grads = grads_of(lambda x_, w_, *ps: torch.ops.moe_compile.dispatch_combine(x_, idx, w_, list(ps), key),
                                  [x, w.to(dt), *[p.detach() for p in mod.parameters()]], grad)
        ref, ref_grads = grads_of(lambda x_, w_, *ps: torch.func.functional_call(
            mod64, dict(zip([n for n, _ in mod64.named_parameters()], ps)), (x_, idx, w_)),
            [x.double(), w.to(dt).double(), *[p.detach() for p in mod64.parameters()]], grad.double())
        errs = [rel_err(out, ref)] + [rel_err(a, r) for a, r in zip(grads, ref_grads)]
        good = max(errs) <= KERNEL_TOL[dn]
        ok &= good
        say(f"| dispatch_combine (user experts, Triton's plan) | {dn} | {errs[0]:.1e} | {max(errs[1:]):.1e} "
            f"({len(errs) - 1} tensors) | plan only | {'yes' if good else '**NO**'} |")
    return ok


def check_model(m, device, dry) -> bool:
    """An HF Mixtral block (or, without transformers, a decorated experts module) compiled with backend="moe"."""
    import moe_compile
    from bench_layer import Shape, build_block, set_impl

    say("\n## 2b. torch.compile(HF Mixtral block, backend='moe') vs the same block in eager\n")
    table(["dtype", "out", "dx", "worst param grad", "fused", "Triton fwd/bwd calls", "ok"])
    shape = Shape("tiny", "tiny", 32 if dry else 512, 32 if dry else 256, 48 if dry else 512, 4 if dry else 8, 2)
    ok = True
    for dn in ("fp32", "bf16"):
        dt = DTYPES[dn]
        torch.compiler.reset()
        eager = build_block(shape, "eager", dt, device)
        ours = set_impl(copy.deepcopy(eager), "grouped_mm")
        compiled = torch.compile(ours, backend="moe", options={"compiler": "aot_eager" if dry else "inductor"})
        gen = torch.Generator(device=device).manual_seed(5)
        x = torch.randn(1, shape.tokens, shape.hidden, generator=gen, device=device).to(dt)
        g = torch.randn(1, shape.tokens, shape.hidden, generator=gen, device=device).to(dt)
        res = []
        for mod, run in ((eager, eager), (ours, compiled)):
            xi = x.clone().requires_grad_()
            with count_triton(m.kernels) as calls:
                out = run(xi)
                out = out[0] if isinstance(out, tuple) else out
                out.backward(g)
            res.append((out.detach(), xi.grad, {n: p.grad for n, p in mod.named_parameters()}, dict(calls)))
        (ro, rdx, rg, _), (oo, odx, og, calls) = res
        fused = any(r.fused for r in moe_compile.backend.last_regions)
        gw = max(rel_err(og[n], rg[n]) for n in rg)
        errs = [rel_err(oo, ro), rel_err(odx, rdx), gw]
        good = max(errs) <= EAGER_TOL[dn] and fused and calls["forward"] >= 1 and calls["backward"] >= 1
        ok &= good
        say(f"| {dn} | {errs[0]:.1e} | {errs[1]:.1e} | {gw:.1e} | {fused} | {calls['forward']}/{calls['backward']} "
            f"| {'yes' if good else '**NO**'} |")
    return ok


# ============================================================================================ 3. parallel modes
def parallel_worker(case: dict) -> dict:
    """On each of the 2 ranks (spawned): the kernel backend for the case's tensors, then the equivalence check."""
    from moe_compile import kernels
    from moe_compile.kernels.triton import kernels as tk

    if tk.INTERPRET:
        tk.fix_old_interpreter()
    import parallel_harness

    x = torch.zeros(1, case.get("H", 16), device=case["device"], dtype=getattr(torch, case["dtype"]))
    r = parallel_harness.compare(case)
    r["backend"] = kernels.select(None, x).name
    return r


def check_parallel(device, dry) -> bool:
    import parallel_harness

    say("\n## 3. Parallel modes at W = 2 (two processes, gloo, one device) vs one process on the global batch\n")
    table(["experts", "dtype", "modes run", "backend", "out", "dx", "dense grad", "expert grad", "weights", "ok"])
    pool = parallel_harness.WorkerPool(2, timeout=300.0)
    ok = True
    try:
        for E, modes in ((4, ["expert", "data", "expert"]), (1, ["tensor", "tensor"])):
            for dn in ("fp32", "bf16"):
                H, F = (16, 8) if dry else (256, 512)
                case = dict(kind="stacked_bias" if E == 1 else "stacked", E=E, H=H, F=F, k=min(2, E),
                            tokens=[40, 24] if dry else [700, 300], modes=modes, layers=1, device=str(device),
                            dtype="float32" if dn == "fp32" else "bfloat16")
                res = pool.run(parallel_worker, case)
                errs = {q: max(r["errors"].get(q, 0.0) for r in res)
                        for q in ("out", "dx", "dense_grad", "expert_grad", "weights")}
                ran = sorted(set(res[0]["modes_run"]))
                backend = ",".join(sorted({r["backend"] for r in res}))
                good = max(errs.values()) <= EAGER_TOL[dn] and set(modes) <= set(ran) and backend == "triton"
                ok &= good
                say(f"| {E} | {dn} | {', '.join(ran)} | {backend} | " + " | ".join(f"{v:.1e}" for v in errs.values())
                    + f" | {'yes' if good else '**NO**'} |")
    finally:
        pool.close()
    return ok


# ============================================================================================ 4. benchmark
def bench(fn, device) -> float:
    """Milliseconds per call (median)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    t = time.perf_counter()  # the dry run: one call (the interpreter's time means nothing)
    fn()
    return (time.perf_counter() - t) * 1e3


def dense_rate(rows, H, F, device) -> tuple[float, float]:
    """bf16 torch.mm TFLOP/s on the experts' GEMM sizes as one dense matrix each: forward ([rows, H] @ [H, 2F],
    [rows, F] @ [F, H]) and forward+backward (plus d input and d weight of each)."""
    dt = torch.bfloat16
    a1, b1 = torch.randn(rows, H, device=device, dtype=dt), torch.randn(H, 2 * F, device=device, dtype=dt)
    a2, b2 = torch.randn(rows, F, device=device, dtype=dt), torch.randn(F, H, device=device, dtype=dt)
    g1, g2 = torch.randn(rows, 2 * F, device=device, dtype=dt), torch.randn(rows, H, device=device, dtype=dt)
    flops = 2 * rows * H * 2 * F + 2 * rows * F * H
    fwd = bench(lambda: (a1 @ b1, a2 @ b2), device)
    tot = bench(lambda: (a1 @ b1, a2 @ b2, g1 @ b1.t(), a1.t() @ g1, g2 @ b2.t(), a2.t() @ g2), device)
    return flops / fwd / 1e9, 3 * flops / tot / 1e9


def bench_experts(m, device, name, T, H, F, E, k) -> tuple[str, float]:
    spec = m.MoESpec(num_experts=E, top_k=k, hidden=H, ffn=F)
    x, idx, w, wts, grad = make_inputs(m.common, spec, T, torch.bfloat16, device)
    out, (h, y) = m.launch.experts_forward(spec, x, idx, w, wts)  # compiles and autotunes
    dx = m.launch.experts_backward(spec, grad, x, idx, w, wts, h, y)[0]
    # the tuned configs at this shape, vs the ATen backend in bf16 on the same inputs (both round: EAGER_TOL)
    try:
        r_out, (r_h, r_xs) = m.aten.experts_forward(spec, x, idx, w, wts)
        r_dx = m.aten.experts_backward(spec, grad, x, idx, w, wts, r_h, r_xs)[0]
        err = max(rel_err(out, r_out), rel_err(dx, r_dx))
        del r_out, r_h, r_xs, r_dx
    except RuntimeError as exc:  # reported in the row; the timing still runs
        print(f"ATen reference failed at {name}: {exc}")
        err = float("nan")
    fwd = bench(lambda: m.launch.experts_forward(spec, x, idx, w, wts), device)
    bwd = bench(lambda: m.launch.experts_backward(spec, grad, x, idx, w, wts, h, y), device)
    flops = 2 * T * k * 3 * H * F
    d_fwd, d_tot = dense_rate(T * k, H, F, device)
    tf_f, tf_t = flops / fwd / 1e9, 3 * flops / (fwd + bwd) / 1e9
    met = "met" if tf_f >= 0.8 * d_fwd and tf_t >= 0.8 * d_tot else "NOT met"
    row = (f"| {name} ({T}, {H}, {F}, {E}, {k}) | {fwd:.2f} | {fwd + bwd:.2f} | {tf_f:.0f} | {tf_t:.0f} | "
           f"{d_fwd:.0f} / {d_tot:.0f} | {100 * tf_f / d_fwd:.0f}% | {100 * tf_t / d_tot:.0f}% | {err:.1e} | {met} |")
    return row, err


def bench_layer_row(m, device, dry, name, T, H, F, E, k) -> tuple[str, float, float]:
    from bench_layer import Shape, build_block, set_impl

    shape = Shape(name, name, T, H, F, E, k)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32  # (CPU: no bf16 grouped_mm needed)
    torch.compiler.reset()
    hf = build_block(shape, "grouped_mm", dt, device)
    ours_mod = set_impl(copy.deepcopy(hf), "grouped_mm")
    ours = torch.compile(ours_mod, backend="moe", options={"compiler": "aot_eager" if dry else "inductor"})
    x = torch.randn(1, T, H, device=device, dtype=dt)
    g = torch.randn(1, T, H, device=device, dtype=dt)

    def step(mod, run):
        def f():
            for p in mod.parameters():
                p.grad = None
            xi = x.detach().requires_grad_()
            out = run(xi)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(g)
            return out, xi.grad
        return f

    o_hf, dx_hf = step(hf, hf)()
    o_us, dx_us = step(ours_mod, ours)()
    err = max(rel_err(o_us, o_hf), rel_err(dx_us, dx_hf))
    t_hf = bench(step(hf, hf), device)
    t_us = bench(step(ours_mod, ours), device)
    flops = 3 * 2 * T * k * 3 * H * F
    return (f"| {name} ({T}, {H}, {F}, {E}, {k}) | {t_hf:.2f} | {t_us:.2f} | {t_hf / t_us:.2f}x | "
            f"{flops / t_us / 1e9:.0f} | {err:.1e} |"), t_hf / t_us, err


def guarded(name, fn, n=2):
    """``fn()``, or on an error (out of memory, say) a row saying so and NaNs, so the other shapes still run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return (f"| {name} | **{type(exc).__name__}: {str(exc)[:300]}** |", *[float("nan")] * (n - 1))


SHAPES = [("fine-grained", 16384, 2048, 1024, 64, 8), ("Mixtral-like", 16384, 4096, 14336, 8, 2)]


def benchmark(m, device, dry, quick) -> bool:
    shapes = [(n, T, H, F // 2 if quick and n == "Mixtral-like" else F, E, k) for n, T, H, F, E, k in SHAPES]
    if dry:
        shapes = [(n, 32, 32, 48, min(E, 8), min(k, 4)) for n, *_, E, k in shapes]
    say("\n## 4a. Expert GEMMs (the Triton launchers, autotuned), bf16, SwiGLU (backward = 2x forward FLOPs)\n")
    table(["shape (T, H, F, E, k)", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s",
           "dense bf16 mm TFLOP/s fwd / fwd+bwd", "fwd % dense", "fwd+bwd % dense", "out, dx vs ATen bf16", ">= 80% target"])
    ok = True
    for s in shapes:
        if over_budget(s[0], 60):
            continue
        row, err = guarded(s[0], lambda: bench_experts(m, device, *s))
        say(row)
        ok &= err <= EAGER_TOL["bf16"]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    say("\n## 4b. Layer forward+backward: HF block with grouped_mm experts vs torch.compile(block, backend='moe')\n")
    table(["shape (T, H, F, E, k)", "HF grouped_mm ms", "ours ms", "speedup", "ours expert TFLOP/s",
           "err vs HF (out, dx)", ">= 1.3x target (fine-grained)"])
    for s in shapes:
        if over_budget(s[0], 60):
            continue
        row, speedup, err = guarded(s[0], lambda: bench_layer_row(m, device, dry, *s), 3)
        say(row + (f" {'met' if speedup >= 1.3 else 'NOT met'} |" if s[0] == "fine-grained" else " - |"))
        ok &= err <= EAGER_TOL["bf16"]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    say("\nTargets: expert GEMMs >= 80% of the dense rate at 16k tokens; the layer >= 1.3x HF grouped_mm on the "
        "fine-grained shape." + (" (dry run: timings are the interpreter's and mean nothing)" if dry else ""))
    return ok


# ============================================================================================ main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="bf16-only config sweep; the Mixtral-like shape at half its ffn")
    p.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1 at tiny sizes")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: kernels,ops,parallel,bench")
    p.add_argument("--report", default=None, help="markdown report path (default $OUT/gpu_check.md if OUT is set)")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds: later config sweeps and benchmark shapes are skipped (and say so) past it")
    args = p.parse_args()
    RUN["budget"] = 1e9 if args.dry_run else args.budget
    skip = set(filter(None, args.skip.split(",")))
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (the spawned ranks inherit it)
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU (H100 / H200); use --dry-run to exercise it on CPU")
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare IEEE dots
        torch.backends.cudnn.allow_tf32 = False
    import types

    import triton
    from triton.runtime.errors import OutOfResources

    from moe_compile import kernels
    from moe_compile.kernels import aten, common
    from moe_compile.kernels.triton import kernels as tk, launch
    from moe_compile.spec import MoESpec

    m = types.SimpleNamespace(kernels=kernels, aten=aten, common=common, tk=tk, launch=launch, MoESpec=MoESpec,
                              OutOfResources=OutOfResources)
    if args.dry_run:
        tk.fix_old_interpreter()
    report = args.report or (os.path.join(os.environ["OUT"], "gpu_check.md") if os.environ.get("OUT") else None)
    if report:
        os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
        open(report, "w").close()
        RUN["path"] = report
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (TRITON_INTERPRET=1 dry run)"
    say(f"# gpu_check.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    say(f"{card}; torch {torch.__version__}, triton {triton.__version__}"
        f"{', CUDA ' + torch.version.cuda if device.type == 'cuda' else ''}\n")
    t0 = time.time()
    ok, times = True, []
    for name, fn in (("kernels", lambda: check_kernels(m, device, args.dry_run, args.quick)),
                     ("ops", lambda: check_ops(m, device, args.dry_run) & check_model(m, device, args.dry_run)),
                     ("parallel", lambda: check_parallel(device, args.dry_run)),
                     ("bench", lambda: benchmark(m, device, args.dry_run, args.quick))):
        if name in skip:
            continue
        t = time.time()
        try:
            good = fn()
        except Exception as exc:  # noqa: BLE001 - reported, and the other sections still run
            say(f"\n**{name}: {type(exc).__name__}: {exc}**\n```\n{traceback.format_exc()[-3000:]}```")
            good = False
        ok &= good
        times.append(f"{name} {time.time() - t:.0f} s{'' if good else ' (FAILED)'}")
    say(f"\n**{'PASS' if ok else 'FAIL'}**; " + ", ".join(times) + f"; total {time.time() - t0:.0f} s")
    print(f"\nreport written to {report}" if report else "")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
