"""The cost model behind ``mode="auto"``: seconds per forward + backward of one experts call, per mode.

Each mode moves different bytes and computes different rows:

- ``expert``: tokens travel (dispatch and combine, forward and backward: ``(5H + 2)`` values per (token, slot) row
  moved, counting the backward's ``[x | grad | weight]`` rows and ``[dx | dweight]`` replies); the busiest rank's
  received rows bound the GEMM time. With ``E < W`` each expert is first gathered over its ``S`` shards.
- ``data``: weights travel (all-gather forward, again backward, reduce-scatter of the gradients: 3 x
  ``(W-1)/W`` of all expert weights); every rank computes its own tokens.
- ``tensor``: tokens travel to all ``S`` ranks of their expert (``S`` times the expert-mode rows, ``F/S`` wide).

The backward recomputes the forward (nothing but the op inputs is kept), so one call costs 4 forward GEMM
passes. Compute runs at ``gemm_flops``; a message costs ``latency`` plus its bytes over ``bandwidth``, with
separate rates within a node and across nodes. The rates come from a short measurement on the group
(``measure_rates``), agreed on every rank so that every rank makes the same choice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from .layout import Layout


@dataclass(frozen=True)
class Rates:
    """Link and compute rates (bytes/s, seconds per message, flop/s)."""

    bandwidth: float = 1e9  # within a node (all ranks when single-node)
    latency: float = 5e-5
    inter_bandwidth: float = 1e9  # across nodes
    inter_latency: float = 5e-5
    gemm_flops: float = 5e10
    measured: bool = False

    def describe(self) -> str:
        src = "measured" if self.measured else "default"
        return (f"{src}: link {self.bandwidth / 1e9:.2f} GB/s + {self.latency * 1e6:.0f} us/msg, "
                f"inter-node {self.inter_bandwidth / 1e9:.2f} GB/s + {self.inter_latency * 1e6:.0f} us/msg, "
                f"GEMM {self.gemm_flops / 1e9:.1f} GFLOP/s")


RATES: dict[tuple, Rates] = {}  # measured rates by (global ranks, ranks per node), once per process


NVLINK = Rates(bandwidth=150e9, latency=3e-6, inter_bandwidth=150e9, inter_latency=3e-6, gemm_flops=600e12)
"""An H100/H200 node: NVLink all-to-all as DeepEP measures it, dense bf16 GEMMs (for projections)."""
INFINIBAND = replace(NVLINK, inter_bandwidth=45e9, inter_latency=1.5e-5)
"""Nodes of 8 such GPUs joined by 400 Gb/s InfiniBand (RDMA all-to-all rates as DeepEP measures them)."""


# --------------------------------------------------------------------------------------------- primitives
def a2a_seconds(nbytes: float, W: int, L: int, hierarchical: bool, r: Rates) -> float:
    """One all-to-all in which a rank sends ``nbytes`` spread evenly over the ``W`` ranks (``L`` per node)."""
    if W <= 1:
        return 0.0
    L = max(1, min(L, W))
    nodes = W // L
    if hierarchical and nodes > 1 and L > 1:
        s1 = (L - 1) * r.latency + nbytes * (L - 1) / L / r.bandwidth
        s2 = (nodes - 1) * r.inter_latency + nbytes * (nodes - 1) / nodes / r.inter_bandwidth
        return s1 + s2
    intra = nbytes * (L - 1) / W / r.bandwidth + (L - 1) * r.latency
    inter = nbytes * (W - L) / W / r.inter_bandwidth + (W - L) * r.inter_latency
    return intra + inter


def ring_seconds(shard_bytes: float, G: int, L: int, r: Rates) -> float:
    """An all-gather or reduce-scatter of ``shard_bytes`` per rank over ``G`` ranks (ring)."""
    if G <= 1:
        return 0.0
    bw, lat = (r.bandwidth, r.latency) if G <= L else (r.inter_bandwidth, r.inter_latency)
    return (G - 1) * (lat + shard_bytes / bw)


def flops_per_row(H: int, F: int, gated: bool) -> float:
    return 2.0 * H * (2 * F if gated else F) + 2.0 * F * H


# --------------------------------------------------------------------------------------------- per call
@dataclass
class CallStats:
    """What every rank knows about one call after the counts are gathered."""

    tokens: list[int]  # per rank
    rows: dict[str, list[list[int]]]  # per a2a mode, [W, W] (token, slot) rows src -> dst
    k: int
    itemsize: int  # activations
    weight_itemsize: int


def mode_seconds(mode: str, lay: Layout, st: CallStats, r: Rates, L: int, hierarchical: bool) -> float:
    W, H = lay.W, lay.H
    if mode == "data":
        shard = lay.expert_weight_bytes(st.weight_itemsize) / W
        comm = 3 * ring_seconds(shard, W, L, r)
        rows = max(st.tokens) * st.k
        return comm + 4 * rows * flops_per_row(H, lay.F, lay.gated) / r.gemm_flops
    rows = st.rows[mode]
    sent = [sum(rows[s][d] for d in range(W) if d != s) for s in range(W)]
    recv = [sum(rows[s][d] for s in range(W) if s != d) for d in range(W)]
    computed = [sum(rows[s][d] for s in range(W)) for d in range(W)]
    moved = max(max(a, b) for a, b in zip(sent, recv)) * (5 * H + 2) * st.itemsize
    # four exchanges (dispatch, combine; backward dispatch, combine) carry ``moved`` bytes between them
    comm = 4 * a2a_seconds(moved / 4, W, L, hierarchical, r)
    F = lay.F if mode == "expert" else lay.Fl
    compute = 4 * max(computed) * flops_per_row(H, F, lay.gated) / r.gemm_flops
    if mode == "expert" and lay.S > 1:  # gather each expert over its shards (twice) and reduce-scatter its grads
        shard = lay.expert_weight_bytes(st.weight_itemsize) / W
        comm += 3 * ring_seconds(shard, lay.S, L, r)
    return comm + compute


def choose(modes: tuple[str, ...], lay: Layout, st: CallStats, r: Rates, L: int, can_hierarchical: bool):
    """(the cheapest mode, whether its all-to-all should be hierarchical, {mode: estimated seconds}).

    With several nodes each token-moving mode is costed with a flat and a hierarchical all-to-all and keeps the
    cheaper; ties go to the earlier mode in ``modes`` and to the flat exchange."""
    est, hier = {}, {}
    for m in modes:
        options = (False, True) if can_hierarchical and m != "data" else (False,)
        costs = {h: mode_seconds(m, lay, st, r, L, h) for h in options}
        hier[m] = min(options, key=lambda h: costs[h])
        est[m] = costs[hier[m]]
    best = min(modes, key=lambda m: est[m])
    return best, hier[best], est


# --------------------------------------------------------------------------------------------- projection
def uniform_rows(lay: Layout, tokens: int, k: int, mode: str) -> list[list[int]]:
    """The [W, W] row matrix of a perfectly balanced router (for projections)."""
    W, S = lay.W, lay.S
    pairs = tokens * k
    if mode == "tensor":
        per = pairs / lay.E  # rows per expert from one source, to each of its S ranks
        return [[per] * W for _ in range(W)]
    if lay.E >= W:
        return [[pairs / W] * W for _ in range(W)]
    # expert mode with E < W: a source sends expert e's rows to one of its S ranks
    return [[pairs / lay.E if d % S == s % S else 0.0 for d in range(W)] for s in range(W)]


def project(lay: Layout, tokens: int, k: int, r: Rates, L: int, itemsize: int = 2, hierarchical: bool = True):
    """{mode: seconds} for ``tokens`` per rank under a balanced router (modes valid for ``lay``)."""
    modes = ("expert", "data") + (("tensor",) if lay.E < lay.W else ())
    st = CallStats([tokens] * lay.W, {m: uniform_rows(lay, tokens, k, m) for m in modes if m != "data"},
                   k, itemsize, itemsize)
    return {m: mode_seconds(m, lay, st, r, L, hierarchical) for m in modes}


# --------------------------------------------------------------------------------------------- measurement
def measure_rates(world, H: int, F: int, dtype: torch.dtype, intra=None, inter=None, device=None) -> Rates:
    """Time a small and a large all-to-all and a GEMM on this group; every rank returns the same (slowest) rates.

    ``world``/``intra``/``inter`` are ``comm.Comm``; a few milliseconds on gloo.
    """
    device = device or torch.device("cpu")

    def a2a_time(c, rows: int, reps: int = 3) -> float:
        buf = torch.zeros(rows * c.size, 256, dtype=torch.float32, device=device)
        splits = [rows] * c.size
        c.all_to_all(buf, splits, splits)  # warm up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            c.all_to_all(buf, splits, splits)
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    def link(c):
        if c is None or c.size == 1:
            return None
        small, big = a2a_time(c, 1), a2a_time(c, 1024)
        nbytes = 1023 * 256 * 4 * (c.size - 1)
        lat = small / (c.size - 1)
        return max(1.0, nbytes / max(big - small, 1e-9)), max(lat, 1e-7)

    a = torch.randn(512, H, dtype=dtype, device=device)
    b = torch.randn(H, 2 * F, dtype=dtype, device=device)
    a @ b
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    gemm = (time.perf_counter() - t0) / 3
    flops = 2.0 * 512 * H * 2 * F / max(gemm, 1e-9)

    hier = intra is not None and inter is not None
    bw, lat = link(intra if hier else world) or (1e9, 5e-5)
    ibw, ilat = (link(inter) or (bw, lat)) if hier else (bw, lat)
    # agree: the slowest rank's rates (max of times), so that every rank decides alike
    vals = torch.tensor([1.0 / bw, lat, 1.0 / ibw, ilat, 1.0 / flops], dtype=torch.float64, device=device)
    vals = world.all_reduce(vals, "max").cpu()
    return Rates(1.0 / float(vals[0]), float(vals[1]), 1.0 / float(vals[2]), float(vals[3]), 1.0 / float(vals[4]),
                 measured=True)
