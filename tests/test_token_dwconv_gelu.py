"""``token_dwconv_gelu``, PVTv2's Mix-FFN middle (depthwise 3×3 + bias + GELU on ``(B, H·W, C)`` tokens), on every
backend, and its use by the PVTv2 encoder:

* the reference backend against the plain composition of PVTv2's modules (transpose, ``nn.Conv2d``, transpose,
  ``nn.GELU``) and its autograd: the oracle itself;
* the cpu and triton backends against the reference, forward and the gradients of x, weight and bias, under the 2×
  rule of tests/op_cases.py (fp32 / bf16, fp16 on triton; fp64 on cpu), odd H and W, channel counts that are not a
  multiple of the vector width, batch 1, 1-pixel rows and columns, non-contiguous tokens;
* float64 gradcheck (reference, cpu), ``torch.library.opcheck`` of each backend's forward op, bitwise determinism
  (reruns, 1 vs 2 threads), bad input, FLOP counts equal to the plain module's, ``torch.compile(fullgraph=True)``;
* the encoder: ``backend="auto"`` against ``backend="torch"`` (outputs and every parameter gradient), unchanged
  state-dict keys.

The Triton kernels run under the interpreter on CPU (tests/conftest.py), on tiny shapes.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import emcad_kernels as ek
from op_cases import assert_bitwise_equal, assert_matches

HAS_CPU = "cpu" in ek.available_backends()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from emcad_kernels import triton as ek_triton

    HAS_TRITON = torch.cuda.is_available() or ek_triton.INTERPRET
if HAS_TRITON:
    from test_triton_backend import interpreter_bounds_check  # noqa: F401  (autouse: bounds of every access)

needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (or no GPU and no interpreter)")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "weight", "bias")


def make_inputs(batch=2, height=5, width=7, channels=19, seed=0):
    """float64 tokens, weight and bias; z spans GELU's curved region (|z| up to ~4)."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, height * width, channels, generator=g, dtype=torch.float64),
            "weight": torch.randn(channels, 1, 3, 3, generator=g, dtype=torch.float64) * 0.5,
            "bias": torch.randn(channels, generator=g, dtype=torch.float64) * 0.3,
            "size": (height, width)}


def plain(x, weight, bias, size):
    """PVTv2's modules: TokenDepthwiseConv (tokens -> NCHW, conv, -> tokens) then nn.GELU."""
    b, n, c = x.shape
    m = x.transpose(1, 2).reshape(b, c, *size)
    return F.gelu(F.conv2d(m, weight, bias, padding=1, groups=c).flatten(2).transpose(1, 2))


def run(inputs, backend, dtype, device="cpu", strided=False, grad_seed=3):
    """Forward + backward of one call: ({"out", "grad x", "grad weight", "grad bias"}, output)."""
    t = {}
    for name in NAMES:
        v = inputs[name].to(device=device, dtype=dtype)
        if name == "x" and strided:  # every other channel of a twice-wider tensor
            v = torch.stack([v, torch.zeros_like(v)], -1).flatten(-2)[..., ::2]
            assert not v.is_contiguous()
        t[name] = v.requires_grad_()
    fn = plain if backend == "plain" else lambda *a: ek.token_dwconv_gelu(*a, backend=backend)
    y = fn(t["x"], t["weight"], t["bias"], inputs["size"])
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad(y, [t[n] for n in NAMES], gy.to(device=device, dtype=dtype))
    out = {"out": y.detach()}
    out.update({f"grad {n}": gr for n, gr in zip(NAMES, grads)})
    return out, y


def check_backend(inputs, backend, dtype, device="cpu", strided=False):
    label = f"{backend} {tuple(inputs['x'].shape)} {inputs['size']} {dtype}{' strided' if strided else ''}"
    got, y = run(inputs, backend, dtype, device, strided)
    same, _ = run(inputs, "reference", dtype)
    ref64, _ = run(inputs, "reference", torch.float64)
    assert_matches(got, same, ref64, dtype, label)
    assert y.dtype == dtype and y.is_contiguous() and y.shape == inputs["x"].shape, label
    assert got["grad x"].dtype == dtype and got["grad weight"].dtype == dtype, label


# batch, H, W, C: odd sizes, 1-pixel rows / columns, C below / around / above the vector widths (4, 8, 16 floats)
SHAPES = [(2, 5, 7, 19), (1, 1, 1, 3), (1, 1, 9, 16), (3, 8, 1, 5), (1, 6, 4, 32), (2, 3, 5, 37), (1, 9, 11, 64)]


# --------------------------------------------------------------------------------------------------
# reference (the oracle)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_reference_matches_plain_modules(shape):
    inputs = make_inputs(*shape)
    got, _ = run(inputs, "reference", torch.float64)
    want, _ = run(inputs, "plain", torch.float64)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, msg=k)


def test_reference_gradcheck():
    inputs = make_inputs(1, 3, 4, 5, seed=1)
    args = [inputs[n].clone().requires_grad_() for n in NAMES]
    assert torch.autograd.gradcheck(lambda *a: ek.token_dwconv_gelu(*a, (3, 4), backend="reference"), args,
                                    fast_mode=True)


# --------------------------------------------------------------------------------------------------
# cpu
# --------------------------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_matches_reference(shape, dtype):
    check_backend(make_inputs(*shape), "cpu", dtype)


@needs_cpu
@pytest.mark.parametrize("dtype,channels", [(torch.float64, 300), (torch.float32, 600), (torch.bfloat16, 776)],
                         ids=["f64", "f32", "bf16"])
def test_cpu_wide_channels(dtype, channels):
    """Channel counts whose 3x3 window and weights exceed the kernels' L1 budget take the strip traversal (the
    window slid along the row in registers) instead of the pixel-major one; with a scalar channel tail."""
    check_backend(make_inputs(2, 3, 10, channels, seed=8), "cpu", dtype)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cpu_strided_tokens(dtype):
    inputs = make_inputs(2, 5, 3, 21, seed=2)
    check_backend(inputs, "cpu", dtype, strided=True)
    dense, _ = run(inputs, "cpu", dtype)
    strided, _ = run(inputs, "cpu", dtype, strided=True)
    assert_bitwise_equal(dense, strided)


@needs_cpu
def test_cpu_gradcheck():
    inputs = make_inputs(2, 3, 4, 11, seed=1)  # 11 float64 channels: vector path and scalar tail in every build
    args = [inputs[n].clone().requires_grad_() for n in NAMES]
    assert torch.autograd.gradcheck(lambda *a: ek.token_dwconv_gelu(*a, (3, 4), backend="cpu"), args,
                                    fast_mode=True)


@needs_cpu
def test_cpu_bitwise_deterministic_across_threads():
    inputs = make_inputs(2, 13, 11, 40, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = run(inputs, "cpu", torch.float32)
        torch.set_num_threads(2)
        two, _ = run(inputs, "cpu", torch.float32)
        again, _ = run(inputs, "cpu", torch.float32)
    finally:
        torch.set_num_threads(before)
    assert_bitwise_equal(one, two)
    assert_bitwise_equal(two, again)


@needs_cpu
def test_cpu_every_isa_build():
    """The kernels compiled per instruction set (default, avx2, avx512) all match the reference."""
    from emcad_kernels import _ext

    cases = [make_inputs(2, 5, 6, 40, seed=5), make_inputs(1, 3, 5, 600, seed=9)]  # pixel-major, strips
    before = _ext.cpu_isa()
    try:
        for isa in ("default", "avx2", "avx512"):
            try:
                _ext.set_cpu_isa(isa)
            except (ValueError, RuntimeError):
                continue  # not supported by this CPU
            for inputs in cases:
                check_backend(inputs, "cpu", torch.float32)
    finally:
        _ext.set_cpu_isa(before)


# --------------------------------------------------------------------------------------------------
# triton
# --------------------------------------------------------------------------------------------------
TRITON_SHAPES = [(2, 5, 7, 6), (1, 1, 3, 5), (1, 9, 2, 3)]  # 8×8-pixel, 4-channel tiles under the interpreter


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype):
    check_backend(make_inputs(*shape), "triton", dtype, device=TRITON_DEVICE)


@needs_triton
def test_triton_strided_and_deterministic():
    inputs = make_inputs(2, 3, 9, 5, seed=6)
    check_backend(inputs, "triton", torch.float32, device=TRITON_DEVICE, strided=True)
    first, _ = run(inputs, "triton", torch.float32, TRITON_DEVICE)
    second, _ = run(inputs, "triton", torch.float32, TRITON_DEVICE)
    assert_bitwise_equal(first, second)


# --------------------------------------------------------------------------------------------------
# registration: opcheck, FLOPs, compile
# --------------------------------------------------------------------------------------------------
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu), pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    op = ek.backends.kernel_ops("token_dwconv_gelu", backend).forward
    inputs = make_inputs(2, 3, 5, 6, seed=7)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    args = [inputs[n].float().to(device).requires_grad_() for n in NAMES] + [3, 5]
    torch.library.opcheck(op, args)


def test_flops_match_plain_module():
    from torch.utils.flop_counter import FlopCounterMode

    from emcad.encoders.pvtv2 import ConvFeedForward

    torch.manual_seed(0)
    fused = ConvFeedForward(8, 24)
    plain_ffn = copy.deepcopy(fused).set_backend("torch")
    x = torch.randn(2, 30, 8)
    counts = []
    for m in (fused, plain_ffn):
        with FlopCounterMode(display=False) as counter:
            m(x.clone().requires_grad_(), 5, 6).square().sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_torch_compile_fullgraph_mix_ffn():
    """The op is an opaque custom op: Dynamo traces a Mix-FFN using it without graph breaks, forward and backward
    (aot_eager keeps the test fast; the eager call first fills the backend-choice cache, as any eager warm-up
    does)."""
    from emcad.encoders.pvtv2 import ConvFeedForward

    torch.manual_seed(0)
    ffn = ConvFeedForward(8, 16)
    x = torch.randn(2, 35, 8)

    def outputs(fn):
        t = x.clone().requires_grad_()
        y = fn(t)
        return [y.detach(), *torch.autograd.grad(y.square().sum(), [t, *ffn.parameters()])]

    eager = outputs(lambda t: ffn(t, 5, 7))
    torch._dynamo.reset()
    compiled = outputs(torch.compile(lambda t: ffn(t, 5, 7), fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (dict(x=torch.zeros(2, 12)), "x must be a 3-D tensor"),
    (dict(x=torch.zeros(2, 12, 4, dtype=torch.int64)), "x must be float16"),
    (dict(size=(3, 5)), "does not match the 12 tokens"),
    (dict(size=(3,)), r"size must be \(H, W\)"),
    (dict(size=(0, 12)), r"size must be \(H, W\)"),
    (dict(weight=torch.zeros(4, 1, 5, 5)), r"weight must have shape \[4, 1, 3, 3\]"),
    (dict(weight=torch.zeros(4, 3, 3)), "weight must be a 4-D tensor"),
    (dict(weight=torch.zeros(4, 1, 3, 3, dtype=torch.float64)), "weight has dtype torch.float64"),
    (dict(bias=torch.zeros(5)), "bias has 5 elements, expected 4"),
    (dict(bias=torch.zeros(4, 1)), "bias must be a 1-D tensor"),
    (dict(bias="zeros"), "bias must be a torch.Tensor"),
])
def test_bad_input(change, message):
    args = dict(x=torch.zeros(2, 12, 4), weight=torch.zeros(4, 1, 3, 3), bias=torch.zeros(4), size=(3, 4))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ek.token_dwconv_gelu(args["x"], args["weight"], args["bias"], args["size"])


def test_bias_none_is_zero():
    inputs = make_inputs(1, 3, 3, 4)
    a = ek.token_dwconv_gelu(inputs["x"], inputs["weight"], None, (3, 3), backend="reference")
    b = ek.token_dwconv_gelu(inputs["x"], inputs["weight"], torch.zeros(4, dtype=torch.float64), (3, 3),
                             backend="reference")
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# the PVTv2 encoder
# --------------------------------------------------------------------------------------------------
def _encoder_pair(dtype):
    from emcad.encoders import pvt_v2_b0

    torch.manual_seed(0)
    plain_enc = pvt_v2_b0(drop_path_rate=0.0).to(dtype).set_backend("torch")
    fused = copy.deepcopy(plain_enc).set_backend("auto")
    return plain_enc, fused


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)], ids=["f64", "f32"])
def test_encoder_auto_matches_torch(dtype, tol):
    plain_enc, fused = _encoder_pair(dtype)
    x = torch.randn(1, 3, 32, 64, dtype=dtype)
    results = []
    for enc in (plain_enc, fused):
        feats = enc.train()(x)
        sum((f * torch.linspace(-1, 1, f.numel(), dtype=dtype).view_as(f)).sum() for f in feats).backward()
        results.append((feats, {n: p.grad for n, p in enc.named_parameters()}))
    (f_plain, g_plain), (f_fused, g_fused) = results
    for a, b in zip(f_fused, f_plain):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert g_fused.keys() == g_plain.keys()
    for name in g_plain:
        scale = max(1.0, g_plain[name].abs().max().item())
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=tol, atol=tol * scale, msg=name)


def test_encoder_state_dict_unchanged():
    plain_enc, fused = _encoder_pair(torch.float32)
    assert list(fused.state_dict()) == list(plain_enc.state_dict())
    assert "block1.0.mlp.dwconv.dwconv.weight" in fused.state_dict()
    fused.load_state_dict(plain_enc.state_dict())


def test_emcadnet_backend_reaches_encoder():
    from emcad.models import create_model

    net = create_model("emcad_b0", num_classes=2, backend="torch")
    assert net.backbone.block1[0].mlp.backend == "torch"
    net.set_backend("auto")
    assert net.backbone.block1[0].mlp.backend == net.backbone.block1[0].attn.backend == "auto"
