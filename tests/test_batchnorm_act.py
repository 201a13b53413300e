"""batch_norm_act: equal to nn.BatchNorm2d + activation in training mode, saving only its input."""

import pytest
import torch
import torch.nn as nn

from emcad.models.blocks import make_activation
from emcad_kernels.batchnorm_act import ACTIVATIONS, batch_norm_act

ACTS = [a for a in ACTIVATIONS if a != "identity"]


def _plain(c, act, dtype, affine=True, momentum=0.1):
    bn = nn.BatchNorm2d(c, affine=affine, momentum=momentum).to(dtype)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn, make_activation(act)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_modules(act, channels_last, affine):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64) * 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    bn, f = _plain(5, act, torch.float64, affine)
    bn2, _ = _plain(5, act, torch.float64, affine)
    bn2.load_state_dict(bn.state_dict())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = f(bn(x1))
    y2 = batch_norm_act(x2, bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, 0.1, bn2.eps, act)
    assert y2.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn2.running_mean, bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn2.running_var, bn.running_var, rtol=0, atol=0)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-10)
    if affine:
        torch.testing.assert_close(bn2.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bn2.bias.grad, bn.bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_modules(dtype):
    torch.manual_seed(1)
    x = torch.randn(4, 8, 9, 9).to(dtype)
    bn, f = _plain(8, "relu6", torch.float32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    y1 = f(bn(x1))
    y2 = batch_norm_act(x2, w, b, None, None, 0.1, bn.eps, "relu6")
    torch.testing.assert_close(y2, y1)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(w.grad, bn.weight.grad)


@pytest.mark.parametrize("act", ["relu6", "gelu", "hswish"])
def test_gradcheck(act):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: batch_norm_act(x, w, b, None, None, 0.1, 1e-5, act), (x, w, b))


def test_saves_only_the_input_and_statistics():
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        batch_norm_act(x, w, b, None, None, 0.1, 1e-5, "relu6")
    big = [t for t in saved if t.numel() > 16]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


def test_bad_input():
    with pytest.raises(ValueError, match="activation must be one of"):
        batch_norm_act(torch.randn(2, 3, 4, 4), None, None, None, None, 0.1, 1e-5, "swish")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act(torch.randn(1, 3, 1, 1), None, None, None, None, 0.1, 1e-5, "relu")
