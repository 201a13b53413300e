"""PVTv2 (Pyramid Vision Transformer v2) segmentation encoder, variants b0-b5.

The module structure and parameter names follow the official PVTv2
implementation, ``whai362/PVT`` (``classification/pvt_v2.py``, Apache-2.0,
Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer",
arXiv 2106.13797), so that the official ImageNet checkpoints load unchanged
(their ``head.*`` classifier is dropped by :mod:`emcad.encoders.weights`).
This file is an independent re-implementation written from the EMCAD
specification (docs/models.md#encoders); no code is taken from SLDGroup/EMCAD.

Differences from the classification model: there is no classifier head, and
``forward`` returns the four stage outputs (strides 4, 8, 16, 32) as
contiguous NCHW maps.

Backends (the ``backend`` attribute of :class:`emcad.models.blocks.BackendMixin`,
set with ``set_backend`` / ``create_model(..., backend=...)`` like the decoder
blocks): ``"torch"`` runs the plain composition above (module hooks see every
submodule). Any other backend keeps the tokens in their ``(B, H*W, C)`` layout
throughout: the Mix-FFN's depthwise conv + GELU is one
``emcad_kernels.token_dwconv_gelu`` call on the tokens (no NCHW transposes),
the patch embeddings and the attention's spatial reduction convolve
channels_last views of the tokens, and the attention product is
``F.scaled_dot_product_attention``. Same parameters, same state dict, the same
values up to float round-off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import emcad_kernels
from emcad.models.blocks import BackendMixin

__all__ = [
    "DropPath",
    "OverlapPatchEmbed",
    "SpatialReductionAttention",
    "TokenDepthwiseConv",
    "ConvFeedForward",
    "PVTBlock",
    "PyramidVisionTransformerV2",
    "pvt_v2_b0",
    "pvt_v2_b1",
    "pvt_v2_b2",
    "pvt_v2_b3",
    "pvt_v2_b4",
    "pvt_v2_b5",
]

# LayerNorm eps values of the official model: the patch embeddings and the
# spatial-reduction norm use PyTorch's default, blocks and stage norms 1e-6.
PATCH_EMBED_NORM_EPS = 1e-5
REDUCTION_NORM_EPS = 1e-5
BLOCK_NORM_EPS = 1e-6


def tokens_as_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) tokens as a (B, C, H, W) map without a copy: a channels_last view."""
    batch, _, channels = tokens.shape
    return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def map_as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) map as (B, H*W, C) tokens; a view when the map is channels_last."""
    return x.flatten(2).transpose(1, 2)


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A parameter in the input's dtype (under autocast the tokens may be bf16 while the weights are fp32)."""
    return t if t.dtype == x.dtype else t.to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample.

    In training mode each sample's branch output is zeroed with probability
    ``drop_prob`` and the kept ones are scaled by ``1 / (1 - drop_prob)`` so
    that the expectation is unchanged. In eval mode it is the identity.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # One Bernoulli draw per sample, broadcast over all other dimensions.
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep_mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
        return x * keep_mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4g}"


class OverlapPatchEmbed(BackendMixin, nn.Module):
    """Overlapping strided convolution + LayerNorm; NCHW map -> tokens (B, H*W, C).

    Fused backends convolve in channels_last (the previous stage's tokens are a channels_last map already), so
    the conv output is the token sequence without a transposing copy."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_channels, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2
        )
        self.norm = nn.LayerNorm(embed_dim, eps=PATCH_EMBED_NORM_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if not self._use_torch():
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(map_as_tokens(x)), height, width


class SpatialReductionAttention(BackendMixin, nn.Module):
    """Multi-head self-attention whose keys/values come from a map reduced by ``sr_ratio``.

    ``backend="torch"`` writes the attention product out with explicit
    matmuls: the result is numerically identical to the official model, and
    FLOP counters see the work (fvcore has no handle for SDPA and
    ``FlopCounterMode`` counts CPU SDPA as zero). Fused backends call
    ``F.scaled_dot_product_attention`` (no (N, N_kv) score tensor in memory)
    and reduce a channels_last view of the tokens.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=REDUCTION_NORM_EPS)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, num_tokens, dim = x.shape
        fused = not self._use_torch()
        q = self.q(x).reshape(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        if self.sr_ratio > 1:
            if fused:
                x_map = tokens_as_map(x, height, width)
            else:
                x_map = x.transpose(1, 2).reshape(batch, dim, height, width)
            x = self.norm(map_as_tokens(self.sr(x_map)))
        # (2, B, heads, N_kv, head_dim)
        # explicit token count, not -1: a reshape of an empty batch cannot infer it
        kv = self.kv(x)
        kv = kv.reshape(batch, kv.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)

        if fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(batch, num_tokens, dim))


class TokenDepthwiseConv(nn.Module):
    """Depthwise 3x3 convolution applied to a token sequence viewed as a map.

    A separate module only so the parameter is named ``mlp.dwconv.dwconv`` as
    in the official checkpoints.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, num_tokens, channels = x.shape
        x_map = x.transpose(1, 2).reshape(batch, channels, height, width)
        return self.dwconv(x_map).flatten(2).transpose(1, 2)


class ConvFeedForward(BackendMixin, nn.Module):
    """PVTv2 feed-forward (Mix-FFN): fc1 -> depthwise 3x3 -> GELU -> fc2 (no dropout).

    Fused backends run the depthwise conv + GELU as one
    ``emcad_kernels.token_dwconv_gelu`` call on the tokens; a kernel backend
    that cannot run it (e.g. ``"cuda"``, which has no such kernel) falls back
    to the plain composition.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = TokenDepthwiseConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.fc1(x)
        conv = self.dwconv.dwconv
        if not self._use_torch():
            weight, bias = _like(conv.weight, x), _like(conv.bias, x)
            backend = self._kernel_backend()
            if backend is None or emcad_kernels.can_run("token_dwconv_gelu", x, weight, bias, (height, width),
                                                        backend=backend):
                return self.fc2(emcad_kernels.token_dwconv_gelu(x, weight, bias, (height, width),
                                                                backend=backend))
        return self.fc2(self.act(self.dwconv(x, height, width)))


class PVTBlock(nn.Module):
    """Pre-norm transformer block: attention and feed-forward residuals with stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = ConvFeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        x = x + self.drop_path(self.mlp(self.norm2(x), height, width))
        return x


class PyramidVisionTransformerV2(BackendMixin, nn.Module):
    """PVTv2 feature encoder with the official parameter names.

    Stage ``i`` (1..4) consists of ``patch_embed{i}``, the blocks
    ``block{i}.{j}`` and the stage norm ``norm{i}``. ``forward`` returns the
    four stage outputs, shallow to deep, as contiguous NCHW tensors with
    ``out_channels`` channels at strides ``out_strides``. Any input of at
    least 32x32 works; map sizes round up (``ceil(H / stride)``), as the
    padded convolutions do. Networks that add skip connections (EMCAD) need
    sides divisible by 32.
    """

    out_strides = (4, 8, 16, 32)

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        depths: Sequence[int] = (3, 4, 6, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        in_channels: int = 3,
        drop_path_rate: float = 0.1,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        settings = (embed_dims, num_heads, mlp_ratios, depths, sr_ratios)
        if any(len(s) != 4 for s in settings):
            raise ValueError("embed_dims, num_heads, mlp_ratios, depths and sr_ratios need 4 entries each")
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.out_channels = list(embed_dims)

        # Stochastic depth rises linearly from 0 over all blocks of all stages
        # (computed on the CPU so that building under `torch.device("meta")` works).
        block_drop_rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        block_index = 0
        prev_dim = in_channels
        for stage, (dim, heads, mlp_ratio, depth, sr_ratio) in enumerate(zip(*settings), start=1):
            patch_size, stride = (7, 4) if stage == 1 else (3, 2)
            self.add_module(f"patch_embed{stage}", OverlapPatchEmbed(prev_dim, dim, patch_size, stride))
            blocks = nn.ModuleList(
                PVTBlock(
                    dim,
                    heads,
                    mlp_ratio,
                    sr_ratio,
                    drop_path=block_drop_rates[block_index + j],
                    qkv_bias=qkv_bias,
                )
                for j in range(depth)
            )
            self.add_module(f"block{stage}", blocks)
            self.add_module(f"norm{stage}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            block_index += depth
            prev_dim = dim

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Same scheme as the official model, so training from scratch matches.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def stage_modules(self, stage: int) -> tuple[OverlapPatchEmbed, nn.ModuleList, nn.LayerNorm]:
        """Return ``(patch_embed, blocks, norm)`` of stage ``stage`` (1..4)."""
        return (
            getattr(self, f"patch_embed{stage}"),
            getattr(self, f"block{stage}"),
            getattr(self, f"norm{stage}"),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in range(1, 5):
            patch_embed, blocks, norm = self.stage_modules(stage)
            tokens, height, width = patch_embed(x)
            for block in blocks:
                tokens = block(tokens, height, width)
            tokens = norm(tokens)
            features.append(tokens_as_map(tokens, height, width).contiguous())
            # fused backends hand the next patch embedding the tokens themselves, as a channels_last map
            x = features[-1] if self._use_torch() else tokens_as_map(tokens, height, width)
        return features


# Variant table (docs/models.md#encoders). All variants use heads (1, 2, 5, 8)
# and spatial-reduction ratios (8, 4, 2, 1).
_VARIANTS: dict[str, dict] = {
    "pvt_v2_b0": dict(embed_dims=(32, 64, 160, 256), mlp_ratios=(8, 8, 4, 4), depths=(2, 2, 2, 2)),
    "pvt_v2_b1": dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), depths=(2, 2, 2, 2)),
    "pvt_v2_b2": dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 6, 3)),
    "pvt_v2_b3": dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 18, 3)),
    "pvt_v2_b4": dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), depths=(3, 8, 27, 3)),
    "pvt_v2_b5": dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(4, 4, 4, 4), depths=(3, 6, 40, 3)),
}


def _build(variant: str, **kwargs) -> PyramidVisionTransformerV2:
    config = dict(num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), **_VARIANTS[variant])
    config.update(kwargs)
    return PyramidVisionTransformerV2(**config)


def pvt_v2_b0(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b0: dims [32, 64, 160, 256], depths [2, 2, 2, 2]; 3,409,760 parameters."""
    return _build("pvt_v2_b0", **kwargs)


def pvt_v2_b1(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b1: dims [64, 128, 320, 512], depths [2, 2, 2, 2]; 13,496,000 parameters."""
    return _build("pvt_v2_b1", **kwargs)


def pvt_v2_b2(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b2: dims [64, 128, 320, 512], depths [3, 4, 6, 3]; 24,849,856 parameters."""
    return _build("pvt_v2_b2", **kwargs)


def pvt_v2_b3(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b3: dims [64, 128, 320, 512], depths [3, 4, 18, 3]; 44,725,696 parameters."""
    return _build("pvt_v2_b3", **kwargs)


def pvt_v2_b4(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b4: dims [64, 128, 320, 512], depths [3, 8, 27, 3]; 62,043,072 parameters."""
    return _build("pvt_v2_b4", **kwargs)


def pvt_v2_b5(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b5: dims [64, 128, 320, 512], mlp ratio 4, depths [3, 6, 40, 3]; 81,443,008 parameters."""
    return _build("pvt_v2_b5", **kwargs)
