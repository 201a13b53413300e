"""Checking a backend against the reference: the tolerance rule and deterministic example inputs.

Used by the test suite (``tests/op_cases.py``), ``emcad selftest`` (``emcad_kernels.selftest``) and the op files'
``examples`` (``OpDescriptor.examples``).

Tolerance (docs/numerics.md, KERNELS.md §8.1): for every output and gradient,
``max|backend − ref64| <= 2·max|ref_same_dtype − ref64| + FLOOR[dtype]·max(1, max|ref64|)``, where ``ref64`` is the
reference backend in float64 on the same (rounded) inputs and ``ref_same_dtype`` the reference backend in the
backend's dtype: a fused kernel may be at most twice as far from the exact result as plain PyTorch in that dtype,
plus a floor for entries where plain PyTorch happens to be exact.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def tolerance(dtype: torch.dtype, reference_error: float, reference_absmax: float) -> float:
    """The largest error the rule allows for one entry."""
    return 2 * reference_error + FLOOR[dtype] * max(1.0, reference_absmax)


class Comparison(NamedTuple):
    """One entry (an output, a gradient, an updated running statistic) of a backend against the reference."""

    name: str
    error: float  # max |backend - ref64| (inf when shapes differ or values are not finite)
    tolerance: float
    reference_error: float = 0.0  # max |ref_same_dtype - ref64|
    problem: Optional[str] = None  # why the entry fails beyond the error (shape, non-finite values, missing)

    @property
    def ok(self) -> bool:
        return self.problem is None and self.error <= self.tolerance

    def message(self, label: str = "") -> str:
        where = f"{label} {self.name}".strip()
        if self.problem is not None:
            return f"{where}: {self.problem}"
        return (f"{where}: max error {self.error:.3g} > {self.tolerance:.3g} (the reference in the same dtype: "
                f"{self.reference_error:.3g})")


def compare(actual: dict, same_dtype: dict, ref64: dict, dtype: torch.dtype) -> list[Comparison]:
    """Every entry of ``ref64`` (name -> tensor or None) against ``actual`` under the rule above; ``same_dtype``
    is the reference in ``dtype``. An entry that is None in ``ref64`` (no gradient) must be None or zero in
    ``actual``."""
    out = []
    for name in ref64:
        ref = ref64[name]
        a = actual.get(name)
        if ref is None:
            if a is not None and a.numel() and a.detach().abs().max().item() != 0:
                out.append(Comparison(name, math.inf, 0.0, problem="nonzero where the reference has no value"))
            continue
        if a is None:
            out.append(Comparison(name, math.inf, 0.0, problem="missing (the reference has a value)"))
            continue
        a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
        lp = same_dtype[name].detach().double().cpu()
        if a.shape != ref.shape:
            out.append(Comparison(name, math.inf, 0.0, problem=f"shape {tuple(a.shape)} != {tuple(ref.shape)}"))
            continue
        if a.numel() == 0:
            out.append(Comparison(name, 0.0, 0.0))
            continue
        if not torch.isfinite(a).all():
            out.append(Comparison(name, math.inf, 0.0, problem="non-finite values"))
            continue
        err = (a - ref).abs().max().item()
        err_pt = (lp - ref).abs().max().item()
        out.append(Comparison(name, err, tolerance(dtype, err_pt, ref.abs().max().item()), err_pt))
    missing = [name for name in actual if name not in ref64]
    out += [Comparison(name, math.inf, 0.0, problem="not in the reference's results") for name in missing]
    return out


def assert_matches(actual: dict, same_dtype: dict, ref64: dict, dtype: torch.dtype, label: str) -> None:
    """Every entry of ``actual`` within the tolerance of ``ref64`` (``same_dtype``: the reference in ``dtype``)."""
    assert actual.keys() == ref64.keys(), f"{label}: entries {sorted(actual)} != {sorted(ref64)}"
    for c in compare(actual, same_dtype, ref64, dtype):
        assert c.ok, c.message(label)


def layout_strides(t: Tensor) -> list[int]:
    """The strides that define a tensor's memory layout: those of its dimensions of size > 1 (the others are
    arbitrary, e.g. a ``(N, C, 1, 1)`` output may come with either layout's strides)."""
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


# --------------------------------------------------------------------------------------------------
# example inputs (OpDescriptor.examples)
# --------------------------------------------------------------------------------------------------
class ExampleInputs:
    """Deterministic inputs for one op example on ``device`` in ``dtype``: values are drawn in float64 on the CPU
    from a seeded generator and then cast, so every dtype and device sees the same numbers (the float64 run is the
    exact result of the low-precision inputs' values only up to that cast; the tolerance rule accounts for it by
    measuring the reference in the same dtype). Tensors that ``grad=True`` marks require gradients: those are the
    inputs whose gradients a check compares."""

    def __init__(self, device, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype = torch.device(device), dtype
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def stats_dtype(self) -> torch.dtype:
        """BatchNorm parameters and statistics: float32 for fp16/bf16 inputs (what the models keep)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _place(self, t: Tensor, dtype, grad: bool, channels_last: bool) -> Tensor:
        t = t.to(device=self.device, dtype=dtype or self.dtype)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(grad)

    def randn(self, *shape: int, scale: float = 1.0, offset: float = 0.0, grad: bool = True,
              channels_last: bool = False, dtype: Optional[torch.dtype] = None) -> Tensor:
        t = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale + offset
        return self._place(t, dtype, grad, channels_last)

    def uniform(self, *shape: int, low: float = 0.5, high: float = 1.5, grad: bool = False,
                dtype: Optional[torch.dtype] = None) -> Tensor:
        t = torch.rand(shape, generator=self.gen, dtype=torch.float64) * (high - low) + low
        return self._place(t, dtype, grad, False)

    def integers(self, high: int, *shape: int) -> Tensor:
        return torch.randint(0, high, shape, generator=self.gen).to(self.device)

    def batch_norm(self, channels: int):
        """``BatchNormParams`` away from the trivial values: weight and bias require gradients, the running
        statistics do not (a training-mode call updates them in place)."""
        from .ops._args import BatchNormParams

        sd = self.stats_dtype
        return BatchNormParams(self.randn(channels, scale=0.2, offset=1.0, dtype=sd),
                               self.randn(channels, scale=0.1, dtype=sd),
                               self.randn(channels, scale=0.1, grad=False, dtype=sd),
                               self.uniform(channels, dtype=sd))
