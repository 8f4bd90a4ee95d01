"""Every misuse raises a clear error naming the problem (and, where there is one, the fix) before anything changes.
docs/errors.md lists each message with the test that triggers it: the tests here, or the test file named there."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import moe_compile
from moe_compile import MoESpec
from parallel_harness import catch, toy_model
from strategies import Case, build, inputs

H = 8


def _model():
    return build(Case("decorated_stacked", E=4, k=2, tokens=5, seed=0))


# --------------------------------------------------------------------------------------------- the backend
@pytest.mark.parametrize("options,match", [
    ({"compilr": "eager"}, r"moe backend: unknown option 'compilr'; known options: \['compiler'\]"),
    ({"compiler": "tensorrt"}, r"options\['compiler'\] must be one of \('inductor', 'aot_eager', 'eager'\), "
                               r"got 'tensorrt'"),
])
def test_backend_options(options, match):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options=options)
    with pytest.raises(Exception, match=match):
        compiled(inputs(Case("loop", E=4, k=2)))
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in before.items())


@pytest.mark.parametrize("kw,match", [
    (dict(activation="tanh"), r"unknown activation 'tanh'; known: \('silu'"),
    (dict(gate_layout="stacked"), r"unknown gate layout 'stacked'; known: \('none'"),
    (dict(weight_layout="row"), r"unknown weight layout 'row'; known: \('out_in', 'in_out'\)"),
    (dict(expert_body="conv"), r"expert_body must be 'mlp' or 'user', got 'conv'"),
    (dict(top_k=0), r"sizes must be positive"),
])
def test_spec(kw, match):
    with pytest.raises(ValueError, match=match):
        MoESpec(**{**dict(num_experts=4, top_k=2, hidden=8, ffn=6), **kw})


# --------------------------------------------------------------------------------------------- the decorator
def test_decorator_needs_a_module_class():
    with pytest.raises(TypeError, match=r"@moe_compile.experts decorates an nn.Module subclass, not <function"):
        moe_compile.experts(lambda x: x)


def test_decorator_needs_three_arguments():
    class TwoArgs(nn.Module):
        def forward(self, hidden, topk_idx):
            return hidden

    with pytest.raises(TypeError, match=r"TwoArgs.forward must take \(hidden, topk_idx, topk_weights\); its "
                                        r"parameters are \['hidden', 'topk_idx'\]"):
        moe_compile.experts(TwoArgs)


@moe_compile.experts
class ScaledExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, H, H))

    def forward(self, hidden, topk_idx, topk_weights, scale=1.0):
        return hidden @ self.w[0] * scale


class CallsWithExtra(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = ScaledExperts()

    def forward(self, x):
        idx = torch.zeros(x.shape[0], 1, dtype=torch.long)
        return self.experts(x, idx, torch.ones(x.shape[0], 1), scale=2.0)


def test_captured_call_with_an_extra_argument():
    torch._dynamo.reset()
    compiled = torch.compile(CallsWithExtra(), backend="moe", options={"compiler": "eager"})
    with pytest.raises(Exception, match=r"moe_compile captures ScaledExperts.forward.* with exactly its arguments "
                                        r"\['hidden', 'topk_idx', 'topk_weights'\].*also got \['scale'\], which the "
                                        r"fused op cannot carry: pass only those three, or leave the class undecorated"):
        compiled(torch.randn(3, H))
    assert CallsWithExtra()(torch.randn(3, H)).shape == (3, H)  # eager: the module's own code, unchanged


def test_captured_module_that_no_longer_exists():
    with pytest.raises(RuntimeError, match=r"the experts module gone behind a compiled graph no longer exists"):
        torch.ops.moe_compile.experts_call(torch.randn(2, H), torch.zeros(2, 1, dtype=torch.long),
                                           torch.ones(2, 1), [], "gone")


# --------------------------------------------------------------------------------------------- the fused op
def _op(x, idx, w):
    spec = MoESpec(num_experts=4, top_k=2, hidden=H, ffn=6, activation="relu", gate_layout="none")
    up, down = [torch.randn(4, 6, H)], [torch.randn(4, H, 6)]
    return torch.ops.moe_compile.experts(x, idx, w, [], up, down, [], [], [], spec.to_json())


@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(1, 3, H), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)), ValueError,
     r"hidden states must be \[tokens, hidden\], got shape \(1, 3, 8\)"),
    ((torch.randn(3, H), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2)), ValueError,
     r"topk_idx must be \[tokens=3, k\], got shape \(2, 2\)"),
    ((torch.randn(3, H), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1)), ValueError,
     r"topk_weights shape \(3, 1\) differs from topk_idx shape \(3, 2\)"),
    ((torch.randn(3, H), torch.zeros(3, 2), torch.ones(3, 2)), TypeError,
     r"topk_idx must be an integer tensor, got torch.float32"),
    ((torch.randn(3, H), torch.full((3, 2), 5), torch.ones(3, 2)), ValueError,
     r"expert ids must lie in \[0, 4\] \(4 = dropped\), got \[5, 5\]"),
])
def test_fused_op_routing(args, exc, match):
    with pytest.raises(exc, match=match):
        _op(*args)


def test_slots_op_shapes():
    from moe_compile.ops import experts_slots

    spec = MoESpec(num_experts=2, top_k=2, hidden=H, ffn=6, activation="relu", gate_layout="none")
    with pytest.raises(RuntimeError, match=r"dispatch \(3, 2, 2\) and combine \(3, 2, 3\) \[tokens, experts, "
                                           r"capacity\] and x \(3, 8\) .* disagree.*Compile with another backend"):
        experts_slots(torch.randn(3, H), torch.zeros(3, 2, 2), torch.zeros(3, 2, 3), [], [torch.randn(2, 6, H)],
                      [torch.randn(2, H, 6)], [], [], [], spec.to_json())


# --------------------------------------------------------------------------------------------- parallel, 1 process
def test_set_parallel_before_parallelize():
    with pytest.raises(ValueError, match=r"moe_compile.set_parallel: the model has no parallelized experts modules; "
                                         r"call moe_compile.parallelize\(model\) first"):
        moe_compile.set_parallel(_model(), "expert")


def test_set_parallel_unknown_mode():
    model = moe_compile.parallelize(_model(), mode="data")
    before = moe_compile.get_parallel(model)
    with pytest.raises(ValueError, match=r"unknown parallel mode 'pipeline'; known: \('expert'"):
        moe_compile.set_parallel(model, "pipeline")
    assert moe_compile.get_parallel(model) == before


def test_group_without_torch_distributed():
    assert not dist.is_initialized()
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"a group was given but torch.distributed is not initialized"):
        moe_compile.parallelize(model, group=object())
    assert set(before) == set(model.state_dict()) and all(torch.equal(v, model.state_dict()[n])
                                                          for n, v in before.items())


def test_parallel_state_that_no_longer_exists():
    with pytest.raises(RuntimeError, match=r"the parallel experts module gone no longer exists"):
        from moe_compile.parallel.state import state_for

        state_for("gone")


# --------------------------------------------------------------------------------------------- parallel, W = 2
def _parallel_misuse(what: str):
    """Run on both ranks of the pool; the error each rank raised (None if none)."""
    torch.manual_seed(0)
    model = toy_model(dict(kind="stacked", E=4, k=2, layers=1))
    if what == "mesh_and_group":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2,))
        return catch(lambda: moe_compile.parallelize(model, mesh=mesh, group=dist.group.WORLD))
    if what == "split_ffn":
        return catch(lambda: moe_compile.parallelize(toy_model(dict(kind="stacked", E=1, k=1, F=7, layers=1)),
                                                     mode="tensor"))
    par = moe_compile.parallelize(model, mode="expert")
    x = torch.randn(6, 16)
    if what == "pickle":
        return catch(lambda: pickle.dumps(par.blocks[0].experts._moe_parallel))
    if what == "norm_type":
        par(x).pow(2).sum().backward()
        return catch(lambda: moe_compile.clip_grad_norm_(par, 1.0, norm_type=-1))
    if what == "nonfinite":
        par(x).pow(2).sum().backward()
        next(par.parameters()).grad[0, 0] = float("inf")
        return catch(lambda: moe_compile.clip_grad_norm_(par, 1.0, error_if_nonfinite=True))
    if what == "missing_expert_weights":
        sd = moe_compile.full_state_dict(par)
        sd = {n: v for n, v in sd.items() if "experts" not in n}
        return catch(lambda: moe_compile.load_full_state_dict(par, sd))
    if what == "foreign_param":
        opt = torch.optim.SGD(list(par.parameters()) + [nn.Parameter(torch.zeros(1))], lr=0.1)
        return catch(lambda: moe_compile.full_optim_state_dict(par, opt))
    if what == "split_groups":
        ex = [p for n, p in par.named_parameters() if "experts" in n]
        rest = [p for n, p in par.named_parameters() if "experts" not in n]
        opt = torch.optim.SGD([{"params": rest + ex[:1]}, {"params": ex[1:]}], lr=0.1)
        return catch(lambda: moe_compile.full_optim_state_dict(par, opt))
    if what == "group_count":
        opt = torch.optim.SGD(par.parameters(), lr=0.1)
        osd = moe_compile.full_optim_state_dict(par, opt)
        osd["param_groups"] = osd["param_groups"] * 2
        return catch(lambda: moe_compile.load_full_optim_state_dict(par, opt, osd))
    raise ValueError(what)


@pytest.mark.parametrize("what,match", [
    ("mesh_and_group", r"ParallelError: moe_compile.parallelize: pass either mesh or group / dp_group, not both"),
    ("split_ffn", r"with 1 experts on 2 ranks each expert's hidden dimension \(7\) is split 2 ways, but 7 is not "
                  r"divisible by 2"),
    ("pickle", r"TypeError: a parallelized experts module cannot be pickled; save moe_compile.full_state_dict"),
    ("norm_type", r"norm_type -1 is not supported with sharded experts; use a positive p or inf"),
    ("nonfinite", r"RuntimeError: The total norm of order 2.0 for gradients from `parameters` is non-finite"),
    ("missing_expert_weights", r"KeyError: .*moe_compile.load_full_state_dict: missing expert weights"),
    ("foreign_param", r"the optimizer holds a parameter that is not in the model \(build the optimizer after "
                      r"parallelize, on the model's parameters\)"),
    ("split_groups", r"the parameters of blocks.0.experts are in different parameter groups; keep each experts "
                     r"module in one group"),
    ("group_count", r"load_full_optim_state_dict: 2 parameter groups in the dict, 1 in the optimizer"),
])
def test_parallel_misuse_raises_on_every_rank(pool2, what, match):
    import re

    errors = pool2.run(_parallel_misuse, what)
    assert all(e is not None and re.search(match, e) for e in errors), errors
