"""Deterministic reductions of per-program partials (docs/kernels.md#training-mode-batchnorm,
docs/kernels.md#deterministic-reductions).

Kernels that need a sum over (N, H, W) write one row of partial results per spatial tile into an fp32 scratch
buffer ``[T, R]`` (T tiles, R reduced quantities); the kernels here combine the T rows in a fixed order:
vectorised blocks of ``BLOCK_T`` rows accumulated in sequence, then one ``tl.sum`` over the block. Block sizes
are constants, so the result is bitwise reproducible for a given shape and device kind. No atomics.

* ``sum_partials(part, outs)``: column sums, scattered into up to four output tensors (consecutive column
  segments, each cast to its output's dtype): weight gradients, bias gradients, BatchNorm-parameter gradients.
* ``merge_stats(mean_part, m2_part, count, outs)``: BatchNorm batch statistics from per-tile (count, mean, M2)
  (Chan et al.'s parallel variance, in the form ``mean = Σ nₜ·meanₜ / N``,
  ``var = Σ (M2ₜ + nₜ·(meanₜ − mean)²) / N``, which has no cancellation): biased variance, as BatchNorm uses.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, cdiv

BLOCK_T = 8 if INTERPRET else 32
BLOCK_R = 32 if INTERPRET else 64
NUM_WARPS = 1 if INTERPRET else 4


@triton.jit
def _store_segments(v, r, R, out0, out1, out2, out3, L0, L1, L2):
    e1 = L0
    e2 = L0 + L1
    e3 = e2 + L2
    tl.store(out0 + r, v.to(out0.dtype.element_ty), mask=r < e1)
    tl.store(out1 + (r - e1), v.to(out1.dtype.element_ty), mask=(r >= e1) & (r < e2))
    tl.store(out2 + (r - e2), v.to(out2.dtype.element_ty), mask=(r >= e2) & (r < e3))
    tl.store(out3 + (r - e3), v.to(out3.dtype.element_ty), mask=(r >= e3) & (r < R))


@triton.jit
def _sum_partials_kernel(part, T, R, out0, out1, out2, out3, L0, L1, L2,
                         BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    acc = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = (t[:, None] < T) & rmask[None, :]
        acc += tl.load(part + t[:, None].to(tl.int64) * R + r[None, :], mask=m, other=0.0)
    _store_segments(tl.sum(acc, 0), r, R, out0, out1, out2, out3, L0, L1, L2)


@triton.jit
def _merge_stats_kernel(mean_part, m2_part, count, T, R, mean0, var0, mean1, var1, L0,
                        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    acc_n = tl.zeros([BLOCK_T], tl.float32)
    acc_nm = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        nt = tl.load(count + t, mask=t < T, other=0.0)
        m = (t[:, None] < T) & rmask[None, :]
        mt = tl.load(mean_part + t[:, None].to(tl.int64) * R + r[None, :], mask=m, other=0.0)
        acc_n += nt
        acc_nm += nt[:, None] * mt
    total = tl.sum(acc_n, 0)
    mean = tl.sum(acc_nm, 0) / total
    acc_m2 = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        nt = tl.load(count + t, mask=t < T, other=0.0)
        m = (t[:, None] < T) & rmask[None, :]
        offs = t[:, None].to(tl.int64) * R + r[None, :]
        mt = tl.load(mean_part + offs, mask=m, other=0.0)
        m2t = tl.load(m2_part + offs, mask=m, other=0.0)
        d = mt - mean[None, :]
        acc_m2 += m2t + nt[:, None] * d * d
    var = tl.sum(acc_m2, 0) / total
    tl.store(mean0 + r, mean.to(mean0.dtype.element_ty), mask=r < L0)
    tl.store(var0 + r, var.to(var0.dtype.element_ty), mask=r < L0)
    tl.store(mean1 + (r - L0), mean.to(mean1.dtype.element_ty), mask=(r >= L0) & rmask)
    tl.store(var1 + (r - L0), var.to(var1.dtype.element_ty), mask=(r >= L0) & rmask)


def sum_partials(part: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
    """Column sums of ``part [T, R]`` written to ``outs`` (contiguous; numels add up to R), in order."""
    t, r = part.shape
    outs = list(outs)
    assert 1 <= len(outs) <= 4 and sum(o.numel() for o in outs) == r, (r, [o.shape for o in outs])
    assert all(o.is_contiguous() for o in outs)
    lengths = [o.numel() for o in outs] + [0] * (4 - len(outs))
    outs = outs + [outs[0]] * (4 - len(outs))
    _sum_partials_kernel[(cdiv(r, BLOCK_R),)](part, t, r, *outs, *lengths[:3], BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R,
                                             num_warps=NUM_WARPS)


def merge_stats(mean_part: torch.Tensor, m2_part: torch.Tensor, count: torch.Tensor,
                outs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Batch mean and biased variance per column of the per-tile statistics, into one or two (mean, var)
    pairs of contiguous outputs covering consecutive column segments."""
    t, r = mean_part.shape
    outs = list(outs)
    assert 1 <= len(outs) <= 2 and sum(m.numel() for m, _ in outs) == r
    first = outs[0][0].numel()
    if len(outs) == 1:
        outs = outs * 2
    (m0, v0), (m1, v1) = outs
    _merge_stats_kernel[(cdiv(r, BLOCK_R),)](mean_part, m2_part, count, t, r, m0, v0, m1, v1, first,
                                             BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R, num_warps=NUM_WARPS)
