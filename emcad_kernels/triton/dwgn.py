"""Fused grouped dilated depthwise convolution + GroupNorm over the same groups (``dilated_dwconv_groupnorm``,
MALUNet's DGA and the depthwise half of its GAU ``DepthWiseConv2d``): Triton kernels and launchers.

Semantics (``reference.dwgn_forward``): the C channels are split into G equal groups of Q channels; group i is
convolved depthwise with ``w_i`` (dilation ``d_i``, zero padding ``d_i·(K//2)``) plus ``b_i``, and the result
``z`` is normalised by ``GroupNorm(G, C)``: statistics per (sample, group) over Q·H·W values (biased variance),
affine per channel. Supported here: 1–4 groups, one odd kernel size ``K <= 7`` for all groups, any dilations.

A program covers a spatial tile (``BLOCK_H × BLOCK_W`` pixels) times all Q channels of one group
(``BLOCK_C = next_pow2(Q)``). The GroupNorm statistics need the whole conv output of a (sample, group) before
anything can be normalised, so ``z`` is recomputed rather than stored: a K×K depthwise conv costs K² FMAs per
value, far less than writing and re-reading an fp32 tensor of the output's size.

forward
    ``_dwgn_stats_kernel``  per (chunk of SUB tiles of one image, sample, group): (count, mean, M2) of z; merged
                            in a fixed order by ``_reduce.merge_stats`` into the mean and biased variance per
                            (sample, group)
    ``_dwgn_fwd_kernel``    recompute z, normalise, affine, store
backward (recomputes the statistics and z from ``x``; nothing was saved by the forward)
    stats pass as above, then
    ``_dwgn_bwd_stats_kernel``  per-chunk ``Σ ĝ`` and ``Σ ĝ·ẑ`` per (sample, group), ``ĝ = γ·∂L/∂y``, and the
                                per-channel partials of ``∂L/∂γ = Σ ∂L/∂y·ẑ``, ``∂L/∂β = Σ ∂L/∂y``
    ``_dwgn_bwd_dz_kernel``     ``∂L/∂z = r·(ĝ − Σĝ/M − ẑ·Σ(ĝ·ẑ)/M)`` (M = Q·H·W) into an fp32 scratch buffer
    ``_dwgn_bwd_dx_kernel``     ``∂L/∂x(p) = Σ_t w[t]·∂L/∂z(p − d·o_t)`` (gather form) and per-chunk partials of
                                ``∂L/∂w[t] = Σ_p ∂L/∂z(p)·x(p + d·o_t)`` and ``∂L/∂b = Σ ∂L/∂z``

``∂L/∂z`` is materialised (as in ``msdc``) because ``∂L/∂x`` at a pixel needs it in a K×K neighbourhood and
recomputing it there would need a (2K−1)² window of x per value.

Determinism: kernels writing partial sums use pinned tiles (a function of the shape only) and write one row per
chunk; rows are reduced in a fixed order by ``_reduce`` (no atomics). Group dilations are scalar arguments
selected by the group index (no host-to-device copy per call). Layouts are addressed through strides; outputs
take the input's memory format.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import _reduce
from ._utils import (accumulate_partial, cdiv, empty_4d, empty_scratch, is_channels_last, next_pow2, tile_coords,
                     welford_merge)
from .lndw import MAX_GROUPS, MAX_KERNEL_SIZE, group_tile, pick


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dwgn_conv(xc, hh, ww, valid, wc, H, W, sxh, sxw, dil,
               K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Dilated depthwise conv (without bias) of a tile: ``xc`` points at the sample and the (clamped) channels."""
    R: tl.constexpr = K // 2
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for i in tl.static_range(K):
        hi = hh + (i - R) * dil
        mh = valid & (hi >= 0) & (hi < H)
        for j in tl.static_range(K):
            wi = ww + (j - R) * dil
            m = mh & (wi >= 0) & (wi < W)
            v = tl.load(xc + (hi * sxh + wi * sxw)[:, None], mask=m[:, None], other=0.0).to(tl.float32)
            acc += v * tl.load(wc + (i * K + j)).to(tl.float32)[None, :]
    return acc


@triton.jit
def _group_channels(grp, Q, BLOCK_C: tl.constexpr):
    """(local lane index, lane mask, clamped channel index) of group ``grp``'s Q channels."""
    cl = tl.arange(0, BLOCK_C)
    return cl, cl < Q, grp * Q + tl.minimum(cl, Q - 1)


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dwgn_stats_kernel(x, wt, bias, mean_part, m2_part, count_part,
                       N, H, W, sxn, sxc, sxh, sxw, Q, G, D0, D1, D2, D3,
                       K: tl.constexpr, SUB: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """(count, mean, M2) of z over a chunk of SUB tiles of image ``n`` and group ``grp`` (tile statistics merged in
    order): partial rows ``[chunks per image, N·G]``; the count of a chunk is the same for every column."""
    chunk = tl.program_id(0)
    n = tl.program_id(1)
    grp = tl.program_id(2)
    dil = pick(grp, D0, D1, D2, D3)
    cl, cmask, ch = _group_channels(grp, Q, BLOCK_C)
    xc = x + n.to(tl.int64) * sxn + (ch * sxc)[None, :]
    wc = wt + ch * (K * K)
    b = tl.load(bias + ch).to(tl.float32)
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for s in range(SUB):
        # image-local tile index: tile_coords with N = 1 gives no valid pixel past the image's last tile
        _, hh, ww, valid, count = tile_coords(chunk * SUB + s, 1, H, W, BLOCK_H, BLOCK_W)
        z = _dwgn_conv(xc, hh, ww, valid, wc, H, W, sxh, sxw, dil, K, BLOCK_H * BLOCK_W, BLOCK_C) + b[None, :]
        m2d = valid[:, None] & cmask[None, :]
        cnt_t = count * Q
        mu_t = tl.sum(tl.sum(tl.where(m2d, z, 0.0), 1), 0) / tl.maximum(cnt_t, 1.0)
        d = tl.where(m2d, z - mu_t, 0.0)
        mean, m2 = welford_merge(cnt, mean, m2, cnt_t, mu_t, tl.sum(tl.sum(d * d, 1), 0))
        cnt += cnt_t
    col = chunk.to(tl.int64) * (N * G) + n * G + grp
    tl.store(mean_part + col, mean)
    tl.store(m2_part + col, m2)
    tl.store(count_part + chunk, cnt)  # every (n, grp) program writes the same value


@triton.jit
def _dwgn_fwd_kernel(x, y, wt, bias, gnw, gnb, mean, var,
                     N, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw, eps, Q, G, D0, D1, D2, D3,
                     K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    grp = tl.program_id(1)
    dil = pick(grp, D0, D1, D2, D3)
    cl, cmask, ch = _group_channels(grp, Q, BLOCK_C)
    n, hh, ww, valid, _ = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    xc = x + n.to(tl.int64) * sxn + (ch * sxc)[None, :]
    z = _dwgn_conv(xc, hh, ww, valid, wt + ch * (K * K), H, W, sxh, sxw, dil, K, BLOCK_H * BLOCK_W, BLOCK_C)
    z += tl.load(bias + ch).to(tl.float32)[None, :]
    mu = tl.load(mean + n * G + grp)
    rstd = 1.0 / tl.sqrt(tl.load(var + n * G + grp) + eps)
    scale = tl.load(gnw + ch).to(tl.float32) * rstd
    shift = tl.load(gnb + ch).to(tl.float32) - mu * scale
    out = z * scale[None, :] + shift[None, :]
    yp = y + n.to(tl.int64) * syn + (hh * syh + ww * syw)[:, None] + (ch * syc)[None, :]
    tl.store(yp, out.to(y.dtype.element_ty), mask=valid[:, None] & cmask[None, :])


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dwgn_bwd_stats_kernel(x, grad, wt, bias, gnw, mean, var, part_ng, part_c,
                           N, H, W, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, eps, Q, G, CPI, D0, D1, D2, D3,
                           K: tl.constexpr, SUB: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per chunk of SUB tiles of image ``n`` and group ``grp``: ``[Σĝ, Σĝ·ẑ]`` at column ``2·(n·G + grp)`` of
    ``part_ng [CPI, 2·N·G]``, and per channel ``Σ g·ẑ`` / ``Σ g`` in row ``n·CPI + chunk`` of
    ``part_c [N·CPI, 2C]`` (columns ``c`` / ``C + c``)."""
    chunk = tl.program_id(0)
    n = tl.program_id(1)
    grp = tl.program_id(2)
    dil = pick(grp, D0, D1, D2, D3)
    cl, cmask, ch = _group_channels(grp, Q, BLOCK_C)
    xc = x + n.to(tl.int64) * sxn + (ch * sxc)[None, :]
    gc = grad + n.to(tl.int64) * sgn + (ch * sgc)[None, :]
    wc = wt + ch * (K * K)
    b = tl.load(bias + ch).to(tl.float32)
    gam = tl.load(gnw + ch).to(tl.float32)
    mu = tl.load(mean + n * G + grp)
    rstd = 1.0 / tl.sqrt(tl.load(var + n * G + grp) + eps)
    s_g = 0.0
    s_gz = 0.0
    c_g = tl.zeros([BLOCK_C], tl.float32)
    c_gz = tl.zeros([BLOCK_C], tl.float32)
    for s in range(SUB):
        _, hh, ww, valid, _ = tile_coords(chunk * SUB + s, 1, H, W, BLOCK_H, BLOCK_W)
        m2d = valid[:, None] & cmask[None, :]
        z = _dwgn_conv(xc, hh, ww, valid, wc, H, W, sxh, sxw, dil, K, BLOCK_H * BLOCK_W, BLOCK_C) + b[None, :]
        zhat = tl.where(m2d, (z - mu) * rstd, 0.0)
        g = tl.load(gc + (hh * sgh + ww * sgw)[:, None], mask=m2d, other=0.0).to(tl.float32)
        gh = g * gam[None, :]
        s_g += tl.sum(tl.sum(gh, 1), 0)
        s_gz += tl.sum(tl.sum(gh * zhat, 1), 0)
        c_g += tl.sum(g, 0)
        c_gz += tl.sum(g * zhat, 0)
    col = chunk.to(tl.int64) * (2 * N * G) + 2 * (n * G + grp)
    tl.store(part_ng + col, s_g)
    tl.store(part_ng + col + 1, s_gz)
    C = G * Q
    row = part_c + (n * CPI + chunk).to(tl.int64) * (2 * C) + grp * Q + cl
    tl.store(row, c_gz, mask=cmask)
    tl.store(row + C, c_g, mask=cmask)


@triton.jit
def _dwgn_bwd_dz_kernel(x, grad, wt, bias, gnw, mean, var, red, dz,
                        N, H, W, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw, eps, inv_m, Q, G,
                        D0, D1, D2, D3,
                        K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """∂L/∂z into the fp32 scratch ``dz``; ``red [N·G, 2]`` holds the reduced (Σĝ, Σĝ·ẑ)."""
    t = tl.program_id(0)
    grp = tl.program_id(1)
    dil = pick(grp, D0, D1, D2, D3)
    cl, cmask, ch = _group_channels(grp, Q, BLOCK_C)
    n, hh, ww, valid, _ = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    m2d = valid[:, None] & cmask[None, :]
    xc = x + n.to(tl.int64) * sxn + (ch * sxc)[None, :]
    z = _dwgn_conv(xc, hh, ww, valid, wt + ch * (K * K), H, W, sxh, sxw, dil, K, BLOCK_H * BLOCK_W, BLOCK_C)
    z += tl.load(bias + ch).to(tl.float32)[None, :]
    col = n * G + grp
    mu = tl.load(mean + col)
    rstd = 1.0 / tl.sqrt(tl.load(var + col) + eps)
    mean_g = tl.load(red + 2 * col) * inv_m
    mean_gz = tl.load(red + 2 * col + 1) * inv_m
    g = tl.load(grad + n.to(tl.int64) * sgn + (hh * sgh + ww * sgw)[:, None] + (ch * sgc)[None, :], mask=m2d,
                other=0.0).to(tl.float32)
    gh = g * tl.load(gnw + ch).to(tl.float32)[None, :]
    d = rstd * (gh - mean_g - (z - mu) * rstd * mean_gz)
    tl.store(dz + n.to(tl.int64) * sdn + (hh * sdh + ww * sdw)[:, None] + (ch * sdc)[None, :], d, mask=m2d)


@triton.jit
def _dwgn_bwd_dx_kernel(x, dz, gx, wt, part,
                        N, H, W, T, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, son, soc, soh, sow, Q, D0, D1, D2, D3,
                        K: tl.constexpr, SUB: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """∂L/∂x of a chunk of SUB tiles of one group, and the group's partial row ``[∂w (Q·K², the weight's layout)
    | ∂b (Q)]`` at ``part + (grp·T + chunk)·Q·(K²+1)``."""
    chunk = tl.program_id(0)
    grp = tl.program_id(1)
    dil = pick(grp, D0, D1, D2, D3)
    cl, cmask, ch = _group_channels(grp, Q, BLOCK_C)
    KK: tl.constexpr = K * K
    prow = part + (grp * T + chunk).to(tl.int64) * (Q * (KK + 1))
    wc = wt + ch * KK
    R: tl.constexpr = K // 2
    for s in range(SUB):
        t = chunk * SUB + s
        first = t == chunk * SUB
        n, hh, ww, valid, _ = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
        m2d = valid[:, None] & cmask[None, :]
        xc = x + n.to(tl.int64) * sxn + (ch * sxc)[None, :]
        dzc = dz + n.to(tl.int64) * sdn + (ch * sdc)[None, :]
        d0 = tl.load(dzc + (hh * sdh + ww * sdw)[:, None], mask=m2d, other=0.0)
        dx = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], tl.float32)
        for i in tl.static_range(K):
            hi = hh + (i - R) * dil  # x(p + d·o) for the weight gradient
            hg = hh - (i - R) * dil  # dz(p − d·o) for the input gradient
            mh = valid & (hi >= 0) & (hi < H)
            mg = valid & (hg >= 0) & (hg < H)
            for j in tl.static_range(K):
                wi = ww + (j - R) * dil
                wg = ww - (j - R) * dil
                mx = mh & (wi >= 0) & (wi < W)
                md = mg & (wg >= 0) & (wg < W)
                v = tl.load(xc + (hi * sxh + wi * sxw)[:, None], mask=mx[:, None], other=0.0).to(tl.float32)
                dg = tl.load(dzc + (hg * sdh + wg * sdw)[:, None], mask=md[:, None], other=0.0)
                dx += dg * tl.load(wc + (i * K + j)).to(tl.float32)[None, :]
                accumulate_partial(prow + cl * KK + (i * K + j), tl.sum(d0 * v, 0), cl, Q, first)
        op = gx + n.to(tl.int64) * son + (hh * soh + ww * sow)[:, None] + (ch * soc)[None, :]
        tl.store(op, dx.to(gx.dtype.element_ty), mask=m2d)
        accumulate_partial(prow + Q * KK + cl, tl.sum(d0, 0), cl, Q, first)
        tl.debug_barrier()  # the next tile's read-modify-write of the partial row sees these stores


# --------------------------------------------------------------------------------------------------
# launchers (the kernel-op schemas of the descriptor in emcad_kernels/ops)
# --------------------------------------------------------------------------------------------------
def _geometry(x, weights, dilations):
    """(G, Q, K, dilations padded to MAX_GROUPS, tile)."""
    g = len(weights)
    if not 1 <= g <= MAX_GROUPS:
        raise ValueError(f"the triton dilated_dwconv_groupnorm kernel supports 1 to {MAX_GROUPS} groups, got {g}")
    ks = {int(w.shape[-1]) for w in weights}
    if len(ks) != 1:
        raise ValueError(f"the triton kernel needs one kernel size for all groups, got {sorted(ks)}")
    k = ks.pop()
    if k % 2 == 0 or k > MAX_KERNEL_SIZE:
        raise ValueError(f"the triton kernel supports odd kernel sizes <= {MAX_KERNEL_SIZE}, got {k}")
    q = x.shape[1] // g
    dils = [int(d) for d in dilations] + [1] * (MAX_GROUPS - g)
    n, _, h, w = x.shape
    return g, q, k, dils, group_tile(n, h, w, next_pow2(q), k)


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _statistics(x, wt, bias, g, q, k, dils, tile):
    """Mean and biased variance of z per (sample, group), fp32 ``[N·G]`` each."""
    n, c, h, w = x.shape
    cpi = cdiv(tile.tiles_per_image(h, w), tile.SUB)  # chunks per image
    mean_part = torch.empty((cpi, n * g), dtype=torch.float32, device=x.device)
    m2_part = torch.empty_like(mean_part)
    count = torch.empty((cpi,), dtype=torch.float32, device=x.device)
    _dwgn_stats_kernel[(cpi, n, g)](x, wt, bias, mean_part, m2_part, count, n, h, w, *x.stride(), q, g, *dils,
                                    K=k, SUB=tile.SUB, BLOCK_H=tile.BLOCK_H, BLOCK_W=tile.BLOCK_W,
                                    BLOCK_C=tile.BLOCK_C, num_warps=tile.num_warps)
    mean = torch.empty((n * g,), dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    _reduce.merge_stats(mean_part, m2_part, count, [(mean, var)])
    return mean, var, cpi


def dwgn_forward(x, weights, biases, gn_weight, gn_bias, dilations, eps):
    if x.numel() == 0:
        return reference.dwgn_forward(x, weights, biases, gn_weight, gn_bias, dilations, eps)
    n, c, h, w = x.shape
    g, q, k, dils, tile = _geometry(x, weights, dilations)
    wt, bias = _flat(weights), _flat(biases)
    mean, var, _ = _statistics(x, wt, bias, g, q, k, dils, tile)
    y = empty_4d(x.shape, x.dtype, x.device, is_channels_last(x))
    _dwgn_fwd_kernel[(tile.num_tiles(n, h, w), g)](
        x, y, wt, bias, gn_weight.contiguous(), gn_bias.contiguous(), mean, var, n, h, w, *x.stride(), *y.stride(),
        float(eps), q, g, *dils, K=k, BLOCK_H=tile.BLOCK_H, BLOCK_W=tile.BLOCK_W, BLOCK_C=tile.BLOCK_C,
        num_warps=tile.num_warps)
    return y


def dwgn_backward(grad, x, weights, biases, gn_weight, gn_bias, dilations, eps):
    if x.numel() == 0:
        return reference.dwgn_backward(grad, x, weights, biases, gn_weight, gn_bias, dilations, eps)
    n, c, h, w = x.shape
    dev = x.device
    g, q, k, dils, tile = _geometry(x, weights, dilations)
    wt, bias = _flat(weights), _flat(biases)
    gnw = gn_weight.contiguous()
    meta = dict(BLOCK_H=tile.BLOCK_H, BLOCK_W=tile.BLOCK_W, BLOCK_C=tile.BLOCK_C, num_warps=tile.num_warps)
    mean, var, cpi = _statistics(x, wt, bias, g, q, k, dils, tile)

    # Σĝ, Σĝ·ẑ per (sample, group); GroupNorm-parameter gradients
    part_ng = torch.empty((cpi, 2 * n * g), dtype=torch.float32, device=dev)
    part_c = torch.empty((n * cpi, 2 * c), dtype=torch.float32, device=dev)
    _dwgn_bwd_stats_kernel[(cpi, n, g)](x, grad, wt, bias, gnw, mean, var, part_ng, part_c, n, h, w, *x.stride(),
                                        *grad.stride(), float(eps), q, g, cpi, *dils, K=k, SUB=tile.SUB, **meta)
    red = torch.empty((2 * n * g,), dtype=torch.float32, device=dev)
    _reduce.sum_partials(part_ng, [red])
    ggw = torch.empty(gn_weight.shape, dtype=gn_weight.dtype, device=dev)
    ggb = torch.empty(gn_bias.shape, dtype=gn_bias.dtype, device=dev)
    _reduce.sum_partials(part_c, [ggw, ggb])

    # ∂L/∂z
    dz = empty_scratch(1, n, c, h, w, is_channels_last(x), dev)[0]
    _dwgn_bwd_dz_kernel[(tile.num_tiles(n, h, w), g)](
        x, grad, wt, bias, gnw, mean, var, red, dz, n, h, w, *x.stride(), *grad.stride(), *dz.stride(), float(eps),
        1.0 / (q * h * w), q, g, *dils, K=k, **meta)

    # ∂L/∂x; weight and bias gradients, reduced per group straight into the outputs
    t = tile.num_chunks(n, h, w)
    row = q * (k * k + 1)
    part = torch.empty((g, t, row), dtype=torch.float32, device=dev)
    gx = empty_4d(x.shape, x.dtype, dev, is_channels_last(x))
    _dwgn_bwd_dx_kernel[(t, g)](x, dz, gx, wt, part, n, h, w, t, *x.stride(), *dz.stride(), *gx.stride(), q, *dils,
                                K=k, SUB=tile.SUB, **meta)
    gws, gbs = [], []
    for i in range(g):
        gw = torch.empty(weights[i].shape, dtype=weights[i].dtype, device=dev)
        gb = torch.empty(biases[i].shape, dtype=biases[i].dtype, device=dev)
        _reduce.sum_partials(part[i], [gw, gb])
        gws.append(gw)
        gbs.append(gb)
    return [gx, ggw, ggb, *gws, *gbs]
