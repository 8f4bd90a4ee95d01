"""``moe-compile`` / ``python -m moe_compile``: command-line tools. ``moe-compile demo --help`` for the demo."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-compile", description="moe_compile command-line tools")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small MoE transformer on a few local processes: parallelize + DDP "
                          "+ torch.compile(backend='moe'), against plain DDP",
                          description="Train a small byte-level MoE transformer on the shipped Shakespeare corpus "
                          "with moe_compile.parallelize + DistributedDataParallel + torch.compile(backend='moe') "
                          "on --nproc local processes; check one step against one process, compare tokens/s "
                          "with plain DDP, save a checkpoint and a loss curve in --out.")
    from .demo import cli

    cli.add_arguments(demo)
    args = ap.parse_args(argv)
    if args.command == "demo":
        return cli.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
