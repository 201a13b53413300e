"""Build of the compiled parts of emcad-kernels.

* ``emcad_kernels._C``: the C++/OpenMP CPU kernels in ``csrc/*.cpp`` and ``csrc/cpu/*.cpp``; always built.
* ``emcad_kernels._C_cuda``: the CUDA kernels in ``csrc/cuda/``; built only when torch has CUDA and nvcc is
  found, or when ``FORCE_CUDA=1``. ``TORCH_CUDA_ARCH_LIST`` is respected (default "8.0;9.0").

A failed build is an error: nothing is skipped silently. Install with ``pip install --no-build-isolation -e .``.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _default_max_jobs():
    # nvcc and the torch headers need ~2-5 GB per job; keep a margin on small machines
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4))))


os.environ.setdefault("MAX_JOBS", _default_max_jobs())

cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]  # no -march=native: the build must run on any x86-64
ext_modules = []

cpu_sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
if cpu_sources:
    ext_modules.append(CppExtension(
        "emcad_kernels._C", cpu_sources, include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]))

force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
if cuda_sources and (force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)):
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext_modules.append(CUDAExtension(
        "emcad_kernels._C_cuda", cuda_sources, include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]}))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
