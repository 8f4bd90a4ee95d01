"""moe_compile.compat: every hook installs on the running torch / transformers, and a hook whose target is not
what it expects is reported loudly (a warning and ``compat.off()`` / explain, or an error), never silently off."""
import inspect
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.fx as fx

import moe_compile
from moe_compile import compat
from moe_compile.compat import CompatError, distributed, dynamo, hf
from models import InlineMoE, Net

HERE = os.path.dirname(__file__)
PACKAGE = pathlib.Path(moe_compile.__file__).parent


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=240)


# --------------------------------------------------------------------------------------------- installed here
def test_every_hook_installs_on_this_torch():
    assert compat.off() == {}, compat.off()
    assert dynamo.frame_hook_installed()
    dynamo.check_settings(moe_compile.scope.SETTINGS)
    from torch._dynamo import convert_frame

    original = convert_frame.compile_frame._moe_compile_frame_hook  # Dynamo's own, behind the hook
    assert set(dynamo.FRAME_PARAMS) <= set(inspect.signature(original).parameters)


def test_hf_experts_hook_installs_when_transformers_has_experts_modules():
    moe = pytest.importorskip("transformers.integrations.moe")
    get_interface = moe.ExpertsInterface.get_interface
    assert getattr(get_interface, "_moe_compile_original", None) is not None
    assert hf.install_experts_hook(lambda fn: fn) == ""  # idempotent: installed once


def test_graph_arguments_carry_what_the_passes_read():
    """A real Dynamo graph: each parameter placeholder gives its live parameter and its path."""
    torch.manual_seed(0)
    model = Net(InlineMoE(4, 8, 12, 2), 8)
    checks, seen = [], {}

    def read(gm, example_inputs):  # Dynamo drops meta["grapharg"] once the backend returns: read it here
        checks.append(dynamo.check_graph_args(gm))
        for node in gm.graph.nodes:
            src = dynamo.param_source(node)
            if src is not None:
                seen[dynamo.strip_root(src[0]) + "." + src[1]] = dynamo.live_value(node)
        return gm.forward

    with moe_compile.scope.moe_scope():  # the moe settings: one graph, rooted at the model
        torch.compile(model, backend=read)(torch.randn(2, 3, 8))
    params = dict(model.named_parameters())
    assert checks and set(checks) == {""}, checks
    assert seen and all(seen[n] is params[n] for n in seen), sorted(seen)


def test_ddp_and_fsdp_internals_are_there():
    assert distributed.active_ddp() is None  # outside every DDP forward
    from torch.distributed.fsdp import FSDPModule

    assert hasattr(FSDPModule, "_get_fsdp_state")
    root = torch.nn.Linear(2, 2)
    distributed.set_ddp_ignored_names(root, ["weight"])
    assert distributed.ddp_ignored_names(root) == ["weight"] and distributed.is_ddp_ignored(root.weight)
    assert not distributed.is_ddp_ignored(root.bias)


def test_no_module_outside_compat_touches_private_apis():
    private = re.compile(r"torch\._(dynamo|inductor|subclasses|guards|higher_order_ops|functorch|C\b|prims|logging|"
                         r"export|ops)|(?<!\w)(_get_fsdp_state|_ddp_params|_ddp_ignored|_active_ddp|"
                         r"_experts_implementation|_orig_mod|_functional_collectives|_python_dispatch|_DropoutNd|"
                         r"_fsdp_param_group|_module_parameters)|convert_frame|get_interface|grapharg|L\['self'\]")
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py") if p.parent.name != "compat"
            for i, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert not hits, hits


# --------------------------------------------------------------------------------------------- broken on purpose
def test_a_renamed_frame_entry_parameter_turns_capture_off_loudly():
    """Dynamo's compile_frame without a ``compiler_fn`` parameter: import warns, compat.off() and explain say why,
    and a model still compiles and runs (unfused inline code, equal to eager)."""
    r = _run("""
        import torch
        from torch._dynamo import convert_frame
        original = convert_frame.compile_frame
        def compile_frame(code, globals, locals, builtins, closure, compiler, *args, **kwargs):
            return original(code, globals, locals, builtins, closure, compiler, *args, **kwargs)
        convert_frame.compile_frame = compile_frame
        import moe_compile
        from models import InlineMoE, Net
        assert "capture" in moe_compile.compat.off(), moe_compile.compat.off()
        torch.manual_seed(0)
        m = Net(InlineMoE(4, 8, 12, 2), 8)
        x = torch.randn(2, 5, 8)
        print(moe_compile.explain(m, x))
        out = torch.compile(m, backend="moe", options={"compiler": "eager"})(x)
        assert torch.allclose(out, m(x), atol=1e-6)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"RuntimeWarning: moe_compile: capture off on torch [^:]+: .*compiler_fn", r.stderr), r.stderr
    assert re.search(r"^capture off: .*compiler_fn", r.stdout, re.M), r.stdout


def test_a_changed_hf_experts_interface_turns_hf_capture_off_loudly():
    pytest.importorskip("transformers.integrations.moe")
    r = _run("""
        from transformers.integrations import moe
        def get_interface(self, name, fallback):
            return fallback
        moe.ExpertsInterface.get_interface = get_interface
        import moe_compile
        print(moe_compile.compat.off())
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "HF experts capture off on torch" in r.stderr and "no longer takes" in r.stderr, r.stderr
    assert "'HF experts capture'" in r.stdout, r.stdout


def test_a_missing_dynamo_setting_raises():
    with pytest.raises(CompatError, match="no Dynamo setting"):
        dynamo.check_settings(["capture_dynamic_output_shape_ops", "no_such_setting_in_any_torch"])


def test_a_missing_ddp_record_raises(monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.delattr(DistributedDataParallel, "_active_ddp_module")
    with pytest.raises(CompatError, match=r"torch .* has no DistributedDataParallel._active_ddp_module"):
        distributed.active_ddp()


def test_missing_fsdp_internals_raise_instead_of_defaulting():
    class NoState(torch.nn.Module):
        pass

    class State:
        pass

    class WithState(torch.nn.Module):
        def _get_fsdp_state(self):
            return State()

    with pytest.raises(CompatError, match="FSDPModule._get_fsdp_state"):
        distributed.fsdp_param_group(NoState())
    with pytest.raises(CompatError, match="_fsdp_param_group"):
        distributed.fsdp_param_group(WithState())
    with pytest.raises(CompatError, match="mesh_info"):
        distributed.fsdp_data_parallel_size(State())
    with pytest.raises(CompatError, match="gradient_divide_factor"):
        distributed.fsdp_gradient_divide_factor(State())


def test_graph_without_graph_args_turns_inline_fusion_off_loudly(monkeypatch):
    monkeypatch.setattr(compat, "_OFF", {})
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(x)
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert "grapharg" in dynamo.check_graph_args(gm)
    with pytest.warns(RuntimeWarning, match="fusion of MoE code traced inline off on torch"):
        assert moe_compile.passes.fuse_moe(gm, rewrite=False) == []
    assert "fusion of MoE code traced inline" in compat.off()


def test_a_frame_hook_replaced_by_someone_else_is_detected(monkeypatch):
    from torch._dynamo import convert_frame

    monkeypatch.setattr(convert_frame, "compile_frame", lambda *a, **k: None)
    assert not dynamo.frame_hook_installed()
