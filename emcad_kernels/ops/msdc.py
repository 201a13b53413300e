"""``multi_scale_dwconv``: MSCB's parallel depthwise convolutions + BatchNorm + activation, summed or concatenated,
then channel-shuffled, as one op (docs/kernels.md#msdc).

Read top to bottom: the public function, its argument checks, the op descriptor (kernel schemas, fake, autograd,
FLOPs, what each backend covers). Kernels: ``reference.msdc_forward/backward``, ``csrc/cpu/msdc.cpp``,
``csrc/cuda/msdc.cuh`` (bound in ``csrc/cuda/torch_binding.cpp``), ``triton/msdc.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import flops, reference
from ..backends import register_op, run
from ..descriptor import Call, OpDescriptor, Support
from ..testing import ExampleInputs
from ._args import (BatchNormLike, batch_norm_args, check_activation, check_batch_stats_count,
                    check_depthwise_weight, check_input, check_positive_int, conv_out_size, dense_grad,
                    empty_like_output, empty_stats, same_batch_stats_mode, update_running_stats)


def multi_scale_dwconv(x: Tensor, weights: Sequence[Tensor], bn: Sequence[BatchNormLike], *,
                       activation: str = "relu6", combine: str = "sum", shuffle_groups: Optional[int] = None,
                       stride: int = 1, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                       backend: Optional[str] = None) -> Tensor:
    """Parallel depthwise convolutions (MSDC of EMCAD's MSCB), fused.

    For each weight ``w_i`` of shape ``[C, 1, k_i, k_i]`` (odd ``k_i <= 9``, padding ``k_i // 2``):
    ``a_i = act(BN_i(dwconv(x, w_i, stride)))``. The branches are summed (``combine="sum"``) or concatenated
    along channels (``"concat"``), then channel-shuffled with ``shuffle_groups`` groups (ShuffleNet order) if
    given. ``bn[i]`` is the BatchNorm of branch ``i``; in training mode its running statistics are updated like
    ``nn.BatchNorm2d`` does. Returns a tensor in ``x``'s memory format.
    """
    return run(prepare(x, weights, bn, activation=activation, combine=combine, shuffle_groups=shuffle_groups,
                       stride=stride, training=training, momentum=momentum, eps=eps), backend)


class MsdcAttrs(NamedTuple):
    activation: str
    kernel_sizes: tuple[int, ...]
    stride: int
    empty: bool


def prepare(x, weights, bn, *, activation="relu6", combine="sum", shuffle_groups=None, stride=1, training=False,
            momentum=0.1, eps=1e-5) -> Call:
    check_input("x", x)
    n, c, h, w = x.shape
    weights, bn = list(weights), list(bn)
    if len(weights) == 0:
        raise ValueError("weights must hold at least one depthwise kernel")
    if len(bn) != len(weights):
        raise ValueError(f"bn must hold one BatchNorm per branch: got {len(bn)} for {len(weights)} weights")
    kernel_sizes = tuple(check_depthwise_weight(f"weights[{i}]", wt, c, x) for i, wt in enumerate(weights))
    check_activation(activation)
    if combine not in ("sum", "concat"):
        raise ValueError(f"combine must be 'sum' or 'concat', got {combine!r}")
    check_positive_int("stride", stride)
    out_channels = c * len(weights) if combine == "concat" else c
    if shuffle_groups is not None and (isinstance(shuffle_groups, bool) or not isinstance(shuffle_groups, int)
                                       or shuffle_groups < 1 or out_channels % shuffle_groups):
        raise ValueError(f"shuffle_groups must divide the {out_channels} output channels, got {shuffle_groups!r}")
    ho, wo = conv_out_size(h, max(kernel_sizes), stride), conv_out_size(w, max(kernel_sizes), stride)
    bns = [batch_norm_args(f"bn[{i}]", b, c, x, training) for i, b in enumerate(bn)]
    use_batch_stats = same_batch_stats_mode("bn", bns)
    count = n * ho * wo
    if use_batch_stats:
        check_batch_stats_count(count, "bn")

    def finish(out):
        y, batch_mean, batch_var = out
        if training:
            update_running_stats([(b.running_mean, b.running_var, batch_mean[i], batch_var[i])
                                  for i, b in enumerate(bns)], count, momentum)
        return y

    args = (x, weights, torch.stack([b.weight for b in bns]), torch.stack([b.bias for b in bns]),
            torch.stack([b.mean for b in bns]), torch.stack([b.var for b in bns]), use_batch_stats, float(eps),
            activation, combine == "concat", int(shuffle_groups or 0), stride)
    return Call(MSDC, args, x.device.type, x.dtype, MsdcAttrs(activation, kernel_sizes, stride, x.numel() == 0),
                finish)


# --------------------------------------------------------------------------------------------------
# kernel ops: schema, fake, autograd, FLOPs
# --------------------------------------------------------------------------------------------------
# ``training``: normalise with batch statistics (``mean``/``var`` are then ignored). The returned statistics are the
# ones used: batch mean and *biased* variance, or copies of the inputs. ``shuffle_groups == 0``: no shuffle.
FORWARD_SCHEMA = ("(Tensor x, Tensor[] weights, Tensor bn_weight, Tensor bn_bias, Tensor mean, Tensor var, "
                  "bool training, float eps, str activation, bool concat, int shuffle_groups, int stride) "
                  "-> (Tensor, Tensor, Tensor)")
# returns [grad x, grad bn_weight, grad bn_bias, grad weights...]
BACKWARD_SCHEMA = ("(Tensor grad, Tensor x, Tensor[] weights, Tensor bn_weight, Tensor bn_bias, Tensor save_mean, "
                   "Tensor save_var, bool training, float eps, str activation, bool concat, int shuffle_groups, "
                   "int stride) -> Tensor[]")


def _fake_forward(x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat, shuffle_groups,
                  stride):
    n, c, h, w = x.shape
    k = max(wt.shape[-1] for wt in weights)
    nb = len(weights)
    shape = (n, c * nb if concat else c, conv_out_size(h, k, stride), conv_out_size(w, k, stride))
    return empty_like_output(x, shape), empty_stats(x, nb, c), empty_stats(x, nb, c)


def _fake_backward(grad, x, weights, bn_weight, bn_bias, save_mean, save_var, *config):
    return [empty_like_output(x, x.shape), torch.empty_like(bn_weight), torch.empty_like(bn_bias),
            *(torch.empty_like(w) for w in weights)]


def _setup_context(ctx, inputs, output):
    x, weights, bn_weight, bn_bias, mean, var, *config = inputs
    _, save_mean, save_var = output
    ctx.save_for_backward(x, bn_weight, bn_bias, save_mean, save_var, *weights)
    ctx.config = config
    ctx.mark_non_differentiable(save_mean, save_var)


def _backward(backward_op, ctx, grad, _grad_mean, _grad_var):
    x, bn_weight, bn_bias, save_mean, save_var, *weights = ctx.saved_tensors
    gx, gbw, gbb, *gws = backward_op(dense_grad(grad, x), x, weights, bn_weight, bn_bias, save_mean, save_var,
                                     *ctx.config)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, gws if need[1] else None, gbw if need[2] else None,
            gbb if need[3] else None) + (None,) * 8


def _convs(x, weights, stride):
    """(input shape, weight shape, output shape) of every depthwise branch."""
    return [(x, w, [x[0], x[1], conv_out_size(x[2], w[-1], stride), conv_out_size(x[3], w[-1], stride)])
            for w in weights]


def _flops_forward(x, weights, *args, out_shape=None, **kwargs):
    return sum(flops.conv_forward(*conv) for conv in _convs(x, weights, args[-1]))


def _flops_backward(grad, x, weights, *args, out_shape=None, **kwargs):
    stride = args[-1]
    return sum(flops.conv_backward(*conv, stride, x[1]) for conv in _convs(x, weights, stride))


def _fvcore(inputs, outputs) -> int:
    x, out = flops.jit_shape(inputs[0]), flops.jit_shape(outputs[0])
    return sum(flops.conv_macs([x[0], x[1], *out[2:]], w) for w in flops.jit_list_shapes(inputs[1]))


# --------------------------------------------------------------------------------------------------
# what each backend's kernels cover (device and dtype limits are the backend's own, backends.py)
# --------------------------------------------------------------------------------------------------
def _unsupported(call: Call, *, max_branches: int, max_kernel: int, strides: tuple[int, ...],
                 activations: Optional[tuple[str, ...]] = None, empty: bool = True) -> list[str]:
    a = call.attrs
    reasons = []
    if len(a.kernel_sizes) > max_branches:
        reasons.append(f"{len(a.kernel_sizes)} branches are not supported (at most {max_branches})")
    if max(a.kernel_sizes) > max_kernel:
        reasons.append(f"kernel size {max(a.kernel_sizes)} is not supported (odd sizes up to {max_kernel})")
    if a.stride not in strides:
        reasons.append(f"stride {a.stride} is not supported (supported: {', '.join(map(str, strides))})")
    if activations is not None and a.activation not in activations:
        reasons.append(f"activation {a.activation} is not supported ({', '.join(activations)})")
    if not empty and a.empty:
        reasons.append("empty inputs are not supported")
    return reasons


CPU_ACTIVATIONS = ("identity", "relu", "relu6", "leakyrelu", "hswish")

def _examples(device, dtype) -> list:
    """MSCB's 1/3/5 branches summed and shuffled (training mode); two branches concatenated and shuffled in eval
    mode, channels_last."""
    t = ExampleInputs(device, dtype, seed=10)
    x = t.randn(2, 6, 7, 5)
    ws = [t.randn(6, 1, k, k, scale=0.3) for k in (1, 3, 5)]
    train = ((x, ws, [t.batch_norm(6) for _ in ws]), dict(activation="relu6", shuffle_groups=3, training=True))
    x = t.randn(1, 5, 9, 6, channels_last=True)
    ws = [t.randn(5, 1, k, k, scale=0.3) for k in (3, 7)]
    return [train, ((x, ws, [t.batch_norm(5) for _ in ws]),
                    dict(activation="hswish", combine="concat", shuffle_groups=2, training=False))]


MSDC = register_op(OpDescriptor(
    name="multi_scale_dwconv", kernel="msdc", forward_schema=FORWARD_SCHEMA, backward_schema=BACKWARD_SCHEMA,
    prepare=prepare, fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup_context,
    backward=_backward, flops_forward=_flops_forward, flops_backward=_flops_backward,
    reference=(reference.msdc_forward, reference.msdc_backward), fvcore=_fvcore, examples=_examples,
    support={
        "cpu": Support(lambda call: _unsupported(call, max_branches=8, max_kernel=9, strides=(1, 2),
                                                 activations=CPU_ACTIVATIONS)),
        "cuda": Support(lambda call: _unsupported(call, max_branches=4, max_kernel=7, strides=(1,), empty=False)),
        "triton": Support(lambda call: _unsupported(call, max_branches=3, max_kernel=7, strides=(1,)),
                          kernels=("emcad_kernels.triton.msdc", "msdc_forward", "msdc_backward")),
    }))
