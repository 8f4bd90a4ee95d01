"""Multi-process harness and toy MoE models for the parallel tests and benchmark (gloo on CPU): test support,
not shipped in the wheel (the tests and benchmarks/bench_parallel.py put tests/ on sys.path).

``WorkerPool(W)`` starts ``W`` spawned processes once, joined in a gloo process group (rendezvous through a file,
so no port is ever guessed), and runs module-level functions on all of them: ``pool.run(fn, *args)`` returns the
``W`` results, or raises with every failing rank's traceback. Every wait is bounded: a hung collective fails the
call after ``timeout`` seconds (and the pool is then closed) instead of hanging the test run.

``compare(case)`` is the equivalence check the tests run on every rank: a model, a copy parallelized over the
group, and the single-process model on the concatenation of all ranks' tokens; it returns the largest relative
differences of outputs, input gradients, dense and expert parameter gradients, step after step (SGD), with the
parallel mode switched as ``case["modes"]`` says. ``ddp_compare(case)`` is the same for ``parallelize -> DDP ->
(torch.compile)`` training (SGD with momentum or AdamW, gradient accumulation under ``no_sync``, a data x expert
mesh from :func:`mesh_groups`), against one process on the global batch, including the optimizer state.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import math
import os
import queue
import shutil
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import moe_compile

# --------------------------------------------------------------------------------------------- process pool


class WorkerError(RuntimeError):
    pass


def _worker(rank: int, world: int, init_file: str, inq, outq, env: dict) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
    except BaseException:  # noqa: BLE001
        outq.put((rank, False, traceback.format_exc()))
        return
    outq.put((rank, True, "ready"))
    parent = os.getppid()
    while True:
        try:
            task = inq.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test process is gone (killed: no fixture teardown ran): end too
                os._exit(0)
            continue
        if task is None:
            break
        fn, args, kwargs = task
        try:
            outq.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            outq.put((rank, False, traceback.format_exc()))
    # no destroy_process_group: its teardown can wait on peers that already left; the process exit frees all


class WorkerPool:
    def __init__(self, world_size: int, env: dict | None = None, timeout: float = 120.0):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.timeout = timeout
        self._dir = tempfile.mkdtemp(prefix="moe_parallel_")
        init_file = os.path.join(self._dir, "rendezvous")
        self._in = [ctx.Queue() for _ in range(world_size)]
        self._out = ctx.Queue()
        env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self._procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, self._in[r], self._out, env),
                                   daemon=True) for r in range(world_size)]
        for p in self._procs:
            p.start()
        self.closed = False
        self._collect(timeout)  # every rank joined the group

    def _collect(self, timeout: float) -> list:
        results: list = [None] * self.world_size
        errors = {}
        deadline = time.monotonic() + timeout
        for _ in range(self.world_size):
            left = deadline - time.monotonic()
            try:
                rank, ok, val = self._out.get(timeout=max(left, 0.01))
            except queue.Empty:
                self.close()
                raise WorkerError(f"parallel workers gave no answer within {timeout:.0f} s (hung collective?); "
                                  f"errors so far: {errors}") from None
            if ok:
                results[rank] = val
            else:
                errors[rank] = val
        if errors:
            msg = "\n".join(f"--- rank {r}:\n{tb}" for r, tb in sorted(errors.items()))
            raise WorkerError(f"parallel workers failed:\n{msg}")
        return results

    def run(self, fn, *args, timeout: float | None = None, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; the ranks' results, in rank order."""
        if self.closed:
            raise WorkerError("the worker pool is closed")
        for q in self._in:
            q.put((fn, args, kwargs))
        return self._collect(timeout or self.timeout)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for q in self._in:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self._procs:
            p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SHARED: dict[int, WorkerPool] = {}


def shared_pool(world_size: int, timeout: float = 240.0) -> WorkerPool:
    """One pool per world size for the whole process (test files share it), closed at exit."""
    pool = _SHARED.get(world_size)
    if pool is None or pool.closed:
        pool = _SHARED[world_size] = WorkerPool(world_size, timeout=timeout)
        if len(_SHARED) == 1:
            atexit.register(close_shared)
    return pool


def close_shared() -> None:
    """Close every shared pool (the test session does at its end: atexit does not run in xdist workers)."""
    for pool in _SHARED.values():
        pool.close()


# --------------------------------------------------------------------------------------------- toy models
def loop_experts(x, idx, w, mlp):
    """The experts contract, one expert at a time (eager reference): ``mlp(e, rows) -> [rows, H]``."""
    out = torch.zeros_like(x)
    for e in range(int(idx.max()) + 1 if idx.numel() else 0):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        y = mlp(e, x[tok])
        if y is None:  # the "dropped" id
            continue
        out.index_add_(0, tok, (y * w[tok, slot, None]).to(x.dtype))
    return out


@moe_compile.experts
class StackedExperts(nn.Module):
    """HF-style stacked experts: ``gate_up [E, 2F, H]`` ([gate | up]), ``down [E, H, F]``, SwiGLU, optional biases."""

    def __init__(self, E: int, H: int, F: int, bias: bool = False):
        super().__init__()
        self.num_experts = E
        self.gate_up = nn.Parameter(torch.randn(E, 2 * F, H) * H ** -0.5)
        self.down = nn.Parameter(torch.randn(E, H, F) * F ** -0.5)
        if bias:
            self.gate_up_bias = nn.Parameter(torch.randn(E, 2 * F) * 0.1)
            self.down_bias = nn.Parameter(torch.randn(E, H) * 0.1)
        else:
            self.gate_up_bias = self.down_bias = None

    def _mlp(self, e, xs):
        if e >= self.num_experts:
            return None
        h = xs @ self.gate_up[e].t()
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[e]
        g, u = h.chunk(2, -1)
        y = (F.silu(g) * u) @ self.down[e].t()
        return y + self.down_bias[e] if self.down_bias is not None else y

    def forward(self, x, topk_idx, topk_weights):
        return loop_experts(x, topk_idx, topk_weights, self._mlp)


class MLP(nn.Module):
    def __init__(self, H: int, F: int, bias: bool = True):
        super().__init__()
        self.w1 = nn.Linear(H, F, bias=bias)  # gate
        self.w3 = nn.Linear(H, F, bias=bias)  # up
        self.w2 = nn.Linear(F, H, bias=bias)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ListExperts(nn.Module):
    """A hand-written experts module: an ``nn.ModuleList`` of MLPs (found by structure, not decorated)."""

    def __init__(self, E: int, H: int, F: int, bias: bool = True, sizes: list[int] | None = None):
        super().__init__()
        self.experts = nn.ModuleList(MLP(H, (sizes or [F] * E)[e], bias) for e in range(E))

    def forward(self, x, topk_idx, topk_weights):
        n = len(self.experts)
        return loop_experts(x, topk_idx, topk_weights, lambda e, xs: self.experts[e](xs) if e < n else None)


def hf_experts(family: str, E: int, H: int, F: int):
    """A transformers experts module (``mixtral``: concat SwiGLU; ``gpt_oss``: interleaved, transposed, biases)."""
    import transformers

    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E)
    elif family == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        cfg = transformers.GptOssConfig(hidden_size=H, intermediate_size=F, num_local_experts=E)
    else:
        raise ValueError(family)
    m = cls(cfg)
    fan_in = -2 if getattr(m, "is_transposed", False) else -1  # GPT-OSS stores [E, in, out]
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.5 * p.shape[fan_in] ** -0.5 if p.dim() == 3 else 0.05)
    return m


def make_experts(kind: str, E: int, H: int, F: int):
    if kind == "stacked":
        return StackedExperts(E, H, F)
    if kind == "stacked_bias":
        return StackedExperts(E, H, F, bias=True)
    if kind == "list":
        return ListExperts(E, H, F)
    return hf_experts(kind, E, H, F)


class MoEBlock(nn.Module):
    """Router (softmax top-k, renormalised when k > 1) + experts, residual. ``routing`` forces patterns for tests:
    ``"one"`` sends every token to experts ``0 .. k-1`` (all on expert 0 when k = 1); ``"drop"`` drops about a
    third of the tokens (id E); a ``capacity_factor`` drops the choices beyond each expert's capacity, as a
    capacity router does."""

    def __init__(self, experts: nn.Module, E: int, H: int, k: int, routing: str = "router",
                 capacity_factor: float | None = None):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = experts
        self.num_experts, self.top_k, self.routing = E, k, routing
        self.capacity_factor = capacity_factor

    def route(self, x):
        E, k = self.num_experts, self.top_k
        probs = F.softmax(self.router(x), dim=-1)
        if self.routing == "one":  # every token on experts 0 .. k-1 (expert 0 first), weighted by their scores
            idx = torch.arange(k, device=x.device).expand(x.shape[0], k).contiguous()
            w = probs.gather(1, idx)
        else:
            w, idx = torch.topk(probs, k, dim=-1)
            if k > 1:  # (a renormalised top-1 weight would be p / p: gradient noise over p)
                w = w / w.sum(-1, keepdim=True)
        if self.routing == "drop":
            drop = (x.detach()[:, :1] * 7).floor().remainder(3) == 0
            idx = torch.where(drop.expand_as(idx), torch.full_like(idx, E), idx)
        if self.capacity_factor is not None:
            cap = max(1, int(math.ceil(self.capacity_factor * x.shape[0] * k / E)))
            onehot = F.one_hot(idx.t().reshape(-1), E + 1)  # slot-major: earlier choices first
            pos = (onehot.cumsum(0) * onehot).sum(-1).view(k, -1).t()
            idx = torch.where(pos > cap, torch.full_like(idx, E), idx)
        return idx, w

    def forward(self, x):
        idx, w = self.route(x)
        return x + self.experts(x, idx, w)


class ToyMoE(nn.Module):
    """A dense input layer and ``layers`` MoE blocks on ``[T, H]`` tokens."""

    def __init__(self, kind: str = "stacked", E: int = 4, H: int = 16, F: int = 8, k: int = 2, layers: int = 2,
                 routing: str = "router", capacity_factor: float | None = None):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.blocks = nn.ModuleList(MoEBlock(make_experts(kind, E, H, F), E, H, k, routing, capacity_factor)
                                    for _ in range(layers))

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return x


class InlineBlock(nn.Module):
    """The most common hand-written MoE layer: router, ``nn.ModuleList`` of experts and the dispatch loop in one
    forward (no experts module, no decorator), on ``[T, H]`` or ``[B, S, H]`` hidden states, residual."""

    def __init__(self, E: int, H: int, F: int, k: int, gated: bool = True, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList((MLP(H, F, bias) if gated else
                                      nn.Sequential(nn.Linear(H, F, bias=bias), nn.GELU(), nn.Linear(F, H, bias=bias)))
                                     for _ in range(E))
        self.top_k = k

    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return hidden + out.view(shape)


class ToyInlineMoE(nn.Module):
    def __init__(self, E: int = 4, H: int = 16, F: int = 8, k: int = 2, layers: int = 2, gated: bool = True,
                 bias: bool = False):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.blocks = nn.ModuleList(InlineBlock(E, H, F, k, gated, bias) for _ in range(layers))

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return x


def toy_model(case: dict) -> nn.Module:
    """``ToyMoE`` of ``case["kind"]`` experts, or ``ToyInlineMoE`` for kind ``"inline"`` (``"inline_bias"``:
    ungated experts with biases)."""
    kind, E, H, F, k = case.get("kind", "stacked"), case["E"], case.get("H", 16), case.get("F", 8), case.get("k", 2)
    if kind.startswith("inline"):
        return ToyInlineMoE(E, H, F, k, case.get("layers", 2), gated=kind == "inline", bias=kind == "inline_bias")
    return ToyMoE(kind, E, H, F, k, case.get("layers", 2), case.get("routing", "router"), case.get("capacity_factor"))


# --------------------------------------------------------------------------------------------- equivalence
def catch(fn) -> str | None:
    """``fn()``'s exception as ``"Type: message"`` (None if it raised nothing): what the workers return."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """Largest difference relative to ``b``'s largest magnitude (at least ``floor``)."""
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


def compare(case: dict) -> dict:
    """Run on every rank of a pool. ``case``: kind, E, H, F, k, layers, routing, capacity_factor, tokens (per
    rank), modes (one per step; the first is passed to parallelize), lr, seed, compile (None, "aot_eager",
    "inductor"), local_world_size, device and dtype (default cpu, "float32"). Returns {quantity: largest relative difference} plus facts for the tests."""
    from moe_compile import parallel as api

    rank, W = dist.get_rank(), dist.get_world_size()
    tokens = case["tokens"]
    assert len(tokens) == W, (tokens, W)
    torch.manual_seed(case.get("seed", 0))
    # "device" / "dtype" (benchmarks/gpu_check.py: every rank on one GPU, gloo): the model and the data go there
    device, dtype = torch.device(case.get("device", "cpu")), getattr(torch, case.get("dtype", "float32"))
    model = toy_model(case).to(device=device, dtype=dtype)
    ref = copy.deepcopy(model)
    par = api.parallelize(copy.deepcopy(model), mode=case["modes"][0],
                          local_world_size=case.get("local_world_size"))
    run = par
    if case.get("compile"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run = torch.compile(par, backend="moe", options={"compiler": case["compile"]}, fullgraph=True)
    lr = case.get("lr", 0.01)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr)
    opt_par = torch.optim.SGD(par.parameters(), lr=lr)
    errs: dict[str, float] = {}
    facts: dict = {"modes_run": [], "reports": [], "per_step": [], "where": {}}

    def note(name, value, what=""):
        if name in errs and math.isnan(errs[name]):
            return
        if name not in errs or math.isnan(value) or value > errs[name]:
            errs[name] = value
            facts["where"][name] = f"step {len(facts['per_step']) - 1} {what}"
        facts["per_step"][-1][name] = max(facts["per_step"][-1].get(name, 0.0), value)

    H = case.get("H", 16)
    lo, hi = sum(tokens[:rank]), sum(tokens[: rank + 1])
    for step, mode in enumerate(case["modes"]):
        api.set_parallel(par, mode)
        facts["per_step"].append({"mode": mode})
        g = torch.Generator().manual_seed(1000 * case.get("seed", 0) + step)
        x_all = torch.randn(sum(tokens), H, generator=g).to(device=device, dtype=dtype)
        c_all = torch.randn(sum(tokens), H, generator=g).to(device=device, dtype=dtype)
        # the single-process model on every rank's tokens; loss = sum of the ranks' (squared error) losses.
        # A capacity router decides per batch, so then the reference sees each rank's batch separately.
        opt_ref.zero_grad(set_to_none=True)
        xr = x_all.clone().requires_grad_()
        if case.get("capacity_factor") is None:
            out_ref = ref(xr)
        else:
            bounds = [sum(tokens[:r]) for r in range(W + 1)]
            out_ref = torch.cat([ref(xr[bounds[r]:bounds[r + 1]]) for r in range(W)])
        (0.5 * (out_ref - c_all) ** 2).sum().backward()
        # the parallel model on this rank's tokens
        opt_par.zero_grad(set_to_none=True)
        x = x_all[lo:hi].clone().requires_grad_()
        out = run(x)
        (0.5 * (out - c_all[lo:hi]) ** 2).sum().backward()
        note("out", rel(out.detach(), out_ref.detach()[lo:hi]))
        note("dx", rel(x.grad, xr.grad[lo:hi]))
        ref_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ref.named_parameters()}
        # a gradient that is zero in exact arithmetic (a renormalised top-1 router's) is compared with the
        # model's gradient scale: 1% of the largest gradient
        floor = max(1e-2 * max(float(g.abs().max()) for g in ref_grads.values() if g.numel()), 1e-12)
        for n, p in par.named_parameters():
            if api.is_expert_param(p) or p.grad is None:
                continue
            dist.all_reduce(p.grad)  # dense: sum over ranks (what DDP does, up to its 1/W)
            note("dense_grad", rel(p.grad, ref_grads[n], floor), n)
        for path, m in api.tags.parallel_modules(par):
            pre = f"{path}."
            full = {n: ref_grads[pre + n] for s in m._moe_parallel.full_names.values() for n in s}
            want = api.checkpoint.local_from_full(m, full)
            for n, v in want.items():
                got = m.get_parameter(n).grad
                note("expert_grad", rel(got if got is not None else torch.zeros_like(v), v, floor), n)
            facts["modes_run"].append(m._moe_parallel.stats.last_mode)
        opt_ref.step()
        opt_par.step()
        facts["reports"].append(str(api.parallel_report(par)))
        # the updated shards still assemble into the single-process model's weights ...
        full = api.full_state_dict(par)
        sd = ref.state_dict()
        assert set(full) == set(sd), set(full) ^ set(sd)
        for n in sd:
            note("weights", rel(full[n], sd[n]), n)
        # ... and the next step starts from exactly the same weights (no drift between the two runs)
        api.load_full_state_dict(par, sd)
    facts["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    facts["ignored"] = list(par._ddp_params_and_buffers_to_ignore)
    facts["hierarchical"] = [m._moe_parallel.stats.last_hierarchical for _, m in api.tags.parallel_modules(par)]
    facts["capacity"] = [m._moe_parallel.stats.capacity for _, m in api.tags.parallel_modules(par)]
    return {"errors": errs, **facts}


_MESHES: dict = {}  # (W, ep, how) -> (experts group, replica group, mesh or None), made once per process


def mesh_groups(ep: int, how: str = "device_mesh"):
    """This rank's (experts group, replica group, DeviceMesh or None) of a ``(W/ep) x ep`` mesh: experts sharded
    over ``ep`` consecutive ranks, replicated over the ranks ``ep`` apart. ``how``: ``"device_mesh"``
    (``init_device_mesh``, dims named ``("dp", "ep")``) or ``"groups"`` (``dist.new_group``). Every rank calls it."""
    W, rank = dist.get_world_size(), dist.get_rank()
    key = (W, ep, how)
    if key not in _MESHES:
        if how == "device_mesh":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (W // ep, ep), mesh_dim_names=("dp", "ep"))
            _MESHES[key] = (mesh.get_group("ep"), mesh.get_group("dp"), mesh)
        else:
            mine = [None, None]
            for first in range(0, W, ep):  # every rank creates every group, in the same order
                g = dist.new_group(list(range(first, first + ep)))
                if first <= rank < first + ep:
                    mine[0] = g
            for j in range(ep):
                g = dist.new_group(list(range(j, W, ep)))
                if rank % ep == j:
                    mine[1] = g
            _MESHES[key] = (mine[0], mine[1], None)
    return _MESHES[key]


def _optimizer(name: str, params, lr: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    raise ValueError(name)


def _clip(case: dict, targets: dict):
    norm_type = case.get("norm_type", 2.0)
    how = case.get("clip_on", "run")
    if how == "torch":  # each rank by the norm of its own shards
        return torch.nn.utils.clip_grad_norm_(targets["params"], case["clip"], norm_type)
    return moe_compile.clip_grad_norm_(targets[how], case["clip"], norm_type)


def ddp_compare(case: dict) -> dict:
    """Run on every rank: ``parallelize -> DDP -> (torch.compile)`` training steps (loss = mean squared error over
    the rank's tokens) against the single-process model on the global batch with the mean loss.

    ``case``: kind, E, H, F, k, layers, tokens (per rank and micro-batch, all equal), modes (one per step), seed,
    compile (None, "aot_eager", "inductor"), optimize_ddp (torch._dynamo.config.optimize_ddp while compiling),
    bucket_cap_mb (DDP's; small values make DDPOptimizer split the compiled graph),
    optim ("sgd": SGD with momentum 0.9, "adamw": AdamW with weight decay 0.01), lr, micro (micro-batches per rank
    and step, all but the last under ``ddp.no_sync()``, each loss divided by ``micro``: gradient accumulation), ep
    (experts group size; smaller than the world: a ``(W/ep) x ep`` data x expert mesh), mesh ("device_mesh" or
    "groups": how that mesh is made and handed to parallelize), resync (load the reference's weights into the
    parallel model after each step, so fp32 rounding does not compound over the steps; optimizer state is never
    resynced), float64 (run everything in float64: no rounding to compound, differences ~1e-15), parallelize
    (more keywords for parallelize: tokens_per_call, rates; replicated experts count as expert_grad), clip (a max_norm:
    after the backward the reference clips with torch.nn.utils.clip_grad_norm_ and the parallel model with
    moe_compile.clip_grad_norm_; the returned norms are compared as "clip_norm" and listed per step as "norm" and
    "norm_ref"), norm_type (of the clipping, default 2), clip_on (what the parallel model clips: "run" the
    compiled or DDP model, "ddp", "params" a generator of parameters, or "torch": torch's own clip_grad_norm_ on
    the local parameters, which is wrong on sharded experts).
    Returns the largest relative differences (loss, dense_grad, expert_grad, weights, optim_state) and facts."""
    if case.get("float64"):
        old_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return ddp_compare({**case, "float64": False})
        finally:
            torch.set_default_dtype(old_dtype)
    from torch.nn.parallel import DistributedDataParallel

    from moe_compile import parallel as api

    rank, W = dist.get_rank(), dist.get_world_size()
    T, micro = case["tokens"], case.get("micro", 1)
    H = case.get("H", 16)
    ep = case.get("ep", W)
    torch.manual_seed(case.get("seed", 0))
    model = toy_model({**case, "routing": "router", "capacity_factor": None})
    ref = copy.deepcopy(model)
    if ep < W:
        ep_group, dp_group, mesh = mesh_groups(ep, case.get("mesh", "device_mesh"))
        kw = dict(mesh=mesh) if mesh is not None else dict(group=ep_group, dp_group=dp_group)
    else:
        kw = {}
    par = api.parallelize(copy.deepcopy(model), mode=case["modes"][0], **kw, **case.get("parallelize", {}))
    facts: dict = {"per_step": [], "report": str(api.parallel_report(par))}
    old_opt_ddp, old_first = torch._dynamo.config.optimize_ddp, dist._DEFAULT_FIRST_BUCKET_BYTES
    if "bucket_cap_mb" in case:  # DDP and DDPOptimizer want the first bucket no larger than the others
        dist._DEFAULT_FIRST_BUCKET_BYTES = min(old_first, int(case["bucket_cap_mb"] * 2 ** 20))
    ddp = DistributedDataParallel(par, **({"bucket_cap_mb": case["bucket_cap_mb"]} if "bucket_cap_mb" in case else {}))
    run = ddp
    if case.get("compile"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        if case.get("optimize_ddp") is not None:
            torch._dynamo.config.optimize_ddp = case["optimize_ddp"]
        run = torch.compile(ddp, backend="moe", options={"compiler": case["compile"]})
    optim = case.get("optim", "sgd")
    lr = case.get("lr", 0.02 if optim == "sgd" else 0.01)
    opt_ref = _optimizer(optim, ref.parameters(), lr)
    opt_par = _optimizer(optim, par.parameters(), lr)
    errs: dict[str, float] = {}

    def note(name, value):
        errs[name] = value if math.isnan(value) else max(errs.get(name, 0.0), value)
        facts["per_step"][-1][name] = max(facts["per_step"][-1].get(name, 0.0), value)

    try:
        for step, mode in enumerate(case["modes"]):
            facts["per_step"].append({"mode": mode})
            api.set_parallel(par, mode)
            g = torch.Generator().manual_seed(1000 * case.get("seed", 0) + step)
            x_all = torch.randn(W * micro * T, H, generator=g)
            c_all = torch.randn(W * micro * T, H, generator=g)
            opt_ref.zero_grad(set_to_none=True)
            loss_ref = 0.5 * ((ref(x_all) - c_all) ** 2).sum(-1).mean()
            loss_ref.backward()
            if case.get("clip") is not None:
                norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), case["clip"], case.get("norm_type", 2.0))
            opt_par.zero_grad(set_to_none=True)
            total = torch.zeros(())
            for j in range(micro):
                sl = slice((rank * micro + j) * T, (rank * micro + j + 1) * T)
                with (ddp.no_sync() if j < micro - 1 else contextlib.nullcontext()):
                    loss = 0.5 * ((run(x_all[sl]) - c_all[sl]) ** 2).sum(-1).mean() / micro
                    loss.backward()
                total += loss.detach()
            if case.get("clip") is not None:
                norm = _clip(case, {"run": run, "ddp": ddp, "params": par.parameters()})
                note("clip_norm", rel(norm, norm_ref))
                facts["per_step"][-1].update(norm=float(norm), norm_ref=float(norm_ref))
            dist.all_reduce(total)
            note("loss", rel(total / W, loss_ref.detach()))
            ref_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ref.named_parameters()}
            floor = max(1e-2 * max(float(v.abs().max()) for v in ref_grads.values()), 1e-12)
            for n, p in par.named_parameters():
                if not api.is_expert_param(p):
                    note("dense_grad", rel(p.grad, ref_grads[n], floor))  # DDP averaged it
                elif not getattr(p, "_ddp_ignored", False):  # a replicated experts module's: DDP averaged it too
                    note("expert_grad", rel(p.grad, ref_grads[n], floor))
            for path, m in api.tags.parallel_modules(par):
                full = {n: ref_grads[f"{path}.{n}"] for s in m._moe_parallel.full_names.values() for n in s}
                for n, v in api.checkpoint.local_from_full(m, full).items():
                    note("expert_grad", rel(m.get_parameter(n).grad, v, floor))
            opt_ref.step()
            opt_par.step()
            full_sd = api.full_state_dict(par)
            note("weights", max(rel(full_sd[n], v) for n, v in ref.state_dict().items()))
            # the optimizer state, gathered by parameter name, is the single-process optimizer's
            full_os, ref_os = api.full_optim_state_dict(par, opt_par), api.full_optim_state_dict(ref, opt_ref)
            assert set(full_os["state"]) == set(ref_os["state"]), set(full_os["state"]) ^ set(ref_os["state"])
            for fg, rg in zip(full_os["param_groups"], ref_os["param_groups"], strict=True):
                assert sorted(fg.pop("params")) == sorted(rg.pop("params")) and fg == rg, (fg, rg)
            for n, st in ref_os["state"].items():
                assert set(full_os["state"][n]) == set(st), (n, full_os["state"][n].keys(), st.keys())
                for key, v in st.items():
                    note("optim_state", rel(torch.as_tensor(full_os["state"][n][key]), torch.as_tensor(v)))
            if case.get("resync"):
                api.load_full_state_dict(par, ref.state_dict())
        # each rank's optimizer holds state only for its own shards: shaped like the local parameters
        facts["local_state_shapes_ok"] = all(
            tuple(v.shape) == tuple(p.shape) for p, st in opt_par.state.items() for v in st.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0)
        facts["expert_state_numel"] = sum(v.numel() for p, st in opt_par.state.items() if api.is_expert_param(p)
                                          for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        facts["ref_expert_state_numel"] = sum(
            v.numel() for n, p in ref.named_parameters() if ".experts." in n
            for v in opt_ref.state[p].values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    finally:
        torch._dynamo.config.optimize_ddp = old_opt_ddp
        dist._DEFAULT_FIRST_BUCKET_BYTES = old_first
    facts["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) if case.get("compile") else 0
    # graphs handed to aot_autograd: more than the Dynamo graphs when DDPOptimizer split them at bucket boundaries
    facts["aot_graphs"] = int(torch._dynamo.utils.counters["aot_autograd"]["total"]) if case.get("compile") else 0
    return {"errors": errs, **facts}
