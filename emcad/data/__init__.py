"""Datasets: the built-in synthetic data, image/mask folders and Synapse-style slices and volumes.

Every dataset returns ``(image (C, H, W) float32, label (H, W) int64)`` and has ``num_classes`` (1 = binary with a
sigmoid output), ``in_channels``, ``names``, ``describe()`` and ``preprocess_config()`` (what ``emcad predict``
must do to a new image).
"""

from .folder import IMAGENET_MEAN, IMAGENET_STD, DatasetError, ImageMaskFolder, image_to_tensor, resize_pair
from .io import IMAGE_EXTENSIONS, ImageReadError, read_image, write_png
from .synapse import SYNAPSE_CLASSES, SynapseSlices, SynapseVolumes, remap_synapse_labels
from .synthetic import SYNTHETIC_CLASSES, SyntheticSegmentation, make_synthetic_sample
from .transforms import Augmented, flip_rot90

__all__ = [
    "Augmented", "DatasetError", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "ImageMaskFolder",
    "ImageReadError", "SYNAPSE_CLASSES", "SYNTHETIC_CLASSES", "SynapseSlices", "SynapseVolumes",
    "SyntheticSegmentation", "flip_rot90", "image_to_tensor", "make_synthetic_sample", "read_image",
    "remap_synapse_labels", "resize_pair", "split_indices", "write_png",
]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/validation split of ``range(n)``: ``(train, val)``, both sorted; val has at least 1 item
    when ``val_fraction > 0`` and ``n >= 2``."""
    import torch

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 or n < 2 else max(1, round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 7919)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])
