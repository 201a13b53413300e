"""EGE-UNet and MALUNet (docs/models.md#ege-unet-and-malunet) and their fused ops (``layernorm_dilated_dwconv``,
``dilated_dwconv_groupnorm``): parameter counts, state-dict keys, thop MACs, outputs, op parity with the plain
composites (forward and every gradient), float64 gradcheck, opcheck, FLOP registration, backend refusal reasons,
whole-model fused vs ``backend="torch"`` in train and eval mode, the GHPA attention-map cache, and the registry."""

import copy
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import emcad_kernels as ek
from emcad import create_model, from_pretrained, save_pretrained
from emcad.flops_thop import count_macs, count_macs_thop
from emcad.models import EGEUNet, MALUNet, list_models
from emcad.models.egeunet import GAB, GHPA, LayerNorm2d, minmax_scale_255
from emcad.models.malunet import DGA, DepthWiseConv2d, EAblock
from emcad_kernels import backends, dilated_dwconv_groupnorm, layernorm_dilated_dwconv
from emcad_kernels.backends import Backend, BackendUnavailableError
from emcad_kernels.descriptor import Support

REF = "reference"
D64 = torch.float64
STATE_DICTS_DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "state_dicts.md")


def _forward_op(op):
    return backends.kernel_ops(op, REF).forward


def _flat(out):
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out]


# --------------------------------------------------------------------------------------------------
# plain composites (the oracle): written with elementwise ops and F.conv2d / F.group_norm
# --------------------------------------------------------------------------------------------------
def plain_lndw(x, lws, lbs, ws, bs, dilations, eps):
    outs = []
    for xi, lw, lb, w, b, d in zip(x.split([w.shape[0] for w in ws], 1), lws, lbs, ws, bs, dilations):
        u = xi.mean(1, keepdim=True)
        s = (xi - u).pow(2).mean(1, keepdim=True)
        z = (xi - u) / torch.sqrt(s + eps) * lw[:, None, None] + lb[:, None, None]
        outs.append(F.conv2d(z, w, b, 1, d * (w.shape[-1] // 2), d, w.shape[0]))
    return torch.cat(outs, 1)


def plain_dwgn(x, ws, bs, gw, gb, dilations, eps):
    y = torch.cat([F.conv2d(xi, w, b, 1, d * (w.shape[-1] // 2), d, w.shape[0])
                   for xi, w, b, d in zip(x.chunk(len(ws), 1), ws, bs, dilations)], 1)
    return F.group_norm(y, len(ws), gw, gb, eps)


def _lndw_params(sizes, ks, dtype=D64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lws = [torch.rand(g, generator=gen, dtype=dtype) + 0.5 for g in sizes]
    lbs = [torch.randn(g, generator=gen, dtype=dtype) * 0.1 for g in sizes]
    ws = [torch.randn(g, 1, k, k, generator=gen, dtype=dtype) * 0.3 for g, k in zip(sizes, ks)]
    bs = [torch.randn(g, generator=gen, dtype=dtype) * 0.1 for g in sizes]
    return lws, lbs, ws, bs


def _dwgn_params(c, groups, ks, dtype=D64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = c // groups
    ws = [torch.randn(q, 1, k, k, generator=gen, dtype=dtype) * 0.3 for k in ks]
    bs = [torch.randn(q, generator=gen, dtype=dtype) * 0.1 for _ in ks]
    gw = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    gb = torch.randn(c, generator=gen, dtype=dtype) * 0.1
    return ws, bs, gw, gb


def _leaves(*groups):
    out = []
    for g in groups:
        items = g if isinstance(g, list) else [g]
        out.append([t.detach().clone().requires_grad_() for t in items] if isinstance(g, list)
                   else items[0].detach().clone().requires_grad_())
    return out


def _grads(tensors):
    return [t.grad for g in tensors for t in (g if isinstance(g, list) else [g])]


# --------------------------------------------------------------------------------------------------
# ops vs the plain composites
# --------------------------------------------------------------------------------------------------
# GAB groups at their real (odd) widths with d = 1, 2, 5, 7 at 8×8 (most d = 5/7 taps in the padding) and an
# odd 13×11 size; GHPA's single group; unequal groups and mixed kernel sizes.
LNDW_CASES = [
    ((5, 5, 5, 5), (3, 3, 3, 3), (1, 2, 5, 7), (2, 8, 8)),
    ((9, 9, 9, 9), (3, 3, 3, 3), (1, 2, 5, 7), (1, 13, 11)),
    ((12,), (3,), (1,), (2, 7, 9)),
    ((3, 6, 4), (3, 5, 1), (2, 1, 3), (2, 6, 5)),
]


@pytest.mark.parametrize("sizes,ks,dilations,shape", LNDW_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_lndw_matches_plain_composite(sizes, ks, dilations, shape, channels_last):
    n, h, w = shape
    x = torch.randn(n, sum(sizes), h, w, dtype=D64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = _lndw_params(sizes, ks)
    xp, *pp = _leaves(x, *params)
    xf, *pf = _leaves(x, *params)
    yp = plain_lndw(xp, *pp, dilations, 1e-6)
    yf = layernorm_dilated_dwconv(xf, *pf, dilations=dilations, eps=1e-6, backend=REF)
    torch.testing.assert_close(yf, yp, atol=1e-10, rtol=1e-8)
    if channels_last:
        assert yf.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(yp)
    yp.backward(grad)
    yf.backward(grad)
    torch.testing.assert_close(xf.grad, xp.grad, atol=1e-10, rtol=1e-8)
    for a, b in zip(_grads(pf), _grads(pp)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


DWGN_CASES = [
    (24, (3, 3, 3, 3), (7, 5, 2, 1), (2, 8, 8)),  # DGA at 8x8
    (16, (3, 3, 3, 3), (7, 5, 2, 1), (1, 13, 11)),
    (12, (5, 5, 5, 5), (1, 1, 1, 1), (2, 6, 7)),  # GAU w2 (5x5, GN(4))
    (6, (3, 3), (2, 3), (2, 5, 4)),
]


@pytest.mark.parametrize("c,ks,dilations,shape", DWGN_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_dwgn_matches_plain_composite(c, ks, dilations, shape, channels_last):
    n, h, w = shape
    x = torch.randn(n, c, h, w, dtype=D64) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = _dwgn_params(c, len(ks), ks)
    xp, *pp = _leaves(x, *params)
    xf, *pf = _leaves(x, *params)
    yp = plain_dwgn(xp, *pp, dilations, 1e-5)
    yf = dilated_dwconv_groupnorm(xf, *pf, dilations=dilations, eps=1e-5, backend=REF)
    torch.testing.assert_close(yf, yp, atol=1e-10, rtol=1e-8)
    if channels_last:
        assert yf.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(yp)
    yp.backward(grad)
    yf.backward(grad)
    torch.testing.assert_close(xf.grad, xp.grad, atol=1e-10, rtol=1e-8)
    for a, b in zip(_grads(pf), _grads(pp)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_twice_pytorch_error(dtype):
    """Output and input gradient in low precision vs the fp64 truth: at most 2x plain PyTorch's error."""
    sizes, ks, dil = (9, 9, 9, 9), (3, 3, 3, 3), (1, 2, 5, 7)
    x64 = torch.randn(2, 36, 16, 16, dtype=D64)
    p64 = _lndw_params(sizes, ks)
    g64 = torch.randn(2, 36, 16, 16, dtype=D64)
    cases = [(plain_lndw, lambda x, p, b: layernorm_dilated_dwconv(x, *p, dilations=dil, backend=b), p64, dil, 1e-6),
             (plain_dwgn, lambda x, p, b: dilated_dwconv_groupnorm(x, *p, dilations=(7, 5, 2, 1), backend=b),
              _dwgn_params(36, 4, ks), (7, 5, 2, 1), 1e-5)]
    for plain, fused, params, dils, eps in cases:
        x = x64.clone().requires_grad_()
        truth = plain(x, *params, dils, eps)
        truth.backward(g64)
        truth_g = x.grad

        def run(fn):
            xl = x64.to(dtype).requires_grad_()
            lp = [[t.to(dtype) for t in p] if isinstance(p, list) else p.to(dtype) for p in params]
            y = fn(xl, lp)
            y.backward(g64.to(dtype))
            return (y.double() - truth).abs().max().item(), (xl.grad.double() - truth_g).abs().max().item()

        err_pt = run(lambda xl, lp: plain(xl, *lp, dils, eps))
        err_ours = run(lambda xl, lp: fused(xl, lp, REF))
        for ours, pt in zip(err_ours, err_pt):
            assert ours <= 2 * pt + 1e-6, (plain.__name__, ours, pt)


def test_gradcheck_lndw():
    sizes, ks, dil = (2, 2), (3, 3), (1, 2)
    x = torch.randn(1, 4, 4, 3, dtype=D64, requires_grad=True)
    lws, lbs, ws, bs = (_leaves(p)[0] for p in _lndw_params(sizes, ks))

    def f(x, lw0, lw1, lb0, lb1, w0, w1, b0, b1):
        return layernorm_dilated_dwconv(x, [lw0, lw1], [lb0, lb1], [w0, w1], [b0, b1], dilations=dil, backend=REF)

    assert torch.autograd.gradcheck(f, (x, *lws, *lbs, *ws, *bs))


def test_gradcheck_dwgn():
    x = torch.randn(2, 4, 3, 3, dtype=D64, requires_grad=True)
    ws, bs, gw, gb = _leaves(*_dwgn_params(4, 2, (3, 3)))

    def f(x, w0, w1, b0, b1, gw, gb):
        return dilated_dwconv_groupnorm(x, [w0, w1], [b0, b1], gw, gb, dilations=(2, 1), backend=REF)

    assert torch.autograd.gradcheck(f, (x, *ws, *bs, gw, gb))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(requires_grad, channels_last):
    x = torch.randn(2, 10, 6, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(requires_grad)
    lws, lbs, ws, bs = (p if not requires_grad else [t.requires_grad_() for t in p]
                        for p in _lndw_params((5, 5), (3, 3), torch.float32))
    torch.library.opcheck(_forward_op("layernorm_dilated_dwconv"), [x, lws, lbs, ws, bs, [1, 2], 1e-6])
    ws, bs, gw, gb = _dwgn_params(10, 2, (3, 3), torch.float32)
    if requires_grad:
        ws, bs = [t.requires_grad_() for t in ws], [t.requires_grad_() for t in bs]
        gw, gb = gw.requires_grad_(), gb.requires_grad_()
    torch.library.opcheck(_forward_op("dilated_dwconv_groupnorm"), [x, ws, bs, gw, gb, [2, 1], 1e-5])


# --------------------------------------------------------------------------------------------------
# FLOPs, backends, argument errors
# --------------------------------------------------------------------------------------------------
def _count(fn, backward):
    with FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("backward", [False, True])
def test_flop_formulas_equal_plain_composites(backward):
    x = torch.randn(2, 20, 16, 16, requires_grad=True)
    lp = [[t.requires_grad_() for t in p] for p in _lndw_params((5, 5, 5, 5), (3, 3, 3, 3), torch.float32)]
    ws, bs, gw, gb = _dwgn_params(20, 4, (3, 3, 3, 3), torch.float32)
    dp = [[t.requires_grad_() for t in ws], [t.requires_grad_() for t in bs], gw.requires_grad_(),
          gb.requires_grad_()]
    dil = (1, 2, 5, 7)
    for plain_fn, fused_fn in [
        (lambda: plain_lndw(x, *lp, dil, 1e-6), lambda: layernorm_dilated_dwconv(x, *lp, dilations=dil, backend=REF)),
        (lambda: plain_dwgn(x, *dp, dil, 1e-5), lambda: dilated_dwconv_groupnorm(x, *dp, dilations=dil, backend=REF)),
    ]:
        expected = _count(plain_fn, backward)
        assert expected > 0
        assert _count(fused_fn, backward) == expected


def test_fvcore_handles_count_macs():
    fvcore = pytest.importorskip("fvcore.nn", reason="fvcore (extra [flops]) is not installed")
    from emcad_kernels.flops import fvcore_handles

    lws, lbs, ws, bs = _lndw_params((5, 5, 5, 5), (3, 3, 3, 3), torch.float32)

    class Fused(nn.Module):
        def forward(self, x):
            return layernorm_dilated_dwconv(x, lws, lbs, ws, bs, dilations=(1, 2, 5, 7), backend=REF)

    analysis = fvcore.FlopCountAnalysis(Fused(), torch.randn(1, 20, 8, 8)).set_op_handle(**fvcore_handles())
    analysis.unsupported_ops_warnings(False)
    assert analysis.total() == 20 * 8 * 8 * 9


@pytest.fixture
def legacy_backend(monkeypatch):
    """A backend whose kernels cover the EMCAD ops only (no lndw/dwgn entry in those descriptors)."""
    for name, kernel in (("multi_scale_dwconv", "msdc"), ("upsample_dwconv", "updw"),
                         ("grouped_attention_gate", "lgag")):
        op = backends.registered_ops()[name]
        monkeypatch.setitem(op.support, "legacy", Support(kernels=("emcad_kernels.reference", f"{kernel}_forward",
                                                                   f"{kernel}_backward")))
    backends.register_backend(Backend("legacy", priority=100, description="tests", devices=None,
                                      dtypes=backends.FLOAT_DTYPES))
    yield "legacy"
    backends.unregister_backend("legacy")


def test_backend_without_kernels_reports_not_implemented(legacy_backend):
    x = torch.randn(1, 8, 6, 6)
    ws, bs, gw, gb = _dwgn_params(8, 4, (3, 3, 3, 3), torch.float32)
    text = ek.explain("dilated_dwconv_groupnorm", x, ws, bs, gw, gb, dilations=(7, 5, 2, 1))
    assert "legacy     no: dilated_dwconv_groupnorm is not implemented in the legacy backend" in text
    assert "-> cpu" in text or "-> reference" in text  # the next backend that implements the op
    dilated_dwconv_groupnorm(x, ws, bs, gw, gb, dilations=(7, 5, 2, 1))  # auto falls through
    with pytest.raises(BackendUnavailableError, match="layernorm_dilated_dwconv is not implemented in the legacy"):
        layernorm_dilated_dwconv(x, None, None, ws, bs, dilations=(1, 2, 5, 7), backend="legacy")
    # the old ops are unaffected
    assert "-> legacy" in ek.explain("upsample_dwconv", x, torch.randn(8, 1, 3, 3), nn.BatchNorm2d(8))


def test_installed_backends_refuse_with_reason_or_run():
    """Every registered backend either runs the new ops or says why not (never an exception from ``check``)."""
    x = torch.randn(1, 8, 6, 6)
    ws, bs, gw, gb = _dwgn_params(8, 4, (3, 3, 3, 3), torch.float32)
    for name in ek.registered_backends():
        reasons = backends.reasons("dilated_dwconv_groupnorm", x, ws, bs, gw, gb, dilations=(7, 5, 2, 1), backend=name)
        assert isinstance(reasons, list)
    text = ek.explain("dilated_dwconv_groupnorm", x, ws, bs, gw, gb, dilations=(7, 5, 2, 1))
    assert "-> " in text


@pytest.mark.parametrize("call,match", [
    (lambda x, w: layernorm_dilated_dwconv(x[0], None, None, w, dilations=(1,) * 4), "x must be a 4-D"),
    (lambda x, w: layernorm_dilated_dwconv(x, None, None, w, dilations=(1, 2)), "dilations must hold one"),
    (lambda x, w: layernorm_dilated_dwconv(x, None, None, w, dilations=(1, 2, 0, 1)), r"dilations\[2\]"),
    (lambda x, w: layernorm_dilated_dwconv(x, None, None, w[:3], dilations=(1,) * 3), "cover 6 channels"),
    (lambda x, w: layernorm_dilated_dwconv(x, [torch.ones(3)] * 4, None, w, dilations=(1,) * 4),
     r"ln_weights\[0\] has 3 elements"),
    (lambda x, w: layernorm_dilated_dwconv(x, None, None, [t.expand(2, 1, 3, 3)[:, :, :2] for t in w],
                                           dilations=(1,) * 4), r"weights\[0\] must have a square odd"),
    (lambda x, w: layernorm_dilated_dwconv(x, None, None, w, dilations=(1,) * 4, eps=0), "eps must be a positive"),
    (lambda x, w: dilated_dwconv_groupnorm(x, w[:2] + [torch.randn(4, 1, 3, 3)], None, None, None,
                                           dilations=(1,) * 3), "equal groups"),
    (lambda x, w: dilated_dwconv_groupnorm(x, w, None, torch.ones(7), None, dilations=(1,) * 4),
     "gn_weight has 7 elements"),
    (lambda x, w: dilated_dwconv_groupnorm(x, w, [torch.ones(2, dtype=D64)] * 4, None, None, dilations=(1,) * 4),
     r"biases\[0\] has dtype"),
])
def test_argument_errors_name_the_argument(call, match):
    x = torch.randn(1, 8, 5, 5)
    w = [torch.randn(2, 1, 3, 3) for _ in range(4)]
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, w)


# --------------------------------------------------------------------------------------------------
# models: parameters, keys, MACs
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ege():
    torch.manual_seed(0)
    return EGEUNet()


@pytest.fixture(scope="module")
def malu():
    torch.manual_seed(0)
    return MALUNet()


def _n(m):
    return sum(p.numel() for p in m.parameters())


def test_egeunet_parameters(ege):
    assert _n(ege) == 53_374
    sd = ege.state_dict()
    assert len(sd) == 314 and not list(ege.buffers())
    per = {"encoder1": 224, "encoder2": 1_168, "encoder3": 3_480, "encoder4": 1_952, "encoder5": 3_184,
           "encoder6": 5_728, "decoder1": 6_832, "decoder2": 4_160, "decoder3": 2_392, "GAB1": 584, "GAB2": 1_496,
           "GAB3": 2_792, "GAB4": 4_728, "GAB5": 9_368, "decoder4": 3_472, "decoder5": 1_160, "gt_conv1": 49,
           "gt_conv2": 33, "gt_conv3": 25, "gt_conv4": 17, "gt_conv5": 9, "final": 9}
    assert {k: _n(getattr(ege, k)) for k in per} == per
    assert sum(_n(getattr(ege, f"{p}bn{i}")) for p in "ed" for i in range(1, 6)) == 512
    ghpa = ege.encoder4[0]
    assert [k for k, _ in ghpa.named_parameters()][:5] == ["params_xy", "params_zx", "params_zy",
                                                           "conv_xy.0.weight", "conv_xy.0.bias"]
    assert sd["encoder4.0.params_xy"].shape == (1, 6, 8, 8) and sd["encoder4.0.params_zx"].shape == (1, 1, 6, 8)
    assert sd["GAB5.g3.1.weight"].shape == (25, 1, 3, 3) and ege.GAB5.g3[1].dilation == (7, 7)
    assert sd["GAB1.tail_conv.1.weight"].shape == (8, 20, 1, 1)
    assert torch.equal(sd["decoder1.0.params_zy"], torch.ones(1, 1, 16, 8))  # initialised to ones
    keys = list(sd)
    assert keys[0] == "encoder1.0.weight" and keys[-1] == "final.bias"
    assert keys.index("GAB1.pre_project.weight") < keys.index("gt_conv1.0.weight") < keys.index("decoder1.0.params_xy")


def test_malunet_parameters(malu):
    assert _n(malu) == 177_943
    sd = malu.state_dict()
    assert len(sd) == 279 and not list(malu.buffers())
    dga = {"encoder4": (1, 4_936), "encoder5": (1, 8_384), "encoder6": (1, 16_400), "decoder1": (0, 22_816),
           "decoder2": (0, 13_264), "decoder3": (0, 6_800)}
    ea = {"encoder4": (0, 5_832), "encoder5": (0, 10_336), "encoder6": (0, 23_184), "decoder1": (1, 23_184),
          "decoder2": (1, 10_336), "decoder3": (1, 5_832)}
    for name, (i, n) in dga.items():
        assert isinstance(getattr(malu, name)[i], DGA) and _n(getattr(malu, name)[i]) == n
    for name, (i, n) in ea.items():
        assert isinstance(getattr(malu, name)[i], EAblock) and _n(getattr(malu, name)[i]) == n
    assert _n(malu.scab) == 16_614 and _n(malu.scab.catt) == 16_515 and _n(malu.scab.satt) == 99
    assert malu.encoder4[1].mda0.dilation == (7, 7) and malu.encoder4[1].mda3.dilation == (1, 1)
    assert sd["encoder4.1.gau.w2.0.conv1.weight"].shape == (24, 1, 5, 5)
    assert sd["scab.catt.att5.weight"].shape == (48, 128)
    assert "encoder4.0.conv2.bias" not in sd and sd["encoder4.0.linear_1.weight"].shape == (24, 96, 1)


def test_malunet_external_attention_memories_are_independent(malu):
    ea = malu.encoder4[0]
    w0, w1 = ea.linear_0.weight, ea.linear_1.weight
    assert torch.equal(w1, w0.permute(1, 0, 2))  # transposed identical init (docs/models.md#malunet-blocks)
    assert w0.untyped_storage().data_ptr() != w1.untyped_storage().data_ptr()
    assert 0.2 < w0.std().item() < 0.4  # sqrt(2/24) = 0.289


def _documented_keys(model_heading):
    """(key, shape) rows of the model's listing in docs/state_dicts.md."""
    text = open(STATE_DICTS_DOC, encoding="utf8").read()
    block = text.split(f"\n## {model_heading}\n")[1].split("```")[1]
    rows = []
    for line in block.strip().splitlines():
        key, shape = line.split(None, 1)
        rows.append((key, tuple(int(v) for v in re.findall(r"\d+", shape))))
    return rows


@pytest.mark.parametrize("heading,fixture", [("EGE-UNet", "ege"), ("MALUNet", "malu")])
def test_state_dict_keys_and_shapes_equal_the_documented_listing(heading, fixture, request):
    model = request.getfixturevalue(fixture)
    documented = _documented_keys(heading)
    assert len(documented) > 100
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == documented


def test_thop_macs_match_the_papers(ege, malu):
    x = torch.randn(1, 3, 256, 256)
    r = count_macs_thop(ege, (x,))
    assert (r.macs, r.params, r.total_params) == (72_096_256, 45_806, 53_374)
    assert r.per_module["encoder1"] == 14_155_776 and r.per_module["ebn1"] == 0
    r = count_macs(malu, (x,), convention="thop")
    assert (r.macs, r.params, r.total_params) == (82_972_800, 175_031, 177_943)
    assert ege.backend == "auto" and malu.backend == "auto" and ege.training and malu.training
    with pytest.raises(ValueError, match="convention must be one of"):
        count_macs(ege, (x,), convention="ptflops")


# --------------------------------------------------------------------------------------------------
# models: outputs
# --------------------------------------------------------------------------------------------------
def test_egeunet_outputs(ege):
    x = minmax_scale_255(torch.rand(2, 3, 64, 96))
    assert x.amin().item() == 0 and x.amax().item() == 255
    ege.eval()
    with torch.no_grad():
        heads, out = ege(x)
        ege.output = "logits"
        heads_l, out_l = ege(x)
        ege.output = "probs"
    ege.train()
    assert len(heads) == 5 and out.shape == (2, 1, 64, 96)
    for p, q in zip((*heads, out), (*heads_l, out_l)):
        assert p.shape == (2, 1, 64, 96) and p.min() >= 0 and p.max() <= 1
        torch.testing.assert_close(p, torch.sigmoid(q))
    m = EGEUNet(num_classes=2, gt_ds=False, output="logits")
    assert not hasattr(m, "gt_conv1") and m.GAB1.group_channels == 4
    y = m(torch.rand(1, 3, 64, 64))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 2, 64, 64)
    assert EGEUNet(bridge=False)(torch.rand(1, 3, 32, 32))[1].shape == (1, 1, 32, 32)


def test_malunet_outputs(malu):
    with torch.no_grad():
        y = malu.eval()(torch.rand(2, 3, 64, 32) * 255)
    malu.train()
    assert y.shape == (2, 1, 64, 32) and y.min() >= 0 and y.max() <= 1
    y = MALUNet(num_classes=3, split_att="conv", output="logits")(torch.rand(1, 3, 32, 32))
    assert y.shape == (1, 3, 32, 32) and y.min() < 0


@pytest.mark.parametrize("cls", [EGEUNet, MALUNet])
def test_input_and_argument_checks(cls):
    m = cls()
    with pytest.raises(ValueError, match="multiples of 32.*250x256.*256x256"):
        m(torch.rand(1, 3, 250, 256))
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        m(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="output must be one of"):
        cls(output="sigmoid")
    with pytest.raises(ValueError, match="c_list"):
        cls(c_list=[8, 16, 24, 32, 48, 66])


# --------------------------------------------------------------------------------------------------
# models: fused vs backend="torch"
# --------------------------------------------------------------------------------------------------
def _randomised(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


@pytest.mark.parametrize("cls", [EGEUNet, MALUNet])
@pytest.mark.parametrize("training", [True, False])
def test_whole_model_fused_matches_torch(cls, training):
    torch.manual_seed(0)
    plain = _randomised(cls(backend="torch").double()).train(training)
    fused = copy.deepcopy(plain).set_backend(REF).train(training)
    x = torch.rand(2, 3, 64, 32, dtype=D64) * 255
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yf = _flat(plain(xp)), _flat(fused(xf))
    for a, b in zip(yf, yp):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(t.shape, generator=gen, dtype=D64) for t in yp]
    torch.autograd.backward(yp, grads)
    torch.autograd.backward(yf, grads)
    torch.testing.assert_close(xf.grad, xp.grad, atol=1e-9, rtol=1e-7)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-9, rtol=1e-7, msg=lambda m: f"{name}: {m}")


def test_fused_model_calls_the_fused_ops(monkeypatch):
    import emcad.models.egeunet as egeunet_module
    import emcad.models.malunet as malunet_module

    calls = {"lndw": 0, "dwgn": 0}

    def counting(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(egeunet_module, "layernorm_dilated_dwconv", counting("lndw", layernorm_dilated_dwconv))
    monkeypatch.setattr(malunet_module, "dilated_dwconv_groupnorm", counting("dwgn", dilated_dwconv_groupnorm))
    x = torch.rand(1, 3, 32, 32)
    EGEUNet(backend=REF)(x)
    MALUNet(backend=REF)(x)
    assert calls == {"lndw": 6 + 5, "dwgn": 6 + 6 * 3}  # GHPA + GAB; DGA + 3 GAU convs per DGA
    EGEUNet(backend="torch")(x)
    MALUNet(backend="torch")(x)
    assert calls == {"lndw": 11, "dwgn": 24}


def test_blocks_fused_match_torch_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 24, 16, 16)
    for block, inputs in [(GHPA(24, 32), (x,)), (DGA(24, 32), (x,)), (DepthWiseConv2d(24, 16, 5, 2), (x,)),
                          (GAB(32, 24), (torch.randn(2, 32, 8, 8), x, torch.randn(2, 1, 16, 16))),
                          (LayerNorm2d(24), (x,))]:
        _randomised(block)
        ref = block.set_backend("torch")(*inputs)
        out = block.set_backend(REF)(*inputs)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5, msg=lambda m: f"{type(block).__name__}: {m}")


# --------------------------------------------------------------------------------------------------
# GHPA attention-map cache
# --------------------------------------------------------------------------------------------------
def test_ghpa_cache_per_resolution_and_invalidation():
    torch.manual_seed(0)
    ghpa = _randomised(GHPA(16, 8)).set_backend(REF).eval()
    plain = copy.deepcopy(ghpa).set_backend("torch")
    x, x2 = torch.randn(1, 16, 12, 10), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        y = ghpa(x)
        maps = ghpa.maps(12, 10, x)
        assert ghpa.maps(12, 10, x) is maps  # reused
        ghpa(x2)
        assert sorted(ghpa.cache_info()) == [(8, 8), (12, 10)]
        torch.testing.assert_close(y, plain(x), atol=1e-5, rtol=1e-5)
        # an in-place parameter update (optimizer step, load_state_dict) invalidates the entry
        for m in (ghpa, plain):
            m.params_xy.mul_(1.5)
            m.conv_zx[2].bias.add_(0.25)
        assert ghpa.maps(12, 10, x) is not maps
        torch.testing.assert_close(ghpa(x), plain(x), atol=1e-5, rtol=1e-5)
        plain.load_state_dict({k: v * 0.5 for k, v in plain.state_dict().items()})
        ghpa.load_state_dict(plain.state_dict())
        torch.testing.assert_close(ghpa(x), plain(x), atol=1e-5, rtol=1e-5)
    # gradients enabled with trainable maps: no cache, exact parameter gradients
    before = ghpa.maps(12, 10, x)
    assert before[0].requires_grad
    ghpa(x).sum().backward()
    plain(x).sum().backward()
    torch.testing.assert_close(ghpa.params_zy.grad, plain.params_zy.grad, atol=1e-4, rtol=1e-4)
    # training mode never caches, and train() drops the cache
    ghpa.train()
    assert ghpa.cache_info() == []
    with torch.no_grad():
        ghpa(x)
    assert ghpa.cache_info() == []
    # dtype / device changes give new storage: recomputed
    ghpa.eval()
    with torch.no_grad():
        ghpa(x)
        ghpa.double()
        torch.testing.assert_close(ghpa(x.double()), plain.double()(x.double()), atol=1e-10, rtol=1e-10)
    assert ghpa.maps(12, 10, x.double())[0].dtype == D64


def test_ghpa_cache_with_inference_mode_and_model_clear_cache():
    model = EGEUNet().eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        a = model(x)[1]
    with torch.no_grad():
        b = model(x)[1]  # inference-mode tensors are not reused outside inference mode
    torch.testing.assert_close(a, b)
    ghpa = model.encoder4[0]
    assert len(ghpa.cache_info()) == 2
    model.clear_cache()
    assert ghpa.cache_info() == []


# --------------------------------------------------------------------------------------------------
# registry, save_pretrained / from_pretrained
# --------------------------------------------------------------------------------------------------
def test_registry_and_round_trip(tmp_path):
    assert list_models()[-2:] == ["egeunet", "malunet"]
    assert "egeunet" not in list_models(include_lightweight=False)
    with pytest.raises(TypeError, match="unknown arguments.*'split_att'.*egeunet"):
        create_model("egeunet", split_att="fc")
    with pytest.raises(ValueError, match="encoder_weights must be None"):
        create_model("malunet", encoder_weights="x.pth")
    with pytest.raises(ValueError, match="Did you mean 'malunet'"):
        create_model("malunett")
    x = torch.rand(1, 3, 32, 32) * 255
    for name, kwargs in (("egeunet", {"gt_ds": False}), ("malunet", {"output": "logits", "split_att": "conv"})):
        torch.manual_seed(0)
        model = create_model(name, num_classes=2, backend="torch", **kwargs)
        assert model.model_name == name
        save_pretrained(model, tmp_path / name)
        loaded = from_pretrained(tmp_path / name, backend=REF)
        assert type(loaded) is type(model) and loaded.backend == REF and not loaded.training
        assert loaded.config == model.config
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model.eval()(x), atol=1e-4, rtol=1e-4)
