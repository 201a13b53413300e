"""Training-mode BatchNorm + activation that keeps only its input for backward.

``nn.Sequential(BatchNorm2d, ReLU6)`` saves two full tensors for backward: the BN input (for the BN backward)
and the BN output (for the activation backward). :func:`batch_norm_act` saves only the BN input and the
per-channel statistics and recomputes the normalised values in backward, one cheap elementwise pass. In
EMCAD's MSCB this is ``pconv1``'s BN + activation, whose output is kept anyway by the MSDC op that follows:
the decoder then saves one expanded-channel tensor per MSCB fewer.

The forward is ``torch.ops.aten.native_batch_norm`` (what ``F.batch_norm`` runs on CPU and CUDA, including the
running-statistics update) followed by the activation in place, so outputs and running statistics are those of
the plain modules. Pure PyTorch: every device, dtype and memory format that ``native_batch_norm`` supports.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# activation name -> in-place forward (returns its argument; gelu computes out of place and copies back)
INPLACE_ACTIVATIONS = {
    "relu": torch.relu_,
    "relu6": lambda y: y.clamp_(0.0, 6.0),
    "leakyrelu": lambda y: F.leaky_relu_(y, 0.2),
    "gelu": lambda y: y.copy_(F.gelu(y)),
    "hswish": lambda y: F.hardswish(y, inplace=True),
    "identity": lambda y: y,
}
# activation name -> backward given (grad of the output, activation input)
_ACT_BACKWARD = {
    "relu": lambda g, z: torch.ops.aten.threshold_backward(g, z, 0),
    "relu6": lambda g, z: torch.ops.aten.hardtanh_backward(g, z, 0.0, 6.0),
    "leakyrelu": lambda g, z: torch.ops.aten.leaky_relu_backward(g, z, 0.2, False),
    "gelu": lambda g, z: torch.ops.aten.gelu_backward(g, z),
    "hswish": lambda g, z: torch.ops.aten.hardswish_backward(g, z),
    "identity": lambda g, z: g,
}
ACTIVATIONS = tuple(INPLACE_ACTIVATIONS)


class _BatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, activation):
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                           momentum, eps)
        INPLACE_ACTIVATIONS[activation](y)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps, ctx.activation = eps, activation
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        # the activation input, recomputed like native_batch_norm computes it: in the statistics' dtype
        # (fp32 for half inputs), rounded to the input's dtype
        z = torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)
        gz = _ACT_BACKWARD[ctx.activation](grad.contiguous(memory_format=_memory_format(x)), z)
        needs = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(gz, x, weight, None, None, mean, invstd, True,
                                                               ctx.eps, needs)
        return gx, gw, gb, None, None, None, None, None


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def batch_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], momentum: float, eps: float, activation: str) -> Tensor:
    """``act(F.batch_norm(x, ..., training=True, momentum, eps))`` saving only ``x`` and per-channel statistics.

    ``momentum`` is the exponential-average factor of the running statistics (``nn.BatchNorm2d`` passes
    ``momentum``, or ``1 / num_batches_tracked`` when its momentum is None); running statistics may be None.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor with a channel dimension (N, C, ...), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if activation not in INPLACE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.shape[1] > 0 and x.numel() // x.shape[1] <= 1:
        raise ValueError(f"x: training-mode BatchNorm needs more than 1 value per channel, got shape "
                         f"{tuple(x.shape)}")
    return _BatchNormAct.apply(x, weight, bias, running_mean, running_var, float(momentum), float(eps), activation)
