"""Feature encoders for EMCAD: PVTv2 b0-b5 and ResNet-18/34/50/101/152.

All encoders map ``(B, 3, H, W)`` to four NCHW feature maps at strides
4, 8, 16, 32, shallow to deep, with ``encoder.out_channels`` channels.

This package keeps its own registry (:data:`ENCODERS`); it never registers
anything in timm's model registry. Pretrained weights are only read from
explicit local files (:func:`load_encoder_weights`), never downloaded.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable

import torch.nn as nn

from .pvtv2 import (
    PyramidVisionTransformerV2,
    pvt_v2_b0,
    pvt_v2_b1,
    pvt_v2_b2,
    pvt_v2_b3,
    pvt_v2_b4,
    pvt_v2_b5,
)
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .weights import (
    EncoderWeightsError,
    convert_official_pvt_to_timm,
    convert_timm_pvt_to_official,
    detect_key_format,
    load_encoder_weights,
    read_state_dict,
)

__all__ = [
    "ENCODERS",
    "ENCODER_CHANNELS",
    "create_encoder",
    "load_encoder_weights",
    "read_state_dict",
    "detect_key_format",
    "convert_timm_pvt_to_official",
    "convert_official_pvt_to_timm",
    "EncoderWeightsError",
    "PyramidVisionTransformerV2",
    "ResNet",
    "pvt_v2_b0",
    "pvt_v2_b1",
    "pvt_v2_b2",
    "pvt_v2_b3",
    "pvt_v2_b4",
    "pvt_v2_b5",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "pvt_v2_b0": pvt_v2_b0,
    "pvt_v2_b1": pvt_v2_b1,
    "pvt_v2_b2": pvt_v2_b2,
    "pvt_v2_b3": pvt_v2_b3,
    "pvt_v2_b4": pvt_v2_b4,
    "pvt_v2_b5": pvt_v2_b5,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}

# Feature channels, shallow -> deep (strides 4, 8, 16, 32). The EMCAD decoder
# takes them reversed (deep -> shallow).
ENCODER_CHANNELS: dict[str, list[int]] = {
    "pvt_v2_b0": [32, 64, 160, 256],
    **{f"pvt_v2_b{i}": [64, 128, 320, 512] for i in range(1, 6)},
    "resnet18": [64, 128, 256, 512],
    "resnet34": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "resnet101": [256, 512, 1024, 2048],
    "resnet152": [256, 512, 1024, 2048],
}


def create_encoder(name: str, weights: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build the encoder ``name`` and optionally load weights from a local file.

    Args:
        name: a key of :data:`ENCODERS`, e.g. ``"pvt_v2_b2"`` or ``"resnet50"``.
        weights: path of a local checkpoint (official / timm PVTv2 or torchvision
            ResNet keys), loaded strictly with :func:`load_encoder_weights`.
            ``None`` keeps the random initialisation.
        **kwargs: passed to the constructor (e.g. ``drop_path_rate`` for PVTv2).

    Raises:
        ValueError: unknown ``name``; the message lists the valid names.
        FileNotFoundError, EncoderWeightsError: see :func:`load_encoder_weights`.
    """
    try:
        constructor = ENCODERS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), ENCODERS, n=1)
        suggestion = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown encoder {name!r}.{suggestion} Valid names: {', '.join(ENCODERS)}"
        ) from None
    encoder = constructor(**kwargs)
    if weights is not None:
        load_encoder_weights(encoder, weights)
    return encoder
