"""MoE blocks of any class, found by structure and proven from behaviour (``capture_found``): each style fuses and
stays equal to eager (forward, every gradient, buffers, and again after an optimizer step); blocks whose behaviour
matches no reading trace as they are, equal to eager, and explain names the failed step."""
import copy

import pytest
import torch
import torch.nn as nn

import moe_compile
from moe_compile import capture_found
from found_models import FUSED_STYLES, UNFUSED_STYLES, Net
from helpers import assert_same_training_step, loss_and_grads
from moe_compile.recognise.structure import find_blocks


@pytest.fixture(autouse=True)
def _found_capture_on(monkeypatch):
    """The capture by structure is opt-in for now (``capture_found.ENABLED``)."""
    monkeypatch.setattr(capture_found, "ENABLED", True)


def _compiled_matches_eager(model, x, steps=2):
    ref, got = model, copy.deepcopy(model)
    compiled = torch.compile(got, backend="moe", options={"compiler": "aot_eager"})
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, got)]
    for _ in range(steps):  # the second step runs on weights an optimizer step moved
        a, b = loss_and_grads(ref, x), loss_and_grads(compiled, x)
        assert_same_training_step(a, b, tol=1e-5)
        for o in opts:
            o.step()
    for (n, b0), (_, b1) in zip(ref.named_buffers(), got.named_buffers()):
        assert torch.equal(b0, b1), n


def _explained(block_cls):
    """``(model, x, report, the report's rows for the block)`` for ``Net(block_cls())``."""
    torch.manual_seed(0)
    model = Net(block_cls())
    x = torch.randn(4, 16, 8)  # every expert gets tokens (an unused expert: None in eager, zeros fused)
    report = moe_compile.explain(model, x)
    return model, x, report, [r for r in report.regions if r.module_path == "block"]


@pytest.mark.parametrize("style", sorted(FUSED_STYLES))
def test_style_fuses_and_equals_eager(style):
    model, x, report, rows = _explained(FUSED_STYLES[style])
    assert len(rows) == 1 and rows[0].fused and "found by structure" in rows[0].pattern, str(report)
    assert report.graph_breaks == 0, str(report)
    _compiled_matches_eager(model, x)


@pytest.mark.parametrize("style", sorted(UNFUSED_STYLES))
def test_unmatched_behaviour_stays_as_it_is(style):
    model, x, report, rows = _explained(UNFUSED_STYLES[style])
    assert rows and not any(r.fused for r in rows), str(report)
    assert "found by structure" in str(report), str(report)
    _compiled_matches_eager(model, x, steps=1)


def test_no_false_candidates():
    class Heads(nn.Module):  # a list of attention heads, a list of layers: no [E, H] router beside them
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) for _ in range(3))
            self.proj = nn.Linear(8, 8)

    assert find_blocks(Heads()) == []
    blocks = find_blocks(Net(FUSED_STYLES["gather_shared"]()))
    assert [(b.path, b.num_experts, b.hidden, b.router, b.others) for b in blocks] == [
        ("block", 4, 8, "gate.weight", ("shared_expert",))]
