"""The ``cpu`` backend kernels of the two multi-dilation ops (``csrc/cpu/multidilation_impl.h``):
``layernorm_dilated_dwconv`` (EGE-UNet GAB / GHPA) and ``dilated_dwconv_groupnorm`` (MALUNet DGA / GAU).

* parity with the ``reference`` backend for the output and every gradient (x, norm weights/biases, conv
  weights/biases): fp64 tight, fp32 loose, bf16 by the 2× rule (error vs an fp64 truth ≤ 2 × the reference
  backend's own bf16 error + a floor below one bf16 ulp), NCHW and channels_last;
* odd shapes: 1×1 images, H≠W, odd sizes, one channel per group, N=0, dilations larger than the image, images
  tall enough to be split into several row bands (halo across band boundaries), several dilation sets and k=5;
* float64 gradcheck, torch.library.opcheck, bitwise determinism (reruns and thread counts), every ISA build;
* ``auto`` picks cpu; bad input; whole EGE-UNet / MALUNet forward + backward with the cpu backend vs
  ``backend="torch"``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import emcad_kernels as ek
from emcad_kernels import _ext, backends, dilated_dwconv_groupnorm, layernorm_dilated_dwconv
from op_cases import assert_bitwise_equal, layout_strides

if not _ext.HAS_CPU_EXT:
    pytest.skip(f"cpu backend not available: {_ext.CPU_EXT_ERROR}", allow_module_level=True)

CPU, REF = "cpu", "reference"
D64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LAYOUTS = ["nchw", "cl"]


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------
class Case:
    """An op with float64 master inputs; ``run`` casts them, runs forward + backward, returns every result."""

    def __init__(self, op, x, params, dilations, eps):
        self.op, self.x, self.params, self.dilations, self.eps = op, x, params, tuple(dilations), eps

    def call(self, backend, x, params):
        if self.op == "lndw":
            return layernorm_dilated_dwconv(x, *params, dilations=self.dilations, eps=self.eps, backend=backend)
        ws, bs, gw, gb = params
        return dilated_dwconv_groupnorm(x, ws, bs, gw, gb, dilations=self.dilations, eps=self.eps, backend=backend)

    def run(self, backend, dtype, layout, grad_dtype=None):
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
        x = self.x.to(dtype, copy=True).contiguous(memory_format=fmt).requires_grad_(True)
        params = [[t.to(dtype, copy=True).requires_grad_(True) for t in p] if isinstance(p, list)
                  else p.to(dtype, copy=True).requires_grad_(True) for p in self.params]
        out = self.call(backend, x, params)
        gen = torch.Generator().manual_seed(123)
        grad = torch.randn(out.shape, generator=gen, dtype=D64).to(grad_dtype or dtype)
        grad = grad.contiguous(memory_format=fmt)
        out.backward(grad.to(out.dtype))
        res = {"out": out.detach(), "x": x.grad}
        for i, p in enumerate(params):
            for j, t in enumerate(p if isinstance(p, list) else [p]):
                res[f"p{i}.{j}"] = t.grad
        return res


def lndw_case(shape, sizes, ks, dilations, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, h, w = shape
    x = torch.randn(n, sum(sizes), h, w, generator=gen, dtype=D64) * 1.5 + 0.3
    lws = [torch.rand(g, generator=gen, dtype=D64) + 0.5 for g in sizes]
    lbs = [torch.randn(g, generator=gen, dtype=D64) * 0.1 for g in sizes]
    ws = [torch.randn(g, 1, k, k, generator=gen, dtype=D64) * 0.3 for g, k in zip(sizes, ks)]
    bs = [torch.randn(g, generator=gen, dtype=D64) * 0.1 for g in sizes]
    return Case("lndw", x, [lws, lbs, ws, bs], dilations, 1e-6)


def dwgn_case(shape, c, ks, dilations, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, h, w = shape
    q = c // len(ks)
    x = torch.randn(n, c, h, w, generator=gen, dtype=D64) + 0.5
    ws = [torch.randn(q, 1, k, k, generator=gen, dtype=D64) * 0.3 for k in ks]
    bs = [torch.randn(q, generator=gen, dtype=D64) * 0.1 for _ in ks]
    gw = torch.rand(c, generator=gen, dtype=D64) + 0.5
    gb = torch.randn(c, generator=gen, dtype=D64) * 0.1
    return Case("dwgn", x, [ws, bs, gw, gb], dilations, 1e-5)


# (shape (N, H, W), group sizes, kernel sizes, dilations)
LNDW_CASES = {
    "gab1": ((2, 8, 8), (5, 5, 5, 5), (3, 3, 3, 3), (1, 2, 5, 7)),
    "odd13x11": ((1, 13, 11), (9, 9, 9, 9), (3, 3, 3, 3), (1, 2, 5, 7)),
    "ghpa": ((1, 20, 16), (24,), (3,), (1,)),
    "c1_k5": ((2, 7, 5), (1, 2, 1), (3, 5, 3), (1, 3, 2)),
    "img1x1": ((2, 1, 1), (3, 3), (3, 3), (1, 2)),
    "dil_gt_image": ((1, 5, 17), (4, 4), (3, 3), (9, 2)),
    "tall_bands": ((1, 37, 6), (6, 6), (3, 3), (1, 3)),
    "n0": ((0, 5, 4), (2, 3), (3, 3), (1, 2)),
}
# (shape, channels, kernel sizes, dilations); channels split into len(ks) equal GroupNorm groups
DWGN_CASES = {
    "dga": ((2, 8, 8), 24, (3, 3, 3, 3), (7, 5, 2, 1)),
    "gau_k5": ((1, 13, 11), 16, (5, 5, 5, 5), (1, 1, 1, 1)),
    "c1": ((2, 6, 7), 4, (3, 3, 3, 3), (1, 2, 3, 1)),
    "img1x1": ((3, 1, 1), 8, (3, 3, 3, 3), (2, 1, 1, 3)),
    "dil_gt_image": ((1, 5, 9), 8, (3, 3), (10, 1)),
    "tall_bands": ((1, 40, 9), 12, (3, 3, 3, 3), (1, 2, 5, 7)),
    "n0": ((0, 4, 5), 8, (3, 3), (1, 2)),
}


def make(op, name):
    if op == "lndw":
        return lndw_case(*LNDW_CASES[name])
    return dwgn_case(*DWGN_CASES[name])


ALL_CASES = [("lndw", k) for k in LNDW_CASES] + [("dwgn", k) for k in DWGN_CASES]


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------
def _maxerr(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _scale(t):
    return 1.0 + (t.double().abs().max().item() if t.numel() else 0.0)


def assert_parity(case, dtype, layout, tol):
    ref = case.run(REF, dtype, layout)
    got = case.run(CPU, dtype, layout)
    assert got.keys() == ref.keys()
    for key in ("out", "x"):  # same memory format (strides of size-1 dims are arbitrary)
        a, b = got[key], ref[key]
        assert layout_strides(a) == layout_strides(b), key
    for key in ref:
        a, b = got[key], ref[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        err = _maxerr(a, b)
        assert err <= tol * _scale(b), f"{key}: max error {err:.3e} > {tol:.1e} x {_scale(b):.3g}"


# floors for entries where the reference's own error is ~0: a quarter of a bf16 ulp (relative); for fp32 about
# 100 ulps (the kernels sum in other orders than PyTorch)
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3}


def assert_lowp_rule(case, dtype, layout):
    """cpu in ``dtype`` vs an fp64 truth on the same rounded inputs: error ≤ 2 × the reference backend's own
    error in ``dtype`` + floor, for the output and every gradient (docs/numerics.md#tolerance-rule). The
    relative rule (not a fixed tolerance) matters for ill-conditioned cases, e.g. a LayerNorm over one channel
    (rstd = 1/sqrt(eps))."""
    low = Case(case.op, case.x.to(dtype).double(),
               [[t.to(dtype).double() for t in p] if isinstance(p, list) else p.to(dtype).double()
                for p in case.params], case.dilations, case.eps)
    truth = low.run(REF, D64, layout, grad_dtype=dtype)
    ref = low.run(REF, dtype, layout)
    got = low.run(CPU, dtype, layout)
    for key in ("out", "x"):  # same memory format as the reference (strides of size-1 dims are arbitrary)
        a, b = got[key], ref[key]
        assert layout_strides(a) == layout_strides(b), key
    for key in truth:
        assert got[key].dtype == dtype, key
        err, err_ref = _maxerr(got[key], truth[key]), _maxerr(ref[key], truth[key])
        assert err <= 2 * err_ref + FLOOR[dtype] * _scale(truth[key]), \
            f"{key}: cpu {dtype} error {err:.3e}, reference {dtype} error {err_ref:.3e}"


def check(case, dtype, layout):
    if dtype == torch.float64:
        assert_parity(case, dtype, layout, 1e-10)
    else:
        assert_lowp_rule(case, dtype, layout)


# --------------------------------------------------------------------------------------------------
# parity matrix
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,name", ALL_CASES, ids=[f"{o}-{n}" for o, n in ALL_CASES])
def test_parity(op, name, dtype, layout):
    check(make(op, name), dtype, layout)


def test_non_contiguous_input():
    """A strided (sliced) input is read through its strides."""
    for case in (lndw_case((2, 9, 12), (3, 4), (3, 3), (1, 2)), dwgn_case((2, 9, 12), 8, (3, 3), (2, 1))):
        wide = torch.randn(case.x.shape[0], case.x.shape[1], case.x.shape[2], 2 * case.x.shape[3], dtype=D64)
        x = wide[..., ::2]
        x.copy_(case.x)
        outs = [case.call(b, x, case.params) for b in (REF, CPU)]
        torch.testing.assert_close(outs[1], outs[0], atol=1e-10, rtol=1e-10)


def test_auto_picks_cpu_for_cpu_tensors():
    ws = [torch.randn(2, 1, 3, 3) for _ in range(4)]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(1, 8, 6, 6, dtype=dtype)
        w = [t.to(dtype) for t in ws]
        calls = {"layernorm_dilated_dwconv": ((x, None, None, w), {}), "dilated_dwconv_groupnorm": ((x, w, None, None,
                                                                                                     None), {})}
        for op, (args, _) in calls.items():
            assert "-> cpu" in ek.explain(op, *args, dilations=[1, 2, 5, 7])
            assert ek.backends.reasons(op, *args, dilations=[1, 2, 5, 7], backend=CPU) == []
    x = torch.randn(1, 2, 4, 4, dtype=torch.float16)
    assert ek.backends.reasons("layernorm_dilated_dwconv", x, None, None, [torch.randn(2, 1, 3, 3).half()],
                               dilations=[1], backend=CPU) == [
        "dtype float16 is not supported (float32, float64, bfloat16)"]


# --------------------------------------------------------------------------------------------------
# ISA builds, gradcheck, opcheck, determinism
# --------------------------------------------------------------------------------------------------
def _available_isas():
    out = [isa for isa in ("default", "avx2", "avx512") if torch.ops.emcad_kernels.cpu_set_isa(isa)]
    torch.ops.emcad_kernels.cpu_set_isa("auto")
    return out


@pytest.mark.parametrize("isa", _available_isas())
def test_every_isa_build(isa):
    try:
        _ext.set_cpu_isa(isa)
        for op, name in (("lndw", "gab1"), ("lndw", "tall_bands"), ("dwgn", "dga"), ("dwgn", "tall_bands")):
            for layout in LAYOUTS:
                assert_parity(make(op, name), torch.float64, layout, 1e-10)
                assert_parity(make(op, name), torch.float32, layout, 1e-4)  # well conditioned cases
    finally:
        _ext.set_cpu_isa("auto")


def test_gradcheck():
    # H = 9 splits into two row bands: the halo across the band boundary is differentiated too.
    # fast_mode (random projections of the Jacobian) keeps the runtime low; the parity tests cover each entry.
    lc = lndw_case((1, 9, 5), (2, 3), (3, 3), (1, 2))
    dc = dwgn_case((2, 9, 4), 4, (3, 3), (2, 1))
    for case in (lc, dc):
        flat = [case.x] + [t for p in case.params for t in (p if isinstance(p, list) else [p])]
        struct = [len(p) if isinstance(p, list) else None for p in case.params]

        def f(*leaves, case=case, struct=struct):
            x, rest, params = leaves[0], list(leaves[1:]), []
            for s in struct:
                params.append([rest.pop(0) for _ in range(s)] if s is not None else rest.pop(0))
            return case.call(CPU, x, params)

        inputs = [t.detach().clone().requires_grad_(True) for t in flat]
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def _op_args(case, dtype=D64, layout="nchw"):
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = case.x.to(dtype).contiguous(memory_format=fmt)
    params = [[t.to(dtype) for t in p] if isinstance(p, list) else p.to(dtype) for p in case.params]
    if case.op == "lndw":
        return backends.kernel_ops("layernorm_dilated_dwconv", CPU).forward, [x, *params, list(case.dilations),
                                                                              case.eps]
    ws, bs, gw, gb = params
    return backends.kernel_ops("dilated_dwconv_groupnorm", CPU).forward, [x, ws, bs, gw, gb, list(case.dilations),
                                                                          case.eps]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["lndw", "dwgn"])
def test_opcheck(op, layout):
    case = lndw_case((2, 9, 5), (2, 3), (3, 5), (1, 2)) if op == "lndw" else dwgn_case((2, 9, 5), 6, (3, 5), (2, 1))
    custom_op, args = _op_args(case, layout=layout)
    torch.library.opcheck(custom_op, args)
    grad_args = [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor)
                 else ([t.clone().requires_grad_(True) for t in a]
                       if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a) for a in args]
    torch.library.opcheck(custom_op, grad_args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(dtype):
    cases = [(lndw_case((2, 45, 33), (9, 9, 9, 9), (3, 3, 3, 3), (1, 2, 5, 7)), "cl"),
             (lndw_case((1, 40, 24), (32,), (3,), (1,)), "nchw"),
             (dwgn_case((2, 41, 30), 24, (3, 3, 3, 3), (7, 5, 2, 1)), "nchw"),
             (dwgn_case((1, 36, 20), 16, (5, 5, 5, 5), (1, 1, 1, 1)), "cl")]
    threads = torch.get_num_threads()
    try:
        for case, layout in cases:
            first = case.run(CPU, dtype, layout)
            assert_bitwise_equal(first, case.run(CPU, dtype, layout))
            # the work partition depends on the shape only: another thread count gives the same bits
            torch.set_num_threads(1)
            assert_bitwise_equal(first, case.run(CPU, dtype, layout))
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_kernel_entry_points_reject_bad_input():
    k = torch.ops.emcad_kernels
    x = torch.randn(1, 6, 5, 5)
    w = [torch.randn(3, 1, 3, 3), torch.randn(3, 1, 3, 3)]
    b = [torch.zeros(3), torch.zeros(3)]
    with pytest.raises(RuntimeError, match="weights cover 6 channels but x has 7"):
        k.lndw_fwd(torch.randn(1, 7, 5, 5), b, b, w, b, [1, 2], 1e-6)
    with pytest.raises(RuntimeError, match="one entry per group"):
        k.lndw_fwd(x, b, b, w, b, [1], 1e-6)
    with pytest.raises(RuntimeError, match="odd k"):
        k.dwgn_fwd(x, [torch.randn(3, 1, 2, 2)] * 2, b, torch.ones(6), torch.zeros(6), [1, 1], 1e-5)
    with pytest.raises(RuntimeError, match="equal sizes"):
        k.dwgn_fwd(x, [torch.randn(2, 1, 3, 3), torch.randn(4, 1, 3, 3)], [torch.zeros(2), torch.zeros(4)],
                              torch.ones(6), torch.zeros(6), [1, 1], 1e-5)
    with pytest.raises(RuntimeError, match="dtype"):
        k.lndw_fwd(x.half(), b, b, w, b, [1, 2], 1e-6)
    with pytest.raises(RuntimeError, match="grad has shape"):
        k.dwgn_bwd(torch.randn(1, 6, 4, 5), x, w, b, torch.ones(6), torch.zeros(6), [1, 1], 1e-5)
    # the functional API names the argument before any kernel runs
    with pytest.raises(ValueError, match="equal groups"):
        dilated_dwconv_groupnorm(x, [torch.randn(2, 1, 3, 3), torch.randn(4, 1, 3, 3)], None, None, None,
                                 dilations=(1, 1), backend=CPU)


# --------------------------------------------------------------------------------------------------
# whole models: cpu backend vs backend="torch"
# --------------------------------------------------------------------------------------------------
def _flat(out):
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out]


@pytest.mark.parametrize("model", ["egeunet", "malunet"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_whole_model_cpu_matches_torch(model, training):
    from emcad.models import EGEUNet, MALUNet

    cls = {"egeunet": EGEUNet, "malunet": MALUNet}[model]
    torch.manual_seed(0)
    plain = cls(backend="torch").double().train(training)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    fused = copy.deepcopy(plain).set_backend(CPU).train(training)
    # 32×32: the deepest stages run at 2×2 and 1×1, where most dilated taps fall into the padding
    x = torch.rand(2, 3, 32, 32, dtype=D64, generator=gen) * 255
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yf = _flat(plain(xp)), _flat(fused(xf))
    for a, b in zip(yf, yp):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    grads = [torch.randn(t.shape, generator=gen, dtype=D64) for t in yp]
    torch.autograd.backward(yp, grads)
    torch.autograd.backward(yf, grads)
    torch.testing.assert_close(xf.grad, xp.grad, atol=1e-9, rtol=1e-7)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-9, rtol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_models_use_the_cpu_kernels():
    """With backend="cpu" the models' multi-dilation calls reach the C++ kernels (not a fallback)."""
    from emcad.models import EGEUNet, MALUNet

    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad(), torch.profiler.profile() as prof:
        EGEUNet(backend=CPU)(x)
        MALUNet(backend=CPU)(x)
    names = [e.name for e in prof.events()]
    assert (names.count("emcad_kernels::lndw_fwd"), names.count("emcad_kernels::dwgn_fwd")) == (6 + 5, 6 + 6 * 3)
    assert not any(n.endswith("_fwd_reference") for n in names)
