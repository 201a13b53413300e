"""``grouped_attention_gate``: EMCAD's large-kernel grouped attention gate (LGAG) as one op
(docs/kernels.md#lgag).

Read top to bottom: the public function, its argument checks, the op descriptor. Kernels:
``reference.lgag_forward/backward``, ``csrc/cpu/lgag.cpp``, ``csrc/cuda/lgag.cuh`` (bound in
``csrc/cuda/torch_binding.cpp``), ``triton/lgag.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import flops, reference
from ..backends import register_op, run
from ..descriptor import Call, OpDescriptor, Support
from ..testing import ExampleInputs
from ._args import (BatchNormLike, batch_norm_args, check_activation, check_batch_stats_count, check_input,
                    check_like, check_positive_int, check_tensor, dense_grad, empty_like_output, empty_stats,
                    same_batch_stats_mode, update_running_stats)
from .msdc import CPU_ACTIVATIONS


def grouped_attention_gate(g: Tensor, x: Tensor, wg: Tensor, bg: Optional[Tensor], bn_g: BatchNormLike,
                           wx: Tensor, bx: Optional[Tensor], bn_x: BatchNormLike, wpsi: Tensor,
                           bpsi: Optional[Tensor], bn_psi: BatchNormLike, *, groups: int,
                           add_gate_input: bool = False, activation: str = "relu", training: bool = False,
                           momentum: float = 0.1, eps: float = 1e-5, backend: Optional[str] = None) -> Tensor:
    """EMCAD's large-kernel grouped attention gate (LGAG).

    ``psi = sigmoid(BN_psi(conv1x1(act(BN_g(gconv(g)) + BN_x(gconv(x))))))`` and returns ``x * psi``, or
    ``g + x * psi`` with ``add_gate_input=True`` (EMCAD's aggregation). ``wg``/``wx`` are grouped ``k×k`` conv
    weights (padding k//2) with ``groups`` groups, ``wpsi`` is ``[1, F_int, 1, 1]``.
    """
    return run(prepare(g, x, wg, bg, bn_g, wx, bx, bn_x, wpsi, bpsi, bn_psi, groups=groups,
                       add_gate_input=add_gate_input, activation=activation, training=training, momentum=momentum,
                       eps=eps), backend)


class LgagAttrs(NamedTuple):
    activation: str
    kernel_size: int
    groups: int
    out_per_group: int  # F_int / groups
    g_per_group: int  # input channels per group of the two grouped convs
    x_per_group: int
    empty: bool


def prepare(g, x, wg, bg, bn_g, wx, bx, bn_x, wpsi, bpsi, bn_psi, *, groups, add_gate_input=False,
            activation="relu", training=False, momentum=0.1, eps=1e-5) -> Call:
    check_input("g", g)
    check_input("x", x)
    check_like("g", g, x)
    if g.shape[0] != x.shape[0] or g.shape[2:] != x.shape[2:]:
        raise ValueError(f"g and x must have the same batch and spatial size, got {tuple(g.shape)} and "
                         f"{tuple(x.shape)}")
    if add_gate_input and g.shape[1] != x.shape[1]:
        raise ValueError(f"add_gate_input needs g and x with equal channels, got {g.shape[1]} and {x.shape[1]}")
    check_positive_int("groups", groups)
    check_activation(activation)
    n, _, h, w = x.shape
    for name, wt, inp in (("wg", wg, g), ("wx", wx, x)):
        check_tensor(name, wt, 4)
        check_like(name, wt, x)
        cin = inp.shape[1]
        if cin % groups or wt.shape[0] % groups:
            raise ValueError(f"groups={groups} must divide the input channels ({cin}) and the output channels "
                             f"({wt.shape[0]}) of {name}")
        if wt.shape[1] != cin // groups:
            raise ValueError(f"{name} must have shape [F_int, {cin // groups}, k, k] for {cin} input channels in "
                             f"{groups} groups, got {tuple(wt.shape)}")
        if wt.shape[2] != wt.shape[3] or wt.shape[2] % 2 == 0:
            raise ValueError(f"{name} must have a square odd kernel, got {wt.shape[2]}x{wt.shape[3]}")
    f_int = wg.shape[0]
    if wx.shape[0] != f_int or wx.shape[2] != wg.shape[2]:
        raise ValueError(f"wg and wx must have the same number of output channels and kernel size, got "
                         f"{tuple(wg.shape)} and {tuple(wx.shape)}")
    check_tensor("wpsi", wpsi, 4)
    check_like("wpsi", wpsi, x)
    if tuple(wpsi.shape) != (1, f_int, 1, 1):
        raise ValueError(f"wpsi must have shape [1, {f_int}, 1, 1], got {tuple(wpsi.shape)}")
    biases = []
    for name, b, size in (("bg", bg, f_int), ("bx", bx, f_int), ("bpsi", bpsi, 1)):
        if b is None:
            b = torch.zeros(size, dtype=x.dtype, device=x.device)
        check_tensor(name, b, 1)
        check_like(name, b, x)
        if b.numel() != size:
            raise ValueError(f"{name} must have {size} elements, got {b.numel()}")
        biases.append(b)
    norms = (batch_norm_args("bn_g", bn_g, f_int, x, training), batch_norm_args("bn_x", bn_x, f_int, x, training),
             batch_norm_args("bn_psi", bn_psi, 1, x, training))
    use_batch_stats = same_batch_stats_mode("bn_g, bn_x, bn_psi", norms)
    count = n * h * w
    if use_batch_stats:
        check_batch_stats_count(count, "bn_g")

    def finish(out):
        y, *stats = out
        if training:
            update_running_stats([(norm.running_mean, norm.running_var, stats[2 * i], stats[2 * i + 1])
                                  for i, norm in enumerate(norms)], count, momentum)
        return y

    args = (g, x, wg, biases[0], wx, biases[1], wpsi, biases[2], *(t for norm in norms for t in norm[:4]),
            use_batch_stats, float(eps), groups, activation, bool(add_gate_input))
    attrs = LgagAttrs(activation, int(wg.shape[-1]), groups, f_int // groups, int(wg.shape[1]), int(wx.shape[1]),
                      g.numel() == 0 or x.numel() == 0)
    return Call(LGAG, args, x.device.type, x.dtype, attrs, finish)


# --------------------------------------------------------------------------------------------------
# kernel ops: schema, fake, autograd, FLOPs
# --------------------------------------------------------------------------------------------------
FORWARD_SCHEMA = (
    "(Tensor g, Tensor x, Tensor wg, Tensor bg, Tensor wx, Tensor bx, Tensor wpsi, Tensor bpsi, Tensor bn_g_weight, "
    "Tensor bn_g_bias, Tensor mean_g, Tensor var_g, Tensor bn_x_weight, Tensor bn_x_bias, Tensor mean_x, "
    "Tensor var_x, Tensor bn_psi_weight, Tensor bn_psi_bias, Tensor mean_psi, Tensor var_psi, bool training, "
    "float eps, int groups, str activation, bool add_gate_input) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
# returns the gradients of (g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g weight/bias, bn_x weight/bias, bn_psi weight/bias)
BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor g, Tensor x, Tensor wg, Tensor bg, Tensor wx, Tensor bx, Tensor wpsi, Tensor bpsi, "
    "Tensor bn_g_weight, Tensor bn_g_bias, Tensor bn_x_weight, Tensor bn_x_bias, Tensor bn_psi_weight, "
    "Tensor bn_psi_bias, Tensor[] save_stats, bool training, float eps, int groups, str activation, "
    "bool add_gate_input) -> Tensor[]")

# positions of the differentiable forward inputs, in the order the backward op returns their gradients
_DIFFERENTIABLE = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17)


def _fake_forward(g, x, wg, *rest):
    f_int = wg.shape[0]
    return (empty_like_output(x, x.shape), *(empty_stats(x, f_int) for _ in range(4)), empty_stats(x, 1),
            empty_stats(x, 1))


def _fake_backward(grad, g, x, *params_and_config):
    return [empty_like_output(g, g.shape), empty_like_output(x, x.shape),
            *(torch.empty_like(p) for p in params_and_config[:12])]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(inputs[i] for i in _DIFFERENTIABLE), *output[1:])
    ctx.config = inputs[20:]
    ctx.mark_non_differentiable(*output[1:])


def _backward(backward_op, ctx, grad, *_grad_stats):
    saved = ctx.saved_tensors
    params, stats = saved[:14], list(saved[14:])
    grads = backward_op(dense_grad(grad, params[1]), *params, stats, *ctx.config)
    result = [None] * 25
    for slot, gr in zip(_DIFFERENTIABLE, grads):
        if ctx.needs_input_grad[slot]:
            result[slot] = gr
    return tuple(result)


def _convs(g, x, wg, wx, wpsi):
    """(input, weight, output, groups) of the W_g, W_x and psi convolutions."""
    n, _, h, w = x
    f_int = wg[0]
    return [(g, wg, [n, f_int, h, w], g[1] // wg[1]), (x, wx, [n, f_int, h, w], x[1] // wx[1]),
            ([n, f_int, h, w], wpsi, [n, 1, h, w], 1)]


def _flops_forward(g, x, wg, bg, wx, bx, wpsi, *args, out_shape=None, **kwargs):
    return sum(flops.conv_forward(i, w, o) for i, w, o, _ in _convs(g, x, wg, wx, wpsi))


def _flops_backward(grad, g, x, wg, bg, wx, bx, wpsi, *args, out_shape=None, **kwargs):
    return sum(flops.conv_backward(i, w, o, 1, groups) for i, w, o, groups in _convs(g, x, wg, wx, wpsi))


def _fvcore(inputs, outputs) -> int:
    """MACs of the W_g, W_x and psi convolutions (conv biases are not counted, as FlopCounterMode does)."""
    shapes = [flops.jit_shape(inputs[i]) for i in (0, 1, 2, 4, 6)]
    return sum(flops.conv_macs(o, w) for _, w, o, _ in _convs(*shapes))


# --------------------------------------------------------------------------------------------------
# what each backend's kernels cover
# --------------------------------------------------------------------------------------------------
def _cpu(call: Call) -> list[str]:
    # the kernels hold whole groups in one vector block (EMCAD: 1 output and 2 inputs per group)
    a = call.attrs
    reasons = []
    if a.out_per_group > 8 or max(a.g_per_group, a.x_per_group) > 16:
        reasons.append(f"{a.out_per_group} output and {max(a.g_per_group, a.x_per_group)} input channels per group are "
                       f"not supported (at most 8 and 16)")
    if a.kernel_size > 9:
        reasons.append(f"kernel size {a.kernel_size} is not supported (odd sizes up to 9)")
    if a.activation not in CPU_ACTIVATIONS:
        reasons.append(f"activation {a.activation} is not supported ({', '.join(CPU_ACTIVATIONS)})")
    return reasons


def _cuda(call: Call) -> list[str]:
    a = call.attrs
    reasons = []
    if a.kernel_size != 3:
        reasons.append(f"kernel size {a.kernel_size} is not supported (only 3)")
    if a.out_per_group != 1 or max(a.g_per_group, a.x_per_group) > 4:
        reasons.append(f"{a.out_per_group} output and {max(a.g_per_group, a.x_per_group)} input channels per group are "
                       f"not supported (one gate channel and at most 4 inputs per group)")
    if a.empty:
        reasons.append("empty inputs are not supported")
    return reasons


def _triton(call: Call) -> list[str]:
    a = call.attrs
    return [f"kernel size {a.kernel_size} is not supported (odd sizes up to 7)"] if a.kernel_size > 7 else []


def _examples(device, dtype) -> list:
    """EMCAD's LGAG (one gate channel per group of two, 3x3, ``g + x·psi``) in training mode; a gate without the
    aggregation, one bias left out, channels_last, in eval mode."""
    t = ExampleInputs(device, dtype, seed=12)

    def gate(shape, f_int, groups, channels_last, **kw):
        c = shape[1]
        g, x = t.randn(*shape, channels_last=channels_last), t.randn(*shape, channels_last=channels_last)
        wg, bg = t.randn(f_int, c // groups, 3, 3, scale=0.3), t.randn(f_int, scale=0.1)
        wx, bx = t.randn(f_int, c // groups, 3, 3, scale=0.3), t.randn(f_int, scale=0.1)
        wpsi, bpsi = t.randn(1, f_int, 1, 1, scale=0.5), t.randn(1, scale=0.1)
        return ((g, x, wg, bg, t.batch_norm(f_int), wx, bx, t.batch_norm(f_int), wpsi, bpsi, t.batch_norm(1)),
                dict(groups=groups, **kw))

    first = gate((2, 6, 7, 5), 3, 3, False, add_gate_input=True, training=True)
    args, kwargs = gate((1, 4, 5, 9), 2, 2, True, training=False)
    return [first, (args[:6] + (None,) + args[7:], kwargs)]


LGAG = register_op(OpDescriptor(
    name="grouped_attention_gate", kernel="lgag", forward_schema=FORWARD_SCHEMA, backward_schema=BACKWARD_SCHEMA,
    prepare=prepare, fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup_context,
    backward=_backward, flops_forward=_flops_forward, flops_backward=_flops_backward,
    reference=(reference.lgag_forward, reference.lgag_backward), fvcore=_fvcore, examples=_examples,
    support={
        "cpu": Support(_cpu),
        "cuda": Support(_cuda),
        "triton": Support(_triton, kernels=("emcad_kernels.triton.lgag", "lgag_forward", "lgag_backward")),
    }))
