"""``token_dwconv_gelu``: the middle of PVTv2's Mix-FFN, depthwise 3×3 conv + bias + GELU, computed directly on the
token layout ``(B, H·W, C)`` (docs/kernels.md#token-depthwise-conv-and-gelu).

The plain module turns the tokens into an NCHW map (a transposing copy), convolves, turns the result back into
tokens (another copy) and applies GELU (a third pass). The tokens are the map in channels_last order already, so
the fused kernels read them in place, vectorised over the contiguous channels, and write GELU's output once.

Read top to bottom: the public function, its argument checks, the op descriptor. Kernels:
``reference.token_dwconv_gelu_forward/backward``, ``csrc/cpu/token_dwconv_gelu.cpp``,
``triton/token_dwconv_gelu.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import flops, reference
from ..backends import register_op, run
from ..descriptor import Call, OpDescriptor, Support
from ..testing import ExampleInputs
from ._args import FLOAT_DTYPES, check_like, check_tensor

KERNEL_SIZE = 3


def token_dwconv_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor], size: Sequence[int], *,
                      backend: Optional[str] = None) -> Tensor:
    """``GELU(dwconv3×3(x) + bias)`` on tokens: PVTv2's ``dwconv`` + ``act`` of the Mix-FFN, fused.

    ``x`` is ``(B, H·W, C)`` (token ``h·W + w`` is pixel ``(h, w)``; what ``nn.Linear`` returns), ``size`` is
    ``(H, W)``, ``weight`` the depthwise kernel ``[C, 1, 3, 3]`` (zero padding 1, stride 1), ``bias`` ``[C]`` or
    None. GELU is the exact (erf) one. Returns contiguous ``(B, H·W, C)`` tokens; differentiable in ``x``,
    ``weight`` and ``bias``. Equal to ``F.gelu(conv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2)
    .transpose(1, 2))`` with ``conv = nn.Conv2d(C, C, 3, padding=1, groups=C)``.
    """
    return run(prepare(x, weight, bias, size), backend)


def _check_size(size, tokens: int) -> tuple[int, int]:
    if isinstance(size, Tensor) or not isinstance(size, (tuple, list)) or len(size) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f"size must be (H, W), two positive ints, got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h * w != tokens:
        raise ValueError(f"size {h}x{w} = {h * w} pixels does not match the {tokens} tokens of x (dim 1)")
    return h, w


def prepare(x, weight, bias, size) -> Call:
    check_tensor("x", x, 3)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    _, tokens, c = x.shape
    h, w = _check_size(size, tokens)
    check_tensor("weight", weight, 4)
    check_like("weight", weight, x)
    if tuple(weight.shape) != (c, 1, KERNEL_SIZE, KERNEL_SIZE):
        raise ValueError(f"weight must have shape [{c}, 1, 3, 3] (a depthwise 3x3 conv over the {c} channels of x), "
                         f"got {tuple(weight.shape)}")
    if bias is None:
        bias = torch.zeros(c, dtype=x.dtype, device=x.device)
    check_tensor("bias", bias, 1)
    check_like("bias", bias, x)
    if bias.numel() != c:
        raise ValueError(f"bias has {bias.numel()} elements, expected {c} (the channels of x)")
    return Call(TOKEN_DWCONV_GELU, (x, weight, bias, h, w), x.device.type, x.dtype)


# --------------------------------------------------------------------------------------------------
# kernel ops: schema, fake, autograd, FLOPs
# --------------------------------------------------------------------------------------------------
FORWARD_SCHEMA = "(Tensor x, Tensor weight, Tensor bias, int height, int width) -> Tensor"
# returns (grad x, grad weight, grad bias)
BACKWARD_SCHEMA = ("(Tensor grad, Tensor x, Tensor weight, Tensor bias, int height, int width) "
                   "-> (Tensor, Tensor, Tensor)")


def _fake_forward(x, weight, bias, height, width):
    return x.new_empty(x.shape)


def _fake_backward(grad, x, weight, bias, height, width):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, height, width = inputs
    ctx.save_for_backward(x, weight, bias)  # the backward recomputes the conv output
    ctx.size = (height, width)


def _backward(backward_op, ctx, grad):
    x, weight, bias = ctx.saved_tensors
    grads = backward_op(grad.contiguous(), x, weight, bias, *ctx.size)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])) + (None, None)


def _conv(x, weight, height, width):
    """(input, weight, output) shapes of the plain module's ``nn.Conv2d``."""
    b, _, c = x
    return [b, c, height, width], list(weight), [b, c, height, width]


def _flops_forward(x, weight, bias, height, width, out_shape=None, **kwargs):
    return flops.conv_forward(*_conv(x, weight, height, width))


def _flops_backward(grad, x, weight, bias, height, width, out_shape=None, **kwargs):
    return flops.dilated_conv_backward(*_conv(x, weight, height, width), 1)


def _fvcore(inputs, outputs) -> int:
    b, tokens, c = flops.jit_shape(inputs[0])
    return flops.conv_macs([b, c, tokens, 1], flops.jit_shape(inputs[1]))


def _examples(device, dtype) -> list:
    """A 5x7 map of 13 channels (not a multiple of any vector width); a one-row 1x9 map (every tap row but the
    middle one is padding) without bias."""
    t = ExampleInputs(device, dtype, seed=17)
    return [((t.randn(2, 5 * 7, 13), t.randn(13, 1, 3, 3, scale=0.3), t.randn(13, scale=0.5), (5, 7)), {}),
            ((t.randn(1, 9, 6), t.randn(6, 1, 3, 3, scale=0.3), None, (1, 9)), {})]


TOKEN_DWCONV_GELU = register_op(OpDescriptor(
    name="token_dwconv_gelu", kernel="token_dwconv_gelu", forward_schema=FORWARD_SCHEMA,
    backward_schema=BACKWARD_SCHEMA, prepare=prepare, fake_forward=_fake_forward, fake_backward=_fake_backward,
    setup_context=_setup_context, backward=_backward, flops_forward=_flops_forward, flops_backward=_flops_backward,
    reference=(reference.token_dwconv_gelu_forward, reference.token_dwconv_gelu_backward), fvcore=_fvcore,
    examples=_examples,
    support={"cpu": Support(),
             "triton": Support(kernels=("emcad_kernels.triton.token_dwconv_gelu", "token_dwconv_gelu_forward",
                                        "token_dwconv_gelu_backward"))}))
