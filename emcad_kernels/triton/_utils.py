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

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])


def _fix_interpreter_scalar_index() -> bool:
    """Lets the interpreter use a runtime scalar as a Python index, as in ``for t0 in range(0, T, BLOCK)``.

    The interpreter holds a scalar kernel argument as a one-element numpy array and converts it with
    ``int(array)``, which numpy >= 2.4 refuses for arrays with a dimension ("only 0-dimensional arrays can be
    converted to Python scalars"); Triton 3.7 squeezes the array first. Older Triton versions get the same
    conversion here. Only the interpreter is touched, so compiled kernels are unchanged. Returns whether the fix
    was installed (it is only where the probe below fails)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or getattr(original, "squeezes_scalar_index", False):
        return False
    scope = scope_type()
    try:
        original(tl.tensor, scope)
        probe = tl.tensor(interpreter.TensorHandle(np.array([3], dtype=np.int32), tl.int32), tl.int32)
        range(probe)
        return False
    except TypeError:
        pass
    finally:
        scope.restore()

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if INTERPRET:
    _fix_interpreter_scalar_index()

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# activation codes (constexpr inside kernels): the EmcadActivation codes of csrc/common/codes.h, like the C++ and
# CUDA kernels (tests/test_native_codes.py checks that they match)
ACTIVATION_CODES = {"identity": 0, "relu": 1, "relu6": 2, "leakyrelu": 3, "hswish": 4, "gelu": 5}
_RELU = tl.constexpr(ACTIVATION_CODES["relu"])
_RELU6 = tl.constexpr(ACTIVATION_CODES["relu6"])
_LEAKYRELU = tl.constexpr(ACTIVATION_CODES["leakyrelu"])
_HSWISH = tl.constexpr(ACTIVATION_CODES["hswish"])
_GELU = tl.constexpr(ACTIVATION_CODES["gelu"])

LEAKY_SLOPE = tl.constexpr(0.2)  # EMCAD.md §2.1; EMCAD_LEAKY_SLOPE of csrc/common/codes.h


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def activation_code(name: str) -> int:
    try:
        return ACTIVATION_CODES[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported by the triton backend") from None


AUTOTUNE_ENV = "EMCAD_TRITON_AUTOTUNE"


def _prune_configs(configs, named_args, **kwargs):
    """``EMCAD_TRITON_AUTOTUNE=0`` (read at each tuning) keeps only the first configuration: no benchmarking and one
    compilation per kernel variant, for tests and quick runs on a GPU."""
    return configs[:1] if os.environ.get(AUTOTUNE_ENV, "1") == "0" else configs


def autotune(configs: list, key: list[str], interpreter_config: "triton.Config"):
    """``triton.autotune`` with ``configs`` on GPU and exactly ``interpreter_config`` under the interpreter."""
    return triton.autotune(configs=[interpreter_config] if INTERPRET else configs, key=key,
                           prune_configs_by={"early_config_prune": _prune_configs})


def config(num_warps: int = 4, num_stages: int = 2, **block) -> "triton.Config":
    return triton.Config(block, num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------------------------
# pinned tiles for kernels that write reduction partials
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """A spatial tile ``BLOCK_H × BLOCK_W`` (flattened, W fastest) times ``BLOCK_C`` channels; kernels that write
    reduction partials let one program loop over ``SUB`` consecutive tiles (a *chunk*) and write one partial row
    per chunk, so partial buffers stay small while tiles stay small enough not to spill registers."""

    BLOCK_H: int
    BLOCK_W: int
    BLOCK_C: int
    num_warps: int
    SUB: int = 1

    def tiles_per_image(self, h: int, w: int) -> int:
        return cdiv(h, self.BLOCK_H) * cdiv(w, self.BLOCK_W)

    def num_tiles(self, n: int, h: int, w: int) -> int:
        return n * self.tiles_per_image(h, w)

    def num_chunks(self, n: int, h: int, w: int) -> int:
        return cdiv(self.num_tiles(n, h, w), self.SUB)

    def grid(self, n: int, h: int, w: int, c: int) -> tuple[int, int]:
        """One program per tile and channel block."""
        return (self.num_tiles(n, h, w), cdiv(c, self.BLOCK_C))

    def chunk_grid(self, n: int, h: int, w: int, c: int) -> tuple[int, int]:
        """One program per chunk of SUB tiles and channel block."""
        return (self.num_chunks(n, h, w), cdiv(c, self.BLOCK_C))

    def meta(self, sub: bool = False) -> dict:
        out = dict(BLOCK_H=self.BLOCK_H, BLOCK_W=self.BLOCK_W, BLOCK_C=self.BLOCK_C, num_warps=self.num_warps)
        if sub:
            out["SUB"] = self.SUB
        return out


# Interpreter tiles are small on purpose: the CPU tests use tiny odd shapes and must still see several
# spatial tiles with ragged edges, a channel count that is not a multiple of the channel block, and chunks whose
# last tiles lie past the end (SUB = 3).
INTERPRETER_TILE = Tile(BLOCK_H=8, BLOCK_W=8, BLOCK_C=4, num_warps=1, SUB=3)


def reduction_tile(h: int, w: int, c: int, pixels: int = 32, max_block_c: int = 32, sub: int = 8) -> Tile:
    """Tile for kernels writing reduction partials: a function of the shape only, never autotuned, so the
    reduction tree is fixed. 32 pixels × 32 channels on 8 warps (4 values per thread): the heavily unrolled
    stencils spill registers with more (sm_90 compile check, ``cuobjdump --dump-resource-usage``); ``SUB`` tiles
    per program keep the partial buffers at 1/256 of the pixels."""
    if INTERPRET:
        return INTERPRETER_TILE
    block_w = min(next_pow2(w), 8)
    block_h = max(1, pixels // block_w)
    block_c = min(next_pow2(c), max_block_c)
    num_warps = 8 if block_h * block_w * block_c >= 1024 else 4
    return Tile(block_h, block_w, block_c, num_warps, sub)


_SPATIAL_CANDIDATES = [  # (BLOCK_H, BLOCK_W, BLOCK_C, num_warps)
    (4, 8, 32, 8), (2, 8, 32, 4), (8, 8, 32, 8), (4, 8, 64, 8), (2, 8, 64, 8), (2, 16, 32, 8)]


def spatial_configs(max_per_thread: int = 8, limit: int = 4) -> list:
    """The small autotuning set of the elementwise (non-reducing) passes on GPU: at most ``limit`` configurations
    holding at most ``max_per_thread`` values of a tile per thread, the most the unrolled stencils keep in registers
    without spilling on sm_90 (compile check with ``cuobjdump --dump-resource-usage``: the forward stencils take 8,
    the backward ∂L/∂z passes 4). Each configuration costs seconds of compilation at first use."""
    out = [config(BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=nw) for bh, bw, bc, nw in _SPATIAL_CANDIDATES
           if bh * bw * bc <= max_per_thread * 32 * nw]
    return out[:limit]


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
    if ACT == _RELU:
        out = tl.maximum(z, 0.0)
    elif ACT == _RELU6:
        out = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACT == _LEAKYRELU:
        out = tl.where(z > 0.0, z, z * LEAKY_SLOPE)
    elif ACT == _HSWISH:
        out = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACT == _GELU:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        out = z
    return out


@triton.jit
def activate_grad(z, g, ACT: tl.constexpr):
    """``g · act'(z)`` with PyTorch's conventions at the kinks (relu: 0 at 0; hardtanh: 0 at both ends)."""
    if ACT == _RELU:
        out = tl.where(z > 0.0, g, 0.0)
    elif ACT == _RELU6:
        out = tl.where((z > 0.0) & (z < 6.0), g, 0.0)
    elif ACT == _LEAKYRELU:
        out = tl.where(z > 0.0, g, g * LEAKY_SLOPE)
    elif ACT == _HSWISH:
        out = tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, g * (z / 3.0 + 0.5), g))
    elif ACT == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        out = g * (cdf + z * pdf)
    else:
        out = g
    return out


@triton.jit
def tile_coords(t, N, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Tile index ``t`` (over N × tiles-per-image) → (n, h[P], w[P], valid[P], count) with P = BLOCK_H·BLOCK_W.
    Tiles past the end (t >= N × tiles-per-image, the tail of the last chunk) have no valid pixel and count 0."""
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_per_image = tl.cdiv(H, BLOCK_H) * tiles_w
    n = t // tiles_per_image
    r = t % tiles_per_image
    h0 = (r // tiles_w) * BLOCK_H
    w0 = (r % tiles_w) * BLOCK_W
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    hh = h0 + p // BLOCK_W
    ww = w0 + p % BLOCK_W
    h_live = tl.where(n < N, H, 0)  # (a scalar-bool & vector mask is not supported by the interpreter)
    valid = (hh < h_live) & (ww < W)
    count = tl.where(n < N, tl.minimum(H - h0, BLOCK_H) * tl.minimum(W - w0, BLOCK_W), 0).to(tl.float32)
    return n, hh, ww, valid, count


@triton.jit
def tile_mean_m2(z, valid2d, count):
    """Per-column mean and sum of squared deviations of ``z`` over the valid rows (exact two-pass in registers);
    (0, 0) for an empty tile."""
    mean = tl.sum(tl.where(valid2d, z, 0.0), 0) / tl.maximum(count, 1.0)
    d = tl.where(valid2d, z - mean[None, :], 0.0)
    return mean, tl.sum(d * d, 0)


@triton.jit
def welford_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of (count, mean, M2) statistics; the counts are scalars, ``n_b`` may be 0."""
    n = tl.maximum(n_a + n_b, 1.0)
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@triton.jit
def accumulate_partial(ptr, value, c, C, first):
    """``*ptr (+)= value`` on a program's own partial row: stored on the chunk's first tile, added afterwards.
    Call ``tl.debug_barrier()`` before the next read-modify-write of the same row (other threads may own the
    element)."""
    old = tl.load(ptr, mask=c < tl.where(first, 0, C), other=0.0)
    tl.store(ptr, old + value, mask=c < C)


@triton.jit
def first_program_limit(n, t):
    """``n`` for the program with tile index 0, else 0: use as ``mask = idx < limit`` for stores that exactly one
    program along the tile axis performs (scalar-and-vector masks are not supported by the interpreter)."""
    return n * (t == 0).to(tl.int32)
