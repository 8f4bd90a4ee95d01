"""Collectives for the parallel experts op: torch.distributed's functional collectives, any backend.

``Comm`` wraps one process group (world, a node, the ranks sharing an expert...) and counts the bytes this rank
sends, for reports and the benchmark. ``AllToAll`` moves rows between ranks with uneven splits, flat or
hierarchical (within each node first, then across nodes with one peer per node, as Tutel's 2D all-to-all), from
the full ``[W, W]`` matrix of row counts that every rank knows (it is derived from the gathered routing counts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# torch 2.13 renamed the gather / reduce-scatter functional collectives; 2.11 only has the old names (compat picks)
from ..compat.distributed import all_gather as _all_gather, funcol, reduce_scatter as _reduce_scatter, wait as _wait


@dataclass
class Traffic:
    """Bytes this rank sent to other ranks, by collective kind."""

    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def reset(self) -> None:
        self.by_kind.clear()


class Comm:
    """One process group; ``rank`` and ``size`` are group-local."""

    def __init__(self, group, traffic: Traffic | None = None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group)
        self.traffic = traffic if traffic is not None else Traffic()
        self.host_copy = dist.get_backend(group) == "gloo"

    def _on_host(self, t: torch.Tensor) -> bool:
        return self.host_copy and t.device.type != "cpu"

    def all_gather(self, flat: torch.Tensor) -> torch.Tensor:
        """``[n] -> [size * n]`` in rank order."""
        if self.size == 1:
            return flat
        if self._on_host(flat):
            return self.all_gather(flat.cpu()).to(flat.device)
        self.traffic.add("all_gather", flat.numel() * flat.element_size() * (self.size - 1))
        return _wait(_all_gather(flat.contiguous(), 0, self.group))

    def gather(self, flat: torch.Tensor, dst: int) -> torch.Tensor | None:
        """``[n] -> [size * n]`` in rank order on the global rank ``dst`` only (``None`` on the others)."""
        if self.size == 1:
            return flat
        if self._on_host(flat):
            out = self.gather(flat.cpu(), dst)
            return out.to(flat.device) if out is not None else None
        self.traffic.add("gather", 0 if dist.get_rank() == dst else flat.numel() * flat.element_size())
        out = torch.empty(self.size * flat.numel(), dtype=flat.dtype, device=flat.device) \
            if dist.get_rank() == dst else None
        dist.gather(flat.contiguous(), list(out.chunk(self.size)) if out is not None else None, dst=dst,
                    group=self.group)
        return out

    def reduce_scatter(self, flat: torch.Tensor) -> torch.Tensor:
        """``[size * n] -> [n]``: the sum over ranks of this rank's chunk."""
        if self.size == 1:
            return flat
        if self._on_host(flat):
            return self.reduce_scatter(flat.cpu()).to(flat.device)
        n = flat.numel() // self.size
        self.traffic.add("reduce_scatter", n * flat.element_size() * (self.size - 1))
        return _wait(_reduce_scatter(flat.contiguous(), "sum", 0, self.group))

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.size == 1:
            return t
        if self._on_host(t):
            return self.all_reduce(t.cpu(), op).to(t.device)
        self.traffic.add("all_reduce", 2 * t.numel() * t.element_size() * (self.size - 1) // self.size)
        return _wait(funcol.all_reduce(t.contiguous(), op, self.group))

    def all_to_all(self, buf: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        if self.size == 1:
            return buf
        if self._on_host(buf):
            return self.all_to_all(buf.cpu(), out_splits, in_splits).to(buf.device)
        row = math.prod(buf.shape[1:]) * buf.element_size()
        self.traffic.add("all_to_all", row * (sum(in_splits) - in_splits[self.rank]))
        return _wait(funcol.all_to_all_single(buf.contiguous(), out_splits, in_splits, self.group))


class AllToAll:
    """Row exchange over ``world`` (flat), or within nodes of ``local`` ranks then across nodes (hierarchical).

    ``counts[src][dst]`` is the number of rows ``src`` sends ``dst``; a rank's send buffer holds its rows in
    destination order, and the result holds the rows it receives in source order. The reverse exchange (results
    travelling back) is the same call with the transposed matrix.
    """

    def __init__(self, world: Comm, intra: Comm | None = None, inter: Comm | None = None):
        self.world = world
        self.intra, self.inter = intra, inter
        self.hierarchical = intra is not None and inter is not None
        self.L = intra.size if self.hierarchical else world.size  # ranks per node
        self.nodes = inter.size if self.hierarchical else 1

    def __call__(self, buf: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
        me = self.world.rank
        if not self.hierarchical:
            out_splits = [counts[s][me] for s in range(self.world.size)]
            return self.world.all_to_all(buf, out_splits, counts[me])
        L, N = self.L, self.nodes
        n, l = divmod(me, L)
        # stage 1, within the node: to local peer l2 go the rows for ranks (n2, l2) of every node n2
        chunks = buf.split(counts[me])
        send1 = torch.cat([chunks[n2 * L + l2] for l2 in range(L) for n2 in range(N)])
        in1 = [sum(counts[me][n2 * L + l2] for n2 in range(N)) for l2 in range(L)]
        out1 = [sum(counts[n * L + l1][n2 * L + l] for n2 in range(N)) for l1 in range(L)]
        recv1 = self.intra.all_to_all(send1, out1, in1)  # ordered (l1, n2): from (n, l1) to (n2, l)
        # stage 2, across nodes: to node n2 go the rows for (n2, l), from every local source l1
        sizes = [counts[n * L + l1][n2 * L + l] for l1 in range(L) for n2 in range(N)]
        pieces = recv1.split(sizes)
        send2 = torch.cat([pieces[l1 * N + n2] for n2 in range(N) for l1 in range(L)])
        in2 = [sum(counts[n * L + l1][n2 * L + l] for l1 in range(L)) for n2 in range(N)]
        out2 = [sum(counts[n3 * L + l1][me] for l1 in range(L)) for n3 in range(N)]
        return self.inter.all_to_all(send2, out2, in2)  # ordered (n3, l1): source rank order


def transpose(counts: list[list[int]]) -> list[list[int]]:
    return [list(r) for r in zip(*counts)]
