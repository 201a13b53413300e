"""setup.py's CUDA toolkit detection (``find_cuda_home``) and build decision, on fake toolkits in tmp_path.

A fake toolkit is a folder with ``include/cuda_runtime.h`` and an executable ``bin/nvcc`` that answers
``--dryrun`` with the ``#$ TOP=`` line real nvcc prints; a wrapper script elsewhere on PATH execs it, the way
``/usr/local/bin/nvcc`` wraps ``/usr/local/cuda-13.0/bin/nvcc`` on the development machines.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module_():
    spec = importlib.util.spec_from_file_location("emcad_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() runs only as __main__
    return module


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def make_toolkit(root: Path, headers: bool = True) -> Path:
    if headers:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    _executable(root / "bin" / "nvcc", '#!/bin/sh\nfor a in "$@"; do [ "$a" = --dryrun ] && '
                                       f'echo "#\\$ TOP={root}/bin/.." >&2; done\nexit 0\n')
    return root


def make_wrapper(folder: Path, target: Path) -> Path:
    """An nvcc wrapper script whose parent folder is no toolkit."""
    (folder / "include").mkdir(parents=True, exist_ok=True)  # like /usr/local/include: no cuda_runtime.h
    return _executable(folder / "bin" / "nvcc", f'#!/bin/sh\nexec {target / "bin" / "nvcc"} "$@"\n')


def test_wrapper_script_on_path_resolves_to_the_real_toolkit(setup_module_, tmp_path):
    kit = make_toolkit(tmp_path / "cuda-13.0")
    make_wrapper(tmp_path / "usr-local", kit)
    home, how = setup_module_.find_cuda_home({"PATH": str(tmp_path / "usr-local" / "bin")},
                                              default=str(tmp_path / "none"))
    assert home == str(kit.resolve())
    assert "reported by" in how and "wrapper" in how


def test_symlinked_nvcc_resolves_to_the_real_toolkit(setup_module_, tmp_path):
    kit = make_toolkit(tmp_path / "cuda-12.8")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(kit / "bin" / "nvcc")
    home, how = setup_module_.find_cuda_home({"PATH": str(tmp_path / "bin")}, default=str(tmp_path / "none"))
    assert home == str(kit.resolve())
    assert how.startswith("nvcc on PATH")


def test_cuda_home_wins_and_a_bad_one_is_skipped_and_named(setup_module_, tmp_path):
    first, second = make_toolkit(tmp_path / "a"), make_toolkit(tmp_path / "b")
    env = {"PATH": str(second / "bin"), "CUDA_HOME": str(first)}
    assert setup_module_.find_cuda_home(env, default=str(tmp_path / "none"))[0] == str(first.resolve())
    env = {"PATH": str(second / "bin"), "CUDA_HOME": str(tmp_path), "CUDA_PATH": str(first)}
    home, how = setup_module_.find_cuda_home(env, default=str(tmp_path / "none"))
    assert home == str(first.resolve())
    assert how.startswith("CUDA_PATH") and f"ignored CUDA_HOME={tmp_path}" in how


def test_default_location_is_the_last_resort(setup_module_, tmp_path):
    kit = make_toolkit(tmp_path / "cuda")
    home, how = setup_module_.find_cuda_home({"PATH": str(tmp_path / "empty")}, default=str(kit))
    assert home == str(kit.resolve()) and how == "the default location"


def test_folder_without_runtime_header_is_rejected(setup_module_, tmp_path):
    kit = make_toolkit(tmp_path / "cuda-nvcc-only", headers=False)  # e.g. a pip nvcc without the runtime headers
    home, how = setup_module_.find_cuda_home({"PATH": str(kit / "bin"), "CUDA_HOME": str(kit)},
                                              default=str(tmp_path / "none"))
    assert home is None
    assert how.startswith("no CUDA toolkit found") and f"CUDA_HOME={kit}" in how and "nvcc on PATH" in how


def test_nothing_to_find(setup_module_, tmp_path):
    home, how = setup_module_.find_cuda_home({"PATH": str(tmp_path)}, default=str(tmp_path / "none"))
    assert home is None and "no CUDA_HOME, CUDA_PATH, nvcc on PATH or " in how


def _fake_torch(cuda_version, gpu):
    return types.SimpleNamespace(__version__="2.11.0+fake", version=types.SimpleNamespace(cuda=cuda_version),
                                 cuda=types.SimpleNamespace(is_available=lambda: gpu))


@pytest.mark.parametrize("cuda_version, gpu, force, found, builds, reason", [
    ("13.0", True, False, True, True, None),
    ("13.0", False, False, True, False, "no GPU visible"),
    ("13.0", False, True, True, True, None),
    ("13.0", True, True, False, False, "no CUDA toolkit"),
    (None, False, True, True, False, "not a CUDA build"),
])
def test_build_decision(setup_module_, tmp_path, monkeypatch, cuda_version, gpu, force, found, builds, reason):
    kit = make_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("PATH", str(kit / "bin") if found else str(tmp_path / "empty"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    if not found:
        monkeypatch.setattr(setup_module_, "find_cuda_home", lambda env: (None, "no CUDA toolkit found (test)"))
    build, line, why_not = setup_module_._cuda_plan(_fake_torch(cuda_version, gpu), force)
    assert build == builds
    assert line.startswith("emcad-kernels setup: ") and "\n" not in line
    if builds:
        assert "building _C_cuda" in line and os.environ["CUDA_HOME"] == str(kit.resolve())
    else:
        assert reason in why_not and f"not building _C_cuda: {why_not}" in line


def test_force_cuda_that_cannot_build_stops_setup(setup_module_, monkeypatch):
    monkeypatch.setenv("FORCE_CUDA", "1")
    monkeypatch.setattr(setup_module_, "_cuda_plan", lambda torch, force: (False, "line", "no CUDA toolkit"))
    with pytest.raises(SystemExit) as stop:
        setup_module_.main()
    assert str(stop.value) == "setup.py: FORCE_CUDA=1 but emcad_kernels._C_cuda cannot be built: no CUDA toolkit"


def test_force_cuda_with_a_cpu_torch_fails_loudly(tmp_path):
    """The real script, as pip runs it: non-zero exit and the reason on stderr."""
    import torch

    if torch.version.cuda is not None:
        pytest.skip(f"torch {torch.__version__} is a CUDA build: FORCE_CUDA=1 would build the extension")
    code = ("import runpy, sys; sys.argv = ['setup.py', '--version']; "
            f"runpy.run_path({str(ROOT / 'setup.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "FORCE_CUDA": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert ("FORCE_CUDA=1 but emcad_kernels._C_cuda cannot be built: torch "
            f"{torch.__version__} is not a CUDA build") in proc.stderr, proc.stderr
    assert "emcad-kernels setup: " in proc.stdout
