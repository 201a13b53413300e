"""The activation and dtype codes of ``csrc/common/codes.h``, read from the header (Python cannot include it).

The C++ CPU kernels, the CUDA kernels (and their ctypes mirrors in test_cuda_backend.py) and the Triton kernels
must agree on these numbers; test_native_codes.py checks the Python tables against this parse.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

CODES_H = Path(__file__).resolve().parents[1] / "csrc" / "common" / "codes.h"

_DTYPES = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "F16": torch.float16}


def _enum(text: str, name: str, prefix: str) -> dict[str, int]:
    body = re.search(r"enum\s+" + name + r"\s*\{(.*?)\};", text, re.S)
    assert body, f"enum {name} not found in {CODES_H}"
    body = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    codes = {}
    for item in body.split(","):
        if not item.strip():
            continue
        m = re.fullmatch(r"\s*" + prefix + r"(\w+)\s*=\s*(\d+)\s*", item)
        assert m, f"cannot parse enumerator {item.strip()!r} of {name} in {CODES_H}"
        codes[m.group(1)] = int(m.group(2))
    return codes


def activation_codes() -> dict[str, int]:
    """{activation name (emcad_kernels.ACTIVATIONS): code}"""
    return {k.lower(): v for k, v in _enum(CODES_H.read_text(), "EmcadActivation", "EMCAD_ACT_").items()}


def dtype_codes() -> dict[torch.dtype, int]:
    return {_DTYPES[k]: v for k, v in _enum(CODES_H.read_text(), "EmcadDType", "EMCAD_DTYPE_").items()}


def define(name: str) -> str:
    """the value text of ``#define name value`` in the header"""
    m = re.search(r"#define\s+" + name + r"\s+(\S+)", CODES_H.read_text())
    assert m, f"{name} not found in {CODES_H}"
    return m.group(1)


def leaky_slope() -> float:
    return float(define("EMCAD_LEAKY_SLOPE"))
