"""DDP with parallel experts (issue 5): parallelize -> DistributedDataParallel -> torch.compile.

One step on W ranks (loss averaged over each rank's tokens) equals the single-process step on the global batch
(loss averaged over all tokens): DDP averages the dense gradients, the experts op averages the expert ones.
Functions prefixed ``_w_`` run inside the gloo workers (shared with test_parallel.py).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moe_compile import parallel as mp_
from moe_compile.parallel import testing

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def pool2():
    return testing.shared_pool(2)


@pytest.fixture
def pool4():
    return testing.shared_pool(4)


def _check(results):
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["errors"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"
        assert set(r["errors"]) == {"loss", "dense_grad", "expert_grad", "weights"}


def test_ddp_step_equals_single_process_global_batch(pool2, pool4):
    _check(pool2.run(testing.ddp_compare, dict(kind="mixtral", E=4, tokens=6, modes=["expert", "data", "auto"])))
    _check(pool4.run(testing.ddp_compare, dict(kind="stacked_bias", E=2, tokens=3,
                                                modes=["tensor", "expert", "data", "auto"])))


def test_ddp_compiled_switching_modes(pool2):
    res = pool2.run(testing.ddp_compare, dict(kind="stacked", E=4, tokens=5, compile="aot_eager",
                                               modes=["expert", "data", "auto", "expert"]))
    _check(res)
    assert all(r["graphs"] == 1 for r in res), [r["graphs"] for r in res]


def _catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def _w_wrong_order():
    torch.manual_seed(0)
    model = testing.ToyMoE("stacked", E=4, layers=1)
    ddp = DistributedDataParallel(model)
    early = _catch(lambda: mp_.parallelize(ddp))
    mp_.parallelize(model, mode="expert")  # too late for the DDP built above
    late = _catch(lambda: ddp(torch.randn(3, 16)))
    return early, late


def test_ddp_built_before_parallelize_is_an_error_naming_the_fix(pool2):
    for early, late in pool2.run(_w_wrong_order):
        assert "Fix: call moe_compile.parallelize(model) before DistributedDataParallel(model)" in early
        assert "DistributedDataParallel was built before moe_compile.parallelize" in late
        assert "Fix: call moe_compile.parallelize(model) first" in late


def _w_save(seed):
    torch.manual_seed(seed)
    model = mp_.parallelize(testing.ToyMoE("gpt_oss", E=4, layers=2), mode="expert")
    ddp = DistributedDataParallel(model)  # keeps the dense weights equal on every rank
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    (ddp(x) ** 2).mean().backward()
    opt.step()
    return mp_.full_state_dict(model)


def _w_load(sd, x):
    torch.manual_seed(123)  # other weights: everything must come from the state dict
    model = mp_.parallelize(testing.ToyMoE("gpt_oss", E=4, layers=2), mode="data")
    mp_.load_full_state_dict(model, sd)
    with torch.no_grad():
        return model(x[dist.get_rank()::dist.get_world_size()])


def test_full_state_dict_moves_between_world_sizes(pool2, pool4):
    sds = pool2.run(_w_save, 0)
    assert all(set(s) == set(sds[0]) and all(torch.equal(s[n], sds[0][n]) for n in s) for s in sds)
    single = testing.ToyMoE("gpt_oss", E=4, layers=2)
    assert set(sds[0]) == set(single.state_dict())  # the unparallelized model's names and shapes
    single.load_state_dict(sds[0])
    x = torch.randn(12, 16)
    with torch.no_grad():
        want = single(x)
    outs = pool4.run(_w_load, sds[0], x)
    for r, out in enumerate(outs):
        assert testing.rel(out, want[r::4]) <= TOL


@pytest.mark.slow
def test_example_train_ddp_runs_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "train_ddp.py"), "--steps", "4", "--compiler", "aot_eager"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3" in proc.stdout and "equal to one process" in proc.stdout, proc.stdout[-3000:]
