"""The training order of one epoch, identical for any number of processes (so DDP equals one process)."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShardSampler(Sampler[int]):
    """Shuffle (or draw by ``weights``, with replacement) the ``n`` examples with a generator seeded by ``seed``,
    cut the order into global batches of ``global_batch``, and give rank ``r`` every ``world``-th example of
    each global batch. With ``world=1`` this is a plain seeded shuffle. ``drop_last`` drops a final incomplete
    global batch (needed under DDP so every rank runs the same number of steps)."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 weights: torch.Tensor | None = None, drop_last: bool = False) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world}")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world, self.weights, self.drop_last = rank, world, weights, drop_last

    def _starts(self) -> range:
        stop = self.n - self.n % self.global_batch if self.drop_last else self.n
        return range(0, stop, self.global_batch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed)
        if self.weights is not None:
            order = torch.multinomial(self.weights.double(), self.n, replacement=True, generator=g)
        else:
            order = torch.randperm(self.n, generator=g)
        for start in self._starts():
            yield from order[start + self.rank: min(start + self.global_batch, self.n): self.world].tolist()

    def __len__(self) -> int:
        return sum(len(range(s + self.rank, min(s + self.global_batch, self.n), self.world)) for s in self._starts())
