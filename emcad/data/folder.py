"""Image/mask folder datasets: ``DIR/images/NAME.ext`` paired with ``DIR/masks/NAME[suffix].ext`` by file stem.

Images and masks may be PNG, JPEG, TIFF or BMP (PNG without Pillow, the rest with Pillow). Everything is checked
when the dataset is built, before any training starts, and each problem raises :class:`DatasetError` naming the
file(s): an image without a mask or a mask without an image, an unreadable or corrupt file, an image and mask of
different sizes, a colour mask, or labels outside the class range.

Masks:

* **binary** when all mask values lie in {0, 1} or in {0, 255} (the foreground becomes class 1), or, for 8-bit masks
  with other values (JPEG artefacts), after thresholding at 128;
* **class-index** masks otherwise (values 0 … K−1, e.g. palette PNGs); ``num_classes`` = K unless given.

``mask_mode`` ("auto", "binary", "multiclass") overrides the detection. ``dataset[i]`` returns
``(image (C, H, W) float32 in [0, 1] (or ImageNet-normalised), label (H, W) int64)`` resized to ``size``
(bilinear with antialiasing for the image, nearest for the mask).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .io import IMAGE_EXTENSIONS, ImageReadError, read_image

__all__ = ["DatasetError", "ImageMaskFolder", "IMAGENET_MEAN", "IMAGENET_STD", "image_to_tensor", "resize_pair"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
    """A dataset cannot be used as it is; the message names the offending file(s)."""


def _listing(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def image_to_tensor(arr: np.ndarray, channels: Optional[int] = None) -> torch.Tensor:
    """``(H, W)`` / ``(H, W, C)`` array → ``(C, H, W)`` float32 scaled to [0, 1] by the dtype's range (uint8: /255,
    uint16: /65535; float data is kept). ``channels`` (1 or 3) converts grey ↔ RGB."""
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        t = torch.from_numpy(a.astype(np.float32) / 255.0)
    elif a.dtype == np.uint16:
        t = torch.from_numpy(a.astype(np.float32) / 65535.0)
    elif a.dtype == bool:
        t = torch.from_numpy(a.astype(np.float32))
    else:
        t = torch.from_numpy(a.astype(np.float32))
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    if channels is not None and t.shape[0] != channels:
        if channels == 3 and t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        elif channels == 1 and t.shape[0] >= 3:
            t = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2])[None]
        else:
            raise ValueError(f"cannot convert a {t.shape[0]}-channel image to {channels} channels")
    return t.contiguous()


def resize_pair(image: torch.Tensor, label: Optional[torch.Tensor], size: Sequence[int]
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Resize ``image (C, H, W)`` bilinearly (antialiased when shrinking) and ``label (H, W)`` by nearest."""
    size = tuple(int(s) for s in size)
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if label is not None and tuple(label.shape[-2:]) != size:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, label


def _stems(directory: str, what: str) -> dict[str, str]:
    if not os.path.isdir(directory):
        raise DatasetError(f"{what} directory '{directory}' does not exist")
    found: dict[str, str] = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in found:
            raise DatasetError(f"two {what} files share the stem '{stem}': '{found[stem]}' and '{path}'")
        found[stem] = path
    return found


class ImageMaskFolder(Dataset):
    """Image/mask pairs from ``root/images`` and ``root/masks`` (or explicit ``images_dir`` / ``masks_dir``).

    Args:
        root: directory with ``images/`` and ``masks/`` subdirectories (ignored where the explicit dirs are given).
        size: output ``(H, W)``; None keeps the file size (all pairs must then have the same size to batch).
        mask_suffix: the mask of ``NAME.png`` is ``NAME{mask_suffix}.*`` (e.g. ``"_segmentation"`` for ISIC).
        mask_mode: "auto", "binary" or "multiclass" (see the module docstring).
        num_classes: for class-index masks, the number of classes (default: max label + 1). Binary masks give 1
            (sigmoid output) unless ``num_classes=2`` is asked for (softmax over background/foreground).
        channels: 1 or 3 to force grey or RGB input; default: 3 if any image is colour, else 1.
        normalize: "none" ([0, 1]) or "imagenet" (subtract the ImageNet mean, divide by its std; 3 channels).
        names: restrict to these stems (e.g. a split).
    """

    def __init__(self, root: Optional[str | os.PathLike] = None, size: Optional[Sequence[int]] = (224, 224), *,
                 images_dir: Optional[str | os.PathLike] = None, masks_dir: Optional[str | os.PathLike] = None,
                 mask_suffix: str = "", mask_mode: str = "auto", num_classes: Optional[int] = None,
                 channels: Optional[int] = None, normalize: str = "none", names: Optional[Sequence[str]] = None):
        if mask_mode not in ("auto", "binary", "multiclass"):
            raise ValueError(f"mask_mode must be 'auto', 'binary' or 'multiclass', got {mask_mode!r}")
        if normalize not in ("none", "imagenet"):
            raise ValueError(f"normalize must be 'none' or 'imagenet', got {normalize!r}")
        if root is None and (images_dir is None or masks_dir is None):
            raise ValueError("give root (with images/ and masks/) or both images_dir and masks_dir")
        self.images_dir = os.fspath(images_dir) if images_dir is not None else os.path.join(os.fspath(root), "images")
        self.masks_dir = os.fspath(masks_dir) if masks_dir is not None else os.path.join(os.fspath(root), "masks")
        self.size = tuple(int(s) for s in size) if size is not None else None
        self.normalize = normalize

        images = _stems(self.images_dir, "image")
        masks = _stems(self.masks_dir, "mask")
        if mask_suffix:
            masks = {(s[:-len(mask_suffix)] if s.endswith(mask_suffix) else s + "\0unpaired"): p
                     for s, p in masks.items()}
        no_mask = [images[s] for s in images if s not in masks]
        no_image = [masks[s] for s in masks if s not in images]
        if no_mask or no_image:
            parts = []
            if no_mask:
                parts.append(f"{len(no_mask)} image(s) without a mask in '{self.masks_dir}' "
                             f"(expected NAME{mask_suffix}.<ext>): {_listing(no_mask)}")
            if no_image:
                parts.append(f"{len(no_image)} mask(s) without an image in '{self.images_dir}': "
                             f"{_listing(no_image)}")
            raise DatasetError("unpaired files: " + "; ".join(parts))
        stems = sorted(images)
        if names is not None:
            missing = [n for n in names if n not in images]
            if missing:
                raise DatasetError(f"requested names not in '{self.images_dir}': {_listing(missing)}")
            stems = list(names)
        if not stems:
            raise DatasetError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in '{self.images_dir}'")
        self.names = stems
        self.image_paths = [images[s] for s in stems]
        self.mask_paths = [masks[s] for s in stems]

        # validate every pair now: readable, same size, grey masks; collect label values and channels
        values: set[int] = set()
        any_colour, all_8bit = False, True
        for ipath, mpath in zip(self.image_paths, self.mask_paths):
            img = self._read(ipath, as_mask=False)
            msk = self._read(mpath, as_mask=True)
            if img.shape[:2] != msk.shape[:2]:
                raise DatasetError(f"size mismatch: image '{ipath}' is {img.shape[1]}x{img.shape[0]} but mask "
                                   f"'{mpath}' is {msk.shape[1]}x{msk.shape[0]} (width x height)")
            msk = self._grey_mask(msk, mpath)
            if not np.issubdtype(msk.dtype, np.integer):
                if not np.all(np.mod(msk, 1) == 0):
                    raise DatasetError(f"mask '{mpath}' has non-integer values (dtype {msk.dtype})")
                msk = msk.astype(np.int64)
            if msk.min() < 0:
                raise DatasetError(f"mask '{mpath}' has negative values")
            all_8bit &= msk.dtype == np.uint8
            any_colour |= img.ndim == 3
            values.update(int(v) for v in np.unique(msk))
        self.channels = channels or (3 if any_colour else 1)
        if normalize == "imagenet" and self.channels != 3:
            raise DatasetError("normalize='imagenet' needs 3-channel images; these are grey (pass channels=3)")

        binary_sets = (values <= {0, 1}) or (values <= {0, 255})
        if mask_mode == "auto":
            mask_mode = "binary" if binary_sets or (all_8bit and max(values) >= 64) else "multiclass"
        self.mask_mode = mask_mode
        if mask_mode == "binary":
            self._threshold = 1 if values <= {0, 1} else 128
            self.num_classes = num_classes if num_classes is not None else 1
            if self.num_classes not in (1, 2):
                raise DatasetError(f"binary masks give 1 (sigmoid) or 2 (softmax) classes, not {self.num_classes}")
        else:
            self._threshold = None
            top = max(values)
            self.num_classes = num_classes if num_classes is not None else top + 1
            if top >= self.num_classes:
                bad = [m for m in self.mask_paths if int(self._grey_mask(self._read(m, True), m).max()) >= self.num_classes]
                raise DatasetError(f"mask label {top} is outside the {self.num_classes} classes (labels must be "
                                   f"0..{self.num_classes - 1}): {_listing(bad)}")
        self.in_channels = self.channels

    @staticmethod
    def _read(path: str, as_mask: bool) -> np.ndarray:
        try:
            return read_image(path, as_mask=as_mask)
        except ImageReadError as e:
            raise DatasetError(str(e)) from e

    @staticmethod
    def _grey_mask(msk: np.ndarray, path: str) -> np.ndarray:
        if msk.ndim == 3:
            if np.all(msk == msk[..., :1]):
                return msk[..., 0]
            raise DatasetError(f"mask '{path}' is a colour image; masks must be grey (0/255 binary) or class-index "
                               f"images (e.g. palette PNGs with values 0..K-1)")
        return msk

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair at its file size (no resize), preprocessed."""
        ipath, mpath = self.image_paths[index], self.mask_paths[index]
        image = image_to_tensor(self._read(ipath, as_mask=False), self.channels)
        msk = self._grey_mask(self._read(mpath, as_mask=True), mpath).astype(np.int64)
        if self.mask_mode == "binary":
            msk = (msk >= self._threshold).astype(np.int64)
        if self.normalize == "imagenet":
            image = (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return image, torch.from_numpy(msk)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        if self.size is not None:
            image, label = resize_pair(image, label, self.size)
        return image, label

    def describe(self) -> str:
        kind = "binary" if self.mask_mode == "binary" else f"{self.num_classes}-class"
        return f"folder '{os.path.dirname(self.images_dir) or self.images_dir}' ({len(self)} {kind} pairs)"

    def preprocess_config(self) -> dict:
        return {"kind": "folder", "in_channels": self.channels, "normalize": self.normalize,
                "size": list(self.size) if self.size else None}
