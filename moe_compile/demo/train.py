"""One rank of ``moe-compile demo``: parallelize -> DDP -> torch.compile(backend="moe") training, and the same model
under plain DDP for comparison. ``worker(rank, opts, init_file)`` is what ``torch.multiprocessing.spawn`` runs;
rank 0 prints, writes the checkpoint, the loss curve and ``summary.json``."""
from __future__ import annotations

import json
import os
import random
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import moe_compile

from . import check, data, plot
from .model import Config, MoETransformer

EVAL_WINDOWS = 64  # held-out windows of seq bytes, the same ones at every step and world size
EVAL_CHUNK = 8  # windows per eval forward
WARMUP_STEPS = 3  # at least this many first steps left out of tokens/s (compiles, recompiles), and 10% of a run


def init_process(rank: int, world: int, init_file: str, device: str) -> torch.device:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10))
    return torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")


def make_optimizer(params, opts: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=opts["lr"], betas=(0.9, 0.95), weight_decay=0.01)


def mean_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


@torch.no_grad()
def evaluate(model, shares, device) -> float:
    """Mean next-byte cross-entropy over the held-out windows (each rank its share), uncompiled, no gradients.
    In chunks of EVAL_CHUNK windows: the experts op compiles kernels of its own for calls much larger than that."""
    x, y, weight = (t.to(device) for t in shares)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, x.shape[0], EVAL_CHUNK):
        logits = model(x[i:i + EVAL_CHUNK])
        per_window = F.cross_entropy(logits.transpose(1, 2), y[i:i + EVAL_CHUNK], reduction="none").mean(1)
        w = weight[i:i + EVAL_CHUNK]
        total += torch.stack([(per_window * w).sum(), w.sum()]).double()
    dist.all_reduce(total)
    return float(total[0] / total[1])


class Trainer:
    """One setup's training: forward through ``run``, backward, ``clip(max_norm)``, AdamW. Keeps the loss (mean
    over ranks) and the wall-clock seconds of every step."""

    def __init__(self, name: str, run, model, opt, clip, batches, opts: dict, device, rank: int, world: int):
        self.name, self.run, self.model, self.opt, self.clip = name, run, model, opt, clip
        self.batches, self.max_norm, self.device, self.rank, self.world = batches, opts["max_norm"], device, rank, world
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.load: tuple[float, float] | None = None  # the machine's 1-minute load average before and after
        self.pending: list[torch.Tensor] = []  # losses of steps not yet averaged over the ranks

    def step(self, step: int) -> None:
        x, y = (t.to(self.device) for t in self.batches.rank_batch(step, self.rank, self.world))
        t0 = time.perf_counter()
        loss = self.run(x, y)
        loss.backward()
        if self.max_norm > 0:
            self.clip(self.max_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - t0)
        self.pending.append(loss.detach())

    def flush(self) -> None:
        """The mean over ranks of the losses of the steps since the last flush (one collective for them all)."""
        if self.pending:
            self.losses += mean_over_ranks([float(v) for v in self.pending], self.device)
            self.pending.clear()


def train(t: Trainer, steps: range, opts: dict, rank: int, evals: list | None = None, eval_model=None,
          shares=None) -> None:
    """``t`` on ``steps``, with a progress bar on rank 0; with ``evals``, the held-out loss every ``eval_every``
    steps and at the end."""
    from tqdm import tqdm

    load = os.getloadavg()[0]
    bar = tqdm(steps, desc=t.name, unit="step", disable=rank != 0, mininterval=0.5, dynamic_ncols=True)
    for step in bar:
        t.step(step)
        last = step == steps[-1]
        due = evals is not None and ((step + 1) % opts["eval_every"] == 0 or last)
        if due or last or len(t.pending) >= 10:
            t.flush()
            bar.set_postfix(loss=f"{t.losses[-1]:.3f}")
        if due:
            evals.append((step + 1, evaluate(eval_model, shares, t.device)))
            if rank == 0:
                bar.write(f"step {step + 1:5d}: train loss {t.losses[-1]:.4f}, eval loss {evals[-1][1]:.4f}")
    bar.close()
    t.load = (load, os.getloadavg()[0])


def warmup(steps: int) -> int:
    return max(WARMUP_STEPS, steps // 10)


def tokens_per_s(seconds: list[float], tokens_per_step: int) -> float | None:
    """Mean throughput over the steps after the warmup (the steps' wall-clock time, evals left out)."""
    timed = seconds[warmup(len(seconds)):]
    return tokens_per_step * len(timed) / sum(timed) if timed else None


def worker(rank: int, opts: dict, init_file: str) -> None:
    world = opts["nproc"]
    device = init_process(rank, world, init_file, opts["device"])
    try:
        run_worker(rank, world, device, opts)
    finally:
        dist.destroy_process_group()


class Phases:
    """Wall-clock seconds of each part of the run (rank 0 prints them)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now

    def describe(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())


def run_worker(rank: int, world: int, device: torch.device, opts: dict) -> None:
    phases = Phases()
    say = print if rank == 0 else (lambda *a, **k: None)
    ckpt = torch.load(opts["checkpoint"], map_location="cpu", weights_only=False) if opts["resume"] else None
    cfg = Config(**ckpt["config"]) if ckpt else Config()
    global_batch = ckpt["data"]["global_batch"] if ckpt else opts["batch"]
    seed = ckpt["data"]["seed"] if ckpt else opts["seed"]
    start = ckpt["step"] if ckpt else 0
    steps = range(start, start + opts["steps"])  # cli.check_arguments checked that global_batch splits over world
    train_w, eval_w = data.split(cfg.seq)
    batches = data.Batches(train_w, global_batch, seed)
    shares = data.eval_shares(eval_w, EVAL_WINDOWS, rank, world)

    torch.manual_seed(seed)
    model = MoETransformer(cfg)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
    model.to(device)
    start_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # for the plain DDP run
    n_params = sum(p.numel() for p in model.parameters())
    say(f"moe-compile demo: {world} process(es), {dist.get_backend()} on {device.type}, "
        f"{torch.get_num_threads()} thread(s) each; model {n_params / 1e6:.2f}M parameters ({cfg.layers} blocks, "
        f"{cfg.experts} experts, top-{cfg.top_k}, dim {cfg.dim}, expert ffn {cfg.ffn}); corpus "
        f"{train_w.count} train / {eval_w.count} held-out windows of {cfg.seq} bytes; global batch {global_batch} "
        f"windows = {global_batch * cfg.seq} tokens; steps {steps.start}..{steps.stop - 1}"
        + (f" (resumed from {opts['checkpoint']}, {ckpt['history']['runs'][-1]['nproc']} process(es) then)"
           if ckpt else ""), flush=True)
    phases.done("start")

    if rank == 0:  # what backend="moe" fuses in this model (it traces the model; nothing is compiled)
        x0, y0 = (t.to(device) for t in batches.rank_batch(steps.start, rank, world))
        say(moe_compile.explain(model, x0, y0), flush=True)
    phases.done("explain")
    verdict = check.step_check(model, make_optimizer, opts, ckpt, batches, steps.start, device)
    if verdict is not None:
        say(verdict.describe(world), flush=True)
    phases.done("check")

    ours = moe_compile_setup(model, cfg, ckpt, batches, opts, device, rank, world)
    history = ckpt["history"] if ckpt else {"train": [], "eval": [], "runs": []}
    evals: list = []
    if not ckpt:
        evals.append((0, evaluate(model, shares, device)))
        say(f"step     0: eval loss {evals[0][1]:.4f}", flush=True)
    phases.done("setup")
    train(ours, steps, opts, rank, evals, model, shares)
    say(moe_compile.parallel_report(model), flush=True)
    phases.done("train (moe_compile)")

    full = moe_compile.full_state_dict(model, rank0_only=True)  # collectives: every rank takes part
    full_optim = moe_compile.full_optim_state_dict(model, ours.opt)
    if rank == 0:
        history["train"] += list(zip(steps, ours.losses))
        history["eval"] += evals
        history["runs"].append({"start": steps.start, "nproc": world, "mode": opts["mode"]})
        state = {"model": full, "optim": full_optim, "step": steps.stop, "config": cfg.to_dict(),
                 "data": {"seed": seed, "global_batch": global_batch, **batches.position(steps.stop)},
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                 "history": history, "max_norm": opts["max_norm"]}
        tmp = opts["checkpoint"] + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, opts["checkpoint"])
        say(f"checkpoint: {opts['checkpoint']} (step {steps.stop}; moe_compile.full_state_dict + "
            f"full_optim_state_dict; continue with --resume, at any --nproc)", flush=True)
    phases.done("checkpoint")

    # The same steps under plain DDP, after ours, not interleaved with it: in one process, plain torch.compile's
    # graph break inside the blocks loop makes Dynamo skip the model's forward frame for every backend (the skip
    # is per code object), so compiling it first or in between would change how ours runs.
    base = None
    if opts["baseline"] != "none":
        base = plain_ddp(start_weights, cfg, ckpt, batches, opts, device, rank, world)
        train(base, steps, opts, rank)
        phases.done(f"train (plain DDP, {opts['baseline']})")
    if rank == 0:
        summary = summarize(opts, world, ours, base, global_batch * cfg.seq, verdict, evals)
        say(summary.pop("text"), flush=True)
        png = os.path.join(opts["out"], "loss.png")
        plot.loss_curve(history, base.losses if base else None, steps, png)
        say(f"loss curve: {png}", flush=True)
        phases.done("plot")
        summary["phases"] = phases.seconds
        with open(os.path.join(opts["out"], "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        say(f"phases (rank 0): {phases.describe()}; the first step (compiling): moe_compile {ours.seconds[0]:.1f} s"
            + (f", plain DDP {base.seconds[0]:.1f} s" if base else ""), flush=True)


def moe_compile_setup(model, cfg, ckpt, batches, opts, device, rank, world) -> Trainer:
    # 1. shard the experts over the ranks (before DDP); auto costs its layout for this rank's tokens per step
    moe_compile.parallelize(model, mode=opts["mode"], tokens_per_call=batches.global_batch // world * cfg.seq)
    # 2. DDP all-reduces the dense weights only; or (--fsdp) FSDP2 shards them, leaving the expert shards alone
    wrapped = check.wrap(model, opts.get("fsdp", False))
    run = torch.compile(wrapped, backend="moe")  # 3. compile the DDP / FSDP2 model with the moe backend
    opt = make_optimizer(model.parameters(), opts)  # 4. the optimizer on this rank's shards
    if ckpt:
        moe_compile.load_full_optim_state_dict(model, opt, ckpt["optim"])

    def clip(max_norm):  # the norm of the whole model's gradient, every expert shard counted once
        return moe_compile.clip_grad_norm_(model, max_norm)

    return Trainer("moe_compile", run, model, opt, clip, batches, opts, device, rank, world)


def plain_ddp(start_weights, cfg, ckpt, batches, opts, device, rank, world) -> Trainer:
    """The same model from the same weights, same optimizer and batches, under plain DDP (nothing of moe_compile):
    compiled by inductor (``--baseline inductor``, the default) or eager."""
    model = MoETransformer(cfg).to(device)
    model.load_state_dict(start_weights)
    ddp = DistributedDataParallel(model)
    run = torch.compile(ddp) if opts["baseline"] == "inductor" else ddp
    opt = make_optimizer(model.parameters(), opts)
    if ckpt:  # the moe_compile dict is keyed by the plain model's names: it loads into a model never parallelized
        moe_compile.load_full_optim_state_dict(model, opt, ckpt["optim"])

    def clip(max_norm):  # every parameter is whole and replicated here: torch's clipping is right
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    return Trainer(f"plain DDP ({opts['baseline']})", run, model, opt, clip, batches, opts, device, rank, world)


def summarize(opts, world, ours, base, tokens_step, verdict, evals) -> dict:
    ours_tps = tokens_per_s(ours.seconds, tokens_step)
    out = {"nproc": world, "mode": opts["mode"], "fsdp": bool(opts.get("fsdp")), "steps": len(ours.losses),
           "tokens_per_step": tokens_step,
           "first_loss": ours.losses[0], "last_loss": ours.losses[-1], "eval": evals,
           "tokens_per_s": {"moe_compile": ours_tps}, "step_seconds": {"moe_compile": ours.seconds}}
    fmt = lambda v: f"{v:,.0f}" if v else "n/a (too few steps)"  # noqa: E731
    skip = warmup(len(ours.seconds))
    lines = [f"tokens/s ({world} rank(s) together; wall-clock of this run's steps after the first {skip} (compiles, "
             "warm-up); noisy on a busy machine):",
             f"  moe_compile: parallelize (mode {opts['mode']}) + {'FSDP2' if opts.get('fsdp') else 'DDP'} + "
             f"torch.compile(backend=\"moe\"): {fmt(ours_tps)}"]
    if base is not None:
        base_tps = tokens_per_s(base.seconds, tokens_step)
        out["tokens_per_s"][f"plain_ddp_{opts['baseline']}"] = base_tps
        out["plain_ddp_last_loss"] = base.losses[-1]
        out["step_seconds"]["plain_ddp"] = base.seconds
        what = "torch.compile, default inductor" if opts["baseline"] == "inductor" else "eager, not compiled"
        lines.append(f"  plain DDP, same model, steps and batches ({what}): {fmt(base_tps)}")
        if ours_tps and base_tps:
            lines.append(f"  moe_compile / plain DDP: {ours_tps / base_tps:.2f}x; last train loss "
                         f"{ours.losses[-1]:.4f} vs {base.losses[-1]:.4f}")
    runs = [ours] + ([base] if base is not None else [])
    out["load_average"] = {t.name: t.load for t in runs}
    lines.append(f"  machine load while each ran (1-minute load average, start -> end, on {os.cpu_count()} cores): "
                 + ", ".join(f"{t.name} {t.load[0]:.1f} -> {t.load[1]:.1f}" for t in runs)
                 + "; other work on the machine moves these numbers, more so when the loads differ")
    if verdict is not None:
        out["check"] = verdict.to_dict()
    out["text"] = "\n".join(lines)
    return out
