"""Build of the compiled parts of emcad-kernels.

* ``emcad_kernels._C``: the C++/OpenMP CPU kernels in ``csrc/*.cpp`` and ``csrc/cpu/*.cpp``; always built.
* ``emcad_kernels._C_cuda``: the CUDA kernels in ``csrc/cuda/``; built when torch is a CUDA build, a GPU is
  visible and a CUDA toolkit is found, or always with ``FORCE_CUDA=1`` (e.g. on a machine without a GPU), which
  makes a missing toolkit or a CPU-only torch an error. ``TORCH_CUDA_ARCH_LIST`` is respected (default "8.0;9.0").

The toolkit is located by ``find_cuda_home`` (``CUDA_HOME``, ``CUDA_PATH``, the real ``nvcc`` behind the one on
``PATH``, ``/usr/local/cuda``) and handed to torch's ``cpp_extension``, whose own guess takes the parent of the
``nvcc`` on ``PATH`` and so goes wrong for wrapper scripts such as ``/usr/local/bin/nvcc``. One line says what was
found and whether ``_C_cuda`` is built (``pip install -v`` shows it).

A failed build is an error: nothing is skipped silently. Install with ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.abspath(__file__))


def is_cuda_home(path) -> bool:
    """A usable toolkit root: it has the runtime headers and the compiler that torch will call."""
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and os.path.isfile(
        os.path.join(path, "bin", "nvcc"))


def _nvcc_reported_root(nvcc: str):
    """The install root that ``nvcc`` itself reports (``TOP=`` in its ``--dryrun`` trace), which sees through
    wrapper scripts; None if it cannot be run or says nothing useful."""
    try:
        proc = subprocess.run([nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
    return os.path.normpath(found.group(1).strip()) if found else None


def find_cuda_home(env, default="/usr/local/cuda"):
    """Locates the CUDA toolkit from the environment mapping ``env`` (its ``PATH``, ``CUDA_HOME``, ``CUDA_PATH``).

    Candidates in order: ``CUDA_HOME``, ``CUDA_PATH``, the ``nvcc`` on ``PATH`` (symlinks resolved, then the root
    the compiler reports, for wrapper scripts), ``default``. A candidate is accepted only if it has
    ``include/cuda_runtime.h`` and ``bin/nvcc``. Returns ``(root or None, how)``; ``how`` says where the root came
    from and which candidates were rejected."""
    rejected = []

    def accept(path, origin):
        if is_cuda_home(path):
            ignored = [r for r in rejected if r.startswith("CUDA_")]
            return os.path.realpath(path), origin + (f"; ignored {', '.join(ignored)}" if ignored else "")
        rejected.append(f"{origin}={path}" if origin.startswith("CUDA_") else f"{origin}: {path}")
        return None

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            hit = accept(env[var], var)
            if hit:
                return hit
    nvcc = shutil.which("nvcc", path=env.get("PATH", ""))
    if nvcc:
        real = os.path.realpath(nvcc)
        hit = accept(os.path.dirname(os.path.dirname(real)), f"nvcc on PATH, {nvcc}")
        if hit:
            return hit
        reported = _nvcc_reported_root(nvcc)
        if reported:
            hit = accept(reported, f"the root reported by {nvcc}, a wrapper")
            if hit:
                return hit
    if os.path.exists(default):
        hit = accept(default, "the default location")
        if hit:
            return hit
    if rejected:
        return None, f"no CUDA toolkit found (a root needs include/cuda_runtime.h and bin/nvcc; rejected " \
                     f"{'; '.join(rejected)})"
    return None, f"no CUDA toolkit found (no CUDA_HOME, CUDA_PATH, nvcc on PATH or {default})"


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _default_max_jobs():
    # nvcc and the torch headers need ~2-5 GB per job; keep a margin on small machines
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4))))


def _cuda_plan(torch, force_cuda):
    """(build _C_cuda?, the line for the log, why it is not built or None). Sets CUDA_HOME for torch's
    cpp_extension when a toolkit is found; it reads the variable at import, so this runs before that import."""
    cuda_home, how = find_cuda_home(os.environ)
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        found = f"CUDA toolkit {cuda_home} (from {how})"
    else:
        found = "no CUDA toolkit"
    if torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        why_not = how
    elif not force_cuda and not torch.cuda.is_available():
        why_not = "no GPU visible (set FORCE_CUDA=1 to build it anyway)"
    else:
        why_not = None
    if why_not is None:
        plan = f"building _C_cuda for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '8.0;9.0')}"
        plan += " (FORCE_CUDA=1)" if force_cuda else ""
    else:
        plan = f"not building _C_cuda: {why_not}"
    return why_not is None, f"emcad-kernels setup: {found}; torch {torch.__version__}; {plan}", why_not


def main():
    import torch

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    build_cuda, line, why_not = (_cuda_plan(torch, force_cuda) if cuda_sources
                                 else (False, "emcad-kernels setup: no CUDA sources", "no csrc/cuda sources"))
    print(line, flush=True)
    if force_cuda and not build_cuda:
        raise SystemExit(f"setup.py: FORCE_CUDA=1 but emcad_kernels._C_cuda cannot be built: {why_not}")

    from setuptools import setup
    from torch.utils import cpp_extension

    if build_cuda and cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # cpp_extension was imported before CUDA_HOME was set

    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]  # no -march=native: the build must run on any x86-64
    ext_modules = []
    cpu_sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    if cpu_sources:
        ext_modules.append(cpp_extension.CppExtension(
            "emcad_kernels._C", cpu_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]))
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext_modules.append(cpp_extension.CUDAExtension(
            "emcad_kernels._C_cuda", cuda_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]}))
    setup(ext_modules=ext_modules, cmdclass={"build_ext": cpp_extension.BuildExtension})


if __name__ == "__main__":  # also true when pip's build backend runs this file
    main()
