"""Where each expert weight lives on ``W`` ranks, and how to cut and reassemble it.

All of it works on the *canonical* weights of ``kernels.common`` (``w1 [E, H, N]``, ``w2 [E, F, H]``, ``b1 [E, N]``,
``b2 [E, H]``; ``N = 2F`` when gated), whatever layout the module stores them in, so that one piece of code serves
HF stacked experts, GPT-OSS's interleaved ``in_out`` weights and ``nn.ModuleList`` experts alike.

Storage (the same in every parallel mode):

- ``E >= W`` (``E % W == 0``): rank ``r`` holds experts ``[r * E/W, (r + 1) * E/W)``, whole.
- ``E <  W`` (``W % E == 0``): ``S = W/E`` ranks share each expert; rank ``r`` holds expert ``r // S``, hidden
  (ffn) slice ``r % S`` of size ``F/S``: the matching columns of the first projection (gate and up alike), rows of the
  second, slice of the first bias. The second bias ``b2`` is replicated on the ``S`` ranks (its gradient is summed
  over them, so the copies stay equal).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..kernels.common import Weights


class ParallelError(ValueError):
    """Bad input to ``parallelize`` / ``set_parallel`` (raised on every rank, before anything changes)."""


def check_sizes(E: int, W: int, F: int) -> str | None:
    """Why ``E`` experts of hidden size ``F`` cannot be sharded over ``W`` ranks (None when they can)."""
    if E >= W:
        if E % W:
            return f"{E} experts cannot be sharded over {W} ranks: E must be divisible by W or divide W"
        return None
    if W % E:
        return f"{E} experts cannot be sharded over {W} ranks: E must be divisible by W or divide W"
    S = W // E
    if F % S:
        return (f"with {E} experts on {W} ranks each expert's hidden dimension ({F}) is split {S} ways, "
                f"but {F} is not divisible by {S}")
    return None


@dataclass(frozen=True)
class Layout:
    E: int  # experts
    W: int  # ranks in the group
    H: int  # model width
    F: int  # expert hidden (ffn) size
    gate_layout: str  # spec.gate_layout: none | concat | separate | interleaved
    has_b1: bool
    has_b2: bool

    def __post_init__(self):
        why = check_sizes(self.E, self.W, self.F)
        if why:
            raise ParallelError(why)

    # ------------------------------------------------------------------------------------------- sizes
    @property
    def S(self) -> int:
        """Ranks sharing one expert (its hidden dimension split ``S`` ways); 1 when ``E >= W``."""
        return self.W // self.E if self.E < self.W else 1

    @property
    def El(self) -> int:
        """Experts per rank (1 when ``E < W``: one shard of one expert)."""
        return self.E // self.W if self.E >= self.W else 1

    @property
    def Fl(self) -> int:
        return self.F // self.S

    @property
    def gated(self) -> bool:
        return self.gate_layout != "none"

    @property
    def N(self) -> int:
        return 2 * self.F if self.gated else self.F

    @property
    def Nl(self) -> int:
        return self.N // self.S

    def first_expert(self, r: int) -> int:
        return r * self.El if self.E >= self.W else r // self.S

    def shard_index(self, r: int) -> int:
        return r % self.S

    def shard_group(self, r: int) -> list[int]:
        """The ranks holding the same expert(s) as ``r`` (just ``[r]`` when ``E >= W``)."""
        first = r - r % self.S
        return list(range(first, first + self.S))

    # ------------------------------------------------------------------------------------------- columns
    def _cols(self, s: int) -> list[int]:
        """Columns of ``w1``/``b1`` (out of ``N``) held by shard ``s``."""
        f0, f1 = s * self.Fl, (s + 1) * self.Fl
        if self.gate_layout == "interleaved":
            return list(range(2 * f0, 2 * f1))
        if self.gated:  # concat / separate: [gate | up] in the canonical form
            return list(range(f0, f1)) + list(range(self.F + f0, self.F + f1))
        return list(range(f0, f1))

    @cached_property
    def _col_index(self) -> list[torch.Tensor]:
        return [torch.tensor(self._cols(s), dtype=torch.long) for s in range(self.S)]

    @cached_property
    def _col_inverse(self) -> torch.Tensor:
        perm = torch.cat(self._col_index)
        return torch.argsort(perm)

    # ------------------------------------------------------------------------------------------- cut / join
    def shard(self, full: Weights, r: int, first: int = 0) -> Weights:
        """Rank ``r``'s part of ``full``, canonical weights of experts ``[first, first + len)``."""
        e0 = self.first_expert(r) - first
        e1 = e0 + self.El
        w1, w2 = full.w1[e0:e1], full.w2[e0:e1]
        b1 = full.b1[e0:e1] if full.b1 is not None else None
        b2 = full.b2[e0:e1] if full.b2 is not None else None
        if self.S > 1:
            s = self.shard_index(r)
            cols = self._col_index[s].to(w1.device)
            w1 = w1.index_select(-1, cols)
            w2 = w2[:, s * self.Fl:(s + 1) * self.Fl]
            b1 = b1.index_select(-1, cols) if b1 is not None else None
        return Weights(w1, w2, b1, b2)

    def unshard(self, parts: list[Weights], ranks: list[int]) -> Weights:
        """Join the parts of consecutive ``ranks`` (whole shard groups) into the canonical weights of the
        experts they hold, in expert order."""
        if self.S == 1:
            cat = lambda ts: torch.cat(ts) if ts[0] is not None else None  # noqa: E731
            return Weights(cat([p.w1 for p in parts]), cat([p.w2 for p in parts]),
                           cat([p.b1 for p in parts]), cat([p.b2 for p in parts]))
        assert len(ranks) % self.S == 0 and ranks[0] % self.S == 0, ranks
        inv = self._col_inverse.to(parts[0].w1.device)
        experts = []
        for g in range(0, len(parts), self.S):
            ps = parts[g:g + self.S]
            w1 = torch.cat([p.w1 for p in ps], -1).index_select(-1, inv)
            w2 = torch.cat([p.w2 for p in ps], -2)
            b1 = torch.cat([p.b1 for p in ps], -1).index_select(-1, inv) if ps[0].b1 is not None else None
            experts.append(Weights(w1, w2, b1, ps[0].b2))
        return self.unshard_experts(experts)

    @staticmethod
    def unshard_experts(experts: list[Weights]) -> Weights:
        if len(experts) == 1:
            return experts[0]
        cat = lambda ts: torch.cat(ts) if ts[0] is not None else None  # noqa: E731
        return Weights(cat([p.w1 for p in experts]), cat([p.w2 for p in experts]),
                       cat([p.b1 for p in experts]), cat([p.b2 for p in experts]))

    # ------------------------------------------------------------------------------------------- flat buffers
    def local_shapes(self) -> list[tuple[int, ...]]:
        shapes = [(self.El, self.H, self.Nl), (self.El, self.Fl, self.H)]
        if self.has_b1:
            shapes.append((self.El, self.Nl))
        if self.has_b2:
            shapes.append((self.El, self.H))
        return shapes

    @property
    def local_numel(self) -> int:
        n = 0
        for s in self.local_shapes():
            p = 1
            for d in s:
                p *= d
            n += p
        return n

    def pack(self, w: Weights) -> torch.Tensor:
        ts = [w.w1, w.w2] + ([w.b1] if self.has_b1 else []) + ([w.b2] if self.has_b2 else [])
        return torch.cat([t.reshape(-1) for t in ts])

    def unpack(self, flat: torch.Tensor) -> Weights:
        out, i = [], 0
        for shape in self.local_shapes():
            n = 1
            for d in shape:
                n *= d
            out.append(flat[i:i + n].view(shape))
            i += n
        w1, w2 = out[0], out[1]
        rest = out[2:]
        b1 = rest.pop(0) if self.has_b1 else None
        b2 = rest.pop(0) if self.has_b2 else None
        return Weights(w1, w2, b1, b2)

    def pack_for(self, full: Weights, ranks: list[int], first: int) -> torch.Tensor:
        """``[len(ranks) * local_numel]``: each rank's part of ``full`` (experts from ``first``), packed, in rank
        order: the input of a reduce-scatter that returns every rank its part."""
        return torch.cat([self.pack(self.shard(full, r, first)) for r in ranks])

    def expert_weight_bytes(self, itemsize: int) -> int:
        """Bytes of all experts' weights (whole, not sharded)."""
        per = self.H * self.N + self.F * self.H + (self.N if self.has_b1 else 0) + (self.H if self.has_b2 else 0)
        return self.E * per * itemsize
