"""The ``cuda`` backend (CUDA C++ kernels in ``csrc/cuda``).

Three groups of tests:

* **nvcc compile check** (CPU machine, needs ``nvcc``): every ``csrc/cuda/*.cu`` compiles for sm_80 and sm_90
  with plain ``nvcc -c`` (the same command as ``scripts/run_tests.sh``). Skipped with a message without nvcc.
* **CPU emulation** (CPU machine, needs ``g++``): the same ``.cu`` sources compiled with g++ and
  ``csrc/cuda/cuda_emulation.cuh`` into a shared library (one OS thread per CUDA thread, real barriers, poisoned
  shared memory), called through ctypes on CPU tensors exactly the way ``csrc/cuda/torch_binding.cpp`` calls the
  launchers. Checks every op, forward and backward, train and eval, all dtypes, NCHW and channels_last, against
  the reference backend, plus determinism, guard zones around every output and the host-side math (geometry,
  shuffle maps, polyphase weights). This is what can be verified without a GPU.
* **GPU** (marker ``gpu``; skipped without CUDA; with a GPU, a missing ``emcad_kernels._C_cuda`` fails them unless
  ``EMCAD_REQUIRE_CUDA_EXT=0``):
  parity with the reference at tiny odd shapes and at real EMCAD shapes in fp32/fp16/bf16/fp64, NCHW and
  channels_last, train and eval, all gradients and running statistics; float64 gradcheck; opcheck; bitwise
  determinism; ``torch.compile(fullgraph=True)`` and CUDA-graph replay.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import native_codes
from emcad_kernels import reference
from op_cases import (assert_cuda_graph_replay_matches_eager, check_against_reference, lgag_case, msdc_case, run,
                      updw_case)

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
# the kernel sources and what they include from outside csrc/cuda (keys of the cached emulation build)
CUDA_SOURCES = sorted(list(CUDA_DIR.glob("*.cu")) + list(CUDA_DIR.glob("*.cuh")) + [CUDA_DIR / "launchers.h"]
                      + [native_codes.CODES_H])

# the codes of the launchers' dtype / act fields (csrc/common/codes.h)
DTYPE_CODE = native_codes.dtype_codes()
ACT_CODE = native_codes.activation_codes()


# ==================================================================================================================
# nvcc compile check
# ==================================================================================================================
NVCC = shutil.which("nvcc")
NVCC_FLAGS = ["-c", "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", "-gencode", "arch=compute_80,code=sm_80",
              "-gencode", "arch=compute_90,code=sm_90"]


# what torch's CUDAExtension adds when building the extension (no implicit half/bfloat16 conversions)
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


@pytest.mark.slow  # scripts/run_tests.sh runs the plain nvcc check on every CI run
@pytest.mark.skipif(NVCC is None, reason="nvcc not found: skipping the CUDA kernel compile check")
def test_every_cu_file_compiles_with_nvcc_for_sm80_and_sm90(tmp_path):
    """scripts/run_tests.sh compiles with the plain flags; here the flags of the extension build are added."""
    assert CU_FILES, "no csrc/cuda/*.cu files"

    def compile_one(path: Path):
        out = tmp_path / (path.name + ".o")
        proc = subprocess.run([NVCC, *NVCC_FLAGS, *TORCH_NVCC_FLAGS, str(path), "-o", str(out)], capture_output=True,
                              text=True)
        return path.name, proc.returncode, proc.stdout + proc.stderr

    jobs = max(1, min(len(CU_FILES), os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(compile_one, CU_FILES))
    failures = [f"{name}:\n{log}" for name, rc, log in results if rc != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)


def test_kernel_files_include_no_torch_headers():
    """The pure-CUDA files must compile without torch (KERNELS.md 11.1): only the binding includes torch."""
    for path in CUDA_SOURCES:
        text = path.read_text()
        for bad in ("#include <torch", "#include <ATen", "#include <c10", '#include "torch', '#include "ATen'):
            assert bad not in text, f"{path.name} includes a torch header ({bad})"
    binding = (CUDA_DIR / "torch_binding.cpp").read_text()
    assert "getCurrentCUDAStream" in binding and "TORCH_LIBRARY" in binding


def _cuda_include_dir():
    """The CUDA toolkit's include directory ($CUDA_HOME, next to nvcc, or /usr/local/cuda), if any."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC is not None:
        candidates.insert(0, str(Path(os.path.realpath(NVCC)).parents[1]))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include_dir() is None,
                    reason="g++ or the CUDA headers (next to nvcc) not found")
def test_binding_cuda_build_passes_a_syntax_check_against_the_installed_torch_headers(tmp_path):
    """torch_binding.cpp as the CUDA extension compiles it (not the emulation branch), type-checked with g++
    -fsyntax-only against the installed torch headers. A CPU torch wheel lacks only the generated
    c10/cuda/impl/cuda_cmake_macros.h (ENVIRONMENT.md 5.2), which is stubbed here; nothing is linked or run."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    import sysconfig

    incs = [tmp_path / "stub", *include_paths(), sysconfig.get_paths()["include"], _cuda_include_dir()]
    cmd = [shutil.which("g++"), "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           *[f"-isystem{p}" for p in incs], "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
           str(CUDA_DIR / "torch_binding.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ==================================================================================================================
# CPU emulation: build and ctypes mirrors of launchers.h
# ==================================================================================================================
GXX = shutil.which("g++")
c_int64, c_int32, c_double, c_void_p, c_size_t = (ctypes.c_int64, ctypes.c_int32, ctypes.c_double, ctypes.c_void_p,
                                                   ctypes.c_size_t)


class MsdcArgs(ctypes.Structure):
    _fields_ = [("n", c_int64), ("c", c_int64), ("h", c_int64), ("w", c_int64),
                ("x_stride", c_int64 * 4), ("y_stride", c_int64 * 4),
                ("nb", c_int32), ("ksize", c_int32 * 4), ("dtype", c_int32), ("act", c_int32), ("concat", c_int32),
                ("shuffle_groups", c_int32), ("training", c_int32), ("reserved", c_int32),
                ("eps", c_double),
                ("x", c_void_p), ("weight", c_void_p * 4), ("bn_weight", c_void_p), ("bn_bias", c_void_p),
                ("mean", c_void_p), ("var", c_void_p),
                ("y", c_void_p), ("save_mean", c_void_p), ("save_var", c_void_p),
                ("grad_y", c_void_p), ("grad_x", c_void_p), ("grad_weight", c_void_p * 4),
                ("grad_bn_weight", c_void_p), ("grad_bn_bias", c_void_p),
                ("scratch", c_void_p), ("scratch_bytes", c_size_t)]


class UpdwArgs(ctypes.Structure):
    _fields_ = [("n", c_int64), ("c", c_int64), ("h", c_int64), ("w", c_int64),
                ("x_stride", c_int64 * 4), ("y_stride", c_int64 * 4),
                ("ksize", c_int32), ("scale", c_int32), ("mode", c_int32), ("dtype", c_int32), ("act", c_int32),
                ("training", c_int32),
                ("eps", c_double),
                ("x", c_void_p), ("weight", c_void_p), ("bn_weight", c_void_p), ("bn_bias", c_void_p),
                ("mean", c_void_p), ("var", c_void_p),
                ("y", c_void_p), ("save_mean", c_void_p), ("save_var", c_void_p),
                ("grad_y", c_void_p), ("grad_x", c_void_p), ("grad_weight", c_void_p), ("grad_bn_weight", c_void_p),
                ("grad_bn_bias", c_void_p),
                ("scratch", c_void_p), ("scratch_bytes", c_size_t)]


class LgagArgs(ctypes.Structure):
    _fields_ = [("n", c_int64), ("h", c_int64), ("w", c_int64), ("cg", c_int64), ("cx", c_int64),
                ("f_int", c_int64),
                ("g_stride", c_int64 * 4), ("x_stride", c_int64 * 4), ("out_stride", c_int64 * 4),
                ("groups", c_int32), ("ksize", c_int32), ("dtype", c_int32), ("act", c_int32),
                ("training", c_int32), ("add_gate_input", c_int32),
                ("eps", c_double),
                ("g", c_void_p), ("x", c_void_p), ("wg", c_void_p), ("bg", c_void_p), ("wx", c_void_p),
                ("bx", c_void_p), ("wpsi", c_void_p), ("bpsi", c_void_p),
                ("bn_g", c_void_p * 4), ("bn_x", c_void_p * 4), ("bn_psi", c_void_p * 4),
                ("out", c_void_p), ("save_stats", c_void_p * 6),
                ("grad_out", c_void_p), ("grad_g", c_void_p), ("grad_x", c_void_p), ("grad_wg", c_void_p),
                ("grad_bg", c_void_p), ("grad_wx", c_void_p), ("grad_bx", c_void_p), ("grad_wpsi", c_void_p),
                ("grad_bpsi", c_void_p), ("grad_bn", c_void_p * 6),
                ("scratch", c_void_p), ("scratch_bytes", c_size_t)]


def _sources_digest() -> str:
    h = hashlib.sha256()
    for p in CUDA_SOURCES:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _emu_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"emcad_cuda_emu_{_sources_digest()}"


EMU_FLAGS = ["-std=c++17", "-O1", "-g", "-fPIC", "-pthread", "-DEMCAD_CUDA_EMULATE", f"-I{ROOT / 'csrc'}", "-Wall",
             "-Wno-unknown-pragmas", "-Wno-unused-function"]


@functools.lru_cache(maxsize=None)
def _build_emulation_objects() -> tuple[str, ...]:
    """csrc/cuda/*.cu compiled as C++ with -DEMCAD_CUDA_EMULATE (cached by source hash)."""
    out_dir = _emu_dir()
    out_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(path: Path):
        obj = out_dir / (path.name + ".o")
        if not obj.exists():
            tmp = out_dir / f"{path.name}.{os.getpid()}.o"
            proc = subprocess.run([GXX, *EMU_FLAGS, "-c", "-x", "c++", str(path), "-o", str(tmp)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"g++ failed on {path.name}:\n{proc.stderr}")
            os.replace(tmp, obj)
        return str(obj)

    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        return tuple(pool.map(compile_one, CU_FILES))


@functools.lru_cache(maxsize=None)
def _build_emulation_library() -> ctypes.CDLL:
    """The emulated launchers as a shared library for ctypes."""
    out_dir = _emu_dir()
    lib_path = out_dir / "libemcad_cuda_emu.so"
    if not lib_path.exists():
        objs = _build_emulation_objects()
        tmp = out_dir / f"lib.{os.getpid()}.so"
        proc = subprocess.run([GXX, "-shared", "-pthread", *objs, "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"linking the emulation library failed:\n{proc.stderr}")
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    for op, args_t in (("msdc", MsdcArgs), ("updw", UpdwArgs), ("lgag", LgagArgs)):
        getattr(lib, f"emcad_{op}_check").restype = ctypes.c_char_p
        getattr(lib, f"emcad_{op}_check").argtypes = [ctypes.POINTER(args_t)]
        for direction in ("forward", "backward"):
            fn = getattr(lib, f"emcad_{op}_{direction}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(args_t), c_void_p]
            q = getattr(lib, f"emcad_{op}_{direction}_scratch_bytes")
            q.restype = c_size_t
            q.argtypes = [ctypes.POINTER(args_t)]
    lib.emcad_cuda_args_sizeof.restype = c_size_t
    lib.emcad_cuda_args_sizeof.argtypes = [ctypes.c_int]
    lib.emcad_emu_vector_accesses.restype = ctypes.c_longlong
    return lib


requires_gxx = pytest.mark.skipif(GXX is None, reason="g++ not found: skipping the CPU emulation of the CUDA kernels")


SLOW_EMULATION = ("the CPU emulation of the CUDA kernels through the torch binding takes ~10 min on 2 cores: run "
                  "with --run-slow or EMCAD_RUN_SLOW=1")


def _skip_unless_slow_tests(request):
    from conftest import run_slow

    if not run_slow(request.config):
        pytest.skip(SLOW_EMULATION)


@pytest.fixture(scope="module")
def emu():
    """The launchers alone through ctypes: a few quick parity runs of the kernel code on every default run."""
    if GXX is None:
        pytest.skip("g++ not found")
    return _build_emulation_library()


# ---- guarded outputs: every output tensor sits between two sentinel zones that the kernels must not touch ----
GUARD = 64  # elements (a multiple of 16 bytes for every dtype, so alignment is kept)


class Guarded:
    def __init__(self):
        self.buffers = []

    def empty(self, shape, dtype, memory_format=torch.contiguous_format):
        proto = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        numel = proto.numel()
        buf = torch.empty(numel + 2 * GUARD, dtype=dtype)
        buf.view(torch.uint8).fill_(0x7B)
        t = torch.as_strided(buf, proto.shape, proto.stride(), GUARD)
        # poison the payload too: outputs must be fully written
        torch.as_strided(buf, (numel,), (1,), GUARD).fill_(float("nan"))
        self.buffers.append(buf)
        return t

    def check(self):
        for buf in self.buffers:
            raw = buf.view(torch.uint8)
            nbytes = GUARD * buf.element_size()
            assert bool((raw[:nbytes] == 0x7B).all()) and bool((raw[-nbytes:] == 0x7B).all()), \
                "a kernel wrote outside its output tensor"


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fmt(x):
    return reference.output_memory_format(x)


def _strides(t):
    return (c_int64 * 4)(*t.stride())


def _run(lib, name, args, keep):
    """Allocates the scratch the launcher asks for and runs it; `keep` holds tensors alive."""
    why = getattr(lib, f"emcad_{name.split('_')[0]}_check")(ctypes.byref(args))
    assert why is None, why.decode()
    nbytes = getattr(lib, f"emcad_{name}_scratch_bytes")(ctypes.byref(args))
    scratch = torch.empty(max(int(nbytes), 1), dtype=torch.uint8)
    scratch.fill_(0xFF)  # NaN-poisoned: every scratch read must follow a write
    args.scratch = scratch.data_ptr()
    args.scratch_bytes = nbytes
    rc = getattr(lib, f"emcad_{name}")(ctypes.byref(args), None)
    assert rc == 0, f"emcad_{name} returned cudaError {rc}"
    del keep


# ---- the binding's logic, mirrored in Python on CPU tensors ----
def emu_msdc_forward(lib, x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat,
                     shuffle_groups, stride=1):
    assert stride == 1
    acc = _acc(x.dtype)
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    nb = len(weights)
    g = Guarded()
    y = g.empty((n, nb * c if concat else c, h, w), x.dtype, fmt)
    save_mean, save_var = g.empty((nb, c), acc), g.empty((nb, c), acc)
    ws = [wt.contiguous() for wt in weights]
    bw, bb, m, v = (t.to(acc).contiguous() for t in (bn_weight, bn_bias, mean, var))
    a = MsdcArgs(n=n, c=c, h=h, w=w, x_stride=_strides(x), y_stride=_strides(y), nb=nb,
                 ksize=(c_int32 * 4)(*[wt.shape[-1] for wt in ws], *([0] * (4 - nb))), dtype=DTYPE_CODE[x.dtype],
                 act=ACT_CODE[activation], concat=int(concat), shuffle_groups=int(shuffle_groups),
                 training=int(training), eps=eps, x=x.data_ptr(),
                 weight=(c_void_p * 4)(*[wt.data_ptr() for wt in ws], *([None] * (4 - nb))),
                 bn_weight=bw.data_ptr(), bn_bias=bb.data_ptr(), mean=m.data_ptr(), var=v.data_ptr(),
                 y=y.data_ptr(), save_mean=save_mean.data_ptr(), save_var=save_var.data_ptr())
    _run(lib, "msdc_forward", a, (x, ws, bw, bb, m, v))
    g.check()
    return y, save_mean, save_var


def emu_msdc_backward(lib, grad, x, weights, bn_weight, bn_bias, save_mean, save_var, training, eps, activation,
                      concat, shuffle_groups, stride=1):
    assert stride == 1
    acc = _acc(x.dtype)
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    grad = grad.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    nb = len(weights)
    g = Guarded()
    gx = g.empty(x.shape, x.dtype, fmt)
    gws = [g.empty(wt.shape, wt.dtype) for wt in weights]
    gbw, gbb = g.empty((nb, c), acc), g.empty((nb, c), acc)
    ws = [wt.contiguous() for wt in weights]
    bw, bb, m, v = (t.to(acc).contiguous() for t in (bn_weight, bn_bias, save_mean, save_var))
    a = MsdcArgs(n=n, c=c, h=h, w=w, x_stride=_strides(x), y_stride=_strides(grad), nb=nb,
                 ksize=(c_int32 * 4)(*[wt.shape[-1] for wt in ws], *([0] * (4 - nb))), dtype=DTYPE_CODE[x.dtype],
                 act=ACT_CODE[activation], concat=int(concat), shuffle_groups=int(shuffle_groups),
                 training=int(training), eps=eps, x=x.data_ptr(),
                 weight=(c_void_p * 4)(*[wt.data_ptr() for wt in ws], *([None] * (4 - nb))),
                 bn_weight=bw.data_ptr(), bn_bias=bb.data_ptr(), mean=m.data_ptr(), var=v.data_ptr(),
                 grad_y=grad.data_ptr(), grad_x=gx.data_ptr(),
                 grad_weight=(c_void_p * 4)(*[t.data_ptr() for t in gws], *([None] * (4 - nb))),
                 grad_bn_weight=gbw.data_ptr(), grad_bn_bias=gbb.data_ptr())
    _run(lib, "msdc_backward", a, (x, grad, ws, bw, bb, m, v))
    g.check()
    return gx, gws, gbw.to(bn_weight.dtype), gbb.to(bn_bias.dtype)


def emu_updw_forward(lib, x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale):
    acc = _acc(x.dtype)
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    g = Guarded()
    y = g.empty((n, c, h * scale, w * scale), x.dtype, fmt)
    save_mean, save_var = g.empty((c,), acc), g.empty((c,), acc)
    wt = weight.contiguous()
    bw, bb, m, v = (t.to(acc).contiguous() for t in (bn_weight, bn_bias, mean, var))
    a = UpdwArgs(n=n, c=c, h=h, w=w, x_stride=_strides(x), y_stride=_strides(y), ksize=wt.shape[-1], scale=scale,
                 mode=0 if mode == "nearest" else 1, dtype=DTYPE_CODE[x.dtype], act=ACT_CODE[activation],
                 training=int(training), eps=eps, x=x.data_ptr(), weight=wt.data_ptr(), bn_weight=bw.data_ptr(),
                 bn_bias=bb.data_ptr(), mean=m.data_ptr(), var=v.data_ptr(), y=y.data_ptr(),
                 save_mean=save_mean.data_ptr(), save_var=save_var.data_ptr())
    _run(lib, "updw_forward", a, (x, wt, bw, bb, m, v))
    g.check()
    return y, save_mean, save_var


def emu_updw_backward(lib, grad, x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps, mode, activation,
                      scale):
    acc = _acc(x.dtype)
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    grad = grad.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    g = Guarded()
    gx = g.empty(x.shape, x.dtype, fmt)
    gw = g.empty(weight.shape, weight.dtype)
    gbw, gbb = g.empty((c,), acc), g.empty((c,), acc)
    wt = weight.contiguous()
    bw, bb, m, v = (t.to(acc).contiguous() for t in (bn_weight, bn_bias, save_mean, save_var))
    a = UpdwArgs(n=n, c=c, h=h, w=w, x_stride=_strides(x), y_stride=_strides(grad), ksize=wt.shape[-1], scale=scale,
                 mode=0 if mode == "nearest" else 1, dtype=DTYPE_CODE[x.dtype], act=ACT_CODE[activation],
                 training=int(training), eps=eps, x=x.data_ptr(), weight=wt.data_ptr(), bn_weight=bw.data_ptr(),
                 bn_bias=bb.data_ptr(), mean=m.data_ptr(), var=v.data_ptr(), grad_y=grad.data_ptr(),
                 grad_x=gx.data_ptr(), grad_weight=gw.data_ptr(), grad_bn_weight=gbw.data_ptr(),
                 grad_bn_bias=gbb.data_ptr())
    _run(lib, "updw_backward", a, (x, grad, wt, bw, bb, m, v))
    g.check()
    return gx, gw, gbw.to(bn_weight.dtype), gbb.to(bn_bias.dtype)


LGAG_STAT_NAMES = ("mean_g", "var_g", "mean_x", "var_x", "mean_psi", "var_psi")


def _lgag_args(x, g, wg, wx, groups, activation, training, eps, add_gate_input):
    n, cx, h, w = x.shape
    return LgagArgs(n=n, h=h, w=w, cg=g.shape[1], cx=cx, f_int=wg.shape[0], groups=groups, ksize=wg.shape[-1],
                    dtype=DTYPE_CODE[x.dtype], act=ACT_CODE[activation], training=int(training),
                    add_gate_input=int(add_gate_input), eps=eps, g_stride=_strides(g), x_stride=_strides(x))


def emu_lgag_forward(lib, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, mean_g, var_g, bn_x_weight,
                     bn_x_bias, mean_x, var_x, bn_psi_weight, bn_psi_bias, mean_psi, var_psi, training, eps, groups,
                     activation, add_gate_input):
    acc = _acc(x.dtype)
    g = g.contiguous(memory_format=_fmt(g))
    x = x.contiguous(memory_format=_fmt(x))
    params = [t.contiguous() for t in (wg, bg, wx, bx, wpsi, bpsi)]
    bns = [t.to(acc).contiguous() for t in (bn_g_weight, bn_g_bias, mean_g, var_g, bn_x_weight, bn_x_bias, mean_x,
                                            var_x, bn_psi_weight, bn_psi_bias, mean_psi, var_psi)]
    guard = Guarded()
    out = guard.empty(x.shape, x.dtype, _fmt(x))
    f_int = wg.shape[0]
    stats = [guard.empty((f_int if i < 4 else 1,), acc) for i in range(6)]
    a = _lgag_args(x, g, wg, wx, groups, activation, training, eps, add_gate_input)
    a.out_stride = _strides(out)
    a.g, a.x = g.data_ptr(), x.data_ptr()
    a.wg, a.bg, a.wx, a.bx, a.wpsi, a.bpsi = (t.data_ptr() for t in params)
    a.bn_g = (c_void_p * 4)(*[t.data_ptr() for t in bns[0:4]])
    a.bn_x = (c_void_p * 4)(*[t.data_ptr() for t in bns[4:8]])
    a.bn_psi = (c_void_p * 4)(*[t.data_ptr() for t in bns[8:12]])
    a.out = out.data_ptr()
    a.save_stats = (c_void_p * 6)(*[t.data_ptr() for t in stats])
    _run(lib, "lgag_forward", a, (g, x, params, bns))
    guard.check()
    return (out, *stats)


def emu_lgag_backward(lib, grad, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias,
                      bn_psi_weight, bn_psi_bias, save_stats, training, eps, groups, activation, add_gate_input):
    acc = _acc(x.dtype)
    g = g.contiguous(memory_format=_fmt(g))
    x = x.contiguous(memory_format=_fmt(x))
    grad = grad.contiguous(memory_format=_fmt(x))
    params = [t.contiguous() for t in (wg, bg, wx, bx, wpsi, bpsi)]
    ms = [t.to(acc).contiguous() for t in save_stats]
    bw = [t.to(acc).contiguous() for t in (bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias, bn_psi_weight,
                                           bn_psi_bias)]
    guard = Guarded()
    gg = guard.empty(g.shape, g.dtype, _fmt(g))
    gx = guard.empty(x.shape, x.dtype, _fmt(x))
    gparams = [guard.empty(t.shape, t.dtype) for t in params]
    gbn = [guard.empty(t.shape, acc) for t in bw]
    a = _lgag_args(x, g, wg, wx, groups, activation, training, eps, add_gate_input)
    a.out_stride = _strides(grad)
    a.g, a.x = g.data_ptr(), x.data_ptr()
    a.wg, a.bg, a.wx, a.bx, a.wpsi, a.bpsi = (t.data_ptr() for t in params)
    a.bn_g = (c_void_p * 4)(bw[0].data_ptr(), bw[1].data_ptr(), ms[0].data_ptr(), ms[1].data_ptr())
    a.bn_x = (c_void_p * 4)(bw[2].data_ptr(), bw[3].data_ptr(), ms[2].data_ptr(), ms[3].data_ptr())
    a.bn_psi = (c_void_p * 4)(bw[4].data_ptr(), bw[5].data_ptr(), ms[4].data_ptr(), ms[5].data_ptr())
    a.grad_out, a.grad_g, a.grad_x = grad.data_ptr(), gg.data_ptr(), gx.data_ptr()
    a.grad_wg, a.grad_bg, a.grad_wx, a.grad_bx, a.grad_wpsi, a.grad_bpsi = (t.data_ptr() for t in gparams)
    a.grad_bn = (c_void_p * 6)(*[t.data_ptr() for t in gbn])
    _run(lib, "lgag_backward", a, (g, x, grad, params, ms, bw))
    guard.check()
    ref_dtypes = (bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias, bn_psi_weight, bn_psi_bias)
    return [gg, gx, *gparams, *(t.to(r.dtype) for t, r in zip(gbn, ref_dtypes))]


# ==================================================================================================================
# the real binding (csrc/cuda/torch_binding.cpp) compiled for the CPU over the emulated launchers
# ==================================================================================================================
EMU_BACKEND = "cuda_emu"
EMU_NAMESPACE = "emcad_kernels_emu"


@functools.lru_cache(maxsize=None)
def _build_emulated_binding():
    """torch_binding.cpp with -DEMCAD_CUDA_EMULATE, linked with the emulated launchers; registers
    the kernels of emcad_kernels_emu::<op>_fwd/_bwd for the CPU dispatch key."""
    from torch.utils.cpp_extension import load

    objs = _build_emulation_objects()
    build_dir = _emu_dir() / "binding"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name="emcad_cuda_emu_binding", sources=[str(CUDA_DIR / "torch_binding.cpp")],
                extra_cflags=["-O1", "-DEMCAD_CUDA_EMULATE", f"-I{CUDA_DIR}"],
                extra_ldflags=[*objs, "-pthread"], build_directory=str(build_dir), verbose=False)


@functools.lru_cache(maxsize=None)
def _define_emulated_ops():
    """The ops the cuda backend implements, defined from their descriptors in the emulation namespace, with the
    emulated binding's kernels."""
    from emcad_kernels import backends
    from emcad_kernels.descriptor import define_kernel_ops

    for op in backends.registered_ops().values():
        if "cuda" in op.support:
            define_kernel_ops(op, namespace=EMU_NAMESPACE)
    _build_emulated_binding()


@pytest.fixture(scope="module")
def emu_backend(request):
    """Registers the emulated binding as backend "cuda_emu" (CPU tensors, the cuda backend's coverage) for the tests
    of this module."""
    _skip_unless_slow_tests(request)
    if GXX is None:
        pytest.skip("g++ not found: skipping the CPU emulation of the CUDA kernels")
    from emcad_kernels import backends

    _define_emulated_ops()
    cuda = backends.get_backend("cuda")
    backends.register_backend(backends.Backend(
        name=EMU_BACKEND, priority=-100, description="csrc/cuda through torch_binding.cpp, CPU emulation (tests only)",
        devices=("cpu",), dtypes=cuda.dtypes, dispatch_key="CPU", namespace=EMU_NAMESPACE, support="cuda"))
    yield EMU_BACKEND
    backends.unregister_backend(EMU_BACKEND)


# ==================================================================================================================
# shared test cases (used on CPU with the emulation and on the GPU with the real extension)
# ==================================================================================================================
def _dt(dtype):
    return str(dtype).replace("torch.", "")


# (dtype, channels_last, training)
MATRIX = [(d, cl, tr) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
          for cl in (False, True) for tr in (False, True)]


def _matrix_id(p):
    dtype, cl, training = p
    return f"{_dt(dtype)}-{'cl' if cl else 'nchw'}-{'train' if training else 'eval'}"


# ==================================================================================================================
# CPU emulation tests
# ==================================================================================================================
HOST_TEST = r"""
#include "cuda/lgag.cuh"
#include "cuda/msdc.cuh"
#include "cuda/updw.cuh"
#include <cmath>
#include <cstdio>
#include <random>
using namespace emcad::cuda;
static int failures = 0;
#define EXPECT(c) do { if (!(c)) { std::printf("FAIL line %d: %s\n", __LINE__, #c); ++failures; } } while (0)

int main() {
    std::mt19937 rng(0);
    std::normal_distribution<double> nd;
    // polyphase stencils == nearest x2 upsample followed by a zero-padded 3x3 conv
    for (int trial = 0; trial < 5; ++trial) {
        const int h = 3 + trial, w = 6 - trial % 3;
        std::vector<double> x(h * w), wt(9), k(16);
        for (auto& v : x) v = nd(rng);
        for (auto& v : wt) v = nd(rng);
        polyphase_weights<double>(wt.data(), k.data());
        auto X = [&](int i, int j) { return (i < 0 || j < 0 || i >= h || j >= w) ? 0.0 : x[i * w + j]; };
        auto U = [&](int y, int z) { return (y < 0 || z < 0 || y >= 2 * h || z >= 2 * w) ? 0.0 : X(y / 2, z / 2); };
        for (int Y = 0; Y < 2 * h; ++Y)
            for (int Z = 0; Z < 2 * w; ++Z) {
                double direct = 0;
                for (int a = 0; a < 3; ++a)
                    for (int b = 0; b < 3; ++b) direct += wt[a * 3 + b] * U(Y + a - 1, Z + b - 1);
                const int i = Y / 2, p = Y % 2, j = Z / 2, q = Z % 2;
                double poly = 0;
                for (int r = 0; r < 2; ++r)
                    for (int s = 0; s < 2; ++s) poly += k[((p * 2 + q) * 2 + r) * 2 + s] * X(i + p - 1 + r, j + q - 1 + s);
                EXPECT(std::fabs(direct - poly) < 1e-12);
            }
    }
    // the store-side channel map inverts ShuffleNet's shuffle (EMCAD.md 2.2), with and without a concat offset
    for (int c = 1; c <= 24; ++c)
        for (int g = 1; g <= c; ++g) {
            if (c % g) continue;
            const int n = c / g;
            ChannelMap m = make_channel_map(0, g, c);
            for (int o = 0; o < c; ++o) EXPECT(m((o % g) * n + o / g) == o);
        }
    {
        ChannelMap m = make_channel_map(5, 0, 10);
        EXPECT(m(3) == 8);
        ChannelMap s = make_channel_map(6, 4, 12);  // branch 1 of a 2-branch concat over 6 channels, 4 groups
        for (int c = 0; c < 6; ++c) { const int src = 6 + c, o = s(c); EXPECT((o % 4) * 3 + o / 4 == src); }
    }
    // Chan merge == statistics of the concatenation
    for (int trial = 0; trial < 20; ++trial) {
        const int na = 1 + trial % 7, nb = 1 + (trial * 3) % 5;
        std::vector<double> v(na + nb);
        for (auto& e : v) e = 100.0 + nd(rng);
        auto stats = [&](int b, int e) {
            double s = 0; for (int i = b; i < e; ++i) s += v[i];
            const double mean = s / (e - b);
            double m2 = 0; for (int i = b; i < e; ++i) m2 += (v[i] - mean) * (v[i] - mean);
            return Welford<double>{double(e - b), mean, m2};
        };
        const Welford<double> all = stats(0, na + nb), merged = welford_merge(stats(0, na), stats(na, na + nb));
        EXPECT(std::fabs(all.mean - merged.mean) < 1e-10 && std::fabs(all.m2 - merged.m2) < 1e-8 && all.n == merged.n);
        EXPECT(welford_merge(Welford<double>{0, 0, 0}, all).m2 == all.m2);
    }
    // activation derivatives == central differences away from the kinks
    for (int act = 0; act <= 5; ++act)
        for (double a : {-4.1, -2.3, -0.7, 0.4, 1.9, 2.8, 5.3, 7.2}) {
            const double e = 1e-6;
            const double fd = (activate<double>(a + e, act) - activate<double>(a - e, act)) / (2 * e);
            EXPECT(std::fabs(activate_backward<double>(1.0, a, act) - fd) < 1e-6);
        }
    // plans: geometry invariants for many shapes, both layouts, every dtype size, every op
    const int64_t shapes[][4] = {{1, 1, 1, 1}, {2, 6, 13, 11}, {6, 1024, 7, 7}, {6, 640, 14, 14}, {6, 256, 28, 28},
                                 {6, 128, 56, 56}, {16, 128, 88, 88}, {1, 3, 200, 3}, {3, 17, 5, 300}, {1, 40, 1, 1}};
    auto geo_ok = [&](const TileGeom& g, int64_t h, int64_t w, int64_t c) {
        const bool pow2 = (g.cb & (g.cb - 1)) == 0 && (g.gh & (g.gh - 1)) == 0 && (g.gw & (g.gw - 1)) == 0;
        return pow2 && g.threads == g.cb * g.gh * g.gw && g.threads <= 256 && g.th == g.gh && g.tw == g.gw * kV &&
               g.tiles_h * g.th >= h && g.tiles_w * g.tw >= w && g.chunks * g.cb >= c && g.smem <= kSmemBudget;
    };
    for (const auto& s : shapes)
        for (int cl = 0; cl < 2; ++cl)
            for (int dt = 0; dt < 4; ++dt) {
                const int64_t st[4] = {s[1] * s[2] * s[3], cl ? 1 : s[2] * s[3], cl ? s[3] * s[1] : s[3], cl ? s[1] : 1};
                EmcadMsdcArgs a{};
                a.n = s[0]; a.c = s[1]; a.h = s[2]; a.w = s[3];
                for (int i = 0; i < 4; ++i) a.x_stride[i] = a.y_stride[i] = st[i];
                a.dtype = dt; a.act = 1; a.training = 1;
                const int ksets[3][4] = {{1, 3, 5, 0}, {3, 7, 0, 0}, {1, 3, 5, 7}};
                const int nbs[3] = {3, 2, 4};
                for (int ks = 0; ks < 3; ++ks) {
                    a.nb = nbs[ks];
                    for (int b = 0; b < 4; ++b) a.ksize[b] = ksets[ks][b];
                    msdc::Plan p;
                    EXPECT(msdc::make_plan(a, &p));
                    EXPECT(geo_ok(p.fwd, a.h, a.w, a.c) && geo_ok(p.bwd_a, a.h, a.w, a.c) && geo_ok(p.bwd_b, a.h, a.w, a.c));
                    EXPECT(p.parts >= 1 && (p.parts == 1 || p.parts * p.taps_total * p.bwd_b.cb <= p.bwd_b.threads));
                    EXPECT(p.f_bytes % 256 == 0 && p.b_bytes % 256 == 0 && p.b_res_b + 1 <= p.b_bytes);
                }
                EmcadUpdwArgs u{};
                u.n = s[0]; u.c = s[1]; u.h = s[2]; u.w = s[3]; u.ksize = 3; u.scale = 2; u.dtype = dt; u.act = 0;
                for (int i = 0; i < 4; ++i) u.x_stride[i] = u.y_stride[i] = st[i];
                updw::Plan up;
                EXPECT(updw::make_plan(u, &up));
                EXPECT(geo_ok(up.fwd, u.h, u.w, u.c) && geo_ok(up.bwd_a, u.h, u.w, u.c) && geo_ok(up.bwd_b, u.h, u.w, u.c));
                if (s[1] % 2 == 0) {
                    EmcadLgagArgs l{};
                    l.n = s[0]; l.h = s[2]; l.w = s[3]; l.cg = l.cx = s[1]; l.f_int = l.groups = s[1] / 2;
                    l.ksize = 3; l.dtype = dt; l.training = 1;
                    for (int i = 0; i < 4; ++i) l.g_stride[i] = l.x_stride[i] = l.out_stride[i] = st[i];
                    lgag::Plan lp;
                    EXPECT(lgag::make_plan(l, &lp));
                    EXPECT(geo_ok(lp.stats, l.h, l.w, l.f_int) && geo_ok(lp.zp, l.h, l.w, l.f_int) &&
                           geo_ok(lp.sums, l.h, l.w, l.f_int) && geo_ok(lp.grad, l.h, l.w, l.f_int));
                }
            }
    // the partition of the cross-block reductions depends on the slot count only
    EXPECT(reduce_lanes(1) == 1 && reduce_lanes(16) == 1 && reduce_lanes(64) == 4 && reduce_lanes(100000) == 256);
    std::printf("%d failures\n", failures);
    return failures != 0;
}
"""


@requires_gxx
def test_host_math_of_the_shared_headers(tmp_path):
    """Shared host/device math compiled for the host with g++: polyphase weights, shuffle maps, Welford merging,
    activation derivatives, tile geometry and scratch plans."""
    src = tmp_path / "host_test.cpp"
    src.write_text(HOST_TEST)
    exe = tmp_path / "host_test"
    proc = subprocess.run([GXX, *EMU_FLAGS, str(src), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:]


SANITIZER_DRIVER = r"""
// Exercises every launcher on random data (both layouts, train/eval, fp32/bf16/fp64) for the sanitizers.
#include "cuda/launchers.h"
#include "cuda/common.cuh"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

static std::mt19937 rng(0);
struct Buf {
    std::vector<unsigned char> bytes;
    void* ptr() { return bytes.data(); }
};
static int esize(int dt) { return dt == EMCAD_DTYPE_F64 ? 8 : dt == EMCAD_DTYPE_F32 ? 4 : 2; }
static void fill(Buf& b, int dt, size_t n, double offset = 0.0, double scale = 1.0) {
    std::normal_distribution<double> nd;
    b.bytes.assign(n * esize(dt) + 64, 0);
    for (size_t i = 0; i < n; ++i) {
        const double v = offset + scale * nd(rng);
        if (dt == EMCAD_DTYPE_F64) reinterpret_cast<double*>(b.ptr())[i] = v;
        else if (dt == EMCAD_DTYPE_F32) reinterpret_cast<float*>(b.ptr())[i] = float(v);
        else if (dt == EMCAD_DTYPE_BF16) reinterpret_cast<__nv_bfloat16*>(b.ptr())[i] = __float2bfloat16_rn(float(v));
        else reinterpret_cast<__half*>(b.ptr())[i] = __float2half_rn(float(v));
    }
}
static void strides(int64_t* s, int64_t c, int64_t h, int64_t w, bool cl) {
    s[0] = c * h * w; s[1] = cl ? 1 : h * w; s[2] = cl ? w * c : w; s[3] = cl ? c : 1;
}
static int failures = 0;
static void expect_ok(cudaError_t e, const char* what) {
    if (e != cudaSuccess) { std::printf("FAIL %s: %d\n", what, int(e)); ++failures; }
}

int main(int argc, char** argv) {
    std::vector<int> dtypes;
    for (int i = 1; i < argc; ++i) dtypes.push_back(std::atoi(argv[i]));
    for (int dt : dtypes)
        for (int cl = 0; cl < 2; ++cl)
            for (int training = 0; training < 2; ++training)
                for (int64_t c : {6, 16}) {
                    const int acc = dt == EMCAD_DTYPE_F64 ? EMCAD_DTYPE_F64 : EMCAD_DTYPE_F32;
                    const int64_t n = 2, h = 9, w = 7;
                    // ---- msdc ----
                    {
                        Buf x, y, gy, gx, ws[3], gws[3], bn[4], sm, sv, gbw, gbb, scr;
                        fill(x, dt, n * c * h * w); fill(gy, dt, n * c * h * w);
                        fill(y, dt, n * c * h * w); fill(gx, dt, n * c * h * w);
                        const int ks[3] = {1, 3, 5};
                        EmcadMsdcArgs a{};
                        a.n = n; a.c = c; a.h = h; a.w = w; strides(a.x_stride, c, h, w, cl); strides(a.y_stride, c, h, w, cl);
                        a.nb = 3; a.dtype = dt; a.act = EMCAD_ACT_RELU6; a.shuffle_groups = int(c / 2); a.training = training; a.eps = 1e-5;
                        for (int b = 0; b < 3; ++b) {
                            fill(ws[b], dt, c * ks[b] * ks[b], 0, 0.3); fill(gws[b], dt, c * ks[b] * ks[b]);
                            a.ksize[b] = ks[b]; a.weight[b] = ws[b].ptr(); a.grad_weight[b] = gws[b].ptr();
                        }
                        fill(bn[0], acc, 3 * c, 1.0, 0.1); fill(bn[1], acc, 3 * c, 0, 0.1); fill(bn[2], acc, 3 * c, 0, 0.1); fill(bn[3], acc, 3 * c, 1.0, 0.1);
                        fill(sm, acc, 3 * c); fill(sv, acc, 3 * c); fill(gbw, acc, 3 * c); fill(gbb, acc, 3 * c);
                        a.x = x.ptr(); a.bn_weight = bn[0].ptr(); a.bn_bias = bn[1].ptr(); a.mean = bn[2].ptr(); a.var = bn[3].ptr();
                        a.y = y.ptr(); a.save_mean = sm.ptr(); a.save_var = sv.ptr();
                        a.grad_y = gy.ptr(); a.grad_x = gx.ptr(); a.grad_bn_weight = gbw.ptr(); a.grad_bn_bias = gbb.ptr();
                        scr.bytes.assign(emcad_msdc_forward_scratch_bytes(&a), 0); a.scratch = scr.ptr(); a.scratch_bytes = scr.bytes.size();
                        expect_ok(emcad_msdc_forward(&a, nullptr), "msdc forward");
                        a.mean = sm.ptr(); a.var = bn[3].ptr();
                        scr.bytes.assign(emcad_msdc_backward_scratch_bytes(&a), 0); a.scratch = scr.ptr(); a.scratch_bytes = scr.bytes.size();
                        expect_ok(emcad_msdc_backward(&a, nullptr), "msdc backward");
                    }
                    // ---- updw ----
                    {
                        Buf x, y, gy, gx, wt, gw, bn[4], sm, sv, gbw, gbb, scr;
                        const int64_t hl = 5, wl = 4;
                        fill(x, dt, n * c * hl * wl); fill(gx, dt, n * c * hl * wl);
                        fill(y, dt, n * c * 4 * hl * wl); fill(gy, dt, n * c * 4 * hl * wl);
                        fill(wt, dt, c * 9, 0, 0.3); fill(gw, dt, c * 9);
                        for (int k = 0; k < 4; ++k) fill(bn[k], acc, c, k == 0 || k == 3 ? 1.0 : 0.0, 0.1);
                        fill(sm, acc, c); fill(sv, acc, c); fill(gbw, acc, c); fill(gbb, acc, c);
                        EmcadUpdwArgs a{};
                        a.n = n; a.c = c; a.h = hl; a.w = wl; strides(a.x_stride, c, hl, wl, cl); strides(a.y_stride, c, 2 * hl, 2 * wl, cl);
                        a.ksize = 3; a.scale = 2; a.dtype = dt; a.act = EMCAD_ACT_RELU; a.training = training; a.eps = 1e-5;
                        a.x = x.ptr(); a.weight = wt.ptr(); a.bn_weight = bn[0].ptr(); a.bn_bias = bn[1].ptr(); a.mean = bn[2].ptr(); a.var = bn[3].ptr();
                        a.y = y.ptr(); a.save_mean = sm.ptr(); a.save_var = sv.ptr();
                        a.grad_y = gy.ptr(); a.grad_x = gx.ptr(); a.grad_weight = gw.ptr(); a.grad_bn_weight = gbw.ptr(); a.grad_bn_bias = gbb.ptr();
                        scr.bytes.assign(emcad_updw_forward_scratch_bytes(&a), 0); a.scratch = scr.ptr(); a.scratch_bytes = scr.bytes.size();
                        expect_ok(emcad_updw_forward(&a, nullptr), "updw forward");
                        scr.bytes.assign(emcad_updw_backward_scratch_bytes(&a), 0); a.scratch = scr.ptr(); a.scratch_bytes = scr.bytes.size();
                        expect_ok(emcad_updw_backward(&a, nullptr), "updw backward");
                    }
                    // ---- lgag ----
                    {
                        const int64_t f = c / 2, hl = 6, wl = 5;
                        Buf g, x, out, gout, gg, gx, p[6], gp[6], bn[12], st[6], gbn[6], scr;
                        const int64_t sizes[6] = {f * 2 * 9, f, f * 2 * 9, f, f, 1};
                        fill(g, dt, n * c * hl * wl); fill(x, dt, n * c * hl * wl); fill(out, dt, n * c * hl * wl);
                        fill(gout, dt, n * c * hl * wl); fill(gg, dt, n * c * hl * wl); fill(gx, dt, n * c * hl * wl);
                        EmcadLgagArgs a{};
                        a.n = n; a.h = hl; a.w = wl; a.cg = a.cx = c; a.f_int = f; a.groups = int(f); a.ksize = 3;
                        strides(a.g_stride, c, hl, wl, cl); strides(a.x_stride, c, hl, wl, cl); strides(a.out_stride, c, hl, wl, cl);
                        a.dtype = dt; a.act = EMCAD_ACT_RELU; a.training = training; a.add_gate_input = 1; a.eps = 1e-5;
                        for (int i = 0; i < 6; ++i) { fill(p[i], dt, sizes[i], 0, 0.3); fill(gp[i], dt, sizes[i]); }
                        for (int k = 0; k < 12; ++k) fill(bn[k], acc, k < 8 ? f : 1, (k % 4 == 0 || k % 4 == 3) ? 1.0 : 0.0, 0.1);
                        for (int k = 0; k < 6; ++k) { fill(st[k], acc, k < 4 ? f : 1); fill(gbn[k], acc, k < 4 ? f : 1); }
                        a.g = g.ptr(); a.x = x.ptr(); a.wg = p[0].ptr(); a.bg = p[1].ptr(); a.wx = p[2].ptr(); a.bx = p[3].ptr(); a.wpsi = p[4].ptr(); a.bpsi = p[5].ptr();
                        for (int k = 0; k < 4; ++k) { a.bn_g[k] = bn[k].ptr(); a.bn_x[k] = bn[4 + k].ptr(); a.bn_psi[k] = bn[8 + k].ptr(); }
                        a.out = out.ptr();
                        for (int k = 0; k < 6; ++k) a.save_stats[k] = st[k].ptr();
                        a.grad_out = gout.ptr(); a.grad_g = gg.ptr(); a.grad_x = gx.ptr();
                        a.grad_wg = gp[0].ptr(); a.grad_bg = gp[1].ptr(); a.grad_wx = gp[2].ptr(); a.grad_bx = gp[3].ptr(); a.grad_wpsi = gp[4].ptr(); a.grad_bpsi = gp[5].ptr();
                        for (int k = 0; k < 6; ++k) a.grad_bn[k] = gbn[k].ptr();
                        scr.bytes.assign(emcad_lgag_forward_scratch_bytes(&a), 0); a.scratch = scr.ptr(); a.scratch_bytes = scr.bytes.size();
                        expect_ok(emcad_lgag_forward(&a, nullptr), "lgag forward");
                        a.bn_g[2] = st[0].ptr(); a.bn_g[3] = st[1].ptr(); a.bn_x[2] = st[2].ptr(); a.bn_x[3] = st[3].ptr();
                        a.bn_psi[2] = st[4].ptr(); a.bn_psi[3] = st[5].ptr();
                        scr.bytes.assign(emcad_lgag_backward_scratch_bytes(&a), 0); a.scratch = scr.ptr(); a.scratch_bytes = scr.bytes.size();
                        expect_ok(emcad_lgag_backward(&a, nullptr), "lgag backward");
                    }
                }
    std::printf("%d failures\n", failures);
    return failures != 0;
}
"""


def _sanitizer_run(tmp_path, sanitizer: str, dtypes):
    """Builds the emulated launchers and a C++ driver that calls every launcher (both layouts, train and eval,
    channels 6 and 16) with -fsanitize=<sanitizer>, runs it and returns (returncode, output)."""
    flags = [f for f in EMU_FLAGS if f != "-Wall"] + [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer"]
    out_dir = _emu_dir() / sanitizer.replace(",", "_")
    out_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(path: Path):
        obj = out_dir / (path.name + ".o")
        if not obj.exists():
            tmp = out_dir / f"{path.name}.{os.getpid()}.o"
            proc = subprocess.run([GXX, *flags, "-c", "-x", "c++", str(path), "-o", str(tmp)], capture_output=True,
                                  text=True)
            assert proc.returncode == 0, proc.stderr[-4000:]
            os.replace(tmp, obj)
        return str(obj)

    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        objs = list(pool.map(compile_one, CU_FILES))
    src = tmp_path / "driver.cpp"
    src.write_text(SANITIZER_DRIVER)
    exe = tmp_path / "driver"
    proc = subprocess.run([GXX, *flags, str(src), *objs, "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1",
               TSAN_OPTIONS="halt_on_error=0")
    proc = subprocess.run([str(exe), *(str(DTYPE_CODE[d]) for d in dtypes)], capture_output=True, text=True,
                          timeout=1500, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def _sanitizer_available(sanitizer: str) -> bool:
    if GXX is None:
        return False
    lib = subprocess.run([GXX, f"-print-file-name=lib{sanitizer}.so"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(lib) and os.path.exists(lib)


@pytest.mark.slow
@pytest.mark.skipif(not _sanitizer_available("asan"), reason="g++ with AddressSanitizer not available")
def test_emulation_is_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """The CPU analogue of compute-sanitizer memcheck: every global/shared-memory access of every launcher is
    checked for out-of-bounds and use-after-free (ASan), and for undefined behaviour such as integer overflow
    (UBSan)."""
    rc, out = _sanitizer_run(tmp_path, "address,undefined", (torch.float32, torch.bfloat16, torch.float64))
    assert rc == 0 and "ERROR: AddressSanitizer" not in out and "runtime error" not in out, out[-6000:]


@pytest.mark.slow
@pytest.mark.skipif(not _sanitizer_available("tsan"), reason="g++ with ThreadSanitizer not available")
def test_emulation_is_clean_under_thread_sanitizer(tmp_path):
    """The CPU analogue of compute-sanitizer racecheck: each CUDA thread is an OS thread and __syncthreads a real
    barrier, so shared-memory accesses of different threads that no barrier orders are reported as data races
    (a removed __syncthreads is caught)."""
    rc, out = _sanitizer_run(tmp_path, "thread", (torch.float32,))
    assert rc == 0 and "WARNING: ThreadSanitizer" not in out, out[-6000:]


def test_ctypes_mirrors_match_the_c_structs(emu):
    for which, struct in enumerate((MsdcArgs, UpdwArgs, LgagArgs)):
        assert emu.emcad_cuda_args_sizeof(which) == ctypes.sizeof(struct), struct.__name__


def test_launchers_refuse_unsupported_arguments_with_reasons(emu):
    x = torch.zeros(1, 2, 3, 3)
    a = MsdcArgs(n=1, c=2, h=3, w=3, x_stride=_strides(x), y_stride=_strides(x), nb=1,
                 ksize=(c_int32 * 4)(9, 0, 0, 0), dtype=0, act=1)
    assert b"odd kernel sizes up to 7" in emu.emcad_msdc_check(ctypes.byref(a))
    assert emu.emcad_msdc_forward(ctypes.byref(a), None) == 1  # cudaErrorInvalidValue
    assert emu.emcad_msdc_forward_scratch_bytes(ctypes.byref(a)) == 0
    a.ksize[0] = 3
    a.act = 17
    assert b"activation" in emu.emcad_msdc_check(ctypes.byref(a))
    a.act = 1
    assert emu.emcad_msdc_check(ctypes.byref(a)) is None
    a.scratch_bytes = 0  # scratch too small: refused before anything is launched
    assert emu.emcad_msdc_forward(ctypes.byref(a), None) == 1
    u = UpdwArgs(n=1, c=2, h=3, w=3, ksize=3, scale=3, dtype=0)
    assert b"scale=2" in emu.emcad_updw_check(ctypes.byref(u))
    u.scale, u.mode = 2, 1
    assert b"nearest" in emu.emcad_updw_check(ctypes.byref(u))
    ga = LgagArgs(n=1, h=3, w=3, cg=8, cx=8, f_int=4, groups=2, ksize=3)
    assert b"F_int == groups" in emu.emcad_lgag_check(ctypes.byref(ga))
    ga.groups, ga.f_int, ga.cg, ga.cx = 1, 1, 8, 8
    assert b"at most 4 input channels" in emu.emcad_lgag_check(ctypes.byref(ga))


# ---- launcher level (ctypes): outputs NaN-poisoned and guarded, scratch NaN-poisoned ----
LAUNCHER_CASES = [(torch.float64, False), (torch.float64, True), (torch.bfloat16, True), (torch.float32, True)]


@pytest.mark.parametrize("dtype,channels_last", LAUNCHER_CASES, ids=lambda v: _dt(v) if isinstance(v, torch.dtype)
                         else ("cl" if v else "nchw"))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_launchers_msdc_updw_lgag_against_reference(emu, dtype, channels_last, training):
    """Every launcher on CPU memory, with channel counts that take the 128-bit vector path (16) and that do not
    (6), against the reference kernel-interface functions."""
    tol = 1e-12 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 3e-2)
    gen = torch.Generator().manual_seed(7)

    def t(*shape, scale=1.0, offset=0.0, d=None):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(d or dtype)

    def close(a, b, what):
        a, b = a.double(), b.double()
        err = ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()
        assert err <= tol, f"{what}: {err:.3g}"

    acc = _acc(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for c in (6, 16):
        x = t(2, c, 9, 7).contiguous(memory_format=fmt)
        ws = [t(c, 1, k, k, scale=0.3) for k in (1, 3, 5)]
        bn = [t(3, c, scale=0.2, offset=1.0, d=acc), t(3, c, scale=0.1, d=acc), t(3, c, scale=0.1, d=acc),
              (torch.rand(3, c, generator=gen, dtype=torch.float64) + 0.5).to(acc)]
        args = (training, 1e-5, "relu6", False, c // 2)
        got = emu_msdc_forward(emu, x, ws, *bn, *args)
        ref = reference.msdc_forward(x, ws, *bn, *args, 1)
        for a, b, what in zip(got, ref, ("y", "mean", "var")):
            close(a, b, f"msdc {what} C={c}")
        gy = t(*ref[0].shape).contiguous(memory_format=fmt)
        got = emu_msdc_backward(emu, gy, x, ws, bn[0], bn[1], ref[1], ref[2], *args)
        gx, gbw, gbb, *gws = reference.msdc_backward(gy, x, ws, bn[0], bn[1], ref[1], ref[2], *args, 1)
        close(got[0], gx, "msdc grad x")
        for i in range(3):
            close(got[1][i], gws[i], f"msdc grad w{i}")
        close(got[2], gbw, "msdc grad bn weight")
        close(got[3], gbb, "msdc grad bn bias")

        xu = t(2, c, 5, 4).contiguous(memory_format=fmt)
        wu = t(c, 1, 3, 3, scale=0.3)
        bnu = [v[0] for v in bn]
        uargs = (training, 1e-5, "nearest", "relu", 2)
        got = emu_updw_forward(emu, xu, wu, *bnu, *uargs)
        ref = reference.updw_forward(xu, wu, *bnu, *uargs)
        for a, b, what in zip(got, ref, ("y", "mean", "var")):
            close(a, b, f"updw {what} C={c}")
        gy = t(*ref[0].shape).contiguous(memory_format=fmt)
        got = emu_updw_backward(emu, gy, xu, wu, bnu[0], bnu[1], ref[1], ref[2], *uargs)
        ref_b = reference.updw_backward(gy, xu, wu, bnu[0], bnu[1], ref[1], ref[2], *uargs)
        for a, b, what in zip(got, ref_b, ("grad x", "grad w", "grad bn weight", "grad bn bias")):
            close(a, b, f"updw {what}")

        f = c // 2
        g, xl = t(2, c, 6, 5).contiguous(memory_format=fmt), t(2, c, 6, 5).contiguous(memory_format=fmt)
        p = [t(f, 2, 3, 3, scale=0.3), t(f, scale=0.1), t(f, 2, 3, 3, scale=0.3), t(f, scale=0.1),
             t(1, f, 1, 1, scale=0.5), t(1, scale=0.1)]

        def bnl(ch):
            return [t(ch, scale=0.2, offset=1.0, d=acc), t(ch, scale=0.1, d=acc), t(ch, scale=0.1, d=acc),
                    (torch.rand(ch, generator=gen, dtype=torch.float64) + 0.5).to(acc)]

        bg, bx, bp = bnl(f), bnl(f), bnl(1)
        largs = (g, xl, *p, *bg, *bx, *bp, training, 1e-5, f, "relu", True)
        got = emu_lgag_forward(emu, *largs)
        ref = reference.lgag_forward(*largs)
        for a, b, what in zip(got, ref, ("out",) + LGAG_STAT_NAMES):
            close(a, b, f"lgag {what} C={c}")
        gy = t(*ref[0].shape).contiguous(memory_format=fmt)
        bargs = (gy, g, xl, *p, bg[0], bg[1], bx[0], bx[1], bp[0], bp[1], list(ref[1:]), training, 1e-5, f, "relu",
                 True)
        got = emu_lgag_backward(emu, *bargs)
        ref_b = reference.lgag_backward(*bargs)
        names = ("g", "x", "wg", "bg", "wx", "bx", "wpsi", "bpsi", "bn_g w", "bn_g b", "bn_x w", "bn_x b",
                 "bn_psi w", "bn_psi b")
        for a, b, what in zip(got, ref_b, names):
            close(a, b, f"lgag grad {what}")


def test_channels_last_path_uses_128_bit_vectors(emu):
    """The vector path is taken for channels_last with 16-byte aligned channel groups, and not for NCHW or for
    channel counts that are not a multiple of the vector width."""
    def vectors(x, c):
        ws = [torch.randn(c, 1, k, k, dtype=x.dtype) for k in (1, 3, 5)]
        bn = [torch.ones(3, c), torch.zeros(3, c), torch.zeros(3, c), torch.ones(3, c)]
        before = emu.emcad_emu_vector_accesses()
        emu_msdc_forward(emu, x, ws, *bn, False, 1e-5, "relu6", False, 0)
        return emu.emcad_emu_vector_accesses() - before

    for dtype, c in ((torch.float32, 16), (torch.bfloat16, 16), (torch.float16, 24)):
        x = torch.randn(2, c, 6, 5, dtype=dtype)
        assert vectors(x.contiguous(memory_format=torch.channels_last), c) > 0, dtype
        assert vectors(x, c) == 0, dtype
    x = torch.randn(2, 6, 6, 5).contiguous(memory_format=torch.channels_last)
    assert vectors(x, 6) == 0


# ---- through the real binding, the Python backend and the custom ops (CPU emulation) ----
@pytest.mark.parametrize("params", MATRIX, ids=_matrix_id)
def test_emulated_msdc_matches_reference(emu_backend, params):
    check_against_reference(msdc_case(), emu_backend, "cpu", *params)


@pytest.mark.parametrize("params", MATRIX, ids=_matrix_id)
def test_emulated_updw_matches_reference(emu_backend, params):
    check_against_reference(updw_case(), emu_backend, "cpu", *params)


@pytest.mark.parametrize("params", MATRIX, ids=_matrix_id)
def test_emulated_lgag_matches_reference(emu_backend, params):
    check_against_reference(lgag_case(), emu_backend, "cpu", *params)


EXTRA_CASES = {
    # the vector path (channels a multiple of 8) with EMCAD's shuffle
    "msdc-c16": lambda: msdc_case(shape=(2, 16, 9, 10), shuffle_groups=8),
    # padded generic kernel set: 4 branches up to 7x7, no shuffle, GELU
    "msdc-1357-gelu": lambda: msdc_case(shape=(1, 5, 9, 8), kernel_sizes=(1, 3, 5, 7), activation="gelu",
                                        shuffle_groups=None),
    # concat with a shuffle across the branches, hardswish
    "msdc-concat": lambda: msdc_case(shape=(2, 3, 7, 6), kernel_sizes=(3, 5), combine="concat", shuffle_groups=3,
                                     activation="hswish"),
    "msdc-single-leaky": lambda: msdc_case(shape=(2, 4, 5, 9), kernel_sizes=(3,), activation="leakyrelu",
                                           shuffle_groups=None),
    "msdc-identity": lambda: msdc_case(shape=(1, 2, 4, 3), kernel_sizes=(1, 5), activation="identity",
                                       shuffle_groups=2),
    "updw-c16-relu6": lambda: updw_case(shape=(1, 16, 4, 7), activation="relu6"),
    "updw-1x1-image": lambda: updw_case(shape=(3, 2, 1, 1)),
    "lgag-c16-no-add": lambda: lgag_case(shape=(1, 16, 5, 8), add_gate_input=False),
    "lgag-4-per-group-gelu": lambda: lgag_case(shape=(2, 8, 4, 5), f_int=2, activation="gelu"),
}


@pytest.mark.parametrize("name", list(EXTRA_CASES))
@pytest.mark.parametrize("dtype,channels_last,training", [(torch.float64, True, True), (torch.float32, False, False),
                                                           (torch.bfloat16, True, True)],
                         ids=["f64-cl-train", "f32-nchw-eval", "bf16-cl-train"])
def test_emulated_more_configurations(emu_backend, name, dtype, channels_last, training):
    check_against_reference(EXTRA_CASES[name](), emu_backend, "cpu", dtype, channels_last, training)


def test_emulated_lgag_uncovered_layout_is_refused_with_a_reason(emu_backend):
    """Two gate channels per group are outside the CUDA kernels: the backend refuses the call with the reason (auto
    then moves on to another backend)."""
    import emcad_kernels as ek

    case = lgag_case(shape=(1, 4, 5, 5), groups=1, f_int=2)
    with pytest.raises(ek.BackendUnavailableError, match="2 output and 4 input channels per group are not supported"):
        check_against_reference(case, emu_backend, "cpu", torch.float64, False, True)


def test_emulated_weight_gradients_keep_the_weight_layout(emu_backend):
    """A weight stored in another physical order gets its gradient with empty_like's strides (what the fake
    implementation promises), with the right values."""
    import emcad_kernels as ek

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 3, 5, 1, generator=gen, dtype=torch.float64).permute(2, 3, 0, 1)  # [5, 1, 3, 3], not contiguous
    assert not w.is_contiguous()
    grads = {}
    for backend in (emu_backend, "reference"):
        wl = w.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        y = ek.multi_scale_dwconv(x, [wl], [torch.nn.BatchNorm2d(5).double()], training=True, backend=backend)
        (grads[backend],) = torch.autograd.grad(y.square().sum(), [wl])
    assert grads[emu_backend].stride() == torch.empty_like(w).stride()
    torch.testing.assert_close(grads[emu_backend], grads["reference"], rtol=1e-10, atol=1e-10)


def test_emulated_empty_batch(emu_backend):
    import emcad_kernels as ek

    x = torch.zeros(0, 4, 5, 5, dtype=torch.float64)
    ws = [torch.zeros(4, 1, 3, 3, dtype=torch.float64)]
    bns = [torch.nn.BatchNorm2d(4).double()]
    with pytest.raises(ek.BackendUnavailableError, match="empty inputs are not supported"):
        ek.multi_scale_dwconv(x, ws, bns, backend=emu_backend)
    assert ek.multi_scale_dwconv(x, ws, bns).shape == (0, 4, 5, 5)  # auto: another backend


@pytest.mark.parametrize("make_case", [msdc_case, updw_case, lgag_case], ids=["msdc", "updw", "lgag"])
def test_emulated_bitwise_deterministic(emu_backend, make_case):
    first, _ = run(make_case(), emu_backend, torch.float32, True, True)
    second, _ = run(make_case(), emu_backend, torch.float32, True, True)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between identical runs"


def _opcheck_samples(device, dtype=torch.float64):
    """(op name, args) of every forward and backward op of a backend, small shapes, requires_grad on inputs."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape, grad=True, scale=1.0, offset=0.0):
        v = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)
        return v.requires_grad_(grad)

    c = 4
    x = t(2, c, 5, 4)
    ws = [t(c, 1, k, k) for k in (1, 3)]
    bw, bb = t(2, c, offset=1.0), t(2, c)
    mean, var = t(2, c, grad=False), t(2, c, grad=False, scale=0.1, offset=1.0)
    msdc = (x, ws, bw, bb, mean, var, True, 1e-5, "relu6", False, 2, 1)
    gy = t(2, c, 5, 4, grad=False)
    msdc_b = (gy, x.detach(), [w.detach() for w in ws], bw.detach(), bb.detach(), mean, var, True, 1e-5, "relu6",
              False, 2, 1)
    xu = t(1, c, 3, 4)
    wu = t(c, 1, 3, 3)
    bu = [t(c, offset=1.0), t(c), t(c, grad=False), t(c, grad=False, scale=0.1, offset=1.0)]
    updw = (xu, wu, *bu, False, 1e-5, "nearest", "relu", 2)
    updw_b = (t(1, c, 6, 8, grad=False), xu.detach(), wu.detach(), bu[0].detach(), bu[1].detach(), bu[2], bu[3],
              False, 1e-5, "nearest", "relu", 2)
    f = c // 2
    g, xl = t(1, c, 4, 3), t(1, c, 4, 3)
    p = [t(f, 2, 3, 3), t(f), t(f, 2, 3, 3), t(f), t(1, f, 1, 1), t(1)]

    def bn(ch):
        return [t(ch, offset=1.0), t(ch), t(ch, grad=False), t(ch, grad=False, scale=0.1, offset=1.0)]

    bg, bx, bp = bn(f), bn(f), bn(1)
    lgag = (g, xl, *p, *bg, *bx, *bp, True, 1e-5, f, "relu", True)
    stats = [s.detach() for s in (bg[2], bg[3], bx[2], bx[3], bp[2], bp[3])]
    lgag_b = (t(1, c, 4, 3, grad=False), g.detach(), xl.detach(), *[v.detach() for v in p], bg[0].detach(),
              bg[1].detach(), bx[0].detach(), bx[1].detach(), bp[0].detach(), bp[1].detach(), stats, True, 1e-5, f,
              "relu", True)
    return [("msdc_fwd", msdc), ("msdc_bwd", msdc_b), ("updw_fwd", updw), ("updw_bwd", updw_b), ("lgag_fwd", lgag),
            ("lgag_bwd", lgag_b)]


def test_emulated_ops_pass_opcheck(emu_backend):
    ops = getattr(torch.ops, EMU_NAMESPACE)
    for name, args in _opcheck_samples("cpu"):
        op = getattr(ops, name).default
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))


def _gradcheck(backend, device):
    import emcad_kernels as ek

    gen = torch.Generator().manual_seed(0)

    def t(*shape, offset=0.0, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(device).requires_grad_()

    c = 2

    def msdc(x, w0, w1, gam, bet):
        bns = [ek.BatchNormParams(gam[i], bet[i], None, None) for i in range(2)]
        return ek.multi_scale_dwconv(x, [w0, w1], bns, training=True, activation="gelu", shuffle_groups=1,
                                     backend=backend)

    assert torch.autograd.gradcheck(msdc, (t(2, c, 4, 3), t(c, 1, 1, 1), t(c, 1, 3, 3), t(2, c, offset=1.0),
                                           t(2, c)), fast_mode=True)

    def updw(x, w, gam, bet):
        return ek.upsample_dwconv(x, w, ek.BatchNormParams(gam, bet, None, None), training=True, activation="gelu",
                                  backend=backend)

    assert torch.autograd.gradcheck(updw, (t(2, c, 3, 2), t(c, 1, 3, 3), t(c, offset=1.0), t(c)), fast_mode=True)

    def lgag(g, x, wg, bg, wx, bx, wpsi, bpsi, gam):
        bns = [ek.BatchNormParams(gam[0:1], gam[1:2], None, None), ek.BatchNormParams(gam[2:3], gam[3:4], None, None),
               ek.BatchNormParams(gam[4:5], gam[5:6], None, None)]
        return ek.grouped_attention_gate(g, x, wg, bg, bns[0], wx, bx, bns[1], wpsi, bpsi, bns[2], groups=1,
                                         training=True, activation="gelu", add_gate_input=True, backend=backend)

    gam = torch.tensor([1.1, 0.1, 0.9, -0.1, 1.2, 0.05], dtype=torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lgag, (t(2, c, 3, 3), t(2, c, 3, 3), t(1, c, 3, 3), t(1), t(1, c, 3, 3), t(1),
                                           t(1, 1, 1, 1), t(1), gam), fast_mode=True)


def test_emulated_float64_gradcheck(emu_backend):
    _gradcheck(emu_backend, "cpu")


def test_emulated_torch_compile_fullgraph(emu_backend):
    """The ops are opaque custom ops: Dynamo traces the functional layer without graph breaks."""
    import emcad_kernels as ek

    case = msdc_case(shape=(1, 4, 6, 5))

    def step(x, w0, w1, w2, gw, gb):
        bns = [ek.BatchNormParams(gw[i], gb[i], None, None) for i in range(3)]
        y = ek.multi_scale_dwconv(x, [w0, w1, w2], bns, training=True, shuffle_groups=2, backend=emu_backend)
        return (y * y).sum()

    def grads(fn):
        x = case.tensors["x"].float().contiguous(memory_format=torch.channels_last).requires_grad_()
        ws = [case.tensors[f"w{i}"].float().requires_grad_() for i in range(3)]
        gw = torch.ones(3, 4, requires_grad=True)
        gb = torch.zeros(3, 4, requires_grad=True)
        loss = fn(x, *ws, gw, gb)
        return [loss.detach(), *torch.autograd.grad(loss, [x, *ws, gw, gb])]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(grads(step), grads(compiled)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ==================================================================================================================
# backend registration and reasons (any machine)
# ==================================================================================================================
def _explain(op="multi_scale_dwconv", dtype=torch.float32, device="cpu", kernel_sizes=(1, 3, 5), **kwargs):
    import emcad_kernels as ek

    c = 4
    x = torch.zeros(2, c, 6, 6, dtype=dtype, device=device)
    if op == "multi_scale_dwconv":
        ws = [torch.zeros(c, 1, k, k, dtype=dtype, device=device) for k in kernel_sizes]
        bns = [ek.BatchNormParams(None, None, None, None) for _ in kernel_sizes]
        return ek.explain(op, x, ws, bns, training=True, **kwargs)
    if op == "upsample_dwconv":
        k = kernel_sizes[0]
        return ek.explain(op, x, torch.zeros(c, 1, k, k, dtype=dtype, device=device), [None] * 4, **kwargs)
    k = kernel_sizes[0]
    z = torch.zeros(2, c, k, k, dtype=dtype, device=device)
    b = torch.zeros(2, dtype=dtype, device=device)
    wpsi = torch.zeros(1, 2, 1, 1, dtype=dtype, device=device)
    b1 = torch.zeros(1, dtype=dtype, device=device)
    return ek.explain(op, x, x, z, b, [None] * 4, z, b, [None] * 4, wpsi, b1, [None] * 4, groups=1, **kwargs)


def _cuda_line(text):
    return next(line for line in text.splitlines() if line.strip().lstrip("->").strip().startswith("cuda "))


def test_cuda_backend_is_registered_with_priority_20():
    import emcad_kernels as ek
    from emcad_kernels import backends

    assert "cuda" in ek.registered_backends()
    assert backends.get_backend("cuda").priority == 20


def test_cuda_backend_reasons():
    """What the cuda kernels cover, as declared by the descriptors (``Support.check`` reads only the call's static
    attributes, so CPU tensors stand in for CUDA ones)."""
    import emcad_kernels as ek
    from emcad_kernels.ops.lgag import LGAG
    from emcad_kernels.ops.msdc import MSDC
    from emcad_kernels.ops.updw import UPDW

    def msdc(ks=(1, 3, 5), **kw):
        c = 4
        return "; ".join(MSDC.support["cuda"].check(MSDC.prepare(
            torch.zeros(1, c, 5, 5), [torch.zeros(c, 1, k, k) for k in ks], [torch.nn.BatchNorm2d(c)] * len(ks),
            **kw)))

    def updw(k=3, **kw):
        return "; ".join(UPDW.support["cuda"].check(UPDW.prepare(torch.zeros(1, 4, 5, 5), torch.zeros(4, 1, k, k),
                                                                 torch.nn.BatchNorm2d(4), **kw)))

    def lgag(k=3, groups=2, f_int=2, cin=4):
        z = torch.zeros(1, cin, 5, 5)
        wg = torch.zeros(f_int, cin // groups, k, k)
        bn = torch.nn.BatchNorm2d(f_int)
        return "; ".join(LGAG.support["cuda"].check(LGAG.prepare(
            z, z, wg, None, bn, wg, None, bn, torch.zeros(1, f_int, 1, 1), None, torch.nn.BatchNorm2d(1),
            groups=groups)))

    assert msdc() == ""
    assert "kernel size 9" in msdc(ks=(9,))
    assert "5 branches" in msdc(ks=(1, 3, 5, 7, 3))
    assert "stride 2" in msdc(stride=2)
    assert updw() == ""
    assert "mode bilinear" in updw(mode="bilinear")
    assert "scale 3" in updw(scale=3)
    assert "kernel size 5" in updw(k=5)
    assert lgag() == ""
    assert "kernel size 1" in lgag(k=1)
    assert "per group" in lgag(groups=1, f_int=2, cin=4)
    x = torch.zeros(1, 4, 5, 5)
    line = _cuda_line(ek.explain("upsample_dwconv", x, torch.zeros(4, 1, 3, 3), torch.nn.BatchNorm2d(4)))
    # the extension is loaded before the device is looked at: without it, the reason is the missing build
    try:
        ek.backends.get_backend("cuda").load()
        expected = "tensors are on cpu"
    except ImportError:
        expected = "CUDA extension not built"
    assert expected in line, line


def test_unbuilt_extension_is_reported():
    from emcad_kernels import _ext

    try:
        _ext.require_cuda_ext()
    except ImportError as e:
        assert "CUDA extension not built" in str(e) or "failed to load" in str(e)
        # on a CPU machine explain stops at the device; the reason shows where CUDA tensors would go
        from emcad_kernels import backends

        assert backends.get_backend("cuda").unavailable_reason() == str(e)
    else:
        pytest.skip("the CUDA extension is built here")


# ==================================================================================================================
# GPU tests (marker gpu; skipped without CUDA; with a GPU they need the built extension, see cuda_backend)
# ==================================================================================================================
REQUIRE_CUDA_EXT = "EMCAD_REQUIRE_CUDA_EXT"


@pytest.fixture
def cuda_backend():
    """With a GPU, a missing or broken ``_C_cuda`` fails these tests: setup.py builds it wherever torch has CUDA,
    a GPU is visible and a toolkit is found, so its absence is a broken install. ``EMCAD_REQUIRE_CUDA_EXT=0``
    (e.g. a GPU machine without nvcc) turns the failure into a skip."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from emcad_kernels import _ext

    try:
        _ext.require_cuda_ext()
    except ImportError as e:
        if os.environ.get(REQUIRE_CUDA_EXT, "1") == "0":
            pytest.skip(f"{e} ({REQUIRE_CUDA_EXT}=0)")
        pytest.fail(f"{e}; a GPU is present, so the extension is required (rebuild with FORCE_CUDA=1 to see why it "
                    f"was not built, or set {REQUIRE_CUDA_EXT}=0 to skip these tests)")
    return "cuda"


B2_MSDC = [(6, 1024, 7), (6, 640, 14), (6, 256, 28), (6, 128, 56)]   # (batch, E = 2C, size) at 224
B2_UPDW = [(6, 512, 7), (6, 320, 14), (6, 128, 28)]                  # EUCB inputs
B2_LGAG = [(6, 320, 14), (6, 128, 28), (6, 64, 56)]                  # LGAG at stages 3..1 (F_int = C/2 groups)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("params", MATRIX, ids=_matrix_id)
@pytest.mark.parametrize("make_case", [msdc_case, updw_case, lgag_case], ids=["msdc", "updw", "lgag"])
def test_gpu_tiny_odd_shapes_match_reference(cuda_backend, make_case, params):
    check_against_reference(make_case(), cuda_backend, "cuda", *params)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(EXTRA_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=_dt)
def test_gpu_more_configurations(cuda_backend, name, dtype):
    for channels_last in (False, True):
        for training in (False, True):
            check_against_reference(EXTRA_CASES[name](), cuda_backend, "cuda", dtype, channels_last, training)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_dt)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("stage", range(4))
def test_gpu_emcad_b2_shapes_match_reference(cuda_backend, dtype, channels_last, stage):
    cases = [msdc_case(shape=(B2_MSDC[stage][0], B2_MSDC[stage][1], B2_MSDC[stage][2], B2_MSDC[stage][2]),
                       shuffle_groups=B2_MSDC[stage][1] // 2)]
    if stage < 3:
        n, c, size = B2_UPDW[stage]
        cases.append(updw_case(shape=(n, c, size, size)))
        n, c, size = B2_LGAG[stage]
        cases.append(lgag_case(shape=(n, c, size, size)))
    modes = (True, False) if dtype == torch.float32 else (True,)
    for case in cases:
        for training in modes:
            check_against_reference(case, cuda_backend, "cuda", dtype, channels_last, training, ref_device="cuda")


@pytest.mark.gpu
def test_gpu_polyp_shape_bf16(cuda_backend):
    check_against_reference(msdc_case(shape=(16, 128, 88, 88), shuffle_groups=64), cuda_backend, "cuda",
                            torch.bfloat16, True, True, ref_device="cuda")


@pytest.mark.gpu
def test_gpu_float64_gradcheck(cuda_backend):
    _gradcheck(cuda_backend, "cuda")


@pytest.mark.gpu
def test_gpu_ops_pass_opcheck(cuda_backend):
    ops = torch.ops.emcad_kernels
    for dtype in (torch.float64, torch.float32):
        for name, args in _opcheck_samples("cuda", dtype):
            torch.library.opcheck(getattr(ops, f"{name}_cuda").default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("make_case,shape", [(msdc_case, (6, 256, 28, 28)), (updw_case, (6, 128, 28, 28)),
                                             (lgag_case, (6, 128, 28, 28))], ids=["msdc", "updw", "lgag"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_bitwise_deterministic(cuda_backend, make_case, shape, channels_last):
    first, _ = run(make_case(shape=shape), cuda_backend, torch.bfloat16, channels_last, True, device="cuda")
    for _ in range(2):
        again, _ = run(make_case(shape=shape), cuda_backend, torch.bfloat16, channels_last, True, device="cuda")
        for name in first:
            assert torch.equal(first[name], again[name]), name


@pytest.mark.gpu
def test_gpu_runs_on_the_current_stream(cuda_backend):
    case = msdc_case(shape=(6, 256, 28, 28), shuffle_groups=128)
    expected, _ = run(case, cuda_backend, torch.bfloat16, True, True, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got, _ = run(case, cuda_backend, torch.bfloat16, True, True, device="cuda")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def _gpu_block_inputs(dtype=torch.bfloat16):
    case = msdc_case(shape=(6, 256, 28, 28))
    x = case.tensors["x"].to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    ws = [case.tensors[f"w{i}"].to("cuda", dtype).requires_grad_() for i in range(3)]
    mods = [torch.nn.BatchNorm2d(256).cuda() for _ in range(3)]
    return x, ws, mods


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_fullgraph(cuda_backend):
    import emcad_kernels as ek

    x, ws, mods = _gpu_block_inputs()

    def step(x):
        y = ek.multi_scale_dwconv(x, ws, mods, training=True, shuffle_groups=128, backend=cuda_backend)
        return y.float().square().mean()

    eager_loss = step(x)
    eager_grads = torch.autograd.grad(eager_loss, ws)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, ws)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(cuda_backend):
    """Forward + backward of all three ops captured in one CUDA graph and replayed with new inputs."""
    import emcad_kernels as ek

    x, ws, mods = _gpu_block_inputs()
    x = x.clone().requires_grad_()
    gen = torch.Generator().manual_seed(5)
    xu = torch.randn(6, 128, 28, 28, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    wu = (torch.randn(128, 1, 3, 3, generator=gen) * 0.3).to("cuda", torch.bfloat16).requires_grad_()
    bn_u = torch.nn.BatchNorm2d(128).cuda()
    lg = lgag_case(shape=(6, 128, 28, 28))
    lt = {k: v.to("cuda", torch.bfloat16).requires_grad_() for k, v in lg.tensors.items()}
    bn_l = [torch.nn.BatchNorm2d(64).cuda(), torch.nn.BatchNorm2d(64).cuda(), torch.nn.BatchNorm2d(1).cuda()]
    static_gy = torch.randn(6, 256, 28, 28, device="cuda", dtype=torch.bfloat16)

    def step():
        y = ek.multi_scale_dwconv(x, ws, mods, training=True, shuffle_groups=128, backend=cuda_backend)
        u = ek.upsample_dwconv(xu, wu, bn_u, training=True, backend=cuda_backend)
        o = ek.grouped_attention_gate(lt["g"], lt["x"], lt["wg"], lt["bg"], bn_l[0], lt["wx"], lt["bx"], bn_l[1],
                                      lt["wpsi"], lt["bpsi"], bn_l[2], groups=64, training=True,
                                      add_gate_input=True, backend=cuda_backend)
        loss = (y * static_gy).float().sum() + u.float().square().mean() + o.float().square().mean()
        return torch.autograd.grad(loss, [x, *ws, xu, wu, lt["g"], lt["x"], lt["wg"]])

    assert_cuda_graph_replay_matches_eager(step, [x, xu, lt["x"]])


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_gpu_compute_sanitizer_clean(cuda_backend, tmp_path, tool):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import test_cuda_backend as t\n"
        "for make, shape in ((t.msdc_case, (2, 40, 13, 11)), (t.updw_case, (2, 40, 9, 6)),"
        " (t.lgag_case, (2, 40, 11, 9))):\n"
        "    for dtype in (torch.bfloat16, torch.float32):\n"
        "        for cl in (False, True):\n"
        "            for training in (False, True):\n"
        "                t.run(make(shape=shape), 'cuda', dtype, cl, training, device='cuda')\n"
        "torch.cuda.synchronize()\n")
    result = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, str(script)],
                            capture_output=True, text=True, timeout=900)
    if "LibraryNotLoaded" in result.stdout + result.stderr or "Device not supported" in result.stdout:
        pytest.skip("compute-sanitizer cannot run on this host")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.gpu
def test_gpu_auto_can_select_cuda(cuda_backend):
    assert "ok" in _cuda_line(_explain(device="cuda"))
    assert "ok" in _cuda_line(_explain(device="cuda", dtype=torch.float64))
