"""Shared test set-up.

Without a GPU the Triton kernels run in Triton's CPU interpreter. ``TRITON_INTERPRET`` is read when a kernel is
decorated with ``@triton.jit``, i.e. when its module is imported, so it must be set before anything imports
``emcad_kernels``.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))  # reproducible CPU timings on the 2-core CI machine


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
