"""Tests of the Triton kernels of the EGE-UNet / MALUNet multi-dilation ops (``layernorm_dilated_dwconv``,
``dilated_dwconv_groupnorm``) against the reference backend.

Without a GPU the kernels run in Triton's CPU interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), so
the CPU tests use tiny odd shapes: ragged tiles, several tiles and chunks per image, 1×1 images, one channel per
group, dilations larger than the image. The triton backend is requested explicitly (``auto`` skips the
interpreter).

Tolerance (KERNELS.md §8.1), for the output and every gradient:
``max|triton − ref64| <= 2·max|ref_same_dtype − ref64| + floor(dtype)·max(1, max|ref64|)``.

A ``slow`` test (``--run-slow``) runs whole EGE-UNet / MALUNet forward + backward passes on the triton backend.
GPU-only tests (marker ``gpu``) run the EGE-UNet GAB / GHPA and MALUNet DGA / GAU shapes at 256 px in all dtypes,
determinism, ``torch.compile`` and whole-model training steps against ``backend="torch"``.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.6'); the triton backend "
                                     "tests need it")

import emcad_kernels as ek  # noqa: E402
from emcad_kernels import triton as ek_triton  # noqa: E402
from emcad_kernels import dilated_dwconv_groupnorm, layernorm_dilated_dwconv  # noqa: E402

# the interpreter's out-of-bounds check (autouse), the tolerance rule and the sm_90 compile harness are shared
# with the other triton tests
from op_cases import (assert_backend_matches_reference, assert_cuda_graph_replay_matches_eager,  # noqa: E402
                      assert_matches)
from test_triton_backend import _COMPILE_CHECK, _clean_env, _python, interpreter_bounds_check  # noqa: E402,F401

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not CUDA and not ek_triton.INTERPRET:
    pytest.skip("no GPU and the triton kernels were not decorated for the interpreter", allow_module_level=True)


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------
def lndw_case(sizes=(5, 5, 5, 5), k=3, dilations=(1, 2, 5, 7), shape=(2, 9, 7), seed=0):
    """fp32 CPU tensors of one ``layernorm_dilated_dwconv`` call: x, per-group LN affine, weights, biases."""
    gen = torch.Generator().manual_seed(seed)
    n, h, w = shape
    x = torch.randn(n, sum(sizes), h, w, generator=gen) * 1.5 + 0.5
    lws = [torch.rand(g, generator=gen) + 0.5 for g in sizes]
    lbs = [torch.randn(g, generator=gen) * 0.1 for g in sizes]
    ws = [torch.randn(g, 1, k, k, generator=gen) * 0.3 for g in sizes]
    bs = [torch.randn(g, generator=gen) * 0.1 for g in sizes]
    return dict(op="lndw", x=x, params=[lws, lbs, ws, bs], dilations=tuple(dilations), eps=1e-6)


def dwgn_case(c=8, groups=4, k=3, dilations=(7, 5, 2, 1), shape=(2, 9, 7), seed=1):
    """fp32 CPU tensors of one ``dilated_dwconv_groupnorm`` call: x, weights, biases, GroupNorm affine."""
    gen = torch.Generator().manual_seed(seed)
    n, h, w = shape
    q = c // groups
    x = torch.randn(n, c, h, w, generator=gen) + 0.3
    ws = [torch.randn(q, 1, k, k, generator=gen) * 0.3 for _ in range(groups)]
    bs = [torch.randn(q, generator=gen) * 0.1 for _ in range(groups)]
    gw = torch.rand(c, generator=gen) + 0.5
    gb = torch.randn(c, generator=gen) * 0.1
    return dict(op="dwgn", x=x, params=[ws, bs, gw, gb], dilations=tuple(dilations), eps=1e-5)


PARAM_NAMES = {"lndw": ("ln_weight", "ln_bias", "weight", "bias"), "dwgn": ("weight", "bias", "gn_weight", "gn_bias")}


def run(case, backend, dtype, channels_last, device=DEVICE, param_dtype=None, grad_seed=3):
    """Forward + backward through the functional API: ({"out", "grad x", "grad <param>[i]": ...}, output).
    ``param_dtype`` overrides the dtype of the normalisation affine parameters (fp32 with low-precision x)."""
    x = case["x"].to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    names = PARAM_NAMES[case["op"]]
    norm_params = (0, 1) if case["op"] == "lndw" else (2, 3)
    params, leaves = [], [("x", x)]
    for i, (name, p) in enumerate(zip(names, case["params"])):
        dt = param_dtype if (param_dtype is not None and i in norm_params) else dtype
        if isinstance(p, list):
            p = [t.to(device=device, dtype=dt).requires_grad_() for t in p]
            leaves += [(f"{name}[{j}]", t) for j, t in enumerate(p)]
        else:
            p = p.to(device=device, dtype=dt).requires_grad_()
            leaves.append((name, p))
        params.append(p)
    if case["op"] == "lndw":
        y = layernorm_dilated_dwconv(x, *params, dilations=case["dilations"], eps=case["eps"], backend=backend)
    else:
        y = dilated_dwconv_groupnorm(x, *params, dilations=case["dilations"], eps=case["eps"], backend=backend)
    gen = torch.Generator().manual_seed(grad_seed)
    gy = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, [t for _, t in leaves], gy)
    out = {"out": y.detach()}
    out.update({f"grad {name}": g for (name, _), g in zip(leaves, grads)})
    return out, y


def check_against_reference(case, dtype, channels_last, param_dtype=None):
    """Outputs and input gradients keep the input's memory format, parameter gradients their parameter's dtype."""
    label = f"{case['op']} {dtype} {'channels_last' if channels_last else 'NCHW'}"

    def run_call(backend, dt, device=DEVICE):
        return run(case, backend, dt, channels_last, device=device, param_dtype=param_dtype)
    assert_backend_matches_reference(run_call, "triton", dtype, label, check_dtypes=True)


# --------------------------------------------------------------------------------------------------
# correctness against the reference (CPU interpreter, or GPU)
# --------------------------------------------------------------------------------------------------
MATRIX = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.float16, True)]


def _ids(p):
    return f"{str(p[0]).replace('torch.', '')}-{'cl' if p[1] else 'nchw'}"


@pytest.mark.parametrize("params", MATRIX, ids=_ids)
def test_lndw_gab_groups_match_reference(params):
    """EGE-UNet GAB1: 4 groups of 5 channels, dilations 1, 2, 5, 7 on an odd 9×7 image (most d = 5, 7 taps fall
    in the padding)."""
    check_against_reference(lndw_case(), *params)


@pytest.mark.parametrize("params", MATRIX, ids=_ids)
def test_dwgn_dga_groups_match_reference(params):
    """MALUNet DGA: 4 groups, dilations 7, 5, 2, 1, GroupNorm(4, C)."""
    check_against_reference(dwgn_case(), *params)


LNDW_ODD = {
    "1x1-image": dict(sizes=(3, 2), dilations=(1, 2), shape=(2, 1, 1)),
    "one-channel-groups": dict(sizes=(1, 1, 1), dilations=(1, 2, 1), shape=(1, 5, 6)),
    "unequal-groups-13x11": dict(sizes=(3, 6, 4), dilations=(2, 1, 3), shape=(1, 13, 11)),
    "dilation-beyond-image": dict(sizes=(2, 3), dilations=(9, 4), shape=(1, 3, 5)),
    "ghpa-single-group": dict(sizes=(12,), dilations=(1,), shape=(2, 7, 9)),
    "k5": dict(sizes=(4, 4), k=5, dilations=(1, 2), shape=(1, 6, 5)),
}


@pytest.mark.parametrize("name", LNDW_ODD)
def test_lndw_odd_shapes(name):
    check_against_reference(lndw_case(**LNDW_ODD[name]), torch.float32, name in ("1x1-image", "k5"))


DWGN_ODD = {
    "1x1-image": dict(c=8, groups=4, dilations=(1, 9, 2, 1), shape=(2, 1, 1)),
    "one-channel-groups": dict(c=4, groups=4, dilations=(1, 2, 3, 1), shape=(1, 5, 3)),
    "dilation-beyond-image-13x11": dict(c=6, groups=2, dilations=(1, 17), shape=(1, 13, 11)),
    "gau-k5-single-dilation": dict(c=8, groups=4, k=5, dilations=(1, 1, 1, 1), shape=(1, 4, 5)),
    "one-group": dict(c=3, groups=1, dilations=(2,), shape=(2, 4, 7)),
}


@pytest.mark.parametrize("name", DWGN_ODD)
def test_dwgn_odd_shapes(name):
    check_against_reference(dwgn_case(**DWGN_ODD[name]), torch.float32, name in ("1x1-image", "one-group"))


def test_low_precision_x_with_fp32_norm_parameters():
    """The normalisation affine parameters may stay fp32 with bf16 / fp16 inputs (as under autocast); their
    gradients come back in fp32."""
    check_against_reference(lndw_case(sizes=(3, 4), dilations=(1, 3), shape=(1, 6, 5)), torch.bfloat16, True,
                            param_dtype=torch.float32)
    check_against_reference(dwgn_case(c=6, groups=2, dilations=(2, 1), shape=(1, 5, 6)), torch.float16, False,
                            param_dtype=torch.float32)


@pytest.mark.parametrize("make_case", [lndw_case, dwgn_case], ids=["lndw", "dwgn"])
def test_empty_batch(make_case):
    case = make_case()
    case["x"] = case["x"][:0]
    got, _ = run(case, "triton", torch.float32, False)
    ref, _ = run(case, "reference", torch.float32, False)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


# --------------------------------------------------------------------------------------------------
# determinism, registration, selection
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_case", [lndw_case, dwgn_case], ids=["lndw", "dwgn"])
def test_bitwise_deterministic(make_case):
    first, _ = run(make_case(shape=(2, 6, 5)), "triton", torch.float32, True)
    second, _ = run(make_case(shape=(2, 6, 5)), "triton", torch.float32, True)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between identical runs"


def test_ops_are_registered_and_pass_opcheck():
    lndw_op = ek.backends.kernel_ops("layernorm_dilated_dwconv", "triton").forward
    dwgn_op = ek.backends.kernel_ops("dilated_dwconv_groupnorm", "triton").forward
    for name in ("lndw_fwd_triton", "lndw_bwd_triton", "dwgn_fwd_triton", "dwgn_bwd_triton"):
        assert hasattr(torch.ops.emcad_kernels, name), name
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    case = lndw_case(sizes=(2, 3), dilations=(1, 2), shape=(1, 4, 3))
    x = case["x"].to(DEVICE).requires_grad_()
    lws, lbs, ws, bs = ([t.to(DEVICE).requires_grad_() for t in p] for p in case["params"])
    torch.library.opcheck(lndw_op, [x, lws, lbs, ws, bs, [1, 2], 1e-6], test_utils=utils)
    case = dwgn_case(c=4, groups=2, dilations=(2, 1), shape=(1, 4, 3))
    x = case["x"].to(DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    ws, bs = ([t.to(DEVICE).requires_grad_() for t in p] for p in case["params"][:2])
    gw, gb = (t.to(DEVICE).requires_grad_() for t in case["params"][2:])
    torch.library.opcheck(dwgn_op, [x, ws, bs, gw, gb, [2, 1], 1e-5], test_utils=utils)


def test_check_reasons():
    x = torch.zeros(1, 10, 4, 4, device=DEVICE)
    five = [torch.zeros(2, 1, 3, 3, device=DEVICE)] * 5
    text = ek.explain("layernorm_dilated_dwconv", x, None, None, five, dilations=(1,) * 5, backend="triton")
    assert "5 channel groups are not supported (at most 4)" in text
    text = ek.explain("dilated_dwconv_groupnorm", x, five, None, None, None, dilations=(1,) * 5, backend="triton")
    assert "5 channel groups are not supported (at most 4)" in text
    mixed = [torch.zeros(5, 1, 3, 3, device=DEVICE), torch.zeros(5, 1, 5, 5, device=DEVICE)]
    text = ek.explain("dilated_dwconv_groupnorm", x, mixed, None, None, None, dilations=(1, 2), backend="triton")
    assert "different kernel sizes per group (3, 5) are not supported" in text
    big = [torch.zeros(10, 1, 9, 9, device=DEVICE)]
    text = ek.explain("layernorm_dilated_dwconv", x, None, None, big, dilations=(1,), backend="triton")
    assert "kernel size 9 is not supported (odd sizes up to 7)" in text
    ok = [torch.zeros(5, 1, 3, 3, device=DEVICE)] * 2
    assert "-> triton" in ek.explain("layernorm_dilated_dwconv", x, None, None, ok, dilations=(1, 2),
                                     backend="triton")
    with pytest.raises(ek.BackendUnavailableError, match="float64"):
        layernorm_dilated_dwconv(x.double(), None, None, [w.double() for w in ok], dilations=(1, 2),
                                 backend="triton")


def test_torch_compile_fullgraph_matches_eager():
    """The ops are opaque custom ops: Dynamo traces the functional layer without graph breaks (aot_eager keeps the
    test fast on CPU)."""
    case = lndw_case(sizes=(2, 2), dilations=(1, 2), shape=(1, 5, 4))
    dcase = dwgn_case(c=4, groups=2, dilations=(2, 1), shape=(1, 5, 4))

    def step(x, lw0, lw1, w0, w1, v0, v1):
        y = layernorm_dilated_dwconv(x, [lw0, lw1], None, [w0, w1], None, dilations=(1, 2), backend="triton")
        y = dilated_dwconv_groupnorm(y, [v0, v1], None, None, None, dilations=(2, 1), backend="triton")
        return (y * y).sum()

    def grads(fn):
        x = case["x"].to(DEVICE).requires_grad_()
        lws = [t.to(DEVICE).requires_grad_() for t in case["params"][0]]
        ws = [t.to(DEVICE).requires_grad_() for t in case["params"][2]]
        vs = [t.to(DEVICE).requires_grad_() for t in dcase["params"][0]]
        loss = fn(x, *lws, *ws, *vs)
        return [loss.detach(), *torch.autograd.grad(loss, [x, *lws, *ws, *vs])]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(grads(step), grads(compiled)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _model_results(model, x):
    """{"out i": ..., "grad <param>": ...} of a loss over every output of an EGE-UNet / MALUNet forward."""
    outs, stack = [], [model(x)]
    while stack:
        o = stack.pop(0)
        if isinstance(o, (list, tuple)):
            stack = list(o) + stack
        else:
            outs.append(o)
    loss = sum((o - 0.5).square().mean() for o in outs)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params)
    res = {f"out {i}": o.detach() for i, o in enumerate(outs)}
    res.update({f"grad {n}": g for n, g in zip(names, grads)})
    return res


@pytest.mark.slow
@pytest.mark.parametrize("name", ["egeunet", "malunet"])
def test_whole_model_triton_matches_reference(name):
    """EGE-UNet (11 lndw calls) / MALUNet (24 dwgn calls, down to 1×1 maps) at 32 px with every fused op on the
    triton backend: outputs and every parameter gradient vs the float64 reference, by the tolerance rule
    (about a minute for both under the interpreter, hence ``slow``)."""
    import copy

    models = pytest.importorskip("emcad.models", reason="the emcad models package is not importable")
    torch.manual_seed(0)
    ref = {"egeunet": models.EGEUNet, "malunet": models.MALUNet}[name](backend="reference")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = copy.deepcopy(ref).set_backend("triton").to(DEVICE)
    x = torch.rand(1, 3, 32, 32) * 255
    got = _model_results(fused, x.to(DEVICE))
    same = _model_results(ref, x)
    ref64 = _model_results(copy.deepcopy(ref).double(), x.double())
    assert_matches(got, same, ref64, torch.float32, name)


_COMPILE_LAUNCHES = r"""
from emcad_kernels.triton import dwgn, lndw

def cl(*shape, dtype=torch.bfloat16):
    return torch.zeros(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)

for g, groups, dils in ((5, 4, [1, 2, 5, 7]), (25, 4, [1, 2, 5, 7]), (64, 1, [1]), (128, 1, [1])):
    x = cl(2, g * groups, 13, 11)
    lws, lbs = [torch.ones(g)] * groups, [torch.zeros(g)] * groups
    ws, bs = [torch.zeros(g, 1, 3, 3, **bf)] * groups, [torch.zeros(g, **bf)] * groups
    lndw.lndw_forward(x, lws, lbs, ws, bs, dils, 1e-6)
    lndw.lndw_backward(x, x, lws, lbs, ws, bs, dils, 1e-6)
for c, k in ((32, 3), (64, 5)):
    x = cl(2, c, 13, 11)
    ws, bs = [torch.zeros(c // 4, 1, k, k, **bf)] * 4, [torch.zeros(c // 4, **bf)] * 4
    dwgn.dwgn_forward(x, ws, bs, torch.ones(c), torch.zeros(c), [7, 5, 2, 1], 1e-5)
    dwgn.dwgn_backward(x, x, ws, bs, torch.ones(c), torch.zeros(c), [7, 5, 2, 1], 1e-5)
for name, regs, stack in report:
    print(f"{name} {regs} {stack}")
"""


@pytest.mark.skipif(os.environ.get("EMCAD_TRITON_COMPILE_CHECK") != "1",
                    reason="set EMCAD_TRITON_COMPILE_CHECK=1 to compile the kernels for sm_90 without a GPU")
def test_kernels_compile_for_sm90_without_spills():
    """Compiles the lndw / dwgn launches (bf16, channels_last; groups of 5, 25, 64 and 128 channels; 3×3 and 5×5)
    with the real Triton compiler for sm_90 and checks their register spills."""
    harness = _COMPILE_CHECK.split("from emcad_kernels.triton import")[0] + "bf = dict(dtype=torch.bfloat16)\n"
    out = _python(harness + _COMPILE_LAUNCHES, _clean_env(), timeout=3600)
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert {r[0] for r in rows} >= {"_lndw_fwd_kernel", "_lndw_bwd_kernel", "_dwgn_stats_kernel", "_dwgn_fwd_kernel",
                                    "_dwgn_bwd_stats_kernel", "_dwgn_bwd_dz_kernel", "_dwgn_bwd_dx_kernel"}, out
    print("kernel registers stack-bytes\n" + "\n".join(" ".join(r) for r in rows))
    spilling = [r for r in rows if int(r[2]) > 32]  # a few bytes (one spilled pointer) are harmless
    assert not spilling, f"kernels spilling more than 32 bytes of stack: {spilling}"


# --------------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------------
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# EGE-UNet at 256 px, batch 8 (EGE-UNet_MALUNet.md §2.3): GAB1..GAB5 groups (g channels at H/2..H/32) and the
# GHPA norm2 + ldw single groups (dim_in channels)
EGE_GAB = [(5, 128), (9, 64), (13, 32), (17, 16), (25, 8)]
EGE_GHPA = [(24, 32), (32, 16), (48, 8), (64, 8), (48, 8), (32, 16)]
# MALUNet at 256 px (§3.2): DGA / GAU channels and resolutions
MAL_DGA = [(24, 32), (32, 16), (48, 8), (64, 8), (48, 8), (32, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_gpu_parity_egeunet_shapes(dtype):
    for g, s in EGE_GAB:
        for cl in (True, False):
            check_against_reference(lndw_case(sizes=(g,) * 4, shape=(8, s, s)), dtype, cl)
    for c, s in EGE_GHPA:
        check_against_reference(lndw_case(sizes=(c,), dilations=(1,), shape=(8, s, s)), dtype, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_gpu_parity_malunet_shapes(dtype):
    for c, s in MAL_DGA:
        for cl in (True, False):
            check_against_reference(dwgn_case(c=c, shape=(8, s, s)), dtype, cl)
        # GAU DepthWiseConv2d: GroupNorm(4, C) after a 3×3 and a 5×5 depthwise conv (all dilations 1)
        for k in (3, 5):
            check_against_reference(dwgn_case(c=c, k=k, dilations=(1, 1, 1, 1), shape=(8, s, s)), dtype, True)


@pytest.mark.gpu
def test_gpu_large_image_and_large_groups():
    """Many tiles and chunks per image (partial buffers of thousands of rows), wide groups."""
    check_against_reference(lndw_case(sizes=(5,) * 4, shape=(4, 256, 256)), torch.bfloat16, True)
    check_against_reference(lndw_case(sizes=(96,), dilations=(1,), shape=(2, 64, 64)), torch.float32, True)
    check_against_reference(dwgn_case(c=24, shape=(8, 128, 128)), torch.bfloat16, True)
    check_against_reference(dwgn_case(c=128, groups=2, dilations=(1, 3), shape=(2, 32, 32)), torch.float32, False)


@pytest.mark.gpu
@pytest.mark.parametrize("make_case,kwargs", [(lndw_case, dict(sizes=(17,) * 4, shape=(8, 64, 64))),
                                              (dwgn_case, dict(c=32, shape=(8, 64, 64)))], ids=["lndw", "dwgn"])
def test_gpu_bitwise_deterministic(make_case, kwargs):
    first, _ = run(make_case(**kwargs), "triton", torch.bfloat16, True)
    for _ in range(2):
        again, _ = run(make_case(**kwargs), "triton", torch.bfloat16, True)
        for name in first:
            assert torch.equal(first[name], again[name]), name


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_fullgraph():
    case = lndw_case(sizes=(9,) * 4, shape=(8, 64, 64))
    x = case["x"].to("cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last)
    lws, lbs, ws, bs = ([t.to("cuda").requires_grad_() for t in p] for p in case["params"])
    ws = [w.to(torch.bfloat16).detach().requires_grad_() for w in ws]
    bs = [b.to(torch.bfloat16).detach().requires_grad_() for b in bs]
    leaves = [*lws, *lbs, *ws, *bs]

    def step(x):
        y = layernorm_dilated_dwconv(x, lws, lbs, ws, bs, dilations=(1, 2, 5, 7), backend="triton")
        return y.float().square().mean()

    eager = step(x)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True)(x)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["egeunet", "malunet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_model_training_step_matches_torch(name, dtype):
    """A whole EGE-UNet / MALUNet training step (256 px, batch 4) with the triton ops vs ``backend="torch"``."""
    models = pytest.importorskip("emcad.models", reason="the emcad models package is not importable")
    cls = {"egeunet": models.EGEUNet, "malunet": models.MALUNet}[name]
    torch.manual_seed(0)
    ref = cls(backend="torch").cuda().train()
    fused = cls(backend="triton").cuda().train()
    fused.load_state_dict(ref.state_dict())
    x = torch.rand(4, 3, 256, 256, device="cuda") * 255
    results = []
    for model in (ref, fused):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            outs = model(x)
        flat = []
        stack = [outs]
        while stack:
            o = stack.pop()
            if isinstance(o, (list, tuple)):
                stack.extend(o)
            else:
                flat.append(o)
        loss = sum(o.float().mean() for o in flat)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        results.append((loss.detach(), grads))
    (l_ref, g_ref), (l_fused, g_fused) = results
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(l_fused, l_ref, rtol=tol, atol=1e-4)
    for a, b in zip(g_fused, g_ref):
        if a is None or b is None:
            assert a is None and b is None
            continue
        err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
        assert err < tol, err


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Forward + backward of both ops captured in a CUDA graph and replayed: no host synchronisation and no
    host-to-device copies in the launchers (group geometry travels as scalar arguments)."""
    case = lndw_case(sizes=(8,) * 4, shape=(4, 32, 32))
    x = case["x"].to("cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    lws, lbs = ([t.to("cuda").requires_grad_() for t in p] for p in case["params"][:2])
    ws, bs = ([t.to("cuda", torch.bfloat16).requires_grad_() for t in p] for p in case["params"][2:])
    gw = torch.ones(32, device="cuda", requires_grad=True)
    gb = torch.zeros(32, device="cuda", requires_grad=True)
    leaves = [x, *lws, *lbs, *ws, *bs, gw, gb]
    static_gy = torch.randn(4, 32, 32, 32, device="cuda", dtype=torch.bfloat16)

    def step():
        y = layernorm_dilated_dwconv(x, lws, lbs, ws, bs, dilations=(1, 2, 5, 7), backend="triton")
        y = dilated_dwconv_groupnorm(y, ws, bs, gw, gb, dilations=(7, 5, 2, 1), backend="triton")
        return torch.autograd.grad(y, leaves, static_gy)

    assert_cuda_graph_replay_matches_eager(step, [x])
