"""``moe-compile demo``: arguments, checks that fail early with the fix, and the processes."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from .model import Config


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=200, help="training steps in this run (default 200)")
    ap.add_argument("--nproc", type=int, default=2, help="processes (ranks) to spawn on this machine (default 2)")
    ap.add_argument("--out", default="./moe_demo_out", help="checkpoint, loss.png, summary.json (default %(default)s)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (any --nproc)")
    ap.add_argument("--max-norm", type=float, default=1.0,
                    help="gradient clipping with moe_compile.clip_grad_norm_ (default 1.0; 0: off)")
    ap.add_argument("--mode", default="auto", choices=["auto", "expert", "data"], help="parallel mode (default auto)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CUDA (NCCL) when there is a GPU for every process, else CPU (gloo)")
    ap.add_argument("--baseline", default="inductor", choices=["inductor", "eager", "none"],
                    help="the plain DDP comparison: torch.compile with inductor (default), eager, or none")
    ap.add_argument("--batch", type=int, default=16, help="global batch in windows of 64 bytes (default 16; "
                    "a resumed run keeps the checkpoint's)")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (default steps/10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fsdp", action="store_true",
                    help="FSDP2 (fully_shard on every block and the model) for the dense weights instead of DDP; "
                         "the experts stay sharded by parallelize")


def fail(msg: str) -> None:
    print(f"moe-compile demo: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_arguments(args) -> dict:
    import torch

    if args.steps < 1:
        fail(f"--steps {args.steps}: train at least one step")
    if args.nproc < 1:
        fail(f"--nproc {args.nproc}: run at least one process")
    E = Config().experts
    if E % args.nproc and args.nproc % E:
        fail(f"--nproc {args.nproc}: the demo model's {E} experts must split evenly over the processes "
             f"(--nproc dividing {E}, or a multiple of it)")
    device = args.device
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        device = "cuda" if gpus >= args.nproc else "cpu"
    elif device == "cuda" and gpus < args.nproc:
        fail(f"--device cuda with --nproc {args.nproc} needs a GPU per process; this machine has {gpus} "
             "(use --device cpu or a smaller --nproc)")
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    batch = args.batch
    if args.resume:
        if not os.path.exists(checkpoint):
            fail(f"--resume: no checkpoint at {checkpoint}; run once without --resume first (or point --out at the "
                 "folder of an earlier run)")
        try:
            batch = torch.load(checkpoint, map_location="cpu", weights_only=False)["data"]["global_batch"]
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same answer
            fail(f"--resume: {checkpoint} is not a checkpoint of moe-compile demo ({type(e).__name__}: {e}); "
                 "point --out at a demo run's folder, or run without --resume")
        if batch % args.nproc:
            fail(f"--resume: the checkpoint's global batch of {batch} windows does not split over --nproc "
                 f"{args.nproc}; resume with an --nproc dividing {batch}")
    elif args.batch % args.nproc:
        fail(f"--batch {args.batch} does not split over --nproc {args.nproc}; pick a batch divisible by it")
    os.makedirs(args.out, exist_ok=True)
    return {"steps": args.steps, "nproc": args.nproc, "out": args.out, "resume": args.resume,
            "checkpoint": checkpoint, "max_norm": args.max_norm, "mode": args.mode, "device": device,
            "baseline": args.baseline, "batch": args.batch, "lr": args.lr, "seed": args.seed, "fsdp": args.fsdp,
            "eval_every": args.eval_every or max(1, args.steps // 10)}


def run(args) -> int:
    """Check the arguments, then train on ``--nproc`` processes: spawned (rank 0 prints), or this one for 1."""
    t0 = time.perf_counter()
    opts = check_arguments(args)
    from . import train

    tmp = tempfile.mkdtemp(prefix="moe_demo_")  # the file:// rendezvous: no port to pick
    init_file = os.path.join(tmp, "rendezvous")
    try:
        if opts["nproc"] == 1:
            train.worker(0, opts, init_file)
        else:
            import torch.multiprocessing as mp

            mp.spawn(train.worker, args=(opts, init_file), nprocs=opts["nproc"], join=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"time: {time.perf_counter() - t0:.1f} s in all (process start, compiles, training, both speed runs, "
          f"checkpoint)", flush=True)
    return 0
