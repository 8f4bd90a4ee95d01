"""Which (token, slot) rows go to which rank, in the token-moving modes (``expert``, ``tensor``).

Every rank knows ``C[src][e]``, how many of ``src``'s rows chose expert ``e`` (gathered once per call), so every
rank derives the same ``[W, W]`` row matrix and its own send order and receive layout without further messages:

- ``expert`` (``E >= W``): expert ``e`` runs on rank ``e // (E/W)`` as its local expert ``e % (E/W)``;
- ``expert`` (``E < W``): expert ``e`` is gathered whole on its ``S`` ranks; a row from ``src`` goes to rank
  ``e * S + src % S`` (sources spread over the copies);
- ``tensor`` (``E < W``): a row goes to all ``S`` ranks of its expert, each computes a partial sum over its hidden
  slice, and the source adds them up.

A rank's rows are sent in expert order, so they are grouped by destination (destinations grow with ``e``) and
arrive grouped by source, in expert order within a source. With a capacity (``cap``), each (source, expert,
destination) segment is padded to ``cap`` rows: every split is the same size (padding rows carry the "dropped"
expert id and compute nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import Layout


def padded_modes(lay: Layout) -> tuple[str, ...]:
    """Modes in which every source sends every rank the same number of expert segments."""
    return ("expert", "tensor") if lay.E >= lay.W else ("tensor",)


def destinations(lay: Layout, mode: str, e: int, src: int) -> range:
    S = lay.S
    if mode == "tensor":
        return range(e * S, (e + 1) * S)
    if lay.E >= lay.W:
        return range(e // lay.El, e // lay.El + 1)
    return range(e * S + src % S, e * S + src % S + 1)


def local_id(lay: Layout, mode: str, e: int) -> int:
    return e % lay.El if (mode == "expert" and lay.E >= lay.W) else 0


def n_local(lay: Layout, mode: str) -> int:
    """Experts the computing rank holds in ``mode`` (its local ids are ``0 .. n_local - 1``)."""
    return lay.El if (mode == "expert" and lay.E >= lay.W) else 1


def rows_matrix(lay: Layout, mode: str, C: list[list[int]], cap: int | None) -> list[list[int]]:
    W = lay.W
    rows = [[0] * W for _ in range(W)]
    for src in range(W):
        for e in range(lay.E):
            n = cap if cap is not None else C[src][e]
            for d in destinations(lay, mode, e, src):
                rows[src][d] += n
    return rows


@dataclass
class Plan:
    send_src: torch.Tensor  # [rows sent] flat (token, slot) index of each row sent, -1 for padding
    counts: list[list[int]]  # [W, W] rows src -> dst
    recv_lid: torch.Tensor  # [rows received] local expert id of each row received (n_local for padding)
    n_local: int


def make_plan(lay: Layout, mode: str, me: int, idx: torch.Tensor, C: list[list[int]], cap: int | None) -> Plan:
    device = idx.device
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # (token, slot) rows grouped by expert, dropped ones last
    mine = C[me]
    segs, start = [], 0
    for e in range(lay.E):
        seg = order[start:start + mine[e]]
        start += mine[e]
        for _ in destinations(lay, mode, e, me):
            segs.append(seg)
            if cap is not None and cap > mine[e]:
                segs.append(torch.full((cap - mine[e],), -1, dtype=torch.long, device=device))
    send_src = torch.cat(segs) if segs else torch.zeros(0, dtype=torch.long, device=device)

    nl = n_local(lay, mode)
    values, repeats = [], []
    for src in range(lay.W):
        for e in range(lay.E):
            if me in destinations(lay, mode, e, src):
                values.append(local_id(lay, mode, e))
                repeats.append(C[src][e])
                if cap is not None:
                    values.append(nl)
                    repeats.append(cap - C[src][e])
    recv_lid = torch.repeat_interleave(torch.tensor(values, dtype=torch.long),
                                       torch.tensor(repeats, dtype=torch.long)).to(device) if values else \
        torch.zeros(0, dtype=torch.long, device=device)
    return Plan(send_src, rows_matrix(lay, mode, C, cap), recv_lid, nl)
