"""The cpu backend's fused ``mscam`` kernel (csrc/cpu/mscam.cpp) against the reference backend: forward and all four
gradients (x, cab_fc1, cab_fc2, sab_weight) under the 2x rule of tests/op_cases.py (fp64, fp32 and bf16 against a
float64 reference), both memory formats, odd shapes, every supported activation, ties in both max reductions,
float64 gradcheck, opcheck, bitwise determinism across thread counts, refusal reasons, and its use by the decoder."""

from __future__ import annotations

import copy

import pytest
import torch

import emcad_kernels as ek
from op_cases import assert_bitwise_equal, assert_matches, layout_strides

pytestmark = pytest.mark.skipif("cpu" not in ek.available_backends(), reason="cpu backend not built")

NAMES = ("x", "cab_fc1", "cab_fc2", "sab_weight")


def make_inputs(shape=(2, 16, 7, 13), k=7, r=None, seed=0):
    """float64 inputs with non-trivial gates (weights scaled like the decoder tests' ``make``)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    r = r or max(1, c // 4)
    return {"x": torch.randn(shape, generator=g, dtype=torch.float64) * 2.0,
            "cab_fc1": torch.randn(r, c, 1, 1, generator=g, dtype=torch.float64) * (1.5 / c ** 0.5),
            "cab_fc2": torch.randn(c, r, 1, 1, generator=g, dtype=torch.float64) * (1.5 / r ** 0.5),
            "sab_weight": torch.randn(1, 2, k, k, generator=g, dtype=torch.float64) * (1.5 / (2 * k * k) ** 0.5)}


def run(inputs, backend, dtype, channels_last, activation="relu", grad_seed=3, grad=None):
    """Forward + backward through ``ek.mscam``: ({"out", "grad <name>"}, output)."""
    t = {}
    for name in NAMES:
        v = inputs[name].to(dtype)
        if name == "x" and channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        t[name] = v.requires_grad_()
    y = ek.mscam(*(t[n] for n in NAMES), activation=activation, backend=backend)
    if grad is None:
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad(y, [t[n] for n in NAMES], grad.to(dtype))
    out = {"out": y.detach()}
    out.update({f"grad {n}": gr for n, gr in zip(NAMES, grads)})
    return out, y


def check(inputs, dtype, channels_last, activation="relu"):
    label = f"{tuple(inputs['x'].shape)} k={inputs['sab_weight'].shape[-1]} {dtype} " \
            f"{'cl' if channels_last else 'nchw'} {activation}"
    got, y = run(inputs, "cpu", dtype, channels_last, activation)
    same, y_ref = run(inputs, "reference", dtype, channels_last, activation)
    ref64, _ = run(inputs, "reference", torch.float64, channels_last, activation)
    assert_matches(got, same, ref64, dtype, label)
    assert y.dtype == dtype and got["grad x"].dtype == dtype
    assert layout_strides(y) == layout_strides(y_ref), label
    assert layout_strides(got["grad x"]) == layout_strides(same["grad x"]), label
    return got


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_matches_reference(dtype, channels_last):
    check(make_inputs(), dtype, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("activation", ["relu6", "leakyrelu", "hswish", "identity"])
def test_activations(activation, channels_last):
    check(make_inputs((2, 16, 6, 5), k=3, seed=4), torch.float32, channels_last, activation)


# odd shapes: H, W in (1, 3, 7, 13), C in (1, 3, 16, 64), reduction ratios 1..16, every odd k <= 9
SHAPES = [((1, 1, 1, 1), 1, 1), ((2, 3, 3, 7), 3, 1), ((1, 16, 13, 1), 5, 4), ((3, 64, 7, 3), 9, 4),
          ((2, 64, 13, 13), 7, 16), ((1, 3, 13, 7), 7, 3), ((2, 16, 1, 13), 9, 2), ((1, 1, 7, 3), 5, 1)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape,k,r", SHAPES, ids=[f"{s}-k{k}-r{r}" for s, k, r in SHAPES])
def test_odd_shapes(shape, k, r, channels_last):
    inputs = make_inputs(shape, k=k, r=r, seed=sum(shape) + k)
    for dtype in (torch.float64, torch.float32):
        check(inputs, dtype, channels_last)


def test_strided_input_is_read_as_nchw():
    """A non-contiguous x (a channel slice) gives the reference's values and an NCHW output."""
    inputs = make_inputs((2, 16, 7, 5))
    big = torch.randn(2, 20, 7, 5, dtype=torch.float64)
    big[:, 2:18] = inputs["x"]
    x = big[:, 2:18]
    args = [x] + [inputs[n] for n in NAMES[1:]]
    torch.testing.assert_close(ek.mscam(*args, backend="cpu"), ek.mscam(*args, backend="reference"),
                               atol=1e-12, rtol=1e-10)


def _tie_inputs(c=16, h=5, w=6, channels_last=False):
    """Ties in both max reductions: fc2 with equal rows gives every channel the same ca, and x repeats values
    across channels (per pixel) and across pixels (per channel)."""
    inputs = make_inputs((2, c, h, w), k=3, seed=7)
    inputs["cab_fc2"] = inputs["cab_fc2"][:1].expand_as(inputs["cab_fc2"]).clone()
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-3, 4, (2, 1, h, w), generator=g).double().expand(2, c, h, w).clone()
    x[:, : c // 2] -= 1.0  # the first half of the channels below the rest: ties among the second half
    x[:, :, 1:3] = x[:, :, :1].amax(dim=(2, 3), keepdim=True)  # rows 1, 2 repeat each channel's maximum
    inputs["x"] = x
    return inputs


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("kind", ["repeated", "constant"])
def test_ties_route_like_the_reference(kind, channels_last):
    """Both max reductions tie; the gradient must go where the reference sends it (global max: the first pixel in
    row-major order, adaptive_max_pool2d; channel max: the first channel, torch.max(dim=1)). A different routing
    moves a whole max-pool gradient to another element, far above the tolerance."""
    inputs = _tie_inputs()
    if kind == "constant":
        inputs["x"] = torch.full_like(inputs["x"], 0.75)
    got, _ = run(inputs, "cpu", torch.float64, channels_last)
    ref, _ = run(inputs, "reference", torch.float64, channels_last)
    for name in got:
        torch.testing.assert_close(got[name], ref[name], atol=1e-12, rtol=1e-10, msg=name)


def test_ties_are_tested():
    """The tie inputs do tie, and routing the channel-max gradient to another channel changes grad x."""
    inputs = _tie_inputs()
    ca_equal = inputs["cab_fc2"].view(16, -1)
    assert torch.equal(ca_equal, ca_equal[:1].expand_as(ca_equal))
    x = inputs["x"]
    per_pixel_max = x.amax(dim=1, keepdim=True)
    assert ((x == per_pixel_max).sum(1) > 1).all()  # channel ties everywhere
    assert ((x == x.amax(dim=(2, 3), keepdim=True)).sum((2, 3)) > 1).all()  # pixel ties in every channel
    ref, _ = run(inputs, "reference", torch.float64, False)
    # the same math with the channel max taken over the channels in reverse (last occurrence) differs
    rev = {**inputs, "x": x.flip(1), "cab_fc1": inputs["cab_fc1"].flip(1), "cab_fc2": inputs["cab_fc2"].flip(0)}
    flipped, _ = run(rev, "reference", torch.float64, False, grad=torch.randn(
        x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).flip(1))
    assert not torch.allclose(flipped["grad x"].flip(1), ref["grad x"], atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gradcheck_float64(channels_last):
    inputs = make_inputs((2, 5, 4, 3), k=3, r=2, seed=11)
    args = []
    for name in NAMES:
        v = inputs[name]
        if name == "x" and channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        args.append(v.clone().requires_grad_())
    for act in ("relu", "hswish"):
        assert torch.autograd.gradcheck(lambda *a: ek.mscam(*a, activation=act, backend="cpu"), args)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(requires_grad, channels_last):
    op = ek.backends.kernel_ops("mscam", "cpu").forward
    inputs = make_inputs((2, 8, 5, 4), k=7, r=2)
    x = inputs["x"].float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [x.requires_grad_(requires_grad)] + [inputs[n].float().requires_grad_(requires_grad)
                                                for n in NAMES[1:]] + ["relu"]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_bitwise_deterministic(channels_last):
    """Same bits run to run and for 1 and 2 threads (items and reduction order depend on the shape only)."""
    inputs = make_inputs((3, 64, 13, 13), k=7, r=4)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 2):
            torch.set_num_threads(t)
            results.append(run(inputs, "cpu", torch.float32, channels_last)[0])
    finally:
        torch.set_num_threads(threads)
    assert_bitwise_equal(results[0], results[1])
    assert_bitwise_equal(results[1], results[2])


def test_refusal_reasons(monkeypatch):
    inputs = make_inputs((2, 8, 4, 4), k=7, r=2)
    args = [inputs[n] for n in NAMES]
    assert "-> cpu" in ek.explain("mscam", *args)
    with pytest.raises(ek.BackendUnavailableError, match="activation gelu is not supported"):
        ek.mscam(*args, activation="gelu", backend="cpu")
    assert "-> reference" in ek.explain("mscam", *args, activation="gelu")
    torch.testing.assert_close(ek.mscam(*args, activation="gelu"), ek.mscam(*args, activation="gelu",
                                                                              backend="reference"))
    k11 = torch.randn(1, 2, 11, 11, dtype=torch.float64)
    with pytest.raises(ek.BackendUnavailableError, match=r"SAB kernel size 11 is not supported \(odd sizes up to 9\)"):
        ek.mscam(*args[:3], k11, backend="cpu")
    half = [a.half() for a in args]
    with pytest.raises(ek.BackendUnavailableError, match="dtype float16 is not supported"):
        ek.mscam(*half, backend="cpu")
    # an extension built before the mscam kernels existed: refused with a reason, auto falls back
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda op, key: not op.startswith("emcad_kernels::mscam") and has_kernel(op, key))
    ek.backends.clear_decisions()
    try:
        with pytest.raises(ek.BackendUnavailableError, match="no CPU kernel for mscam .stale build"):
            ek.mscam(*args, backend="cpu")
        assert "-> reference" in ek.explain("mscam", *args)
    finally:
        ek.backends.clear_decisions()


def test_direct_kernel_argument_errors():
    inputs = make_inputs((2, 8, 4, 4), k=7, r=2)
    x, a, b, s = (inputs[n] for n in NAMES)
    k = torch.ops.emcad_kernels
    with pytest.raises(RuntimeError, match="sab_weight must have shape"):
        k.mscam_fwd(x, a, b, torch.randn(1, 2, 11, 11, dtype=x.dtype), "relu")
    with pytest.raises(RuntimeError, match="cab_fc2 must have shape"):
        k.mscam_fwd(x, a, b[:4], s, "relu")
    with pytest.raises(RuntimeError, match="activation gelu not supported"):
        k.mscam_fwd(x, a, b, s, "gelu")
    with pytest.raises(RuntimeError, match="grad must have x's shape"):
        k.mscam_bwd(x[:1], x, a, b, s, "relu")


def test_decoder_uses_the_cpu_kernel():
    """EMCAD on CPU with the default backend (auto) and with backend="cpu" runs the cpu mscam kernel once per
    stage and matches backend="torch" (inference and gradients)."""
    from emcad import EMCAD
    from emcad.models import set_backend
    torch.manual_seed(0)
    channels = (64, 32, 16, 8)
    dec = EMCAD(channels).double()
    ref = copy.deepcopy(dec)
    set_backend(ref, "torch")
    inputs = [torch.randn(2, c, s, s, dtype=torch.float64) for c, s in zip(channels, (2, 4, 8, 16))]
    with ek.use_backend("auto"):
        for backend in ("auto", "cpu"):
            set_backend(dec, backend)
            with torch.profiler.profile() as prof:
                outs = dec(inputs[0], inputs[1:])
            names = [e.name for e in prof.events()]
            assert names.count("emcad_kernels::mscam_fwd") == 4, backend
            assert "emcad_kernels::mscam_fwd_reference" not in names
            refs = ref(inputs[0], inputs[1:])
            for a, b in zip(refs, outs):
                torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)
            sum(o.sum() for o in outs).backward()
            sum(o.sum() for o in refs).backward()
            for (name, pa), pb in zip(ref.named_parameters(), dec.parameters()):
                torch.testing.assert_close(pb.grad, pa.grad, atol=1e-9, rtol=1e-7, msg=name)
            ref.zero_grad()
            dec.zero_grad()
    # a CAB activation the cpu kernel lacks: a backend="cpu" decoder runs the plain CAB / SAB instead of failing
    for m in (dec.cab4, dec.cab3, dec.cab2, dec.cab1):
        m.activation_name = "gelu"
        m.activation = torch.nn.GELU()
    set_backend(dec, "cpu")
    for m in (ref.cab4, ref.cab3, ref.cab2, ref.cab1):
        m.activation = torch.nn.GELU()
    with torch.profiler.profile() as prof:
        outs = dec(inputs[0], inputs[1:])
    assert not any("mscam" in e.name for e in prof.events())
    for a, b in zip(ref(inputs[0], inputs[1:]), outs):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)
