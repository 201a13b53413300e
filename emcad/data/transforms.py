"""Training augmentation that is reproducible and resumable.

:class:`Augmented` wraps a dataset; the random choices for sample ``i`` in epoch ``e`` come from a generator seeded
with ``(seed, e, i)``, never from a global RNG, so an augmented epoch is the same whatever the number of DataLoader
workers, the process (DDP rank) that loads the sample, or where a resumed run restarts.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["Augmented", "flip_rot90"]


def flip_rot90(image: torch.Tensor, label: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random element of the dihedral group: rotation by a multiple of 90° (180° only for non-square images)
    and an optional horizontal flip (docs/models.md#training-recipe)."""
    r = torch.randint(0, 8, (1,), generator=generator).item()
    k, flip = r % 4, r >= 4
    if image.shape[-1] != image.shape[-2]:
        k = 2 * (k % 2)
    if k:
        image, label = torch.rot90(image, k, (-2, -1)), torch.rot90(label, k, (-2, -1))
    if flip:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous()


class Augmented(Dataset):
    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.dataset[index]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index))
        return flip_rot90(image, label, g)

    def __getattr__(self, name):  # num_classes, in_channels, names, describe ... of the wrapped dataset
        if name in ("dataset", "seed", "epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
