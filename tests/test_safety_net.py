"""The safety net of ``auto``: a fused kernel that fails while compiling or launching makes ``auto`` fall back to the
next backend for that call signature, with one warning saying why; an explicitly requested backend still raises.
Tested by injecting a failing kernel (``op_cases.failing_kernel``) as a test backend above all others."""

from __future__ import annotations

import warnings

import pytest
import torch

import emcad_kernels as ek
from emcad_kernels import backends
from emcad_kernels.descriptor import Support
from emcad_kernels.ops.msdc import MSDC


@pytest.fixture
def flaky(monkeypatch):
    """A backend whose msdc forward kernel always fails."""
    monkeypatch.setitem(MSDC.support, "flaky", Support(kernels=("op_cases", "failing_kernel", "failing_kernel")))
    backends.register_backend(backends.Backend("flaky", priority=100, description="tests", devices=("cpu",),
                                               dtypes=(torch.float32, torch.float64)))
    yield "flaky"
    backends.unregister_backend("flaky")
    backends._failures.clear()


@pytest.fixture
def flaky_backward(monkeypatch, tmp_path):
    """A backend whose msdc forward works (the reference kernel) and whose backward kernel always fails."""
    module = tmp_path / "flaky_backward_kernels.py"
    module.write_text("from emcad_kernels.reference import msdc_forward\nfrom op_cases import failing_kernel\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(MSDC.support, "flaky_bwd", Support(kernels=("flaky_backward_kernels", "msdc_forward",
                                                                    "failing_kernel")))
    backends.register_backend(backends.Backend("flaky_bwd", priority=100, description="tests", devices=("cpu",),
                                               dtypes=(torch.float32, torch.float64)))
    yield "flaky_bwd"
    backends.unregister_backend("flaky_bwd")


def _call(seed=0, c=4, requires_grad=False, kernel_sizes=(1, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 6, 5, generator=g, requires_grad=requires_grad)
    ws = [torch.randn(c, 1, k, k, generator=g, requires_grad=requires_grad) for k in kernel_sizes]
    bns = [torch.nn.BatchNorm2d(c) for _ in ws]
    return x, ws, bns


def test_auto_falls_back_with_one_warning(flaky):
    x, ws, bns = _call()
    assert "-> flaky" in ek.explain("multi_scale_dwconv", x, ws, bns)
    with pytest.warns(RuntimeWarning, match="the flaky kernel of multi_scale_dwconv on cpu/float32 failed "
                                            r"\(RuntimeError: injected kernel failure\)"):
        y = ek.multi_scale_dwconv(x, ws, bns)
    torch.testing.assert_close(y, ek.multi_scale_dwconv(x, ws, bns, backend="reference"))
    text = ek.explain("multi_scale_dwconv", x, ws, bns)
    assert "flaky      no: its kernel failed on this call signature (RuntimeError: injected kernel failure)" in text
    assert "-> flaky" not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per signature: the second call is silent
        ek.multi_scale_dwconv(x, ws, bns)
    # the same signature with other values stays on the fallback; another signature (kernel sizes) tries the backend
    # again and falls back again, with its own warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ek.multi_scale_dwconv(*_call(seed=1, c=5))
    x5, ws5, bns5 = _call(kernel_sizes=(3, 5))
    with pytest.warns(RuntimeWarning, match="injected kernel failure"):
        ek.multi_scale_dwconv(x5, ws5, bns5)


def test_explicit_request_still_raises(flaky):
    x, ws, bns = _call()
    with pytest.raises(RuntimeError, match="injected kernel failure"):
        ek.multi_scale_dwconv(x, ws, bns, backend="flaky")
    with ek.use_backend("flaky"), pytest.raises(RuntimeError, match="injected kernel failure"):
        ek.multi_scale_dwconv(x, ws, bns)


def test_backward_kernel_failure_falls_back_under_auto(flaky_backward):
    x, ws, bns = _call(requires_grad=True)
    y = ek.multi_scale_dwconv(x, ws, bns, training=True)
    with pytest.warns(RuntimeWarning, match="backward kernel emcad_kernels::msdc_bwd_flaky_bwd failed"):
        got = torch.autograd.grad(y.sum(), [x, *ws])
    x2, ws2, bns2 = _call(requires_grad=True)
    want = torch.autograd.grad(ek.multi_scale_dwconv(x2, ws2, bns2, training=True, backend="reference").sum(),
                               [x2, *ws2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # explicitly requested: the backward failure propagates
    y = ek.multi_scale_dwconv(x, ws, bns, training=True, backend="flaky_bwd")
    with pytest.raises(RuntimeError, match="injected kernel failure"):
        y.sum().backward()


def test_out_of_memory_is_not_hidden(monkeypatch):
    monkeypatch.setitem(MSDC.support, "oom", Support(kernels=("op_cases", "oom_kernel", "oom_kernel")))
    backends.register_backend(backends.Backend("oom", priority=100, description="tests", devices=("cpu",),
                                               dtypes=(torch.float32,)))
    try:
        x, ws, bns = _call()
        with pytest.raises(torch.OutOfMemoryError):
            ek.multi_scale_dwconv(x, ws, bns)
    finally:
        backends.unregister_backend("oom")
