"""Synapse multi-organ CT in the TransUNet layout (docs/models.md#synapse-data-and-evaluation).

* Training slices: ``train_npz/caseXXXX_sliceYYY.npz`` with arrays ``image`` (H, W, float in [0, 1] after the HU
  clip) and ``label`` (H, W, class indices), optionally listed in ``lists_Synapse/train.txt`` (names without
  extension). :class:`SynapseSlices` resizes them to ``size`` (cubic spline for the image, order 0 for the label,
  as the original) and returns ``(image (1, H, W), label (H, W))``.
* Test volumes: ``test_vol_h5/caseXXXX.npy.h5`` with datasets ``image`` and ``label`` of shape (D, H, W).
  :class:`SynapseVolumes` returns whole volumes for per-case evaluation. ``.npz`` volumes (same keys) are read
  without h5py; ``.h5`` files need h5py, imported only when needed.

Labels are expected in the 9-class convention (background, spleen, right kidney, left kidney, gallbladder, pancreas,
liver, stomach, aorta). Raw 14-label annotations can be converted with :func:`remap_synapse_labels`.
"""

from __future__ import annotations

import os
import zipfile
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .folder import DatasetError

__all__ = ["SYNAPSE_CLASSES", "SynapseSlices", "SynapseVolumes", "read_h5_volume", "remap_synapse_labels",
           "zoom_slice"]

SYNAPSE_CLASSES = ("background", "spleen", "right kidney", "left kidney", "gallbladder", "pancreas", "liver",
                   "stomach", "aorta")


def remap_synapse_labels(label: np.ndarray) -> np.ndarray:
    """The 14-label BTCV annotation → 9 classes: labels {5, 9, 10, 12, 13} → 0 and 11 → 5
    (docs/models.md#synapse-data-and-evaluation)."""
    out = np.asarray(label).astype(np.int64).copy()
    out[np.isin(out, (5, 9, 10, 12, 13))] = 0
    out[out == 11] = 5
    return out


def zoom_slice(array: np.ndarray, size: Sequence[int], order: int) -> np.ndarray:
    """scipy ``zoom`` of a 2-D slice to ``size`` (order 3 for images, 0 for labels), as the original code."""
    from scipy.ndimage import zoom

    h, w = array.shape[-2:]
    if (h, w) == tuple(size):
        return np.asarray(array)
    return zoom(array, (size[0] / h, size[1] / w), order=order)


def _names(directory: str, list_file: Optional[str], ext: str) -> list[str]:
    if not os.path.isdir(directory):
        raise DatasetError(f"Synapse directory '{directory}' does not exist")
    if list_file is not None:
        if not os.path.isfile(list_file):
            raise DatasetError(f"list file '{list_file}' does not exist")
        with open(list_file) as f:
            names = [line.strip() for line in f if line.strip()]
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n + ext))]
        if missing:
            raise DatasetError(f"{len(missing)} file(s) named in '{list_file}' are missing from '{directory}': "
                               + ", ".join(n + ext for n in missing[:8]) + (" ..." if len(missing) > 8 else ""))
        return names
    names = sorted(f[:-len(ext)] for f in os.listdir(directory) if f.endswith(ext) and not f.startswith("."))
    if not names:
        raise DatasetError(f"no '*{ext}' files in '{directory}'")
    return names


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as data:
            if "image" not in data or "label" not in data:
                raise DatasetError(f"'{path}' lacks the 'image' and/or 'label' arrays (has {list(data.keys())})")
            return np.asarray(data["image"]), np.asarray(data["label"])
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetError(f"'{path}' cannot be read as .npz (truncated or corrupt?): {e}") from e


def read_h5_volume(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(image, label)`` arrays of a TransUNet ``.npy.h5`` test volume (needs h5py)."""
    try:
        import h5py
    except ImportError:
        raise DatasetError(f"reading '{path}' needs h5py, which is not installed (pip install h5py); "
                           f"alternatively convert the volumes to .npz with 'image' and 'label' arrays") from None
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f or "label" not in f:
                raise DatasetError(f"'{path}' lacks the 'image' and/or 'label' datasets (has {list(f.keys())})")
            return np.asarray(f["image"][:]), np.asarray(f["label"][:])
    except DatasetError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(f"'{path}' cannot be read as HDF5 (truncated or corrupt?): {e}") from e


def _check_label(label: np.ndarray, num_classes: int, path: str) -> np.ndarray:
    label = np.asarray(label)
    if label.size and (np.any(label < 0) or np.any(label % 1 != 0) or label.max() >= num_classes):
        raise DatasetError(f"'{path}': labels must be integers 0..{num_classes - 1} (found {np.unique(label)[:12]}); "
                           f"raw 14-label annotations need remap=True")
    return label.astype(np.int64)


class SynapseSlices(Dataset):
    """2-D ``.npz`` training slices. Files are checked lazily when first read except for their presence."""

    in_channels = 1
    class_names = SYNAPSE_CLASSES

    def __init__(self, directory: str | os.PathLike, size: Sequence[int] = (224, 224), *,
                 list_file: Optional[str | os.PathLike] = None, num_classes: int = 9, remap: bool = False,
                 names: Optional[Sequence[str]] = None):
        self.directory = os.fspath(directory)
        self.size = tuple(int(s) for s in size)
        self.num_classes, self.remap = int(num_classes), bool(remap)
        self.names = list(names) if names is not None else _names(
            self.directory, os.fspath(list_file) if list_file is not None else None, ".npz")

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path = os.path.join(self.directory, self.names[index] + ".npz")
        image, label = _load_npz(path)
        if image.ndim != 2 or image.shape != label.shape:
            raise DatasetError(f"'{path}': expected 2-D image and label of the same shape, got {image.shape} and "
                               f"{label.shape}")
        if self.remap:
            label = remap_synapse_labels(label)
        return image.astype(np.float32), _check_label(label, self.num_classes, path)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        image = zoom_slice(image, self.size, order=3).astype(np.float32)
        label = zoom_slice(label, self.size, order=0)
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(np.ascontiguousarray(label))

    def describe(self) -> str:
        return f"synapse slices '{self.directory}' ({len(self)} slices)"

    def preprocess_config(self) -> dict:
        return {"kind": "synapse", "in_channels": 1, "size": list(self.size)}


class SynapseVolumes:
    """Test volumes (``.npy.h5`` or ``.npz``), one case each: ``volumes[i]`` → ``(name, image (D, H, W) float32,
    label (D, H, W) int64)``."""

    def __init__(self, directory: str | os.PathLike, *, list_file: Optional[str | os.PathLike] = None,
                 num_classes: int = 9, remap: bool = False):
        self.directory = os.fspath(directory)
        self.num_classes, self.remap = int(num_classes), bool(remap)
        lf = os.fspath(list_file) if list_file is not None else None
        try:
            self.names, self.ext = _names(self.directory, lf, ".npy.h5"), ".npy.h5"
        except DatasetError:
            self.names, self.ext = _names(self.directory, lf, ".npz"), ".npz"

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        path = os.path.join(self.directory, self.names[index] + self.ext)
        image, label = read_h5_volume(path) if self.ext == ".npy.h5" else _load_npz(path)
        if image.shape != label.shape or image.ndim not in (2, 3):
            raise DatasetError(f"'{path}': image {image.shape} and label {label.shape} must be equal 2-D/3-D shapes")
        if image.ndim == 2:
            image, label = image[None], label[None]
        if self.remap:
            label = remap_synapse_labels(label)
        return self.names[index], image.astype(np.float32), _check_label(label, self.num_classes, path)
