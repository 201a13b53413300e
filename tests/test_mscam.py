"""The ``mscam`` op: EMCAD's CAB then SAB applied as ``d · ca · sa``, against the plain CAB / SAB
modules: forward, every gradient, train and eval mode of the modules, float64 gradcheck, opcheck, FLOP counts,
argument checking, and its use by the decoder's fused path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import emcad_kernels as ek
from emcad.models import CAB, SAB, set_backend
from emcad.models.blocks import apply_mscam_attention


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(c=32, k=7, activation="relu", dtype=torch.float64, seed=0):
    """CAB + SAB with non-trivial weights (the default N(0, 0.02²) init makes every gate ≈ 0.5)."""
    g = torch.Generator().manual_seed(seed)
    cab, sab = CAB(c, activation=activation), SAB(k)
    with torch.no_grad():
        for p in (*cab.parameters(), *sab.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p[0].numel() ** 0.5))
    return cab.to(dtype), sab.to(dtype)


def plain(x, cab, sab):
    d = cab(x) * x
    return sab(d) * d


def fused(x, cab, sab, backend=None):
    return ek.mscam(x, cab.fc1.weight, cab.fc2.weight, sab.conv.weight, activation=cab.activation_name,
                    backend=backend)


def _x(shape=(2, 32, 6, 5), dtype=torch.float64, channels_last=False, seed=1):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2.0
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("activation,k", [("relu", 7), ("relu6", 3), ("gelu", 11), ("leakyrelu", 7)])
def test_forward_and_all_gradients_match_plain_modules(activation, k, train, dtype, channels_last):
    cab, sab = make(activation=activation, k=k, dtype=dtype)
    cab.train(train)
    sab.train(train)
    ref_cab, ref_sab = copy.deepcopy(cab), copy.deepcopy(sab)
    xa = _x(dtype=dtype, channels_last=channels_last).requires_grad_()
    xb = xa.detach().clone().requires_grad_()
    ya, yb = plain(xa, ref_cab, ref_sab), fused(xb, cab, sab)
    assert yb.shape == ya.shape and yb.dtype == ya.dtype
    torch.testing.assert_close(yb, ya, **TOL[dtype])
    if channels_last:
        assert yb.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(ya.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    ya.backward(grad)
    yb.backward(grad)
    pairs = [(xb.grad, xa.grad, "x"), (cab.fc1.weight.grad, ref_cab.fc1.weight.grad, "fc1"),
             (cab.fc2.weight.grad, ref_cab.fc2.weight.grad, "fc2"), (sab.conv.weight.grad, ref_sab.conv.weight.grad,
                                                                     "sab")]
    for got, want, name in pairs:
        scale = max(want.abs().max().item(), 1.0)
        err = (got - want).abs().max().item()
        assert err <= (1e-10 if dtype == torch.float64 else 2e-5) * scale, f"{name}: {err:.3g} (scale {scale:.3g})"


def test_gradcheck_float64():
    cab, sab = make(c=8, k=3)
    x = _x((2, 8, 4, 3)).requires_grad_()
    w = [cab.fc1.weight.detach().clone().requires_grad_(), cab.fc2.weight.detach().clone().requires_grad_(),
         sab.conv.weight.detach().clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda x, a, b, s: ek.mscam(x, a, b, s, activation="gelu"), (x, *w))
    assert torch.autograd.gradcheck(lambda x, a, b, s: ek.mscam(x, a, b, s, activation="relu"), (x, *w))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(requires_grad, channels_last):
    op = ek.backends.kernel_ops("mscam", "reference").forward
    x = torch.randn(2, 8, 5, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [x.requires_grad_(requires_grad), torch.randn(2, 8, 1, 1, requires_grad=requires_grad),
            torch.randn(8, 2, 1, 1, requires_grad=requires_grad), torch.randn(1, 2, 7, 7, requires_grad=requires_grad),
            "relu"]
    torch.library.opcheck(op, args)


def test_low_precision_close_to_float32():
    cab, sab = make(dtype=torch.float32)
    x = _x(dtype=torch.float32)
    ref = fused(x, cab, sab)
    for dt in (torch.bfloat16, torch.float16):
        out = ek.mscam(x.to(dt), cab.fc1.weight.to(dt), cab.fc2.weight.to(dt), sab.conv.weight.to(dt))
        assert out.dtype == dt
        torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backward", [False, True])
def test_flops_equal_plain_modules(backward):
    cab, sab = make(dtype=torch.float32)

    def count(fn):
        x = _x(dtype=torch.float32).requires_grad_(backward)
        with FlopCounterMode(display=False) as counter:
            out = fn(x)
            if backward:
                out.sum().backward()
        return counter.get_total_flops()

    assert count(lambda x: fused(x, cab, sab)) == count(lambda x: plain(x, cab, sab)) > 0


def test_bad_inputs():
    cab, sab = make(c=8)
    x = _x((2, 8, 4, 4))
    a, b, s = cab.fc1.weight, cab.fc2.weight, sab.conv.weight
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        ek.mscam(x[0], a, b, s)
    with pytest.raises(TypeError, match="x must be float16"):
        ek.mscam(x.long(), a, b, s)
    with pytest.raises(TypeError, match="cab_fc1 must be a torch.Tensor"):
        ek.mscam(x, None, b, s)
    with pytest.raises(ValueError, match=r"cab_fc1 must have shape \[R, 8, 1, 1\]"):
        ek.mscam(x, a[:, :4], b, s)
    with pytest.raises(ValueError, match=r"cab_fc2 must have shape \[8, 1, 1, 1\]"):
        ek.mscam(x, a, b[:4], s)
    with pytest.raises(ValueError, match=r"sab_weight must have shape \[1, 2, k, k\]"):
        ek.mscam(x, a, b, torch.randn(1, 2, 4, 4, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"sab_weight must have shape"):
        ek.mscam(x, a, b, torch.randn(1, 3, 3, 3, dtype=x.dtype))
    with pytest.raises(TypeError, match="cab_fc2 has dtype torch.float32"):
        ek.mscam(x, a, b.float(), s)
    with pytest.raises(ValueError, match="activation must be one of"):
        ek.mscam(x, a, b, s, activation="prelu")
    if "cpu" in ek.available_backends():
        with pytest.raises(ek.BackendUnavailableError, match="activation gelu is not supported"):
            ek.mscam(x, a, b, s, activation="gelu", backend="cpu")
    assert "-> reference" in ek.explain("mscam", x, a, b, s, activation="gelu")


def test_decoder_attention_uses_the_op(monkeypatch):
    calls = []
    original = ek.mscam
    monkeypatch.setattr(ek, "mscam", lambda *a, **k: calls.append(1) or original(*a, **k))
    cab, sab = make(dtype=torch.float32)
    x = _x(dtype=torch.float32)
    torch.testing.assert_close(apply_mscam_attention(x, cab, sab), plain(x, cab, sab), **TOL[torch.float32])
    assert calls == [1]
    set_backend(cab, "torch")
    apply_mscam_attention(x, cab, sab)  # torch backend: the plain composition
    assert calls == [1]


@pytest.mark.skipif("cpu" not in ek.available_backends(), reason="cpu backend not built")
def test_backend_without_mscam_runs_plain_composition(monkeypatch):
    """A decoder set to a backend that cannot run mscam (here: the cpu backend with its mscam entry taken out of the
    descriptor), or under use_backend of it, runs the plain CAB/SAB; with mscam available it runs the op."""
    from emcad import EMCAD
    from emcad_kernels.ops.mscam import MSCAM
    calls = []
    original = ek.mscam
    monkeypatch.setattr(ek, "mscam", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    dec = EMCAD((64, 32, 16, 8)).eval()
    ref = copy.deepcopy(dec)
    set_backend(ref, "torch")
    set_backend(dec, "cpu")
    inputs = [torch.randn(1, c, s, s) for c, s in zip((64, 32, 16, 8), (2, 4, 8, 16))]
    with torch.no_grad():
        dec(inputs[0], inputs[1:])
        assert calls == [1] * 4  # the cpu backend's mscam kernel
        calls.clear()
        monkeypatch.delitem(MSCAM.support, "cpu")
        ek.backends.clear_decisions()
        for a, b in zip(ref(inputs[0], inputs[1:]), dec(inputs[0], inputs[1:])):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        assert calls == []
        set_backend(dec, "auto")
        with ek.use_backend("cpu"):
            dec(inputs[0], inputs[1:])
        assert calls == []
        dec(inputs[0], inputs[1:])  # auto: the reference backend's op
        assert calls == [1] * 4
