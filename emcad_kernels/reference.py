"""Pure-PyTorch reference backend: the test oracle and the universal fallback.

Every function here takes the *kernel interface* arguments of one op (the same arguments every backend
receives, see ``library.py``) and computes the result with ordinary PyTorch ops. The backward passes are
``torch.func.vjp`` of the very same forward compositions, so the reference gradients are exactly the
autograd gradients of the documented semantics.

Low-precision inputs (fp16, bf16) are computed in fp32 and cast back on return; BatchNorm statistics are
returned in fp32 for them (like ``nn.BatchNorm2d`` does internally).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------------
def activate(z: Tensor, activation: str) -> Tensor:
    """The parameter-free activations EMCAD uses, by name (EMCAD.md §2.1)."""
    if activation == "relu":
        return F.relu(z)
    if activation == "relu6":
        return F.hardtanh(z, 0.0, 6.0)
    if activation == "leakyrelu":
        return F.leaky_relu(z, 0.2)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "hswish":
        return F.hardswish(z)
    if activation == "identity":
        return z
    raise ValueError(f"unknown activation {activation!r}")


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format an op returns for input ``x``: channels_last only if ``x`` is unambiguously so."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def batch_norm(z: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, training: bool,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm over (N, H, W) per channel. Returns (output, mean used, biased variance used)."""
    if training:
        var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    shape = (1, -1, 1, 1)
    out = (z - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)
    return out, mean, var


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle: output channel o takes input (o mod g)·n + o div g (EMCAD.md §2.2)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _upcast(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t.to(dtype) for t in tensors]


def _finish(y: Tensor, x: Tensor) -> Tensor:
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def _stats(values: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack([v.to(stats_dtype(dtype)) for v in values]).contiguous()


# --------------------------------------------------------------------------------------------------
# multi-scale depthwise conv (MSDC of MSCB)
# --------------------------------------------------------------------------------------------------
def _msdc_math(x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat, shuffle_groups,
               stride):
    channels = x.shape[1]
    outs, means, variances = [], [], []
    for i, w in enumerate(weights):
        k = w.shape[-1]
        z = F.conv2d(x, w, None, stride, k // 2, 1, channels)
        a, m, v = batch_norm(z, bn_weight[i], bn_bias[i], mean[i], var[i], training, eps)
        outs.append(activate(a, activation))
        means.append(m)
        variances.append(v)
    y = torch.cat(outs, 1) if concat else torch.stack(outs).sum(0)
    if shuffle_groups > 0:
        y = channel_shuffle(y, shuffle_groups)
    return y, means, variances


def msdc_forward(x: Tensor, weights: list[Tensor], bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor,
                 training: bool, eps: float, activation: str, concat: bool, shuffle_groups: int,
                 stride: int) -> tuple[Tensor, Tensor, Tensor]:
    dt = _compute_dtype(x)
    xs, bw, bb, rm, rv = _upcast([x, bn_weight, bn_bias, mean, var], dt)
    y, means, variances = _msdc_math(xs, _upcast(weights, dt), bw, bb, rm, rv, training, eps, activation, concat,
                                     shuffle_groups, stride)
    return _finish(y, x), _stats(means, x.dtype), _stats(variances, x.dtype)


def msdc_backward(grad: Tensor, x: Tensor, weights: list[Tensor], bn_weight: Tensor, bn_bias: Tensor,
                  save_mean: Tensor, save_var: Tensor, training: bool, eps: float, activation: str, concat: bool,
                  shuffle_groups: int, stride: int) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    dt = _compute_dtype(x)
    xs, bw, bb, sm, sv, g = _upcast([x, bn_weight, bn_bias, save_mean, save_var, grad], dt)

    def f(x_, ws_, bw_, bb_):
        return _msdc_math(x_, ws_, bw_, bb_, sm, sv, training, eps, activation, concat, shuffle_groups, stride)[0]

    _, vjp = torch.func.vjp(f, xs, _upcast(weights, dt), bw, bb)
    gx, gws, gbw, gbb = vjp(g)
    return (gx.to(x.dtype).contiguous(memory_format=output_memory_format(x)),
            [gw.to(w.dtype) for gw, w in zip(gws, weights)], gbw.to(bn_weight.dtype), gbb.to(bn_bias.dtype))


# --------------------------------------------------------------------------------------------------
# upsample + depthwise conv (EUCB front)
# --------------------------------------------------------------------------------------------------
def _updw_math(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale):
    if mode == "nearest":
        u = F.interpolate(x, scale_factor=scale, mode="nearest")
    else:
        u = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    k = weight.shape[-1]
    z = F.conv2d(u, weight, None, 1, k // 2, 1, x.shape[1])
    a, m, v = batch_norm(z, bn_weight, bn_bias, mean, var, training, eps)
    return activate(a, activation), m, v


def updw_forward(x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor,
                 training: bool, eps: float, mode: str, activation: str, scale: int) -> tuple[Tensor, Tensor, Tensor]:
    dt = _compute_dtype(x)
    xs, w, bw, bb, rm, rv = _upcast([x, weight, bn_weight, bn_bias, mean, var], dt)
    y, m, v = _updw_math(xs, w, bw, bb, rm, rv, training, eps, mode, activation, scale)
    sd = stats_dtype(x.dtype)
    return _finish(y, x), m.to(sd).contiguous(), v.to(sd).contiguous()


def updw_backward(grad: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, save_mean: Tensor,
                  save_var: Tensor, training: bool, eps: float, mode: str, activation: str,
                  scale: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dt = _compute_dtype(x)
    xs, w, bw, bb, sm, sv, g = _upcast([x, weight, bn_weight, bn_bias, save_mean, save_var, grad], dt)

    def f(x_, w_, bw_, bb_):
        return _updw_math(x_, w_, bw_, bb_, sm, sv, training, eps, mode, activation, scale)[0]

    _, vjp = torch.func.vjp(f, xs, w, bw, bb)
    gx, gw, gbw, gbb = vjp(g)
    return (gx.to(x.dtype).contiguous(memory_format=output_memory_format(x)), gw.to(weight.dtype),
            gbw.to(bn_weight.dtype), gbb.to(bn_bias.dtype))


# --------------------------------------------------------------------------------------------------
# grouped attention gate (LGAG)
# --------------------------------------------------------------------------------------------------
def _lgag_math(g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g, bn_x, bn_psi, stats, training, eps, groups, activation,
               add_gate_input):
    k = wg.shape[-1]
    ag, mg, vg = batch_norm(F.conv2d(g, wg, bg, 1, k // 2, 1, groups), bn_g[0], bn_g[1], stats[0], stats[1],
                            training, eps)
    ax, mx, vx = batch_norm(F.conv2d(x, wx, bx, 1, k // 2, 1, groups), bn_x[0], bn_x[1], stats[2], stats[3],
                            training, eps)
    h = activate(ag + ax, activation)
    ap, mp, vp = batch_norm(F.conv2d(h, wpsi, bpsi), bn_psi[0], bn_psi[1], stats[4], stats[5], training, eps)
    out = x * torch.sigmoid(ap)
    if add_gate_input:
        out = g + out
    return out, (mg, vg, mx, vx, mp, vp)


def lgag_forward(g: Tensor, x: Tensor, wg: Tensor, bg: Tensor, wx: Tensor, bx: Tensor, wpsi: Tensor, bpsi: Tensor,
                 bn_g_weight: Tensor, bn_g_bias: Tensor, mean_g: Tensor, var_g: Tensor,
                 bn_x_weight: Tensor, bn_x_bias: Tensor, mean_x: Tensor, var_x: Tensor,
                 bn_psi_weight: Tensor, bn_psi_bias: Tensor, mean_psi: Tensor, var_psi: Tensor,
                 training: bool, eps: float, groups: int, activation: str,
                 add_gate_input: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dt = _compute_dtype(x)
    t = _upcast([g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias, bn_psi_weight,
                 bn_psi_bias, mean_g, var_g, mean_x, var_x, mean_psi, var_psi], dt)
    out, stats = _lgag_math(*t[:8], t[8:10], t[10:12], t[12:14], t[14:20], training, eps, groups, activation,
                            add_gate_input)
    sd = stats_dtype(x.dtype)
    return (_finish(out, x), *(s.to(sd).contiguous() for s in stats))


def lgag_backward(grad: Tensor, g: Tensor, x: Tensor, wg: Tensor, bg: Tensor, wx: Tensor, bx: Tensor, wpsi: Tensor,
                  bpsi: Tensor, bn_g_weight: Tensor, bn_g_bias: Tensor, bn_x_weight: Tensor, bn_x_bias: Tensor,
                  bn_psi_weight: Tensor, bn_psi_bias: Tensor, save_stats: list[Tensor], training: bool, eps: float,
                  groups: int, activation: str, add_gate_input: bool) -> list[Tensor]:
    """Returns grads for (g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g w/b, bn_x w/b, bn_psi w/b), in that order."""
    dt = _compute_dtype(x)
    params = [g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias, bn_psi_weight,
              bn_psi_bias]
    stats = _upcast(save_stats, dt)

    def f(*p):
        return _lgag_math(*p[:8], p[8:10], p[10:12], p[12:14], stats, training, eps, groups, activation,
                          add_gate_input)[0]

    _, vjp = torch.func.vjp(f, *_upcast(params, dt))
    grads = vjp(grad.to(dt))
    out = [gr.to(p.dtype) for gr, p in zip(grads, params)]
    out[0] = out[0].contiguous(memory_format=output_memory_format(g))
    out[1] = out[1].contiguous(memory_format=output_memory_format(x))
    return out
