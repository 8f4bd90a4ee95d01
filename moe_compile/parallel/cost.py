"""The cost model behind ``mode="auto"``: seconds per forward + backward of one experts call, per mode.

Each mode moves different bytes and computes different rows:

- ``expert``: tokens travel (dispatch and combine, forward and backward: ``(5H + 2)`` values per (token, slot) row
  moved, counting the backward's ``[x | grad | weight]`` rows and ``[dx | dweight]`` replies); the busiest rank's
  received rows bound the GEMM time. With ``E < W`` each expert is first gathered over its ``S`` shards.
- ``data``: weights travel (all-gather forward, again backward, reduce-scatter of the gradients: 3 x
  ``(W-1)/W`` of all expert weights); every rank computes its own tokens.
- ``tensor``: tokens travel to all ``S`` ranks of their expert (``S`` times the expert-mode rows, ``F/S`` wide).

The backward recomputes the forward (nothing but the op inputs is kept), so one call costs 4 forward GEMM
passes, plus the small all-gather of the routing counts every call starts with. Compute runs at ``gemm_flops``;
a message costs ``latency`` plus its bytes over ``bandwidth``, with separate rates within a node and across
nodes. The rates come from a short measurement on the group (``measure_rates``), agreed on every rank (the
slowest rank's, by an all-reduce) so that every rank makes the same choice.

The storage layout is chosen once, at ``parallelize`` time (``choose_layout``): *replicated* (every rank holds
all experts and runs its own tokens through them, 3 GEMM passes, nothing recomputed; DDP all-reduces the
experts' gradients, ``2 (W-1)/W`` of their bytes per rank: ``replicated_seconds``) against the cheapest sharded
mode above, for the tokens per call ``parallelize`` was given or saw.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

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

    def describe(self, source: str | None = None) -> str:
        src = source or ("measured" if self.measured else "default")
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
    # every call starts with one small all-gather of the token and routing counts (int64, E + 2 per rank)
    begin = ring_seconds(8 * (lay.E + 2), W, L, r)
    if mode == "data":
        shard = lay.expert_weight_bytes(st.weight_itemsize) / W
        comm = 3 * ring_seconds(shard, W, L, r)
        rows = max(st.tokens) * st.k
        return begin + comm + 4 * rows * flops_per_row(H, lay.F, lay.gated) / r.gemm_flops
    rows = st.rows[mode]
    sent = [sum(rows[s][d] for d in range(W) if d != s) for s in range(W)]
    recv = [sum(rows[s][d] for s in range(W) if s != d) for d in range(W)]
    computed = [sum(rows[s][d] for s in range(W)) for d in range(W)]
    moved = max(max(a, b) for a, b in zip(sent, recv)) * (5 * H + 2) * st.itemsize
    # four exchanges (dispatch, combine; backward dispatch, combine) carry ``moved`` bytes off the rank between
    # them; ``a2a_seconds`` takes what a rank sends to all W ranks, itself included (W/(W-1) times as much)
    comm = 4 * a2a_seconds(moved / 4 * W / (W - 1), W, L, hierarchical, r)
    F = lay.F if mode == "expert" else lay.Fl
    compute = 4 * max(computed) * flops_per_row(H, F, lay.gated) / r.gemm_flops
    if mode == "expert" and lay.S > 1:  # gather each expert over its shards (twice) and reduce-scatter its grads
        shard = lay.expert_weight_bytes(st.weight_itemsize) / W
        comm += 3 * ring_seconds(shard, lay.S, L, r)
    return begin + comm + compute


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


# --------------------------------------------------------------------------------------------- the layout
DDP_BUCKET_BYTES = 25 * 2 ** 20  # DistributedDataParallel's default bucket_cap_mb


def allreduce_seconds(nbytes: float, W: int, L: int, r: Rates, bucket_bytes: float = DDP_BUCKET_BYTES) -> float:
    """What ``nbytes`` more gradients add to DDP's all-reduce over ``W`` ranks: a ring (reduce-scatter +
    all-gather) sends ``2 (W-1)/W`` of the bytes per rank, and each bucket ``2 (W-1)`` messages. DDP all-reduces
    the dense weights' bucket(s) in every layout, so these bytes add their share of the messages,
    ``nbytes / bucket_bytes`` buckets' worth (inter-node rates when the ranks span nodes)."""
    if W <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = (r.bandwidth, r.latency) if W <= L else (r.inter_bandwidth, r.inter_latency)
    return 2 * (W - 1) * (nbytes / bucket_bytes * lat + nbytes / W / bw)


def replicated_seconds(lay: Layout, tokens: float, k: int, r: Rates, L: int, weight_itemsize: int) -> float:
    """One forward + backward of a replicated experts module (whole on every rank): the rank's own
    ``tokens * k`` rows at GEMM speed, 3 passes (forward, and the backward's two; activations are kept, nothing
    is recomputed), plus what the experts' gradients (as many bytes as their weights) add to DDP's all-reduce
    (``allreduce_seconds``), counted in full although DDP overlaps it with the rest of the backward. One call
    per step is assumed."""
    compute = 3 * tokens * k * flops_per_row(lay.H, lay.F, lay.gated) / r.gemm_flops
    return compute + allreduce_seconds(lay.expert_weight_bytes(weight_itemsize), lay.W, L, r)


def layout_estimates(lay: Layout, tokens: float, k: int, r: Rates, L: int, itemsize: int,
                     can_hierarchical: bool) -> dict[str, float]:
    """{"replicated": s, "expert": s, "data": s[, "tensor": s]}: seconds of one forward + backward with
    ``tokens`` per rank under a balanced router, activations and weights ``itemsize`` bytes each."""
    modes = ("expert", "data") + (("tensor",) if lay.E < lay.W else ())
    st = CallStats([tokens] * lay.W, {m: uniform_rows(lay, tokens, k, m) for m in modes if m != "data"},
                   k, itemsize, itemsize)
    est = choose(modes, lay, st, r, L, can_hierarchical)[2]
    return {"replicated": replicated_seconds(lay, tokens, k, r, L, itemsize), **est}


@dataclass
class LayoutChoice:
    """How ``parallelize`` stores one experts module, who decided and why.

    ``layout``: ``"replicated"`` (whole on every rank; DDP all-reduces the gradients) or ``"sharded"``.
    ``by``: ``"auto"`` (the cost model) or the mode given to ``parallelize`` (``"mode='expert'"``).
    ``tokens``: the tokens per call the estimates are for (None: unknown). ``estimates``: seconds of one
    forward + backward for ``"replicated"`` and each sharded mode."""

    layout: str
    by: str
    reason: str
    tokens: int | None = None
    estimates: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.layout} by {self.by}" + (f": {self.reason}" if self.reason else "")


def replicated_from(lay: Layout, k: int, r: Rates, L: int, itemsize: int, can_hierarchical: bool,
                    limit: int = 2 ** 24) -> int | None:
    """The smallest power-of-two token count per call at which the replicated layout is estimated cheaper than
    every sharded mode (None: not up to ``limit``). Replicated minus sharded only falls as tokens grow (the
    all-reduce is fixed; the sharded modes move tokens or recompute the forward), so the first such count is
    where the layouts cross."""
    t = 1
    while t <= limit:
        est = layout_estimates(lay, t, k, r, L, itemsize, can_hierarchical)
        if est["replicated"] < min(v for m, v in est.items() if m != "replicated"):
            return t
        t *= 2
    return None


def choose_layout(lay: Layout, tokens: int | None, k: int, r: Rates, L: int, itemsize: int,
                  can_hierarchical: bool) -> LayoutChoice:
    """``auto``'s layout for one experts module, at ``parallelize`` time: replicated when its estimated step is
    cheaper than the cheapest sharded mode's at ``tokens`` per call; otherwise sharded (the per-call choice among
    the sharded modes stays ``auto``'s). Without a token count: sharded, the reason naming the count from which
    replicated would be cheaper at these rates. Ties go to sharded."""
    if tokens is None:
        t = replicated_from(lay, k, r, L, itemsize, can_hierarchical)
        cross = (f"replicated would be estimated cheaper from about {t} tokens per call" if t is not None
                 else "replicated is estimated dearer at any token count")
        return LayoutChoice("sharded", "auto", "no token count to cost the replicated layout by (pass "
                            f"example_inputs= or tokens_per_call= to parallelize); at these rates {cross}")
    est = layout_estimates(lay, tokens, k, r, L, itemsize, can_hierarchical)
    best = min((m for m in est if m != "replicated"), key=est.get)
    layout = "replicated" if est["replicated"] < est[best] else "sharded"
    winner = "replicated" if layout == "replicated" else best
    costs = ", ".join(f"{m} {s * 1e3:.3f} ms" for m, s in est.items())
    return LayoutChoice(layout, "auto", f"estimated per forward + backward at {tokens} tokens per call: {costs}; "
                        f"{winner} is cheapest", tokens, est)


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

    ``world``/``intra``/``inter`` are ``comm.Comm``; some tens of milliseconds on gloo. The latency is the median
    of a few one-row exchanges (what a step's small messages see); the large exchange and the GEMM take the
    fastest of a few repetitions (load only ever adds time), and the link's bandwidth is taken from at least half
    the large exchange's time (``big - small`` alone, both noisy, can come out near zero and the bandwidth near
    infinite).
    """
    device = device or torch.device("cpu")
    big_rows = 4096

    def a2a_time(c, rows: int, reps: int = 5, typical: bool = False) -> float:
        buf = torch.zeros(rows * c.size, 256, dtype=torch.float32, device=device)
        splits = [rows] * c.size
        c.all_to_all(buf, splits, splits)  # warm up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            c.all_to_all(buf, splits, splits)
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2] if typical else min(ts)

    def link(c):
        if c is None or c.size == 1:
            return None
        small, big = a2a_time(c, 1, typical=True), a2a_time(c, big_rows)
        nbytes = (big_rows - 1) * 256 * 4 * (c.size - 1)
        lat = small / (c.size - 1)
        return max(1.0, nbytes / max(big - small, 0.5 * big, 1e-9)), max(lat, 1e-7)

    a = torch.randn(512, H, dtype=dtype, device=device)
    b = torch.randn(H, 2 * F, dtype=dtype, device=device)
    a @ b
    ts = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ts.append(time.perf_counter() - t0)
    flops = 2.0 * 512 * H * 2 * F / max(min(ts), 1e-9)

    hier = intra is not None and inter is not None
    bw, lat = link(intra if hier else world) or (1e9, 5e-5)
    ibw, ilat = (link(inter) or (bw, lat)) if hier else (bw, lat)
    # agree: the slowest rank's rates (max of times), so that every rank decides alike
    vals = torch.tensor([1.0 / bw, lat, 1.0 / ibw, ilat, 1.0 / flops], dtype=torch.float64, device=device)
    vals = world.all_reduce(vals, "max").cpu()
    return Rates(1.0 / float(vals[0]), float(vals[1]), 1.0 / float(vals[2]), float(vals[3]), 1.0 / float(vals[4]),
                 measured=True)
