"""Two nodes through torchrun, on one host: two ``torchrun --nnodes 2 --nproc-per-node 2`` launches (node ranks 0
and 1) meet in a c10d rendezvous on 127.0.0.1 and run tests/multinode_worker.py on 4 processes: parallelize (the
all-to-all hierarchical, within each node then across) -> DDP -> training steps in expert, auto and data mode,
equal to one process on the global batch.

What two torchrun launches on one host need (torch 2.13, found by reading torch/distributed/run.py and
elastic/rendezvous/):

- ``--local-addr 127.0.0.1``: the agent that becomes node 0 serves the workers' store (MASTER_ADDR) on its node
  address, which is ``socket.getfqdn()`` otherwise (any interface the host name resolves to); with it every address
  is the loopback one.
- ``--rdzv-conf is_host=1`` on one launch, ``is_host=0`` on the other: the c10d rendezvous backend guesses whether
  to serve the rendezvous store from the endpoint's host name, and 127.0.0.1 is this host for both launches; both
  would try to bind the port (the loser retries as a client, after a failed bind). Saying which one serves it
  removes the race.
- ``--node-rank`` is ignored by the c10d rendezvous (torchrun warns: it is only for ``--rdzv-backend static``).
  The rendezvous numbers the nodes by sorting (address, pid, ...): with equal addresses the launch with the
  smaller pid becomes node 0 (``GROUP_RANK``), usually but not necessarily the one started first. The worker reads
  ``GROUP_RANK`` and the test never assumes which launch is which node.
- ``GLOO_SOCKET_IFNAME=lo``: gloo binds the interface its host name resolves to unless told; ``lo`` keeps every
  connection on the loopback interface.
- Bounded waits: ``join_timeout`` / ``read_timeout`` / ``last_call_timeout`` / ``close_timeout`` in
  ``--rdzv-conf`` (the defaults are up to 600 s), ``--max-restarts 0``, the workers' process group timeout (60 s,
  in the worker), and this test's deadline, after which both launches are killed with their process groups
  (each launch runs in its own session, so its agent and its workers go together).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multinode_worker.py")
DEADLINE_S = 180  # the whole test: about 25 s on the 2-core machine with other work on it


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(node_rank: int, port: int, out_dir: str, log_path: str, env: dict) -> subprocess.Popen:
    conf = f"is_host={int(node_rank == 0)},join_timeout=90,read_timeout=60,last_call_timeout=5,close_timeout=10"
    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node_rank),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"moe-mn-{port}",
           "--rdzv-conf", conf, "--local-addr", "127.0.0.1", "--max-restarts", "0", "--monitor-interval", "1",
           WORKER, out_dir]
    log = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()  # the child holds its own descriptor


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and its workers: one session, one process group
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_one_process(tmp_path):
    out_dir = str(tmp_path)
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # this checkout, installed or not
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "GLOO_SOCKET_IFNAME": "lo",
           "TORCH_CPP_LOG_LEVEL": "ERROR"}
    env.pop("MASTER_ADDR", None), env.pop("MASTER_PORT", None)
    port = _free_port()  # released here and bound again by the hosting agent: a small window, on loopback only
    logs = [os.path.join(out_dir, f"node{i}.log") for i in range(2)]
    procs = []
    try:
        for i in range(2):
            procs.append(_launch(i, port, out_dir, logs[i], env))
        deadline = time.monotonic() + DEADLINE_S
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        codes = [p.poll() for p in procs]
        for p in procs:
            _kill(p)
    text = [open(f).read() for f in logs]
    tail = "\n".join(f"--- launch {i} (exit {c}):\n{t[-4000:]}" for i, (c, t) in enumerate(zip(codes, text)))
    assert codes == [0, 0], tail
    assert sum("multinode check ok" in t for t in text) == 1, tail

    facts = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(4)]
    for f in facts:
        assert f["world"] == 4 and f["local_world_size"] == 2
        # torchrun numbers ranks node by node, so the experts' node groups are torchrun's nodes
        assert f["node_of_rank"] == [0, 0, 1, 1] and f["node"] == f["rank"] // 2
        me = [r for r in range(4) if f["node_of_rank"][r] == f["node"]]
        assert f["intra_ranks"] == [me, me]
        assert f["inter_ranks"] == [[f["rank"] % 2, f["rank"] % 2 + 2]] * 2
        for s in f["steps"]:
            assert s["loss_rel"] <= 1e-5 and s["param_rel"] <= 1e-5, s
            assert s["hierarchical"] == [True, True], s["report"]
            if s["mode"] == "expert":
                assert s["ran"] == ["expert", "expert"] and s["last_hierarchical"] == [True, True], s["report"]
                assert s["report"].count("all-to-all hierarchical available, last call hierarchical") == 2
            if s["mode"] == "data":
                assert s["ran"] == ["data", "data"]
            if s["mode"] == "auto":
                assert set(s["ran"]) <= {"expert", "data"}
    # every rank saw the same losses (the mean over ranks) and the same reference
    assert len({json.dumps([(s["loss"], s["loss_ref"]) for s in f["steps"]]) for f in facts}) == 1
