"""Fused per-group channels-first LayerNorm + dilated depthwise convolution (``layernorm_dilated_dwconv``,
EGE-UNet's GAB groups and GHPA's ``norm2`` + ``ldw.0``): Triton kernels and launchers.

Semantics (``reference.lndw_forward``): the channels are split, in order, into G groups of ``g_i`` channels; per
group ``zn = LN_cf(x_i)`` (per pixel over the group's channels, biased variance, affine ``γ_i``, ``β_i``) and
``y_i = dwconv(zn, w_i, dilation d_i, zero padding d_i·(K//2)) + b_i``; the padding zeros stand for the
*normalised* map. Supported here: 1–4 groups of any sizes, one odd kernel size ``K <= 7`` for all groups, any
dilations (also larger than the image).

A program covers a spatial tile (``BLOCK_H × BLOCK_W`` pixels) times **all** channels of one group
(``BLOCK_C = next_pow2(max g_i)``), so the per-pixel LayerNorm statistics are a reduction in registers. Nothing
normalised is materialised: every tap load of the conv window is normalised on the fly (``_ln_normalise``);
the recomputation costs K² small channel reductions per output pixel, cheap next to the memory traffic it
saves, and the window loads hit the cache.

forward
    ``_lndw_fwd_kernel``   one pass: gather K² normalised taps, weight, bias, store
backward (one pass, recomputing the LayerNorm; no scratch buffer)
    ``_lndw_bwd_kernel``   per input pixel q: ``∂L/∂zn(q) = Σ_t w[t]·g(q − d·o_t)`` (gather form), then the
                           LayerNorm backward at q (all group channels are in the program) gives ``∂L/∂x(q)``;
                           per-chunk partials of ``∂L/∂w[t] = Σ_q g(q − d·o_t)·zn(q)``, ``∂L/∂b = Σ g``,
                           ``∂L/∂γ = Σ ∂L/∂zn·x̂``, ``∂L/∂β = Σ ∂L/∂zn``; reduced in a fixed order by
                           ``_reduce.sum_partials`` (no atomics), one reduction per group straight into the
                           gradient outputs.

The backward kernel loops over a chunk of ``SUB`` tiles and writes one partial row per chunk and group; its tile
(``group_tile``) is a function of the shape only (never autotuned), so the reduction order is fixed and results
are bitwise reproducible. Group geometry (channel offset, size, dilation, partial-buffer offset) is passed as scalar
arguments and selected by the group index: no host-to-device copy per call (CUDA-graph safe).

Layouts: addressed through strides (NCHW, channels_last, other strides); outputs take the input's memory format.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import _reduce
from ._utils import INTERPRET, Tile, accumulate_partial, cdiv, empty_4d, is_channels_last, next_pow2, tile_coords

MAX_GROUPS = 4
MAX_KERNEL_SIZE = 7


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def pick(grp, a0, a1, a2, a3):
    """The scalar argument of group ``grp`` (0..3)."""
    return tl.where(grp == 0, a0, tl.where(grp == 1, a1, tl.where(grp == 2, a2, a3)))


@triton.jit
def _ln_normalise(ptrs, m, cmask, inv_g, eps, gam, bet):
    """(zn, x̂, rstd) of the pixels ``ptrs [P, BLOCK_C]`` over the group's channels; zn and x̂ are 0 where ``m``
    (pixel inside the image and the tile) or ``cmask`` is false, so zn is the conv's zero padding there."""
    m2d = m[:, None] & cmask[None, :]
    v = tl.load(ptrs, mask=m2d, other=0.0).to(tl.float32)
    mu = tl.sum(v, 1) * inv_g
    d = tl.where(m2d, v - mu[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) * inv_g + eps)
    xhat = d * rstd[:, None]
    zn = tl.where(m2d, xhat * gam[None, :] + bet[None, :], 0.0)
    return zn, xhat, rstd


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _lndw_fwd_kernel(x, y, wt, bias, lnw, lnb,
                     N, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw, eps,
                     S0, S1, S2, S3, G0, G1, G2, G3, D0, D1, D2, D3,
                     K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    grp = tl.program_id(1)
    start = pick(grp, S0, S1, S2, S3)
    gsize = pick(grp, G0, G1, G2, G3)
    dil = pick(grp, D0, D1, D2, D3)
    inv_g = 1.0 / gsize.to(tl.float32)
    cl = tl.arange(0, BLOCK_C)
    cmask = cl < gsize
    ch = start + tl.minimum(cl, gsize - 1)  # clamped for loads; lanes past the group are never stored
    n, hh, ww, valid, _ = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    gam = tl.load(lnw + ch).to(tl.float32)
    bet = tl.load(lnb + ch).to(tl.float32)
    xc = x + n.to(tl.int64) * sxn + (ch * sxc)[None, :]
    wc = wt + ch * (K * K)
    R: tl.constexpr = K // 2
    acc = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], tl.float32)
    for i in tl.static_range(K):
        hi = hh + (i - R) * dil
        mh = valid & (hi >= 0) & (hi < H)
        for j in tl.static_range(K):
            wi = ww + (j - R) * dil
            m = mh & (wi >= 0) & (wi < W)
            zn, _, _ = _ln_normalise(xc + (hi * sxh + wi * sxw)[:, None], m, cmask, inv_g, eps, gam, bet)
            acc += zn * tl.load(wc + (i * K + j)).to(tl.float32)[None, :]
    acc += tl.load(bias + ch).to(tl.float32)[None, :]
    yp = y + n.to(tl.int64) * syn + (hh * syh + ww * syw)[:, None] + (ch * syc)[None, :]
    tl.store(yp, acc.to(y.dtype.element_ty), mask=valid[:, None] & cmask[None, :])


@triton.jit
def _lndw_bwd_kernel(x, grad, gx, wt, lnw, lnb, part,
                     N, H, W, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, son, soc, soh, sow, eps,
                     S0, S1, S2, S3, G0, G1, G2, G3, D0, D1, D2, D3, P0, P1, P2, P3,
                     K: tl.constexpr, SUB: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """∂L/∂x of a chunk of SUB tiles of one group, and the group's partial row
    ``[∂w (g·K², the weight's layout) | ∂b (g) | ∂γ (g) | ∂β (g)]`` at ``part + P_grp + chunk·g·(K²+3)``."""
    chunk = tl.program_id(0)
    grp = tl.program_id(1)
    start = pick(grp, S0, S1, S2, S3)
    gsize = pick(grp, G0, G1, G2, G3)
    dil = pick(grp, D0, D1, D2, D3)
    KK: tl.constexpr = K * K
    prow = part + pick(grp, P0, P1, P2, P3).to(tl.int64) + chunk.to(tl.int64) * (gsize * (KK + 3))
    inv_g = 1.0 / gsize.to(tl.float32)
    cl = tl.arange(0, BLOCK_C)
    cmask = cl < gsize
    ch = start + tl.minimum(cl, gsize - 1)
    gam = tl.load(lnw + ch).to(tl.float32)
    bet = tl.load(lnb + ch).to(tl.float32)
    wc = wt + ch * KK
    R: tl.constexpr = K // 2
    for s in range(SUB):
        t = chunk * SUB + s
        first = t == chunk * SUB
        n, hh, ww, valid, _ = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
        m2d = valid[:, None] & cmask[None, :]
        xc = x + n.to(tl.int64) * sxn + (ch * sxc)[None, :]
        gc = grad + n.to(tl.int64) * sgn + (ch * sgc)[None, :]
        zn, xhat, rstd = _ln_normalise(xc + (hh * sxh + ww * sxw)[:, None], valid, cmask, inv_g, eps, gam, bet)
        dzn = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], tl.float32)
        for i in tl.static_range(K):
            hg = hh - (i - R) * dil  # g(q − d·o_t)
            mh = valid & (hg >= 0) & (hg < H)
            for j in tl.static_range(K):
                wg = ww - (j - R) * dil
                m = mh & (wg >= 0) & (wg < W)
                gt = tl.load(gc + (hg * sgh + wg * sgw)[:, None], mask=m[:, None] & cmask[None, :],
                             other=0.0).to(tl.float32)
                dzn += gt * tl.load(wc + (i * K + j)).to(tl.float32)[None, :]
                accumulate_partial(prow + cl * KK + (i * K + j), tl.sum(gt * zn, 0), cl, gsize, first)
        # LayerNorm backward at q: ∂x = r·(∂x̂ − mean_c ∂x̂ − x̂·mean_c(∂x̂·x̂)), ∂x̂ = γ·∂zn
        dxhat = dzn * gam[None, :]
        m1 = tl.sum(dxhat, 1) * inv_g
        m2 = tl.sum(dxhat * xhat, 1) * inv_g
        dx = rstd[:, None] * (dxhat - m1[:, None] - xhat * m2[:, None])
        op = gx + n.to(tl.int64) * son + (hh * soh + ww * sow)[:, None] + (ch * soc)[None, :]
        tl.store(op, dx.to(gx.dtype.element_ty), mask=m2d)
        gcen = tl.load(gc + (hh * sgh + ww * sgw)[:, None], mask=m2d, other=0.0).to(tl.float32)
        accumulate_partial(prow + gsize * KK + cl, tl.sum(gcen, 0), cl, gsize, first)
        accumulate_partial(prow + gsize * (KK + 1) + cl, tl.sum(dzn * xhat, 0), cl, gsize, first)
        accumulate_partial(prow + gsize * (KK + 2) + cl, tl.sum(dzn, 0), cl, gsize, first)
        tl.debug_barrier()  # the next tile's read-modify-write of the partial row sees these stores


# --------------------------------------------------------------------------------------------------
# launchers (the kernel-op schemas of the descriptor in emcad_kernels/ops)
# --------------------------------------------------------------------------------------------------
def group_tile(n: int, h: int, w: int, block_c: int, k: int = 3) -> Tile:
    """Pinned tile (a function of the shape only) for the programs that cover all channels of one group.

    ``BLOCK_C`` channels times 1024/BLOCK_C pixels (16..128; half as many for K >= 5): 8 fp32 values per thread
    and array on 4 warps (8 warps for the 16-pixel tiles of groups wider than 64 channels). Larger tiles spill on
    sm_90 (compile check with ``cuobjdump --dump-resource-usage``: 16 values per thread spill ~300 bytes in the
    forward at 64 channels; the 25 unrolled taps of a 5×5 spill 80 bytes at 8 values per thread). Programs
    writing partials loop over SUB tiles: 1 while there are fewer than 2048 tiles (the EGE-UNet / MALUNet maps are
    small: keep every SM busy), up to 8 for large problems (partial buffers of at most ~1024 rows per group).
    Under the interpreter (which pays per operation, not per element), 8×8 tiles and SUB = 2: the tiny odd test
    images still have ragged edges, several tiles per image and chunks whose last tile lies past the end."""
    if INTERPRET:
        return Tile(BLOCK_H=8, BLOCK_W=8, BLOCK_C=block_c, num_warps=1, SUB=2)
    pixels = max(16, min(128, (1024 if k <= 3 else 512) // block_c))
    block_w = min(next_pow2(w), 16, pixels)
    block_h = max(1, pixels // block_w)
    num_warps = 8 if pixels * block_c >= 2048 else 4
    tiles = n * cdiv(h, block_h) * cdiv(w, block_w)
    return Tile(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps,
                SUB=min(8, max(1, tiles // 1024)))


def _groups(weights, dilations):
    """Per-group scalars padded to MAX_GROUPS: (starts, sizes, dilations, K, BLOCK_C)."""
    g = len(weights)
    if not 1 <= g <= MAX_GROUPS:
        raise ValueError(f"the triton layernorm_dilated_dwconv kernel supports 1 to {MAX_GROUPS} groups, got {g}")
    ks = {int(w.shape[-1]) for w in weights}
    if len(ks) != 1:
        raise ValueError(f"the triton kernel needs one kernel size for all groups, got {sorted(ks)}")
    k = ks.pop()
    if k % 2 == 0 or k > MAX_KERNEL_SIZE:
        raise ValueError(f"the triton kernel supports odd kernel sizes <= {MAX_KERNEL_SIZE}, got {k}")
    sizes = [int(w.shape[0]) for w in weights]
    starts = [sum(sizes[:i]) for i in range(g)]
    pad = MAX_GROUPS - g
    return (starts + [0] * pad, sizes + [1] * pad, [int(d) for d in dilations] + [1] * pad, k,
            next_pow2(max(sizes)))


def _flat(tensors, dtype=None):
    """One contiguous vector of per-group parameters, in channel order (tiny; one device-side copy)."""
    return torch.cat([t.reshape(-1) if dtype is None else t.reshape(-1).to(dtype) for t in tensors])


def lndw_forward(x, ln_weights, ln_biases, weights, biases, dilations, eps):
    if x.numel() == 0:
        return reference.lndw_forward(x, ln_weights, ln_biases, weights, biases, dilations, eps)
    n, c, h, w = x.shape
    starts, sizes, dils, k, block_c = _groups(weights, dilations)
    tile = group_tile(n, h, w, block_c, k)
    y = empty_4d(x.shape, x.dtype, x.device, is_channels_last(x))
    _lndw_fwd_kernel[(tile.num_tiles(n, h, w), len(weights))](
        x, y, _flat(weights), _flat(biases), _flat(ln_weights, torch.float32), _flat(ln_biases, torch.float32),
        n, h, w, *x.stride(), *y.stride(), float(eps), *starts, *sizes, *dils, K=k,
        BLOCK_H=tile.BLOCK_H, BLOCK_W=tile.BLOCK_W, BLOCK_C=tile.BLOCK_C, num_warps=tile.num_warps)
    return y


def lndw_backward(grad, x, ln_weights, ln_biases, weights, biases, dilations, eps):
    if x.numel() == 0:
        return reference.lndw_backward(grad, x, ln_weights, ln_biases, weights, biases, dilations, eps)
    n, c, h, w = x.shape
    g = len(weights)
    starts, sizes, dils, k, block_c = _groups(weights, dilations)
    tile = group_tile(n, h, w, block_c, k)
    t = tile.num_chunks(n, h, w)
    row = [s * (k * k + 3) for s in sizes[:g]]  # partial-row length of each group
    offsets = [t * sum(row[:i]) for i in range(g)]
    part = torch.empty((t * sum(row),), dtype=torch.float32, device=x.device)
    gx = empty_4d(x.shape, x.dtype, x.device, is_channels_last(x))
    _lndw_bwd_kernel[(t, g)](
        x, grad, gx, _flat(weights), _flat(ln_weights, torch.float32), _flat(ln_biases, torch.float32), part,
        n, h, w, *x.stride(), *grad.stride(), *gx.stride(), float(eps), *starts, *sizes, *dils,
        *(offsets + [0] * (MAX_GROUPS - g)), K=k, SUB=tile.SUB,
        BLOCK_H=tile.BLOCK_H, BLOCK_W=tile.BLOCK_W, BLOCK_C=tile.BLOCK_C, num_warps=tile.num_warps)
    gws, gbs, glws, glbs = [], [], [], []
    for i in range(g):
        outs = [torch.empty_like(p, memory_format=torch.contiguous_format)
                for p in (weights[i], biases[i], ln_weights[i], ln_biases[i])]
        _reduce.sum_partials(part[offsets[i]:offsets[i] + t * row[i]].view(t, row[i]), outs)
        for lst, o in zip((gws, gbs, glws, glbs), outs):
            lst.append(o)
    return [gx, *glws, *glbs, *gws, *gbs]
