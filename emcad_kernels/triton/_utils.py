"""Shared pieces of the Triton kernels: interpreter detection, autotuning policy, dtype and layout helpers,
activation functions and their derivatives.

Interpreter: ``TRITON_INTERPRET=1`` is read by ``triton.jit`` when a kernel is *decorated* (module import), so
``INTERPRET`` below is captured at import time too and is what decides whether the kernels of this package can
run on CPU tensors. Under the interpreter:

* every autotuned kernel has exactly one configuration (multi-config autotuning needs a GPU driver);
* there is no bf16 arithmetic, so every kernel loads, converts to fp32 (``.to(tl.float32)``), computes and
  converts on store. This is also the accumulation policy on GPU.

Determinism: kernels that write per-program partial sums (BatchNorm statistics, weight and BatchNorm-parameter
gradients) are **never autotuned**: their tile sizes come from ``reduction_tile`` below, a pure function of the
problem shape, so the reduction tree is fixed for a given shape and device kind. Partials are reduced in a fixed
order by the kernels of ``_reduce.py``; no floating-point atomics are used anywhere. Only purely elementwise
passes (each output computed independently, with a fixed tap order) are autotuned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# activation codes (constexpr inside kernels)
ACTIVATION_CODES = {"identity": 0, "relu": 1, "relu6": 2, "leakyrelu": 3, "hswish": 4, "gelu": 5}

LEAKY_SLOPE = 0.2  # EMCAD.md §2.1


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def activation_code(name: str) -> int:
    try:
        return ACTIVATION_CODES[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported by the triton backend") from None


def autotune(configs: list, key: list[str], interpreter_config: "triton.Config"):
    """``triton.autotune`` with ``configs`` on GPU and exactly ``interpreter_config`` under the interpreter."""
    return triton.autotune(configs=[interpreter_config] if INTERPRET else configs, key=key)


def config(num_warps: int = 4, num_stages: int = 2, **block) -> "triton.Config":
    return triton.Config(block, num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------------------------
# pinned tiles for kernels that write reduction partials
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """A spatial tile ``BLOCK_H × BLOCK_W`` (flattened, W fastest) times ``BLOCK_C`` channels."""

    BLOCK_H: int
    BLOCK_W: int
    BLOCK_C: int
    num_warps: int

    def grid(self, n: int, h: int, w: int, c: int) -> tuple[int, int]:
        return (n * self.tiles_per_image(h, w), cdiv(c, self.BLOCK_C))

    def tiles_per_image(self, h: int, w: int) -> int:
        return cdiv(h, self.BLOCK_H) * cdiv(w, self.BLOCK_W)

    def num_tiles(self, n: int, h: int, w: int) -> int:
        return n * self.tiles_per_image(h, w)

    def meta(self) -> dict:
        return dict(BLOCK_H=self.BLOCK_H, BLOCK_W=self.BLOCK_W, BLOCK_C=self.BLOCK_C, num_warps=self.num_warps)


# Interpreter tiles are small on purpose: the CPU tests use tiny odd shapes and must still see several
# spatial tiles with ragged edges and a channel count that is not a multiple of the channel block.
INTERPRETER_TILE = Tile(BLOCK_H=8, BLOCK_W=8, BLOCK_C=4, num_warps=1)


def reduction_tile(h: int, w: int, c: int, pixels: int = 128, max_block_c: int = 32) -> Tile:
    """Tile for kernels writing reduction partials: a function of the shape only (never autotuned)."""
    if INTERPRET:
        return INTERPRETER_TILE
    block_w = min(next_pow2(w), 32)
    block_h = max(1, min(next_pow2(h), pixels // block_w))
    block_c = min(next_pow2(c), max_block_c)
    num_warps = 4 if block_h * block_w * block_c >= 2048 else 2
    return Tile(block_h, block_w, block_c, num_warps)


def spatial_configs() -> list:
    """The small autotuning set of the elementwise (non-reducing) passes on GPU. Kept to four configurations:
    every configuration of these heavily unrolled stencils costs seconds of compilation at first use."""
    return [config(BLOCK_H=8, BLOCK_W=8, BLOCK_C=32, num_warps=4),
            config(BLOCK_H=4, BLOCK_W=16, BLOCK_C=64, num_warps=4),
            config(BLOCK_H=4, BLOCK_W=8, BLOCK_C=64, num_warps=4),
            config(BLOCK_H=8, BLOCK_W=16, BLOCK_C=32, num_warps=8)]


INTERPRETER_CONFIG = config(num_warps=1, BLOCK_H=INTERPRETER_TILE.BLOCK_H, BLOCK_W=INTERPRETER_TILE.BLOCK_W,
                            BLOCK_C=INTERPRETER_TILE.BLOCK_C)


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------
def is_channels_last(x: torch.Tensor) -> bool:
    return (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def empty_4d(shape, dtype, device, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


def empty_scratch(lead: int, n: int, c: int, h: int, w: int, channels_last: bool, device,
                  dtype=torch.float32) -> torch.Tensor:
    """A ``[lead, N, C, H, W]`` fp32 buffer whose per-slice layout follows the input's (for dz buffers)."""
    if channels_last:
        return torch.empty((lead, n, h, w, c), dtype=dtype, device=device).permute(0, 1, 4, 2, 3)
    return torch.empty((lead, n, c, h, w), dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def activate(z, ACT: tl.constexpr):
    """Forward activation of fp32 ``z`` (codes: ACTIVATION_CODES)."""
    if ACT == 1:
        out = tl.maximum(z, 0.0)
    elif ACT == 2:
        out = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACT == 3:
        out = tl.where(z > 0.0, z, z * 0.2)
    elif ACT == 4:
        out = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 5:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        out = z
    return out


@triton.jit
def activate_grad(z, g, ACT: tl.constexpr):
    """``g · act'(z)`` with PyTorch's conventions at the kinks (relu: 0 at 0; hardtanh: 0 at both ends)."""
    if ACT == 1:
        out = tl.where(z > 0.0, g, 0.0)
    elif ACT == 2:
        out = tl.where((z > 0.0) & (z < 6.0), g, 0.0)
    elif ACT == 3:
        out = tl.where(z > 0.0, g, g * 0.2)
    elif ACT == 4:
        out = tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, g * (z / 3.0 + 0.5), g))
    elif ACT == 5:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        out = g * (cdf + z * pdf)
    else:
        out = g
    return out


@triton.jit
def tile_coords(t, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Tile index ``t`` (over N × tiles-per-image) → (n, h[P], w[P], valid[P], count) with P = BLOCK_H·BLOCK_W."""
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_per_image = tl.cdiv(H, BLOCK_H) * tiles_w
    n = t // tiles_per_image
    r = t % tiles_per_image
    h0 = (r // tiles_w) * BLOCK_H
    w0 = (r % tiles_w) * BLOCK_W
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    hh = h0 + p // BLOCK_W
    ww = w0 + p % BLOCK_W
    valid = (hh < H) & (ww < W)
    count = (tl.minimum(H - h0, BLOCK_H) * tl.minimum(W - w0, BLOCK_W)).to(tl.float32)
    return n, hh, ww, valid, count


@triton.jit
def tile_mean_m2(z, valid2d, count):
    """Per-column mean and sum of squared deviations of ``z`` over the valid rows (exact two-pass in registers)."""
    mean = tl.sum(tl.where(valid2d, z, 0.0), 0) / count
    d = tl.where(valid2d, z - mean[None, :], 0.0)
    return mean, tl.sum(d * d, 0)


@triton.jit
def first_program_limit(n, t):
    """``n`` for the program with tile index 0, else 0: use as ``mask = idx < limit`` for stores that exactly one
    program along the tile axis performs (scalar-and-vector masks are not supported by the interpreter)."""
    return n * (t == 0).to(tl.int32)
