"""The EMCAD decoder (docs/models.md#emcad-decoder)."""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from torch import Tensor

from .blocks import CAB, EUCB, LGAG, SAB, BackendMixin, MSCBLayer, apply_mscam_attention, set_backend

__all__ = ["EMCAD"]


class EMCAD(BackendMixin, nn.Module):
    """Efficient multi-scale convolutional attention decoder.

    Args:
        channels: decoder widths deep → shallow ``[C0, C1, C2, C3]`` (strides 32, 16, 8, 4).
        kernel_sizes: MSDC kernel sizes.
        expansion_factor: MSCB expansion. Defaults to the paper's 2 (the original class default of 6 is not the
            paper configuration, docs/models.md#emcad-decoder).
        dw_parallel, add: MSDC parallel branches, summed (paper) or concatenated.
        lgag_ks: LGAG kernel size (groups = C/2).
        activation: MSCB activation (paper: ``relu6``). EUCB and LGAG always use ReLU (docs/models.md#eucb).
        backend: ``"torch"``, ``"auto"`` or an ``emcad_kernels`` backend name, set on every block.

    ``forward(x, skips)`` takes the stride-32 feature ``x`` (C0 channels) and ``skips = [x3, x2, x1]`` (C1, C2, C3
    channels at strides 16, 8, 4) and returns ``[d4, d3, d2, d1]``.
    """

    def __init__(self, channels: Sequence[int] = (512, 320, 128, 64), kernel_sizes: Sequence[int] = (1, 3, 5),
                 expansion_factor: float = 2, dw_parallel: bool = True, add: bool = True, lgag_ks: int = 3,
                 activation: str = "relu6", backend: str = "auto"):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 4:
            raise ValueError(f"channels needs 4 widths (deep → shallow), got {channels}")
        for c in channels[1:]:
            if c % 2:
                raise ValueError(f"channels {channels}: stages 3..1 need even widths (LGAG uses C/2 groups)")
        self.channels = channels
        self.kernel_sizes = list(kernel_sizes)
        self.expansion_factor = expansion_factor
        self.dw_parallel = dw_parallel
        self.add = add
        self.lgag_ks = lgag_ks
        self.activation = activation
        c0, c1, c2, c3 = channels

        def mscb(c: int) -> MSCBLayer:
            return MSCBLayer(c, c, n=1, stride=1, kernel_sizes=self.kernel_sizes, expansion_factor=expansion_factor,
                             dw_parallel=dw_parallel, add=add, activation=activation)

        def lgag(c: int) -> LGAG:
            return LGAG(F_g=c, F_l=c, F_int=c // 2, kernel_size=lgag_ks, groups=c // 2)

        # Registration order = state-dict order (docs/models.md#emcad-decoder,
        # docs/state_dicts.md#emcad-decoder-pvtv2-b2-channels).
        self.mscb4 = mscb(c0)
        self.eucb3 = EUCB(c0, c1, kernel_size=3, stride=1)
        self.lgag3 = lgag(c1)
        self.mscb3 = mscb(c1)
        self.eucb2 = EUCB(c1, c2, kernel_size=3, stride=1)
        self.lgag2 = lgag(c2)
        self.mscb2 = mscb(c2)
        self.eucb1 = EUCB(c2, c3, kernel_size=3, stride=1)
        self.lgag1 = lgag(c3)
        self.mscb1 = mscb(c3)
        self.cab4 = CAB(c0)
        self.cab3 = CAB(c1)
        self.cab2 = CAB(c2)
        self.cab1 = CAB(c3)
        self.sab = SAB(7)  # one instance, shared by all four stages
        set_backend(self, backend)

    def _check_inputs(self, x: Tensor, skips: Sequence[Tensor]) -> None:
        if len(skips) != 3:
            raise ValueError(f"EMCAD expects 3 skip features [x3, x2, x1], got {len(skips)}")
        for name, t, c in zip(("x", "skips[0]", "skips[1]", "skips[2]"), (x, *skips), self.channels):
            if t.dim() != 4 or t.shape[1] != c:
                raise ValueError(f"EMCAD: {name} must be (B, {c}, H, W), got {tuple(t.shape)}")
        h, w = x.shape[-2:]
        for i, t in enumerate(skips):
            expected = (h * 2 ** (i + 1), w * 2 ** (i + 1))
            if tuple(t.shape[-2:]) != expected:
                raise ValueError(f"EMCAD: skips[{i}] must have spatial size {expected} (2^{i + 1} × the deepest "
                                 f"feature's {h}×{w}), got {tuple(t.shape[-2:])}")

    def _stage(self, d: Tensor, cab: CAB, mscb: MSCBLayer) -> Tensor:
        """MSCAM (docs/models.md#mscam): CAB, the shared SAB, then MSCB (fused backends: one ``mscam`` op for
        CAB·SAB)."""
        return mscb(apply_mscam_attention(d, cab, self.sab))

    def forward(self, x: Tensor, skips: Sequence[Tensor]) -> list[Tensor]:
        self._check_inputs(x, skips)
        d4 = self._stage(x, self.cab4, self.mscb4)
        outputs = [d4]
        d = d4
        stages = ((self.eucb3, self.lgag3, self.cab3, self.mscb3), (self.eucb2, self.lgag2, self.cab2, self.mscb2),
                  (self.eucb1, self.lgag1, self.cab1, self.mscb1))
        for (eucb, lgag, cab, mscb), skip in zip(stages, skips):
            u = eucb(d)
            if lgag.backend == "torch":
                d = u + lgag(g=u, x=skip)  # the original composition
            else:
                d = lgag(g=u, x=skip, aggregate=True)  # fused: u + skip·ψ in one op
            d = self._stage(d, cab, mscb)
            outputs.append(d)
        return outputs
