"""EMCADNet: encoder + EMCAD decoder + four prediction heads (docs/models.md#emcadnet)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .blocks import BackendMixin, set_backend
from .decoder import EMCAD

__all__ = ["EMCADNet", "OUTPUT_STRIDE"]

OUTPUT_STRIDE = 32  # H and W must be multiples of this
HEADS = ("all", "last", "lowres")  # forward(heads=...)


class EMCADNet(BackendMixin, nn.Module):
    """The full EMCAD segmentation network.

    Submodules (registration = state-dict order): ``conv`` (1→3 stem: 1×1 conv with bias, BN, ReLU), ``backbone``
    (from :func:`emcad.encoders.create_encoder`), ``decoder`` (:class:`EMCAD`), ``out_head4`` … ``out_head1``
    (1×1 convs with bias on d4 … d1).

    ``forward(x)`` takes ``(B, 1 or 3, H, W)`` with H and W multiples of 32 and returns ``[p4, p3, p2, p1]``, each
    ``(B, num_classes, H, W)`` logits (bilinear, ``align_corners=False``, to the input size). The prediction is
    ``p1`` (the last element). The stem runs only for 1-channel input (as in the original code).

    Args:
        num_classes: output channels of the heads.
        kernel_sizes, expansion_factor, dw_parallel, add, lgag_ks, activation: decoder settings. Defaults are the
            paper configuration (ef=2, [1, 3, 5], parallel, summed, LGAG 3×3, ReLU6 in MSCB;
            docs/models.md#paper-configuration), not the original class defaults.
        encoder: an :data:`emcad.encoders.ENCODERS` name (``pvt_v2_b0`` … ``pvt_v2_b5``, ``resnet18`` …
            ``resnet152``). Unknown names raise ``ValueError``.
        encoder_weights: optional local file with pretrained encoder weights (loaded strictly).
        in_channels: the channels the input is documented to have, 1 (grayscale; the stem maps it to 3) or 3.
            The architecture is the same for both (the stem is always present, as in every original checkpoint);
            ``forward`` accepts either 1 or 3 channels whatever this says. Other values raise ``ValueError``.
        backend: ``"torch"``, ``"auto"`` or an ``emcad_kernels`` backend name for the decoder blocks.

    Heads at inference: ``forward(x, heads="last")`` computes only the prediction head and returns ``[p1]``
    (``out_head1`` on d1, upsampled once; the other three heads and their full-size upsamplings are skipped; the
    whole decoder still runs, d1 needs every stage). ``heads="all"`` (default) returns ``[p4, p3, p2, p1]``. The
    attribute ``inference_heads`` (``"all"`` or ``"last"``, not saved in the config) sets the default for calls
    in eval mode, so evaluation code that takes ``out[-1]`` gets p1 either way.

    Heads for the fused loss: ``forward(x, heads="lowres")`` returns the four head logits at their native
    resolution, ``[out_head4(d4), out_head3(d3), out_head2(d2), out_head1(d1)]`` (H/32 … H/4), without
    upsampling. The heads are 1×1 convs and bilinear upsampling is linear, so upsampling these to (H, W) gives
    ``heads="all"`` (up to rounding); :class:`emcad.losses.SegmentationLoss` accepts them directly (its fused
    MUTATION path never builds the upsampled logits). The trainer uses this in training.
    """

    def __init__(self, num_classes: int = 1, kernel_sizes: Sequence[int] = (1, 3, 5), expansion_factor: float = 2,
                 dw_parallel: bool = True, add: bool = True, lgag_ks: int = 3, activation: str = "relu6",
                 encoder: str = "pvt_v2_b2", encoder_weights: Optional[str | os.PathLike] = None,
                 in_channels: int = 3, backend: str = "auto"):
        super().__init__()
        from emcad.encoders import create_encoder  # imported lazily: the encoder package is independent

        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale, uses the 1→3 stem) or 3, got {in_channels!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.encoder_name = encoder
        self.conv = nn.Sequential(nn.Conv2d(1, 3, kernel_size=1, bias=True), nn.BatchNorm2d(3), nn.ReLU(inplace=False))
        self.backbone = create_encoder(encoder, weights=encoder_weights)
        channels = list(reversed(self.backbone.out_channels))  # deep → shallow
        self.decoder = EMCAD(channels, kernel_sizes=kernel_sizes, expansion_factor=expansion_factor,
                             dw_parallel=dw_parallel, add=add, lgag_ks=lgag_ks, activation=activation)
        self.out_head4 = nn.Conv2d(channels[0], num_classes, 1)
        self.out_head3 = nn.Conv2d(channels[1], num_classes, 1)
        self.out_head2 = nn.Conv2d(channels[2], num_classes, 1)
        self.out_head1 = nn.Conv2d(channels[3], num_classes, 1)
        self.config = dict(num_classes=num_classes, in_channels=in_channels, encoder=encoder,
                           kernel_sizes=[int(k) for k in kernel_sizes], expansion_factor=expansion_factor,
                           dw_parallel=bool(dw_parallel), add=bool(add), lgag_ks=int(lgag_ks), activation=activation)
        self.inference_heads = "all"
        set_backend(self, backend)

    @property
    def channels(self) -> list[int]:
        """Decoder widths, deep → shallow."""
        return list(self.decoder.channels)

    def check_input(self, x: Tensor) -> None:
        if not hasattr(x, "dim") or x.dim() != 4:
            raise ValueError(f"EMCADNet expects a 4-D (B, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"EMCADNet expects 1 (grayscale) or 3 input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        if h % OUTPUT_STRIDE or w % OUTPUT_STRIDE:
            def up(v: int) -> int:
                return -(-v // OUTPUT_STRIDE) * OUTPUT_STRIDE

            raise ValueError(f"EMCADNet input height and width must be multiples of {OUTPUT_STRIDE}, got {h}×{w} "
                             f"(nearest valid size: {up(h)}×{up(w)}; pad or resize the input)")

    def forward(self, x: Tensor, mode: Optional[str] = None, heads: Optional[str] = None) -> list[Tensor]:
        """``mode`` exists for compatibility with the original signature and is ignored. ``heads``: ``"all"``
        → ``[p4, p3, p2, p1]``; ``"last"`` → ``[p1]`` only; ``"lowres"`` → ``[p4, p3, p2, p1]`` at their native
        resolutions (not upsampled); None → ``inference_heads`` in eval mode, else all."""
        if heads is None:
            heads = getattr(self, "inference_heads", "all") if not self.training else "all"
        if heads not in HEADS:
            raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
        self.check_input(x)
        size = tuple(x.shape[-2:])
        if x.shape[1] == 1:
            x = self.conv(x)
        x1, x2, x3, x4 = self.backbone(x)
        d4, d3, d2, d1 = self.decoder(x4, [x3, x2, x1])
        if heads == "last":
            return [F.interpolate(self.out_head1(d1), size=size, mode="bilinear", align_corners=False)]
        pairs = ((self.out_head4, d4), (self.out_head3, d3), (self.out_head2, d2), (self.out_head1, d1))
        if heads == "lowres":
            return [head(d) for head, d in pairs]
        return [F.interpolate(head(d), size=size, mode="bilinear", align_corners=False) for head, d in pairs]
