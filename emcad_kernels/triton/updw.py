"""Fused ×2 upsampling + depthwise conv + BatchNorm + activation (EUCB's ``up_dwc``): Triton kernels, launchers.

Semantics (``reference.updw_forward``): ``act(BN(dwconv_k(upsample_2(x))))`` with padding ``k // 2``, nearest or
bilinear (``align_corners=False``) upsampling. The upsampled tensor is **never materialised**: a program owns a
tile of *low-resolution* pixels ``(i, j)`` and produces the four outputs ``(2i + p, 2j + q)``, p, q ∈ {0, 1}.

Output row ``2i + p`` with tap ``a`` reads upsampled row ``2i + o``, ``o = p + a − k//2``, i.e. source row
``m = i + o // 2`` with parity ``o % 2`` (constants per phase and tap).

* **nearest** (docs/kernels.md#eucb-upsample-and-depthwise-conv): upsampled row ``2m + e`` is ``x[m]``, so the taps of
  one phase that read the same source offset ``(r, s)`` fold into one polyphase weight ``K_pq[r][s] = Σ w[a][b]``
  over those taps: for k = 3 four 2×2 stencils (16 FMAs per four outputs instead of 36), reading a 3×3 low-resolution neighbourhood once.
  Zero padding of the upsampled map is zero padding of ``x``.
* **bilinear**: ``U[2m] = ¼·x[m−1] + ¾·x[m]``, ``U[2m+1] = ¾·x[m] + ¼·x[m+1]`` with edge-clamped source indices
  (PyTorch's ``align_corners=False`` rule at scale 2), and ``U`` zero outside ``[0, 2h)``: each tap's upsampled
  value is formed on the fly from four clamped loads (``_bilinear_u``). Correct, but not tuned (its forward spills
  about 1 KB of registers per thread on sm_90): EMCAD uses nearest.

Passes are those of ``msdc.py`` (pinned tiles and per-chunk partials for the reducing passes, autotuning for the
elementwise ones): training statistics pass + reduction + apply pass in the forward; in the backward pass A
(``Σ g_a``, ``Σ g_a·ẑ``), pass B1 (``∂L/∂z`` into a full-resolution fp32 scratch, BatchNorm-parameter gradients)
and pass B2 (``∂L/∂x`` in gather form at low resolution, weight-gradient partials), reductions in ``_reduce.py``.
Supported: scale 2, odd k <= 5.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import _reduce
from ._utils import (INTERPRETER_CONFIG, accumulate_partial, activate, activate_grad, activation_code, autotune,
                     cdiv, empty_4d, empty_scratch, first_program_limit, is_channels_last, reduction_tile,
                     spatial_configs, tile_coords, welford_merge)

MAX_KERNEL_SIZE = 5
MODES = {"nearest": 0, "bilinear": 1}

_AUTOTUNE_KEY = ["C", "H", "W", "sxc", "K", "MODE"]


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _bilinear_u(xc, ii, jj, valid, H, W, sxh, sxw, OA: tl.constexpr, OB: tl.constexpr):
    """Bilinear ×2 upsampled value at ``(2i + OA, 2j + OB)`` (zero outside the upsampled image), fp32."""
    DA: tl.constexpr = OA // 2
    EA: tl.constexpr = OA % 2
    DB: tl.constexpr = OB // 2
    EB: tl.constexpr = OB % 2
    m = ii + DA
    n = jj + DB
    ok = valid & (m >= 0) & (m < H) & (n >= 0) & (n < W)
    # source rows (m − 1, m) with weights (¼, ¾) for even upsampled rows, (m, m + 1) with (¾, ¼) for odd ones
    r0 = tl.minimum(tl.maximum(m + (EA - 1), 0), H - 1) * sxh
    r1 = tl.minimum(tl.maximum(m + EA, 0), H - 1) * sxh
    c0 = tl.minimum(tl.maximum(n + (EB - 1), 0), W - 1) * sxw
    c1 = tl.minimum(tl.maximum(n + EB, 0), W - 1) * sxw
    CA0: tl.constexpr = 0.25 if EA == 0 else 0.75
    CB0: tl.constexpr = 0.25 if EB == 0 else 0.75
    ok2 = ok[:, None]  # the clamped addresses are inside the image, but not inside the batch for dead tiles
    v0 = (CB0 * tl.load(xc + (r0 + c0)[:, None], mask=ok2, other=0.0).to(tl.float32)
          + (1.0 - CB0) * tl.load(xc + (r0 + c1)[:, None], mask=ok2, other=0.0).to(tl.float32))
    v1 = (CB0 * tl.load(xc + (r1 + c0)[:, None], mask=ok2, other=0.0).to(tl.float32)
          + (1.0 - CB0) * tl.load(xc + (r1 + c1)[:, None], mask=ok2, other=0.0).to(tl.float32))
    return CA0 * v0 + (1.0 - CA0) * v1


@triton.jit
def _updw_z(xc, wc, ii, jj, valid, H, W, sxh, sxw, K: tl.constexpr, MODE: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Conv outputs of the four phases ``(z00, z01, z10, z11)`` of a low-resolution tile (fp32).

    ``xc`` / ``wc``: input and weight pointers already offset by the (clamped) channel of each column."""
    z00 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    z01 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    z10 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    z11 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    P: tl.constexpr = K // 2
    if MODE == 0:
        # polyphase: source offset r receives the taps a with (p + a − P) // 2 == r
        RLO: tl.constexpr = (0 - P) // 2
        NR: tl.constexpr = (K - P) // 2 - RLO + 1
        for ri in tl.static_range(NR):
            hr = ii + (RLO + ri)
            mr = valid & (hr >= 0) & (hr < H)
            roff = hr * sxh
            for si in tl.static_range(NR):
                wcol = jj + (RLO + si)
                m = mr & (wcol >= 0) & (wcol < W)
                v = tl.load(xc + (roff + wcol * sxw)[:, None], mask=m[:, None], other=0.0).to(tl.float32)
                for p in tl.static_range(2):
                    for q in tl.static_range(2):
                        kern = tl.zeros([BLOCK_C], tl.float32)
                        for a in tl.static_range(K):
                            if (p + a - P) // 2 == RLO + ri:
                                for b in tl.static_range(K):
                                    if (q + b - P) // 2 == RLO + si:
                                        kern += tl.load(wc + (a * K + b)).to(tl.float32)
                        if p == 0:
                            if q == 0:
                                z00 += v * kern[None, :]
                            else:
                                z01 += v * kern[None, :]
                        else:
                            if q == 0:
                                z10 += v * kern[None, :]
                            else:
                                z11 += v * kern[None, :]
    else:
        for a in tl.static_range(K):
            for b in tl.static_range(K):
                wt = tl.load(wc + (a * K + b)).to(tl.float32)[None, :]
                z00 += wt * _bilinear_u(xc, ii, jj, valid, H, W, sxh, sxw, a - P, b - P)
                z01 += wt * _bilinear_u(xc, ii, jj, valid, H, W, sxh, sxw, a - P, 1 + b - P)
                z10 += wt * _bilinear_u(xc, ii, jj, valid, H, W, sxh, sxw, 1 + a - P, b - P)
                z11 += wt * _bilinear_u(xc, ii, jj, valid, H, W, sxh, sxw, 1 + a - P, 1 + b - P)
    return z00, z01, z10, z11


@triton.jit
def _bn_params(gamma, beta, mean, var, c, cmask, eps):
    g = tl.load(gamma + c, mask=cmask, other=1.0).to(tl.float32)
    bt = tl.load(beta + c, mask=cmask, other=0.0).to(tl.float32)
    mu = tl.load(mean + c, mask=cmask, other=0.0).to(tl.float32)
    va = tl.load(var + c, mask=cmask, other=1.0).to(tl.float32)
    return g, bt, mu, 1.0 / tl.sqrt(va + eps)


@triton.jit
def _tile_setup(x, w, t, cb, N, C, H, W, sxn, sxc, K: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cl = tl.minimum(c, C - 1)  # clamped channel for loads; nothing is stored for channels >= C
    n, ii, jj, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    xc = x + n.to(tl.int64) * sxn + (cl * sxc)[None, :]
    wc = w + cl * (K * K)
    return c, cmask, n, ii, jj, valid, count, xc, wc


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _updw_stats_kernel(x, w, mean_part, m2_part, count_part, N, C, H, W, sxn, sxc, sxh, sxw,
                       K: tl.constexpr, MODE: tl.constexpr, SUB: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-chunk (count, mean, M2) over the four output phases of SUB low-resolution tiles."""
    chunk = tl.program_id(0)
    cnt = 0.0
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for s in range(SUB):
        c, cmask, n, ii, jj, valid, count, xc, wc = _tile_setup(x, w, chunk * SUB + s, tl.program_id(1), N, C, H,
                                                                W, sxn, sxc, K, BLOCK_H, BLOCK_W, BLOCK_C)
        z00, z01, z10, z11 = _updw_z(xc, wc, ii, jj, valid, H, W, sxh, sxw, K, MODE, BLOCK_H * BLOCK_W, BLOCK_C)
        v2 = valid[:, None]
        count4 = 4.0 * count
        mu = tl.sum(tl.where(v2, z00 + z01 + z10 + z11, 0.0), 0) / tl.maximum(count4, 1.0)
        d00 = tl.where(v2, z00 - mu[None, :], 0.0)
        d01 = tl.where(v2, z01 - mu[None, :], 0.0)
        d10 = tl.where(v2, z10 - mu[None, :], 0.0)
        d11 = tl.where(v2, z11 - mu[None, :], 0.0)
        tile_m2 = tl.sum(d00 * d00 + d01 * d01 + d10 * d10 + d11 * d11, 0)
        mean, m2 = welford_merge(cnt, mean, m2, count4, mu, tile_m2)
        cnt += count4
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row = chunk.to(tl.int64) * C + c
    tl.store(mean_part + row, mean, mask=c < C)
    tl.store(m2_part + row, m2, mask=c < C)
    tl.store(count_part + chunk, cnt)


@triton.jit
def _store_phase(yc, ii, jj, m2d, val, syh, syw, p: tl.constexpr, q: tl.constexpr):
    tl.store(yc + ((2 * ii + p) * syh + (2 * jj + q) * syw)[:, None], val.to(yc.dtype.element_ty), mask=m2d)


@autotune(configs=spatial_configs(), key=_AUTOTUNE_KEY, interpreter_config=INTERPRETER_CONFIG)
@triton.jit
def _updw_fwd_kernel(x, w, y, gamma, beta, mean, var, copy_mean, copy_var,
                     N, C, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw, eps,
                     K: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr, COPY_STATS: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    c, cmask, n, ii, jj, valid, count, xc, wc = _tile_setup(x, w, t, tl.program_id(1), N, C, H, W, sxn, sxc, K,
                                                            BLOCK_H, BLOCK_W, BLOCK_C)
    z00, z01, z10, z11 = _updw_z(xc, wc, ii, jj, valid, H, W, sxh, sxw, K, MODE, BLOCK_H * BLOCK_W, BLOCK_C)
    g, bt, mu, r = _bn_params(gamma, beta, mean, var, c, cmask, eps)
    scale = (g * r)[None, :]
    shift = (bt - mu * g * r)[None, :]
    yc = y + n.to(tl.int64) * syn + (c * syc)[None, :]
    m2d = valid[:, None] & cmask[None, :]
    _store_phase(yc, ii, jj, m2d, activate(z00 * scale + shift, ACT), syh, syw, 0, 0)
    _store_phase(yc, ii, jj, m2d, activate(z01 * scale + shift, ACT), syh, syw, 0, 1)
    _store_phase(yc, ii, jj, m2d, activate(z10 * scale + shift, ACT), syh, syw, 1, 0)
    _store_phase(yc, ii, jj, m2d, activate(z11 * scale + shift, ACT), syh, syw, 1, 1)
    if COPY_STATS:
        lim = first_program_limit(C, t)
        tl.store(copy_mean + c, tl.load(mean + c, mask=c < lim).to(tl.float32), mask=c < lim)
        tl.store(copy_var + c, tl.load(var + c, mask=c < lim).to(tl.float32), mask=c < lim)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _phase_grad(z, gc, ii, jj, m2d, g, bt, mu, r, sgh, sgw, p: tl.constexpr, q: tl.constexpr, ACT: tl.constexpr):
    """(ẑ, g_a) of one output phase."""
    zhat = (z - mu[None, :]) * r[None, :]
    gy = tl.load(gc + ((2 * ii + p) * sgh + (2 * jj + q) * sgw)[:, None], mask=m2d, other=0.0).to(tl.float32)
    ga = tl.where(m2d, activate_grad(zhat * g[None, :] + bt[None, :], gy, ACT), 0.0)
    return zhat, ga


@triton.jit
def _updw_bwd_stats_kernel(x, w, grad, gamma, beta, mean, var, part,
                           N, C, H, W, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, eps,
                           K: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr, SUB: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass A: partial rows [Σ g_a | Σ g_a·ẑ] over the four phases of a chunk of SUB tiles."""
    chunk = tl.program_id(0)
    s_ga = tl.zeros([BLOCK_C], tl.float32)
    s_gz = tl.zeros([BLOCK_C], tl.float32)
    for s in range(SUB):
        c, cmask, n, ii, jj, valid, count, xc, wc = _tile_setup(x, w, chunk * SUB + s, tl.program_id(1), N, C, H,
                                                                W, sxn, sxc, K, BLOCK_H, BLOCK_W, BLOCK_C)
        z00, z01, z10, z11 = _updw_z(xc, wc, ii, jj, valid, H, W, sxh, sxw, K, MODE, BLOCK_H * BLOCK_W, BLOCK_C)
        g, bt, mu, r = _bn_params(gamma, beta, mean, var, c, cmask, eps)
        gc = grad + n.to(tl.int64) * sgn + (c * sgc)[None, :]
        m2d = valid[:, None] & cmask[None, :]
        zh, ga = _phase_grad(z00, gc, ii, jj, m2d, g, bt, mu, r, sgh, sgw, 0, 0, ACT)
        acc_ga = ga
        acc_gz = ga * zh
        zh, ga = _phase_grad(z01, gc, ii, jj, m2d, g, bt, mu, r, sgh, sgw, 0, 1, ACT)
        acc_ga += ga
        acc_gz += ga * zh
        zh, ga = _phase_grad(z10, gc, ii, jj, m2d, g, bt, mu, r, sgh, sgw, 1, 0, ACT)
        acc_ga += ga
        acc_gz += ga * zh
        zh, ga = _phase_grad(z11, gc, ii, jj, m2d, g, bt, mu, r, sgh, sgw, 1, 1, ACT)
        acc_ga += ga
        acc_gz += ga * zh
        s_ga += tl.sum(acc_ga, 0)
        s_gz += tl.sum(acc_gz, 0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row = part + chunk.to(tl.int64) * (2 * C) + c
    tl.store(row, s_ga, mask=c < C)
    tl.store(row + C, s_gz, mask=c < C)


@triton.jit
def _phase_dz(z, gc, dzc, ii, jj, m2d, g, bt, mu, r, dbeta, dgamma, inv_count, sgh, sgw, sdh, sdw,
              p: tl.constexpr, q: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr):
    zh, ga = _phase_grad(z, gc, ii, jj, m2d, g, bt, mu, r, sgh, sgw, p, q, ACT)
    if TRAINING:
        d = (g * r)[None, :] * (ga - (dbeta * inv_count)[None, :] - zh * (dgamma * inv_count)[None, :])
    else:
        d = (g * r)[None, :] * ga
    tl.store(dzc + ((2 * ii + p) * sdh + (2 * jj + q) * sdw)[:, None], d, mask=m2d)


@autotune(configs=spatial_configs(max_per_thread=4), key=_AUTOTUNE_KEY + ["TRAINING"],
          interpreter_config=INTERPRETER_CONFIG)
@triton.jit
def _updw_bwd_dz_kernel(x, w, grad, gamma, beta, mean, var, red, dz, gbw, gbb,
                        N, C, H, W, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw, eps, inv_count,
                        K: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass B1: ∂L/∂z at full resolution into the fp32 scratch; BatchNorm-parameter gradients (first program)."""
    t = tl.program_id(0)
    c, cmask, n, ii, jj, valid, count, xc, wc = _tile_setup(x, w, t, tl.program_id(1), N, C, H, W, sxn, sxc, K,
                                                            BLOCK_H, BLOCK_W, BLOCK_C)
    z00, z01, z10, z11 = _updw_z(xc, wc, ii, jj, valid, H, W, sxh, sxw, K, MODE, BLOCK_H * BLOCK_W, BLOCK_C)
    g, bt, mu, r = _bn_params(gamma, beta, mean, var, c, cmask, eps)
    dbeta = tl.load(red + c, mask=cmask, other=0.0)
    dgamma = tl.load(red + C + c, mask=cmask, other=0.0)
    gc = grad + n.to(tl.int64) * sgn + (c * sgc)[None, :]
    dzc = dz + n.to(tl.int64) * sdn + (c * sdc)[None, :]
    m2d = valid[:, None] & cmask[None, :]
    _phase_dz(z00, gc, dzc, ii, jj, m2d, g, bt, mu, r, dbeta, dgamma, inv_count, sgh, sgw, sdh, sdw, 0, 0, ACT,
              TRAINING)
    _phase_dz(z01, gc, dzc, ii, jj, m2d, g, bt, mu, r, dbeta, dgamma, inv_count, sgh, sgw, sdh, sdw, 0, 1, ACT,
              TRAINING)
    _phase_dz(z10, gc, dzc, ii, jj, m2d, g, bt, mu, r, dbeta, dgamma, inv_count, sgh, sgw, sdh, sdw, 1, 0, ACT,
              TRAINING)
    _phase_dz(z11, gc, dzc, ii, jj, m2d, g, bt, mu, r, dbeta, dgamma, inv_count, sgh, sgw, sdh, sdw, 1, 1, ACT,
              TRAINING)
    lim = first_program_limit(C, t)
    tl.store(gbb + c, dbeta.to(gbb.dtype.element_ty), mask=c < lim)
    tl.store(gbw + c, dgamma.to(gbw.dtype.element_ty), mask=c < lim)


@triton.jit
def _up_value(xc, ii, jj, valid, H, W, sxh, sxw, OA: tl.constexpr, OB: tl.constexpr, MODE: tl.constexpr):
    """Upsampled value at ``(2i + OA, 2j + OB)`` (zero padded), for the weight gradient."""
    if MODE == 0:
        m = ii + OA // 2
        n = jj + OB // 2
        ok = valid & (m >= 0) & (m < H) & (n >= 0) & (n < W)
        out = tl.load(xc + (m * sxh + n * sxw)[:, None], mask=ok[:, None], other=0.0).to(tl.float32)
    else:
        out = _bilinear_u(xc, ii, jj, valid, H, W, sxh, sxw, OA, OB)
    return out


@triton.jit
def _load_dz(dzc, y, x, valid, H2, W2, sdh, sdw):
    """``dz`` at full-resolution rows ``y`` and columns ``x`` of the tile's valid pixels (zero elsewhere)."""
    ok = valid & (y >= 0) & (y < H2) & (x >= 0) & (x < W2)
    return tl.load(dzc + (y * sdh + x * sdw)[:, None], mask=ok[:, None], other=0.0)


@triton.jit
def _updw_bwd_dx_kernel(x, w, dz, gx, wpart, N, C, H, W, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, son, soc, soh,
                        sow, K: tl.constexpr, MODE: tl.constexpr, SUB: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass B2: ∂L/∂x at low resolution and the weight-gradient partials ``[C·K²]`` of a chunk of SUB tiles."""
    chunk = tl.program_id(0)
    for s in range(SUB):
        t = chunk * SUB + s
        _updw_dx_tile(x, w, dz, gx, wpart, t, t == chunk * SUB, chunk, N, C, H, W, sxn, sxc, sxh, sxw, sdn, sdc,
                      sdh, sdw, son, soc, soh, sow, K, MODE, BLOCK_H, BLOCK_W, BLOCK_C)
        tl.debug_barrier()  # the next tile's read-modify-write of the partial row sees these stores


@triton.jit
def _updw_dx_tile(x, w, dz, gx, wpart, t, first, chunk, N, C, H, W, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, son,
                  soc, soh, sow, K: tl.constexpr, MODE: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    c, cmask, n, ii, jj, valid, count, xc, wc = _tile_setup(x, w, t, tl.program_id(1), N, C, H, W, sxn, sxc, K,
                                                            BLOCK_H, BLOCK_W, BLOCK_C)
    cl = tl.minimum(c, C - 1)
    dzc = dz + n.to(tl.int64) * sdn + (cl * sdc)[None, :]
    H2 = 2 * H
    W2 = 2 * W
    P: tl.constexpr = K // 2
    # ∂L/∂z of the four phases at this tile's own pixels (0 at invalid pixels)
    d00 = _load_dz(dzc, 2 * ii, 2 * jj, valid, H2, W2, sdh, sdw)
    d01 = _load_dz(dzc, 2 * ii, 2 * jj + 1, valid, H2, W2, sdh, sdw)
    d10 = _load_dz(dzc, 2 * ii + 1, 2 * jj, valid, H2, W2, sdh, sdw)
    d11 = _load_dz(dzc, 2 * ii + 1, 2 * jj + 1, valid, H2, W2, sdh, sdw)

    # weight gradient: ∂L/∂w[a, b] = Σ_{phases, pixels} dz_pq · U(2i + p + a − P, 2j + q + b − P)
    prow = wpart + chunk.to(tl.int64) * (C * K * K) + c * (K * K)
    for a in tl.static_range(K):
        for b in tl.static_range(K):
            acc = d00 * _up_value(xc, ii, jj, valid, H, W, sxh, sxw, a - P, b - P, MODE)
            acc += d01 * _up_value(xc, ii, jj, valid, H, W, sxh, sxw, a - P, 1 + b - P, MODE)
            acc += d10 * _up_value(xc, ii, jj, valid, H, W, sxh, sxw, 1 + a - P, b - P, MODE)
            acc += d11 * _up_value(xc, ii, jj, valid, H, W, sxh, sxw, 1 + a - P, 1 + b - P, MODE)
            accumulate_partial(prow + (a * K + b), tl.sum(acc, 0), c, C, first)

    dx = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], tl.float32)
    if MODE == 0:
        # transpose of the polyphase stencils: x(m) feeds phase pq of pixel m − r with weight K_pq[r][s]
        RLO: tl.constexpr = (0 - P) // 2
        NR: tl.constexpr = (K - P) // 2 - RLO + 1
        for ri in tl.static_range(NR):
            for si in tl.static_range(NR):
                for p in tl.static_range(2):
                    for q in tl.static_range(2):
                        kern = tl.zeros([BLOCK_C], tl.float32)
                        for a in tl.static_range(K):
                            if (p + a - P) // 2 == RLO + ri:
                                for b in tl.static_range(K):
                                    if (q + b - P) // 2 == RLO + si:
                                        kern += tl.load(wc + (a * K + b)).to(tl.float32)
                        d = _load_dz(dzc, 2 * (ii - (RLO + ri)) + p, 2 * (jj - (RLO + si)) + q, valid, H2, W2,
                                     sdh, sdw)
                        dx += d * kern[None, :]
    else:
        # adjoint of bilinear ×2 (edge-clamped): x[m] feeds upsampled rows 2m−1 (¼, if m ≥ 1), 2m (¾, +¼ if
        # m = 0), 2m+1 (¾, +¼ if m = h−1), 2m+2 (¼, if m ≤ h−2); ∂L/∂U(u, v) = Σ_ab w[a, b]·dz(u − a + P, v − b + P)
        for du in tl.static_range(4):
            if du == 0:
                cv = tl.where(ii >= 1, 0.25, 0.0)
            elif du == 1:
                cv = tl.where(ii == 0, 1.0, 0.75)
            elif du == 2:
                cv = tl.where(ii == H - 1, 1.0, 0.75)
            else:
                cv = tl.where(ii <= H - 2, 0.25, 0.0)
            for dv in tl.static_range(4):
                if dv == 0:
                    ch = tl.where(jj >= 1, 0.25, 0.0)
                elif dv == 1:
                    ch = tl.where(jj == 0, 1.0, 0.75)
                elif dv == 2:
                    ch = tl.where(jj == W - 1, 1.0, 0.75)
                else:
                    ch = tl.where(jj <= W - 2, 0.25, 0.0)
                du_val = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], tl.float32)
                for a in tl.static_range(K):
                    for b in tl.static_range(K):
                        d = _load_dz(dzc, 2 * ii + (du - 1 - a + P), 2 * jj + (dv - 1 - b + P), valid, H2, W2,
                                     sdh, sdw)
                        du_val += d * tl.load(wc + (a * K + b)).to(tl.float32)[None, :]
                dx += (cv * ch)[:, None] * du_val
    m2d = valid[:, None] & cmask[None, :]
    ob = gx + n.to(tl.int64) * son
    tl.store(ob + (ii * soh + jj * sow)[:, None] + (c * soc)[None, :], dx.to(gx.dtype.element_ty), mask=m2d)


# --------------------------------------------------------------------------------------------------
# launchers (the kernel-op schemas of the descriptor in emcad_kernels/ops)
# --------------------------------------------------------------------------------------------------
def _check(weight, mode, scale):
    k = weight.shape[-1]
    if scale != 2:
        raise ValueError("the triton upsample_dwconv kernel supports scale 2 only")
    if mode not in MODES:
        raise ValueError(f"the triton upsample_dwconv kernel supports modes {tuple(MODES)}, got {mode!r}")
    if k % 2 == 0 or k > MAX_KERNEL_SIZE:
        raise ValueError(f"the triton upsample_dwconv kernel supports odd kernel sizes <= {MAX_KERNEL_SIZE}")
    return k, MODES[mode]


def _grid(n, h, w, c):
    return lambda meta: (n * cdiv(h, meta["BLOCK_H"]) * cdiv(w, meta["BLOCK_W"]), cdiv(c, meta["BLOCK_C"]))


def updw_forward(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale):
    if x.numel() == 0:  # nothing to launch (and no program would write the statistics)
        return reference.updw_forward(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale)
    k, mode_code = _check(weight, mode, scale)
    n, c, h, w = x.shape
    dev = x.device
    wt = weight.contiguous()
    y = empty_4d((n, c, 2 * h, 2 * w), x.dtype, dev, is_channels_last(x))
    save_mean = torch.empty((c,), dtype=torch.float32, device=dev)
    save_var = torch.empty((c,), dtype=torch.float32, device=dev)
    if training:
        tile = reduction_tile(h, w, c)
        t = tile.num_chunks(n, h, w)
        mean_part = torch.empty((t, c), dtype=torch.float32, device=dev)
        m2_part = torch.empty_like(mean_part)
        count = torch.empty((t,), dtype=torch.float32, device=dev)
        _updw_stats_kernel[tile.chunk_grid(n, h, w, c)](x, wt, mean_part, m2_part, count, n, c, h, w, *x.stride(),
                                                       K=k, MODE=mode_code, **tile.meta(sub=True))
        _reduce.merge_stats(mean_part, m2_part, count, [(save_mean, save_var)])
        stat_mean, stat_var = save_mean, save_var
    else:
        stat_mean, stat_var = mean.contiguous(), var.contiguous()
    _updw_fwd_kernel[_grid(n, h, w, c)](x, wt, y, bn_weight.contiguous(), bn_bias.contiguous(), stat_mean, stat_var,
                                        save_mean, save_var, n, c, h, w, *x.stride(), *y.stride(), eps, K=k,
                                        MODE=mode_code, ACT=activation_code(activation), COPY_STATS=not training)
    return y, save_mean, save_var


def updw_backward(grad, x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps, mode, activation,
                  scale):
    if x.numel() == 0:
        return reference.updw_backward(grad, x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps, mode,
                                       activation, scale)
    k, mode_code = _check(weight, mode, scale)
    n, c, h, w = x.shape
    dev = x.device
    wt = weight.contiguous()
    act = activation_code(activation)
    gamma, beta = bn_weight.contiguous(), bn_bias.contiguous()
    mean, var = save_mean.contiguous(), save_var.contiguous()
    tile = reduction_tile(h, w, c)
    t = tile.num_chunks(n, h, w)

    part = torch.empty((t, 2 * c), dtype=torch.float32, device=dev)
    _updw_bwd_stats_kernel[tile.chunk_grid(n, h, w, c)](x, wt, grad, gamma, beta, mean, var, part, n, c, h, w,
                                                         *x.stride(), *grad.stride(), eps, K=k, MODE=mode_code,
                                                         ACT=act, **tile.meta(sub=True))
    red = torch.empty((2, c), dtype=torch.float32, device=dev)
    _reduce.sum_partials(part, [red])

    dz = empty_scratch(1, n, c, 2 * h, 2 * w, is_channels_last(x), dev)[0]
    gbw = torch.empty(bn_weight.shape, dtype=bn_weight.dtype, device=dev)
    gbb = torch.empty(bn_bias.shape, dtype=bn_bias.dtype, device=dev)
    _updw_bwd_dz_kernel[_grid(n, h, w, c)](x, wt, grad, gamma, beta, mean, var, red, dz, gbw, gbb, n, c, h, w,
                                           *x.stride(), *grad.stride(), *dz.stride(), eps, 1.0 / (4 * n * h * w),
                                           K=k, MODE=mode_code, ACT=act, TRAINING=bool(training))

    gx = empty_4d(x.shape, x.dtype, dev, is_channels_last(x))
    wpart = torch.empty((t, c * k * k), dtype=torch.float32, device=dev)
    _updw_bwd_dx_kernel[tile.chunk_grid(n, h, w, c)](x, wt, dz, gx, wpart, n, c, h, w, *x.stride(), *dz.stride(),
                                                      *gx.stride(), K=k, MODE=mode_code, **tile.meta(sub=True))
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=dev)
    _reduce.sum_partials(wpart, [gw])
    return gx, gw, gbw, gbb
