"""Loads the compiled extension ``emcad_kernels._C`` (the C++/OpenMP CPU kernels of the ``cpu`` backend).

The package imports without it: ``HAS_CPU_EXT`` is then False and ``CPU_EXT_ERROR`` says what is missing and
how to build it; the ``cpu`` backend reports that reason and ``auto`` selection falls back to ``reference``.
"""

from __future__ import annotations

from typing import Optional

import torch

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` in the repository root (needs a C++17 "
              "compiler with OpenMP; see ENVIRONMENT.md §5)")

HAS_CPU_EXT = False
CPU_EXT_ERROR: Optional[str] = None

_KERNEL_OPS = ("msdc_fwd_cpu_kernel", "msdc_bwd_cpu_kernel", "updw_fwd_cpu_kernel", "updw_bwd_cpu_kernel",
               "lgag_fwd_cpu_kernel", "lgag_bwd_cpu_kernel")

try:
    from . import _C  # noqa: F401  (registers the emcad_kernels::*_cpu_kernel ops)
except ImportError as e:  # not built, or built against another torch (undefined symbols)
    CPU_EXT_ERROR = f"extension not built: emcad_kernels._C cannot be imported ({e}); {BUILD_HINT}"
else:
    _missing = [op for op in _KERNEL_OPS if not hasattr(torch.ops.emcad_kernels, op)]
    if _missing:
        CPU_EXT_ERROR = (f"extension not built: emcad_kernels._C lacks the ops {', '.join(_missing)} (stale build?); "
                         f"{BUILD_HINT}")
    else:
        HAS_CPU_EXT = True


def require_cpu_ext() -> None:
    """Raises ImportError with the reason if the CPU extension is not usable."""
    if not HAS_CPU_EXT:
        raise ImportError(CPU_EXT_ERROR)


def cpu_isa() -> str:
    """The instruction set of the kernel build in use: ``"avx512"``, ``"avx2"`` or ``"default"`` (SSE2)."""
    require_cpu_ext()
    return torch.ops.emcad_kernels.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Selects the kernel build: ``"auto"`` (best for this CPU), ``"avx512"``, ``"avx2"`` or ``"default"``.
    The environment variable ``EMCAD_CPU_ISA`` sets the initial choice."""
    require_cpu_ext()
    if not torch.ops.emcad_kernels.cpu_set_isa(name):
        raise ValueError(f"instruction set {name!r} is unknown or not supported by this CPU")
