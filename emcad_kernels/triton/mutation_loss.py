"""Fused MUTATION deep-supervision loss statistics: Triton kernels and launchers of the op
``mutation_stats`` (the ``mutation_stats`` op of ``emcad_kernels.library``; semantics below).

Semantics: heads ``z_1..z_n`` (n = 1..4, ``(B, K, h_i, w_i)`` logits, any h_i, w_i >= 1) are bilinearly upsampled
(``F.interpolate(size=(H, W), mode="bilinear", align_corners=False)``: ``scale = in / out``,
``src = max(0, (dst + 0.5)·scale − 0.5)``, ``i0 = ⌊src⌋``, ``i1 = min(i0 + 1, in − 1)``, ``λ = src − i0``) to the
size of ``target`` ``(B, H, W)`` (int64 in ``[0, K)``); for every non-empty subset ``s`` of the heads (in the order
of ``itertools.combinations`` by size: 15 for n = 4) ``p_s = softmax_K(Σ_{i∈s} up(z_i))``, and over all pixels
``ce[s] = Σ −log p_s[target]``, ``inter[s, c] = Σ p_s[c]·[target = c]``, ``psq[s, c] = Σ p_s[c]²``,
``tcount[c] = Σ [target = c]``. Computed in fp32 (fp16 / bf16 logits converted on load), statistics in fp32.

forward (1 launch + 1 fixed-order reduction)
    ``_fwd_kernel``  one program per chunk of ``SUB`` blocks of ``BLOCK_P`` full-resolution pixels (flattened over
                     B·H·W): reads every head bilinearly on the fly (4 taps × K per head), forms the subset sums,
                     their softmaxes, and accumulates (ce, inter, psq, tcount) in registers; one partial row
                     ``[ce (S) | inter (S·K) | psq (S·K) | tcount (K)]`` per program, reduced in a fixed order by
                     ``_reduce.sum_partials`` straight into the four outputs. No atomics.
backward (1 + n launches; nothing of full resolution is stored)
    ``_bwd_rows_kernel``  one program per full-resolution row (b, Y): recomputes the softmaxes along the row in
                          blocks of ``BX`` pixels, ``dz_s = g_ce[s]·(p_s − onehot) + p_s ⊙ (g − ⟨g, p_s⟩)`` with
                          ``g_c = g_inter[s, c]·onehot_c + 2·g_psq[s, c]·p_s[c]``, ``G_i = Σ_{s∋i} dz_s``, and the
                          horizontal half of the bilinear adjoint: ``Rᵢ[b, Y, x', :] += Σ_X wx(X → x')·G_i[X, :]``,
                          summed over a window of ``WIN_i`` consecutive x' per block (a masked sum over the block's
                          pixels) and added to the row's own buffer (the program owns the row: read-modify-write in
                          block order, no atomics). ``Rᵢ`` is ``(B, H, w_i, K)`` fp32.
    ``_bwd_cols_kernel``  per head, one program per (b, y', block of x'): the vertical half as a gather,
                          ``∂z_i[b, :, y', x'] = Σ_Y wy(Y → y')·Rᵢ[b, Y, x', :]`` over the ``CNT`` full-resolution
                          rows that can reach y' (a fixed ascending loop; the weights are recomputed with the
                          forward's formula, so rows outside the exact range get weight 0), stored in the head's
                          dtype and memory format.

Tiles are functions of the shape only (never autotuned), so all sums have a fixed order: bitwise reproducible.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
import triton
import triton.language as tl

from . import _reduce
from ._utils import INTERPRET, cdiv, next_pow2

MAX_HEADS = 4
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def subsets(n: int) -> list[tuple[int, ...]]:
    """The subset order of the interface: by size, then ``itertools.combinations`` order."""
    return [s for r in range(1, n + 1) for s in combinations(range(n), r)]


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _src_index(dst, scale, size):
    """``F.interpolate`` bilinear, ``align_corners=False``: (i0, i1, λ) of destination indices ``dst``."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = src.to(tl.int32)  # src >= 0: truncation is floor
    i1 = tl.minimum(i0 + 1, size - 1)
    return i0, i1, src - i0.to(tl.float32)


@triton.jit
def _upsample(z, b, Y, X, kk, m2, h, w, sn, sc, sh, sw, sch, scw):
    """Bilinear value of head ``z`` at full-resolution pixels (b, Y, X) for classes ``kk``: ``[BLOCK_P, BLOCK_K]``
    fp32 (0 where ``m2`` is false)."""
    y0, y1, ly = _src_index(Y, sch, h)
    x0, x1, lx = _src_index(X, scw, w)
    base = z + b.to(tl.int64)[:, None] * sn + (kk * sc)[None, :]
    v00 = tl.load(base + (y0 * sh + x0 * sw)[:, None], mask=m2, other=0.0).to(tl.float32)
    v01 = tl.load(base + (y0 * sh + x1 * sw)[:, None], mask=m2, other=0.0).to(tl.float32)
    v10 = tl.load(base + (y1 * sh + x0 * sw)[:, None], mask=m2, other=0.0).to(tl.float32)
    v11 = tl.load(base + (y1 * sh + x1 * sw)[:, None], mask=m2, other=0.0).to(tl.float32)
    wx1 = lx[:, None]
    wx0 = 1.0 - wx1
    top = wx0 * v00 + wx1 * v01
    bot = wx0 * v10 + wx1 * v11
    return (1.0 - ly)[:, None] * top + ly[:, None] * bot


@triton.jit
def _upsample_heads(z0, z1, z2, z3, b, Y, X, kk, m2, h0, w0, sn0, sc0, sh0, sw0, sch0, scw0,
                    h1, w1, sn1, sc1, sh1, sw1, sch1, scw1, h2, w2, sn2, sc2, sh2, sw2, sch2, scw2,
                    h3, w3, sn3, sc3, sh3, sw3, sch3, scw3, NH: tl.constexpr):
    """The NH heads upsampled at (b, Y, X) (:func:`_upsample`); heads past NH repeat head 0 (never used)."""
    u0 = _upsample(z0, b, Y, X, kk, m2, h0, w0, sn0, sc0, sh0, sw0, sch0, scw0)
    u1 = u0
    u2 = u0
    u3 = u0
    if NH >= 2:
        u1 = _upsample(z1, b, Y, X, kk, m2, h1, w1, sn1, sc1, sh1, sw1, sch1, scw1)
    if NH >= 3:
        u2 = _upsample(z2, b, Y, X, kk, m2, h2, w2, sn2, sc2, sh2, sw2, sch2, scw2)
    if NH >= 4:
        u3 = _upsample(z3, b, Y, X, kk, m2, h3, w3, sn3, sc3, sh3, sw3, sch3, scw3)
    return u0, u1, u2, u3


@triton.jit
def _pick(i: tl.constexpr, u0, u1, u2, u3):
    out = u0
    if i == 1:
        out = u1
    elif i == 2:
        out = u2
    elif i == 3:
        out = u3
    return out


@triton.jit
def _subset_sum(M: tl.constexpr, NH: tl.constexpr, u0, u1, u2, u3):
    """``Σ_{i∈M} u_i`` in ascending i (``M``: bitmask of the subset; 0 + a = a exactly)."""
    zs = tl.zeros_like(u0)
    for i in tl.static_range(NH):
        if (M >> i) & 1:
            zs += _pick(i, u0, u1, u2, u3)
    return zs


@triton.jit
def _softmax(zs, m2, pm):
    """(p, log Σ exp(z − max), max) per pixel row; rows with ``pm`` false give finite values."""
    zm = tl.where(m2, zs, float("-inf"))
    mx = tl.where(pm, tl.max(zm, 1), 0.0)
    e = tl.where(m2, tl.exp(zs - mx[:, None]), 0.0)
    se = tl.where(pm, tl.sum(e, 1), 1.0)
    return e / se[:, None], tl.log(se), mx


@triton.jit
def _fwd_subset(M: tl.constexpr, s: tl.constexpr, NH: tl.constexpr, u0, u1, u2, u3, onehot, m2, pm, srow,
                acc_ce, acc_in, acc_sq):
    zs = _subset_sum(M, NH, u0, u1, u2, u3)
    p, lse, mx = _softmax(zs, m2, pm)
    ce = tl.where(pm, lse + mx - tl.sum(zs * onehot, 1), 0.0)
    sel = srow == s
    acc_ce += tl.where(sel, tl.sum(ce, 0), 0.0)
    acc_in += tl.where(sel[:, None], tl.sum(p * onehot, 0)[None, :], 0.0)
    acc_sq += tl.where(sel[:, None], tl.sum(p * p, 0)[None, :], 0.0)
    return acc_ce, acc_in, acc_sq


@triton.jit
def _bwd_subset(M: tl.constexpr, s: tl.constexpr, NH: tl.constexpr, u0, u1, u2, u3, onehot, m2, pm, kk, km,
                gce, gin, gsq, K, G0, G1, G2, G3):
    zs = _subset_sum(M, NH, u0, u1, u2, u3)
    p, _, _ = _softmax(zs, m2, pm)
    a = tl.load(gce + s).to(tl.float32)
    gi = tl.load(gin + s * K + kk, mask=km, other=0.0).to(tl.float32)
    gq = tl.load(gsq + s * K + kk, mask=km, other=0.0).to(tl.float32)
    g = gi[None, :] * onehot + 2.0 * gq[None, :] * p
    dz = a * (p - onehot) + p * (g - tl.sum(g * p, 1)[:, None])
    dz = tl.where(m2, dz, 0.0)
    if M & 1:
        G0 += dz
    if (M >> 1) & 1:
        G1 += dz
    if (M >> 2) & 1:
        G2 += dz
    if (M >> 3) & 1:
        G3 += dz
    return G0, G1, G2, G3


@triton.jit
def _pair_index(i: tl.constexpr, j: tl.constexpr, NH: tl.constexpr):
    """Position of subset {i, j} (i < j) in the interface order: after the NH singletons, combinations order."""
    return NH + (i * (2 * NH - i - 1)) // 2 + (j - i - 1)


@triton.jit
def _row_window_add(G, X, xm, km, kk, w, scw, rrow, K, WIN: tl.constexpr):
    """``rrow[x', :] += Σ_X wx(X → x')·G[X, :]`` for the ≤ WIN consecutive x' reached by this block of pixels."""
    x0, x1, lx = _src_index(X, scw, w)
    xs = tl.min(tl.where(xm, x0, 2147483647), 0)
    xo = xs + tl.arange(0, WIN)
    wgt = tl.where(x0[:, None] == xo[None, :], (1.0 - lx)[:, None], 0.0) + \
        tl.where(x1[:, None] == xo[None, :], lx[:, None], 0.0)
    wgt = tl.where(xm[:, None], wgt, 0.0)
    contrib = tl.sum(wgt[:, :, None] * G[:, None, :], 0)  # [WIN, BLOCK_K]
    ptr = rrow + xo[:, None] * K + kk[None, :]
    m = (xo < w)[:, None] & km[None, :]
    old = tl.load(ptr, mask=m, other=0.0)
    tl.store(ptr, old + contrib, mask=m)


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(z0, z1, z2, z3, tgt, part, NPIX, HW, W, K, stn, sth, stw,
                h0, w0, sn0, sc0, sh0, sw0, sch0, scw0, h1, w1, sn1, sc1, sh1, sw1, sch1, scw1,
                h2, w2, sn2, sc2, sh2, sw2, sch2, scw2, h3, w3, sn3, sc3, sh3, sw3, sch3, scw3,
                NH: tl.constexpr, S: tl.constexpr, SUB: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    chunk = tl.program_id(0)
    kk = tl.arange(0, BLOCK_K)
    km = kk < K
    srow = tl.arange(0, BLOCK_S)
    acc_ce = tl.zeros([BLOCK_S], tl.float32)
    acc_in = tl.zeros([BLOCK_S, BLOCK_K], tl.float32)
    acc_sq = tl.zeros([BLOCK_S, BLOCK_K], tl.float32)
    acc_t = tl.zeros([BLOCK_K], tl.float32)
    for sub in range(SUB):
        pix = (chunk * SUB + sub) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = pix < NPIX
        b = pix // HW
        r = pix % HW
        Y = r // W
        X = r % W
        m2 = pm[:, None] & km[None, :]
        t = tl.load(tgt + b.to(tl.int64) * stn + Y * sth + X * stw, mask=pm, other=0)
        onehot = tl.where((kk[None, :] == t[:, None]) & m2, 1.0, 0.0)
        acc_t += tl.sum(onehot, 0)
        u0, u1, u2, u3 = _upsample_heads(z0, z1, z2, z3, b, Y, X, kk, m2,
                                         h0, w0, sn0, sc0, sh0, sw0, sch0, scw0, h1, w1, sn1, sc1, sh1, sw1, sch1,
                                         scw1, h2, w2, sn2, sc2, sh2, sw2, sch2, scw2, h3, w3, sn3, sc3, sh3, sw3,
                                         sch3, scw3, NH)
        for i in tl.static_range(NH):  # singletons: s = i
            acc_ce, acc_in, acc_sq = _fwd_subset(1 << i, i, NH, u0, u1, u2, u3, onehot, m2, pm, srow,
                                                 acc_ce, acc_in, acc_sq)
        for i in tl.static_range(NH):  # pairs
            for j in tl.static_range(i + 1, NH):
                acc_ce, acc_in, acc_sq = _fwd_subset((1 << i) | (1 << j), _pair_index(i, j, NH), NH,
                                                     u0, u1, u2, u3, onehot, m2, pm, srow, acc_ce, acc_in, acc_sq)
        if NH == 3:
            acc_ce, acc_in, acc_sq = _fwd_subset(7, 6, NH, u0, u1, u2, u3, onehot, m2, pm, srow,
                                                 acc_ce, acc_in, acc_sq)
        if NH == 4:
            for q in tl.static_range(4):  # triples in combinations order: (0,1,2), (0,1,3), (0,2,3), (1,2,3)
                acc_ce, acc_in, acc_sq = _fwd_subset(15 ^ (1 << (3 - q)), 10 + q, NH, u0, u1, u2, u3, onehot, m2,
                                                     pm, srow, acc_ce, acc_in, acc_sq)
            acc_ce, acc_in, acc_sq = _fwd_subset(15, 14, NH, u0, u1, u2, u3, onehot, m2, pm, srow,
                                                 acc_ce, acc_in, acc_sq)
    row = S + 2 * S * K + K
    prow = part + chunk.to(tl.int64) * row
    sm = srow < S
    tl.store(prow + srow, acc_ce, mask=sm)
    m = sm[:, None] & km[None, :]
    tl.store(prow + S + srow[:, None] * K + kk[None, :], acc_in, mask=m)
    tl.store(prow + S + S * K + srow[:, None] * K + kk[None, :], acc_sq, mask=m)
    tl.store(prow + S + 2 * S * K + kk, acc_t, mask=km)


@triton.jit
def _bwd_rows_kernel(z0, z1, z2, z3, tgt, gce, gin, gsq, r0, r1, r2, r3, H, W, K, stn, sth, stw,
                     h0, w0, sn0, sc0, sh0, sw0, sch0, scw0, h1, w1, sn1, sc1, sh1, sw1, sch1, scw1,
                     h2, w2, sn2, sc2, sh2, sw2, sch2, scw2, h3, w3, sn3, sc3, sh3, sw3, sch3, scw3,
                     NH: tl.constexpr, BX: tl.constexpr, WIN0: tl.constexpr, WIN1: tl.constexpr,
                     WIN2: tl.constexpr, WIN3: tl.constexpr, ZB: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)  # full-resolution row (b, Y)
    b = row // H
    Ys = row % H
    kk = tl.arange(0, BLOCK_K)
    km = kk < K
    # this program owns rows `row` of every Rᵢ (B, H, w_i, K): zero them first
    rr0 = r0 + row.to(tl.int64) * (w0 * K)
    rr1 = r1 + row.to(tl.int64) * (w1 * K)
    rr2 = r2 + row.to(tl.int64) * (w2 * K)
    rr3 = r3 + row.to(tl.int64) * (w3 * K)
    zb = tl.arange(0, ZB)
    for o in range(0, w0 * K, ZB):
        tl.store(rr0 + o + zb, tl.zeros([ZB], tl.float32), mask=o + zb < w0 * K)
    if NH >= 2:
        for o in range(0, w1 * K, ZB):
            tl.store(rr1 + o + zb, tl.zeros([ZB], tl.float32), mask=o + zb < w1 * K)
    if NH >= 3:
        for o in range(0, w2 * K, ZB):
            tl.store(rr2 + o + zb, tl.zeros([ZB], tl.float32), mask=o + zb < w2 * K)
    if NH >= 4:
        for o in range(0, w3 * K, ZB):
            tl.store(rr3 + o + zb, tl.zeros([ZB], tl.float32), mask=o + zb < w3 * K)
    tl.debug_barrier()
    for x_start in range(0, W, BX):
        X = x_start + tl.arange(0, BX)
        xm = X < W
        bv = b + tl.zeros([BX], tl.int32)
        Y = Ys + tl.zeros([BX], tl.int32)
        m2 = xm[:, None] & km[None, :]
        t = tl.load(tgt + b.to(tl.int64) * stn + Ys * sth + X * stw, mask=xm, other=0)
        onehot = tl.where((kk[None, :] == t[:, None]) & m2, 1.0, 0.0)
        u0, u1, u2, u3 = _upsample_heads(z0, z1, z2, z3, bv, Y, X, kk, m2,
                                         h0, w0, sn0, sc0, sh0, sw0, sch0, scw0, h1, w1, sn1, sc1, sh1, sw1, sch1,
                                         scw1, h2, w2, sn2, sc2, sh2, sw2, sch2, scw2, h3, w3, sn3, sc3, sh3, sw3,
                                         sch3, scw3, NH)
        G0 = tl.zeros([BX, BLOCK_K], tl.float32)
        G1 = tl.zeros([BX, BLOCK_K], tl.float32)
        G2 = tl.zeros([BX, BLOCK_K], tl.float32)
        G3 = tl.zeros([BX, BLOCK_K], tl.float32)
        for i in tl.static_range(NH):
            G0, G1, G2, G3 = _bwd_subset(1 << i, i, NH, u0, u1, u2, u3, onehot, m2, xm, kk, km, gce, gin, gsq, K,
                                         G0, G1, G2, G3)
        for i in tl.static_range(NH):
            for j in tl.static_range(i + 1, NH):
                G0, G1, G2, G3 = _bwd_subset((1 << i) | (1 << j), _pair_index(i, j, NH), NH, u0, u1, u2, u3,
                                             onehot, m2, xm, kk, km, gce, gin, gsq, K, G0, G1, G2, G3)
        if NH == 3:
            G0, G1, G2, G3 = _bwd_subset(7, 6, NH, u0, u1, u2, u3, onehot, m2, xm, kk, km, gce, gin, gsq, K,
                                         G0, G1, G2, G3)
        if NH == 4:
            for q in tl.static_range(4):
                G0, G1, G2, G3 = _bwd_subset(15 ^ (1 << (3 - q)), 10 + q, NH, u0, u1, u2, u3, onehot, m2, xm, kk,
                                             km, gce, gin, gsq, K, G0, G1, G2, G3)
            G0, G1, G2, G3 = _bwd_subset(15, 14, NH, u0, u1, u2, u3, onehot, m2, xm, kk, km, gce, gin, gsq, K,
                                         G0, G1, G2, G3)
        _row_window_add(G0, X, xm, km, kk, w0, scw0, rr0, K, WIN0)
        if NH >= 2:
            _row_window_add(G1, X, xm, km, kk, w1, scw1, rr1, K, WIN1)
        if NH >= 3:
            _row_window_add(G2, X, xm, km, kk, w2, scw2, rr2, K, WIN2)
        if NH >= 4:
            _row_window_add(G3, X, xm, km, kk, w3, scw3, rr3, K, WIN3)
        tl.debug_barrier()  # the next block's read-modify-write of overlapping x' sees these stores


@triton.jit
def _bwd_cols_kernel(rbuf, out, H, K, h, w, son, soc, soh, sow, sch, inv_sch, CNT,
                     BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr):
    by = tl.program_id(0)  # (b, y')
    b = by // h
    yo = by % h
    xo = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    xm = xo < w
    kk = tl.arange(0, BLOCK_K)
    km = kk < K
    # full-resolution rows Y with src(Y) in [y' − 1, y' + 1) start at or after ylo (one row of slack)
    ylo = tl.maximum(tl.floor((yo.to(tl.float32) - 0.5) * inv_sch - 0.5).to(tl.int32) - 1, 0)
    acc = tl.zeros([BLOCK_X, BLOCK_K], tl.float32)
    for d in range(CNT):
        Yr = ylo + d
        y0, y1, ly = _src_index(Yr, sch, h)
        wgt = tl.where(y0 == yo, 1.0 - ly, 0.0) + tl.where(y1 == yo, ly, 0.0)
        xlim = tl.where(Yr < H, w, 0)  # (a scalar-bool & vector mask is not supported by the interpreter)
        m = (xo < xlim)[:, None] & km[None, :]
        v = tl.load(rbuf + ((b * H + Yr).to(tl.int64) * w + xo)[:, None] * K + kk[None, :], mask=m, other=0.0)
        acc += wgt * v
    op = out + b.to(tl.int64) * son + yo * soh + (xo * sow)[:, None] + (kk * soc)[None, :]
    tl.store(op, acc.to(out.dtype.element_ty), mask=xm[:, None] & km[None, :])


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def _check(logits, target):
    n = len(logits)
    if not 1 <= n <= MAX_HEADS:
        raise ValueError(f"logits must hold 1 to {MAX_HEADS} heads, got {n}")
    for i, z in enumerate(logits):
        if z.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"logits[{i}] has dtype {z.dtype}; the triton kernels take float32, float16, bfloat16")
    bsz, k = logits[0].shape[:2]
    h, w = target.shape[-2:]
    return n, bsz, k, h, w


def _heads(logits, h, w):
    """Per-head scalar arguments (h, w, strides, scale_h, scale_w), padded to MAX_HEADS with head 0."""
    args = []
    for z in list(logits) + [logits[0]] * (MAX_HEADS - len(logits)):
        hi, wi = z.shape[-2:]
        args += [hi, wi, *z.stride(), hi / h, wi / w]
    return args


def tiles(npix: int, k: int) -> dict:
    """Pinned tiling (a function of the shape only). GPU: blocks of 32 pixels (``BLOCK_K = next_pow2(K)``
    classes), programs of up to ``SUB`` blocks so that there are at most ~2048 partial rows; row kernel blocks of
    16 pixels (sm_90 compile check, four heads, K = 9: 64 pixels spill 440 bytes in the forward, 32-pixel row
    blocks 1 KB in the backward). Not tuned on a GPU yet. Interpreter: 16-pixel blocks, SUB = 2 and 8-pixel row blocks, so the tiny
    test images see ragged blocks, programs whose last block lies past the end and several blocks per row."""
    block_k = next_pow2(max(k, 2))
    if INTERPRET:
        return dict(BLOCK_P=16, SUB=2, BX=8, BLOCK_K=block_k, num_warps=1, BLOCK_X=8)
    block_p = 32 if block_k <= 16 else 16
    blocks = cdiv(npix, block_p)
    return dict(BLOCK_P=block_p, SUB=max(1, cdiv(blocks, 2048)), BX=16 if block_k <= 16 else 8, BLOCK_K=block_k,
                num_warps=4, BLOCK_X=32)


def mutation_stats_forward(logits, target):
    """``(ce (S,), inter (S, K), psq (S, K), tcount (K,))``, fp32, of the MUTATION subsets (module docstring)."""
    n, bsz, k, h, w = _check(logits, target)
    s = 2 ** n - 1
    dev = target.device
    outs = [torch.empty((s,), dtype=torch.float32, device=dev), torch.empty((s, k), dtype=torch.float32, device=dev),
            torch.empty((s, k), dtype=torch.float32, device=dev), torch.empty((k,), dtype=torch.float32, device=dev)]
    npix = bsz * h * w
    if npix == 0:
        for o in outs:
            o.zero_()
        return tuple(outs)
    tl_ = tiles(npix, k)
    chunks = cdiv(cdiv(npix, tl_["BLOCK_P"]), tl_["SUB"])
    part = torch.empty((chunks, s + 2 * s * k + k), dtype=torch.float32, device=dev)
    zs = list(logits) + [logits[0]] * (MAX_HEADS - n)
    _fwd_kernel[(chunks,)](*zs, target, part, npix, h * w, w, k, *target.stride(), *_heads(logits, h, w),
                           NH=n, S=s, SUB=tl_["SUB"], BLOCK_S=next_pow2(s), BLOCK_P=tl_["BLOCK_P"],
                           BLOCK_K=tl_["BLOCK_K"], num_warps=tl_["num_warps"])
    _reduce.sum_partials(part, outs)
    return tuple(outs)


def mutation_stats_backward(grad_ce, grad_inter, grad_psq, logits, target):
    """``∂L/∂logits[i]`` for upstream gradients of (ce, inter, psq); same shape, dtype and memory format as each
    head."""
    n, bsz, k, h, w = _check(logits, target)
    s = 2 ** n - 1
    dev = target.device
    grads = [torch.empty_like(z) for z in logits]
    if bsz * h * w == 0 or k == 0:
        for g in grads:
            g.zero_()
        return grads
    tl_ = tiles(bsz * h * w, k)
    gce = grad_ce.to(torch.float32).contiguous()
    gin = grad_inter.to(torch.float32).contiguous()
    gsq = grad_psq.to(torch.float32).contiguous()
    rbufs = [torch.empty((bsz, h, z.shape[-1], k), dtype=torch.float32, device=dev) for z in logits]
    bx = tl_["BX"]
    # x' reached by BX consecutive full-resolution pixels: at most ⌈(BX − 1)·w_i / W⌉ + 2 (+1 for rounding)
    wins = [next_pow2(math.ceil((bx - 1) * z.shape[-1] / w) + 3) for z in logits]
    wins += [wins[0]] * (MAX_HEADS - n)
    zs = list(logits) + [logits[0]] * (MAX_HEADS - n)
    rs = rbufs + [rbufs[0]] * (MAX_HEADS - n)
    _bwd_rows_kernel[(bsz * h,)](*zs, target, gce, gin, gsq, *rs, h, w, k, *target.stride(), *_heads(logits, h, w),
                                 NH=n, BX=bx, WIN0=wins[0], WIN1=wins[1], WIN2=wins[2], WIN3=wins[3],
                                 ZB=64 if INTERPRET else 256, BLOCK_K=tl_["BLOCK_K"], num_warps=tl_["num_warps"])
    for z, g, rb in zip(logits, grads, rbufs):
        hi, wi = z.shape[-2:]
        sch = hi / h
        # rows Y that can reach y': src(Y) ∈ [y' − 1, y' + 1), i.e. fewer than 2/sch + 2 rows after ylo's slack
        cnt = math.ceil(2 / sch) + 4
        _bwd_cols_kernel[(bsz * hi, cdiv(wi, tl_["BLOCK_X"]))](
            rb, g, h, k, hi, wi, *g.stride(), sch, 1.0 / sch, cnt, BLOCK_X=tl_["BLOCK_X"], BLOCK_K=tl_["BLOCK_K"],
            num_warps=tl_["num_warps"])
    return grads
