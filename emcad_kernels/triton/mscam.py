"""MSCAM attention ``y = x · ca · sa`` (EMCAD's CAB then SAB, the ``mscam`` op of issue 8): Triton kernels and
launchers.

Semantics (``reference.mscam_forward``): ``ca = σ(fc2(act(fc1(avgpool(x)))) + fc2(act(fc1(maxpool(x)))))``
(``(N, C, 1, 1)``), ``d1 = x · ca``, ``sa = σ(conv_k([mean_c(d1), max_c(d1)]))`` (``(N, 1, H, W)``, zero padding
``k // 2``, no bias), ``y = d1 · sa``. Everything is computed in fp32 (inputs and weights are converted on load),
outputs are cast on store. Supported here: any C, any reduced width R, odd ``k <= MAX_KERNEL_SIZE`` (the k×k SAB
window is a loop over rows with the k columns unrolled, in three kernels).

Tiling: the big passes run one program per *pixel tile* (``BLOCK_P`` consecutive pixels of one image, flattened
``h·W + w``, so a tile never spans two images) that loops over all channels in blocks of ``BLOCK_C``; anything
per-pixel (the SAB map, its gradient) is computed once per tile, anything per-channel is written as one partial
row per tile. Tiles are a function of the shape only (never autotuned), so every reduction has a fixed order.

forward (4 launches)
    ``_pool_partial_kernel``  per tile and channel: partial Σx and max x (and, for the backward, the first
                              arg-max pixel) → ``[N·T, C]`` rows
    ``_ca_kernel``            one program per sample: reduces its T rows in a fixed order (vector blocks of
                              ``BLOCK_T`` rows, then one ``tl.sum``), the avg / max vectors, and the tiny shared MLP
                              ``ca = σ(W2·(act(W1·avg) + act(W1·max)))`` as blocked mat-vecs in a Triton kernel
                              (not torch ops: no extra launches). fc2 is applied once to the sum of the two
                              branches (linear, so the same value up to rounding).
    ``_chan_stats_kernel``    per tile: channel mean and max of ``x·ca`` → the ``(N, 2, H, W)`` fp32 SAB input
                              (and the first arg-max channel per pixel for the backward)
    ``_out_kernel``           per tile: the k×k conv of the SAB input + σ → sa, then ``y = x·ca·sa`` per channel
                              block
backward (recomputes the forward from ``x``; 7 launches + 2 fixed-order reductions)
    pool partials and ``_ca_kernel`` as above, also saving avg, max, the arg-max pixel and ``W1·avg``,
    ``W1·max`` per sample; ``_chan_stats_kernel`` with the arg-max channel; then
    ``_bwd_gq_kernel``   per tile: sa, ``∂L/∂q = σ'(q)·Σ_c g·d1`` (q: the SAB conv output) → ``(N, H, W)`` maps,
                         and one partial row of ``∂L/∂w_sab[j,a,b] = Σ_p ∂L/∂q(p)·s_j(p + o_ab)`` per tile
    ``_bwd_gca_kernel``  per tile: ``∂L/∂s`` (gather form of the transposed conv of ∂L/∂q), ``∂L/∂d1 = g·sa +
                         ∂L/∂s₀/C + [c = arg-max channel]·∂L/∂s₁``, partial rows of ``∂L/∂ca = Σ_p ∂L/∂d1·x``
    ``_bwd_mlp_kernel``  per sample: reduces the ∂L/∂ca rows, back through σ and the MLP: ``∂L/∂avg``,
                         ``∂L/∂max`` vectors and one partial row per sample of ``[∂W1 | ∂W2]``
    ``_bwd_dx_kernel``   per tile: ``∂L/∂x = ∂L/∂d1·ca + ∂L/∂avg/(H·W) + [p = arg-max pixel]·∂L/∂max``
                         (∂L/∂d1 recomputed, nothing of x's size is stored in between)
    ``_reduce.sum_partials`` turns the partial rows into ∂w_sab and ∂W1, ∂W2 (fixed order, no atomics).

Max ties: both maxima route their gradient to the **first** maximal element, as the reference does (its
``adaptive_max_pool2d(return_indices=True)`` and ``torch.max(dim=1)`` pick the first occurrence): the lowest
flattened pixel index ``h·W + w`` for the global max pool, the lowest channel for the channel max. In-tile arg-max
is the minimum index among the lanes equal to the maximum; across rows and blocks a later element replaces the
running maximum only when strictly greater. NaN inputs are not treated specially.

Layouts: x, grad and the outputs are addressed through strides (NCHW, channels_last, others); ``y`` and ``∂L/∂x``
take x's memory format, weight gradients their weight's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import _reduce
from ._utils import INTERPRET, activate, activate_grad, activation_code, cdiv, empty_4d, is_channels_last, next_pow2

MAX_KERNEL_SIZE = 11


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tile_pixels(t, TPI, HW, W, BLOCK_P: tl.constexpr):
    """Tile ``t`` → (sample n, flat pixels p, h, w, valid)."""
    n = t // TPI
    p = (t % TPI) * BLOCK_P + tl.arange(0, BLOCK_P)
    return n, p, p // W, p % W, p < HW


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _sab_logit(smap, n, hh, ww, pm, H, W, HW, wsab, K: tl.constexpr, BLOCK_P: tl.constexpr):
    """``q(p) = Σ_{j,a,b} w[j,a,b]·s_j(h + a − K//2, w + b − K//2)`` (zero padding) for the tile's pixels."""
    R: tl.constexpr = K // 2
    base = smap + n.to(tl.int64) * (2 * HW)
    q = tl.zeros([BLOCK_P], tl.float32)
    for j in tl.static_range(2):
        for a in range(K):  # a loop (not unrolled): 2·K² unrolled taps spill on sm_90
            hi = hh + (a - R)
            mh = pm & (hi >= 0) & (hi < H)
            for b in tl.static_range(K):
                wi = ww + (b - R)
                m = mh & (wi >= 0) & (wi < W)
                v = tl.load(base + j * HW + hi * W + wi, mask=m, other=0.0)
                q += v * tl.load(wsab + (j * K * K + a * K + b)).to(tl.float32)
    return q


@triton.jit
def _sab_input_grad(gq, n, hh, ww, pm, H, W, HW, wsab, K: tl.constexpr, BLOCK_P: tl.constexpr):
    """``∂L/∂s_j(p) = Σ_{a,b} w[j,a,b]·∂L/∂q(p − o_ab)`` (the transposed conv in gather form) for j = 0, 1."""
    R: tl.constexpr = K // 2
    base = gq + n.to(tl.int64) * HW
    gs0 = tl.zeros([BLOCK_P], tl.float32)
    gs1 = tl.zeros([BLOCK_P], tl.float32)
    for a in range(K):  # a loop (not unrolled): 2·K² unrolled taps spill on sm_90
        hi = hh - (a - R)
        mh = pm & (hi >= 0) & (hi < H)
        for b in tl.static_range(K):
            wi = ww - (b - R)
            m = mh & (wi >= 0) & (wi < W)
            v = tl.load(base + hi * W + wi, mask=m, other=0.0)
            gs0 += v * tl.load(wsab + (a * K + b)).to(tl.float32)
            gs1 += v * tl.load(wsab + (K * K + a * K + b)).to(tl.float32)
    return gs0, gs1


@triton.jit
def _bwd_pixel_tile(t, TPI, H, W, HW, gq_map, sa_map, cidx, wsab, K: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-pixel state of a backward pixel tile: the tile, the SAB input gradients (mean, max), ``sa`` and the
    channel arg-max."""
    n, p, hh, ww, pm = _tile_pixels(t, TPI, HW, W, BLOCK_P)
    gs0, gs1 = _sab_input_grad(gq_map, n, hh, ww, pm, H, W, HW, wsab, K, BLOCK_P)
    sa = tl.load(sa_map + n.to(tl.int64) * HW + p, mask=pm, other=0.0)
    ci = tl.load(cidx + n.to(tl.int64) * HW + p, mask=pm, other=0)
    return n, p, hh, ww, pm, gs0, gs1, sa, ci


@triton.jit
def _grad_d1(gv, sa, gs0, gs1, ci, c, C):
    """``∂L/∂d1 = g·sa + ∂L/∂s₀/C + [c = arg-max channel]·∂L/∂s₁`` on a ``[BLOCK_P, BLOCK_C]`` block."""
    out = gv * sa[:, None] + (gs0 / C)[:, None]
    return out + tl.where(c[None, :] == ci[:, None], gs1[:, None], 0.0)


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _pool_partial_kernel(x, psum, pmax, pidx, C, HW, W, TPI, sxn, sxc, sxh, sxw,
                         WITH_IDX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    n, p, hh, ww, pm = _tile_pixels(t, TPI, HW, W, BLOCK_P)
    xb = x + n.to(tl.int64) * sxn + (hh * sxh + ww * sxw)[:, None]
    row = t.to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m2 = pm[:, None] & cm[None, :]
        v = tl.load(xb + (c * sxc)[None, :], mask=m2, other=0.0).to(tl.float32)
        vm = tl.where(m2, v, float("-inf"))
        mx = tl.max(vm, 0)
        tl.store(psum + row + c, tl.sum(v, 0), mask=cm)
        tl.store(pmax + row + c, mx, mask=cm)
        if WITH_IDX:
            idx = tl.min(tl.where(vm == mx[None, :], p[:, None], HW), 0)
            tl.store(pidx + row + c, idx, mask=cm)


@triton.jit
def _ca_kernel(psum, pmax, pidx, w1, w2, ca, avg_o, mx_o, idx_o, h_o, C, R, TPI, inv_hw,
               ACT: tl.constexpr, SAVE: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    n = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    rm = r < R
    ha = tl.zeros([BLOCK_R], tl.float32)
    hm = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        run = tl.full([BLOCK_T, BLOCK_C], float("-inf"), tl.float32)
        ridx = tl.zeros([BLOCK_T, BLOCK_C], tl.int32)
        for t0 in range(0, TPI, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            m = (tt < TPI)[:, None] & cm[None, :]
            off = (n * TPI + tt).to(tl.int64)[:, None] * C + c[None, :]
            acc += tl.load(psum + off, mask=m, other=0.0)
            v = tl.load(pmax + off, mask=m, other=float("-inf"))
            upd = v > run  # strictly greater: an earlier row keeps a tie
            run = tl.where(upd, v, run)
            if SAVE:
                ridx = tl.where(upd, tl.load(pidx + off, mask=m, other=0), ridx)
        avg = tl.sum(acc, 0) * inv_hw
        mx = tl.max(run, 0)
        mx0 = tl.where(cm, mx, 0.0)
        w1t = tl.load(w1 + r[:, None] * C + c[None, :], mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        ha += tl.sum(w1t * avg[None, :], 1)
        hm += tl.sum(w1t * mx0[None, :], 1)
        if SAVE:
            idx = tl.min(tl.where(run == mx[None, :], ridx, 2147483647), 0)
            tl.store(avg_o + n * C + c, avg, mask=cm)
            tl.store(mx_o + n * C + c, mx0, mask=cm)
            tl.store(idx_o + n * C + c, idx, mask=cm)
    rsum = activate(ha, ACT) + activate(hm, ACT)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        w2t = tl.load(w2 + c[:, None] * R + r[None, :], mask=cm[:, None] & rm[None, :], other=0.0).to(tl.float32)
        z = tl.sum(w2t * rsum[None, :], 1)
        tl.store(ca + n * C + c, _sigmoid(z), mask=cm)
    if SAVE:
        tl.store(h_o + n * (2 * R) + r, ha, mask=rm)
        tl.store(h_o + n * (2 * R) + R + r, hm, mask=rm)


@triton.jit
def _chan_stats_kernel(x, ca, smap, cidx, C, HW, W, TPI, sxn, sxc, sxh, sxw,
                       WITH_IDX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    n, p, hh, ww, pm = _tile_pixels(t, TPI, HW, W, BLOCK_P)
    xb = x + n.to(tl.int64) * sxn + (hh * sxh + ww * sxw)[:, None]
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    run = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
    ridx = tl.zeros([BLOCK_P, BLOCK_C], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m2 = pm[:, None] & cm[None, :]
        cav = tl.load(ca + n * C + c, mask=cm, other=0.0)
        v = tl.load(xb + (c * sxc)[None, :], mask=m2, other=0.0).to(tl.float32) * cav[None, :]
        acc += v
        vm = tl.where(m2, v, float("-inf"))
        upd = vm > run  # strictly greater: an earlier channel block keeps a tie
        run = tl.where(upd, vm, run)
        if WITH_IDX:
            ridx = tl.where(upd, c[None, :], ridx)
    mx = tl.max(run, 1)
    base = smap + n.to(tl.int64) * (2 * HW) + p
    tl.store(base, tl.sum(acc, 1) / C, mask=pm)
    tl.store(base + HW, mx, mask=pm)
    if WITH_IDX:
        idx = tl.min(tl.where(run == mx[:, None], ridx, 2147483647), 1)
        tl.store(cidx + n.to(tl.int64) * HW + p, idx, mask=pm)


@triton.jit
def _out_kernel(x, y, ca, smap, wsab, C, H, W, TPI, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    HW = H * W
    n, p, hh, ww, pm = _tile_pixels(t, TPI, HW, W, BLOCK_P)
    sa = _sigmoid(_sab_logit(smap, n, hh, ww, pm, H, W, HW, wsab, K, BLOCK_P))
    xb = x + n.to(tl.int64) * sxn + (hh * sxh + ww * sxw)[:, None]
    yb = y + n.to(tl.int64) * syn + (hh * syh + ww * syw)[:, None]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m2 = pm[:, None] & cm[None, :]
        cav = tl.load(ca + n * C + c, mask=cm, other=0.0)
        v = tl.load(xb + (c * sxc)[None, :], mask=m2, other=0.0).to(tl.float32)
        out = (v * cav[None, :]) * sa[:, None]
        tl.store(yb + (c * syc)[None, :], out.to(y.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_gq_kernel(x, g, ca, smap, wsab, sa_o, gq_o, part, C, H, W, TPI, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                   K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    HW = H * W
    n, p, hh, ww, pm = _tile_pixels(t, TPI, HW, W, BLOCK_P)
    sa = _sigmoid(_sab_logit(smap, n, hh, ww, pm, H, W, HW, wsab, K, BLOCK_P))
    xb = x + n.to(tl.int64) * sxn + (hh * sxh + ww * sxw)[:, None]
    gb = g + n.to(tl.int64) * sgn + (hh * sgh + ww * sgw)[:, None]
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m2 = pm[:, None] & cm[None, :]
        cav = tl.load(ca + n * C + c, mask=cm, other=0.0)
        v = tl.load(xb + (c * sxc)[None, :], mask=m2, other=0.0).to(tl.float32)
        gv = tl.load(gb + (c * sgc)[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += gv * (v * cav[None, :])
    gq = tl.where(pm, tl.sum(acc, 1) * sa * (1.0 - sa), 0.0)
    tl.store(sa_o + n.to(tl.int64) * HW + p, sa, mask=pm)
    tl.store(gq_o + n.to(tl.int64) * HW + p, gq, mask=pm)
    # partial row of ∂w_sab: Σ_p ∂L/∂q(p)·s_j(p + o_ab)
    R: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    prow = part + t.to(tl.int64) * (2 * KK)
    base = smap + n.to(tl.int64) * (2 * HW)
    for j in tl.static_range(2):
        for a in range(K):  # a loop (not unrolled): 2·K² unrolled taps spill on sm_90
            hi = hh + (a - R)
            mh = pm & (hi >= 0) & (hi < H)
            for b in range(K):  # also a loop: Triton 3.6 spills ~300 bytes with K unrolled tile sums per row
                wi = ww + (b - R)
                m = mh & (wi >= 0) & (wi < W)
                sv = tl.load(base + j * HW + hi * W + wi, mask=m, other=0.0)
                tl.store(prow + (j * KK + a * K + b), tl.sum(gq * sv, 0))


@triton.jit
def _bwd_gca_kernel(x, g, sa_map, gq_map, cidx, wsab, part, C, H, W, TPI, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    HW = H * W
    n, p, hh, ww, pm, gs0, gs1, sa, ci = _bwd_pixel_tile(t, TPI, H, W, HW, gq_map, sa_map, cidx, wsab, K, BLOCK_P)
    xb = x + n.to(tl.int64) * sxn + (hh * sxh + ww * sxw)[:, None]
    gb = g + n.to(tl.int64) * sgn + (hh * sgh + ww * sgw)[:, None]
    row = t.to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m2 = pm[:, None] & cm[None, :]
        v = tl.load(xb + (c * sxc)[None, :], mask=m2, other=0.0).to(tl.float32)
        gv = tl.load(gb + (c * sgc)[None, :], mask=m2, other=0.0).to(tl.float32)
        gd1 = tl.where(m2, _grad_d1(gv, sa, gs0, gs1, ci, c, C), 0.0)
        tl.store(part + row + c, tl.sum(gd1 * v, 0), mask=cm)


@triton.jit
def _bwd_mlp_kernel(gca_part, ca, h, avg, mx, w1, w2, gavg_o, gmx_o, wpart, C, R, TPI, inv_hw,
                    ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per sample; its partial row is ``[∂W1 (R·C, the weight's layout) | ∂W2 (C·R)]``."""
    n = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    rm = r < R
    ha = tl.load(h + n * (2 * R) + r, mask=rm, other=0.0)
    hm = tl.load(h + n * (2 * R) + R + r, mask=rm, other=0.0)
    rsum = activate(ha, ACT) + activate(hm, ACT)
    wrow = wpart + n.to(tl.int64) * (2 * R * C)
    gr = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        for t0 in range(0, TPI, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            m = (tt < TPI)[:, None] & cm[None, :]
            acc += tl.load(gca_part + (n * TPI + tt).to(tl.int64)[:, None] * C + c[None, :], mask=m, other=0.0)
        cav = tl.load(ca + n * C + c, mask=cm, other=0.0)
        gz = tl.where(cm, tl.sum(acc, 0) * cav * (1.0 - cav), 0.0)
        m2 = cm[:, None] & rm[None, :]
        w2t = tl.load(w2 + c[:, None] * R + r[None, :], mask=m2, other=0.0).to(tl.float32)
        gr += tl.sum(w2t * gz[:, None], 0)
        tl.store(wrow + R * C + c[:, None] * R + r[None, :], gz[:, None] * rsum[None, :], mask=m2)
    gha = activate_grad(ha, gr, ACT)
    ghm = activate_grad(hm, gr, ACT)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m2 = rm[:, None] & cm[None, :]
        w1t = tl.load(w1 + r[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(gavg_o + n * C + c, tl.sum(w1t * gha[:, None], 0) * inv_hw, mask=cm)
        tl.store(gmx_o + n * C + c, tl.sum(w1t * ghm[:, None], 0), mask=cm)
        av = tl.load(avg + n * C + c, mask=cm, other=0.0)
        mv = tl.load(mx + n * C + c, mask=cm, other=0.0)
        tl.store(wrow + r[:, None] * C + c[None, :], gha[:, None] * av[None, :] + ghm[:, None] * mv[None, :],
                 mask=m2)


@triton.jit
def _bwd_dx_kernel(g, gx, ca, sa_map, gq_map, cidx, pidx, gavg, gmx, wsab, C, H, W, TPI,
                   sgn, sgc, sgh, sgw, son, soc, soh, sow,
                   K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    HW = H * W
    n, p, hh, ww, pm, gs0, gs1, sa, ci = _bwd_pixel_tile(t, TPI, H, W, HW, gq_map, sa_map, cidx, wsab, K, BLOCK_P)
    gb = g + n.to(tl.int64) * sgn + (hh * sgh + ww * sgw)[:, None]
    ob = gx + n.to(tl.int64) * son + (hh * soh + ww * sow)[:, None]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m2 = pm[:, None] & cm[None, :]
        gv = tl.load(gb + (c * sgc)[None, :], mask=m2, other=0.0).to(tl.float32)
        cav = tl.load(ca + n * C + c, mask=cm, other=0.0)
        out = _grad_d1(gv, sa, gs0, gs1, ci, c, C) * cav[None, :]
        out += tl.load(gavg + n * C + c, mask=cm, other=0.0)[None, :]
        pi = tl.load(pidx + n * C + c, mask=cm, other=-1)
        out += tl.where(p[:, None] == pi[None, :], tl.load(gmx + n * C + c, mask=cm, other=0.0)[None, :], 0.0)
        tl.store(ob + (c * soc)[None, :], out.to(gx.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------------------------------
# launchers (the kernel-op schemas of the descriptor in emcad_kernels/ops)
# --------------------------------------------------------------------------------------------------
def tiles(n: int, c: int, hw: int, r: int) -> dict:
    """Pinned tiling, a function of the shape only (so every reduction order is fixed):
    ``BLOCK_P`` pixels × ``BLOCK_C`` channels per block of the pixel-tile kernels, ``BLOCK_T`` partial rows and
    ``BLOCK_CM`` channels per block of the per-sample MLP kernels (``BLOCK_R·BLOCK_CM <= 4096`` values).

    On GPU: ``BLOCK_C`` = 32 channels, ``BLOCK_P`` = 64 pixels, halved (down to 16) while fewer than 264 programs
    (2 per SM of an H100) would exist (the 7×7 and 14×14 stages); 4 warps. No register spills for sm_90 (compile
    check in tests/test_triton_mscam.py); not tuned or timed on a GPU yet.
    Under the interpreter: 16 pixels × 4 channels, 2-row blocks, so tiny odd test shapes see several tiles with a
    ragged last tile, several channel blocks and several row blocks."""
    block_r = next_pow2(max(r, 1))
    if INTERPRET:
        return dict(BLOCK_P=16, BLOCK_C=4, BLOCK_T=2, BLOCK_CM=4, BLOCK_R=block_r, num_warps=1)
    block_p = 64
    while block_p > 16 and n * cdiv(hw, block_p) < 264:
        block_p //= 2
    block_c = min(32, next_pow2(c))
    block_cm = max(1, min(64, next_pow2(c), 4096 // block_r))
    return dict(BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_T=16, BLOCK_CM=block_cm, BLOCK_R=block_r, num_warps=4)


def _prepare(x, fc1, fc2, sab_weight):
    n, c, h, w = x.shape
    r = fc1.shape[0]
    k = int(sab_weight.shape[-1])
    if k % 2 == 0 or k > MAX_KERNEL_SIZE:
        raise ValueError(f"the triton mscam kernels support odd SAB kernel sizes <= {MAX_KERNEL_SIZE}, got {k}")
    tl_ = tiles(n, c, h * w, r)
    tpi = cdiv(h * w, tl_["BLOCK_P"])
    return n, c, h, w, r, k, tl_, tpi, fc1.reshape(r, c).contiguous(), fc2.reshape(c, r).contiguous(), \
        sab_weight.reshape(-1).contiguous()


def _attention(x, w1, w2, ws, activation, n, c, h, w, r, k, tl_, tpi, save):
    """The forward's first three passes: ca (N, C) and the SAB input (N, 2, H, W), fp32; with ``save`` also what
    the backward needs (avg, max, arg-max pixel, W1·avg / W1·max, arg-max channel)."""
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    hw = h * w
    psum = torch.empty((n * tpi, c), **f32)
    pmax = torch.empty((n * tpi, c), **f32)
    pidx = torch.empty((n * tpi, c) if save else (1,), **i32)
    blk = dict(BLOCK_P=tl_["BLOCK_P"], BLOCK_C=tl_["BLOCK_C"], num_warps=tl_["num_warps"])
    _pool_partial_kernel[(n * tpi,)](x, psum, pmax, pidx, c, hw, w, tpi, *x.stride(), WITH_IDX=save, **blk)
    ca = torch.empty((n, c), **f32)
    if save:
        avg, mx, idx, hbuf = (torch.empty((n, c), **f32), torch.empty((n, c), **f32), torch.empty((n, c), **i32),
                              torch.empty((n, 2 * r), **f32))
    else:
        avg = mx = hbuf = ca
        idx = pidx
    _ca_kernel[(n,)](psum, pmax, pidx, w1, w2, ca, avg, mx, idx, hbuf, c, r, tpi, 1.0 / hw,
                     ACT=activation_code(activation), SAVE=save, BLOCK_T=tl_["BLOCK_T"], BLOCK_C=tl_["BLOCK_CM"],
                     BLOCK_R=tl_["BLOCK_R"], num_warps=tl_["num_warps"])
    smap = torch.empty((n, 2, h, w), **f32)
    cidx = torch.empty((n, h, w) if save else (1,), **i32)
    _chan_stats_kernel[(n * tpi,)](x, ca, smap, cidx, c, hw, w, tpi, *x.stride(), WITH_IDX=save, **blk)
    return ca, smap, dict(avg=avg, mx=mx, pidx=idx, h=hbuf, cidx=cidx)


def mscam_forward(x, fc1, fc2, sab_weight, activation):
    if x.numel() == 0:
        return reference.mscam_forward(x, fc1, fc2, sab_weight, activation)
    n, c, h, w, r, k, tl_, tpi, w1, w2, ws = _prepare(x, fc1, fc2, sab_weight)
    ca, smap, _ = _attention(x, w1, w2, ws, activation, n, c, h, w, r, k, tl_, tpi, save=False)
    y = empty_4d(x.shape, x.dtype, x.device, is_channels_last(x))
    _out_kernel[(n * tpi,)](x, y, ca, smap, ws, c, h, w, tpi, *x.stride(), *y.stride(), K=k,
                            BLOCK_P=tl_["BLOCK_P"], BLOCK_C=tl_["BLOCK_C"], num_warps=tl_["num_warps"])
    return y


def mscam_backward(grad, x, fc1, fc2, sab_weight, activation):
    if x.numel() == 0:
        return reference.mscam_backward(grad, x, fc1, fc2, sab_weight, activation)
    n, c, h, w, r, k, tl_, tpi, w1, w2, ws = _prepare(x, fc1, fc2, sab_weight)
    ca, smap, sv = _attention(x, w1, w2, ws, activation, n, c, h, w, r, k, tl_, tpi, save=True)
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    blk = dict(BLOCK_P=tl_["BLOCK_P"], BLOCK_C=tl_["BLOCK_C"], num_warps=tl_["num_warps"])
    sa_map = torch.empty((n, h, w), **f32)
    gq_map = torch.empty((n, h, w), **f32)
    part_ws = torch.empty((n * tpi, 2 * k * k), **f32)
    _bwd_gq_kernel[(n * tpi,)](x, grad, ca, smap, ws, sa_map, gq_map, part_ws, c, h, w, tpi, *x.stride(),
                               *grad.stride(), K=k, **blk)
    part_gca = torch.empty((n * tpi, c), **f32)
    _bwd_gca_kernel[(n * tpi,)](x, grad, sa_map, gq_map, sv["cidx"], ws, part_gca, c, h, w, tpi, *x.stride(),
                                *grad.stride(), K=k, **blk)
    gavg = torch.empty((n, c), **f32)
    gmx = torch.empty((n, c), **f32)
    part_w = torch.empty((n, 2 * r * c), **f32)
    _bwd_mlp_kernel[(n,)](part_gca, ca, sv["h"], sv["avg"], sv["mx"], w1, w2, gavg, gmx, part_w, c, r, tpi,
                          1.0 / (h * w), ACT=activation_code(activation), BLOCK_T=tl_["BLOCK_T"],
                          BLOCK_C=tl_["BLOCK_CM"], BLOCK_R=tl_["BLOCK_R"], num_warps=tl_["num_warps"])
    gx = empty_4d(x.shape, x.dtype, dev, is_channels_last(x))
    _bwd_dx_kernel[(n * tpi,)](grad, gx, ca, sa_map, gq_map, sv["cidx"], sv["pidx"], gavg, gmx, ws, c, h, w, tpi,
                               *grad.stride(), *gx.stride(), K=k, **blk)
    g_w1 = torch.empty_like(fc1, memory_format=torch.contiguous_format)
    g_w2 = torch.empty_like(fc2, memory_format=torch.contiguous_format)
    g_ws = torch.empty_like(sab_weight, memory_format=torch.contiguous_format)
    _reduce.sum_partials(part_w, [g_w1, g_w2])
    _reduce.sum_partials(part_ws, [g_ws])
    return gx, g_w1, g_w2, g_ws
