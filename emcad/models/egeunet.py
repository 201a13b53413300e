"""EGE-UNet (Ruan et al., MICCAI 2023), re-implemented from docs/models.md#ege-unet-and-malunet (no code of the original
repository is used).

Structure, state-dict keys (314 tensors, all parameters, no buffers) and shapes are those of the original default
configuration, so checkpoints trained with the original code load with ``load_state_dict(strict=True)``:
``encoder1..6`` (dense 3×3 convs, then :class:`GHPA`), ``GAB1..5`` (:class:`GAB` bridges), ``gt_conv1..5``
(deep-supervision heads), ``decoder1..5``, GroupNorms ``ebn1..5`` / ``dbn1..5``, ``final``. 53,374 parameters;
72,096,256 MACs at 1×3×256×256 in thop's convention (:func:`emcad.flops_thop.count_macs`).

**Output.** Like the original, :class:`EGEUNet` returns **probabilities** (sigmoid): with deep supervision
(``gt_ds=True``, default) ``((p5, p4, p3, p2, p1), p0)``, every tensor ``(B, ·, H, W)``: ``p5 … p1`` the
deep-supervision heads (H/32 … H/2, upsampled bilinearly to the input size), ``p0`` the prediction
(``num_classes`` channels). ``output="logits"`` returns the same structure before the sigmoid (use it with
``BCEWithLogitsLoss``: numerically safer than ``BCELoss`` on probabilities).

**Input scaling.** The network itself does no normalisation. The original data pipeline feeds each image
min-max rescaled **to [0, 255]** (its ``myNormalize`` standardises and then min-max rescales each image, which
cancels the standardisation; docs/models.md#shared-skeleton). Weights trained by the original code therefore expect
``minmax_scale_255(image)`` inputs; see :func:`minmax_scale_255`. Models trained here may use any consistent
scaling. H and W must be multiples of 32.

**Backends.** ``backend="torch"`` is the plain composition of the ``nn`` submodules (every module call visible to
hooks; the channels-first LayerNorm is built from elementwise ops as in the original). Any other backend
(``"auto"``, ``"reference"``, ...) runs, on the same parameters:

* each GAB's four LayerNorm + dilated depthwise groups (d = 1, 2, 5, 7) as one
  :func:`emcad_kernels.layernorm_dilated_dwconv` call, and the tail LayerNorm as one ``layer_norm``;
* GHPA's ``norm2`` + ``ldw.0`` as one ``layernorm_dilated_dwconv`` call (one group, dilation 1), ``norm1`` as one
  ``layer_norm``;
* GHPA's input-independent axis attention maps (xy, zx, zy branches) are **cached per resolution in eval mode**
  (see :meth:`GHPA.attention_maps`).

**Differences from the original code** (deliberate; documented in docs/models.md#gab):

* ``gt_ds=False`` works: the GABs are then built without the mask channel (groups of ``dim_xl/2`` channels, tail
  over ``2·dim_xl``) and no deep-supervision heads exist (the original crashes with a TypeError). The default
  ``gt_ds=True`` is unchanged.
* ``GAB(k_size=...)`` uses ``k_size`` as the kernel size as well as in the padding formula (the original
  hard-codes 3×3 kernels; identical for the default ``k_size=3``).
* The unused ``DepthWiseConv2d`` class of the original file does not exist here.
* The data-pipeline quirks (unsorted file pairing, a rotation angle drawn once per run) are not part of the model;
  this package's data code sorts and pairs files by name and draws augmentations per sample.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from emcad_kernels import layernorm_dilated_dwconv
from emcad_kernels.reference import layer_norm_channels_first

from .blocks import BackendMixin, set_backend

__all__ = ["EGEUNet", "GAB", "GHPA", "LayerNorm2d", "OUTPUT_STRIDE", "init_skin_weights", "minmax_scale_255"]

OUTPUT_STRIDE = 32  # five 2× max-pools
OUTPUTS = ("probs", "logits")


# --------------------------------------------------------------------------------------------------
# shared helpers (also used by MALUNet)
# --------------------------------------------------------------------------------------------------
def minmax_scale_255(x: Tensor, eps: float = 0.0) -> Tensor:
    """The input scaling of the original training code: each image (over its C, H, W values) min-max rescaled to
    ``[0, 255]``. ``x`` is ``(B, C, H, W)`` or ``(C, H, W)``; a constant image maps to 0."""
    dims = tuple(range(x.dim() - 3, x.dim()))
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    scale = (hi - lo).clamp_min(torch.finfo(x.dtype).tiny if x.dtype.is_floating_point else 1) + eps
    return (x - lo) / scale * 255.0


def init_skin_weights(module: nn.Module) -> None:
    """The initialisation of both originals (docs/models.md#initialisation): Conv2d ~ N(0, 2/fan_out) with
    ``fan_out = kH·kW·C_out/groups`` and bias 0; Conv1d ~ N(0, 2/(k·C_out)) with PyTorch's default bias;
    Linear ~ truncated normal (std 0.02) with bias 0; GroupNorm / LayerNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv1d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.out_channels)))
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm, LayerNorm2d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def upsample(x: Tensor, scale: Optional[int] = None, size: Optional[Sequence[int]] = None) -> Tensor:
    """Bilinear resize with ``align_corners=True`` (the only resize of both models)."""
    if size is not None:
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)


def like(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A parameter in the input's dtype (differentiable cast; a no-op normally, needed under autocast)."""
    if t is None or t.dtype == x.dtype:
        return t
    return t.to(x.dtype)


def check_skin_input(model_name: str, x: Tensor, in_channels: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{model_name} expects a 4-D (B, C, H, W) tensor, got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{model_name} was built for {in_channels} input channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    h, w = x.shape[-2:]
    if h % OUTPUT_STRIDE or w % OUTPUT_STRIDE:
        def up(v: int) -> int:
            return -(-v // OUTPUT_STRIDE) * OUTPUT_STRIDE

        raise ValueError(f"{model_name} input height and width must be multiples of {OUTPUT_STRIDE} (five 2x "
                         f"max-pools), got {h}x{w} (nearest valid size: {up(h)}x{up(w)})")


def check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    return output


def check_counts(**counts) -> None:
    """Each keyword argument must be a positive int (its name is in the error)."""
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_c_list(c_list: Sequence[int]) -> list[int]:
    c_list = [int(c) for c in c_list]
    if len(c_list) != 6 or any(c < 4 or c % 4 for c in c_list):
        raise ValueError(f"c_list must hold 6 channel counts, each a positive multiple of 4, got {c_list}")
    return c_list


# --------------------------------------------------------------------------------------------------
# channels-first LayerNorm
# --------------------------------------------------------------------------------------------------
class LayerNorm2d(BackendMixin, nn.Module):
    """Channels-first LayerNorm (docs/models.md#channels-first-layernorm): per pixel over the C channels, biased
    variance, ``eps`` (default 1e-6) inside the root, affine ``weight``/``bias`` of shape ``[C]``.

    ``backend="torch"`` computes it from elementwise ops as the original does; other backends call one
    ``layer_norm`` on a channels-last view (same math)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        if self._use_torch():
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            return self.weight[:, None, None] * x + self.bias[:, None, None]
        return layer_norm_channels_first(x, like(self.weight, x), like(self.bias, x), self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


# --------------------------------------------------------------------------------------------------
# GHPA
# --------------------------------------------------------------------------------------------------
class GHPA(BackendMixin, nn.Module):
    """Grouped multi-axis Hadamard product attention (docs/models.md#ghpa).

    ``out = ldw(norm2(cat(x1·A_xy, x2·A_zx, x3·A_zy, dw(x4))))`` with ``x1..x4`` the four channel chunks of
    ``norm1(x)``. The maps ``A_xy (1, c, H, W)``, ``A_zx (1, c, H, 1)`` and ``A_zy (1, c, 1, W)`` depend only on
    parameters and on (H, W) (:meth:`attention_maps`). No residual.

    **Cache.** With a fused backend, in eval mode, the maps are cached per (H, W, device, dtype, autocast /
    inference mode) and reused while the parameters they come from are unchanged: the cache key includes each
    parameter's storage pointer and version counter, so ``optimizer.step()``, ``load_state_dict`` or ``.to()`` all
    invalidate it. Changes made through ``param.data`` bypass version counters: call :meth:`clear_cache` after
    them. The cache is bypassed (maps recomputed with autograd) in training mode, and in eval mode when gradients
    are enabled and any map parameter requires grad, so parameter gradients are always exact. ``train()``
    clears it.
    """

    def __init__(self, dim_in: int, dim_out: int, x: int = 8, y: int = 8):
        super().__init__()
        if dim_in % 4:
            raise ValueError(f"GHPA needs dim_in divisible by 4 (four channel chunks), got {dim_in}")
        c = dim_in // 4
        self.dim_in, self.dim_out, self.c = dim_in, dim_out, c
        self.params_xy = nn.Parameter(torch.ones(1, c, x, y))
        self.params_zx = nn.Parameter(torch.ones(1, 1, c, x))
        self.params_zy = nn.Parameter(torch.ones(1, 1, c, y))
        self.conv_xy = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.GELU(), nn.Conv2d(c, c, 1))
        self.conv_zx = nn.Sequential(nn.Conv1d(c, c, 3, padding=1, groups=c), nn.GELU(), nn.Conv1d(c, c, 1))
        self.conv_zy = nn.Sequential(nn.Conv1d(c, c, 3, padding=1, groups=c), nn.GELU(), nn.Conv1d(c, c, 1))
        self.dw = nn.Sequential(nn.Conv2d(c, c, 1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1, groups=c))
        self.norm1 = LayerNorm2d(dim_in, eps=1e-6)
        self.norm2 = LayerNorm2d(dim_in, eps=1e-6)
        self.ldw = nn.Sequential(nn.Conv2d(dim_in, dim_in, 3, padding=1, groups=dim_in), nn.GELU(),
                                 nn.Conv2d(dim_in, dim_out, 1))
        self._map_cache: dict = {}

    # ---- the input-independent maps -----------------------------------------------------------------
    def attention_maps(self, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(A_xy (1, c, H, W), A_zx (1, c, H, 1), A_zy (1, c, 1, W))``, computed from the parameters (never
        cached; see :meth:`maps` for the cached path)."""
        c = self.c
        a_xy = self.conv_xy(upsample(self.params_xy, size=(height, width)))
        # bilinear resize of (1, 1, c, 8) to (c, H): the identity along channels, 1-D linear along the axis
        zx = upsample(self.params_zx, size=(c, height)).squeeze(0)  # (1, c, H): Conv1d input with batch 1
        a_zx = self.conv_zx(zx).unsqueeze(-1)
        zy = upsample(self.params_zy, size=(c, width)).squeeze(0)
        a_zy = self.conv_zy(zy).unsqueeze(-2)
        return a_xy, a_zx, a_zy

    def _map_parameters(self) -> list[Tensor]:
        return [self.params_xy, self.params_zx, self.params_zy, *self.conv_xy.parameters(),
                *self.conv_zx.parameters(), *self.conv_zy.parameters()]

    def clear_cache(self) -> None:
        """Drop the cached attention maps."""
        self._map_cache.clear()

    def train(self, mode: bool = True) -> "GHPA":
        self.clear_cache()
        return super().train(mode)

    def maps(self, height: int, width: int, like_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The attention maps, from the cache when allowed (eval mode, see the class docstring)."""
        params = self._map_parameters()
        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params)) \
                or torch.compiler.is_compiling():  # traced (torch.export / compile): no data pointers to key on
            return self.attention_maps(height, width)
        device = like_x.device
        key = (height, width, device, self.params_xy.dtype, torch.is_inference_mode_enabled(),
               torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
               if torch.is_autocast_enabled(device.type) else None)
        signature = tuple((p.data_ptr(), p._version) for p in params)
        hit = self._map_cache.get(key)
        if hit is not None and hit[0] == signature:
            return hit[1]
        with torch.no_grad():
            maps = self.attention_maps(height, width)
        self._map_cache[key] = (signature, maps)
        return maps

    def cache_info(self) -> list[tuple[int, int]]:
        """The resolutions (H, W) currently cached."""
        return [(k[0], k[1]) for k in self._map_cache]

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self._use_torch():
            x1, x2, x3, x4 = self.norm1(x).chunk(4, dim=1)
            a_xy, a_zx, a_zy = self.attention_maps(h, w)
            y = torch.cat((x1 * a_xy, x2 * a_zx, x3 * a_zy, self.dw(x4)), dim=1)
            return self.ldw(self.norm2(y))
        z = layer_norm_channels_first(x, like(self.norm1.weight, x), like(self.norm1.bias, x), self.norm1.eps)
        x1, x2, x3, x4 = z.chunk(4, dim=1)
        a_xy, a_zx, a_zy = self.maps(h, w, x)
        y = torch.cat((x1 * a_xy, x2 * a_zx, x3 * a_zy, self.dw(x4)), dim=1)
        ldw0 = self.ldw[0]
        y = layernorm_dilated_dwconv(y, [like(self.norm2.weight, y)], [like(self.norm2.bias, y)],
                                     [like(ldw0.weight, y)], [like(ldw0.bias, y)], dilations=[1],
                                     eps=self.norm2.eps, backend=self._kernel_backend())
        return self.ldw[2](self.ldw[1](y))


# --------------------------------------------------------------------------------------------------
# GAB
# --------------------------------------------------------------------------------------------------
class GAB(BackendMixin, nn.Module):
    """Group aggregation bridge (docs/models.md#gab), called as ``GAB(xh, xl, mask)``.

    ``h = resize(pre_project(xh), size of xl)``; group ``i`` (i = 0..3) is ``cat(h_i, xl_i, mask)`` (the one-channel
    mask copied into every group), normalised by its own channels-first LayerNorm and convolved by a depthwise
    ``k_size``×``k_size`` conv with dilation ``d_list[i]``; ``out = tail_conv(cat(groups))`` (LayerNorm over all
    groups, 1×1 conv). With ``mask=False`` (no deep supervision) the groups have no mask channel and ``forward``
    takes no mask.
    """

    def __init__(self, dim_xh: int, dim_xl: int, k_size: int = 3, d_list: Sequence[int] = (1, 2, 5, 7),
                 mask: bool = True):
        super().__init__()
        if dim_xl % 4:
            raise ValueError(f"GAB needs dim_xl divisible by 4 (four channel chunks), got {dim_xl}")
        if len(d_list) != 4:
            raise ValueError(f"GAB needs four dilations, got {list(d_list)}")
        self.dim_xh, self.dim_xl, self.k_size = dim_xh, dim_xl, k_size
        self.d_list = [int(d) for d in d_list]
        self.use_mask = bool(mask)
        group = dim_xl // 2 + (1 if mask else 0)
        self.group_channels = group
        self.pre_project = nn.Conv2d(dim_xh, dim_xl, 1)
        for i, d in enumerate(self.d_list):
            pad = (k_size + (k_size - 1) * (d - 1)) // 2
            self.add_module(f"g{i}", nn.Sequential(
                LayerNorm2d(group, eps=1e-6),
                nn.Conv2d(group, group, k_size, stride=1, padding=pad, dilation=d, groups=group)))
        self.tail_conv = nn.Sequential(LayerNorm2d(4 * group, eps=1e-6), nn.Conv2d(4 * group, dim_xl, 1))

    def _groups(self) -> list[nn.Sequential]:
        return [self.g0, self.g1, self.g2, self.g3]

    def forward(self, xh: Tensor, xl: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if self.use_mask and mask is None:
            raise ValueError("this GAB was built with mask=True (deep supervision): pass the stage's mask logits")
        if not self.use_mask and mask is not None:
            raise ValueError("this GAB was built with mask=False: it takes no mask")
        h = upsample(self.pre_project(xh), size=xl.shape[-2:])
        hs, ls = h.chunk(4, dim=1), xl.chunk(4, dim=1)
        extra = (mask,) if mask is not None else ()
        inputs = [torch.cat((hs[i], ls[i], *extra), dim=1) for i in range(4)]
        if self._use_torch() or not self._fusable():
            y = torch.cat([g(t) for g, t in zip(self._groups(), inputs)], dim=1)
            return self.tail_conv(y)
        x = torch.cat(inputs, dim=1)
        groups = self._groups()
        y = layernorm_dilated_dwconv(
            x, [like(g[0].weight, x) for g in groups], [like(g[0].bias, x) for g in groups],
            [like(g[1].weight, x) for g in groups], [like(g[1].bias, x) for g in groups], dilations=self.d_list,
            eps=groups[0][0].eps, backend=self._kernel_backend())
        return self.tail_conv(y)

    def _fusable(self) -> bool:
        """The fused op needs odd kernels with 'same' padding (always true for odd ``k_size``)."""
        return self.k_size % 2 == 1 and all(g[1].padding[0] == g[1].dilation[0] * (self.k_size // 2)
                                            for g in self._groups())


# --------------------------------------------------------------------------------------------------
# EGE-UNet
# --------------------------------------------------------------------------------------------------
class EGEUNet(BackendMixin, nn.Module):
    """EGE-UNet (docs/models.md#ege-unet-forward-and-heads); see the module docstring for outputs, input scaling,
    backends and the differences from the original code.

    Args:
        num_classes: channels of the final prediction (the deep-supervision heads always have one channel: their
            logits are the GAB masks).
        input_channels: image channels (3).
        c_list: the six stage widths (multiples of 4), default ``[8, 16, 24, 32, 48, 64]``.
        bridge: use the GAB bridges (default True); without them the raw encoder features are added.
        gt_ds: deep supervision (default True): the heads' logits feed the GABs and are returned.
        output: ``"probs"`` (sigmoid, as the original) or ``"logits"``.
        backend: ``"torch"``, ``"auto"`` or an ``emcad_kernels`` backend name.
    """

    def __init__(self, num_classes: int = 1, input_channels: int = 3,
                 c_list: Sequence[int] = (8, 16, 24, 32, 48, 64), bridge: bool = True, gt_ds: bool = True,
                 output: str = "probs", backend: str = "auto"):
        super().__init__()
        check_counts(num_classes=num_classes, input_channels=input_channels)
        c = check_c_list(c_list)
        self.num_classes, self.in_channels, self.c_list = num_classes, input_channels, c
        self.bridge, self.gt_ds, self.output = bool(bridge), bool(gt_ds), check_output(output)

        self.encoder1 = nn.Sequential(nn.Conv2d(input_channels, c[0], 3, stride=1, padding=1))
        self.encoder2 = nn.Sequential(nn.Conv2d(c[0], c[1], 3, stride=1, padding=1))
        self.encoder3 = nn.Sequential(nn.Conv2d(c[1], c[2], 3, stride=1, padding=1))
        self.encoder4 = nn.Sequential(GHPA(c[2], c[3]))
        self.encoder5 = nn.Sequential(GHPA(c[3], c[4]))
        self.encoder6 = nn.Sequential(GHPA(c[4], c[5]))
        if self.bridge:
            self.GAB1 = GAB(c[1], c[0], mask=self.gt_ds)
            self.GAB2 = GAB(c[2], c[1], mask=self.gt_ds)
            self.GAB3 = GAB(c[3], c[2], mask=self.gt_ds)
            self.GAB4 = GAB(c[4], c[3], mask=self.gt_ds)
            self.GAB5 = GAB(c[5], c[4], mask=self.gt_ds)
        if self.gt_ds:
            self.gt_conv1 = nn.Sequential(nn.Conv2d(c[4], 1, 1))
            self.gt_conv2 = nn.Sequential(nn.Conv2d(c[3], 1, 1))
            self.gt_conv3 = nn.Sequential(nn.Conv2d(c[2], 1, 1))
            self.gt_conv4 = nn.Sequential(nn.Conv2d(c[1], 1, 1))
            self.gt_conv5 = nn.Sequential(nn.Conv2d(c[0], 1, 1))
        self.decoder1 = nn.Sequential(GHPA(c[5], c[4]))
        self.decoder2 = nn.Sequential(GHPA(c[4], c[3]))
        self.decoder3 = nn.Sequential(GHPA(c[3], c[2]))
        self.decoder4 = nn.Sequential(nn.Conv2d(c[2], c[1], 3, stride=1, padding=1))
        self.decoder5 = nn.Sequential(nn.Conv2d(c[1], c[0], 3, stride=1, padding=1))
        for i, ch in enumerate(c[:5], start=1):
            self.add_module(f"ebn{i}", nn.GroupNorm(4, ch))
        for i, ch in enumerate((c[4], c[3], c[2], c[1], c[0]), start=1):
            self.add_module(f"dbn{i}", nn.GroupNorm(4, ch))
        self.final = nn.Conv2d(c[0], num_classes, kernel_size=1)
        init_skin_weights(self)

        self.model_name = "egeunet"
        self.config = dict(num_classes=num_classes, in_channels=input_channels, c_list=list(c), bridge=self.bridge,
                           gt_ds=self.gt_ds, output=self.output)
        set_backend(self, backend)

    def check_input(self, x: Tensor) -> None:
        check_skin_input("EGEUNet", x, self.in_channels)

    def clear_cache(self) -> None:
        """Drop every GHPA's cached attention maps."""
        for m in self.modules():
            if isinstance(m, GHPA):
                m.clear_cache()

    def _head(self, t: Tensor) -> Tensor:
        return torch.sigmoid(t) if self.output == "probs" else t

    def _bridge(self, k: int, xh: Tensor, xl: Tensor, mask: Optional[Tensor]) -> Tensor:
        if not self.bridge:
            return xl
        return getattr(self, f"GAB{k}")(xh, xl, mask)

    def forward(self, x: Tensor):
        self.check_input(x)
        gelu = F.gelu
        out = gelu(F.max_pool2d(self.ebn1(self.encoder1(x)), 2, 2))
        t1 = out  # c0 @ H/2
        out = gelu(F.max_pool2d(self.ebn2(self.encoder2(out)), 2, 2))
        t2 = out  # c1 @ H/4
        out = gelu(F.max_pool2d(self.ebn3(self.encoder3(out)), 2, 2))
        t3 = out  # c2 @ H/8
        out = gelu(F.max_pool2d(self.ebn4(self.encoder4(out)), 2, 2))
        t4 = out  # c3 @ H/16
        out = gelu(F.max_pool2d(self.ebn5(self.encoder5(out)), 2, 2))
        t5 = out  # c4 @ H/32
        out = gelu(self.encoder6(out))
        t6 = out  # c5 @ H/32

        heads = []
        out5 = gelu(self.dbn1(self.decoder1(out)))  # c4 @ H/32
        mask = self.gt_conv1(out5) if self.gt_ds else None
        t5 = self._bridge(5, t6, t5, mask)
        heads.append((mask, 32))
        out5 = out5 + t5

        out4 = gelu(upsample(self.dbn2(self.decoder2(out5)), 2))  # c3 @ H/16
        mask = self.gt_conv2(out4) if self.gt_ds else None
        t4 = self._bridge(4, t5, t4, mask)
        heads.append((mask, 16))
        out4 = out4 + t4

        out3 = gelu(upsample(self.dbn3(self.decoder3(out4)), 2))  # c2 @ H/8
        mask = self.gt_conv3(out3) if self.gt_ds else None
        t3 = self._bridge(3, t4, t3, mask)
        heads.append((mask, 8))
        out3 = out3 + t3

        out2 = gelu(upsample(self.dbn4(self.decoder4(out3)), 2))  # c1 @ H/4
        mask = self.gt_conv4(out2) if self.gt_ds else None
        t2 = self._bridge(2, t3, t2, mask)
        heads.append((mask, 4))
        out2 = out2 + t2

        out1 = gelu(upsample(self.dbn5(self.decoder5(out2)), 2))  # c0 @ H/2
        mask = self.gt_conv5(out1) if self.gt_ds else None
        t1 = self._bridge(1, t2, t1, mask)
        heads.append((mask, 2))
        out1 = out1 + t1

        out0 = self._head(upsample(self.final(out1), 2))
        if not self.gt_ds:
            return out0
        return tuple(self._head(upsample(m, s)) for m, s in heads), out0
