"""Faults: a rank killed or stalled inside the experts' all-to-all makes the other ranks raise within the process
group's timeout (no hang); a rank whose input differs from the others' raises on every rank; no process outlives
the test.

The killed / stalled cases run in processes of their own (a short ``timeout=`` in ``init_process_group``), never in
the shared pool, which such a fault would break for the rest of the session.
"""
from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from parallel_harness import catch

PG_TIMEOUT = 6.0  # seconds: the process group's timeout in the fault tests


def _faulty_rank(rank: int, world: int, init_file: str, fault: str, out) -> None:
    """Every rank parallelizes the same toy model and runs one forward; rank 1 dies (``kill``) or sleeps
    (``stall``) on entering its first experts all-to-all. Rank 0 reports what it raised and how long it waited."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=PG_TIMEOUT))
    import moe_compile
    from moe_compile.parallel import comm
    from parallel_harness import toy_model

    torch.manual_seed(0)
    model = moe_compile.parallelize(toy_model(dict(kind="stacked", E=4, k=2, layers=1)), mode="expert")
    x = torch.randn(8, 16)
    try:
        model(x)  # a healthy call first: the first call's one-time work is not what is measured
    except BaseException:  # noqa: BLE001
        out.put((rank, "warm-up failed: " + traceback.format_exc(), 0.0))
        return
    if rank == 1:
        def faulty(self, buf, out_splits, in_splits):
            if fault == "kill":
                os._exit(17)
            time.sleep(10 * PG_TIMEOUT)  # stalled: does not enter the collective in time

        comm.Comm.all_to_all = faulty
    t0 = time.monotonic()
    try:
        model(x)
        out.put((rank, "returned", time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001
        out.put((rank, f"{type(e).__name__}: {e}", time.monotonic() - t0))
    except BaseException:  # noqa: BLE001
        out.put((rank, traceback.format_exc(), time.monotonic() - t0))


def _spawn(fault: str, world: int = 2):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="moe_faults_")
    procs = [ctx.Process(target=_faulty_rank, args=(r, world, os.path.join(tmp, "rdv"), fault, out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    return procs, out


def _reap(procs) -> None:
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    assert not any(p.is_alive() for p in procs)


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_rank_failing_in_all_to_all_raises_on_the_others(fault):
    """The rank's peer raises (gloo: connection closed, or a timeout) within the group's timeout; the test never
    waits longer than the timeout plus the processes' start-up."""
    procs, out = _spawn(fault)
    deadline = time.monotonic() + 180.0 + 2 * PG_TIMEOUT  # spawning, importing torch, the warm-up call (loaded CPU)
    try:
        while True:
            try:
                rank, what, waited = out.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                pytest.fail(f"rank 0 neither returned nor raised ({fault}): a hang")
            assert not what.startswith("warm-up failed"), what
            if rank == 0:
                break
    finally:
        for p in procs[1:]:
            if p.is_alive():
                p.kill()
        _reap(procs)
    assert rank == 0
    assert what != "returned", "rank 0 finished a forward whose peer never took part"
    assert what.startswith(("RuntimeError", "DistBackendError", "DistError")), what
    assert waited <= PG_TIMEOUT + 5.0, (waited, what)
    if fault == "kill":
        assert procs[1].exitcode == 17


def _mismatched_inputs(how: str):
    import moe_compile
    from parallel_harness import toy_model

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = moe_compile.parallelize(toy_model(dict(kind="stacked", E=4, k=2, layers=1)), mode="expert")
    experts = model.blocks[0].experts
    x = torch.randn(6, 16)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2], [1, 3]])
    w = torch.full((6, 2), 0.5)
    if rank == 1:
        if how == "hidden":
            x = torch.randn(6, 8)
        elif how == "k":
            idx, w = idx[:, :1], w[:, :1]
        elif how == "dtype":
            x = x.double()
        elif how == "ids":
            idx = idx + 3
    return catch(lambda: experts(x, idx, w))


@pytest.mark.parametrize("how", ["hidden", "dtype", "ids", "k"])
def test_input_differing_on_one_rank_raises_on_every_rank(pool2, how):
    """One rank calls the experts with another hidden size, dtype, out-of-range expert ids or top-k than the
    others: every rank raises a ValueError naming the rank(s) and the problem (none hangs, none computes)."""
    errors = pool2.run(_mismatched_inputs, how)
    assert all(e is not None and e.startswith("ValueError") for e in errors), errors
    assert all("rank(s) [1]" in e for e in errors), errors
    assert pool2.run(_healthy) == [True, True]  # the pool's process group still works


def _healthy():
    t = torch.ones(1)
    dist.all_reduce(t)
    return bool(t.item() == dist.get_world_size())


def test_no_process_left_behind():
    """Every process this file started has ended (the shared pool is closed at the session's end: conftest)."""
    import multiprocessing

    left = [p for p in multiprocessing.active_children() if p.name.startswith("SpawnProcess")
            and p.pid not in _shared_pids()]
    assert not left, left


def _shared_pids():
    import parallel_harness

    return {p.pid for pool in parallel_harness._SHARED.values() if not pool.closed for p in pool._procs}


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has ended (its parent, now init, reaps it)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_pool_workers_end_when_the_test_process_is_killed():
    """A test process killed outright runs no fixture teardown and no atexit: its pool's workers notice that their
    parent is gone and exit by themselves (parallel_harness._worker), instead of running on."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import parallel_harness as h; pool = h.WorkerPool(2); "
              "print(*[p.pid for p in pool._procs], flush=True); import time; time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script, here], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(here)})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert len(pids) == 2
    deadline = time.monotonic() + 30
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p for p in pids if _running(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, f"workers {left} outlived their killed parent"
