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


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (or set EMCAD_RUN_SLOW=1)")


def run_slow(config) -> bool:
    return config.getoption("--run-slow") or os.environ.get("EMCAD_RUN_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none available)")
    skip_slow = pytest.mark.skip(reason="slow test: run with --run-slow or EMCAD_RUN_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow(config):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _fresh_backend_choices():
    """Backend choices are cached per call signature; tests that change what a backend supports (monkeypatched
    descriptors, test backends) must not leak their choices into other tests."""
    yield
    import emcad_kernels

    emcad_kernels.backends.clear_decisions()
