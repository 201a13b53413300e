"""PVTv2's Mix-FFN middle on tokens, ``GELU(dwconv3×3(x) + bias)``: Triton kernels and launchers.

Semantics (``reference.token_dwconv_gelu_forward``): ``x`` is ``(B, H·W, C)``, token ``h·W + w`` is pixel
``(h, w)``, i.e. the map in channels_last order; zero padding 1; exact (erf) GELU. Addressing goes through the
token and channel strides, so any strided ``x`` works; contiguous tokens give vector loads along C.

Kernels (a program = a spatial tile ``BLOCK_H × BLOCK_W`` times ``BLOCK_C`` channels):

forward
    ``_fwd_kernel``     the 9 taps + bias, GELU, one store (autotuned: purely elementwise)
backward (recomputes the conv output from ``x``; nothing but the inputs was saved)
    ``_bwd_dz_kernel``  ``∂L/∂z = g·GELU'(z)`` into an fp32 scratch buffer, and per-chunk partial rows of the
                        weight and bias gradients (``Σ ∂L/∂z(q)·x(q + o_t)``, ``Σ ∂L/∂z``); its tile is pinned
                        (``_utils.reduction_tile``), never autotuned, and ``_reduce.sum_partials`` adds the rows in
                        a fixed order straight into the gradient outputs: no atomics, bitwise reproducible
    ``_bwd_dx_kernel``  ``∂L/∂x(p) = Σ_t w[t]·∂L/∂z(p − o_t)`` (gather form; autotuned)

``∂L/∂z`` is materialised because ``∂L/∂x`` at a pixel needs it on a 3×3 neighbourhood; recomputing it there would
cost a 5×5 window of ``x`` and nine GELU derivatives per output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import _reduce
from ._utils import (INTERPRETER_CONFIG, accumulate_partial, activate, activate_grad, autotune, cdiv,
                     reduction_tile, spatial_configs, tile_coords)

_GELU = 5  # _utils.ACTIVATION_CODES["gelu"]
_AUTOTUNE_KEY = ["C", "H", "W"]


@triton.jit
def _conv(xb, hh, ww, valid, c, C, H, W, sxn, sxc, wt, bias, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """bias + the 3×3 depthwise taps on a tile (fp32). Channels past C are clamped for loading (never stored)."""
    cl = tl.minimum(c, C - 1)
    xc = xb + (cl * sxc)[None, :]
    w9 = wt + cl * 9
    z = tl.zeros([BLOCK_P, BLOCK_C], tl.float32) + tl.load(bias + cl).to(tl.float32)[None, :]
    for i in tl.static_range(3):
        hi = hh + (i - 1)
        mh = valid & (hi >= 0) & (hi < H)
        for j in tl.static_range(3):
            wi = ww + (j - 1)
            m = mh & (wi >= 0) & (wi < W)
            v = tl.load(xc + ((hi * W + wi) * sxn)[:, None], mask=m[:, None], other=0.0).to(tl.float32)
            z += v * tl.load(w9 + (i * 3 + j)).to(tl.float32)[None, :]
    return z


@autotune(configs=spatial_configs(), key=_AUTOTUNE_KEY, interpreter_config=INTERPRETER_CONFIG)
@triton.jit
def _fwd_kernel(x, y, wt, bias, N, C, H, W, sxb, sxn, sxc,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    z = _conv(x + n.to(tl.int64) * sxb, hh, ww, valid, c, C, H, W, sxn, sxc, wt, bias, BLOCK_H * BLOCK_W, BLOCK_C)
    out = y + n.to(tl.int64) * (H * W * C) + ((hh * W + ww) * C)[:, None] + c[None, :]
    tl.store(out, activate(z, _GELU).to(y.dtype.element_ty), mask=valid[:, None] & (c < C)[None, :])


@triton.jit
def _bwd_dz_kernel(x, grad, wt, bias, dz, part, N, C, H, W, sxb, sxn, sxc, sgb, sgn, sgc,
                   SUB: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """∂L/∂z of a chunk of SUB tiles into ``dz`` (contiguous fp32 tokens) and the chunk's partial row
    ``[Σ ∂L/∂z·x(q + o_t): C·9 in the weight's layout | Σ ∂L/∂z: C]`` (``accumulate_partial``: stored on the first
    tile, added on the next ones)."""
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cl = tl.minimum(c, C - 1)
    row = part + chunk.to(tl.int64) * (10 * C)
    for s in range(SUB):
        t = chunk * SUB + s
        first = t == chunk * SUB
        n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
        xb = x + n.to(tl.int64) * sxb
        z = _conv(xb, hh, ww, valid, c, C, H, W, sxn, sxc, wt, bias, BLOCK_H * BLOCK_W, BLOCK_C)
        m2d = valid[:, None] & cmask[None, :]
        pix = hh * W + ww
        g = tl.load(grad + n.to(tl.int64) * sgb + (pix * sgn)[:, None] + (c * sgc)[None, :], mask=m2d,
                    other=0.0).to(tl.float32)
        d = tl.where(m2d, activate_grad(z, g, _GELU), 0.0)
        tl.store(dz + n.to(tl.int64) * (H * W * C) + (pix * C)[:, None] + c[None, :], d, mask=m2d)
        accumulate_partial(row + 9 * C + c, tl.sum(d, 0), c, C, first)
        xc = xb + (cl * sxc)[None, :]
        for i in tl.static_range(3):
            hi = hh + (i - 1)
            mh = valid & (hi >= 0) & (hi < H)
            for j in tl.static_range(3):
                wi = ww + (j - 1)
                m = mh & (wi >= 0) & (wi < W)
                v = tl.load(xc + ((hi * W + wi) * sxn)[:, None], mask=m[:, None], other=0.0).to(tl.float32)
                accumulate_partial(row + c * 9 + (i * 3 + j), tl.sum(d * v, 0), c, C, first)
        tl.debug_barrier()  # the next tile's read-modify-write of the partial row sees these stores


@autotune(configs=spatial_configs(max_per_thread=4), key=_AUTOTUNE_KEY, interpreter_config=INTERPRETER_CONFIG)
@triton.jit
def _bwd_dx_kernel(dz, gx, wt, N, C, H, W,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cl = tl.minimum(c, C - 1)
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    base = n.to(tl.int64) * (H * W * C)
    dzc = dz + base + cl[None, :]
    w9 = wt + cl * 9
    acc = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], tl.float32)
    for i in tl.static_range(3):
        hg = hh - (i - 1)
        mh = valid & (hg >= 0) & (hg < H)
        for j in tl.static_range(3):
            wg = ww - (j - 1)
            m = mh & (wg >= 0) & (wg < W)
            d = tl.load(dzc + ((hg * W + wg) * C)[:, None], mask=m[:, None], other=0.0)
            acc += d * tl.load(w9 + (i * 3 + j)).to(tl.float32)[None, :]
    out = gx + base + ((hh * W + ww) * C)[:, None] + c[None, :]
    tl.store(out, acc.to(gx.dtype.element_ty), mask=valid[:, None] & cmask[None, :])


# --------------------------------------------------------------------------------------------------
# launchers (the kernel-op schemas of the descriptor in emcad_kernels/ops/token_dwconv_gelu.py)
# --------------------------------------------------------------------------------------------------
def _grid(n, h, w, c):
    return lambda meta: (n * cdiv(h, meta["BLOCK_H"]) * cdiv(w, meta["BLOCK_W"]), cdiv(c, meta["BLOCK_C"]))


def token_dwconv_gelu_forward(x, weight, bias, height, width):
    if x.numel() == 0:  # nothing to launch
        return reference.token_dwconv_gelu_forward(x, weight, bias, height, width)
    n, _, c = x.shape
    y = torch.empty((n, height * width, c), dtype=x.dtype, device=x.device)
    _fwd_kernel[_grid(n, height, width, c)](x, y, weight.contiguous(), bias.contiguous(), n, c, height, width,
                                            *x.stride())
    return y


def token_dwconv_gelu_backward(grad, x, weight, bias, height, width):
    if x.numel() == 0:
        return reference.token_dwconv_gelu_backward(grad, x, weight, bias, height, width)
    n, _, c = x.shape
    dev = x.device
    wt, b = weight.contiguous(), bias.contiguous()
    tile = reduction_tile(height, width, c)
    dz = torch.empty((n, height * width, c), dtype=torch.float32, device=dev)
    part = torch.empty((tile.num_chunks(n, height, width), 10 * c), dtype=torch.float32, device=dev)
    _bwd_dz_kernel[tile.chunk_grid(n, height, width, c)](x, grad, wt, b, dz, part, n, c, height, width, *x.stride(),
                                                         *grad.stride(), **tile.meta(sub=True))
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=dev)
    gb = torch.empty(bias.shape, dtype=bias.dtype, device=dev)
    _reduce.sum_partials(part, [gw, gb])
    gx = torch.empty((n, height * width, c), dtype=x.dtype, device=dev)
    _bwd_dx_kernel[_grid(n, height, width, c)](dz, gx, wt, n, c, height, width)
    return gx, gw, gb
