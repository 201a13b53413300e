"""Loads the compiled extensions: ``emcad_kernels._C`` (the C++/OpenMP CPU kernels) and ``emcad_kernels._C_cuda``
(the CUDA kernels). They only register kernels (``TORCH_LIBRARY_IMPL``) for the ops the descriptors define.

The package imports without them: the backend that needs one reports why it is missing and ``auto`` moves on.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` in the repository root (needs a C++17 "
              "compiler with OpenMP; see docs/environment.md#cpu-extension)")
CUDA_NOT_BUILT = ("CUDA extension not built (it is built when torch has CUDA and nvcc is found at install time, or "
                  "with FORCE_CUDA=1)")

HAS_CPU_EXT = False
CPU_EXT_ERROR: Optional[str] = None

try:
    from . import _C  # noqa: F401  (registers the CPU kernels)
except ImportError as e:  # not built, or built against another torch (undefined symbols)
    CPU_EXT_ERROR = f"extension not built: emcad_kernels._C cannot be imported ({e}); {BUILD_HINT}"
else:
    HAS_CPU_EXT = True

_cuda_error: Optional[str] = None
_cuda_loaded = False


def require_cpu_ext() -> None:
    """Raises ImportError with the reason if the CPU extension is not usable."""
    if not HAS_CPU_EXT:
        raise ImportError(CPU_EXT_ERROR)


def require_cuda_ext() -> None:
    """Imports ``emcad_kernels._C_cuda`` (registers the CUDA kernels) or raises ImportError saying why it cannot."""
    global _cuda_loaded, _cuda_error
    if not _cuda_loaded:
        _cuda_loaded = True
        try:
            importlib.import_module("emcad_kernels._C_cuda")
        except ModuleNotFoundError:
            _cuda_error = CUDA_NOT_BUILT
        except ImportError as e:  # built, but not loadable here (other torch / CUDA ABI)
            _cuda_error = f"CUDA extension emcad_kernels._C_cuda failed to load: {e}"
    if _cuda_error is not None:
        raise ImportError(_cuda_error)


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
