"""What one parallelized experts module runs: its group, storage layout and mode, and the per-mode math.

The custom op (``parallel.op``) looks the state up by key at run time and calls :meth:`ParallelState.forward` /
:meth:`ParallelState.backward`, so the mode can change between any two calls without touching a compiled graph.

Gradient convention: an expert parameter's gradient is the SUM over ranks of each rank's contribution (the
gradient of the sum of the ranks' losses), times ``grad_scale`` (1 by default). Inside a DistributedDataParallel
forward it is the MEAN over ranks instead (the sum divided by ``W``), as DDP averages the dense gradients: a step
on ``W`` ranks is then the single-process step on the global batch with the ranks' losses averaged (inside an
FSDP2 ``fully_shard`` module: the sum divided by FSDP2's gradient divide factor, as its dense gradients are). With a replica
group (data x expert mesh, ``dp``) "ranks" means all ``W * DP`` ranks of the mesh: the backward sums each call's
contribution over the replicas too (inside the op, on every backward: linear, so gradient accumulation with or
without ``no_sync`` neither skips nor double-counts it).

The backward recomputes the forward (token exchange, weight gathers, first GEMMs): nothing but the op's inputs
and a small integer record of the call (mode, capacity, DDP averaging, flat or hierarchical exchange, routing
counts) is kept between forward and backward.
"""
from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .. import kernels
from ..compat import distributed as torch_dist
from ..kernels.common import Weights, canonical_weights, weight_grads
from ..ops.parallel import register_state, state_for  # noqa: F401  (state_for: re-exported)
from ..spec import MoESpec
from . import cost, dispatch, fsdp_grads
from .comm import AllToAll, Comm, Traffic, transpose
from .layout import Layout, ParallelError

MODES = ("expert", "data", "tensor", "auto", "replicate")
"""Modes ``parallelize`` and ``set_parallel`` take. ``expert``/``data``/``tensor`` run on sharded experts, ``replicate``
on replicated ones (storage is chosen by ``parallelize`` and never changes), ``auto`` on either."""
_CODE = {"expert": 0, "data": 1, "tensor": 2}
_NAME = {v: k for k, v in _CODE.items()}
SLOTS = ("gate", "up", "down", "b_gate", "b_up", "b_down")

_DTYPE_CODES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype_name(code: int) -> str:
    return str(_DTYPE_CODES[code]) if code < len(_DTYPE_CODES) else "another dtype"


@dataclass
class Stats:
    calls: dict[str, int] = field(default_factory=dict)  # mode actually run -> forward calls
    last_mode: str | None = None
    last_estimate: dict[str, float] = field(default_factory=dict)  # auto: seconds per mode, last call
    capacity: int | None = None  # last padded capacity (rows per expert segment)
    last_hierarchical: bool = False  # the last call's all-to-all went within nodes, then across


class ParallelState:
    def __init__(self, *, key: str, path: str, spec: MoESpec, layout: Layout, world: Comm, a2a: AllToAll,
                 shard: Comm | None, local_world_size: int, mode: str, capacity_factor: float | None,
                 slot_counts: tuple[int, ...], local_names: list[str], full_names: dict[str, list[str]],
                 rates: cost.Rates, traffic: Traffic, weight_itemsize: int, dp: Comm | None = None):
        self.key, self.path = key, path
        self.spec = spec  # the whole module, as detected (E experts, ffn F, storage layout)
        self.local_spec = dataclasses.replace(spec, num_experts=layout.El, ffn=layout.Fl)
        self.layout = layout
        self.world, self.a2a, self.shard = world, a2a, shard
        self.dp = dp  # the replica group of a data x expert mesh (ranks holding the same shard), or None
        self.flat_a2a = AllToAll(world) if a2a.hierarchical else a2a  # auto may pick either, call by call
        self.local_world_size = local_world_size
        self.mode = mode
        self.capacity_factor = capacity_factor
        self.slot_counts = slot_counts
        self.local_names = local_names  # module parameter names, in op order
        self.full_names = full_names  # slot -> the unsharded module's parameter names (for full state dicts)
        self.rates = rates
        self.rates_fixed = False  # given to parallelize or set_rates: set_parallel("auto") does not measure
        self.layout_choice: cost.LayoutChoice | None = None  # why parallelize sharded this module
        self.traffic = traffic
        self._weight_itemsize = weight_itemsize
        self.grad_scale = 1.0
        self._ddp_checked: set[int] = set()
        self.stats = Stats()
        register_state(key, self)

    # the state holds process groups: a deep copy (EMA models...) shares it; pickling is refused
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError("a parallelized experts module cannot be pickled; save moe_compile.full_state_dict(model)")

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def W(self) -> int:
        return self.world.size

    @property
    def DP(self) -> int:
        """Replicas of this rank's shard (1 without a replica group)."""
        return self.dp.size if self.dp is not None else 1

    def valid_modes(self) -> tuple[str, ...]:
        return ("expert", "data", "tensor", "auto") if self.layout.E < self.layout.W else ("expert", "data", "auto")

    def mode_problem(self, mode: str) -> str | None:
        """Why this module cannot run ``mode`` (one of ``MODES``), or None (without the module's path)."""
        if mode in self.valid_modes():
            return None
        if mode == "replicate":
            return (f"its experts are sharded over {self.W} ranks, and 'replicate' runs replicated experts; "
                    "storage is chosen by parallelize: parallelize(model, mode='replicate') keeps them whole on "
                    "every rank (and 'auto' does when the cost model estimates it cheaper)")
        return (f"mode {mode!r} is not available (E={self.layout.E}, W={self.W}): 'tensor' needs fewer experts "
                "than ranks")

    def meta_len(self) -> int:
        return 4 + self.W + self.W * self.layout.E

    def _lists(self, params: list[Tensor]) -> list[list[Tensor]]:
        out, i = [], 0
        for n in self.slot_counts:
            out.append(list(params[i:i + n]))
            i += n
        return out

    def _compute_spec(self, mode: str) -> MoESpec:
        lay = self.layout
        if mode == "data":
            return dataclasses.replace(self.spec, num_experts=lay.E, ffn=lay.F)
        if mode == "tensor":
            return dataclasses.replace(self.spec, num_experts=1, ffn=lay.Fl)
        return dataclasses.replace(self.spec, num_experts=dispatch.n_local(lay, mode), ffn=lay.F)

    def _gather(self, local: Weights, comm: Comm, ranks: list[int], dst: int | None = None) -> Weights | None:
        """The whole weights of ``ranks`` (``comm``'s members in order) on every rank, or on the global rank ``dst``
        only (``None`` on the others)."""
        lay = self.layout
        packed = lay.pack(local)
        flat = comm.all_gather(packed) if dst is None else comm.gather(packed, dst)
        if flat is None:
            return None
        flat = flat.view(comm.size, -1)
        return lay.unshard([lay.unpack(flat[i]) for i in range(comm.size)], ranks)

    def _reduce_to_owners(self, full: Weights, comm: Comm, ranks: list[int], first: int) -> Weights:
        lay = self.layout
        return lay.unpack(comm.reduce_scatter(lay.pack_for(full, ranks, first)))

    def _weights(self, mode: str, local: Weights, forward: bool) -> Weights:
        """The canonical weights this rank computes with in ``mode``."""
        lay = self.layout
        if mode == "data":
            return self._gather(local, self.world, list(range(lay.W)))
        if mode == "expert" and lay.S > 1:
            return self._gather(local, self.shard, lay.shard_group(self.rank))
        if mode == "tensor" and forward and local.b2 is not None and lay.shard_index(self.rank) != 0:
            # the second bias is added once per expert, by its first shard
            return Weights(local.w1, local.w2, local.b1, None)
        return local

    def _local_grads(self, mode: str, d: Weights) -> Weights:
        """Gradients of the weights computed with in ``mode`` -> gradients of this rank's stored part."""
        lay = self.layout
        if mode == "data":
            return self._reduce_to_owners(d, self.world, list(range(lay.W)), 0)
        if mode == "expert" and lay.S > 1:
            return self._reduce_to_owners(d, self.shard, lay.shard_group(self.rank), lay.first_expert(self.rank))
        return d

    # ------------------------------------------------------------------------------------------- one call
    def _check(self, x: Tensor, idx: Tensor, w: Tensor) -> str | None:
        H, E = self.layout.H, self.layout.E
        if x.dim() != 2 or x.shape[1] != H:
            return f"hidden states must be [tokens, {H}], got {tuple(x.shape)}"
        if idx.dim() != 2 or idx.shape[0] != x.shape[0]:
            return f"topk_idx must be [tokens={x.shape[0]}, k], got {tuple(idx.shape)}"
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            return f"topk_idx must be an integer tensor, got {idx.dtype}"
        if w.shape != idx.shape:
            return f"topk_weights shape {tuple(w.shape)} differs from topk_idx shape {tuple(idx.shape)}"
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > E):
            return f"expert ids must lie in [0, {E}] ({E} = dropped), got [{int(idx.min())}, {int(idx.max())}]"
        return None

    def _ddp(self):
        """The DistributedDataParallel module whose forward is running (None outside DDP)."""
        ddp = torch_dist.active_ddp()
        if ddp is not None and id(ddp) not in self._ddp_checked:
            managed = torch_dist.ddp_parameters(ddp)
            if any(getattr(p, "_moe_replaced", False) for p in managed):
                raise ParallelError(
                    f"moe_compile.parallel ({self.path}): DistributedDataParallel was built before "
                    "moe_compile.parallelize, so it holds the unsharded expert parameters that parallelize replaced "
                    "(and would all-reduce the experts' gradients). Fix: call moe_compile.parallelize(model) first, "
                    "then DistributedDataParallel(model) (a new one now will do), then torch.compile")
            # sharded expert parameters (DDP must ignore them); replicated experts modules' are DDP's to all-reduce
            if any(getattr(p, "_moe_expert", False) and torch_dist.is_ddp_ignored(p) for p in managed):
                raise ParallelError(
                    f"moe_compile.parallel ({self.path}): DistributedDataParallel manages the sharded expert "
                    "parameters: the names of the module it wraps are not those in "
                    f"model.{torch_dist.IGNORE_ATTR} (a wrapper between DDP and the parallelized model other "
                    "than one torch.compile, or the list was changed), so its construction broadcast rank 0's "
                    "expert shards to every rank. Fix: rebuild the model, moe_compile.parallelize(model), then "
                    "DistributedDataParallel(model), then torch.compile")
            pg = getattr(ddp, "process_group", None)
            if pg is not None and dist.get_world_size(pg) != self.W * self.DP:
                raise RuntimeError(
                    f"moe_compile.parallel ({self.path}): DistributedDataParallel averages over "
                    f"{dist.get_world_size(pg)} ranks, but the experts are sharded over {self.W} ranks with "
                    f"{self.DP} replica(s) each. When the experts group is smaller than DDP's group, pass "
                    "parallelize(model, group=experts_group, dp_group=replica_group) (or mesh=), so that expert "
                    "gradients are reduced over the replicas too")
            self._ddp_checked.add(id(ddp))
        return ddp

    def _begin(self, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        """Gather every rank's token count and routing counts (one small all-gather), pick the mode, and return
        the call's record: ``[mode, capacity, gradient divisor, hierarchical, tokens (W), counts (W x E)]``; the
        divisor (float64 bits): ``W * DP`` inside a DDP forward, the gradient divide factor of the FSDP2 module
        holding this one (``fsdp_grads``), else 1."""
        lay, W, E = self.layout, self.W, self.layout.E
        divisor = float(W * self.DP) if self._ddp() is not None else (fsdp_grads.grad_divisor(self) or 1.0)
        why = self._check(x, idx, w)
        # [bad input, tokens, counts (E), k, dtype]: k and the dtype must agree across ranks (the all-to-alls
        # exchange rows of this dtype, k per token), so they travel with the counts and every rank checks them
        mine = torch.zeros(E + 4, dtype=torch.long, device=x.device)
        if why is None:
            mine[1] = x.shape[0]
            ones = torch.ones(idx.numel(), dtype=torch.long, device=x.device)
            counts = torch.zeros(E + 1, dtype=torch.long, device=x.device).scatter_add_(0, idx.reshape(-1).long(), ones)
            mine[2:E + 2] = counts[:E]
            mine[E + 2] = idx.shape[1]
            mine[E + 3] = _DTYPE_CODES.index(x.dtype) if x.dtype in _DTYPE_CODES else len(_DTYPE_CODES)
        else:
            mine[0] = 1
        table = self.world.all_gather(mine).view(W, E + 4).cpu()
        bad = [r for r in range(W) if table[r, 0]]
        if not bad:
            differ = [r for r in range(W) if not torch.equal(table[r, E + 2:], table[0, E + 2:])]
            if differ:
                bad = differ
                why = why or ("top-k and hidden-state dtype differ between ranks: " + ", ".join(
                    f"rank {r} k={int(table[r, E + 2])} {_dtype_name(int(table[r, E + 3]))}" for r in [0] + differ))
        if bad:
            here = f": {why}" if why else ""
            raise ValueError(f"moe_compile.parallel ({self.path}): bad experts input on rank(s) {bad}{here}")
        tokens = table[:, 1].tolist()
        C = table[:, 2:E + 2].tolist()
        mode = self.mode
        hier = self.a2a.hierarchical
        k = idx.shape[1]
        if mode == "auto":
            modes = tuple(m for m in self.valid_modes() if m != "auto")
            st = cost.CallStats(tokens, {m: dispatch.rows_matrix(lay, m, C, self._cap(m, tokens, C, k))
                                         for m in modes if m != "data"}, k, x.element_size(),
                                self._weight_itemsize)
            mode, hier, est = cost.choose(modes, lay, st, self.rates, self.local_world_size, self.a2a.hierarchical)
            self.stats.last_estimate = est
        cap = self._cap(mode, tokens, C, k)
        self.stats.calls[mode] = self.stats.calls.get(mode, 0) + 1
        self.stats.last_mode = mode
        self.stats.capacity = cap
        self.stats.last_hierarchical = hier and mode != "data"
        bits = struct.unpack("<q", struct.pack("<d", divisor))[0]
        rec = torch.tensor([_CODE[mode], -1 if cap is None else cap, bits, int(hier)] + tokens
                           + [c for row in C for c in row], dtype=torch.long)
        return rec.to(x.device)

    def _cap(self, mode: str, tokens: list[int], C: list[list[int]], k: int) -> int | None:
        """Rows per (source, expert) segment when splits are capacity-padded (a router with a capacity)."""
        if self.capacity_factor is None or mode not in dispatch.padded_modes(self.layout):
            return None
        E = self.layout.E
        cap = int(math.ceil(self.capacity_factor * max(tokens) * k / E))
        return max(cap, max(max(row) for row in C))  # never drop here: dropping is the router's decision

    def _decode(self, rec: Tensor):
        W, E = self.W, self.layout.E
        vals = rec.tolist()
        mode, cap, hier = _NAME[vals[0]], (None if vals[1] < 0 else vals[1]), bool(vals[3])
        divisor = struct.unpack("<d", struct.pack("<q", vals[2]))[0]
        C = [vals[4 + W + r * E: 4 + W + (r + 1) * E] for r in range(W)]
        return mode, cap, divisor, (self.a2a if hier else self.flat_a2a), C

    def _exchange(self, a2a: AllToAll, cols: list[Tensor], counts: list[list[int]]) -> list[Tensor]:
        """All-to-all of several row-aligned 2D tensors: one exchange per dtype (columns concatenated)."""
        out: list[Tensor | None] = [None] * len(cols)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(cols):
            by_dtype.setdefault(t.dtype, []).append(i)
        for ids in by_dtype.values():
            got = a2a(torch.cat([cols[i] for i in ids], 1), counts)
            widths = [cols[i].shape[1] for i in ids]
            for i, part in zip(ids, got.split(widths, 1)):
                out[i] = part
        return out

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, idx: Tensor, w: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        rec = self._begin(x, idx, w)
        mode, cap, _, a2a, C = self._decode(rec)
        local = canonical_weights(self.local_spec, *self._lists(params))
        spec = self._compute_spec(mode)
        wts = self._weights(mode, local, forward=True)
        if mode == "data":
            return kernels.forward(spec, x, idx, w, wts)[0], rec
        lay, k, T = self.layout, idx.shape[1], x.shape[0]
        plan = dispatch.make_plan(lay, mode, self.rank, idx, C, cap)
        tok = torch.where(plan.send_src >= 0, torch.div(plan.send_src, k, rounding_mode="floor"), T)
        xs = torch.cat([x, x.new_zeros(1, x.shape[1])])[tok]
        (xr,) = self._exchange(a2a, [xs], plan.counts)
        ones = xr.new_ones(xr.shape[0], 1)
        yr = kernels.forward(spec, xr, plan.recv_lid[:, None], ones, wts)[0]
        (ys,) = self._exchange(a2a, [yr], transpose(plan.counts))
        valid = plan.send_src >= 0
        pairs = plan.send_src[valid]
        ws = w.reshape(-1)[pairs]
        out = torch.zeros_like(x)
        out.index_add_(0, torch.div(pairs, k, rounding_mode="floor"), (ys[valid] * ws.unsqueeze(-1)).to(x.dtype))
        return out, rec

    # ------------------------------------------------------------------------------------------- backward
    def backward(self, grad: Tensor, x: Tensor, idx: Tensor, w: Tensor, params: list[Tensor], rec: Tensor):
        mode, cap, divisor, a2a, C = self._decode(rec)
        lists = self._lists(params)
        local = canonical_weights(self.local_spec, *lists)
        spec = self._compute_spec(mode)
        wts_f = self._weights(mode, local, forward=True)
        wts_b = wts_f
        if mode == "tensor" and local.b2 is not None and wts_f.b2 is None:
            wts_b = local  # every shard sees all rows of its expert: each computes the full bias gradient
        grad = grad.to(x.dtype)
        if mode == "data":
            _, h, r = kernels.forward(spec, x, idx, w, wts_f)
            dx, dw, d = kernels.backward(spec, grad, x, idx, w, wts_b, h, r, forward_b2=wts_f.b2 is not None)
        else:
            lay, k, T, H = self.layout, idx.shape[1], x.shape[0], x.shape[1]
            plan = dispatch.make_plan(lay, mode, self.rank, idx, C, cap)
            valid = plan.send_src >= 0
            tok = torch.where(valid, torch.div(plan.send_src, k, rounding_mode="floor"), T)
            xs = torch.cat([x, x.new_zeros(1, H)])[tok]
            gs = torch.cat([grad, grad.new_zeros(1, H)])[tok]
            ws = torch.cat([w.reshape(-1), w.new_zeros(1)])[torch.where(valid, plan.send_src, T * k)]
            xr, gr, wr = self._exchange(a2a, [xs, gs, ws.unsqueeze(-1)], plan.counts)
            lid = plan.recv_lid[:, None]
            _, h, r = kernels.forward(spec, xr, lid, wr, wts_f)
            dxr, dwr, d = kernels.backward(spec, gr, xr, lid, wr, wts_b, h, r, forward_b2=wts_f.b2 is not None)
            dxs, dws = self._exchange(a2a, [dxr, dwr], transpose(plan.counts))
            pairs = plan.send_src[valid]
            dx = torch.zeros_like(x).index_add_(0, torch.div(pairs, k, rounding_mode="floor"), dxs[valid])
            dw = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
            dw.index_add_(0, pairs, dws[valid, 0].to(w.dtype))
            dw = dw.view(w.shape)
        d = self._local_grads(mode, d)
        grads = weight_grads(self.local_spec, d, *lists)
        s = self.grad_scale / divisor
        flat = [g.mul(s) for gs_ in grads for g in gs_]  # fresh tensors (never views of one buffer)
        if self.dp is not None:  # sum this backward's contribution over the replicas of the shard
            total = self.dp.all_reduce(torch.cat([g.reshape(-1) for g in flat]))
            flat = [t.view_as(g).clone() for t, g in zip(total.split([g.numel() for g in flat]), flat)]
        return dx, dw, flat
