"""EMCAD decoder blocks: shapes, key names, parameter counts, init, and fused (emcad_kernels) vs ``backend="torch"``.

The fused/torch comparisons check outputs, input gradients, parameter gradients and every buffer (running
statistics, num_batches_tracked) after training steps, in float64 (tight) and float32, NCHW and channels_last.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import emcad_kernels
from emcad.models import CAB, EUCB, LGAG, MSCB, MSDC, SAB, MSCBLayer, channel_shuffle, set_backend
from emcad.models.blocks import valid_backends


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: these small problems gain nothing from two, and OpenMP barriers under a loaded
    2-core machine (float64 grouped convs run one small conv per group) slow them down by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=1e-5)}
# gradients (long reductions) are compared relative to the tensor's largest magnitude
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def assert_close_scaled(actual, expected, dtype, name=""):
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= GRAD_TOL[dtype] * scale, f"{name}: max abs error {err:.3g} > {GRAD_TOL[dtype]:.1g} x {scale:.3g}"


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights and BN state, so that clamps, BN affine and running statistics all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.5 / math.sqrt(fan_in)))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(3)
    return module


class CallCounter:
    """Counts calls of the emcad_kernels functionals made by the blocks."""

    NAMES = ("multi_scale_dwconv", "upsample_dwconv", "grouped_attention_gate")

    def __init__(self, monkeypatch):
        self.counts = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            original = getattr(emcad_kernels, name)

            def wrapper(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(emcad_kernels, name, wrapper)


def _flat(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def compare_fused(make, make_inputs, *, dtype, train, channels_last=False, steps=2, call=None, backend="auto",
                  momentum="default"):
    """Runs a torch-backend copy and a fused copy side by side for ``steps`` steps and compares everything."""
    call = call or (lambda m, *xs: m(*xs))
    torch.manual_seed(0)
    ref = randomize(make()).to(dtype)
    if momentum != "default":
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum(m) if callable(momentum) else momentum
    fused = copy.deepcopy(ref)
    set_backend(ref, "torch")
    set_backend(fused, backend)
    ref.train(train)
    fused.train(train)
    tol = TOL[dtype]
    for step in range(steps):
        torch.manual_seed(100 + step)
        inputs = [x.to(dtype) for x in make_inputs()]
        if channels_last:
            inputs = [x.to(memory_format=torch.channels_last) for x in inputs]
        xa = [x.clone().requires_grad_() for x in inputs]
        xb = [x.clone().requires_grad_() for x in inputs]
        ya, yb = _flat(call(ref, *xa)), _flat(call(fused, *xb))
        assert len(ya) == len(yb)
        for a, b in zip(ya, yb):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(b, a, **tol)
        if channels_last:
            assert all(b.is_contiguous(memory_format=torch.channels_last) for b in yb)
        grads = [torch.randn_like(a) for a in ya]
        torch.autograd.backward(ya, grads)
        torch.autograd.backward(yb, grads)
        for i, (a, b) in enumerate(zip(xa, xb)):
            assert_close_scaled(b.grad, a.grad, dtype, f"input {i} grad")
        pa, pb = dict(ref.named_parameters()), dict(fused.named_parameters())
        for name in pa:
            assert (pa[name].grad is None) == (pb[name].grad is None), name
            if pa[name].grad is not None:
                assert_close_scaled(pb[name].grad, pa[name].grad, dtype, f"{name}.grad")
        ba, bb = dict(ref.named_buffers()), dict(fused.named_buffers())
        assert ba.keys() == bb.keys()
        for name in ba:
            if ba[name].dtype == torch.int64:
                assert torch.equal(ba[name], bb[name]), name
            else:
                torch.testing.assert_close(bb[name], ba[name], **tol, msg=lambda m: f"{name}: {m}")
        ref.zero_grad()
        fused.zero_grad()
    if train:
        nbt = [m.num_batches_tracked.item() for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(v == 3 + steps for v in nbt)
    return ref, fused


# --------------------------------------------------------------------------------------------------
# cases: (constructor, inputs, call)
# --------------------------------------------------------------------------------------------------
B, C, H = 2, 8, 6


def _x(c=C, h=H):
    return lambda: [torch.randn(B, c, h, h) * 2.0]


CASES = {
    "msdc": (lambda: MSDC(C, [1, 3, 5], 1, "relu6"), _x(), None),
    "mscb_add": (lambda: MSCB(C, C, 1, [1, 3, 5], 2, True, True, "relu6"), _x(), None),
    "mscb_concat": (lambda: MSCB(C, C, 1, [1, 3, 5], 2, True, False, "relu6"), _x(), None),
    "mscb_conv1x1_ef3": (lambda: MSCB(C, 12, 1, [3, 5], 3, True, True, "relu6"), _x(), None),
    "mscb_stride2": (lambda: MSCB(C, C, 2, [1, 3, 5], 2, True, True, "relu"), _x(), None),
    "mscb_series": (lambda: MSCB(C, C, 1, [1, 3, 5], 2, False, True, "relu6"), _x(), None),
    "mscblayer_n2": (lambda: MSCBLayer(C, 6, n=2, kernel_sizes=[1, 3, 5]), _x(), None),
    "eucb": (lambda: EUCB(C, 6), _x(h=4), None),
    "lgag": (lambda: LGAG(C, C, C // 2, 3, C // 2), lambda: [torch.randn(B, C, H, H), torch.randn(B, C, H, H)],
             None),
    "lgag_aggregate": (lambda: LGAG(C, C, C // 2, 3, C // 2),
                       lambda: [torch.randn(B, C, H, H), torch.randn(B, C, H, H)],
                       lambda m, g, x: m(g, x, aggregate=True)),
    "cab": (lambda: CAB(32), _x(c=32), None),
    "sab": (lambda: SAB(7), _x(), None),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_torch(case, train, dtype, channels_last):
    make, inputs, call = CASES[case]
    compare_fused(make, inputs, dtype=dtype, train=train, channels_last=channels_last, call=call)


@pytest.mark.parametrize("case", ["msdc", "mscb_add", "eucb", "lgag_aggregate"])
def test_fused_matches_torch_momentum_none(case):
    """momentum=None: cumulative average with factor 1/num_batches_tracked, as nn.BatchNorm2d."""
    make, inputs, call = CASES[case]
    compare_fused(make, inputs, dtype=torch.float64, train=True, call=call, steps=3, momentum=None)


@pytest.mark.parametrize("case", ["msdc", "mscb_add", "lgag_aggregate"])
def test_fused_matches_torch_mixed_momentum(case):
    """BNs of one fused call with different exponential-average factors (one with momentum=None)."""
    make, inputs, call = CASES[case]
    counter = iter(range(1000))
    compare_fused(make, inputs, dtype=torch.float64, train=True, call=call, steps=3,
                  momentum=lambda m: None if next(counter) % 2 else 0.3)


def test_fused_explicit_reference_backend():
    make, inputs, call = CASES["mscb_add"]
    compare_fused(make, inputs, dtype=torch.float64, train=True, backend="reference")


def test_mixed_bn_modes_fall_back_to_torch(monkeypatch):
    """A block whose BNs disagree in train/eval mode runs the torch composition (same result as torch)."""
    counter = CallCounter(monkeypatch)
    make, inputs, _ = CASES["mscb_add"]

    def frozen():
        m = make()
        m.msdc.dwconvs[1][1].eval()
        return m

    ref = randomize(frozen()).double()
    fused = copy.deepcopy(ref)
    set_backend(ref, "torch")
    x = inputs()[0].double()
    torch.testing.assert_close(fused(x), ref(x), **TOL[torch.float64])
    assert counter.counts["multi_scale_dwconv"] == 0
    assert fused.msdc.dwconvs[1][1].num_batches_tracked.item() == 3  # frozen (eval) BN
    assert fused.msdc.dwconvs[0][1].num_batches_tracked.item() == 4


@pytest.mark.parametrize("case,expected", [
    ("mscb_add", {"multi_scale_dwconv": 1}),
    ("mscb_concat", {"multi_scale_dwconv": 1}),
    ("msdc", {"multi_scale_dwconv": 1}),
    ("mscb_series", {}),
    ("eucb", {"upsample_dwconv": 1}),
    ("lgag", {"grouped_attention_gate": 1}),
    ("lgag_aggregate", {"grouped_attention_gate": 1}),
    ("cab", {}),
])
def test_fused_ops_are_called(monkeypatch, case, expected):
    counter = CallCounter(monkeypatch)
    make, inputs, call = CASES[case]
    call = call or (lambda m, *xs: m(*xs))
    block = make().eval()
    call(block, *inputs())
    assert counter.counts == {**dict.fromkeys(CallCounter.NAMES, 0), **expected}
    set_backend(block, "torch")
    counter.counts = dict.fromkeys(CallCounter.NAMES, 0)
    call(block, *inputs())
    assert sum(counter.counts.values()) == 0


def test_torch_backend_calls_submodules_with_hooks():
    block = MSCB(C, C, 1).eval()
    set_backend(block, "torch")
    seen = []
    for name, m in block.named_modules():
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.append(name))
    block(torch.randn(B, C, H, H))
    for name in ("pconv1.0", "pconv1.1", "pconv1.2", "msdc", "msdc.dwconvs.0.0", "msdc.dwconvs.2.1", "pconv2.1"):
        assert name in seen


def test_set_backend():
    block = MSCBLayer(C, C, n=2)
    assert all(m.backend == "auto" for m in block.modules() if hasattr(m, "backend"))
    set_backend(block, "torch")
    assert block.backend == "torch" and block[1].msdc.backend == "torch"
    block.set_backend("reference")
    assert block[0].msdc.backend == "reference"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        set_backend(block, "nope")
    assert {"torch", "auto", "reference"} <= set(valid_backends())


# --------------------------------------------------------------------------------------------------
# shapes, keys, parameter counts, init
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_block_shapes(backend):
    x = torch.randn(B, C, H, H)
    msdc = set_backend(MSDC(C, [1, 3, 5], 1), backend)
    outs = msdc(x)
    assert isinstance(outs, list) and [o.shape for o in outs] == [x.shape] * 3
    assert set_backend(MSCB(C, C, 1), backend)(x).shape == x.shape
    assert set_backend(MSCB(C, 12, 1), backend)(x).shape == (B, 12, H, H)
    assert set_backend(MSCB(C, 12, 2), backend)(x).shape == (B, 12, H // 2, H // 2)
    assert set_backend(MSCBLayer(C, 12, n=3, stride=2), backend)(x).shape == (B, 12, H // 2, H // 2)
    assert set_backend(CAB(C), backend)(x).shape == (B, C, 1, 1)
    assert set_backend(SAB(7), backend)(x).shape == (B, 1, H, H)
    assert set_backend(LGAG(C, C, C // 2, 3, C // 2), backend)(x, x).shape == x.shape
    assert set_backend(LGAG(C, C, C // 2, 1, C // 2), backend)(x, x).shape == x.shape
    assert set_backend(EUCB(C, 5), backend)(x).shape == (B, 5, 2 * H, 2 * H)


def test_mscb_keys_and_count():
    m = MSCB(64, 64, 1)
    keys = list(m.state_dict())
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = (["pconv1.0.weight"] + [f"pconv1.1.{s}" for s in bn]
                + [k for i in range(3)
                   for k in [f"msdc.dwconvs.{i}.0.weight"] + [f"msdc.dwconvs.{i}.1.{s}" for s in bn]]
                + ["pconv2.0.weight"] + [f"pconv2.1.{s}" for s in bn])
    assert keys == expected
    assert not hasattr(m, "conv1x1")
    assert hasattr(MSCB(64, 32, 1), "conv1x1") and not hasattr(MSCB(64, 32, 2), "conv1x1")
    for c in (32, 64, 160, 512):
        assert n_params(MSCB(c, c, 1)) == 4 * c * c + 88 * c
    # general closed form (docs/models.md#parameter-counts): 2·ef·C² + ef·C·(2 + Σk² + 2·n_K) + 2C
    c, ef, ks = 32, 6, [1, 3, 5, 7]
    expected = 2 * ef * c * c + ef * c * (2 + sum(k * k for k in ks) + 2 * len(ks)) + 2 * c
    assert n_params(MSCB(c, c, 1, ks, ef)) == expected


def test_eucb_lgag_cab_sab_keys_and_counts():
    eucb = EUCB(512, 320)
    assert [(k, tuple(v.shape)) for k, v in eucb.state_dict().items()] == [
        ("up_dwc.1.weight", (512, 1, 3, 3)), ("up_dwc.2.weight", (512,)), ("up_dwc.2.bias", (512,)),
        ("up_dwc.2.running_mean", (512,)), ("up_dwc.2.running_var", (512,)), ("up_dwc.2.num_batches_tracked", ()),
        ("pwc.0.weight", (320, 512, 1, 1)), ("pwc.0.bias", (320,))]
    assert isinstance(eucb.up_dwc[0], nn.Upsample) and eucb.up_dwc[0].mode == "nearest"
    assert n_params(eucb) == 512 * 320 + 11 * 512 + 320 == 169_792
    lgag = LGAG(320, 320, 160, 3, 160)
    keys = list(lgag.state_dict())
    assert keys[:2] == ["W_g.0.weight", "W_g.0.bias"] and keys[7:9] == ["W_x.0.weight", "W_x.0.bias"]
    assert keys[14:] == ["psi.0.weight", "psi.0.bias", "psi.1.weight", "psi.1.bias", "psi.1.running_mean",
                         "psi.1.running_var", "psi.1.num_batches_tracked"]
    assert lgag.W_g[0].weight.shape == (160, 2, 3, 3) and lgag.psi[0].weight.shape == (1, 160, 1, 1)
    for c in (32, 64, 128, 320):
        assert n_params(LGAG(c, c, c // 2, 3, c // 2)) == 21.5 * c + 3
    assert LGAG(8, 8, 4, kernel_size=1, groups=4).groups == 1
    for c, m in ((512, 32), (320, 20), (64, 4), (8, 1)):
        cab = CAB(c)
        assert list(cab.state_dict()) == ["fc1.weight", "fc2.weight"]
        assert cab.fc1.weight.shape == (m, c, 1, 1) and n_params(cab) == 2 * c * (c // min(16, c))
    for name in ("avg_pool", "max_pool", "sigmoid", "activation"):
        assert sum(p.numel() for p in getattr(CAB(64), name).parameters()) == 0
    sab = SAB(7)
    assert list(sab.state_dict()) == ["conv.weight"] and n_params(sab) == 98
    with pytest.raises(ValueError, match="kernel_size"):
        SAB(5)


def test_init():
    torch.manual_seed(0)
    m = MSCB(256, 256, 1)
    w = m.pconv1[0].weight
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    lgag = LGAG(64, 64, 32, 3, 32)
    eucb = EUCB(64, 32)
    for mod in (m, lgag, eucb, CAB(64), SAB()):
        for sub in mod.modules():
            if isinstance(sub, nn.Conv2d) and sub.bias is not None:
                assert torch.count_nonzero(sub.bias) == 0
            if isinstance(sub, nn.BatchNorm2d):
                assert torch.all(sub.weight == 1) and torch.all(sub.bias == 0)


def test_activations():
    assert isinstance(MSCB(8, 8, 1, activation="relu6").pconv1[2], nn.ReLU6)
    assert isinstance(MSCB(8, 8, 1, activation="leakyrelu").msdc.dwconvs[0][2], nn.LeakyReLU)
    with pytest.raises(ValueError, match="unknown activation 'prelu'"):
        MSCB(8, 8, 1, activation="prelu")
    x = torch.randn(2, 8, 4, 4)
    for act in ("relu", "relu6", "leakyrelu", "gelu", "hswish"):
        m = MSCB(8, 8, 1, activation=act).eval()
        randomize(m)
        ref = copy.deepcopy(m)
        set_backend(ref, "torch")
        torch.testing.assert_close(m(x), ref(x))


def test_channel_shuffle():
    n, g = 12, 3
    x = torch.arange(n, dtype=torch.float32).view(1, n, 1, 1)
    y = channel_shuffle(x, g).flatten().long().tolist()
    assert y == [(o % g) * (n // g) + o // g for o in range(n)]
    assert torch.equal(channel_shuffle(x, n), x)
    c = 4  # ef = 2: even channels first, then odd
    x = torch.arange(2 * c, dtype=torch.float32).view(1, 2 * c, 1, 1)
    assert channel_shuffle(x, c).flatten().long().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


# --------------------------------------------------------------------------------------------------
# eval-mode pointwise folding: BN folded into the 1×1 weights, shuffle into pconv2's columns
# --------------------------------------------------------------------------------------------------
from emcad.models import blocks as _blocks  # noqa: E402


def test_shuffle_permutation_folds_into_weight_columns():
    """``W' @ d == W @ channel_shuffle(d)`` with ``W'[:, perm[o]] = W[:, o]`` (same math, summation order
    aside), and the permutation is exactly channel_shuffle's."""
    torch.manual_seed(0)
    for c, g in ((8, 4), (12, 3), (16, 8), (6, 6)):
        d = torch.randn(2, c, 3, 3, dtype=torch.float64)
        perm = _blocks.shuffle_permutation(c, g)
        assert torch.equal(channel_shuffle(d, g), d[:, perm])
        conv = nn.Conv2d(c, 5, 1, bias=False).double()
        w, _ = _blocks._FoldedPointwise.compute(conv, None, torch.float64, shuffle_groups=g)
        torch.testing.assert_close(_blocks.pointwise_conv(d, w, None), conv(channel_shuffle(d, g)),
                                   atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_msdc_without_shuffle_and_permuted_weights_is_the_same_math(backend):
    """pconv2(multi_scale_dwconv(shuffle_groups=g)) == pconv2'(multi_scale_dwconv(no shuffle)): the shuffle only
    permutes channels, so the msdc outputs are the same values, and the permuted columns undo the permutation."""
    msdc = randomize(MSDC(16, [1, 3, 5], 1)).eval().double()
    conv = randomize(nn.Conv2d(16, 8, 1, bias=False)).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        shuffled = msdc.combined(x, True, 8, backend=backend)
        plain = msdc.combined(x, True, None, backend=backend)
        assert torch.equal(shuffled, plain[:, _blocks.shuffle_permutation(16, 8)])  # bitwise: a permutation
        w, _ = _blocks._FoldedPointwise.compute(conv, None, torch.float64, shuffle_groups=8)
        torch.testing.assert_close(_blocks.pointwise_conv(plain, w, None), conv(shuffled), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("size", [6, 16], ids=["small", "hw256"])  # both pointwise_conv branches per layout
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", ["mscb_add", "mscb_concat", "mscb_conv1x1_ef3", "mscb_stride2", "mscblayer_n2",
                                  "eucb"])
def test_folded_inference_matches_torch(case, channels_last, size):
    """no_grad eval (the cached folded path) against the torch composition."""
    make, _, _ = CASES[case]
    ref = randomize(make()).eval()
    fused = copy.deepcopy(ref)
    set_backend(ref, "torch")
    x = torch.randn(B, C, size // 2 if case == "eucb" else size, size // 2 if case == "eucb" else size) * 2.0
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):  # second call: from the cache
            a, b = ref(x), fused(x)
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
            if channels_last:
                assert b.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), ref(x), atol=2e-5, rtol=1e-5)


def _fold_counter(monkeypatch):
    counts = [0]
    original = _blocks._FoldedPointwise.compute

    def counting(*args, **kwargs):
        counts[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(_blocks._FoldedPointwise, "compute", staticmethod(counting))
    return counts


def test_fold_cache_hits_and_invalidation(monkeypatch):
    """The folded weights are computed once, then follow in-place weight and buffer changes, load_state_dict,
    dtype changes, BN statistics updated by a training step, and an eps change."""
    counts = _fold_counter(monkeypatch)
    make, inputs, _ = CASES["mscb_add"]
    fused = randomize(make()).eval()
    ref = copy.deepcopy(fused)
    set_backend(ref, "torch")
    x = inputs()[0]

    def check(dtype=torch.float32):
        with torch.no_grad():
            tol = TOL[dtype] if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(fused(x.to(dtype)), ref(x.to(dtype)), **tol)

    check()
    assert counts[0] == 2  # pconv1, pconv2
    check()
    check()
    assert counts[0] == 2  # cache hits
    for mutate in (lambda m: m.pconv1[0].weight.mul_(1.5),           # conv weight in place (optimizer step)
                   lambda m: m.pconv2[1].weight.add_(0.25),          # BN affine
                   lambda m: m.pconv1[1].running_var.mul_(2.0),      # BN buffer
                   lambda m: m.pconv2[1].running_mean.add_(0.1)):
        with torch.no_grad():
            mutate(fused)
            mutate(ref)
        before = counts[0]
        check()
        assert counts[0] == before + 1
    # load_state_dict (copy_ into the existing tensors)
    other = randomize(make(), seed=7).eval()
    fused.load_state_dict(other.state_dict())
    ref.load_state_dict(other.state_dict())
    check()
    # .to(dtype) and back: new storage each time
    fused.double()
    ref.double()
    check(torch.float64)
    fused.float()
    ref.float()
    check()
    # a training step changes the running statistics (inside batch_norm, without a version bump), then eval
    fused.train()
    ref.train()
    with torch.no_grad():
        fused(x)
        ref(x)
    fused.eval()
    ref.eval()
    check()
    # eps is part of the key
    fused.pconv1[1].eps = ref.pconv1[1].eps = 0.5
    check()


def test_fold_gradients_in_eval_mode():
    """Eval mode with gradients on: the fold is recomputed differentiably (conv and BN affine get gradients),
    nothing stale is cached across a weight update."""
    compare_fused(CASES["mscb_add"][0], CASES["mscb_add"][1], dtype=torch.float64, train=False, steps=1)
    make, inputs, _ = CASES["mscb_add"]
    fused = randomize(make()).eval().double()
    ref = copy.deepcopy(fused)
    set_backend(ref, "torch")
    x = inputs()[0].double()
    for _ in range(2):
        for m in (fused, ref):
            m.zero_grad()
            m(x).square().sum().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(0.1 * p.grad)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x), **TOL[torch.float64])


def test_fold_switch_and_torch_backend_untouched(monkeypatch):
    counts = _fold_counter(monkeypatch)
    make, inputs, _ = CASES["mscb_add"]
    m = randomize(make()).eval()
    x = inputs()[0]
    with torch.no_grad():
        set_backend(m, "torch")
        m(x)
        assert counts[0] == 0
        set_backend(m, "auto")
        monkeypatch.setattr(_blocks, "FOLD_EVAL_POINTWISE", False)
        m(x)
        assert counts[0] == 0
        m.train()
        monkeypatch.setattr(_blocks, "FOLD_EVAL_POINTWISE", True)
        m(x)
        assert counts[0] == 0  # training mode: batch statistics, nothing to fold


def test_fold_cache_follows_module_training_and_clear(monkeypatch):
    """Running statistics change inside batch_norm without a version bump: a training-mode module forward is
    caught through num_batches_tracked; an update outside the module needs clear_fold_caches."""
    make, inputs, _ = CASES["mscb_add"]
    fused = randomize(make()).eval()
    ref = copy.deepcopy(fused)
    set_backend(ref, "torch")
    x = inputs()[0]
    with torch.no_grad():
        fused(x)
        for m in (fused, ref):
            m.pconv1[1].train()
            m.pconv1(x)  # only the pconv1 BN in training mode, called directly
            m.pconv1[1].eval()
        torch.testing.assert_close(fused(x), ref(x), atol=2e-5, rtol=1e-5)
        batch = torch.randn(4, fused.pconv2[1].num_features, 3, 3)
        for m in (fused, ref):  # F.batch_norm outside the module: no version bump, no num_batches_tracked
            bn = m.pconv2[1]
            nn.functional.batch_norm(batch, bn.running_mean, bn.running_var, training=True, momentum=0.5)
        assert not torch.allclose(fused(x), ref(x), atol=1e-3)  # stale, as documented
        _blocks.clear_fold_caches(fused)
        torch.testing.assert_close(fused(x), ref(x), atol=2e-5, rtol=1e-5)


def test_fold_frozen_parameters_input_gradient():
    """Frozen parameters (cached folds, no grad_fn), input requiring grad: the input gradient is still right,
    also when the cache was filled under inference_mode (a separate key: inference tensors cannot be saved)."""
    make, inputs, _ = CASES["mscb_add"]
    fused = randomize(make()).eval().double().requires_grad_(False)
    ref = copy.deepcopy(fused)
    set_backend(ref, "torch")
    x = inputs()[0].double()
    with torch.inference_mode():
        fused(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xa).square().sum().backward()
    fused(xb).square().sum().backward()
    assert_close_scaled(xb.grad, xa.grad, torch.float64, "input grad")
