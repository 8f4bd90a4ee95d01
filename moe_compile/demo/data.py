"""The demo's data: the shipped corpus as bytes, split into train and held-out windows, and each step's batch.

Every step's *global* batch is a pure function of (seed, step, global batch size): epoch ``e`` visits the training
windows in the order of a permutation drawn from ``seed + e``, ``global_batch`` windows a step, and rank ``r`` of
``W`` takes the ``r``-th of ``W`` equal contiguous slices of it (like ``DistributedSampler``, each rank a disjoint
share, all ranks in the same order). So the ranks' batches concatenated in rank order are the global batch at any
world size, and a run resumed at another ``--nproc`` continues with exactly the data it would have seen.
"""
from __future__ import annotations

import gzip
from importlib import resources

import torch

CORPUS = "shakespeare.txt.gz"


def load_corpus() -> bytes:
    """The shipped corpus (``moe_compile/demo/corpus/``), uncompressed."""
    ref = resources.files("moe_compile.demo").joinpath("corpus", CORPUS)
    try:
        return gzip.decompress(ref.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"moe_compile demo: the corpus {CORPUS} is missing from the installed package ({ref}); reinstall from "
            "a checkout that has moe_compile/demo/corpus/ (pip install -e '.[demo]')") from None


class Windows:
    """Non-overlapping windows of ``seq + 1`` bytes (inputs and next-byte targets) over ``data``."""

    def __init__(self, data: torch.Tensor, seq: int):
        n = (data.numel() - 1) // seq
        self.data, self.seq, self.count = data, seq, n

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = idx.long()[:, None] * self.seq + torch.arange(self.seq + 1)
        chunk = self.data[starts]
        return chunk[:, :-1], chunk[:, 1:]


def split(seq: int, eval_fraction: float = 0.1) -> tuple[Windows, Windows]:
    """Train and held-out windows: the corpus' last ``eval_fraction`` is held out (never trained on)."""
    data = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
    cut = int(data.numel() * (1 - eval_fraction))
    return Windows(data[:cut], seq), Windows(data[cut:], seq)


class Batches:
    """Each step's global batch of training windows, and this rank's share of it (see the module docstring)."""

    def __init__(self, windows: Windows, global_batch: int, seed: int):
        if global_batch > windows.count:
            raise ValueError(f"global batch {global_batch} is larger than the corpus' {windows.count} windows")
        self.windows, self.global_batch, self.seed = windows, global_batch, seed
        self.per_epoch = windows.count // global_batch  # the last partial batch of an epoch is dropped
        self._perm: tuple[int, torch.Tensor] | None = None

    def position(self, step: int) -> dict:
        """Where ``step`` reads: epoch and batch within it (saved with checkpoints)."""
        return {"epoch": step // self.per_epoch, "batch": step % self.per_epoch}

    def global_indices(self, step: int) -> torch.Tensor:
        epoch, b = divmod(step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.windows.count, generator=g))
        return self._perm[1][b * self.global_batch:(b + 1) * self.global_batch]

    def rank_batch(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.global_batch // world
        return self.windows.get(self.global_indices(step)[rank * per:(rank + 1) * per])

    def global_batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows.get(self.global_indices(step))


def eval_shares(windows: Windows, count: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of the first ``count`` held-out windows: inputs, targets, and a 0/1 weight per window.
    Every rank gets the same number of windows (collectives inside the model need equal calls); the padding
    windows weigh 0, so the mean over ranks is the mean over exactly those ``count`` windows at any world size."""
    count = min(count, windows.count)
    per = -(-count // world)
    idx = torch.arange(rank * per, (rank + 1) * per)
    weight = (idx < count).float()
    x, y = windows.get(torch.where(idx < count, idx, torch.zeros_like(idx)))
    return x, y, weight
