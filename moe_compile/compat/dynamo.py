"""Dynamo, FX graph arguments, fake mode and inductor: every private torch.compile API moe_compile uses.

See :mod:`moe_compile.compat` for the list and why each is needed. Each function checks what it relies on when it
is installed or first used; a mismatch raises :class:`~moe_compile.compat.CompatError` or turns the feature off
loudly (:func:`moe_compile.compat.turn_off`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import re
import types

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401  (re-exported for passes.autocast)

from . import CompatError, torch_version, turn_off

# --------------------------------------------------------------------------------------------- Dynamo's settings


def _config():
    import torch._dynamo.config as config

    return config


def check_settings(names) -> None:
    """Raise unless every Dynamo setting in ``names`` exists on this torch."""
    missing = [n for n in names if not hasattr(_config(), n)]
    if missing:
        raise CompatError(f"moe_compile: torch {torch_version()} has no Dynamo setting {missing} "
                          "(torch._dynamo.config); dispatch code with nonzero / .tolist() cannot be traced whole")


def settings(names) -> dict:
    """The current values of Dynamo settings ``names``."""
    return {n: getattr(_config(), n) for n in names}


def patch_settings(values: dict):
    """A context manager that sets Dynamo settings for its duration (``torch._dynamo.config.patch``)."""
    return _config().patch(**values)


def reset() -> None:
    """Drop every compiled frame (public: ``torch.compiler.reset``)."""
    torch.compiler.reset()


# --------------------------------------------------------------------------------------------- the frame entry
FRAME_PARAMS = ("code", "globals", "locals", "closure", "compiler_fn")
"""The parameters of ``convert_frame.compile_frame`` the hook reads (by name, so a reordering is harmless)."""

_HOOK_MARK = "_moe_compile_frame_hook"


class Frame:
    """One call of Dynamo's per-frame compile: what is being compiled, for which backend, and how to go on."""

    def __init__(self, original, bound: inspect.BoundArguments):
        self._original, self._bound = original, bound

    @property
    def code(self) -> types.CodeType | None:
        return self._bound.arguments.get("code")

    @property
    def compiler_fn(self):
        return self._bound.arguments.get("compiler_fn")

    def roots(self) -> list:
        """The objects the frame's code can reach by name: its locals, its closure cells, its globals."""
        a = self._bound.arguments
        out = list((a.get("locals") or {}).values())
        for cell in a.get("closure") or ():
            try:
                out.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        out += list((a.get("globals") or {}).values())
        return out

    def compile(self, compiler_fn=None):
        """Compile the frame as Dynamo would, with ``compiler_fn`` instead of its own when given."""
        bound = self._bound
        if compiler_fn is not None:
            bound = inspect.BoundArguments(bound.signature, dict(bound.arguments))
            bound.arguments["compiler_fn"] = compiler_fn
        return self._original(*bound.args, **bound.kwargs)


def _convert_frame():
    from torch._dynamo import convert_frame

    return convert_frame


def install_frame_hook(hook) -> str:
    """Route Dynamo's per-frame compile through ``hook(frame: Frame)``, which must return ``frame.compile(...)``'s
    result. Idempotent. Returns "" when installed, else why it could not be (the caller turns its feature off)."""
    cf = _convert_frame()
    original = getattr(cf, "compile_frame", None)
    if original is None or not callable(original):
        return "torch._dynamo.convert_frame.compile_frame is gone"
    if getattr(original, _HOOK_MARK, None) is not None:
        return ""
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError) as e:
        return f"the signature of torch._dynamo.convert_frame.compile_frame cannot be read ({e})"
    missing = [p for p in FRAME_PARAMS if p not in signature.parameters]
    if missing:
        return (f"torch._dynamo.convert_frame.compile_frame{signature} has no parameter {missing} "
                f"(it reads {list(FRAME_PARAMS)})")

    @functools.wraps(original)
    def compile_frame(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:  # Dynamo calls it otherwise than its signature says: say so, once, and step aside
            turn_off("capture", f"Dynamo called convert_frame.compile_frame with other arguments ({e})")
            return original(*args, **kwargs)
        return hook(Frame(original, bound))

    setattr(compile_frame, _HOOK_MARK, original)
    cf.compile_frame = compile_frame
    return ""


def frame_hook_installed() -> bool:
    """Is Dynamo's per-frame compile still routed through the hook (nothing replaced it since)?"""
    return getattr(getattr(_convert_frame(), "compile_frame", None), _HOOK_MARK, None) is not None


def uninstall_frame_hook() -> None:
    """Put Dynamo's own per-frame compile back (tests)."""
    cf = _convert_frame()
    original = getattr(cf.compile_frame, _HOOK_MARK, None)
    if original is not None:
        cf.compile_frame = original


# --------------------------------------------------------------------------------------------- backends
WRAPPER_ATTRS = ("_torchdynamo_orig_backend", "compiler_fn", "backend_compile_fn", "__wrapped__", "func", "__self__")
"""Where Dynamo's debug wrapper, ``torch.compile``'s ``_TorchCompileWrapper`` and DDPOptimizer keep what they wrap."""


def backend_chain(compiler_fn):
    """``compiler_fn`` and everything it wraps (Dynamo's debug wrapper, torch.compile's, DDPOptimizer's)."""
    todo, seen = [compiler_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen or len(seen) > 32:
            continue
        seen.add(id(fn))
        yield fn
        todo.extend(getattr(fn, a, None) for a in WRAPPER_ATTRS)


def _ddp_optimizer_class():
    from torch._dynamo.backends.distributed import DDPOptimizer

    return DDPOptimizer


def splits_for_ddp(compiler_fn) -> bool:
    """Will DDPOptimizer split the graphs ``compiler_fn`` gets at DDP's bucket boundaries?"""
    cls = _ddp_optimizer_class()
    return any(isinstance(fn, cls) for fn in backend_chain(compiler_fn))


def is_data_dependent_error(err: BaseException) -> bool:
    """Is ``err`` (or what caused it) a guard on a data-dependent size (an unbacked SymInt used as a size)?"""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, GuardOnDataDependentSymNode):
            return True
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return False


def explain(fn):
    """``torch._dynamo.explain(fn)``: call the result like ``fn``; it returns graph and break counts."""
    import torch._dynamo

    return torch._dynamo.explain(fn)


# --------------------------------------------------------------------------------------------- compilers
def inductor(gm: fx.GraphModule, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def aot_eager(gm: fx.GraphModule, example_inputs):
    from torch._dynamo.backends.debugging import aot_eager as compile_aot_eager

    return compile_aot_eager(gm, example_inputs)


def inductor_options(**wanted) -> dict:
    """``wanted`` less the inductor settings this torch does not have (options for ``torch.compile``)."""
    import torch._inductor.config as config

    return {k: v for k, v in wanted.items() if hasattr(config, k)}


# --------------------------------------------------------------------------------------------- fake mode
@contextlib.contextmanager
def real_tensors():
    """Compute on real tensors while Dynamo's fake mode is active (the float64 proofs run inside a trace)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


def fake_mode():
    """A fake-tensor mode that also takes real inputs (``with fake_mode() as m: m.from_tensor(t)``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


# --------------------------------------------------------------------------------------------- graph arguments
ROOT = "L['self']"
"""How Dynamo names the compiled frame's ``self`` in module paths and sources."""

_MODULES_RE = re.compile(r"\._modules\['([^']+)'\]")
_PARAM_RE = re.compile(r"^(.*)\._parameters\['([^']+)'\]$")


def live_value(placeholder: fx.Node):
    """The live object behind a Dynamo graph placeholder (a parameter, the user's input), or None."""
    if not isinstance(placeholder, fx.Node) or placeholder.op != "placeholder":
        return None
    return getattr(placeholder.meta.get("grapharg"), "example", None)


def _source_name(placeholder: fx.Node) -> str | None:
    ga = placeholder.meta.get("grapharg")
    source = getattr(ga, "source", None)
    name = getattr(source, "name", None)
    if callable(name):  # a method on some torch versions, a property on others
        name = name()
    return name if isinstance(name, str) else None


def param_source(node: fx.Node):
    """``(module path, parameter name)`` of a parameter placeholder, e.g. ``("L['self'].moe.experts.0.w1",
    "weight")``, or None for any other node."""
    if node.op != "placeholder":
        return None
    name = _source_name(node)
    if name is None:
        return None
    m = _PARAM_RE.match(_MODULES_RE.sub(r".\1", name))
    return (m.group(1), m.group(2)) if m else None


def strip_root(path: str) -> str:
    """A Dynamo module path relative to the compiled frame's ``self`` (``"<top>"`` for ``self`` itself)."""
    for prefix in (ROOT + ".", ROOT):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path or "<top>"


def check_graph_args(gm: fx.GraphModule) -> str:
    """"" when Dynamo's placeholders carry what the graph passes read (``meta["grapharg"]`` with the live value,
    and a source name for each parameter), else why not. A graph without placeholders says nothing either way."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return ""
    if not any("grapharg" in n.meta for n in placeholders):
        return "Dynamo's graph placeholders carry no meta['grapharg'] (the live parameter behind each)"
    if any(isinstance(live_value(n), torch.nn.Parameter) and _source_name(n) is None for n in placeholders):
        return "Dynamo's graph arguments carry no source name (the parameter's path in the module)"
    return ""


GRAD_MODE_TARGETS = frozenset({torch._C._set_grad_enabled})
"""The node target Dynamo emits for ``torch.no_grad()`` / ``enable_grad()`` regions inside a graph."""


def op_name(target) -> str:
    """The op's short name for an ``OpOverload`` (``aten::topk`` -> ``topk``), else the callable's ``__name__``."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", "") or ""
