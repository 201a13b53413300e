"""The built-in synthetic segmentation dataset (docs/environment.md#synthetic-data).

Each image is generated from its own seed (``seed``, ``index``), so a dataset is the same on every machine, in every
process and for every ``DataLoader`` worker count, and any sample can be regenerated alone.

Recipe (64×64 by default, 1 channel, 3 classes: background, "lesion", "ring"):

1. background = 0.6 × Gaussian-smoothed white noise (σ = 2 px, rescaled to unit standard deviation)
   + 0.3 × white noise;
2. 1–3 randomly rotated ellipses, semi-axes 0.12–0.37 of the half-width, each of class 1 or 2 at random (a later
   ellipse overwrites an earlier one where they overlap);
3. class 1 ("bright lesion"): +0.8 inside the ellipse;
4. class 2 ("ring"): +1.2 on the rim (normalised radius² > 0.55) and −0.4 inside, so its mean intensity is close
   to the background's and no intensity threshold can segment it;
5. a 3×3 box blur.

About 5% of the pixels belong to each foreground class. The label of an ellipse is its whole interior.
"""

from __future__ import annotations

import math
import os
from typing import Optional
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["SYNTHETIC_CLASSES", "SyntheticSegmentation", "foreground_fraction", "make_synthetic_sample"]

SYNTHETIC_CLASSES = ("background", "lesion", "ring")
PNG_RANGE = (-4.0, 4.0)  # intensity range stored in exported 16-bit PNGs
_SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_029}


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = int(math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def make_synthetic_sample(seed: int, size: int | tuple[int, int] = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """One (image, label) pair: image ``(1, H, W)`` float32, label ``(H, W)`` int64 in {0, 1, 2}. Pure function of
    ``seed`` and ``size``."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)

    # 1. textured background
    k = _gaussian_kernel(2.0)
    pad = k.numel() // 2
    smooth = torch.randn(1, 1, h + 2 * pad, w + 2 * pad, generator=g)
    smooth = F.conv2d(smooth, k.view(1, 1, 1, -1))
    smooth = F.conv2d(smooth, k.view(1, 1, -1, 1))[0, 0]
    smooth = (smooth - smooth.mean()) / smooth.std().clamp_min(1e-6)
    image = 0.6 * smooth + 0.3 * torch.randn(h, w, generator=g)
    label = torch.zeros(h, w, dtype=torch.int64)

    # 2.-4. ellipses
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    half = min(h, w) / 2.0
    n = int(torch.randint(1, 4, (1,), generator=g))
    for _ in range(n):
        u = torch.rand(6, generator=g)
        a = (0.12 + 0.25 * float(u[0])) * half
        b = (0.12 + 0.25 * float(u[1])) * half
        theta = float(u[2]) * math.pi
        m = max(a, b) + 1.0
        cy = m + float(u[3]) * max(h - 2 * m, 0.0)
        cx = m + float(u[4]) * max(w - 2 * m, 0.0)
        cls = 1 if float(u[5]) < 0.5 else 2
        dy, dx = yy - cy, xx - cx
        c, s = math.cos(theta), math.sin(theta)
        r2 = ((dx * c + dy * s) / a) ** 2 + ((-dx * s + dy * c) / b) ** 2
        inside = r2 <= 1.0
        if cls == 1:
            image = image + 0.8 * inside
        else:
            rim = inside & (r2 > 0.55)
            image = image + 1.2 * rim - 0.4 * (inside & ~rim)
        label[inside] = cls

    # 5. 3x3 box blur (replicate padding keeps the border statistics)
    image = F.avg_pool2d(F.pad(image[None, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0]
    return image.contiguous(), label


class SyntheticSegmentation(Dataset):
    """``n`` synthetic samples of the given ``split`` (``"train"``, ``"val"`` or ``"test"``: disjoint seeds).

    Samples are generated once, at construction (about 1 ms each at 64×64), and kept in memory.
    ``dataset[i]`` returns ``(image (1, H, W) float32, label (H, W) int64)``.
    """

    num_classes = 3
    in_channels = 1
    class_names = SYNTHETIC_CLASSES

    def __init__(self, n: int = 1024, size: int | tuple[int, int] = 64, seed: int = 0, split: str = "train"):
        if split not in _SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {list(_SPLIT_OFFSETS)}, got {split!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.seed, self.split = int(seed), split
        base = self.seed * 10_000_019 + _SPLIT_OFFSETS[split]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: intra-op threads only add overhead (20x slower on a busy machine)
        try:
            pairs = [make_synthetic_sample(base + i, self.size) for i in range(n)]
        finally:
            torch.set_num_threads(threads)
        self.images = torch.stack([p[0] for p in pairs])
        self.labels = torch.stack([p[1] for p in pairs])
        self.names = [f"synthetic_{split}_{i:05d}" for i in range(n)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def describe(self) -> str:
        return f"synthetic ({self.split}, {len(self)} images {self.size[0]}x{self.size[1]}, seed {self.seed})"

    def preprocess_config(self) -> dict:
        # image files (see export_png) hold (x - lo) / (hi - lo); value_range maps them back
        return {"kind": "synthetic", "in_channels": 1, "value_range": list(PNG_RANGE), "size": list(self.size)}

    def export_png(self, directory: str, n: Optional[int] = None) -> list[str]:
        """Write the first ``n`` samples as ``directory/images/NAME.png`` (16-bit grey, intensities ``lo..hi`` of
        :data:`PNG_RANGE` mapped to 0..65535) and ``directory/masks/NAME.png`` (class indices), i.e. an
        image/mask folder dataset. Returns the image paths."""
        from .io import write_png

        lo, hi = PNG_RANGE
        paths = []
        for i in range(min(n or len(self), len(self))):
            img = ((self.images[i, 0].clamp(lo, hi) - lo) / (hi - lo) * 65535 + 0.5).to(torch.int32).numpy()
            path = os.path.join(directory, "images", self.names[i] + ".png")
            write_png(path, img.astype("uint16"))
            write_png(os.path.join(directory, "masks", self.names[i] + ".png"), self.labels[i].numpy().astype("uint8"))
            paths.append(path)
        return paths


def foreground_fraction(labels: torch.Tensor, num_classes: int = 3) -> list[float]:
    """Fraction of pixels per class (for documentation and tests)."""
    counts = torch.bincount(labels.flatten(), minlength=num_classes).double()
    return (counts / counts.sum()).tolist()

