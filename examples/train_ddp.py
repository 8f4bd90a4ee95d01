"""Train a small Mixtral with data + expert parallelism: parallelize -> DDP -> torch.compile.

    torchrun --nproc-per-node 2 examples/train_ddp.py
    torchrun --nproc-per-node 4 examples/train_ddp.py --modes expert,data,tensor,auto --compiler inductor
    torchrun --nproc-per-node 4 examples/train_ddp.py --ep 2      # a 2 x 2 data x expert mesh

Every rank trains on its own batch, gradients clipped by their global norm (``moe_compile.clip_grad_norm_``).
``moe_compile.parallel.parallelize`` shards the experts over the ranks (or, with
``--ep``, over groups of that many ranks, replicated across the groups; DDP then all-reduces only the dense
weights), the parallel mode changes on every step as ``--modes`` says, and at the end rank 0 checks that the
weights equal a single-process run on the global batch (``--no-check`` skips it) and writes the whole model and
optimizer state with ``--save``.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import moe_compile
from moe_compile import parallel


def batch(step: int, rank: int, args, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * step + rank)
    return torch.randint(0, vocab, (args.batch, args.seq), generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--modes", default="expert,data,auto", help="parallel modes, one per step, cycled")
    ap.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager", "none"])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--ep", type=int, default=0, help="ranks per experts group (default: all; fewer: a 2D mesh)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--max-norm", type=float, default=0.5, help="clip gradients to this global norm")
    ap.add_argument("--no-check", dest="check", action="store_false")
    ap.add_argument("--save", default=None, help="write the whole model's state dict here (rank 0)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    modes = args.modes.split(",")

    import transformers

    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     num_local_experts=args.experts, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).to(device)
    reference = copy.deepcopy(model) if (args.check and rank == 0) else None

    mesh = None
    if args.ep and args.ep < world:  # replicas x experts: experts split over args.ep ranks, replicated across
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // args.ep, args.ep), mesh_dim_names=("dp", "ep"))
    parallel.parallelize(model, mode=modes[0], mesh=mesh)  # 1. shard the experts (before DDP)
    ddp = DistributedDataParallel(model)  # 2. DDP all-reduces the dense weights only
    run = ddp if args.compiler == "none" else torch.compile(  # 3. compile
        ddp, backend="moe", options={"compiler": args.compiler})
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=args.lr, momentum=0.9) if reference is not None else None

    for step in range(args.steps):
        mode = modes[step % len(modes)]
        parallel.set_parallel(model, mode)
        ids = batch(step, rank, args, cfg.vocab_size).to(device)
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = moe_compile.clip_grad_norm_(model, args.max_norm)  # the global norm (torch's sees only shards)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean /= world
        if reference is not None:  # the same step on one process, global batch, loss averaged over it
            ids_all = torch.cat([batch(step, r, args, cfg.vocab_size) for r in range(world)]).to(device)
            ref_loss = reference(input_ids=ids_all, labels=ids_all).loss
            ref_loss.backward()
            ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), args.max_norm)
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
        if rank == 0:
            ran = parallel.parallel_report(model).blocks[0].last
            extra = (f" (one process: {ref_loss.item():.5f}, grad norm {ref_norm.item():.5f})"
                     if reference is not None else "")
            print(f"step {step}: mode {mode} -> ran {ran}, loss {mean.item():.5f}, grad norm {norm.item():.5f}"
                  f"{extra}", flush=True)

    full = parallel.full_state_dict(model)  # every rank takes part; every rank gets the whole model
    full_optim = parallel.full_optim_state_dict(model, opt)  # the same for the momentum buffers, by name
    if rank == 0:
        print(parallel.parallel_report(model))
        if reference is not None:
            sd = reference.state_dict()
            diff = max(float((full[n].double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-12))
                       for n, v in sd.items())
            verdict = "equal to one process" if diff <= 1e-4 else "DIFFERENT from one process"
            print(f"final weights {verdict}: largest relative difference {diff:.1e}", flush=True)
        if args.save:  # load with parallel.load_full_state_dict / load_full_optim_state_dict at any world size
            torch.save({"model": full, "optim": full_optim}, args.save)
            print(f"saved the whole model and optimizer state to {args.save}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
