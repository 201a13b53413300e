"""``upsample_dwconv``: EUCB's upsampling + depthwise conv + BatchNorm + activation as one op, without materialising
the upsampled tensor in the fused kernels (docs/kernels.md#eucb-upsample-and-depthwise-conv).

Read top to bottom: the public function, its argument checks, the op descriptor. Kernels:
``reference.updw_forward/backward``, ``csrc/cpu/updw.cpp``, ``csrc/cuda/updw.cuh`` (bound in
``csrc/cuda/torch_binding.cpp``), ``triton/updw.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import flops, reference
from ..backends import register_op, run
from ..descriptor import Call, OpDescriptor, Support
from ..testing import ExampleInputs
from ._args import (BatchNormLike, batch_norm_args, check_activation, check_batch_stats_count,
                    check_depthwise_weight, check_eps, check_feature_map, check_positive_int, dense_grad,
                    empty_like_output, empty_stats, update_running_stats)
from .msdc import CPU_ACTIVATIONS


def upsample_dwconv(x: Tensor, weight: Tensor, bn: BatchNormLike, *, scale: int = 2, mode: str = "nearest",
                    activation: str = "relu", training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                    backend: Optional[str] = None) -> Tensor:
    """Upsampling by ``scale`` then a depthwise conv (padding k//2, no bias), BatchNorm and activation: EUCB's
    ``up_dwc``. Semantics are exactly ``nn.Upsample(scale_factor=scale, mode=mode)`` (``align_corners=False``
    for bilinear) followed by ``nn.Conv2d(C, C, k, padding=k//2, groups=C, bias=False)``. Fused backends never
    build the upsampled tensor."""
    return run(prepare(x, weight, bn, scale=scale, mode=mode, activation=activation, training=training,
                       momentum=momentum, eps=eps), backend)


class UpdwAttrs(NamedTuple):
    activation: str
    kernel_size: int
    mode: str
    scale: int
    empty: bool


def prepare(x, weight, bn, *, scale=2, mode="nearest", activation="relu", training=False, momentum=0.1,
            eps=1e-5) -> Call:
    check_feature_map("x", x)
    eps = check_eps(eps)
    n, c, h, w = x.shape
    k = check_depthwise_weight("weight", weight, c, x)
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    check_positive_int("scale", scale)
    check_activation(activation)
    norm = batch_norm_args("bn", bn, c, x, training)
    count = n * h * w * scale * scale
    if norm.use_batch_stats:
        check_batch_stats_count(count, "bn")

    def finish(out):
        y, batch_mean, batch_var = out
        if training:
            update_running_stats([(norm.running_mean, norm.running_var, batch_mean, batch_var)], count, momentum)
        return y

    args = (x, weight, norm.weight, norm.bias, norm.mean, norm.var, norm.use_batch_stats, eps, mode,
            activation, scale)
    return Call(UPDW, args, x.device.type, x.dtype, UpdwAttrs(activation, k, mode, scale, x.numel() == 0), finish)


# --------------------------------------------------------------------------------------------------
# kernel ops: schema, fake, autograd, FLOPs
# --------------------------------------------------------------------------------------------------
FORWARD_SCHEMA = ("(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor mean, Tensor var, "
                  "bool training, float eps, str mode, str activation, int scale) -> (Tensor, Tensor, Tensor)")
# returns (grad x, grad weight, grad bn_weight, grad bn_bias)
BACKWARD_SCHEMA = ("(Tensor grad, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor save_mean, "
                   "Tensor save_var, bool training, float eps, str mode, str activation, int scale) "
                   "-> (Tensor, Tensor, Tensor, Tensor)")


def _fake_forward(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale):
    n, c, h, w = x.shape
    return empty_like_output(x, (n, c, h * scale, w * scale)), empty_stats(x, c), empty_stats(x, c)


def _fake_backward(grad, x, weight, bn_weight, bn_bias, *config):
    return (empty_like_output(x, x.shape), torch.empty_like(weight), torch.empty_like(bn_weight),
            torch.empty_like(bn_bias))


def _setup_context(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, mean, var, *config = inputs
    _, save_mean, save_var = output
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, save_mean, save_var)
    ctx.config = config
    ctx.mark_non_differentiable(save_mean, save_var)


def _backward(backward_op, ctx, grad, _grad_mean, _grad_var):
    x, weight, bn_weight, bn_bias, save_mean, save_var = ctx.saved_tensors
    grads = backward_op(dense_grad(grad, x), x, weight, bn_weight, bn_bias, save_mean, save_var, *ctx.config)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])) + (None,) * 7


def _conv(x, weight, scale):
    up = [x[0], x[1], x[2] * scale, x[3] * scale]
    return up, weight, up


def _flops_forward(x, weight, *args, out_shape=None, **kwargs):
    return flops.conv_forward(*_conv(x, weight, args[-1]))


def _flops_backward(grad, x, weight, *args, out_shape=None, **kwargs):
    return flops.conv_backward(*_conv(x, weight, args[-1]), 1, x[1])


def _fvcore(inputs, outputs) -> int:
    return flops.conv_macs(flops.jit_shape(outputs[0]), flops.jit_shape(inputs[1]))


# --------------------------------------------------------------------------------------------------
# what each backend's kernels cover
# --------------------------------------------------------------------------------------------------
def _cpu(call: Call) -> list[str]:
    a = call.attrs
    scales = {"nearest": (1, 2, 3, 4), "bilinear": (2,)}[a.mode]
    reasons = [] if a.scale in scales else [f"{a.mode} scale {a.scale} is not supported (supported: {scales})"]
    if a.activation not in CPU_ACTIVATIONS:
        reasons.append(f"activation {a.activation} is not supported ({', '.join(CPU_ACTIVATIONS)})")
    return reasons


def _cuda(call: Call) -> list[str]:
    a = call.attrs
    reasons = [] if a.mode == "nearest" else [f"mode {a.mode} is not supported (only nearest)"]
    if a.scale != 2:
        reasons.append(f"scale {a.scale} is not supported (only 2)")
    if a.kernel_size != 3:
        reasons.append(f"kernel size {a.kernel_size} is not supported (only 3: four 2x2 polyphase stencils)")
    if a.empty:
        reasons.append("empty inputs are not supported")
    return reasons


def _triton(call: Call) -> list[str]:
    a = call.attrs
    reasons = [] if a.scale == 2 else [f"scale {a.scale} is not supported (only 2)"]
    if a.kernel_size > 5:
        reasons.append(f"kernel size {a.kernel_size} is not supported (odd sizes up to 5)")
    return reasons


def _examples(device, dtype) -> list:
    """EUCB's nearest x2 + 3x3 in training mode; channels_last in eval mode; bilinear with a 5x5 kernel."""
    t = ExampleInputs(device, dtype, seed=11)
    return [((t.randn(2, 5, 6, 7), t.randn(5, 1, 3, 3, scale=0.3), t.batch_norm(5)),
             dict(activation="relu", training=True)),
            ((t.randn(1, 4, 5, 3, channels_last=True), t.randn(4, 1, 3, 3, scale=0.3), t.batch_norm(4)),
             dict(activation="relu6", training=False)),
            ((t.randn(1, 3, 3, 5), t.randn(3, 1, 5, 5, scale=0.3), t.batch_norm(3)),
             dict(mode="bilinear", activation="relu", training=True))]


UPDW = register_op(OpDescriptor(
    name="upsample_dwconv", kernel="updw", forward_schema=FORWARD_SCHEMA, backward_schema=BACKWARD_SCHEMA,
    prepare=prepare, fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup_context,
    backward=_backward, flops_forward=_flops_forward, flops_backward=_flops_backward,
    reference=(reference.updw_forward, reference.updw_backward), fvcore=_fvcore, examples=_examples,
    support={
        "cpu": Support(_cpu),
        "cuda": Support(_cuda),
        "triton": Support(_triton, kernels=("emcad_kernels.triton.updw", "updw_forward", "updw_backward")),
    }))
