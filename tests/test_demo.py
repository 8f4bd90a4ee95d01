"""``moe-compile demo`` end to end: a short run on 2 processes, then ``--resume`` on 1, each in a subprocess of its
own session (so a timeout kills every process it started, spawned ranks included, and none is left behind)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # seconds per run; a run takes about 1-2 minutes on 2 busy cores, mostly compiling

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")


def gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def demo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "moe_compile", "demo", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"moe-compile demo {' '.join(args)} ran past {TIMEOUT} s; output:\n{out[-5000:]}")
    finally:
        deadline = time.monotonic() + 30
        while not gone(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not gone(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("moe-compile demo left processes running after it exited")
    assert proc.returncode == 0, f"exit code {proc.returncode}; output:\n{out[-5000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.mark.slow
def test_demo_runs_then_resumes_at_another_world_size(tmp_path):
    out = str(tmp_path / "out")
    # sharded experts (auto keeps this small model's experts replicated): the checkpoint then moves from 2
    # ranks' shards to one process
    first = demo("--steps", "6", "--nproc", "2", "--out", out, "--mode", "expert")
    text = first.stdout
    assert "PASS" in text and "FAIL" not in text, text[-5000:]
    assert "moe_compile.explain: 2/2 MoE regions fused" in text, text[-5000:]
    assert "2 of 4 experts per rank" in text, text[-5000:]  # the parallel report: experts sharded over 2 ranks
    assert "plain DDP" in text and "tokens/s" in text
    png = os.path.join(out, "loss.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == 6 and {"model", "optim", "rng", "data", "history"} <= set(ckpt)
    assert ckpt["model"]["blocks.0.moe.experts.gate_up"].shape[0] == 4  # whole experts, unparallelized names
    s1 = json.load(open(os.path.join(out, "summary.json")))
    assert s1["check"]["passed"] and s1["last_loss"] < s1["first_loss"]

    second = demo("--steps", "4", "--nproc", "1", "--resume", "--out", out, "--baseline", "eager")  # mode auto
    text = second.stdout
    assert "resumed from" in text and "PASS" in text and "FAIL" not in text, text[-5000:]
    s2 = json.load(open(os.path.join(out, "summary.json")))
    assert s2["nproc"] == 1 and s2["check"]["step"] == 6 and s2["check"]["passed"]
    # the loss goes on from where it was, not from the untrained model's
    assert s2["first_loss"] < s1["first_loss"] - 0.5, (s1, s2)
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == 10 and [r["nproc"] for r in ckpt["history"]["runs"]] == [2, 1]
    assert [s for s, _ in ckpt["history"]["train"]] == list(range(10))


@pytest.mark.slow
def test_demo_fsdp_then_resumes_on_one_process(tmp_path):
    """--fsdp: FSDP2 for the dense weights, the experts sharded by parallelize; the float64 one-step check passes,
    and the checkpoint (whole tensors, unparallelized names) resumes on one process under FSDP2 too."""
    out = str(tmp_path / "out")
    text = demo("--fsdp", "--steps", "4", "--nproc", "2", "--out", out, "--mode", "expert", "--baseline",
                "none").stdout
    assert "parallelize + FSDP2" in text and "PASS" in text and "FAIL" not in text, text[-5000:]
    assert "2 of 4 experts per rank" in text, text[-5000:]
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert type(ckpt["model"]["tok.weight"]) is torch.Tensor  # gathered whole, not FSDP2's DTensor shard
    assert ckpt["model"]["blocks.0.moe.experts.gate_up"].shape[0] == 4
    s1 = json.load(open(os.path.join(out, "summary.json")))
    assert s1["fsdp"] and s1["check"]["passed"]
    text = demo("--fsdp", "--steps", "2", "--nproc", "1", "--resume", "--out", out, "--baseline", "none").stdout
    assert "resumed from" in text and "PASS" in text and "FAIL" not in text, text[-5000:]
    s2 = json.load(open(os.path.join(out, "summary.json")))
    assert s2["nproc"] == 1 and s2["check"]["step"] == 4 and s2["first_loss"] < s1["first_loss"]


def test_demo_rejects_bad_arguments_with_the_fix(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "checkpoint.pt").write_bytes(b"not a checkpoint")
    cases = [(("--nproc", "3"), "none", "must split evenly"), (("--resume",), "none", "no checkpoint at"),
             (("--resume",), "junk", "is not a checkpoint of moe-compile demo"),
             (("--batch", "6", "--nproc", "4"), "none", "does not split over --nproc 4")]
    for args, out, msg in cases:
        r = subprocess.run([sys.executable, "-m", "moe_compile", "demo", "--out", str(tmp_path / out), *args],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
