"""One worker of tests/test_multinode.py: run by ``torchrun --nnodes 2 --nproc-per-node 2`` (two launches on one
host play two nodes of two processes each).

It builds a small MoE model, parallelizes it (``LOCAL_WORLD_SIZE=2`` from torchrun: the token all-to-all goes
within each node, then across), wraps it in DistributedDataParallel and trains a few SGD steps, switching the
parallel mode (expert, auto, data). Every rank also trains the single-process model on the global batch from the
same seed and compares, step by step, the loss (the mean over ranks of the ranks' losses) and every parameter
(the whole model, gathered with ``full_state_dict``). It writes what it saw to ``<out_dir>/rank<R>.json`` and
prints ``multinode check ok`` (rank 0) when every rank agrees within the tolerance; any failure exits non-zero.

    torchrun ... tests/multinode_worker.py OUT_DIR
"""
from __future__ import annotations

import copy
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # parallel_harness (test support, not installed)

import parallel_harness as testing  # noqa: E402
from moe_compile import parallel  # noqa: E402

TOL = 1e-5
MODES = ["expert", "expert", "auto", "data", "expert"]  # one per step
TOKENS = 6  # per rank and step
H = 16


def batch(step: int, W: int):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(W * TOKENS, H, generator=g), torch.randn(W * TOKENS, H, generator=g)


def loss_fn(out, target):
    return 0.5 * ((out - target) ** 2).sum(-1).mean()


def train(out_dir: str) -> dict:
    rank, W = dist.get_rank(), dist.get_world_size()
    L = int(os.environ["LOCAL_WORLD_SIZE"])
    node = int(os.environ["GROUP_RANK"])  # torchrun's node index (the rendezvous decides it, see the test)
    nodes = [None] * W
    dist.all_gather_object(nodes, node)
    facts: dict = {"rank": rank, "world": W, "local_world_size": L, "node": node,
                   "node_of_rank": nodes, "steps": []}

    torch.manual_seed(0)
    model = testing.ToyMoE("stacked", E=4, H=H, F=8, k=2, layers=2)
    ref = copy.deepcopy(model)  # the single-process model, trained here on the global batch
    parallel.parallelize(model, mode=MODES[0])  # LOCAL_WORLD_SIZE (torchrun's) -> hierarchical all-to-all
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    states = parallel.tags.parallel_states(model)
    facts["intra_ranks"] = [st.a2a.intra.ranks if st.a2a.hierarchical else None for st in states]
    facts["inter_ranks"] = [st.a2a.inter.ranks if st.a2a.hierarchical else None for st in states]

    for step, mode in enumerate(MODES):
        parallel.set_parallel(ddp, mode)
        x, c = batch(step, W)
        mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(x[mine]), c[mine])
        loss.backward()
        opt.step()
        opt_ref.zero_grad(set_to_none=True)
        loss_ref = loss_fn(ref(x), c)
        loss_ref.backward()
        opt_ref.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        full = parallel.full_state_dict(model)
        want = ref.state_dict()
        rep = parallel.parallel_report(ddp)
        facts["steps"].append({
            "mode": mode,
            "loss": float(total / W), "loss_ref": float(loss_ref.detach()),
            "loss_rel": testing.rel(total / W, loss_ref.detach()),
            "param_rel": max(testing.rel(full[n], v) for n, v in want.items()),
            "same_names": sorted(full) == sorted(want),
            "ran": [b.last for b in rep.blocks],
            "hierarchical": [b.hierarchical for b in rep.blocks],
            "last_hierarchical": [b.last_hierarchical for b in rep.blocks],
            "report": str(rep),
        })
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f, indent=1)
    return facts


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    # a hung peer fails the collective after 60 s instead of blocking the test (which also kills us at its end)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    facts = train(out_dir)
    worst = max(max(s["loss_rel"], s["param_rel"]) for s in facts["steps"])
    ok = [worst <= TOL and all(s["same_names"] for s in facts["steps"])]
    agreed = [None] * dist.get_world_size()
    dist.all_gather_object(agreed, ok[0])
    if not all(agreed):
        raise SystemExit(f"rank {facts['rank']}: multinode check failed (worst {worst:.3g}, agreed {agreed})")
    if facts["rank"] == 0:
        print(f"multinode check ok: {len(facts['steps'])} steps, worst relative difference {worst:.3g}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
