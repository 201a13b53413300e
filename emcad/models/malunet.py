"""MALUNet (Ruan et al., BIBM 2022), re-implemented from docs/models.md#ege-unet-and-malunet (the original repository
has no licence; none of its code is used).

Structure, state-dict keys (279 tensors, all parameters, no buffers) and shapes are those of the original default
configuration, so checkpoints trained with the original code load with ``load_state_dict(strict=True)``:
``encoder1..3`` (dense 3×3 convs), ``encoder4..6`` (:class:`EAblock` → :class:`DGA`), ``scab`` (channel and
spatial attention bridge), ``decoder1..3`` (:class:`DGA` → :class:`EAblock`), ``decoder4..5`` (dense 3×3),
GroupNorms ``ebn1..5`` / ``dbn1..5``, ``final``. 177,943 parameters; 82,972,800 MACs at 1×3×256×256 in thop's
convention (:func:`emcad.flops_thop.count_macs`).

**Output.** Like the original, :class:`MALUNet` returns **probabilities** ``sigmoid(out0)`` of shape
``(B, num_classes, H, W)`` (no deep supervision). ``output="logits"`` returns the logits instead.

**Input scaling.** As for EGE-UNet: the original pipeline feeds each image min-max rescaled to **[0, 255]**
(:func:`emcad.models.egeunet.minmax_scale_255`); the network does no normalisation itself. H and W must be
multiples of 32.

**Backends.** ``backend="torch"`` is the plain composition of the ``nn`` submodules. Any other backend runs, on
the same parameters, each DGA's four dilated depthwise convs (d = 7, 5, 2, 1) + its GroupNorm (whose 4 groups are
the dilation groups) as one :func:`emcad_kernels.dilated_dwconv_groupnorm` call, and each GAU
``DepthWiseConv2d``'s depthwise conv + GroupNorm(4) as one call of the same op (4 groups, dilation 1), except
with ``backend="auto"`` on CPU, where the plain depthwise conv + GroupNorm is faster for these uniform groups.
EAblock and the bridges run plain PyTorch in every mode.

**Differences from the original code** (deliberate; docs/models.md#malunet-blocks):

* EAblock's ``linear_0`` / ``linear_1``: the original makes ``linear_1.weight`` a permuted view of ``linear_0``'s
  storage at construction and then initialises both in place (they stay tied until ``.to()``/``.cuda()`` gives
  each its own storage, which the original training does). Here they are **independent parameters** from the
  start, initialised the way the released training flow ends up: ``linear_0 ~ N(0, 2/C)`` and
  ``linear_1 = linear_0ᵀ``. Both are stored separately in the state dict, as in the original.
* The data-pipeline quirks (unsorted ``os.listdir`` pairing of images and masks, one rotation angle drawn per run)
  are not part of the model; this package's data code sorts and pairs by name and draws augmentations per sample.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from emcad_kernels import dilated_dwconv_groupnorm

from .blocks import BackendMixin, set_backend
from .egeunet import (check_c_list, check_counts, check_output, check_skin_input, init_skin_weights, like,
                      minmax_scale_255, upsample)

__all__ = ["CABridge", "DGA", "DepthWiseConv2d", "EAblock", "GAU", "MALUNet", "SABridge", "SCAttBridge",
           "minmax_scale_255"]

GN_GROUPS = 4


class DepthWiseConv2d(BackendMixin, nn.Module):
    """``conv1`` (depthwise k×k, bias) → ``norm_layer`` (GroupNorm(4)) → ``conv2`` (1×1, bias)
    (docs/models.md#malunet-blocks). Fused backends run ``conv1`` + ``norm_layer`` as one
    ``dilated_dwconv_groupnorm`` call (4 channel groups, all with this conv's dilation)."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, padding: int = 1, stride: int = 1,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(dim_in, dim_in, kernel_size, padding=padding, stride=stride, dilation=dilation,
                               groups=dim_in)
        self.norm_layer = nn.GroupNorm(GN_GROUPS, dim_in)
        self.conv2 = nn.Conv2d(dim_in, dim_out, 1)

    def _fusable(self) -> bool:
        c = self.conv1
        k, d = c.kernel_size[0], c.dilation[0]
        return (c.stride == (1, 1) and c.kernel_size[0] == c.kernel_size[1] and k % 2 == 1
                and c.padding == (d * (k // 2),) * 2 and c.dilation[0] == c.dilation[1]
                and c.in_channels % self.norm_layer.num_groups == 0)

    def forward(self, x: Tensor) -> Tensor:
        if self._use_torch() or not self._fusable() or (x.device.type == "cpu" and self._kernel_backend() is None):
            # auto on CPU: one depthwise conv (oneDNN) + GroupNorm beats the fused call for these uniform-dilation
            # groups (0.5-0.95x in benchmarks/RESULTS_egeunet_malunet.md), so the fusion is not used there
            return self.conv2(self.norm_layer(self.conv1(x)))
        g = self.norm_layer.num_groups
        weight, bias = like(self.conv1.weight, x), like(self.conv1.bias, x)
        y = dilated_dwconv_groupnorm(x, list(weight.chunk(g, 0)), list(bias.chunk(g, 0)),
                                     like(self.norm_layer.weight, x), like(self.norm_layer.bias, x),
                                     dilations=[self.conv1.dilation[0]] * g, eps=self.norm_layer.eps,
                                     backend=self._kernel_backend())
        return self.conv2(y)


class GAU(nn.Module):
    """Gated attention unit: ``wo(w1(x) · w2(x)) + cw(x)``, ``w1`` = 3×3 depthwise-separable + sigmoid, ``w2`` =
    5×5 depthwise-separable + GELU, ``wo`` = 3×3 depthwise-separable (to ``out_c``) + GELU, ``cw`` = 1×1
    (docs/models.md#malunet-blocks)."""

    def __init__(self, in_c: int, out_c: int, kernel_size: int = 3):
        super().__init__()
        self.w1 = nn.Sequential(DepthWiseConv2d(in_c, in_c, kernel_size, padding=kernel_size // 2), nn.Sigmoid())
        self.w2 = nn.Sequential(DepthWiseConv2d(in_c, in_c, kernel_size + 2, padding=(kernel_size + 2) // 2),
                                nn.GELU())
        self.wo = nn.Sequential(DepthWiseConv2d(in_c, out_c, kernel_size, padding=kernel_size // 2), nn.GELU())
        self.cw = nn.Conv2d(in_c, out_c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.w1(x) * self.w2(x)) + self.cw(x)


class DGA(BackendMixin, nn.Module):
    """Dilated gated attention (docs/models.md#malunet-blocks): the four channel chunks of ``x`` through depthwise 3×3
    convs ``mda0..3`` with dilations ``dilated_ratio`` (7, 5, 2, 1), concatenated, ``norm_layer`` (GroupNorm(4):
    its groups are the dilation groups), ``conv`` (1×1), GELU, then :class:`GAU`. No residual."""

    def __init__(self, in_c: int, out_c: int, k_size: int = 3, dilated_ratio: Sequence[int] = (7, 5, 2, 1)):
        super().__init__()
        if in_c % 4:
            raise ValueError(f"DGA needs in_c divisible by 4 (four dilation groups), got {in_c}")
        if len(dilated_ratio) != 4:
            raise ValueError(f"DGA needs four dilations, got {list(dilated_ratio)}")
        self.in_c, self.out_c, self.k_size = in_c, out_c, k_size
        self.dilated_ratio = [int(d) for d in dilated_ratio]
        q = in_c // 4
        for i, d in enumerate(self.dilated_ratio):
            pad = (k_size + (k_size - 1) * (d - 1)) // 2
            self.add_module(f"mda{i}", nn.Conv2d(q, q, k_size, stride=1, padding=pad, dilation=d, groups=q))
        self.norm_layer = nn.GroupNorm(GN_GROUPS, in_c)
        self.conv = nn.Conv2d(in_c, in_c, 1)
        self.gau = GAU(in_c, out_c, k_size)

    def _branches(self) -> list[nn.Conv2d]:
        return [self.mda0, self.mda1, self.mda2, self.mda3]

    def _fusable(self) -> bool:
        return self.k_size % 2 == 1 and self.norm_layer.num_groups == 4

    def forward(self, x: Tensor) -> Tensor:
        if self._use_torch() or not self._fusable():
            chunks = x.chunk(4, dim=1)
            y = torch.cat([m(t) for m, t in zip(self._branches(), chunks)], dim=1)
            y = self.norm_layer(y)
        else:
            branches = self._branches()
            y = dilated_dwconv_groupnorm(x, [like(m.weight, x) for m in branches],
                                         [like(m.bias, x) for m in branches],
                                         like(self.norm_layer.weight, x), like(self.norm_layer.bias, x),
                                         dilations=self.dilated_ratio, eps=self.norm_layer.eps,
                                         backend=self._kernel_backend())
        return self.gau(F.gelu(self.conv(y)))


class EAblock(nn.Module):
    """Inverted external attention (docs/models.md#malunet-blocks) with memory ``4C``:
    ``conv1`` (1×1) → ``linear_0`` (Conv1d C→4C, no bias) → softmax over pixels → normalise over the 4C axis
    (``/(1e-9 + Σ)``) → ``linear_1`` (Conv1d 4C→C, no bias) → ``conv2`` (1×1, no bias) → GroupNorm(4) → + input →
    GELU. ``linear_0`` and ``linear_1`` are independent parameters (see the module docstring)."""

    def __init__(self, in_c: int):
        super().__init__()
        self.in_c = in_c
        self.k = in_c * 4
        self.conv1 = nn.Conv2d(in_c, in_c, 1)
        self.linear_0 = nn.Conv1d(in_c, self.k, 1, bias=False)
        self.linear_1 = nn.Conv1d(self.k, in_c, 1, bias=False)
        self.conv2 = nn.Conv2d(in_c, in_c, 1, bias=False)
        self.norm_layer = nn.GroupNorm(GN_GROUPS, in_c)

    def reset_memory(self) -> None:
        """``linear_0 ~ N(0, 2/C)`` and ``linear_1 = linear_0ᵀ`` (separate storage): the state the original's
        tied initialisation leaves after ``.to()``."""
        with torch.no_grad():
            self.linear_0.weight.normal_(0.0, math.sqrt(2.0 / self.in_c))
            self.linear_1.weight.copy_(self.linear_0.weight.permute(1, 0, 2))

    def forward(self, x: Tensor) -> Tensor:
        idn = x
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)
        attn = self.linear_0(x)
        attn = attn.softmax(dim=-1)
        attn = attn / (1e-9 + attn.sum(dim=1, keepdim=True))
        x = self.linear_1(attn).reshape(b, c, h, w)
        x = self.norm_layer(self.conv2(x))
        return F.gelu(x + idn)


class CABridge(nn.Module):
    """Channel attention bridge (``scab.catt``, docs/models.md#malunet-blocks): global average pools of the five stages
    concatenated (``S = Σ c_i`` values), ECA-style ``get_all_att`` (Conv1d 1→1, k 3, no bias), then per stage
    ``sigmoid(att_i(·))`` with ``att_i`` a Linear ``S → c_i`` (``split_att="fc"``) or a Conv1d ``S → c_i``, k 1
    (``"conv"``). Returns the five ``(B, c_i, 1, 1)`` attention vectors."""

    def __init__(self, c_list: Sequence[int], split_att: str = "fc"):
        super().__init__()
        if split_att not in ("fc", "conv"):
            raise ValueError(f"split_att must be 'fc' or 'conv', got {split_att!r}")
        self.c_list = list(c_list)
        self.split_att = split_att
        total = sum(self.c_list)
        # a module (not torch.mean) as in the original: thop counts its MACs (docs/models.md#counting-conventions)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.get_all_att = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)
        for i, ch in enumerate(self.c_list, start=1):
            self.add_module(f"att{i}", nn.Linear(total, ch) if split_att == "fc" else nn.Conv1d(total, ch, 1))

    def forward(self, *ts: Tensor) -> list[Tensor]:
        att = torch.cat([self.avgpool(t) for t in ts], dim=1).flatten(1).unsqueeze(1)  # (B, 1, S)
        att = self.get_all_att(att)
        if self.split_att != "fc":
            att = att.transpose(-1, -2)  # (B, S, 1)
        out = []
        for i in range(1, len(ts) + 1):
            a = torch.sigmoid(getattr(self, f"att{i}")(att))
            a = a.transpose(-1, -2) if self.split_att == "fc" else a  # (B, c_i, 1)
            out.append(a.unsqueeze(-1))
        return out


class SABridge(nn.Module):
    """Spatial attention bridge (``scab.satt``, docs/models.md#malunet-blocks): one ``shared_conv2d`` (Conv2d 2→1, 7×7,
    dilation 3, padding 9, bias; sigmoid) applied to ``cat(mean_c(t), max_c(t))`` of every stage."""

    def __init__(self):
        super().__init__()
        self.shared_conv2d = nn.Sequential(nn.Conv2d(2, 1, 7, stride=1, padding=9, dilation=3), nn.Sigmoid())

    def forward(self, *ts: Tensor) -> list[Tensor]:
        return [self.shared_conv2d(torch.cat((t.mean(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)), dim=1))
                for t in ts]


class SCAttBridge(nn.Module):
    """``scab`` (docs/models.md#malunet-blocks): ``s_i = SAB(t_i)·t_i``, ``u_i = s_i + t_i``,
    ``t_i' = CAB(u)_i · u_i + s_i``."""

    def __init__(self, c_list: Sequence[int], split_att: str = "fc"):
        super().__init__()
        self.catt = CABridge(c_list, split_att)
        self.satt = SABridge()

    def forward(self, *ts: Tensor) -> list[Tensor]:
        s = [a * t for a, t in zip(self.satt(*ts), ts)]
        u = [si + t for si, t in zip(s, ts)]
        c = self.catt(*u)
        return [ci * ui + si for ci, ui, si in zip(c, u, s)]


class MALUNet(BackendMixin, nn.Module):
    """MALUNet (docs/models.md#malunet-forward); see the module docstring for outputs, input scaling, backends and the
    differences from the original code.

    Args:
        num_classes: channels of the prediction.
        input_channels: image channels (3).
        c_list: the six stage widths (multiples of 4), default ``[8, 16, 24, 32, 48, 64]``.
        split_att: ``"fc"`` (default) or ``"conv"``: the per-stage projections of the channel attention bridge.
        bridge: use the ``scab`` bridge (default True).
        output: ``"probs"`` (sigmoid, as the original) or ``"logits"``.
        backend: ``"torch"``, ``"auto"`` or an ``emcad_kernels`` backend name.
    """

    def __init__(self, num_classes: int = 1, input_channels: int = 3,
                 c_list: Sequence[int] = (8, 16, 24, 32, 48, 64), split_att: str = "fc", bridge: bool = True,
                 output: str = "probs", backend: str = "auto"):
        super().__init__()
        check_counts(num_classes=num_classes, input_channels=input_channels)
        c = check_c_list(c_list)
        self.num_classes, self.in_channels, self.c_list = num_classes, input_channels, c
        self.bridge, self.split_att, self.output = bool(bridge), split_att, check_output(output)

        self.encoder1 = nn.Sequential(nn.Conv2d(input_channels, c[0], 3, stride=1, padding=1))
        self.encoder2 = nn.Sequential(nn.Conv2d(c[0], c[1], 3, stride=1, padding=1))
        self.encoder3 = nn.Sequential(nn.Conv2d(c[1], c[2], 3, stride=1, padding=1))
        self.encoder4 = nn.Sequential(EAblock(c[2]), DGA(c[2], c[3]))
        self.encoder5 = nn.Sequential(EAblock(c[3]), DGA(c[3], c[4]))
        self.encoder6 = nn.Sequential(EAblock(c[4]), DGA(c[4], c[5]))
        if self.bridge:
            self.scab = SCAttBridge(c[:5], split_att)
        self.decoder1 = nn.Sequential(DGA(c[5], c[4]), EAblock(c[4]))
        self.decoder2 = nn.Sequential(DGA(c[4], c[3]), EAblock(c[3]))
        self.decoder3 = nn.Sequential(DGA(c[3], c[2]), EAblock(c[2]))
        self.decoder4 = nn.Sequential(nn.Conv2d(c[2], c[1], 3, stride=1, padding=1))
        self.decoder5 = nn.Sequential(nn.Conv2d(c[1], c[0], 3, stride=1, padding=1))
        for i, ch in enumerate(c[:5], start=1):
            self.add_module(f"ebn{i}", nn.GroupNorm(4, ch))
        for i, ch in enumerate((c[4], c[3], c[2], c[1], c[0]), start=1):
            self.add_module(f"dbn{i}", nn.GroupNorm(4, ch))
        self.final = nn.Conv2d(c[0], num_classes, kernel_size=1)
        init_skin_weights(self)
        for m in self.modules():
            if isinstance(m, EAblock):
                m.reset_memory()

        self.model_name = "malunet"
        self.config = dict(num_classes=num_classes, in_channels=input_channels, c_list=list(c),
                           split_att=split_att, bridge=self.bridge, output=self.output)
        set_backend(self, backend)

    def check_input(self, x: Tensor) -> None:
        check_skin_input("MALUNet", x, self.in_channels)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        gelu = F.gelu
        out = gelu(F.max_pool2d(self.ebn1(self.encoder1(x)), 2, 2))
        t1 = out  # c0 @ H/2
        out = gelu(F.max_pool2d(self.ebn2(self.encoder2(out)), 2, 2))
        t2 = out
        out = gelu(F.max_pool2d(self.ebn3(self.encoder3(out)), 2, 2))
        t3 = out
        out = gelu(F.max_pool2d(self.ebn4(self.encoder4(out)), 2, 2))
        t4 = out
        out = gelu(F.max_pool2d(self.ebn5(self.encoder5(out)), 2, 2))
        t5 = out  # c4 @ H/32
        if self.bridge:
            t1, t2, t3, t4, t5 = self.scab(t1, t2, t3, t4, t5)
        out = gelu(self.encoder6(out))  # the un-bridged t5, as in the original

        out5 = gelu(self.dbn1(self.decoder1(out))) + t5
        out4 = gelu(upsample(self.dbn2(self.decoder2(out5)), 2)) + t4
        out3 = gelu(upsample(self.dbn3(self.decoder3(out4)), 2)) + t3
        out2 = gelu(upsample(self.dbn4(self.decoder4(out3)), 2)) + t2
        out1 = gelu(upsample(self.dbn5(self.decoder5(out2)), 2)) + t1
        out0 = upsample(self.final(out1), 2)
        return torch.sigmoid(out0) if self.output == "probs" else out0
