"""Fused large-kernel grouped attention gate (EMCAD's LGAG): Triton kernels and launchers.

Semantics (``reference.lgag_forward``)::

    z_g = gconv(g, wg) + bg,   z_x = gconv(x, wx) + bx          grouped k×k convs, ``groups`` groups
    h   = act(BN_g(z_g) + BN_x(z_x))                            F = F_int channels
    ψ   = sigmoid(BN_ψ(Σ_f wψ[f]·h_f + bψ))                     one channel
    out = x·ψ  (+ g with ``add_gate_input``)

A program owns a spatial tile. The channel reduction for ψ loops over blocks of F inside the program (contiguous
in channels_last), so ψ never leaves registers in eval mode, where one kernel does everything.

Training forward: ``_lgag_stats_kernel`` (per-tile statistics of z_g and z_x) → reduction → ``_lgag_gate_kernel``
(ψ's pre-activation per pixel into a one-channel fp32 buffer, plus its per-tile statistics) → reduction →
``_lgag_apply_kernel`` (``x·ψ (+ g)``, autotuned). Nothing of size N·C·H·W is written except the output.

Backward (recomputes the convolutions from g, x and the saved statistics):

* ``_lgag_bwd_gate_kernel``: ψ again, ``dψ = Σ_c grad·x`` (channel loop), ``∂L/∂a_ψ = dψ·s(1 − s)`` and its
  per-tile sums for BN_ψ; per-pixel ψ and ``∂L/∂a_ψ`` go to two one-channel buffers;
* ``_lgag_bwd_h_kernel``: per (tile, F block): ``∂L/∂pre_ψ`` from BN_ψ's backward, then ``∂L/∂h``, and the sums
  for ``wψ``, ``bψ`` and both BatchNorms;
* ``_lgag_bwd_dz_kernel``: ``∂L/∂z_g`` and ``∂L/∂z_x`` into an fp32 scratch ``[2, N, F, H, W]`` and the small
  parameter gradients;
* ``_lgag_bwd_input_kernel`` (once for g, once for x): input gradient in gather form over the group's output
  channels, plus the direct terms (``grad·ψ`` for x, ``grad`` for g with ``add_gate_input``), and per-tile
  partials of the conv weight and bias gradients.

All sums go through per-tile partials and ``_reduce.py`` (fixed order, no atomics). Supported: any ``groups``
(EMCAD: groups = F, two input channels per group), odd k <= 7.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import _reduce
from ._utils import (INTERPRETER_CONFIG, activate, activate_grad, activation_code, autotune, cdiv, empty_4d,
                     empty_scratch, first_program_limit, is_channels_last, reduction_tile, spatial_configs,
                     tile_coords, tile_mean_m2)

MAX_KERNEL_SIZE = 7


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _gconv(inb, sic, sih, siw, w, b, fl, hh, ww, valid, H, W, FPG, CIN: tl.constexpr, K: tl.constexpr,
           BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr):
    """Grouped conv + bias for output channels ``fl`` (clamped to < F) on a tile: ``[P, BLOCK_F]`` in fp32.
    Output channel f reads input channels ``(f // FPG)·CIN + ci``, ci < CIN (all loads in bounds)."""
    P: tl.constexpr = K // 2
    z = tl.zeros([BLOCK_P, BLOCK_F], tl.float32) + tl.load(b + fl).to(tl.float32)[None, :]
    cin0 = (fl // FPG) * CIN
    for ci in range(CIN):
        chan = inb + ((cin0 + ci) * sic)[None, :]
        wrow = w + (fl * CIN + ci) * (K * K)
        for i in tl.static_range(K):
            hi = hh + (i - P)
            mh = valid & (hi >= 0) & (hi < H)
            rowoff = hi * sih
            for j in tl.static_range(K):
                wi = ww + (j - P)
                m = mh & (wi >= 0) & (wi < W)
                v = tl.load(chan + (rowoff + wi * siw)[:, None], mask=m[:, None], other=0.0).to(tl.float32)
                z += v * tl.load(wrow + (i * K + j)).to(tl.float32)[None, :]
    return z


@triton.jit
def _bn_load(gamma, beta, mean, var, idx, eps):
    """(γ, β, μ, 1/sqrt(σ² + ε)) at ``idx`` (in-bounds indices), fp32."""
    g = tl.load(gamma + idx).to(tl.float32)
    bt = tl.load(beta + idx).to(tl.float32)
    mu = tl.load(mean + idx).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.load(var + idx).to(tl.float32) + eps)
    return g, bt, mu, r


@triton.jit
def _h_block(gb, xb, wg, bg, wx, bx, gam_g, bet_g, mu_g, var_g, gam_x, bet_x, mu_x, var_x, fl, hh, ww, valid,
             H, W, sgc, sgh, sgw, sxc, sxh, sxw, eps, FPG, CING: tl.constexpr, CINX: tl.constexpr,
             K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr):
    """For one block of F channels: (ẑ_g, ẑ_x, BN_g(z_g) + BN_x(z_x)), all ``[P, BLOCK_F]`` fp32."""
    zg = _gconv(gb, sgc, sgh, sgw, wg, bg, fl, hh, ww, valid, H, W, FPG, CING, K, BLOCK_P, BLOCK_F)
    zx = _gconv(xb, sxc, sxh, sxw, wx, bx, fl, hh, ww, valid, H, W, FPG, CINX, K, BLOCK_P, BLOCK_F)
    g1, b1, m1, r1 = _bn_load(gam_g, bet_g, mu_g, var_g, fl, eps)
    g2, b2, m2, r2 = _bn_load(gam_x, bet_x, mu_x, var_x, fl, eps)
    zhg = (zg - m1[None, :]) * r1[None, :]
    zhx = (zx - m2[None, :]) * r2[None, :]
    return zhg, zhx, zhg * g1[None, :] + b1[None, :] + zhx * g2[None, :] + b2[None, :]


@triton.jit
def _psi_pre(gb, xb, wg, bg, wx, bx, wpsi, bpsi, gam_g, bet_g, mu_g, var_g, gam_x, bet_x, mu_x, var_x,
             hh, ww, valid, F, H, W, sgc, sgh, sgw, sxc, sxh, sxw, eps, FPG, CING: tl.constexpr,
             CINX: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr):
    """ψ's pre-activation ``Σ_f wψ[f]·h_f + bψ`` per pixel of the tile (the channel reduction loops over F)."""
    acc = tl.zeros([BLOCK_P], tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fl = tl.minimum(f, F - 1)
        _, _, hpre = _h_block(gb, xb, wg, bg, wx, bx, gam_g, bet_g, mu_g, var_g, gam_x, bet_x, mu_x, var_x, fl,
                              hh, ww, valid, H, W, sgc, sgh, sgw, sxc, sxh, sxw, eps, FPG, CING, CINX, K, BLOCK_P,
                              BLOCK_F)
        wp = tl.where(f < F, tl.load(wpsi + fl).to(tl.float32), 0.0)
        acc += tl.sum(activate(hpre, ACT) * wp[None, :], 1)
    return acc + tl.load(bpsi).to(tl.float32)


@triton.jit
def _gate(psi, gam_p, bet_p, mu_p, var_p, eps):
    """(ẑ_ψ, sigmoid(BN_ψ)) from ψ's pre-activation."""
    g, bt, mu, r = _bn_load(gam_p, bet_p, mu_p, var_p, 0, eps)
    zp = (psi - mu) * r
    return zp, tl.sigmoid(zp * g + bt)


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _lgag_stats_kernel(g, x, wg, bg, wx, bx, mean_part, m2_part, count_part, N, F, H, W,
                       sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, FPG,
                       CING: tl.constexpr, CINX: tl.constexpr, K: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-tile (mean, M2) of z_g (row block 0) and z_x (row block 1): rows ``[T, 2F]``."""
    t = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    fm = f < F
    fl = tl.minimum(f, F - 1)
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    zg = _gconv(g + n.to(tl.int64) * sgn, sgc, sgh, sgw, wg, bg, fl, hh, ww, valid, H, W, FPG, CING, K,
                BLOCK_H * BLOCK_W, BLOCK_C)
    zx = _gconv(x + n.to(tl.int64) * sxn, sxc, sxh, sxw, wx, bx, fl, hh, ww, valid, H, W, FPG, CINX, K,
                BLOCK_H * BLOCK_W, BLOCK_C)
    row = t.to(tl.int64) * (2 * F) + f
    mu, m2 = tile_mean_m2(zg, valid[:, None], count)
    tl.store(mean_part + row, mu, mask=fm)
    tl.store(m2_part + row, m2, mask=fm)
    mu, m2 = tile_mean_m2(zx, valid[:, None], count)
    tl.store(mean_part + row + F, mu, mask=fm)
    tl.store(m2_part + row + F, m2, mask=fm)
    tl.store(count_part + t, count)


@triton.jit
def _lgag_gate_kernel(g, x, out, wg, bg, wx, bx, wpsi, bpsi,
                      gam_g, bet_g, mu_g, var_g, gam_x, bet_x, mu_x, var_x, gam_p, bet_p, mu_p, var_p,
                      psi_buf, mean_part, m2_part, count_part,
                      cp_mu_g, cp_var_g, cp_mu_x, cp_var_x, cp_mu_p, cp_var_p,
                      N, F, CX, H, W, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, son, soc, soh, sow, eps, FPG,
                      CING: tl.constexpr, CINX: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr,
                      APPLY: tl.constexpr, ADD: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per tile. ``APPLY`` (eval): the whole gate, ``out = x·ψ (+ g)``, plus copies of the running
    statistics used. Otherwise (training): ψ's pre-activation into ``psi_buf`` and its per-tile (mean, M2)."""
    t = tl.program_id(0)
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    gb = g + n.to(tl.int64) * sgn
    xb = x + n.to(tl.int64) * sxn
    psi = _psi_pre(gb, xb, wg, bg, wx, bx, wpsi, bpsi, gam_g, bet_g, mu_g, var_g, gam_x, bet_x, mu_x, var_x,
                   hh, ww, valid, F, H, W, sgc, sgh, sgw, sxc, sxh, sxw, eps, FPG, CING, CINX, K, ACT,
                   BLOCK_H * BLOCK_W, BLOCK_C)
    if APPLY:
        _, s = _gate(psi, gam_p, bet_p, mu_p, var_p, eps)
        ob = out + n.to(tl.int64) * son
        for c0 in range(0, CX, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m2d = valid[:, None] & (c < CX)[None, :]
            v = tl.load(xb + (hh * sxh + ww * sxw)[:, None] + (c * sxc)[None, :], mask=m2d,
                        other=0.0).to(tl.float32) * s[:, None]
            if ADD:
                v += tl.load(gb + (hh * sgh + ww * sgw)[:, None] + (c * sgc)[None, :], mask=m2d,
                             other=0.0).to(tl.float32)
            tl.store(ob + (hh * soh + ww * sow)[:, None] + (c * soc)[None, :], v.to(out.dtype.element_ty),
                     mask=m2d)
        lim = first_program_limit(F, t)
        for f0 in range(0, F, BLOCK_C):
            f = f0 + tl.arange(0, BLOCK_C)
            fm = f < lim
            tl.store(cp_mu_g + f, tl.load(mu_g + f, mask=fm).to(tl.float32), mask=fm)
            tl.store(cp_var_g + f, tl.load(var_g + f, mask=fm).to(tl.float32), mask=fm)
            tl.store(cp_mu_x + f, tl.load(mu_x + f, mask=fm).to(tl.float32), mask=fm)
            tl.store(cp_var_x + f, tl.load(var_x + f, mask=fm).to(tl.float32), mask=fm)
        one = tl.arange(0, BLOCK_C) < first_program_limit(1, t)
        tl.store(cp_mu_p + tl.arange(0, BLOCK_C), tl.load(mu_p + tl.arange(0, BLOCK_C), mask=one).to(tl.float32),
                 mask=one)
        tl.store(cp_var_p + tl.arange(0, BLOCK_C), tl.load(var_p + tl.arange(0, BLOCK_C), mask=one).to(tl.float32),
                 mask=one)
    else:
        tl.store(psi_buf + n.to(tl.int64) * (H * W) + hh * W + ww, psi, mask=valid)
        mu = tl.sum(tl.where(valid, psi, 0.0), 0) / count
        d = tl.where(valid, psi - mu, 0.0)
        tl.store(mean_part + t, mu)
        tl.store(m2_part + t, tl.sum(d * d, 0))
        tl.store(count_part + t, count)


@autotune(configs=spatial_configs(), key=["CX", "H", "W", "sxc", "ADD"], interpreter_config=INTERPRETER_CONFIG)
@triton.jit
def _lgag_apply_kernel(g, x, out, psi_buf, gam_p, bet_p, mu_p, var_p, N, CX, H, W,
                       sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, son, soc, soh, sow, eps, ADD: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Training forward, last pass: ``out = x·sigmoid(BN_ψ(pre_ψ)) (+ g)`` with ψ's batch statistics."""
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    psi = tl.load(psi_buf + n.to(tl.int64) * (H * W) + hh * W + ww, mask=valid, other=0.0)
    _, s = _gate(psi, gam_p, bet_p, mu_p, var_p, eps)
    m2d = valid[:, None] & (c < CX)[None, :]
    v = tl.load(x + n.to(tl.int64) * sxn + (hh * sxh + ww * sxw)[:, None] + (c * sxc)[None, :], mask=m2d,
                other=0.0).to(tl.float32) * s[:, None]
    if ADD:
        v += tl.load(g + n.to(tl.int64) * sgn + (hh * sgh + ww * sgw)[:, None] + (c * sgc)[None, :], mask=m2d,
                     other=0.0).to(tl.float32)
    tl.store(out + n.to(tl.int64) * son + (hh * soh + ww * sow)[:, None] + (c * soc)[None, :],
             v.to(out.dtype.element_ty), mask=m2d)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _lgag_bwd_gate_kernel(grad, g, x, wg, bg, wx, bx, wpsi, bpsi,
                          gam_g, bet_g, mu_g, var_g, gam_x, bet_x, mu_x, var_x, gam_p, bet_p, mu_p, var_p,
                          psi_buf, dap_buf, part, N, F, CX, H, W, srn, src, srh, srw,
                          sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, eps, FPG,
                          CING: tl.constexpr, CINX: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """ψ (recomputed), ``∂L/∂a_ψ = (Σ_c grad·x)·s(1 − s)``; per-pixel buffers and partials [Σ ∂L/∂a_ψ, Σ ·ẑ_ψ]."""
    t = tl.program_id(0)
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    gb = g + n.to(tl.int64) * sgn
    xb = x + n.to(tl.int64) * sxn
    psi = _psi_pre(gb, xb, wg, bg, wx, bx, wpsi, bpsi, gam_g, bet_g, mu_g, var_g, gam_x, bet_x, mu_x, var_x,
                   hh, ww, valid, F, H, W, sgc, sgh, sgw, sxc, sxh, sxw, eps, FPG, CING, CINX, K, ACT,
                   BLOCK_H * BLOCK_W, BLOCK_C)
    zp, s = _gate(psi, gam_p, bet_p, mu_p, var_p, eps)
    ds = tl.zeros([BLOCK_H * BLOCK_W], tl.float32)
    rb = grad + n.to(tl.int64) * srn + (hh * srh + ww * srw)[:, None]
    xp = xb + (hh * sxh + ww * sxw)[:, None]
    for c0 in range(0, CX, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m2d = valid[:, None] & (c < CX)[None, :]
        gr = tl.load(rb + (c * src)[None, :], mask=m2d, other=0.0).to(tl.float32)
        ds += tl.sum(gr * tl.load(xp + (c * sxc)[None, :], mask=m2d, other=0.0).to(tl.float32), 1)
    dap = tl.where(valid, ds * s * (1.0 - s), 0.0)
    pix = n.to(tl.int64) * (H * W) + hh * W + ww
    tl.store(psi_buf + pix, psi, mask=valid)
    tl.store(dap_buf + pix, dap, mask=valid)
    tl.store(part + 2 * t, tl.sum(dap, 0))
    tl.store(part + 2 * t + 1, tl.sum(dap * zp, 0))


@triton.jit
def _dsum_block(g, x, wg, bg, wx, bx, wpsi, gam_g, bet_g, mu_g, var_g, gam_x, bet_x, mu_x, var_x,
                gam_p, bet_p, mu_p, var_p, psi_buf, dap_buf, red_p, n, hh, ww, valid, fl, fm, H, W,
                sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, eps, inv_count, FPG,
                CING: tl.constexpr, CINX: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr):
    """For one (tile, F block): ẑ_g, ẑ_x, h, ∂L/∂pre_ψ per pixel and ∂L/∂(BN_g + BN_x) (= ∂L/∂a_g = ∂L/∂a_x)."""
    zhg, zhx, hpre = _h_block(g + n.to(tl.int64) * sgn, x + n.to(tl.int64) * sxn, wg, bg, wx, bx, gam_g, bet_g,
                              mu_g, var_g, gam_x, bet_x, mu_x, var_x, fl, hh, ww, valid, H, W, sgc, sgh, sgw, sxc,
                              sxh, sxw, eps, FPG, CING, CINX, K, BLOCK_P, BLOCK_F)
    pix = n.to(tl.int64) * (H * W) + hh * W + ww
    psi = tl.load(psi_buf + pix, mask=valid, other=0.0)
    dap = tl.load(dap_buf + pix, mask=valid, other=0.0)
    gp, _, mp, rp = _bn_load(gam_p, bet_p, mu_p, var_p, 0, eps)
    if TRAINING:
        zp = (psi - mp) * rp
        dpsi = gp * rp * (dap - tl.load(red_p) * inv_count - zp * (tl.load(red_p + 1) * inv_count))
    else:
        dpsi = gp * rp * dap
    dpsi = tl.where(valid, dpsi, 0.0)
    wp = tl.where(fm, tl.load(wpsi + fl).to(tl.float32), 0.0)
    m2d = valid[:, None] & fm[None, :]
    dsum = tl.where(m2d, activate_grad(hpre, dpsi[:, None] * wp[None, :], ACT), 0.0)
    return zhg, zhx, activate(hpre, ACT), dpsi, dsum


@triton.jit
def _lgag_bwd_h_kernel(g, x, wg, bg, wx, bx, wpsi, gam_g, bet_g, mu_g, var_g, gam_x, bet_x, mu_x, var_x,
                       gam_p, bet_p, mu_p, var_p, psi_buf, dap_buf, red_p, part, N, F, H, W,
                       sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, eps, inv_count, FPG,
                       CING: tl.constexpr, CINX: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr,
                       TRAINING: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial rows ``[Σ ∂pre_ψ·h_f | Σ ∂a | Σ ∂a·ẑ_g | Σ ∂a·ẑ_x | Σ ∂pre_ψ]`` (4F + 1) of a tile."""
    t = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    fm = f < F
    fl = tl.minimum(f, F - 1)
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    zhg, zhx, h, dpsi, dsum = _dsum_block(g, x, wg, bg, wx, bx, wpsi, gam_g, bet_g, mu_g, var_g, gam_x, bet_x,
                                          mu_x, var_x, gam_p, bet_p, mu_p, var_p, psi_buf, dap_buf, red_p, n, hh,
                                          ww, valid, fl, fm, H, W, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, eps,
                                          inv_count, FPG, CING, CINX, K, ACT, TRAINING, BLOCK_H * BLOCK_W, BLOCK_C)
    row = part + t.to(tl.int64) * (4 * F + 1)
    tl.store(row + f, tl.sum(dpsi[:, None] * h, 0), mask=fm)
    tl.store(row + F + f, tl.sum(dsum, 0), mask=fm)
    tl.store(row + 2 * F + f, tl.sum(dsum * zhg, 0), mask=fm)
    tl.store(row + 3 * F + f, tl.sum(dsum * zhx, 0), mask=fm)
    one = tl.arange(0, BLOCK_C) < first_program_limit(1, tl.program_id(1))
    tl.store(row + 4 * F + tl.arange(0, BLOCK_C), tl.zeros([BLOCK_C], tl.float32) + tl.sum(dpsi, 0), mask=one)


@triton.jit
def _lgag_bwd_dz_kernel(g, x, wg, bg, wx, bx, wpsi, gam_g, bet_g, mu_g, var_g, gam_x, bet_x, mu_x, var_x,
                        gam_p, bet_p, mu_p, var_p, psi_buf, dap_buf, red_p, red_h, dz,
                        g_wpsi, g_bpsi, g_gam_g, g_bet_g, g_gam_x, g_bet_x, g_gam_p, g_bet_p,
                        N, F, H, W, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, sdb, sdn, sdc, sdh, sdw, eps, inv_count,
                        FPG, CING: tl.constexpr, CINX: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr,
                        TRAINING: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """∂L/∂z_g and ∂L/∂z_x into the fp32 scratch; the first tile also writes the small parameter gradients."""
    t = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    fm = f < F
    fl = tl.minimum(f, F - 1)
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    zhg, zhx, h, dpsi, dsum = _dsum_block(g, x, wg, bg, wx, bx, wpsi, gam_g, bet_g, mu_g, var_g, gam_x, bet_x,
                                          mu_x, var_x, gam_p, bet_p, mu_p, var_p, psi_buf, dap_buf, red_p, n, hh,
                                          ww, valid, fl, fm, H, W, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, eps,
                                          inv_count, FPG, CING, CINX, K, ACT, TRAINING, BLOCK_H * BLOCK_W, BLOCK_C)
    gg, _, _, rg = _bn_load(gam_g, bet_g, mu_g, var_g, fl, eps)
    gx, _, _, rx = _bn_load(gam_x, bet_x, mu_x, var_x, fl, eps)
    dbeta = tl.load(red_h + F + fl)
    dgam_g = tl.load(red_h + 2 * F + fl)
    dgam_x = tl.load(red_h + 3 * F + fl)
    if TRAINING:
        dzg = (gg * rg)[None, :] * (dsum - (dbeta * inv_count)[None, :] - zhg * (dgam_g * inv_count)[None, :])
        dzx = (gx * rx)[None, :] * (dsum - (dbeta * inv_count)[None, :] - zhx * (dgam_x * inv_count)[None, :])
    else:
        dzg = (gg * rg)[None, :] * dsum
        dzx = (gx * rx)[None, :] * dsum
    m2d = valid[:, None] & fm[None, :]
    dzp = dz + n.to(tl.int64) * sdn + (hh * sdh + ww * sdw)[:, None] + (f * sdc)[None, :]
    tl.store(dzp, dzg, mask=m2d)
    tl.store(dzp + sdb, dzx, mask=m2d)

    lim = first_program_limit(F, t)
    fw = f < lim
    tl.store(g_wpsi + f, tl.load(red_h + f, mask=fw).to(g_wpsi.dtype.element_ty), mask=fw)
    tl.store(g_bet_g + f, dbeta.to(g_bet_g.dtype.element_ty), mask=fw)
    tl.store(g_bet_x + f, dbeta.to(g_bet_x.dtype.element_ty), mask=fw)
    tl.store(g_gam_g + f, dgam_g.to(g_gam_g.dtype.element_ty), mask=fw)
    tl.store(g_gam_x + f, dgam_x.to(g_gam_x.dtype.element_ty), mask=fw)
    one = tl.arange(0, BLOCK_C) < first_program_limit(first_program_limit(1, t), tl.program_id(1))
    zero = tl.arange(0, BLOCK_C) * 0
    tl.store(g_bpsi + zero, tl.load(red_h + 4 * F + zero, mask=one).to(g_bpsi.dtype.element_ty), mask=one)
    tl.store(g_bet_p + zero, tl.load(red_p + zero, mask=one).to(g_bet_p.dtype.element_ty), mask=one)
    tl.store(g_gam_p + zero, tl.load(red_p + 1 + zero, mask=one).to(g_gam_p.dtype.element_ty), mask=one)


@triton.jit
def _lgag_bwd_input_kernel(inp, grad, dz, gin, w, psi_buf, gam_p, bet_p, mu_p, var_p, part,
                           N, CIN_TOTAL, H, W, R, ROW0, BROW0,
                           sin, sic, sih, siw, srn, src, srh, srw, sdn, sdc, sdh, sdw, son, soc, soh, sow, eps, FPG,
                           CIN: tl.constexpr, K: tl.constexpr, IS_X: tl.constexpr, ADD: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Gradient of one gate input (g or x) and its conv's weight/bias partials.

    Input channel ``cin`` (group ``cin // CIN``, slot ``ci = cin % CIN``) feeds output channels
    ``f = (cin // CIN)·FPG + j``: ``∂L/∂in(p) = Σ_j Σ_taps w[f, ci, tap]·dz_f(p − o_tap)`` and
    ``∂L/∂w[f, ci, tap] = Σ_p dz_f(p)·in(p + o_tap)`` (partial rows ``ROW0 + (f·CIN + ci)·K² + tap``); the bias
    partial of f (row ``BROW0 + f``) is written by the lane with ``ci == 0``."""
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < CIN_TOTAL
    cl = tl.minimum(c, CIN_TOTAL - 1)
    grp = cl // CIN
    ci = cl % CIN
    n, hh, ww, valid, count = tile_coords(t, N, H, W, BLOCK_H, BLOCK_W)
    inc = inp + n.to(tl.int64) * sin + (cl * sic)[None, :]
    dzn = dz + n.to(tl.int64) * sdn
    prow = part + t.to(tl.int64) * R
    P: tl.constexpr = K // 2
    din = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], tl.float32)
    for j in range(FPG):
        f = grp * FPG + j
        dzf = dzn + (f * sdc)[None, :]
        dzc = tl.load(dzf + (hh * sdh + ww * sdw)[:, None], mask=valid[:, None], other=0.0)
        wl = w + (f * CIN + ci) * (K * K)
        wrow = prow + ROW0 + (f * CIN + ci) * (K * K)
        for i in tl.static_range(K):
            hi = hh + (i - P)
            hg = hh - (i - P)
            mh = valid & (hi >= 0) & (hi < H)
            mg = valid & (hg >= 0) & (hg < H)
            for jj in tl.static_range(K):
                wi = ww + (jj - P)
                wg = ww - (jj - P)
                v = tl.load(inc + (hi * sih + wi * siw)[:, None], mask=(mh & (wi >= 0) & (wi < W))[:, None],
                            other=0.0).to(tl.float32)
                tl.store(wrow + (i * K + jj), tl.sum(dzc * v, 0), mask=cm)
                d = tl.load(dzf + (hg * sdh + wg * sdw)[:, None], mask=(mg & (wg >= 0) & (wg < W))[:, None],
                            other=0.0)
                din += d * tl.load(wl + (i * K + jj)).to(tl.float32)[None, :]
        tl.store(prow + BROW0 + f, tl.sum(dzc, 0), mask=cm & (ci == 0))
    m2d = valid[:, None] & cm[None, :]
    if IS_X:
        psi = tl.load(psi_buf + n.to(tl.int64) * (H * W) + hh * W + ww, mask=valid, other=0.0)
        _, s = _gate(psi, gam_p, bet_p, mu_p, var_p, eps)
        gr = tl.load(grad + n.to(tl.int64) * srn + (hh * srh + ww * srw)[:, None] + (c * src)[None, :], mask=m2d,
                     other=0.0).to(tl.float32)
        din += gr * s[:, None]
    elif ADD:
        din += tl.load(grad + n.to(tl.int64) * srn + (hh * srh + ww * srw)[:, None] + (c * src)[None, :],
                       mask=m2d, other=0.0).to(tl.float32)
    tl.store(gin + n.to(tl.int64) * son + (hh * soh + ww * sow)[:, None] + (c * soc)[None, :],
             din.to(gin.dtype.element_ty), mask=m2d)


# --------------------------------------------------------------------------------------------------
# launchers (the kernel-op schemas of the descriptor in emcad_kernels/ops)
# --------------------------------------------------------------------------------------------------
def _layout(g, x, wg, wx, groups):
    f = wg.shape[0]
    k = wg.shape[-1]
    if k % 2 == 0 or k > MAX_KERNEL_SIZE or wx.shape[-1] != k:
        raise ValueError(f"the triton grouped_attention_gate kernel supports odd kernel sizes <= {MAX_KERNEL_SIZE}")
    return f, k, f // groups, g.shape[1] // groups, x.shape[1] // groups


def _tile(h, w, channels):
    return reduction_tile(h, w, channels)


def lgag_forward(g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, mean_g, var_g, bn_x_weight, bn_x_bias,
                 mean_x, var_x, bn_psi_weight, bn_psi_bias, mean_psi, var_psi, training, eps, groups, activation,
                 add_gate_input):
    if x.numel() == 0 or g.numel() == 0:  # nothing to launch (and no program would write the statistics)
        return reference.lgag_forward(g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, mean_g, var_g,
                                      bn_x_weight, bn_x_bias, mean_x, var_x, bn_psi_weight, bn_psi_bias, mean_psi,
                                      var_psi, training, eps, groups, activation, add_gate_input)
    f, k, fpg, cing, cinx = _layout(g, x, wg, wx, groups)
    n, cx, h, w = x.shape
    dev = x.device
    act = activation_code(activation)
    wg, bg, wx, bx, wpsi, bpsi = (tt.contiguous() for tt in (wg, bg, wx, bx, wpsi, bpsi))
    bng = [tt.contiguous() for tt in (bn_g_weight, bn_g_bias)]
    bnx = [tt.contiguous() for tt in (bn_x_weight, bn_x_bias)]
    bnp = [tt.contiguous() for tt in (bn_psi_weight, bn_psi_bias)]
    out = empty_4d(x.shape, x.dtype, dev, is_channels_last(x))
    stats = [torch.empty((size,), dtype=torch.float32, device=dev) for size in (f, f, f, f, 1, 1)]
    tile = _tile(h, w, max(f, cx))
    t = tile.num_tiles(n, h, w)
    strides = (*g.stride(), *x.stride())
    static = dict(CING=cing, CINX=cinx, K=k)
    if training:
        mean_part = torch.empty((t, 2 * f), dtype=torch.float32, device=dev)
        m2_part = torch.empty_like(mean_part)
        count = torch.empty((t,), dtype=torch.float32, device=dev)
        _lgag_stats_kernel[tile.grid(n, h, w, f)](g, x, wg, bg, wx, bx, mean_part, m2_part, count, n, f, h, w, *strides,
                                                 fpg, **static, **tile.meta())
        _reduce.merge_stats(mean_part, m2_part, count, [(stats[0], stats[1]), (stats[2], stats[3])])
        psi_buf = torch.empty((n, h, w), dtype=torch.float32, device=dev)
        psi_mean = torch.empty((t, 1), dtype=torch.float32, device=dev)
        psi_m2 = torch.empty_like(psi_mean)
        _lgag_gate_kernel[(t,)](g, x, out, wg, bg, wx, bx, wpsi, bpsi, *bng, stats[0], stats[1], *bnx, stats[2],
                                stats[3], *bnp, stats[4], stats[5], psi_buf, psi_mean, psi_m2, count, *stats, n, f, cx,
                                h, w, *strides, *out.stride(), eps, fpg, **static, ACT=act, APPLY=False,
                                ADD=bool(add_gate_input), **tile.meta())
        _reduce.merge_stats(psi_mean, psi_m2, count, [(stats[4], stats[5])])
        grid = lambda meta: (n * cdiv(h, meta["BLOCK_H"]) * cdiv(w, meta["BLOCK_W"]), cdiv(cx, meta["BLOCK_C"]))
        _lgag_apply_kernel[grid](g, x, out, psi_buf, *bnp, stats[4], stats[5], n, cx, h, w, *strides, *out.stride(),
                                 eps, ADD=bool(add_gate_input))
    else:
        running = [tt.contiguous() for tt in (mean_g, var_g, mean_x, var_x, mean_psi, var_psi)]
        _lgag_gate_kernel[(t,)](g, x, out, wg, bg, wx, bx, wpsi, bpsi, *bng, running[0], running[1], *bnx,
                                running[2], running[3], *bnp, running[4], running[5], out, out, out, out, *stats,
                                n, f, cx, h, w, *strides, *out.stride(), eps, fpg, **static, ACT=act, APPLY=True,
                                ADD=bool(add_gate_input), **tile.meta())
    return (out, *stats)


def lgag_backward(grad, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias,
                  bn_psi_weight, bn_psi_bias, save_stats, training, eps, groups, activation, add_gate_input):
    if x.numel() == 0 or g.numel() == 0:
        return reference.lgag_backward(grad, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight,
                                       bn_x_bias, bn_psi_weight, bn_psi_bias, save_stats, training, eps, groups,
                                       activation, add_gate_input)
    f, k, fpg, cing, cinx = _layout(g, x, wg, wx, groups)
    n, cx, h, w = x.shape
    cg = g.shape[1]
    dev = x.device
    act = activation_code(activation)
    wg_c, bg_c, wx_c, bx_c, wpsi_c, bpsi_c = (tt.contiguous() for tt in (wg, bg, wx, bx, wpsi, bpsi))
    mg, vg, mx, vx, mp, vp = (tt.contiguous() for tt in save_stats)
    bn_all = (bn_g_weight.contiguous(), bn_g_bias.contiguous(), mg, vg, bn_x_weight.contiguous(),
              bn_x_bias.contiguous(), mx, vx, bn_psi_weight.contiguous(), bn_psi_bias.contiguous(), mp, vp)
    tile = _tile(h, w, max(f, cx, cg))
    t = tile.num_tiles(n, h, w)
    strides = (*g.stride(), *x.stride())
    static = dict(CING=cing, CINX=cinx, K=k, ACT=act)
    inv_count = 1.0 / (n * h * w)

    psi_buf = torch.empty((n, h, w), dtype=torch.float32, device=dev)
    dap_buf = torch.empty((n, h, w), dtype=torch.float32, device=dev)
    part_p = torch.empty((t, 2), dtype=torch.float32, device=dev)
    _lgag_bwd_gate_kernel[(t,)](grad, g, x, wg_c, bg_c, wx_c, bx_c, wpsi_c, bpsi_c, *bn_all, psi_buf, dap_buf, part_p,
                                n, f, cx, h, w, *grad.stride(), *strides, eps, fpg, **static, **tile.meta())
    red_p = torch.empty((2,), dtype=torch.float32, device=dev)
    _reduce.sum_partials(part_p, [red_p])

    part_h = torch.empty((t, 4 * f + 1), dtype=torch.float32, device=dev)
    common = (wg_c, bg_c, wx_c, bx_c, wpsi_c, *bn_all, psi_buf, dap_buf, red_p)
    _lgag_bwd_h_kernel[tile.grid(n, h, w, f)](g, x, *common, part_h, n, f, h, w, *strides, eps, inv_count, fpg,
                                              **static, TRAINING=bool(training), **tile.meta())
    red_h = torch.empty((4 * f + 1,), dtype=torch.float32, device=dev)
    _reduce.sum_partials(part_h, [red_h])

    dz = empty_scratch(2, n, f, h, w, is_channels_last(x), dev)
    small = [torch.empty(p.shape, dtype=p.dtype, device=dev)
             for p in (wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias, bn_psi_weight, bn_psi_bias)]
    _lgag_bwd_dz_kernel[tile.grid(n, h, w, f)](g, x, *common, red_h, dz, *small, n, f, h, w, *strides, *dz.stride(),
                                               eps, inv_count, fpg, **static, TRAINING=bool(training), **tile.meta())

    kk = k * k
    rows = (f * cing * kk, f * cinx * kk, f, f)
    part_w = torch.empty((t, sum(rows)), dtype=torch.float32, device=dev)
    gg = empty_4d(g.shape, g.dtype, dev, is_channels_last(g))
    gx = empty_4d(x.shape, x.dtype, dev, is_channels_last(x))
    dzs = dz.stride()
    for is_x, inp, gin, wt, cin, row0, brow0 in ((False, g, gg, wg_c, cing, 0, rows[0] + rows[1]),
                                                 (True, x, gx, wx_c, cinx, rows[0], rows[0] + rows[1] + f)):
        _lgag_bwd_input_kernel[tile.grid(n, h, w, inp.shape[1])](
            inp, grad, dz[1] if is_x else dz[0], gin, wt, psi_buf, *bn_all[8:], part_w, n, inp.shape[1], h, w,
            sum(rows), row0, brow0, *inp.stride(), *grad.stride(), *dzs[1:], *gin.stride(), eps, fpg, CIN=cin, K=k,
            IS_X=is_x, ADD=bool(add_gate_input), **tile.meta())
    gwg = torch.empty(wg.shape, dtype=wg.dtype, device=dev)
    gwx = torch.empty(wx.shape, dtype=wx.dtype, device=dev)
    gbg = torch.empty(bg.shape, dtype=bg.dtype, device=dev)
    gbx = torch.empty(bx.shape, dtype=bx.dtype, device=dev)
    _reduce.sum_partials(part_w, [gwg, gwx, gbg, gbx])
    g_wpsi, g_bpsi, g_gam_g, g_bet_g, g_gam_x, g_bet_x, g_gam_p, g_bet_p = small
    return [gg, gx, gwg, gbg, gwx, gbx, g_wpsi, g_bpsi, g_gam_g, g_bet_g, g_gam_x, g_bet_x, g_gam_p, g_bet_p]
