"""explain lists every MoE-like block, fused or not, also one that no graph holds whole."""
import pytest
import torch
import torch.nn as nn

import moe_compile
from helpers import grads_equal, out_and_grads, rel_err
from models import MLP, InlineMoE, Net
from moe_compile import capture_found
from moe_compile.explain import moe_like_blocks


class BrokenMoE(InlineMoE):
    """The router and the experts' loop separated by a graph break (a print)."""

    def forward(self, x):
        B, S, H = x.shape
        x = x.view(-1, H)
        w, idx = torch.topk(torch.softmax(self.gate(x), -1), self.k, dim=-1)
        print(end="")  # graph break
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out.view(B, S, H)


class UniqueLoopMoE(nn.Module):
    """Experts picked by a Python loop over ``idx.unique().tolist()``: data-dependent control flow."""

    def __init__(self, E=4, H=8, F=12):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(MLP(H, F) for _ in range(E))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = torch.topk(self.router(x).softmax(-1), 2)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out.reshape(shape)


def test_structural_scan_finds_blocks():
    assert moe_like_blocks(Net(InlineMoE(4, 8, 12, 2), 8)) == {"moe": "router [4, 8] (gate.weight), 4 experts (experts)"}
    assert list(moe_like_blocks(Net(UniqueLoopMoE(), 8))) == ["moe"]
    assert moe_like_blocks(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))) == {}


@pytest.mark.parametrize("found", [True, False], ids=["captured_by_structure", "structure_capture_off"])
def test_block_split_by_graph_break_is_listed_and_stays_equal(found, monkeypatch):
    """Captured by structure, the graph break inside the block is never traced and the block fuses; with that
    capture off, Dynamo breaks the graph inside it: still listed (unfused, with the break), and equal to eager."""
    monkeypatch.setattr(capture_found, "ENABLED", found)
    for moe in (BrokenMoE(4, 8, 12, 2), UniqueLoopMoE()):
        torch.manual_seed(0)
        model = Net(moe, 8)
        x = torch.randn(2, 5, 8)
        report = moe_compile.explain(model, x)
        rows = [r for r in report.regions if r.module_path == "moe"]
        if found:
            assert report.graph_breaks == 0 and len(rows) == 1 and rows[0].fused, str(report)
            assert "found by structure" in rows[0].pattern
        else:
            assert report.graph_breaks >= 1
            assert len(rows) == 1 and not rows[0].fused and "graph" in rows[0].reason, str(report)
            assert "MoE-like block" in str(report)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="moe", options={"compiler": "aot_eager"})
        (o0, g0), (o1, g1) = out_and_grads(model, x), out_and_grads(compiled, x)
        assert rel_err(o1, o0) <= 1e-6 and set(g0) == set(g1) and not grads_equal(g0, g1, 1e-6)


def test_fused_block_not_listed_twice():
    torch.manual_seed(0)
    report = moe_compile.explain(Net(InlineMoE(4, 8, 12, 2), 8), torch.randn(2, 5, 8))
    assert [(r.module_path, r.fused) for r in report.regions] == [("moe", True)], str(report)
