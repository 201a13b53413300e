"""Registers the Triton backend ("triton", priority 30): fused kernels for CUDA tensors, and for CPU tensors
only under Triton's interpreter (``TRITON_INTERPRET=1``, meant for tests).

Loading is lazy: ``triton`` (a large package) is imported the first time the backend is considered, so
``import emcad_kernels`` works without it. ``_check`` gives the reasons why a call is not supported; ``auto``
then falls through to the next backend.
"""

from __future__ import annotations

import importlib

from .backends import Backend, OpCall, register_backend
from .library import OpSet, define_op_set

MSDC_MAX_BRANCHES = 3
MAX_KERNEL_SIZE = {"multi_scale_dwconv": 7, "upsample_dwconv": 5, "grouped_attention_gate": 7,
                   "layernorm_dilated_dwconv": 7, "dilated_dwconv_groupnorm": 7,
                   # the SAB window's k columns are unrolled at compile time in three kernels; EMCAD uses k = 7
                   "mscam": 11}
MULTI_DILATION_OPS = ("layernorm_dilated_dwconv", "dilated_dwconv_groupnorm")
MAX_DILATION_GROUPS = 4
UPSAMPLE_MODES = ("nearest", "bilinear")


def _load() -> OpSet:
    try:
        importlib.import_module("triton")
    except ModuleNotFoundError as e:
        if e.name == "triton":
            raise ImportError("triton is not installed") from e
        raise ImportError(f"triton could not be imported: {e}") from e
    except ImportError as e:  # a broken or incompatible installation
        raise ImportError(f"triton could not be imported: {e}") from e
    from .triton import KERNELS
    return define_op_set("triton", KERNELS)


def _check(call: OpCall) -> list[str]:
    from . import triton as tk  # loaded by now: Backend.reasons loads before checking

    reasons = []
    if call.device == "cpu":
        if not tk.INTERPRET:
            reasons.append("tensor is on cpu and TRITON_INTERPRET is not set")
    elif call.device != "cuda":
        reasons.append(f"device type {call.device!r} is not supported (cuda, or cpu under TRITON_INTERPRET=1)")
    if call.dtype not in tk.SUPPORTED_DTYPES:
        reasons.append(f"dtype {call.dtype} is not supported (float32, float16, bfloat16)")
    if call.activation not in tk.ACTIVATION_CODES:
        reasons.append(f"activation {call.activation!r} is not supported")
    if call.op not in tk.IMPLEMENTED_OPS:
        reasons.append(f"{call.op} is not implemented in the triton backend yet")
        return reasons
    if call.op == "mutation_stats":  # no kernel sizes; heads (1 to 4) and shapes are validated by the API
        return reasons
    kmax = MAX_KERNEL_SIZE[call.op]
    bad_k = [k for k in call.kernel_sizes if k % 2 == 0 or k > kmax]
    if bad_k:
        reasons.append(f"kernel size {bad_k[0]} is not supported (odd sizes up to {kmax})")
    if call.op == "multi_scale_dwconv":
        if len(call.kernel_sizes) > MSDC_MAX_BRANCHES:
            reasons.append(f"{len(call.kernel_sizes)} branches are not supported (at most {MSDC_MAX_BRANCHES})")
        if call.stride != 1:
            reasons.append(f"stride {call.stride} is not supported (only 1)")
    elif call.op == "upsample_dwconv":
        if call.scale != 2:
            reasons.append(f"scale {call.scale} is not supported (only 2)")
        if call.mode not in UPSAMPLE_MODES:
            reasons.append(f"upsampling mode {call.mode!r} is not supported")
    elif call.op in MULTI_DILATION_OPS:
        # one program covers one group; group geometry travels as scalar kernel arguments (4 slots) and the
        # conv window is a compile-time K×K, shared by all groups
        if call.groups > MAX_DILATION_GROUPS:
            reasons.append(f"{call.groups} channel groups are not supported (at most {MAX_DILATION_GROUPS})")
        if len(set(call.kernel_sizes)) > 1:
            reasons.append(f"different kernel sizes per group {call.kernel_sizes} are not supported (one size for "
                           f"all groups)")
    return reasons


def _auto_skip(call: OpCall) -> str | None:
    if call.device == "cpu":
        return "the Triton interpreter on CPU is for tests, far slower than the other CPU backends"
    return None


register_backend(Backend(
    name="triton", priority=30, load=_load, check=_check, auto_skip=_auto_skip,
    description="fused Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1)"))
