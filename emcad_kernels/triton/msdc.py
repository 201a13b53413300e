"""Fused multi-scale depthwise convolution (MSDC of EMCAD's MSCB): Triton kernels and launchers.

Semantics (``reference.msdc_forward``): for each branch b with a ``k_b × k_b`` depthwise kernel (padding
``k_b // 2``, stride 1) ``a_b = act(BN_b(dwconv_b(x)))``; the branches are summed (or concatenated) and the
result is channel-shuffled. Supported here: 1–3 branches, odd ``k_b <= 7``, stride 1.

Kernels (a program = a spatial tile ``BLOCK_H × BLOCK_W`` times ``BLOCK_C`` channels; all branch windows come
from **one** load of the ``KMAX × KMAX`` neighbourhood: every loaded tap feeds each branch whose window holds it).
The kernels that produce sums over (N, H, W) loop over a *chunk* of ``SUB`` consecutive tiles and write one
partial row per chunk; their tiles are pinned (``_utils.reduction_tile``), never autotuned, so the reduction order
is fixed. The others are purely elementwise and autotuned.

forward
    ``_msdc_stats_kernel``  training only: per-chunk (count, mean, M2) of every branch's conv output, nothing else
                            written; merged by ``_reduce.merge_stats`` into the batch statistics (returned, and used
                            by the next kernel)
    ``_msdc_fwd_kernel``    recompute, normalise, activate, sum/concat, shuffle **on store** (autotuned)
backward (recomputes from ``x`` and the saved statistics; nothing E-sized was saved by the forward)
    ``_msdc_bwd_stats_kernel``  pass A: per-chunk ``Σ g_a`` and ``Σ g_a·ẑ`` (BatchNorm-parameter gradients)
    ``_msdc_bwd_dz_kernel``     pass B1: ``∂L/∂z_b`` into an fp32 scratch buffer (autotuned), and the final
                                BatchNorm-parameter gradients
    ``_msdc_bwd_dx_kernel``     pass B2: ``∂L/∂x`` (gather form) and per-chunk weight-gradient partials, reduced by
                                ``_reduce.sum_partials`` straight into the weight-gradient outputs

``∂L/∂z_b`` has to be materialised because ``∂L/∂x`` at a pixel needs it in a ``k × k`` neighbourhood, and
recomputing it there would need a ``(2k−1)²`` window of ``x`` per output.

Layouts: everything is addressed through strides, so NCHW, channels_last and other strided inputs work; with
channels_last the channel block is contiguous (vector loads along C: the fast path). Outputs take the input's
memory format (``reference.output_memory_format``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import _reduce
from ._utils import (INTERPRETER_CONFIG, TRITON_VERSION, accumulate_partial, activate, activate_grad,
                     activation_code, autotune, cdiv, empty_4d, empty_scratch, first_program_limit, is_channels_last,
                     reduction_tile, spatial_configs, tile_coords, tile_mean_m2, welford_merge)

MAX_BRANCHES = 3
MAX_KERNEL_SIZE = 7

_AUTOTUNE_KEY = ["C", "H", "W", "sxc", "NB", "KMAX"]


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _msdc_z(xb, hh, ww, valid, c, C, H, W, sxc, sxh, sxw, W0, W1, W2,
            NB: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, KMAX: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The conv outputs of all branches on a tile, from one pass over the KMAX×KMAX neighbourhood (fp32).

    Tap (i, j) of the union window is inside branch b's window iff ``R − K_b//2 <= i, j <= R + K_b//2``
    (compile-time conditions). Per-tap work is written inline: under the interpreter every device-function
    call has a fixed cost."""
    z0 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    z1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    z2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    R: tl.constexpr = KMAX // 2
    LO0: tl.constexpr = R - K0 // 2
    LO1: tl.constexpr = R - K1 // 2
    LO2: tl.constexpr = R - K2 // 2
    # channels past C are clamped for loading (never stored), so only the pixel masks remain per tap
    cl = tl.minimum(c, C - 1)
    xc = xb + (cl * sxc)[None, :]
    w0 = W0 + cl * (K0 * K0)
    w1 = W1 + cl * (K1 * K1)
    w2 = W2 + cl * (K2 * K2)
    for i in tl.static_range(KMAX):
        hi = hh + (i - R)
        mh = valid & (hi >= 0) & (hi < H)
        rowoff = hi * sxh
        for j in tl.static_range(KMAX):
            wi = ww + (j - R)
            m = mh & (wi >= 0) & (wi < W)
            v = tl.load(xc + (rowoff + wi * sxw)[:, None], mask=m[:, None], other=0.0).to(tl.float32)
            if (i >= LO0) & (i < LO0 + K0) & (j >= LO0) & (j < LO0 + K0):
                z0 += v * tl.load(w0 + ((i - LO0) * K0 + (j - LO0))).to(tl.float32)[None, :]
            if NB > 1:
                if (i >= LO1) & (i < LO1 + K1) & (j >= LO1) & (j < LO1 + K1):
                    z1 += v * tl.load(w1 + ((i - LO1) * K1 + (j - LO1))).to(tl.float32)[None, :]
            if NB > 2:
                if (i >= LO2) & (i < LO2 + K2) & (j >= LO2) & (j < LO2 + K2):
                    z2 += v * tl.load(w2 + ((i - LO2) * K2 + (j - LO2))).to(tl.float32)[None, :]
    return z0, z1, z2


@triton.jit
def _bn_params(gamma, beta, mean, var, b, c, cmask, C, eps):
    """Per-channel (γ, β, μ, 1/sqrt(σ²+ε)) of branch b, in fp32."""
    g = tl.load(gamma + b * C + c, mask=cmask, other=1.0).to(tl.float32)
    bt = tl.load(beta + b * C + c, mask=cmask, other=0.0).to(tl.float32)
    mu = tl.load(mean + b * C + c, mask=cmask, other=0.0).to(tl.float32)
    va = tl.load(var + b * C + c, mask=cmask, other=1.0).to(tl.float32)
    return g, bt, mu, 1.0 / tl.sqrt(va + eps)


@triton.jit
def _out_channel(cc, shuffle_n, shuffle_g, SHUFFLE: tl.constexpr):
    """Where combined channel ``cc`` is stored: ShuffleNet shuffle with g groups of n channels is
    ``src(o) = (o mod g)·n + o div g``, so ``dst(cc) = (cc mod n)·g + cc div n`` (EMCAD.md §2.2)."""
    if SHUFFLE:
        out = (cc % shuffle_n) * shuffle_g + cc // shuffle_n
    else:
        out = cc
    return out


@triton.jit
def _normalise(z, gamma, beta, mean, var, b, c, cmask, C, eps):
    """(ẑ, a) = ((z − μ)·r, γ·ẑ + β) for branch b."""
    g, bt, mu, r = _bn_params(gamma, beta, mean, var, b, c, cmask, C, eps)
    zhat = (z - mu[None, :]) * r[None, :]
    return zhat, zhat * g[None, :] + bt[None, :]


@triton.jit
def _store_branch(yb, pix, m2d, val, b, c, C, syc, shuffle_n, shuffle_g, SHUFFLE: tl.constexpr):
    oc = _out_channel(b * C + c, shuffle_n, shuffle_g, SHUFFLE)
    tl.store(yb + pix + (oc * syc)[None, :], val.to(yb.dtype.element_ty), mask=m2d)


@triton.jit
def _load_grad(gb, pix, m2d, b, c, C, sgc, shuffle_n, shuffle_g, SHUFFLE: tl.constexpr, CONCAT: tl.constexpr):
    """Upstream gradient of branch b's activation (the shuffle/concat index map, read side)."""
    if CONCAT:
        cc = b * C + c
    else:
        cc = c
    oc = _out_channel(cc, shuffle_n, shuffle_g, SHUFFLE)
    return tl.load(gb + pix + (oc * sgc)[None, :], mask=m2d, other=0.0).to(tl.float32)


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _msdc_stats_kernel(x, W0, W1, W2, mean_part, m2_part, count_part,
                       N, C, H, W, sxn, sxc, sxh, sxw,
                       NB: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, KMAX: tl.constexpr,
                       SUB: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Training statistics pass: (count, mean, M2) of every branch's conv output over a chunk of SUB tiles (tile
    statistics merged in registers, in order); partial rows ``[T_chunks, NB·C]``. Nothing else is written."""
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cnt = 0.0
    mean0 = tl.zeros([BLOCK_C], tl.float32)
    m2_0 = tl.zeros([BLOCK_C], tl.float32)
    mean1 = tl.zeros([BLOCK_C], tl.float32)
    m2_1 = tl.zeros([BLOCK_C], tl.float32)
    mean2 = tl.zeros([BLOCK_C], tl.float32)
    m2_2 = tl.zeros([BLOCK_C], tl.float32)
    for s in range(SUB):
        n, hh, ww, valid, count = tile_coords(chunk * SUB + s, N, H, W, BLOCK_H, BLOCK_W)
        z0, z1, z2 = _msdc_z(x + n.to(tl.int64) * sxn, hh, ww, valid, c, C, H, W, sxc, sxh, sxw, W0, W1, W2, NB,
                             K0, K1, K2, KMAX, BLOCK_H * BLOCK_W, BLOCK_C)
        mu, m2 = tile_mean_m2(z0, valid[:, None], count)
        mean0, m2_0 = welford_merge(cnt, mean0, m2_0, count, mu, m2)
        if NB > 1:
            mu, m2 = tile_mean_m2(z1, valid[:, None], count)
            mean1, m2_1 = welford_merge(cnt, mean1, m2_1, count, mu, m2)
        if NB > 2:
            mu, m2 = tile_mean_m2(z2, valid[:, None], count)
            mean2, m2_2 = welford_merge(cnt, mean2, m2_2, count, mu, m2)
        cnt += count
    row = chunk.to(tl.int64) * (NB * C) + c
    tl.store(mean_part + row, mean0, mask=cmask)
    tl.store(m2_part + row, m2_0, mask=cmask)
    if NB > 1:
        tl.store(mean_part + row + C, mean1, mask=cmask)
        tl.store(m2_part + row + C, m2_1, mask=cmask)
    if NB > 2:
        tl.store(mean_part + row + 2 * C, mean2, mask=cmask)
        tl.store(m2_part + row + 2 * C, m2_2, mask=cmask)
    tl.store(count_part + chunk, cnt)


# Triton < 3.7 needs about 45 % more registers for this stencil on sm_90 (3 branches up to 5×5: 241 against 166 at
# 4 values per thread) and spills at 8, so it gets the 4-values-per-thread tiles only
@autotune(configs=spatial_configs(max_per_thread=8 if TRITON_VERSION >= (3, 7) else 4), key=_AUTOTUNE_KEY,
          interpreter_config=INTERPRETER_CONFIG)
@triton.jit
def _msdc_fwd_kernel(x, y, W0, W1, W2, gamma, beta, mean, var, copy_mean, copy_var,
                     N, C, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw, eps, shuffle_n, shuffle_g,
                     NB: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, KMAX: tl.constexpr,
                     ACT: tl.constexpr, CONCAT: tl.constexpr, SHUFFLE: tl.constexpr, COPY_STATS: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    xb = x + n.to(tl.int64) * sxn
    z0, z1, z2 = _msdc_z(xb, hh, ww, valid, c, C, H, W, sxc, sxh, sxw, W0, W1, W2, NB, K0, K1, K2, KMAX,
                         BLOCK_H * BLOCK_W, BLOCK_C)
    yb = y + n.to(tl.int64) * syn
    pix = (hh * syh + ww * syw)[:, None]
    m2d = valid[:, None] & cmask[None, :]

    _, a = _normalise(z0, gamma, beta, mean, var, 0, c, cmask, C, eps)
    out = activate(a, ACT)
    if CONCAT:
        _store_branch(yb, pix, m2d, out, 0, c, C, syc, shuffle_n, shuffle_g, SHUFFLE)
    if NB > 1:
        _, a = _normalise(z1, gamma, beta, mean, var, 1, c, cmask, C, eps)
        if CONCAT:
            _store_branch(yb, pix, m2d, activate(a, ACT), 1, c, C, syc, shuffle_n, shuffle_g, SHUFFLE)
        else:
            out += activate(a, ACT)
    if NB > 2:
        _, a = _normalise(z2, gamma, beta, mean, var, 2, c, cmask, C, eps)
        if CONCAT:
            _store_branch(yb, pix, m2d, activate(a, ACT), 2, c, C, syc, shuffle_n, shuffle_g, SHUFFLE)
        else:
            out += activate(a, ACT)
    if not CONCAT:
        _store_branch(yb, pix, m2d, out, 0, c, C, syc, shuffle_n, shuffle_g, SHUFFLE)

    if COPY_STATS:  # eval: return copies of the running statistics used (one program along the tile axis)
        lim = first_program_limit(C, t)
        for b in tl.static_range(NB):
            tl.store(copy_mean + b * C + c, tl.load(mean + b * C + c, mask=c < lim).to(tl.float32), mask=c < lim)
            tl.store(copy_var + b * C + c, tl.load(var + b * C + c, mask=c < lim).to(tl.float32), mask=c < lim)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _branch_grad(z, gb, pix, m2d, gamma, beta, mean, var, b, c, cmask, C, eps, sgc, shuffle_n, shuffle_g,
                 ACT: tl.constexpr, SHUFFLE: tl.constexpr, CONCAT: tl.constexpr):
    """(ẑ, g_a) of branch b: normalised conv output and the gradient w.r.t. the BatchNorm output."""
    zhat, a = _normalise(z, gamma, beta, mean, var, b, c, cmask, C, eps)
    gy = _load_grad(gb, pix, m2d, b, c, C, sgc, shuffle_n, shuffle_g, SHUFFLE, CONCAT)
    ga = tl.where(m2d, activate_grad(a, gy, ACT), 0.0)
    return zhat, ga


@triton.jit
def _msdc_bwd_stats_kernel(x, grad, W0, W1, W2, gamma, beta, mean, var, part,
                           N, C, H, W, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, eps, shuffle_n, shuffle_g,
                           NB: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                           KMAX: tl.constexpr, ACT: tl.constexpr, CONCAT: tl.constexpr, SHUFFLE: tl.constexpr,
                           SUB: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass A: partial rows [Σ g_a (branch 0..NB-1) | Σ g_a·ẑ (branch 0..NB-1)] of a chunk of SUB tiles."""
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sg0 = tl.zeros([BLOCK_C], tl.float32)
    sz0 = tl.zeros([BLOCK_C], tl.float32)
    sg1 = tl.zeros([BLOCK_C], tl.float32)
    sz1 = tl.zeros([BLOCK_C], tl.float32)
    sg2 = tl.zeros([BLOCK_C], tl.float32)
    sz2 = tl.zeros([BLOCK_C], tl.float32)
    for s in range(SUB):
        n, hh, ww, valid, count = tile_coords(chunk * SUB + s, N, H, W, BLOCK_H, BLOCK_W)
        gb = grad + n.to(tl.int64) * sgn
        z0, z1, z2 = _msdc_z(x + n.to(tl.int64) * sxn, hh, ww, valid, c, C, H, W, sxc, sxh, sxw, W0, W1, W2, NB,
                             K0, K1, K2, KMAX, BLOCK_H * BLOCK_W, BLOCK_C)
        pix = (hh * sgh + ww * sgw)[:, None]
        m2d = valid[:, None] & cmask[None, :]
        zhat, ga = _branch_grad(z0, gb, pix, m2d, gamma, beta, mean, var, 0, c, cmask, C, eps, sgc, shuffle_n,
                                shuffle_g, ACT, SHUFFLE, CONCAT)
        sg0 += tl.sum(ga, 0)
        sz0 += tl.sum(ga * zhat, 0)
        if NB > 1:
            zhat, ga = _branch_grad(z1, gb, pix, m2d, gamma, beta, mean, var, 1, c, cmask, C, eps, sgc, shuffle_n,
                                    shuffle_g, ACT, SHUFFLE, CONCAT)
            sg1 += tl.sum(ga, 0)
            sz1 += tl.sum(ga * zhat, 0)
        if NB > 2:
            zhat, ga = _branch_grad(z2, gb, pix, m2d, gamma, beta, mean, var, 2, c, cmask, C, eps, sgc, shuffle_n,
                                    shuffle_g, ACT, SHUFFLE, CONCAT)
            sg2 += tl.sum(ga, 0)
            sz2 += tl.sum(ga * zhat, 0)
    row = part + chunk.to(tl.int64) * (2 * NB * C) + c
    tl.store(row, sg0, mask=cmask)
    tl.store(row + NB * C, sz0, mask=cmask)
    if NB > 1:
        tl.store(row + C, sg1, mask=cmask)
        tl.store(row + NB * C + C, sz1, mask=cmask)
    if NB > 2:
        tl.store(row + 2 * C, sg2, mask=cmask)
        tl.store(row + NB * C + 2 * C, sz2, mask=cmask)


@triton.jit
def _branch_dz(z, gb, pix, m2d, gamma, beta, mean, var, red, b, c, cmask, C, eps, inv_count, sgc, shuffle_n,
               shuffle_g, NB: tl.constexpr, ACT: tl.constexpr, SHUFFLE: tl.constexpr, CONCAT: tl.constexpr,
               TRAINING: tl.constexpr):
    """∂L/∂z_b = γ·r·(g_a − Σg_a/M − ẑ·Σ(g_a·ẑ)/M) with batch statistics, γ·r·g_a with fixed ones.
    ``red`` holds the reduced pass-A sums ``[2, NB, C]`` (Σg_a, then Σg_a·ẑ)."""
    zhat, ga = _branch_grad(z, gb, pix, m2d, gamma, beta, mean, var, b, c, cmask, C, eps, sgc, shuffle_n,
                            shuffle_g, ACT, SHUFFLE, CONCAT)
    g, _, _, r = _bn_params(gamma, beta, mean, var, b, c, cmask, C, eps)
    if TRAINING:
        dbeta = tl.load(red + b * C + c, mask=cmask, other=0.0)
        dgamma = tl.load(red + NB * C + b * C + c, mask=cmask, other=0.0)
        dz = (g * r)[None, :] * (ga - (dbeta * inv_count)[None, :] - zhat * (dgamma * inv_count)[None, :])
    else:
        dz = (g * r)[None, :] * ga
    return tl.where(m2d, dz, 0.0)


@autotune(configs=spatial_configs(max_per_thread=4), key=_AUTOTUNE_KEY + ["TRAINING"],
          interpreter_config=INTERPRETER_CONFIG)
@triton.jit
def _msdc_bwd_dz_kernel(x, grad, W0, W1, W2, gamma, beta, mean, var, red, dz, gbw, gbb,
                        N, C, H, W, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdb, sdn, sdc, sdh, sdw,
                        eps, inv_count, shuffle_n, shuffle_g,
                        NB: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                        KMAX: tl.constexpr, ACT: tl.constexpr, CONCAT: tl.constexpr, SHUFFLE: tl.constexpr,
                        TRAINING: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass B1: ∂L/∂z_b of every branch into the fp32 scratch ``dz [NB, N, C, H, W]``; the first program along
    the tile axis also writes the BatchNorm-parameter gradients (cast to their dtype)."""
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    xb = x + n.to(tl.int64) * sxn
    gb = grad + n.to(tl.int64) * sgn
    z0, z1, z2 = _msdc_z(xb, hh, ww, valid, c, C, H, W, sxc, sxh, sxw, W0, W1, W2, NB, K0, K1, K2, KMAX,
                         BLOCK_H * BLOCK_W, BLOCK_C)
    pix = (hh * sgh + ww * sgw)[:, None]
    m2d = valid[:, None] & cmask[None, :]
    dzb = dz + n.to(tl.int64) * sdn + (hh * sdh + ww * sdw)[:, None] + (c * sdc)[None, :]
    d = _branch_dz(z0, gb, pix, m2d, gamma, beta, mean, var, red, 0, c, cmask, C, eps, inv_count, sgc, shuffle_n,
                   shuffle_g, NB, ACT, SHUFFLE, CONCAT, TRAINING)
    tl.store(dzb, d, mask=m2d)
    if NB > 1:
        d = _branch_dz(z1, gb, pix, m2d, gamma, beta, mean, var, red, 1, c, cmask, C, eps, inv_count, sgc,
                       shuffle_n, shuffle_g, NB, ACT, SHUFFLE, CONCAT, TRAINING)
        tl.store(dzb + sdb, d, mask=m2d)
    if NB > 2:
        d = _branch_dz(z2, gb, pix, m2d, gamma, beta, mean, var, red, 2, c, cmask, C, eps, inv_count, sgc,
                       shuffle_n, shuffle_g, NB, ACT, SHUFFLE, CONCAT, TRAINING)
        tl.store(dzb + 2 * sdb, d, mask=m2d)

    lim = first_program_limit(C, t)
    for b in tl.static_range(NB):
        dbeta = tl.load(red + b * C + c, mask=c < lim, other=0.0)
        dgamma = tl.load(red + NB * C + b * C + c, mask=c < lim, other=0.0)
        tl.store(gbb + b * C + c, dbeta.to(gbb.dtype.element_ty), mask=c < lim)
        tl.store(gbw + b * C + c, dgamma.to(gbw.dtype.element_ty), mask=c < lim)


@triton.jit
def _msdc_bwd_dx_kernel(x, dz, gx, W0, W1, W2, wpart,
                        N, C, H, W, RW, sxn, sxc, sxh, sxw, sdb, sdn, sdc, sdh, sdw, son, soc, soh, sow,
                        NB: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                        KMAX: tl.constexpr, SUB: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass B2: ∂L/∂x and the weight-gradient partials of a chunk of SUB tiles.

    Gather form: ``z_b(q) = Σ_t w_b[t]·x(q + o_t)``, so ``∂L/∂x(p) = Σ_b Σ_t w_b[t]·dz_b(p − o_t)`` and
    ``∂L/∂w_b[t] = Σ_q dz_b(q)·x(q + o_t)``. Partial row layout: ``[branch 0: C·K0² | branch 1: C·K1² | …]``,
    each block in the weight's own contiguous layout, so the reduction writes the gradients directly. The
    35 per-tap sums of a tile are added to the program's own row (``accumulate_partial``)."""
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cl = tl.minimum(c, C - 1)  # clamped for loads; partials of channels >= C are not stored
    prow0 = wpart + chunk.to(tl.int64) * RW + c * (K0 * K0)
    prow1 = wpart + chunk.to(tl.int64) * RW + C * (K0 * K0) + c * (K1 * K1)
    prow2 = wpart + chunk.to(tl.int64) * RW + C * (K0 * K0 + K1 * K1) + c * (K2 * K2)
    w0 = W0 + cl * (K0 * K0)
    w1 = W1 + cl * (K1 * K1)
    w2 = W2 + cl * (K2 * K2)
    R: tl.constexpr = KMAX // 2
    LO0: tl.constexpr = R - K0 // 2
    LO1: tl.constexpr = R - K1 // 2
    LO2: tl.constexpr = R - K2 // 2
    for s in range(SUB):
        t = chunk * SUB + s
        first = t == chunk * SUB
        n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
        m2d = valid[:, None] & cmask[None, :]
        xc = x + n.to(tl.int64) * sxn + (cl * sxc)[None, :]
        dzc = dz + n.to(tl.int64) * sdn + (cl * sdc)[None, :]
        centre = (hh * sdh + ww * sdw)[:, None]
        d0 = tl.load(dzc + centre, mask=valid[:, None], other=0.0)
        d1 = d0
        d2 = d0
        if NB > 1:
            d1 = tl.load(dzc + sdb + centre, mask=valid[:, None], other=0.0)
        if NB > 2:
            d2 = tl.load(dzc + 2 * sdb + centre, mask=valid[:, None], other=0.0)
        dx = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], tl.float32)
        for i in tl.static_range(KMAX):
            hi = hh + (i - R)  # x(p + o) for the weight gradient
            hg = hh - (i - R)  # dz(p − o) for the input gradient
            mh = valid & (hi >= 0) & (hi < H)
            mg = valid & (hg >= 0) & (hg < H)
            xrow = hi * sxh
            drow = hg * sdh
            for j in tl.static_range(KMAX):
                wi = ww + (j - R)
                wg = ww - (j - R)
                mx = mh & (wi >= 0) & (wi < W)
                md = (mg & (wg >= 0) & (wg < W))[:, None]
                v = tl.load(xc + (xrow + wi * sxw)[:, None], mask=mx[:, None], other=0.0).to(tl.float32)
                dofs = (drow + wg * sdw)[:, None]
                if (i >= LO0) & (i < LO0 + K0) & (j >= LO0) & (j < LO0 + K0):
                    tap = (i - LO0) * K0 + (j - LO0)
                    dx += tl.load(dzc + dofs, mask=md, other=0.0) * tl.load(w0 + tap).to(tl.float32)[None, :]
                    accumulate_partial(prow0 + tap, tl.sum(d0 * v, 0), c, C, first)
                if NB > 1:
                    if (i >= LO1) & (i < LO1 + K1) & (j >= LO1) & (j < LO1 + K1):
                        tap = (i - LO1) * K1 + (j - LO1)
                        dx += tl.load(dzc + sdb + dofs, mask=md, other=0.0) * tl.load(w1 + tap).to(
                            tl.float32)[None, :]
                        accumulate_partial(prow1 + tap, tl.sum(d1 * v, 0), c, C, first)
                if NB > 2:
                    if (i >= LO2) & (i < LO2 + K2) & (j >= LO2) & (j < LO2 + K2):
                        tap = (i - LO2) * K2 + (j - LO2)
                        dx += tl.load(dzc + 2 * sdb + dofs, mask=md, other=0.0) * tl.load(w2 + tap).to(
                            tl.float32)[None, :]
                        accumulate_partial(prow2 + tap, tl.sum(d2 * v, 0), c, C, first)
        ob = gx + n.to(tl.int64) * son
        tl.store(ob + (hh * soh + ww * sow)[:, None] + (c * soc)[None, :], dx.to(gx.dtype.element_ty), mask=m2d)
        tl.debug_barrier()  # the next tile's read-modify-write of the partial row sees these stores


# --------------------------------------------------------------------------------------------------
# launchers (the kernel-op schemas of the descriptor in emcad_kernels/ops)
# --------------------------------------------------------------------------------------------------
def _branches(weights):
    nb = len(weights)
    if not 1 <= nb <= MAX_BRANCHES:
        raise ValueError(f"the triton msdc kernel supports 1 to {MAX_BRANCHES} branches, got {nb}")
    ws = [w.contiguous() for w in weights]
    ks = [w.shape[-1] for w in ws]
    if any(k % 2 == 0 or k > MAX_KERNEL_SIZE for k in ks):
        raise ValueError(f"the triton msdc kernel supports odd kernel sizes <= {MAX_KERNEL_SIZE}, got {ks}")
    pad = MAX_BRANCHES - nb
    return nb, ws + [ws[0]] * pad, ks + [1] * pad, max(ks)


def _static(nb, ks, kmax):
    return dict(NB=nb, K0=ks[0], K1=ks[1], K2=ks[2], KMAX=kmax)


def _shuffle(out_channels: int, shuffle_groups: int):
    if shuffle_groups > 0:
        return out_channels // shuffle_groups, shuffle_groups, True
    return 1, 1, False


def _grid(n, h, w, c):
    return lambda meta: (n * cdiv(h, meta["BLOCK_H"]) * cdiv(w, meta["BLOCK_W"]), cdiv(c, meta["BLOCK_C"]))


def msdc_forward(x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat, shuffle_groups,
                 stride):
    if x.numel() == 0:  # nothing to launch (and no program would write the statistics)
        return reference.msdc_forward(x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat,
                                      shuffle_groups, stride)
    if stride != 1:
        raise ValueError("the triton msdc kernel supports stride 1 only")
    n, c, h, w = x.shape
    nb, ws, ks, kmax = _branches(weights)
    static = _static(nb, ks, kmax)
    out_c = c * nb if concat else c
    y = empty_4d((n, out_c, h, w), x.dtype, x.device, is_channels_last(x))
    save_mean = torch.empty((nb, c), dtype=torch.float32, device=x.device)
    save_var = torch.empty((nb, c), dtype=torch.float32, device=x.device)
    gamma, beta = bn_weight.contiguous(), bn_bias.contiguous()
    if training:
        tile = reduction_tile(h, w, c)
        t = tile.num_chunks(n, h, w)
        mean_part = torch.empty((t, nb * c), dtype=torch.float32, device=x.device)
        m2_part = torch.empty_like(mean_part)
        count = torch.empty((t,), dtype=torch.float32, device=x.device)
        _msdc_stats_kernel[tile.chunk_grid(n, h, w, c)](x, *ws, mean_part, m2_part, count, n, c, h, w, *x.stride(),
                                                       **static, **tile.meta(sub=True))
        _reduce.merge_stats(mean_part, m2_part, count, [(save_mean, save_var)])
        stat_mean, stat_var = save_mean, save_var
    else:
        stat_mean, stat_var = mean.contiguous(), var.contiguous()
    sn, sg, shuffle = _shuffle(out_c, shuffle_groups)
    _msdc_fwd_kernel[_grid(n, h, w, c)](x, y, *ws, gamma, beta, stat_mean, stat_var, save_mean, save_var,
                                        n, c, h, w, *x.stride(), *y.stride(), eps, sn, sg, **static,
                                        ACT=activation_code(activation), CONCAT=bool(concat), SHUFFLE=shuffle,
                                        COPY_STATS=not training)
    return y, save_mean, save_var


def msdc_backward(grad, x, weights, bn_weight, bn_bias, save_mean, save_var, training, eps, activation, concat,
                  shuffle_groups, stride):
    if x.numel() == 0:
        return reference.msdc_backward(grad, x, weights, bn_weight, bn_bias, save_mean, save_var, training, eps,
                                       activation, concat, shuffle_groups, stride)
    if stride != 1:
        raise ValueError("the triton msdc kernel supports stride 1 only")
    n, c, h, w = x.shape
    nb, ws, ks, kmax = _branches(weights)
    static = _static(nb, ks, kmax)
    act = activation_code(activation)
    sn, sg, shuffle = _shuffle(c * nb if concat else c, shuffle_groups)
    gamma, beta = bn_weight.contiguous(), bn_bias.contiguous()
    mean, var = save_mean.contiguous(), save_var.contiguous()
    dev = x.device
    tile = reduction_tile(h, w, c)
    t = tile.num_chunks(n, h, w)

    # pass A: Σ g_a and Σ g_a·ẑ per branch and channel
    part = torch.empty((t, 2 * nb * c), dtype=torch.float32, device=dev)
    _msdc_bwd_stats_kernel[tile.chunk_grid(n, h, w, c)](x, grad, *ws, gamma, beta, mean, var, part, n, c, h, w,
                                                         *x.stride(), *grad.stride(), eps, sn, sg, **static,
                                                         ACT=act, CONCAT=bool(concat), SHUFFLE=shuffle,
                                                         **tile.meta(sub=True))
    red = torch.empty((2, nb, c), dtype=torch.float32, device=dev)
    _reduce.sum_partials(part, [red])

    # pass B1: ∂L/∂z per branch; BatchNorm-parameter gradients
    dz = empty_scratch(nb, n, c, h, w, is_channels_last(x), dev)
    gbw = torch.empty(bn_weight.shape, dtype=bn_weight.dtype, device=dev)
    gbb = torch.empty(bn_bias.shape, dtype=bn_bias.dtype, device=dev)
    _msdc_bwd_dz_kernel[_grid(n, h, w, c)](x, grad, *ws, gamma, beta, mean, var, red, dz, gbw, gbb, n, c, h, w,
                                           *x.stride(), *grad.stride(), *dz.stride(), eps, 1.0 / (n * h * w),
                                           sn, sg, **static, ACT=act, CONCAT=bool(concat), SHUFFLE=shuffle,
                                           TRAINING=bool(training))

    # pass B2: ∂L/∂x and weight-gradient partials
    gx = empty_4d(x.shape, x.dtype, dev, is_channels_last(x))
    rw = c * sum(k * k for k in ks[:nb])
    wpart = torch.empty((t, rw), dtype=torch.float32, device=dev)
    _msdc_bwd_dx_kernel[tile.chunk_grid(n, h, w, c)](x, dz, gx, *ws, wpart, n, c, h, w, rw, *x.stride(),
                                                      *dz.stride(), *gx.stride(), **static, **tile.meta(sub=True))
    gws = [torch.empty(wt.shape, dtype=wt.dtype, device=dev) for wt in weights]
    _reduce.sum_partials(wpart, gws)
    return [gx, gbw, gbb, *gws]
