"""A whole small model's training step (forward, backward, AdamW): HF eager vs inductor vs ``backend="moe"``.

Run from the repository root (fp32 on CPU; ~5-10 minutes on 2 cores, most of it two inductor compiles per model):

    PYTHONPATH=. python benchmarks/bench_model.py                    # both models, 5 repetitions
    PYTHONPATH=. python benchmarks/bench_model.py --models fine --reps 9
    PYTHONPATH=. python benchmarks/bench_model.py --quick            # small sizes: a smoke run

Models (``AutoModelForCausalLM.from_config``, 2 decoder layers, random weights, batch 4 x 512 = 2048 tokens,
vocabulary 1024 so that the LM head stays small next to the experts):

- ``mixtral``: ``MixtralConfig``, hidden 512, 8 heads (8 KV heads), experts ffn 1024, E 8, k 2 (Mixtral-like);
- ``fine``: ``Qwen3MoeConfig``, hidden 512, 8 heads (8 KV heads), experts ffn 256, E 64, k 8 (fine-grained,
  Qwen3-MoE / OLMoE-like).

Variants, each its own copy of the same initial weights with its own ``torch.optim.AdamW(lr=1e-3)``:

1. ``eager``     the HF model as it runs by default (experts implementation ``grouped_mm``);
2. ``inductor``  ``torch.compile(model)`` of it (moe_compile's capture switched off while it runs);
3. ``ours``      ``torch.compile(model, backend="moe")``: the experts of every layer fused into
                 ``moe_compile::experts`` (checked with ``moe_compile.backend.last_regions``); the rest of the graph
                 goes to moe's inner compiler (inductor by default).

A step is ``loss = model(ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad()``. Method: compile
and warm every variant up (2 steps each, from the same weights); check, on fresh copies of the initial weights,
one step of ``ours`` and of ``inductor`` against ``eager``: the loss, every parameter gradient and every parameter
after the AdamW step (max |err| / max |ref| per tensor; the run fails above 1e-4 for the loss and gradients);
then time ``--reps`` steps per variant, interleaved with the order rotating, and report medians (mins). Finally one
step of each variant is profiled: the time inside the optimizer step, inside the fused moe ops, in GEMMs
(``mm``/``addmm``/``bmm``/``_grouped_mm``), in attention (``scaled_dot_product_attention`` and its kernels), and
the rest.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class ModelShape:
    key: str
    name: str
    config: str
    kw: dict
    batch: int = 4
    seq: int = 512

    def label(self) -> str:
        k = self.kw
        return (f"{self.name} ({self.config}, {self.batch}x{self.seq} tokens, H {k['hidden_size']}, "
                f"F {k.get('moe_intermediate_size', k.get('intermediate_size'))}, "
                f"E {k.get('num_local_experts', k.get('num_experts'))}, k {k['num_experts_per_tok']})")


_BASE = dict(vocab_size=1024, hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
             max_position_embeddings=1024, tie_word_embeddings=False)
MODELS = {
    "mixtral": ModelShape("mixtral", "Mixtral-like", "MixtralConfig",
                          dict(_BASE, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2)),
    "fine": ModelShape("fine", "fine-grained", "Qwen3MoeConfig",
                       dict(_BASE, moe_intermediate_size=256, intermediate_size=1024, num_experts=64,
                            num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                            head_dim=64)),
}
QUICK = {
    "mixtral": ModelShape("mixtral", "Mixtral-like (quick)", "MixtralConfig",
                          dict(_BASE, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                               intermediate_size=128, num_local_experts=8, num_experts_per_tok=2), 2, 64),
    "fine": ModelShape("fine", "fine-grained (quick)", "Qwen3MoeConfig",
                       dict(_BASE, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                            moe_intermediate_size=32, intermediate_size=128, num_experts=16, num_experts_per_tok=4,
                            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, head_dim=16), 2, 64),
}
VARIANTS = ["eager", "inductor", "ours"]
CLOCK = time.perf_counter


def build_model(shape: ModelShape, seed: int = 0):
    import transformers

    cfg = getattr(transformers, shape.config)(**shape.kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.set_experts_implementation("grouped_mm")
    return model.float().train()


class Variant:
    def __init__(self, name: str, base, ids, capture: bool):
        self.name, self.capture, self.ids = name, capture, ids
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        if name == "inductor":
            self.run = torch.compile(self.model)
        elif name == "ours":
            self.run = torch.compile(self.model, backend="moe")
        else:
            self.run = self.model

    def step(self, optimize: bool = True):
        import moe_compile.capture as capture

        capture.ENABLED = self.capture
        try:
            loss = self.run(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
            if optimize:
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        finally:
            capture.ENABLED = True
        return loss.detach()


def rel_err(a, ref) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check(base, ids, tol: float) -> tuple[dict, bool]:
    """One step of each variant from the same initial weights: loss, gradients, weights after AdamW vs eager."""
    vs = {n: Variant(n, base, ids, capture=(n != "inductor")) for n in VARIANTS}
    state = {}
    for n, v in vs.items():
        loss = v.step(optimize=False)
        grads = {k: p.grad.detach().clone() for k, p in v.model.named_parameters() if p.grad is not None}
        v.opt.step()
        state[n] = (loss, grads, {k: p.detach().clone() for k, p in v.model.named_parameters()})
    out, ok = {}, True
    rl, rg, rp = state["eager"]
    for n in ("inductor", "ours"):
        loss, grads, params = state[n]
        e = {"loss": rel_err(loss, rl),
             "grads": max(rel_err(grads[k], rg[k]) for k in rg),
             "params after AdamW": max(rel_err(params[k], rp[k]) for k in rp),
             "missing grads": len(set(rg) ^ set(grads))}
        out[n] = e
        ok = ok and e["loss"] <= tol and e["grads"] <= tol and e["missing grads"] == 0
    return out, ok


GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::baddbmm")


def profile_step(v: Variant) -> str:
    """Where one training step goes: optimizer, fused moe ops, GEMMs, attention, the rest (self times)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        v.step()
        wall = (time.perf_counter() - t0) * 1e3
    evs = prof.events()
    cats = {"optimizer step": 0.0, "inside moe_compile ops": 0.0, "GEMMs (outside moe ops)": 0.0,
            "attention": 0.0, "compiled kernels (inductor)": 0.0, "other": 0.0}

    def walk(e, where):
        name = e.name
        if name.startswith("Optimizer.step"):
            where = "optimizer step"
        elif name.startswith("moe_compile::"):
            where = "inside moe_compile ops"
        if where is None:
            if name in GEMMS:
                cat = "GEMMs (outside moe ops)"
            elif "attention" in name or "sdpa" in name or "flash" in name:
                cat = "attention"
            elif "CompiledFxGraph" in name or name.startswith("cpp_fused") or name.startswith("graph_"):
                cat = "compiled kernels (inductor)"
            else:
                cat = "other"
        else:
            cat = where
        cats[cat] += e.self_cpu_time_total
        for c in e.cpu_children:
            walk(c, where)

    for e in evs:
        if e.cpu_parent is None:
            walk(e, None)
    total = sum(cats.values())
    lines = [f"  {v.name}: step {wall:.0f} ms wall (profiled); self CPU time by category ({total / 1e3:.0f} ms):"]
    for k, us in cats.items():
        lines.append(f"    {k:<30} {us / 1e3:8.1f} ms  {100 * us / max(total, 1e-9):5.1f}%")
    top = sorted(prof.key_averages(), key=lambda k: -k.self_cpu_time_total)[:8]
    lines.append("    top ops: " + ", ".join(f"{k.key} {k.self_cpu_time_total / 1e3:.0f}" for k in top))
    return "\n".join(lines)


def run_model(shape: ModelShape, args) -> dict:
    import moe_compile.backend

    print(f"\n## {shape.label()}", flush=True)
    torch.compiler.reset()
    base = build_model(shape)
    torch.manual_seed(1)
    ids = torch.randint(0, shape.kw["vocab_size"], (shape.batch, shape.seq))
    errs, ok = check(base, ids, 1e-4)
    regions = list(moe_compile.backend.last_regions)
    fused = sum(bool(r.fused) for r in regions)
    print(f"ours fused {fused} of {len(regions)} region(s): "
          + "; ".join(f"{r.module_path} {r.pattern} fused={r.fused}" for r in regions))
    for n, e in errs.items():
        print(f"  {n} vs eager, max|err|/max|ref|: " + ", ".join(f"{k} {x:.2e}" if isinstance(x, float) else
                                                                 f"{k} {x}" for k, x in e.items()))
    ok = ok and fused >= shape.kw["num_hidden_layers"]
    print(f"  -> {'OK' if ok else 'FAIL'} (tolerance 1e-4 on loss and gradients)", flush=True)
    torch.compiler.reset()
    vs = {n: Variant(n, base, ids, capture=(n != "inductor")) for n in VARIANTS}
    for n, v in vs.items():
        t0 = time.perf_counter()
        v.step()
        v.step()
        print(f"{n} warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
    times = {n: [] for n in VARIANTS}
    for i in range(args.reps):
        for n in VARIANTS[i % 3:] + VARIANTS[: i % 3]:
            t0 = CLOCK()
            vs[n].step()
            times[n].append((CLOCK() - t0) * 1e3)
    med = {n: statistics.median(t) for n, t in times.items()}
    print("median ms: " + ", ".join(f"{n} {med[n]:.0f} [{min(times[n]):.0f}-{max(times[n]):.0f}]" for n in VARIANTS))
    prof = None
    if not args.no_profile:
        prof = "\n".join(profile_step(vs[n]) for n in VARIANTS)
        print("profile (one step each, torch.profiler):\n" + prof, flush=True)
    return dict(shape=shape, med=med, times=times, errs=errs, ok=ok, profile=prof)


def fmt_table(results) -> str:
    rows = ["| model | eager ms | inductor ms | ours ms | best(eager, inductor)/ours | eager/ours |",
            "|---|---|---|---|---|---|"]
    for r in results:
        m, t = r["med"], r["times"]
        lo = {n: min(v) for n, v in t.items()}
        best = min(m["eager"], m["inductor"]) / m["ours"]
        best_lo = min(lo["eager"], lo["inductor"]) / lo["ours"]
        rows.append(f"| {r['shape'].label()} | " + " | ".join(f"{m[n]:.0f} ({lo[n]:.0f})" for n in VARIANTS)
                    + f" | {best:.2f} ({best_lo:.2f}) | {m['eager'] / m['ours']:.2f} |")
    rows.append("")
    rows.append("Times: median (min) ms per training step; ratios from the medians (from the mins).")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mixtral,fine", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions: a smoke run")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: time.perf_counter; cpu: time.process_time (with --threads 1 on a busy machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    table = QUICK if args.quick else MODELS
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in keys if k not in table]
    if bad:
        p.error(f"unknown models {bad}; choose from {sorted(table)}")
    if args.reps is None:
        args.reps = 2 if args.quick else 5

    import transformers

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average at start {load:.1f}"
    print(f"# bench_model: torch {torch.__version__}, transformers {transformers.__version__}, {machine}, fp32, "
          f"reps {args.reps}, {args.clock} clock, {time.strftime('%Y-%m-%d %H:%M')}")
    t0 = time.perf_counter()
    results = [run_model(table[k], args) for k in keys]
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n# Results (median of {args.reps} interleaved steps, fp32, {machine}, load average at end {end_load:.1f}, "
          f"{args.clock} clock; total run {time.perf_counter() - t0:.0f} s)\n")
    print(fmt_table(results))
    failed = [r["shape"].key for r in results if not r["ok"]]
    if failed:
        print(f"\nCORRECTNESS FAILED for {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
