"""A seeded, step-indexed batch sampler whose position is part of the checkpoint.

Epoch ``e`` visits the dataset in the order ``randperm(n)`` drawn from a generator seeded with
``(seed, e)`` (nothing else touches it), cut into *global* batches of ``batch_size * world_size``
indices; rank ``r`` gets slice ``r`` of every global batch (the DistributedSampler contract, but
batch-aligned: the union of the ranks' batches at step t is exactly the single-process batch of
size ``batch_size * world_size`` at step t). The incomplete last global batch is dropped.
``set_epoch(e, start)`` positions it at batch ``start`` of epoch ``e``, which is how a resumed
run continues with exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from typing import Iterator, List

import torch
from torch.utils.data import Sampler

_MASK63 = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for (seed, epoch) (FNV-style mixing; no collisions for small values)."""
    h = 1469598103934665603
    for v in (int(seed), int(epoch), 0xDA7A):
        h = ((h ^ (v & _MASK63)) * 1099511628211) & _MASK63
    return h


class ResumableBatchSampler(Sampler[List[int]]):
    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training set has {self.num_samples} images, fewer than one global batch of "
                f"{self.batch_size} x {self.world_size} process(es); lower data.batch_size or add data")
        self.epoch = 0
        self.start = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[List[int]]:
        perm = self.order(self.epoch)
        gb = self.batch_size * self.world_size
        lo = self.rank * self.batch_size
        for b in range(self.start, self.batches_per_epoch):
            yield perm[b * gb + lo: b * gb + lo + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "world_size": self.world_size}
