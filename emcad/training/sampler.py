"""A seeded, resumable, distributed batch sampler.

Epoch ``e`` visits ``randperm(n, seed + e)`` (or ``range(n)`` without shuffling) in *global* batches of
``batch_size`` consecutive indices; the last incomplete batch is dropped. Under DDP each of the ``num_replicas``
processes takes its contiguous ``batch_size / num_replicas`` share of every global batch, so one step of N
processes sees exactly the samples of one step of a single process with the same global batch. ``set_epoch`` and
``set_start`` (the batch to start from) make a resumed run continue with the very next batch.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % num_replicas:
            raise ValueError(f"the global batch size {batch_size} must be divisible by the number of processes "
                             f"{num_replicas}")
        if n < batch_size:
            raise ValueError(f"the dataset has {n} samples, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, int(seed), shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, batch: int) -> None:
        self.start = int(batch)

    def __len__(self) -> int:
        """Batches per epoch (global batches; each process yields as many)."""
        return self.n // self.batch_size

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        share = self.batch_size // self.num_replicas
        for b in range(self.start, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield batch[self.rank * share:(self.rank + 1) * share]
