"""Degenerate inputs handled alike by every backend: empty batches (supported: empty results, empty gradients),
maps without channels or pixels and non-positive BatchNorm eps (refused with one clear error, before any backend
is chosen)."""

import pytest
import torch

import emcad
import emcad_kernels as ek
from emcad.losses import SegmentationLoss


def _kernel_backends():
    """reference, cpu and (under the interpreter) triton: the backends that run CPU tensors here."""
    names = ["reference"]
    for name in ("cpu", "triton"):
        backend = ek.backends.get_backend(name)
        if backend.unavailable_reason() is None and "cpu" in backend.devices:
            names.append(name)
    return names


BACKENDS = _kernel_backends()


def _bn(c):
    gen = torch.Generator().manual_seed(c)
    return ek.BatchNormParams(torch.rand(c, generator=gen).add(0.5).requires_grad_(),
                              torch.randn(c, generator=gen).requires_grad_(), torch.zeros(c), torch.ones(c))


def _leaf(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _op_calls(n, c, h, w):
    """One call per op on a (n, c, h, w) input: name -> fn(x, backend, training, eps) returning the output and the
    differentiable inputs."""
    f = 2

    def msdc(x, backend, training, eps):
        ws = [_leaf(c, 1, k, k, seed=k) for k in (1, 3, 5)]
        bns = [_bn(c) for _ in ws]
        y = ek.multi_scale_dwconv(x, ws, bns, backend=backend, training=training, eps=eps)
        return y, [x, *ws, *(b.weight for b in bns)]

    def updw(x, backend, training, eps):
        w, bn = _leaf(c, 1, 3, 3), _bn(c)
        return ek.upsample_dwconv(x, w, bn, backend=backend, training=training, eps=eps), [x, w, bn.weight]

    def lgag(x, backend, training, eps):
        g = _leaf(*x.shape, seed=5)
        wg, wx, wpsi = _leaf(f, max(c, 1), 3, 3, seed=1), _leaf(f, max(c, 1), 3, 3, seed=2), _leaf(1, f, 1, 1)
        y = ek.grouped_attention_gate(g, x, wg, None, _bn(f), wx, None, _bn(f), wpsi, None, _bn(1), groups=1,
                                      backend=backend, training=training, eps=eps)
        return y, [x, g, wg, wx, wpsi]

    def mscam(x, backend, training, eps):
        fc1, fc2, sab = _leaf(1, c, 1, 1), _leaf(c, 1, 1, 1, seed=1), _leaf(1, 2, 7, 7, seed=2)
        return ek.mscam(x, fc1, fc2, sab, backend=backend), [x, fc1, fc2, sab]

    def lndw(x, backend, training, eps):
        w = _leaf(c, 1, 3, 3)
        y = ek.layernorm_dilated_dwconv(x, None, None, [w], None, dilations=[2], eps=eps, backend=backend)
        return y, [x, w]

    def dwgn(x, backend, training, eps):
        w = _leaf(c, 1, 3, 3)
        y = ek.dilated_dwconv_groupnorm(x, [w], None, None, None, dilations=[2], eps=eps, backend=backend)
        return y, [x, w]

    return {"msdc": msdc, "updw": updw, "lgag": lgag, "mscam": mscam, "lndw": lndw, "dwgn": dwgn}


OPS = list(_op_calls(1, 1, 1, 1))


def _run(op, shape, backend, training=False, eps=1e-5):
    x = _leaf(*shape, seed=9)
    y, inputs = _op_calls(*shape)[op](x, backend, training, eps)
    grads = torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)
    return y, grads


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(2, 0, 8, 8), (2, 4, 0, 8), (2, 4, 8, 0)], ids=["C=0", "H=0", "W=0"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_maps_without_channels_or_pixels_are_refused_by_every_backend(op, shape, training):
    """The cpu kernels used to return empty results where the reference (PyTorch convs) raised."""
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"must have at least one channel and a non-empty height and width "
                                             r"\(only the batch may be 0\)"):
            _run(op, shape, backend, training)


@pytest.mark.parametrize("op", OPS)
def test_empty_batch_forward_and_backward_agree(op):
    ref_y, ref_grads = _run(op, (0, 4, 8, 8), "reference")
    assert ref_y.shape[0] == 0
    for backend in BACKENDS[1:]:
        y, grads = _run(op, (0, 4, 8, 8), backend)
        assert y.shape == ref_y.shape, backend
        for a, b in zip(grads, ref_grads):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b), backend


@pytest.mark.parametrize("op", ["msdc", "updw", "lgag", "lndw", "dwgn"])
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_non_positive_norm_eps_is_refused(op, eps):
    """Every op with a normalisation eps (BatchNorm: msdc, updw, lgag; LayerNorm / GroupNorm: the multi-dilation
    ops); mscam has none. msdc, updw and lgag accepted 0, negative and NaN before."""
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="eps must be a positive float"):
            _run(op, (2, 4, 8, 8), backend, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mutation_loss_of_an_empty_batch_is_nan_like_the_plain_loss(backend):
    """CE is a mean over the pixels: over none it is NaN (F.cross_entropy, the plain SegmentationLoss); the fused
    loss used to raise ZeroDivisionError. Backward still works and gives empty gradients."""
    heads = [torch.randn(0, 3, s, s, requires_grad=True) for s in (2, 4, 8, 16)]
    target = torch.zeros(0, 64, 64, dtype=torch.long)
    plain = SegmentationLoss(3, fused=False)(heads, target)
    fused = ek.mutation_loss(heads, target, backend=backend)
    assert torch.isnan(plain) and torch.isnan(fused)
    grads = torch.autograd.grad(fused, heads)
    assert [g.shape for g in grads] == [h.shape for h in heads]
    with ek.use_backend(backend):
        loss = SegmentationLoss(3)
        assert torch.isnan(loss(heads, target)) and loss.last_path == "fused"


@pytest.mark.parametrize("heads, target", [
    ([(2, 0, 4, 4)], (2, 8, 8)),
    ([(2, 3, 0, 4)], (2, 8, 8)),
    ([(2, 3, 4, 4), (2, 3, 4, 0)], (2, 8, 8)),
    ([(2, 3, 4, 4)], (2, 0, 8)),
], ids=["K=0", "head H=0", "second head W=0", "target H=0"])
def test_mutation_stats_without_classes_or_pixels_are_refused_by_every_backend(heads, target):
    logits = [torch.randn(shape, requires_grad=True) for shape in heads]
    labels = torch.zeros(target, dtype=torch.long)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"at least 2 classes|empty spatial size"):
            ek.mutation_loss(logits, labels, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "auto", *BACKENDS])
def test_emcad_b0_empty_batch_in_eval(backend):
    """Every head comes back empty with the right shape (the PVT encoder used to fail reshaping an empty batch)."""
    model = emcad.create_model("emcad_b0", num_classes=3, backend=backend).eval()
    x = torch.randn(0, 3, 64, 64)
    with torch.no_grad():
        assert [tuple(p.shape) for p in model(x)] == [(0, 3, 64, 64)] * 4
        assert [tuple(p.shape) for p in model(x, heads="last")] == [(0, 3, 64, 64)]
        assert [tuple(p.shape) for p in model(x, heads="lowres")] == [(0, 3, 2, 2), (0, 3, 4, 4), (0, 3, 8, 8),
                                                                      (0, 3, 16, 16)]
