"""explain on a parallelized model: each parallelized experts module is one fused ``moe_compile::parallel_experts``
call, listed with its parallel mode and storage, whether the model is given plain, DDP-wrapped or compiled.
Functions prefixed ``_w_`` run inside the gloo workers (W = 2)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import moe_compile
from moe_compile import parallel as mp_
import parallel_harness as testing


def _rows(report):
    return [(r.module_path, r.pattern, r.fused, r.spec.num_experts if r.spec is not None else None)
            for r in report.regions]


def _w_explain_parallelized(kind, E, every_wrapper):
    torch.manual_seed(0)
    model = testing.ToyMoE(kind, E=E, layers=2)
    mp_.parallelize(model, mode="expert")
    ddp = DistributedDataParallel(model)
    compiled = torch.compile(ddp, backend="moe", options={"compiler": "aot_eager"})
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    compiled(x).sum().backward()  # it has run (and compiled) before explain is asked
    out = {}
    for name, m in (("plain", model), ("ddp", ddp), ("compiled", compiled))[0 if every_wrapper else 2:]:
        rep = moe_compile.explain(m, x)
        out[name] = (_rows(rep), rep.graph_breaks, str(rep))
    if every_wrapper:
        mp_.set_parallel(compiled, "data")  # the same node, described in the mode it runs now
        rep = moe_compile.explain(compiled, x)
        out["data"] = (_rows(rep), rep.graph_breaks, str(rep))
    out["still_trains"] = bool(torch.isfinite(compiled(x)).all())
    return out


def test_explain_lists_parallelized_blocks_as_fused():
    pool = testing.shared_pool(2)
    for kind, E, storage, what in (("stacked", 4, "2 of 4 experts per rank", "stacked experts, silu"),
                                   ("list", 2, "1 of 2 experts per rank", "ModuleList experts, silu")):
        for res in pool.run(_w_explain_parallelized, kind, E, kind == "stacked"):
            assert len(res) == (5 if kind == "stacked" else 2)
            assert res.pop("still_trains")
            for name, (rows, breaks, text) in res.items():
                mode = "data" if name == "data" else "expert"
                want = f"parallel {mode}, {storage} ({what}), router softmax"
                assert rows == [(f"blocks.{i}.experts", want, True, E) for i in range(2)], (name, text)
                assert breaks == 0, text
                assert text.startswith("moe_compile.explain: 2/2 MoE regions fused"), text
                assert f"blocks.0.experts  {want}  yes" in text, text
                assert "_orig_mod" not in text and "module.blocks" not in text, text  # wrappers looked through


def _w_explain_hidden_slices():
    torch.manual_seed(0)
    model = mp_.parallelize(testing.ToyMoE("stacked_bias", E=1, k=1, layers=1), mode="tensor")
    rep = moe_compile.explain(DistributedDataParallel(model), torch.randn(4, 16))
    return _rows(rep), str(rep)


def test_explain_parallelized_hidden_slices():
    """E < W: each rank holds a slice of the expert's hidden size, in tensor mode."""
    for rows, text in testing.shared_pool(2).run(_w_explain_hidden_slices):
        assert len(rows) == 1 and rows[0][2], text
        assert rows[0][1].startswith("parallel tensor, 1/2 of one expert's hidden size (4 of 8) per rank"), text
