"""Helper of scripts/install.sh: is the C++ extension of this checkout already built and installed here?

    python scripts/install_state.py check            exit 0: installed and up to date (nothing to build);
                                                     exit 1: a build is needed (the reason is printed)
    python scripts/install_state.py stamp            record the state after a successful build
    python scripts/install_state.py requirements X   the core requirements plus those of the extras X
                                                     ("dev,flops"), one per line, read from pyproject.toml
    python scripts/install_state.py estimate         how long a build of the extension takes here, in words

"Up to date" means: emcad-kernels is installed in this Python environment as an editable install of this
checkout, ``emcad_kernels._C`` (and ``_C_cuda`` where setup.py builds it) imports from this checkout, and the
stamp written after the last build matches a hash of everything the build depends on: setup.py,
pyproject.toml, every file under csrc/, the Python and torch versions and the build's environment variables.
Any doubt answers "build": a needless build costs minutes, a stale extension costs wrong results.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join(ROOT, "build", "emcad_kernels_extension.stamp")
DIST = "emcad-kernels"
BUILD_ENV = ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CC", "CXX", "CFLAGS", "CXXFLAGS")
# CPU time of one build of the CPU extension (3 instruction sets), measured on the 2-core development machine
BUILD_CPU_MINUTES = 6.0


def _cuda_build_expected() -> bool:
    """The same rule as setup.py: the CUDA extension is built when torch has CUDA and nvcc is found, or forced."""
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and CUDA_HOME is not None


def fingerprint() -> str:
    import platform

    import torch

    h = hashlib.sha256()
    files = [os.path.join(ROOT, "setup.py"), os.path.join(ROOT, "pyproject.toml")]
    for base, dirs, names in os.walk(os.path.join(ROOT, "csrc")):
        dirs.sort()
        files += [os.path.join(base, n) for n in sorted(names)]
    for path in files:
        h.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    h.update(f"python {platform.python_version()} {sys.implementation.cache_tag}\0".encode())
    h.update(f"torch {torch.__version__} cuda {torch.version.cuda}\0".encode())
    h.update(f"cuda build {_cuda_build_expected()}\0".encode())
    for name in BUILD_ENV:
        h.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return h.hexdigest()


def _editable_here() -> str | None:
    """None when emcad-kernels is installed editable from this checkout, else why not."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return "emcad-kernels is not installed in this Python environment"
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        info = {}
    if not info.get("dir_info", {}).get("editable"):
        return "emcad-kernels is installed, but not as an editable install of this checkout"
    url = info.get("url", "")
    here = url[len("file://"):] if url.startswith("file://") else ""
    if not here or os.path.realpath(here) != os.path.realpath(ROOT):
        return f"emcad-kernels is installed from another checkout ({url or 'unknown'})"
    return None


def check() -> int:
    reason = _editable_here()
    if reason is None:
        if not os.path.isfile(STAMP):
            reason = "no record of a build of this checkout's extension"
        else:
            with open(STAMP) as f:
                if f.read().strip() != fingerprint():
                    reason = "the C++ sources, setup.py, pyproject.toml, torch or Python changed since the last build"
    if reason is None:
        import importlib
        modules = ["emcad_kernels._C"] + (["emcad_kernels._C_cuda"] if _cuda_build_expected() else [])
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError as e:
                reason = f"{name} does not import ({e})"
                break
            if not os.path.realpath(module.__file__).startswith(os.path.realpath(ROOT) + os.sep):
                reason = f"{name} is imported from {module.__file__}, not from this checkout"
                break
    if reason is not None:
        print(f"build needed: {reason}")
        return 1
    print("the C++ extension is built and installed from this checkout, and nothing it depends on changed")
    return 0


def stamp() -> int:
    os.makedirs(os.path.dirname(STAMP), exist_ok=True)
    tmp = STAMP + ".tmp"
    with open(tmp, "w") as f:
        f.write(fingerprint() + "\n")
    os.replace(tmp, STAMP)
    return 0


def _read_pyproject() -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            from pip._vendor import tomli as tomllib  # pip vendors tomli (Python 3.10)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def requirements(extras: str) -> int:
    project = _read_pyproject()["project"]
    known = project.get("optional-dependencies", {})
    wanted = [e.strip() for e in extras.split(",") if e.strip()]
    unknown = [e for e in wanted if e not in known]
    if unknown:
        print(f"install.sh: unknown extra(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
              file=sys.stderr)
        return 2
    reqs = list(project.get("dependencies", []))
    for extra in wanted:
        reqs += [r for r in known[extra] if r not in reqs]
    print("\n".join(reqs))
    return 0


def estimate() -> int:
    jobs = os.environ.get("MAX_JOBS")
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    parallel = int(jobs) if jobs and jobs.isdigit() else max(1, min(cores, int(mem_gb // 4)))  # as setup.py
    minutes = BUILD_CPU_MINUTES / parallel
    busy = ""
    try:
        load = os.getloadavg()[0]
        if load > 0.5 * cores:
            busy = f"; longer now: the machine is busy (load {load:.1f} on {cores} cores)"
    except OSError:
        pass
    rough = f"{minutes:.0f}" if minutes >= 1.5 else "1-2"
    print(f"about {rough} minutes with {parallel} parallel compile job(s) on {cores} cores{busy}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"]:
        return check()
    if argv[:1] == ["stamp"]:
        return stamp()
    if argv[:1] == ["requirements"] and len(argv) <= 2:
        return requirements(argv[1] if len(argv) == 2 else "")
    if argv[:1] == ["estimate"]:
        return estimate()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
