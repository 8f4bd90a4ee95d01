"""Every order of parallelize / DistributedDataParallel / torch.compile / optimizer either trains exactly like the
documented one (parallelize -> DDP -> torch.compile -> optimizer) or raises a ParallelError on every rank that
says what happened and the fix, before anything changed. Functions prefixed ``_w_`` run inside the gloo workers
(W = 2)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moe_compile import backend
from moe_compile import parallel as mp_
import parallel_harness as testing

TOL = 1e-5
COMPILE = dict(backend="moe", options={"compiler": "eager"})  # Dynamo + the moe passes, no AOT: quick


def _batch(step, n):
    g = torch.Generator().manual_seed(40 + step)
    return torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)


def _w_train(order: str) -> dict:
    """Two SGD steps of a model set up in ``order``, against one process on the global batch."""
    rank, W = dist.get_rank(), dist.get_world_size()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = testing.ToyMoE("stacked", E=4, layers=2)
    ref = copy.deepcopy(model)
    if order == "documented":  # parallelize -> DDP -> torch.compile
        mp_.parallelize(model, mode="expert")
        run = torch.compile(DistributedDataParallel(model), **COMPILE)
    elif order == "compile, parallelize, DDP":  # parallelize the compiled model before it ran
        compiled = torch.compile(model, **COMPILE)
        mp_.parallelize(compiled, mode="expert")
        run = DistributedDataParallel(compiled)
    elif order == "parallelize, compile, DDP":
        mp_.parallelize(model, mode="expert")
        run = DistributedDataParallel(torch.compile(model, **COMPILE))
    elif order == "compile, run, parallelize, DDP":  # the compiled model ran unparallelized first
        compiled = torch.compile(model, **COMPILE)
        with torch.no_grad():
            compiled(torch.randn(3, 16))
        mp_.parallelize(compiled, mode="expert")
        run = DistributedDataParallel(compiled)
    else:
        raise ValueError(order)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    errs = {"loss": 0.0, "weights": 0.0}
    T = 4
    for step, mode in enumerate(("expert", "data")):
        mp_.set_parallel(model, mode)
        x, c = _batch(step, W * T)
        mine = slice(rank * T, (rank + 1) * T)
        loss = 0.5 * ((run(x[mine]) - c[mine]) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss_ref = 0.5 * ((ref(x) - c) ** 2).sum(-1).mean()
        loss_ref.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        errs["loss"] = max(errs["loss"], testing.rel(total / W, loss_ref.detach()))
        full = mp_.full_state_dict(model)
        errs["weights"] = max(errs["weights"], max(testing.rel(full[n], v) for n, v in ref.state_dict().items()))
    return {"errors": errs, "calls": [b.calls for b in mp_.parallel_report(model).blocks],
            "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
            "last_graph": [r.pattern for r in backend.last_regions]}


@pytest.mark.parametrize("order", ["documented", "compile, parallelize, DDP", "parallelize, compile, DDP",
                                   "compile, run, parallelize, DDP"])
def test_orders_that_work_train_like_one_process(order):
    """torch.compile before parallelize (before or after the compiled model ran: its next call retraces, as the
    experts' parameters changed shape) and DDP around a compiled model train exactly like the documented order,
    and the compiled graph holds the parallel experts op (one fused node per block)."""
    for r in testing.shared_pool(2).run(_w_train, order):
        assert max(r["errors"].values()) <= TOL, r
        assert r["calls"] == [{"expert": 1, "data": 1}] * 2, r
        assert r["graphs"] == (2 if order.startswith("compile, run") else 1), r
        assert len(r["last_graph"]) == 2 and all(p.startswith("parallel ") for p in r["last_graph"]), r


def _catch(fn):
    try:
        fn()
    except mp_.ParallelError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - reported as a failure: the wrong type
        return f"not a ParallelError: {type(e).__name__}: {e}"
    return None


def _model():
    torch.manual_seed(0)
    return testing.ToyMoE("stacked", E=4, layers=1)


def _untouched(model, params) -> bool:
    """Nothing parallelized, the same parameter objects holding the same values."""
    now = dict(model.named_parameters())
    return (not mp_.tags.parallel_states(model) and now.keys() == params.keys()
            and all(now[n] is p and torch.equal(p, v) for n, (p, v) in params.items()))


def _snapshot(model):
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


def _w_mistakes() -> dict:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    out = {}

    # parallelize after DDP (also inside torch.compile): raised at once, nothing changed
    for name, wrap in (("DDP", lambda m: DistributedDataParallel(m)),
                       ("compile(DDP)", lambda m: torch.compile(DistributedDataParallel(m), **COMPILE))):
        model = _model()
        wrapped = wrap(model)
        snap = _snapshot(model)
        out[f"parallelize({name})"] = (_catch(lambda: mp_.parallelize(wrapped)), _untouched(model, snap))

    # parallelize on the module inside a DDP built before: the DDP's first forward (compiled too)
    model = _model()
    ddp = DistributedDataParallel(model)
    mp_.parallelize(model, mode="expert")
    out["DDP, parallelize, compile(ddp)"] = _catch(lambda: torch.compile(ddp, **COMPILE)(x))

    # a DDP whose names miss the ignore list (here: the list was emptied): its first forward
    model = mp_.parallelize(_model(), mode="expert")
    ignore = model._ddp_params_and_buffers_to_ignore
    model._ddp_params_and_buffers_to_ignore = []
    bad = DistributedDataParallel(model)
    model._ddp_params_and_buffers_to_ignore = ignore
    out["DDP without the ignore list"] = _catch(lambda: bad(x))

    # the optimizer built before parallelize: its zero_grad / step raise before changing anything
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mp_.parallelize(model, mode="expert")
    ddp = DistributedDataParallel(model)
    ddp(x).sum().backward()
    snap = _snapshot(model)
    step = _catch(opt.step)
    zero = _catch(opt.zero_grad)
    out["full_optim_state_dict of an optimizer built before"] = _catch(lambda: mp_.full_optim_state_dict(ddp, opt))
    out["optimizer before parallelize"] = (step, zero, all(torch.equal(p, v) for p, v in snap.values()),
                                           not any(opt.state.values()))  # (SGD makes empty entries on the way)
    adam = torch.optim.AdamW(model.parameters())  # built after: fine
    adam.step()
    out["optimizer after parallelize steps"] = bool(adam.state)

    # parallelize twice (the second time through torch.compile): every rank raises, nothing changed
    model = mp_.parallelize(_model(), mode="expert")
    states = mp_.tags.parallel_states(model)
    params = dict(model.named_parameters())
    again = _catch(lambda: mp_.parallelize(torch.compile(model, **COMPILE), mode="data"))
    out["parallelize twice"] = (again, mp_.tags.parallel_states(model) == states
                                and dict(model.named_parameters()) == params and mp_.get_parallel(model) == "expert")
    out["parallelize twice, through DDP"] = _catch(lambda: mp_.parallelize(DistributedDataParallel(model)))

    # set_parallel / full_state_dict before parallelize
    model = _model()
    out["set_parallel before parallelize"] = _catch(lambda: mp_.set_parallel(DistributedDataParallel(model), "data"))
    sd, full = model.state_dict(), mp_.full_state_dict(torch.compile(model, **COMPILE))
    out["full_state_dict unparallelized"] = sd.keys() == full.keys() and all(torch.equal(sd[n], full[n]) for n in sd)
    return out


def test_wrong_orders_raise_naming_the_fix():
    res = testing.shared_pool(2).run(_w_mistakes)
    assert res[0] == res[1]  # every rank: the same outcome
    r = res[0]
    for name in ("parallelize(DDP)", "parallelize(compile(DDP))"):
        msg, untouched = r[name]
        assert msg and "already wrapped in DistributedDataParallel" in msg, msg
        assert "Fix: call moe_compile.parallelize(model) before DistributedDataParallel(model)" in msg, msg
        assert untouched
    msg = r["DDP, parallelize, compile(ddp)"]
    assert msg and "DistributedDataParallel was built before moe_compile.parallelize" in msg, msg
    assert "Fix: call moe_compile.parallelize(model) first" in msg, msg
    msg = r["DDP without the ignore list"]
    assert msg and "manages the sharded expert parameters" in msg and "_ddp_params_and_buffers_to_ignore" in msg, msg
    step, zero, unchanged, no_state = r["optimizer before parallelize"]
    for msg in (step, zero):
        assert msg and "replaced the expert parameter blocks.0.experts.gate_up (4, 16, 16)" in msg, msg
        assert "Fix: build the optimizer after moe_compile.parallelize(model)" in msg, msg
    assert unchanged and no_state
    assert r["optimizer after parallelize steps"]
    msg, unchanged = r["parallelize twice"]
    assert msg and "blocks.0.experts: already parallelized" in msg and "moe_compile.set_parallel" in msg, msg
    assert unchanged
    msg = r["parallelize twice, through DDP"]
    assert msg and "already parallelized" in msg and "moe_compile.set_parallel" in msg, msg
    msg = r["full_optim_state_dict of an optimizer built before"]
    assert msg and "build the optimizer after parallelize" in msg, msg
    msg = r["set_parallel before parallelize"]
    assert msg and "call moe_compile.parallelize(model) first" in msg, msg
    assert r["full_state_dict unparallelized"]
