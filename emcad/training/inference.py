"""Loading a trained model for ``emcad evaluate`` / ``emcad predict``, and preparing new images for it."""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn as nn

from emcad.training.checkpoint import FORMAT

__all__ = ["load_for_inference", "prepare_image"]


class _ValueRange(torch.utils.data.Dataset):
    """Maps a folder dataset's [0, 1] images to ``value_range`` (exported synthetic PNGs)."""

    def __init__(self, dataset, value_range):
        self.dataset, (self.lo, self.hi) = dataset, (float(v) for v in value_range)
        self.names = dataset.names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.lo + image * (self.hi - self.lo), label


def load_for_inference(path: str | os.PathLike, *, backend: str = "auto", device: str = "cpu",
                       model_name: Optional[str] = None, num_classes: Optional[int] = None
                       ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode on device, preprocess)`` from

    * a ``save_pretrained`` directory (``checkpoints/best``, ``checkpoints/final``), with its ``preprocess.json``;
    * a training checkpoint (``checkpoints/last.pt``);
    * an original SLDGroup/EMCAD ``.pth`` state dict (:func:`emcad.load_original_checkpoint`; the preprocessing
      is then unknown: inputs are scaled to [0, 1], the size defaults to 224).
    """
    import json

    from emcad.models import create_model, from_pretrained, set_backend

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    pre: dict[str, Any] = {}
    if os.path.isdir(path):
        model = from_pretrained(path, backend=backend)
        pp = os.path.join(path, "preprocess.json")
        if os.path.isfile(pp):
            with open(pp) as f:
                pre = json.load(f)
    else:
        ckpt = None
        if path.endswith(".pt"):
            from emcad.training.checkpoint import NotATrainingCheckpoint, load_training_checkpoint
            try:
                ckpt = load_training_checkpoint(path)
            except NotATrainingCheckpoint:  # a damaged training checkpoint is an error, not an original .pth
                ckpt = None
        if ckpt is not None and ckpt.get("format") == FORMAT:
            if not ckpt.get("model_name"):
                raise ValueError(f"'{path}' holds a custom model that cannot be rebuilt by name")
            config = {k: v for k, v in ckpt["model_config"].items() if k != "encoder"}
            model = create_model(ckpt["model_name"], backend=backend, **config)
            model.load_state_dict(ckpt["model"])
            pre = dict(ckpt.get("preprocess", {}), num_classes=ckpt.get("num_classes"),
                       class_names=ckpt.get("class_names"), eval_head=ckpt["config"].get("eval_head", "last"))
        else:
            from emcad.checkpoint import load_original_checkpoint
            encoder = None
            if model_name is not None:
                from emcad.models.registry import MODELS
                encoder = MODELS.get(model_name)
            model, report = load_original_checkpoint(path, num_classes=num_classes, encoder=encoder)
            set_backend(model, backend)
            pre = {"kind": "original", "in_channels": model.in_channels, "size": [224, 224]}
    pre.setdefault("num_classes", getattr(model, "num_classes", None))
    pre.setdefault("size", [224, 224])
    pre.setdefault("in_channels", getattr(model, "in_channels", 3))
    pre.setdefault("normalize", "none")
    return model.to(device).eval(), pre


def prepare_image(array, pre: dict[str, Any]) -> torch.Tensor:
    """A read image (numpy) → ``(C, H, W)`` float tensor preprocessed like the training data."""
    from emcad.data.folder import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor

    x = image_to_tensor(array, int(pre.get("in_channels") or 1))
    if pre.get("value_range"):  # files store (x - lo) / (hi - lo), e.g. exported synthetic images
        lo, hi = (float(v) for v in pre["value_range"])
        x = lo + x * (hi - lo)
    if pre.get("normalize") == "imagenet":
        x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x
