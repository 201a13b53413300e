"""The ``cpu`` backend (fused C++/OpenMP kernels, ``csrc/cpu``).

* parity with the ``reference`` backend for every op × dtype (fp32, fp64, bf16) × memory format × train/eval
  (× sum/concat × stride × kernel sets for MSDC; × mode/scale/kernel for upsample_dwconv; × groupings and the
  aggregation add for LGAG): output, input grads, every parameter grad and the running statistics;
* bf16 by the 2× rule (docs/numerics.md#tolerance-rule): error vs an fp64 truth ≤ 2 × the error of plain PyTorch in
  bf16 + floor;
* float64 gradcheck, torch.library.opcheck, bitwise determinism (reruns and thread counts), every ISA build;
* hypothesis shapes (1×1 images, odd sizes, C=1, N=0 in eval, N=1), non-contiguous and overlapping inputs,
  output memory formats, torch.compile(fullgraph=True), backend selection and refusal reasons, bad input;
* a whole EMCAD-B0 forward + backward with backend "cpu" vs "torch".
"""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch
import torch.nn.functional as F

import emcad_kernels as ek
from emcad_kernels import _ext, backends
from op_cases import assert_bitwise_equal, captured_kernel_call, detached, layout_strides

if not _ext.HAS_CPU_EXT:
    pytest.skip(f"cpu backend not available: {_ext.CPU_EXT_ERROR}", allow_module_level=True)


CPU, REF = "cpu", "reference"
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LAYOUTS = ["nchw", "cl"]
# (atol-like relative tolerance) for parity with the reference backend in the same dtype
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


# --------------------------------------------------------------------------------------------------
# case builders: each returns (call, inputs) where call(backend, *inputs) runs the functional op and
# inputs is a dict of tensors; `diff` lists the differentiable inputs and `stats` the running buffers
# --------------------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "cl" else t.contiguous()


def _bn(c, gen, dtype):
    return [torch.rand(c, generator=gen, dtype=torch.float64).add(0.5).to(dtype),
            (torch.randn(c, generator=gen, dtype=torch.float64) * 0.1).to(dtype),
            (torch.randn(c, generator=gen, dtype=torch.float64) * 0.1).to(dtype),
            torch.rand(c, generator=gen, dtype=torch.float64).add(0.5).to(dtype)]


def _randn(shape, gen, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


class Case:
    """One op call with explicit inputs; run() clones everything, so cases can be run per backend."""

    def __init__(self, op, tensors, diff, stats, kwargs, fn):
        self.op, self.tensors, self.diff, self.stats, self.kwargs, self.fn = op, tensors, diff, stats, kwargs, fn

    def cast(self, dtype):
        tensors = {}
        for k, v in self.tensors.items():
            tensors[k] = v.to(dtype).contiguous(memory_format=_fmt(v)) if v.dim() == 4 and k in ("x", "g") \
                else v.to(dtype)
        return Case(self.op, tensors, self.diff, self.stats, self.kwargs, self.fn)

    def run(self, backend, grad_seed=123, fn=None):
        t = {k: v.detach().clone().contiguous(memory_format=_fmt(v)) if v.dim() == 4 else v.detach().clone()
             for k, v in self.tensors.items()}
        for k in self.diff:
            t[k].requires_grad_(True)
        out = (fn or self.fn)(backend, t, self.kwargs)
        grad = _randn(out.shape, _gen(grad_seed), out.dtype).contiguous(memory_format=_fmt(out))
        grads = torch.autograd.grad(out, [t[k] for k in self.diff], grad, allow_unused=True)
        res = {"out": out.detach()}
        for k, g in zip(self.diff, grads):
            res["grad_" + k] = g if g is not None else torch.zeros_like(t[k])
        for k in self.stats:
            res[k] = t[k]
        return res


def _fmt(t):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def msdc_case(dtype=torch.float64, layout="nchw", training=False, combine="sum", stride=1, ks=(1, 3, 5),
              shuffle=None, activation="relu6", shape=(2, 20, 9, 11), seed=0):
    gen = _gen(seed)
    n, c, h, w = shape
    t = {"x": _layout(_randn(shape, gen, dtype), layout)}
    diff, stats = ["x"], []
    for i, k in enumerate(ks):
        t[f"w{i}"] = _randn((c, 1, k, k), gen, dtype, 0.3)
        bw, bb, rm, rv = _bn(c, gen, dtype)
        t[f"bw{i}"], t[f"bb{i}"], t[f"rm{i}"], t[f"rv{i}"] = bw, bb, rm, rv
        diff += [f"w{i}", f"bw{i}", f"bb{i}"]
        stats += [f"rm{i}", f"rv{i}"]
    kw = dict(activation=activation, combine=combine, shuffle_groups=shuffle, stride=stride, training=training)

    def fn(backend, t, kw):
        nb = len([k for k in t if k.startswith("w")])
        return ek.multi_scale_dwconv(t["x"], [t[f"w{i}"] for i in range(nb)],
                                     [[t[f"bw{i}"], t[f"bb{i}"], t[f"rm{i}"], t[f"rv{i}"]] for i in range(nb)],
                                     backend=backend, **kw)

    return Case("msdc", t, diff, stats, kw, fn)


def updw_case(dtype=torch.float64, layout="nchw", training=False, mode="nearest", scale=2, k=3, activation="relu",
              shape=(2, 19, 7, 6), seed=1):
    gen = _gen(seed)
    c = shape[1]
    bw, bb, rm, rv = _bn(c, gen, dtype)
    t = {"x": _layout(_randn(shape, gen, dtype), layout), "w": _randn((c, 1, k, k), gen, dtype, 0.3),
         "bw": bw, "bb": bb, "rm": rm, "rv": rv}
    kw = dict(mode=mode, scale=scale, activation=activation, training=training)

    def fn(backend, t, kw):
        return ek.upsample_dwconv(t["x"], t["w"], [t["bw"], t["bb"], t["rm"], t["rv"]], backend=backend, **kw)

    return Case("updw", t, ["x", "w", "bw", "bb"], ["rm", "rv"], kw, fn)


def lgag_case(dtype=torch.float64, layout="nchw", training=False, add=True, channels=(20, 20, 10), groups=10, k=3,
              activation="relu", shape=(2, 7, 9), seed=2):
    gen = _gen(seed)
    fg, fl, fi = channels
    n, h, w = shape
    t = {"g": _layout(_randn((n, fg, h, w), gen, dtype), layout), "x": _layout(_randn((n, fl, h, w), gen, dtype), layout),
         "wg": _randn((fi, fg // groups, k, k), gen, dtype, 0.3), "bg": _randn((fi,), gen, dtype, 0.1),
         "wx": _randn((fi, fl // groups, k, k), gen, dtype, 0.3), "bx": _randn((fi,), gen, dtype, 0.1),
         "wpsi": _randn((1, fi, 1, 1), gen, dtype, 0.3), "bpsi": _randn((1,), gen, dtype, 0.1)}
    for name, c in (("g", fi), ("x", fi), ("p", 1)):
        t[f"bw_{name}"], t[f"bb_{name}"], t[f"rm_{name}"], t[f"rv_{name}"] = _bn(c, gen, dtype)
    diff = ["g", "x", "wg", "bg", "wx", "bx", "wpsi", "bpsi", "bw_g", "bb_g", "bw_x", "bb_x", "bw_p", "bb_p"]
    stats = ["rm_g", "rv_g", "rm_x", "rv_x", "rm_p", "rv_p"]
    kw = dict(groups=groups, add_gate_input=add, activation=activation, training=training)

    def fn(backend, t, kw):
        bn = lambda s: [t[f"bw_{s}"], t[f"bb_{s}"], t[f"rm_{s}"], t[f"rv_{s}"]]  # noqa: E731
        return ek.grouped_attention_gate(t["g"], t["x"], t["wg"], t["bg"], bn("g"), t["wx"], t["bx"], bn("x"),
                                         t["wpsi"], t["bpsi"], bn("p"), backend=backend, **kw)

    return Case("lgag", t, diff, stats, kw, fn)


# --------------------------------------------------------------------------------------------------
# plain PyTorch compositions (no fused op, no upcast): the "PyTorch in bf16" side of the 2× rule
# --------------------------------------------------------------------------------------------------
def _act(z, name):
    return {"relu": F.relu, "relu6": lambda v: F.hardtanh(v, 0.0, 6.0), "leakyrelu": lambda v: F.leaky_relu(v, 0.2),
            "hswish": F.hardswish, "identity": lambda v: v}[name](z)


def _plain_bn(z, bw, bb, rm, rv, training):
    return F.batch_norm(z, rm, rv, bw, bb, training, 0.1, 1e-5)


def plain_fn(op):
    def msdc(backend, t, kw):
        x = t["x"]
        c = x.shape[1]
        nb = len([k for k in t if k.startswith("w")])
        outs = []
        for i in range(nb):
            w = t[f"w{i}"]
            z = F.conv2d(x, w, None, kw["stride"], w.shape[-1] // 2, 1, c)
            outs.append(_act(_plain_bn(z, t[f"bw{i}"], t[f"bb{i}"], t[f"rm{i}"], t[f"rv{i}"], kw["training"]),
                             kw["activation"]))
        y = torch.cat(outs, 1) if kw["combine"] == "concat" else sum(outs)
        if kw["shuffle_groups"]:
            n, cc, h, w = y.shape
            g = kw["shuffle_groups"]
            y = y.view(n, g, cc // g, h, w).transpose(1, 2).reshape(n, cc, h, w)
        return y

    def updw(backend, t, kw):
        x = t["x"]
        if kw["mode"] == "nearest":
            u = F.interpolate(x, scale_factor=kw["scale"], mode="nearest")
        else:
            u = F.interpolate(x, scale_factor=kw["scale"], mode="bilinear", align_corners=False)
        z = F.conv2d(u, t["w"], None, 1, t["w"].shape[-1] // 2, 1, x.shape[1])
        return _act(_plain_bn(z, t["bw"], t["bb"], t["rm"], t["rv"], kw["training"]), kw["activation"])

    def lgag(backend, t, kw):
        k, tr = t["wg"].shape[-1], kw["training"]
        ag = _plain_bn(F.conv2d(t["g"], t["wg"], t["bg"], 1, k // 2, 1, kw["groups"]), t["bw_g"], t["bb_g"],
                       t["rm_g"], t["rv_g"], tr)
        ax = _plain_bn(F.conv2d(t["x"], t["wx"], t["bx"], 1, k // 2, 1, kw["groups"]), t["bw_x"], t["bb_x"],
                       t["rm_x"], t["rv_x"], tr)
        h = _act(ag + ax, kw["activation"])
        psi = torch.sigmoid(_plain_bn(F.conv2d(h, t["wpsi"], t["bpsi"]), t["bw_p"], t["bb_p"], t["rm_p"],
                                      t["rv_p"], tr))
        out = t["x"] * psi
        return t["g"] + out if kw["add_gate_input"] else out

    return {"msdc": msdc, "updw": updw, "lgag": lgag}[op]


# --------------------------------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------------------------------
def _maxerr(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_parity(case, tol=None, backend=CPU):
    ref = case.run(REF)
    got = case.run(backend)
    dtype = case.tensors["x"].dtype
    tol = tol if tol is not None else TOL[dtype]
    assert got["out"].dtype == ref["out"].dtype
    if ref["out"].numel():  # strides of empty tensors are arbitrary
        assert layout_strides(got["out"]) == layout_strides(ref["out"]), (got["out"].stride(), ref["out"].stride())
    for key in ref:
        a, b = got[key], ref[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        scale = 1.0 + (b.double().abs().max().item() if b.numel() else 0.0)
        err = _maxerr(a, b)
        assert err <= tol * scale, f"{key}: max error {err:.3e} > {tol:.1e} x {scale:.3g}"
    return got


FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_lowp_rule(case, dtype, keys=None):
    """cpu in ``dtype`` vs an fp64 truth (same rounded inputs): error ≤ 2 × (plain PyTorch error in ``dtype``)
    + floor, for the output, every gradient and the running statistics (docs/numerics.md#tolerance-rule)."""
    low = case.cast(dtype)
    truth = low.cast(torch.float64).run(REF)
    got = low.run(CPU)
    plain = low.run(REF, fn=plain_fn(case.op))
    assert got["out"].dtype == dtype
    for key in (truth if keys is None else keys):
        scale = 1.0 + (truth[key].abs().max().item() if truth[key].numel() else 0.0)
        err = _maxerr(got[key], truth[key])
        err_pt = _maxerr(plain[key], truth[key])
        assert err <= 2 * err_pt + FLOOR[dtype] * scale, \
            f"{key}: cpu error {err:.3e}, PyTorch {dtype} error {err_pt:.3e} (scale {scale:.3g})"


def check_dtype(case, dtype):
    """fp64: tight parity with the reference backend. fp32: the 2x rule against an fp64 truth plus a loose direct
    parity with the reference in fp32 (both sum in different orders). bf16: the 2x rule."""
    if dtype == torch.float64:
        assert_parity(case)
    elif dtype == torch.float32:
        assert_lowp_rule(case, dtype)
        assert_parity(case.cast(dtype), tol=2e-4)
    else:
        assert_lowp_rule(case, dtype)


# --------------------------------------------------------------------------------------------------
# parity matrices
# --------------------------------------------------------------------------------------------------
MSDC_KS = [(1, 3, 5), (3,), (1, 3, 5, 7, 9)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("ks", MSDC_KS, ids=lambda ks: "k" + "".join(map(str, ks)))
def test_msdc_parity(dtype, layout, training, combine, stride, ks):
    shuffle = 10 if combine == "sum" else 4
    case = msdc_case(torch.float64, layout, training, combine, stride, ks, shuffle)
    check_dtype(case, dtype)


UPDW_MODES = [("nearest", 2), ("nearest", 3), ("bilinear", 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mode,scale", UPDW_MODES)
@pytest.mark.parametrize("k", [3, 5])
def test_updw_parity(dtype, layout, training, mode, scale, k):
    case = updw_case(torch.float64, layout, training, mode, scale, k)
    check_dtype(case, dtype)


LGAG_CONFIGS = {  # (F_g, F_l, F_int), groups, k
    "emcad": ((20, 20, 10), 10, 3),   # EMCAD: groups = C/2, 2 inputs -> 1 output per group
    "two_out": ((8, 8, 8), 4, 3),     # 2 inputs -> 2 outputs per group
    "mixed": ((6, 9, 6), 3, 3),       # F_g != F_l (2 and 3 inputs per group)
    "k1": ((12, 12, 6), 6, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("add", [False, True], ids=["gate", "aggregate"])
@pytest.mark.parametrize("config", list(LGAG_CONFIGS))
def test_lgag_parity(dtype, layout, training, add, config):
    channels, groups, k = LGAG_CONFIGS[config]
    if add and channels[0] != channels[1]:
        pytest.skip("the aggregation add needs F_g == F_l")
    case = lgag_case(torch.float64, layout, training, add, channels, groups, k)
    check_dtype(case, dtype)


@pytest.mark.parametrize("activation", ["relu", "relu6", "leakyrelu", "hswish", "identity"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_activations(activation, training):
    assert_parity(msdc_case(activation=activation, training=training, shuffle=None))
    assert_parity(updw_case(activation=activation, training=training))
    assert_parity(lgag_case(activation=activation, training=training))


def test_lgag_unusual_grouping_is_refused_with_a_reason():
    # groups=1 (a dense 3x3 conv) exceeds the fused block structure: cpu refuses it, auto runs the reference
    case = lgag_case(channels=(6, 6, 20), groups=1, training=True)
    with pytest.raises(ek.BackendUnavailableError, match="20 output and 6 input channels per group"):
        case.run(CPU)
    assert_bitwise_equal(case.run(None), case.run(REF))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_many_channel_blocks_grouped_per_item(layout, training):
    """Shapes with many channel blocks per item (grouped row I/O; a partial last block; the interleaved store
    of EMCAD's shuffle and a generic shuffle)."""
    assert_parity(msdc_case(torch.float64, layout, training, shape=(4, 130, 6, 5), shuffle=65))
    assert_parity(msdc_case(torch.float64, layout, training, shape=(4, 128, 5, 6), shuffle=64, stride=2))
    assert_parity(msdc_case(torch.float64, layout, training, shape=(4, 132, 5, 5), shuffle=12, combine="concat"))
    assert_parity(msdc_case(torch.float32, layout, training, shape=(4, 256, 5, 6), shuffle=128), tol=2e-4)
    assert_parity(updw_case(torch.float64, layout, training, shape=(4, 130, 4, 3)))
    assert_parity(updw_case(torch.float64, layout, training, "bilinear", shape=(4, 130, 4, 3)))
    assert_parity(lgag_case(torch.float64, layout, training, channels=(260, 260, 130), groups=130, shape=(4, 4, 5)))
    assert_parity(lgag_case(torch.float32, layout, training, channels=(128, 128, 64), groups=64, shape=(4, 4, 5)),
                  tol=2e-4)


# --------------------------------------------------------------------------------------------------
# ISA builds (SSE2 baseline, AVX2, AVX-512): each must give the same results
# --------------------------------------------------------------------------------------------------
def _available_isas():
    out = []
    for isa in ("default", "avx2", "avx512"):
        if torch.ops.emcad_kernels.cpu_set_isa(isa):
            out.append(isa)
    torch.ops.emcad_kernels.cpu_set_isa("auto")
    return out


@pytest.fixture
def isa_restore():
    yield
    torch.ops.emcad_kernels.cpu_set_isa("auto")


@pytest.mark.parametrize("isa", _available_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_every_isa_build(isa, dtype, isa_restore):
    _ext.set_cpu_isa(isa)
    assert _ext.cpu_isa() == isa
    for layout, training in itertools.product(LAYOUTS, [False, True]):
        cases = [msdc_case(torch.float64, layout, training, "sum", 2, (1, 3, 5), 10),
                 updw_case(torch.float64, layout, training), updw_case(torch.float64, layout, training, "bilinear"),
                 lgag_case(torch.float64, layout, training)]
        for case in cases:
            check_dtype(case, dtype)


def test_set_cpu_isa_rejects_unknown():
    with pytest.raises(ValueError):
        _ext.set_cpu_isa("avx1024")


# --------------------------------------------------------------------------------------------------
# gradcheck (float64), opcheck
# --------------------------------------------------------------------------------------------------
def _gradcheck(case):
    t = {k: v.detach().clone() for k, v in case.tensors.items()}
    names = case.diff

    def f(*diff):
        tt = dict(t)
        tt.update({k: v for k, v in zip(names, diff)})
        # running statistics are left out: with track_running_stats=False the batch statistics are used in
        # training, and eval mode uses the fixed statistics
        return case.fn(CPU, {k: (v.clone() if k in case.stats else v) for k, v in tt.items()}, case.kwargs)

    inputs = [t[k].requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck(training):
    _gradcheck(msdc_case(training=training, combine="concat", shuffle=3, stride=2, ks=(1, 3), shape=(2, 3, 5, 4)))
    _gradcheck(msdc_case(training=training, ks=(3, 5), shuffle=None, shape=(2, 2, 4, 5)))
    _gradcheck(updw_case(training=training, shape=(2, 2, 3, 4)))
    _gradcheck(updw_case(training=training, mode="bilinear", shape=(2, 2, 3, 3)))
    _gradcheck(lgag_case(training=training, channels=(4, 4, 2), groups=2, shape=(2, 3, 4)))


def _op_args(case):
    """The cpu kernel op and the arguments the public function passes it for a case."""
    return captured_kernel_call(lambda: case.run(CPU))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("op", ["msdc", "updw", "lgag"])
def test_opcheck(op, training):
    case = {"msdc": lambda: msdc_case(training=training, shuffle=10, shape=(2, 20, 5, 6)),
            "updw": lambda: updw_case(training=training, shape=(2, 3, 4, 5)),
            "lgag": lambda: lgag_case(training=training, shape=(2, 4, 5))}[op]()
    custom_op, args = _op_args(case)
    torch.library.opcheck(custom_op, detached(args))
    torch.library.opcheck(custom_op, detached(args, requires_grad=True))
    # channels_last inputs: the fake implementation must report the real strides
    cl = case.cast(torch.float64)
    for k in ("x", "g"):
        if k in cl.tensors:
            cl.tensors[k] = cl.tensors[k].contiguous(memory_format=torch.channels_last)
    custom_op, args = _op_args(cl)
    torch.library.opcheck(custom_op, detached(args))


# --------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(dtype):
    cases = [msdc_case(torch.float64, "cl", True, shape=(3, 40, 17, 15), shuffle=20),
             msdc_case(torch.float64, "nchw", True, stride=2, shape=(3, 40, 17, 15), shuffle=None),
             updw_case(torch.float64, "cl", True, shape=(3, 40, 9, 8)),
             updw_case(torch.float64, "nchw", True, "bilinear", shape=(3, 40, 9, 8)),
             lgag_case(torch.float64, "cl", True, shape=(3, 17, 15), channels=(40, 40, 20), groups=20)]
    threads = torch.get_num_threads()
    try:
        for case in cases:
            c = case.cast(dtype)
            first = c.run(CPU)
            assert_bitwise_equal(first, c.run(CPU))
            # the work partition depends on the shape only: other thread counts give the same bits
            torch.set_num_threads(1)
            assert_bitwise_equal(first, c.run(CPU))
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# hypothesis: random shapes
# --------------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_random_case(case, dtype):
    """fp64: tight parity with the reference, every output. fp32: the 2x rule for the output, the input gradients
    and the running statistics. Parameter gradients of random shapes are checked in fp64 only: they include
    gradients that are exactly zero (a one-tap conv followed by training-mode BN is scale-invariant in its weight),
    where the fp32 results of any two summation orders are pure rounding noise that no bound captures. The
    fixed-shape matrix tests check every parameter gradient in fp32 and bf16."""
    if dtype == torch.float64:
        assert_parity(case)
    else:
        keys = ["out"] + [f"grad_{k}" for k in ("x", "g") if k in case.diff] + list(case.stats)
        assert_lowp_rule(case, dtype, keys)


def _shape_strategy(min_n):
    return st.tuples(st.integers(min_n, 3), st.integers(1, 21), st.integers(1, 12), st.integers(1, 12))


@SETTINGS
@given(shape=_shape_strategy(0), training=st.booleans(), layout=st.sampled_from(LAYOUTS),
       ks=st.lists(st.sampled_from([1, 3, 5, 7, 9]), min_size=1, max_size=4), stride=st.sampled_from([1, 2]),
       combine=st.sampled_from(["sum", "concat"]), dtype=st.sampled_from([torch.float64, torch.float32]),
       seed=st.integers(0, 1000))
def test_hypothesis_msdc(shape, training, layout, ks, stride, combine, dtype, seed):
    n, c, h, w = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    if training and n * ho * wo <= 1:
        n = 2  # training-mode BN needs more than one value per channel
    if n == 0 and training:
        n = 1
    case = msdc_case(torch.float64, layout, training, combine, stride, tuple(ks), None, shape=(n, c, h, w), seed=seed)
    check_random_case(case, dtype)


@SETTINGS
@given(shape=_shape_strategy(0), training=st.booleans(), layout=st.sampled_from(LAYOUTS),
       mode=st.sampled_from([("nearest", 1), ("nearest", 2), ("nearest", 3), ("nearest", 4), ("bilinear", 2)]),
       k=st.sampled_from([1, 3, 5, 7]), dtype=st.sampled_from([torch.float64, torch.float32]),
       seed=st.integers(0, 1000))
def test_hypothesis_updw(shape, training, layout, mode, k, dtype, seed):
    n, c, h, w = shape
    if training and n == 0:
        n = 1
    if training and n * h * w <= 1:
        n = 2  # one input pixel per channel: the upsampled values are equal, zero batch variance (ill-posed BN)
    case = updw_case(torch.float64, layout, training, mode[0], mode[1], k, shape=(n, c, h, w), seed=seed)
    check_random_case(case, dtype)


@SETTINGS
@given(n=st.integers(0, 3), h=st.integers(1, 11), w=st.integers(1, 11), groups=st.integers(1, 8),
       og=st.sampled_from([1, 2]), jg=st.integers(1, 3), jx=st.integers(1, 3), k=st.sampled_from([1, 3, 5]),
       training=st.booleans(), add=st.booleans(), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 1000))
def test_hypothesis_lgag(n, h, w, groups, og, jg, jx, k, training, add, layout, dtype, seed):
    if add:
        jx = jg
    if training and n * h * w <= 1:
        n = 2
    case = lgag_case(torch.float64, layout, training, add, (groups * jg, groups * jx, groups * og), groups, k,
                     shape=(n, h, w), seed=seed)
    check_random_case(case, dtype)


def test_edge_shapes():
    for shape in [(1, 1, 1, 1), (0, 5, 4, 4), (1, 1, 13, 1), (2, 17, 1, 9)]:
        training = shape[0] * shape[2] * shape[3] > 1
        assert_parity(msdc_case(shape=shape, training=training, shuffle=None, stride=2))
        assert_parity(updw_case(shape=shape, training=shape[0] > 0, mode="bilinear"))
        assert_parity(lgag_case(shape=(shape[0], shape[2], shape[3]), training=training))


# --------------------------------------------------------------------------------------------------
# layouts: non-contiguous, overlapping, ambiguous
# --------------------------------------------------------------------------------------------------
def _strided_variants(t):
    """Same values as t, different memory: channel slice, spatial slice, transposed storage, expanded (overlap)."""
    n, c, h, w = t.shape
    big = torch.zeros(n, 2 * c, h, 2 * w, dtype=t.dtype)
    big[:, ::2, :, ::2] = t
    chan_slice = big[:, ::2, :, ::2]
    nhwc_perm = t.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)  # strides of an N,W,H,C tensor
    return {"sliced": chan_slice, "permuted": nhwc_perm}


def _overlapping(shape, dtype):
    n, c, h, w = shape
    base = torch.randn(1, c, 1, w, dtype=dtype, generator=_gen(7))
    return base.expand(n, c, h, w)  # stride 0 in N and H: overlapping memory


@pytest.mark.parametrize("op", ["msdc", "updw", "lgag"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_non_contiguous_and_overlapping_inputs(op, training):
    make = {"msdc": lambda: msdc_case(training=training, shuffle=10),
            "updw": lambda: updw_case(training=training),
            "lgag": lambda: lgag_case(training=training)}[op]
    base = make()
    ref = base.run(REF)
    names = ["x", "g"] if op == "lgag" else ["x"]
    variants = {}
    for name in names:
        for vname, v in _strided_variants(base.tensors[name]).items():
            variants[f"{name}:{vname}"] = {name: v}
    for vname, repl in variants.items():
        case = make()
        case.tensors.update(repl)
        case.run = _run_without_clone(case)
        got = case.run(CPU)
        for key in ref:
            if key.startswith("grad_") and key[5:] in repl:
                continue  # gradient layout of a view is whatever autograd makes of it; values checked below
            assert _maxerr(got[key], ref[key]) <= 1e-9 * (1 + ref[key].abs().max().item()), (vname, key)
        for name in repl:
            assert _maxerr(got["grad_" + name], ref["grad_" + name]) <= 1e-9 * (1 + ref["grad_" + name].abs().max())
    # overlapping (expanded) inputs: compare with the same values made contiguous
    shape = base.tensors["x"].shape
    case = make()
    for name in names:
        case.tensors[name] = _overlapping(case.tensors[name].shape, torch.float64)
    case.run = _run_without_clone(case, grads=False)
    dense = make()
    for name in names:
        dense.tensors[name] = case.tensors[name].contiguous()
    dense.run = _run_without_clone(dense, grads=False)
    a, b = case.run(CPU), dense.run(REF)
    assert shape[0] >= 1
    for key in b:
        assert _maxerr(a[key], b[key]) <= 1e-9 * (1 + b[key].abs().max().item()), key


def _run_without_clone(case, grads=True):
    """Case.run that keeps the input tensors' memory layout (views, expanded strides) as they are."""
    def run(backend, grad_seed=123):
        t = {k: (v if k in ("x", "g") else v.detach().clone()) for k, v in case.tensors.items()}
        leaves = []
        if grads:
            for k in case.diff:
                if k in ("x", "g"):
                    t[k] = t[k].detach().requires_grad_(True) if t[k].is_leaf else t[k]
                else:
                    t[k].requires_grad_(True)
                leaves.append(k)
        out = case.fn(backend, t, case.kwargs)
        res = {"out": out.detach()}
        if grads:
            g = _randn(out.shape, _gen(grad_seed), out.dtype)
            for k, gr in zip(leaves, torch.autograd.grad(out, [t[k] for k in leaves], g)):
                res["grad_" + k] = gr
        for k in case.stats:
            res[k] = t[k]
        return res
    return run


def test_output_memory_format_follows_input():
    for layout in LAYOUTS:
        for case in (msdc_case(layout=layout), updw_case(layout=layout), lgag_case(layout=layout)):
            out = case.run(CPU)["out"]
            want = torch.channels_last if layout == "cl" else torch.contiguous_format
            assert out.is_contiguous(memory_format=want)
    # ambiguous (C == 1): contiguous, like the reference
    case = msdc_case(shape=(2, 1, 5, 5), layout="cl", shuffle=None)
    assert case.run(CPU)["out"].stride() == case.run(REF)["out"].stride()


def test_non_contiguous_upstream_gradient():
    """The C++ entry points accept any gradient strides (autograd may hand over expanded gradients)."""
    case = msdc_case(shuffle=10)
    x = case.tensors["x"]
    ws = [case.tensors[f"w{i}"] for i in range(3)]
    bw = torch.stack([case.tensors[f"bw{i}"] for i in range(3)])
    bb = torch.stack([case.tensors[f"bb{i}"] for i in range(3)])
    rm = torch.stack([case.tensors[f"rm{i}"] for i in range(3)])
    rv = torch.stack([case.tensors[f"rv{i}"] for i in range(3)])
    args = (False, 1e-5, "relu6", False, 10, 1)
    y, sm, sv = torch.ops.emcad_kernels.msdc_fwd(x, ws, bw, bb, rm, rv, *args)
    grad_exp = torch.ones(1, 1, 1, 1, dtype=x.dtype).expand(y.shape)
    a = torch.ops.emcad_kernels.msdc_bwd(grad_exp, x, ws, bw, bb, sm, sv, *args)
    b = torch.ops.emcad_kernels.msdc_bwd(grad_exp.contiguous(), x, ws, bw, bb, sm, sv, *args)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_bad_input_raises_instead_of_crashing():
    k = torch.ops.emcad_kernels
    x = torch.randn(2, 4, 5, 5)
    w = [torch.randn(4, 1, 3, 3)]
    bn = [torch.ones(1, 4), torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1, 4)]
    with pytest.raises(RuntimeError, match="dtype"):
        k.msdc_fwd(x.to(torch.int32), w, *bn, False, 1e-5, "relu6", False, 0, 1)
    with pytest.raises(RuntimeError, match="weights"):
        k.msdc_fwd(x, [torch.randn(4, 1, 4, 4)], *bn, False, 1e-5, "relu6", False, 0, 1)
    with pytest.raises(RuntimeError, match="stride"):
        k.msdc_fwd(x, w, *bn, False, 1e-5, "relu6", False, 0, 3)
    with pytest.raises(RuntimeError, match="activation"):
        k.msdc_fwd(x, w, *bn, False, 1e-5, "gelu", False, 0, 1)
    with pytest.raises(RuntimeError, match="shuffle"):
        k.msdc_fwd(x, w, *bn, False, 1e-5, "relu6", False, 3, 1)
    y, sm, sv = k.msdc_fwd(x, w, *bn, False, 1e-5, "relu6", False, 0, 1)
    with pytest.raises(RuntimeError, match="grad has shape"):
        k.msdc_bwd(y[:, :2], x, w, *bn[:2], sm, sv, False, 1e-5, "relu6", False, 0, 1)
    with pytest.raises(RuntimeError, match="4-D"):
        k.updw_fwd(x[0], w[0], *[t[0] for t in bn], False, 1e-5, "nearest", "relu", 2)
    with pytest.raises(RuntimeError, match="bilinear scale"):
        k.updw_fwd(x, w[0], *[t[0] for t in bn], False, 1e-5, "bilinear", "relu", 3)
    # the functional API validates first and names the argument
    with pytest.raises(ValueError, match="weights"):
        ek.multi_scale_dwconv(x, [torch.randn(3, 1, 3, 3)], [bn], backend=CPU)


# --------------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------------
def test_auto_selects_cpu_for_cpu_tensors():
    case = msdc_case(torch.float32)
    x = case.tensors["x"]
    text = ek.explain("multi_scale_dwconv", x, [case.tensors["w0"]],
                      [[case.tensors["bw0"], case.tensors["bb0"], case.tensors["rm0"], case.tensors["rv0"]]])
    assert "-> cpu" in text
    assert "cpu" in ek.available_backends()


@pytest.mark.parametrize("case,reason", [
    (lambda: msdc_case(torch.float32).cast(torch.float16), "dtype float16 is not supported"),
    (lambda: msdc_case(activation="gelu"), "activation gelu is not supported"),
    (lambda: msdc_case(stride=3), "stride 3 is not supported"),
    (lambda: msdc_case(ks=(1, 3, 5, 3, 3, 3, 3, 3, 3)), "9 branches are not supported (at most 8)"),
    (lambda: updw_case(mode="bilinear", scale=3), "bilinear scale 3 is not supported"),
    (lambda: updw_case(scale=8), "nearest scale 8 is not supported"),
], ids=["fp16", "gelu", "stride3", "branches", "bilinear3", "nearest8"])
def test_refusal_reasons(case, reason):
    case = case()
    with pytest.raises(ek.BackendUnavailableError, match=re.escape(reason)):
        case.run(CPU)
    # auto falls back to the reference backend
    assert_bitwise_equal(case.run(None), case.run(REF))


def test_refusal_reasons_name_the_device():
    x = torch.randn(1, 2, 4, 4, device="meta")
    reasons = ek.backends.reasons("multi_scale_dwconv", x, [torch.randn(2, 1, 3, 3, device="meta")],
                                  [torch.nn.BatchNorm2d(2, device="meta")], backend=CPU)
    assert reasons == ["tensors are on meta"]


def test_supported_calls_have_no_reasons():
    for dtype in DTYPES:
        for stride in (1, 2):
            case = msdc_case(dtype, stride=stride)
            t = case.tensors
            bns = [[t[f"bw{i}"], t[f"bb{i}"], t[f"rm{i}"], t[f"rv{i}"]] for i in range(3)]
            assert ek.can_run("multi_scale_dwconv", t["x"], [t[f"w{i}"] for i in range(3)], bns, stride=stride,
                              backend=CPU)
    t = updw_case(torch.float32).tensors
    assert ek.can_run("upsample_dwconv", t["x"], t["w"], [t["bw"], t["bb"], t["rm"], t["rv"]], mode="bilinear",
                      backend=CPU)


def test_gelu_falls_back_to_reference_under_auto():
    case = msdc_case(activation="gelu", shuffle=None)
    got = case.run(None)
    ref = case.run(REF)
    assert torch.equal(got["out"], ref["out"])


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    case = msdc_case(torch.float32, "cl", True, shuffle=10)
    lg = lgag_case(torch.float32, "nchw", True)

    def f(backend, t, kw):
        return case.fn(backend, t, kw)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = case.run(CPU)
    got = case.run(CPU, fn=compiled)
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], atol=1e-6, rtol=1e-5)

    compiled_lgag = torch.compile(lambda b, t, kw: lg.fn(b, t, kw), fullgraph=True)
    eager = lg.run(CPU)
    got = lg.run(CPU, fn=compiled_lgag)
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# whole model
# --------------------------------------------------------------------------------------------------
def test_emcad_b0_forward_backward_matches_torch():
    models = pytest.importorskip("emcad.models")
    torch.manual_seed(0)
    ref = models.create_model("emcad_b0", num_classes=3, backend="torch").double().train()
    fused = copy.deepcopy(ref)
    models.set_backend(fused, CPU)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.manual_seed(1)  # the encoder has stochastic layers in training mode: same random stream for both
    outs_ref = ref(x)
    torch.manual_seed(1)
    outs_fused = fused(x)
    outs_ref = outs_ref if isinstance(outs_ref, (list, tuple)) else [outs_ref]
    outs_fused = outs_fused if isinstance(outs_fused, (list, tuple)) else [outs_fused]
    for a, b in zip(outs_fused, outs_ref):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)
    sum(o.square().mean() for o in outs_ref).backward()
    sum(o.square().mean() for o in outs_fused).backward()
    for (name, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
        if p.grad is None:
            assert q.grad is None or q.grad.abs().max() == 0, name
            continue
        torch.testing.assert_close(q.grad, p.grad, atol=1e-8, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, b), (_, c) in zip(ref.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(c, b, atol=1e-10, rtol=1e-8, msg=lambda m: f"buffer {name}: {m}")
