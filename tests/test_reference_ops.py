"""The op layer with the reference backend: semantics vs nn modules, gradients, registration, FLOPs, errors."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import emcad_kernels as ek
from emcad_kernels import backends
from emcad_kernels.backends import Backend, BackendUnavailableError

REF = "reference"
def _forward_op(op):
    return ek.backends.kernel_ops(op, REF).forward


def _act_module(name):
    return {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "leakyrelu": nn.LeakyReLU(0.2), "gelu": nn.GELU(),
            "hswish": nn.Hardswish()}[name]


def _randomise_bn(bn: nn.BatchNorm2d, gen: torch.Generator):
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    return bn


class PlainMSDC(nn.Module):
    """The unfused composition, written with nn modules (docs/models.md#msdc, docs/models.md#mscb)."""

    def __init__(self, c, kernel_sizes, activation, combine, shuffle_groups, stride, gen):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False) for k in kernel_sizes)
        self.bns = nn.ModuleList(_randomise_bn(nn.BatchNorm2d(c), gen) for _ in kernel_sizes)
        for conv in self.convs:
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
        self.act, self.combine, self.shuffle_groups = _act_module(activation), combine, shuffle_groups

    def forward(self, x):
        outs = [self.act(bn(conv(x))) for conv, bn in zip(self.convs, self.bns)]
        y = torch.cat(outs, 1) if self.combine == "concat" else sum(outs)
        if self.shuffle_groups:
            n, c, h, w = y.shape
            y = y.view(n, self.shuffle_groups, c // self.shuffle_groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return y

    def fused(self, x, training, backend=REF):
        return ek.multi_scale_dwconv(x, [c.weight for c in self.convs], list(self.bns),
                                     activation=self.act_name, combine=self.combine,
                                     shuffle_groups=self.shuffle_groups, stride=self.convs[0].stride[0],
                                     training=training, backend=backend)


def _make_msdc(c=6, kernel_sizes=(1, 3, 5), activation="relu6", combine="sum", shuffle_groups=None, stride=1,
               dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = PlainMSDC(c, kernel_sizes, activation, combine, shuffle_groups, stride, gen).to(dtype)
    m.act_name = activation
    return m


class PlainUpDw(nn.Module):
    def __init__(self, c, mode, activation, gen, k=3, scale=2):
        super().__init__()
        self.up = nn.Upsample(scale_factor=scale, mode=mode)
        self.conv = nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.3)
        self.bn = _randomise_bn(nn.BatchNorm2d(c), gen)
        self.act, self.act_name, self.mode, self.scale = _act_module(activation), activation, mode, scale

    def forward(self, x):
        return self.act(self.bn(self.conv(self.up(x))))

    def fused(self, x, training, backend=REF):
        return ek.upsample_dwconv(x, self.conv.weight, self.bn, scale=self.scale, mode=self.mode,
                                  activation=self.act_name, training=training, backend=backend)


class PlainLGAG(nn.Module):
    def __init__(self, c, groups, gen, k=3, add=True):
        super().__init__()
        f = c // 2
        self.W_g = nn.Sequential(nn.Conv2d(c, f, k, 1, k // 2, groups=groups), _randomise_bn(nn.BatchNorm2d(f), gen))
        self.W_x = nn.Sequential(nn.Conv2d(c, f, k, 1, k // 2, groups=groups), _randomise_bn(nn.BatchNorm2d(f), gen))
        self.psi = nn.Sequential(nn.Conv2d(f, 1, 1), _randomise_bn(nn.BatchNorm2d(1), gen), nn.Sigmoid())
        for conv in (self.W_g[0], self.W_x[0], self.psi[0]):
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
        self.groups, self.add = groups, add

    def forward(self, g, x):
        out = x * self.psi(F.relu(self.W_g(g) + self.W_x(x)))
        return g + out if self.add else out

    def fused(self, g, x, training, backend=REF):
        return ek.grouped_attention_gate(g, x, self.W_g[0].weight, self.W_g[0].bias, self.W_g[1], self.W_x[0].weight,
                                         self.W_x[0].bias, self.W_x[1], self.psi[0].weight, self.psi[0].bias,
                                         self.psi[1], groups=self.groups, add_gate_input=self.add,
                                         training=training, backend=backend)


def _clone_module(m):
    import copy
    return copy.deepcopy(m)


def _assert_grads_match(plain, fused_mod, inputs_plain, inputs_fused, atol, rtol):
    for a, b in zip(inputs_plain, inputs_fused):
        torch.testing.assert_close(b.grad, a.grad, atol=atol, rtol=rtol)
    for (name, p), (_, q) in zip(plain.named_parameters(), fused_mod.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    for (name, b), (_, c) in zip(plain.named_buffers(), fused_mod.named_buffers()):
        if b.dtype.is_floating_point:
            torch.testing.assert_close(c, b, atol=atol, rtol=rtol, msg=lambda m: f"buffer {name}: {m}")


def _run_pair(plain, make_inputs, training, channels_last=False, atol=1e-10, rtol=1e-8):
    fused = _clone_module(plain)
    plain.train(training)
    fused.train(training)
    ins_p = make_inputs()
    ins_f = [t.detach().clone() for t in ins_p]
    if channels_last:
        ins_p = [t.contiguous(memory_format=torch.channels_last) for t in ins_p]
        ins_f = [t.contiguous(memory_format=torch.channels_last) for t in ins_f]
    for t in ins_p + ins_f:
        t.requires_grad_(True)
    y_p = plain(*ins_p)
    y_f = fused.fused(*ins_f, training=training)
    torch.testing.assert_close(y_f, y_p, atol=atol, rtol=rtol)
    if channels_last:
        assert y_f.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(y_p)
    y_p.backward(grad)
    y_f.backward(grad)
    _assert_grads_match(plain, fused, ins_p, ins_f, atol, rtol)


# --------------------------------------------------------------------------------------------------
# semantics vs nn modules
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("kernel_sizes,combine,shuffle,stride,activation", [
    ((1, 3, 5), "sum", 6, 1, "relu6"),
    ((1, 3, 5), "concat", 3, 1, "relu"),
    ((3,), "sum", None, 2, "gelu"),
    ((1, 3, 5, 7, 9), "sum", 2, 2, "hswish"),
    ((5, 3), "concat", None, 1, "leakyrelu"),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_msdc_matches_nn_modules(training, kernel_sizes, combine, shuffle, stride, activation, channels_last):
    plain = _make_msdc(6, kernel_sizes, activation, combine, shuffle, stride)
    gen = torch.Generator().manual_seed(1)
    _run_pair(plain, lambda: [torch.randn(2, 6, 13, 11, generator=gen, dtype=torch.float64)], training,
              channels_last)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_dwconv_matches_nn_modules(training, mode, channels_last):
    gen = torch.Generator().manual_seed(2)
    plain = PlainUpDw(5, mode, "relu", gen).double()
    _run_pair(plain, lambda: [torch.randn(2, 5, 7, 6, generator=gen, dtype=torch.float64)], training, channels_last)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_attention_gate_matches_nn_modules(training, add, channels_last):
    gen = torch.Generator().manual_seed(3)
    plain = PlainLGAG(8, 4, gen, add=add).double()
    _run_pair(plain, lambda: [torch.randn(2, 8, 9, 7, generator=gen, dtype=torch.float64) for _ in range(2)],
              training, channels_last)


def test_running_stats_follow_batchnorm_momentum():
    plain = _make_msdc()
    fused = _clone_module(plain)
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    for _ in range(3):
        plain.train()(x)
        ek.multi_scale_dwconv(x, [c.weight for c in fused.convs], list(fused.bns), training=True, momentum=0.1,
                              backend=REF)
    for a, b in zip(plain.bns, fused.bns):
        torch.testing.assert_close(b.running_mean, a.running_mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(b.running_var, a.running_var, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_twice_pytorch_error(dtype):
    """Reference in low precision vs fp64 truth: at most 2× the error of plain PyTorch in the same dtype."""
    plain64 = _make_msdc(16, (1, 3, 5), "relu6", "sum", 16)
    x64 = torch.randn(2, 16, 12, 12, dtype=torch.float64)
    truth = plain64.eval()(x64)
    plain_lp = _clone_module(plain64).to(dtype).eval()
    err_pt = (plain_lp(x64.to(dtype)).double() - truth).abs().max().item()
    err_ours = (plain_lp.fused(x64.to(dtype), training=False).double() - truth).abs().max().item()
    assert err_ours <= 2 * err_pt + 1e-6, (err_ours, err_pt)


# --------------------------------------------------------------------------------------------------
# gradients and registration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_gradcheck_msdc(training):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(3, 1, k, k, dtype=torch.float64, requires_grad=True) for k in (1, 3)]
    gamma = torch.rand(3, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    stats = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)

    def f(x, w1, w3, gamma, beta):
        bn = [(gamma, beta, stats[0].clone(), stats[1].clone())] * 2
        return ek.multi_scale_dwconv(x, [w1, w3], bn, shuffle_groups=3, training=training, backend=REF)

    assert torch.autograd.gradcheck(f, (x, *ws, gamma, beta))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_gradcheck_upsample_dwconv(training, mode):
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(2, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, w, gamma, beta):
        bn = (gamma, beta, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
        return ek.upsample_dwconv(x, w, bn, mode=mode, training=training, backend=REF)

    assert torch.autograd.gradcheck(f, (x, w, gamma, beta))


@pytest.mark.parametrize("training", [False, True])
def test_gradcheck_grouped_attention_gate(training):
    d = torch.float64
    g = torch.randn(2, 4, 4, 3, dtype=d, requires_grad=True)
    x = torch.randn(2, 4, 4, 3, dtype=d, requires_grad=True)
    params = [torch.randn(s, dtype=d, requires_grad=True) for s in
              ((2, 2, 3, 3), (2,), (2, 2, 3, 3), (2,), (1, 2, 1, 1), (1,))]
    gammas = [torch.rand(n, dtype=d, requires_grad=True) + 0.5 for n in (2, 2, 1)]

    def f(g, x, wg, bg, wx, bx, wpsi, bpsi, gg, gx, gp):
        bns = [(gam, torch.zeros_like(gam), torch.zeros_like(gam), torch.ones_like(gam)) for gam in (gg, gx, gp)]
        return ek.grouped_attention_gate(g, x, wg, bg, bns[0], wx, bx, bns[1], wpsi, bpsi, bns[2], groups=2,
                                         add_gate_input=True, training=training, backend=REF)

    assert torch.autograd.gradcheck(f, (g, x, *params, *[t.detach().requires_grad_() for t in gammas]))


def _msdc_args(requires_grad, channels_last=False, training=True):
    x = torch.randn(2, 4, 7, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(4, 1, k, k) for k in (1, 3, 5)]
    args = [x.requires_grad_(requires_grad), [w.requires_grad_(requires_grad) for w in ws],
            torch.rand(3, 4).requires_grad_(requires_grad), torch.randn(3, 4).requires_grad_(requires_grad),
            torch.zeros(3, 4), torch.ones(3, 4), training, 1e-5, "relu6", False, 4, 1]
    return args


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_opcheck_msdc(requires_grad, channels_last, training):
    torch.library.opcheck(_forward_op("multi_scale_dwconv"), _msdc_args(requires_grad, channels_last, training))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_opcheck_upsample_dwconv(requires_grad, mode):
    x = torch.randn(2, 3, 4, 5, requires_grad=requires_grad)
    args = [x, torch.randn(3, 1, 3, 3, requires_grad=requires_grad), torch.rand(3, requires_grad=requires_grad),
            torch.randn(3, requires_grad=requires_grad), torch.zeros(3), torch.ones(3), True, 1e-5, mode, "relu", 2]
    torch.library.opcheck(_forward_op("upsample_dwconv"), args)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_opcheck_grouped_attention_gate(requires_grad, training):
    def t(*s):
        return torch.randn(*s, requires_grad=requires_grad)

    bn = lambda n: [t(n), t(n), torch.zeros(n), torch.ones(n)]  # noqa: E731
    args = [t(2, 4, 5, 3), t(2, 4, 5, 3), t(2, 2, 3, 3), t(2), t(2, 2, 3, 3), t(2), t(1, 2, 1, 1), t(1),
            *bn(2), *bn(2), *bn(1), training, 1e-5, 2, "relu", True]
    torch.library.opcheck(_forward_op("grouped_attention_gate"), args)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    plain = _make_msdc(4, (1, 3, 5), "relu6", "sum", 4, dtype=torch.float32)
    updw = PlainUpDw(4, "nearest", "relu", torch.Generator().manual_seed(0))
    lgag = PlainLGAG(4, 2, torch.Generator().manual_seed(0))

    def block(x):
        y = plain.fused(x, training=True)
        u = updw.fused(y, training=True)
        return lgag.fused(u, u * 0.5, training=True)

    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y_c = compiled(x)
    y_c.sum().backward()
    g_c = x.grad.clone()
    x.grad = None
    y_e = block(x)
    y_e.sum().backward()
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(g_c, x.grad)


# --------------------------------------------------------------------------------------------------
# FLOP accounting
# --------------------------------------------------------------------------------------------------
def _count(fn, backward):
    with FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("backward", [False, True])
def test_flop_formulas_equal_plain_modules(backward):
    gen = torch.Generator().manual_seed(0)
    msdc = _make_msdc(6, (1, 3, 5), "relu6", "sum", 6, dtype=torch.float32)
    updw = PlainUpDw(6, "nearest", "relu", gen)
    lgag = PlainLGAG(6, 3, gen)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    g = torch.randn(2, 6, 8, 8, requires_grad=True)
    for plain_fn, fused_fn in [
        (lambda: msdc(x), lambda: msdc.fused(x, training=True)),
        (lambda: updw(x), lambda: updw.fused(x, training=True)),
        (lambda: lgag(g, x), lambda: lgag.fused(g, x, training=True)),
    ]:
        expected = _count(plain_fn, backward)
        assert expected > 0
        assert _count(fused_fn, backward) == expected


def test_fvcore_handles_count_macs():
    fvcore = pytest.importorskip("fvcore.nn", reason="fvcore (extra [flops]) is not installed")
    from emcad_kernels.flops import fvcore_handles

    msdc = _make_msdc(6, (1, 3, 5), "relu6", "sum", 6, dtype=torch.float32).eval()

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.msdc = msdc

        def forward(self, x):
            return self.msdc.fused(x, training=False)

    x = torch.randn(1, 6, 8, 8)
    analysis = fvcore.FlopCountAnalysis(Fused(), x).set_op_handle(**fvcore_handles())
    analysis.unsupported_ops_warnings(False)
    assert analysis.total() == 6 * 8 * 8 * (1 + 9 + 25)


# --------------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def broken_backend():
    def load():
        raise ImportError("demo backend was not built")

    backends.register_backend(Backend("broken", priority=100, description="tests", devices=None,
                                      dtypes=backends.FLOAT_DTYPES, load=load, support="reference"))
    yield "broken"
    backends.unregister_backend("broken")


def _tiny_msdc_call():
    m = _make_msdc(2, (3,), dtype=torch.float32)
    return torch.randn(1, 2, 4, 4), [m.convs[0].weight], list(m.bns)


def test_auto_skips_unavailable_backend_and_explains(broken_backend):
    x, ws, bns = _tiny_msdc_call()
    text = ek.explain("multi_scale_dwconv", x, ws, bns)
    assert "-> broken" not in text and "demo backend was not built" in text
    assert ek.available_backends()[-1] == "reference" and "broken" not in ek.available_backends()
    ek.multi_scale_dwconv(x, ws, bns)  # auto falls back to another backend


def test_forcing_unavailable_backend_raises_with_reason(broken_backend, monkeypatch):
    x, ws, bns = _tiny_msdc_call()
    with pytest.raises(BackendUnavailableError, match="demo backend was not built"):
        ek.multi_scale_dwconv(x, ws, bns, backend="broken")
    with ek.use_backend("broken"):
        with pytest.raises(BackendUnavailableError, match="broken"):
            ek.multi_scale_dwconv(x, ws, bns)
    monkeypatch.setenv(backends.ENV_VAR, "broken")
    with pytest.raises(BackendUnavailableError):
        ek.multi_scale_dwconv(x, ws, bns)
    with ek.use_backend("reference"):  # the context manager wins over the environment
        ek.multi_scale_dwconv(x, ws, bns)


def test_unknown_backend_name():
    x, ws, bns = _tiny_msdc_call()
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ek.multi_scale_dwconv(x, ws, bns, backend="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        with ek.use_backend("nope"):
            pass


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def _bn(c):
    return (torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c))


@pytest.mark.parametrize("make_call,message", [
    (lambda: ek.multi_scale_dwconv(torch.randn(2, 4, 5), [torch.randn(4, 1, 3, 3)], [_bn(4)]), "x must be a 4-D"),
    (lambda: ek.multi_scale_dwconv(torch.randn(1, 4, 5, 5), [torch.randn(3, 1, 3, 3)], [_bn(4)]),
     r"weights\[0\] must have shape \[4, 1, k, k\]"),
    (lambda: ek.multi_scale_dwconv(torch.randn(1, 4, 5, 5), [torch.randn(4, 1, 4, 4)], [_bn(4)]),
     r"weights\[0\] must have a square odd kernel"),
    (lambda: ek.multi_scale_dwconv(torch.randn(1, 4, 5, 5), [torch.randn(4, 1, 11, 11)], [_bn(4)]),
     r"odd kernel size <= 9"),
    (lambda: ek.multi_scale_dwconv(torch.randn(1, 4, 5, 5), [torch.randn(4, 1, 3, 3)], [_bn(3)]),
     r"bn\[0\].weight has 3 elements, expected 4"),
    (lambda: ek.multi_scale_dwconv(torch.randn(1, 4, 5, 5), [torch.randn(4, 1, 3, 3)], [_bn(4)],
                                   activation="swish"), "activation must be one of"),
    (lambda: ek.multi_scale_dwconv(torch.randn(1, 4, 5, 5), [torch.randn(4, 1, 3, 3, dtype=torch.float64)],
                                   [_bn(4)]), r"weights\[0\] has dtype torch.float64, expected torch.float32"),
    (lambda: ek.multi_scale_dwconv(torch.randn(1, 4, 5, 5), [torch.randn(4, 1, 3, 3, device="meta")], [_bn(4)]),
     r"weights\[0\] is on meta but the input is on cpu"),
    (lambda: ek.multi_scale_dwconv(torch.randn(1, 4, 5, 5), [torch.randn(4, 1, 3, 3)], [_bn(4)],
                                   shuffle_groups=3), "shuffle_groups must divide the 4 output channels"),
    (lambda: ek.multi_scale_dwconv(torch.randn(1, 4, 5, 5), [torch.randn(4, 1, 3, 3)], [_bn(4)], combine="max"),
     "combine must be"),
    (lambda: ek.multi_scale_dwconv(torch.randn(1, 4, 1, 1), [torch.randn(4, 1, 3, 3)], [_bn(4)], training=True),
     "more than 1 value per channel"),
    (lambda: ek.multi_scale_dwconv(torch.randint(0, 3, (1, 4, 5, 5)), [torch.randn(4, 1, 3, 3)], [_bn(4)]),
     "x must be float16, bfloat16, float32 or float64"),
    (lambda: ek.upsample_dwconv(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), _bn(4), mode="bicubic"),
     "mode must be 'nearest' or 'bilinear'"),
    (lambda: ek.upsample_dwconv(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), _bn(4), scale=0),
     "scale must be a positive int"),
    (lambda: ek.upsample_dwconv(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), _bn(4)[:3]),
     "bn must be BatchNormParams"),
    (lambda: ek.grouped_attention_gate(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 6, 5), torch.randn(2, 2, 3, 3),
                                       None, _bn(2), torch.randn(2, 2, 3, 3), None, _bn(2), torch.randn(1, 2, 1, 1),
                                       None, _bn(1), groups=2), "same batch and spatial size"),
    (lambda: ek.grouped_attention_gate(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5), torch.randn(2, 2, 3, 3),
                                       None, _bn(2), torch.randn(2, 2, 3, 3), None, _bn(2), torch.randn(1, 2, 1, 1),
                                       None, _bn(1), groups=3), "groups=3 must divide"),
    (lambda: ek.grouped_attention_gate(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5), torch.randn(2, 2, 3, 3),
                                       None, _bn(2), torch.randn(2, 2, 3, 3), None, _bn(2), torch.randn(1, 3, 1, 1),
                                       None, _bn(1), groups=2), r"wpsi must have shape \[1, 2, 1, 1\]"),
    (lambda: ek.grouped_attention_gate(torch.randn(1, 4, 5, 5), torch.randn(1, 6, 5, 5), torch.randn(2, 2, 3, 3),
                                       None, _bn(2), torch.randn(2, 3, 3, 3), None, _bn(2), torch.randn(1, 2, 1, 1),
                                       None, _bn(1), groups=2, add_gate_input=True), "add_gate_input needs g and x"),
])
def test_bad_input_gives_clear_error(make_call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_call()


def test_empty_batch_in_eval_mode():
    m = _make_msdc(4, (1, 3), dtype=torch.float32).eval()
    y = m.fused(torch.randn(0, 4, 5, 5), training=False)
    assert y.shape == (0, 4, 5, 5)


def test_explain_rejects_unknown_op():
    with pytest.raises(ValueError, match="op must be one of"):
        ek.explain("conv2d")


def test_auto_skip_backend_runs_only_when_requested():
    backends.register_backend(Backend("tests_only", priority=100, description="tests", devices=None,
                                      dtypes=backends.FLOAT_DTYPES, support="reference",
                                      auto_skip=lambda call: "demo: tests only"))
    try:
        x, ws, bns = _tiny_msdc_call()
        assert "-> tests_only" not in ek.explain("multi_scale_dwconv", x, ws, bns)
        assert "only when requested explicitly: demo: tests only" in ek.explain("multi_scale_dwconv", x, ws, bns)
        assert "-> tests_only" in ek.explain("multi_scale_dwconv", x, ws, bns, backend="tests_only")
        ek.multi_scale_dwconv(x, ws, bns, backend="tests_only")
    finally:
        backends.unregister_backend("tests_only")
