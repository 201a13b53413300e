"""Pure-PyTorch reference backend: the test oracle and the universal fallback.

Every function here implements one kernel-op schema of an op descriptor (``ops/<op>.py``; every backend implements
the same schemas) with ordinary PyTorch ops. The backward passes are written out with the aten backward ops and the
BatchNorm backward formula (docs/kernels.md#training-mode-batchnorm): they recompute the forward from the saved input
and statistics, which is the scheme every fused backend follows. (Autograd cannot be used
inside a custom op's implementation: autograd dispatch keys are excluded there.) The tests check these
gradients against autograd of the plain nn modules and with float64 ``gradcheck``.

Low-precision inputs (fp16, bf16) are computed in fp32 and cast back on return; BatchNorm statistics are
returned in fp32 for them (like ``nn.BatchNorm2d`` does internally).
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------------
def activate(z: Tensor, activation: str) -> Tensor:
    """The parameter-free activations EMCAD uses, by name (docs/models.md#activations)."""
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
    """ShuffleNet channel shuffle: output channel o takes input (o mod g)·n + o div g
    (docs/models.md#channel-shuffle)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def activate_backward(grad: Tensor, a: Tensor, activation: str) -> Tensor:
    """Gradient through ``activate`` given its input ``a`` (PyTorch's conventions at the kinks)."""
    if activation == "relu":
        return grad * (a > 0)
    if activation == "relu6":
        return grad * ((a > 0) & (a < 6))
    if activation == "leakyrelu":
        return torch.where(a > 0, grad, grad * 0.2)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, a)
    if activation == "hswish":
        return torch.ops.aten.hardswish_backward(grad, a)
    if activation == "identity":
        return grad
    raise ValueError(f"unknown activation {activation!r}")


def batch_norm_backward(grad: Tensor, z: Tensor, weight: Tensor, mean: Tensor, var: Tensor, training: bool,
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad wrt the BN input z, grad weight, grad bias). In training mode the batch statistics depend
    on z: dz = γ·r/M · (M·g − Σg − ẑ·Σ(g·ẑ)) with r = 1/sqrt(σ² + ε)."""
    shape = (1, -1, 1, 1)
    invstd = torch.rsqrt(var + eps)
    zhat = (z - mean.view(shape)) * invstd.view(shape)
    grad_bias = grad.sum((0, 2, 3))
    grad_weight = (grad * zhat).sum((0, 2, 3))
    scale = (weight * invstd).view(shape)
    if training:
        count = z.numel() // z.shape[1]
        grad_z = scale * (grad - grad_bias.view(shape) / count - zhat * (grad_weight.view(shape) / count))
    else:
        grad_z = grad * scale
    return grad_z, grad_weight, grad_bias


def conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, stride: int, groups: int,
                  bias: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(grad input, grad weight, grad bias) of ``F.conv2d(inp, weight, bias, stride, k//2, 1, groups)``."""
    k = weight.shape[-1]
    return torch.ops.aten.convolution_backward(
        grad, inp, weight, [weight.shape[0]] if bias else None, [stride, stride], [k // 2, k // 2], [1, 1], False,
        [0, 0], groups, [True, True, bias])


def channel_unshuffle(x: Tensor, groups: int) -> Tensor:
    """Inverse of ``channel_shuffle``."""
    n, c, h, w = x.shape
    return x.view(n, c // groups, groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _upcast(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t.to(dtype) for t in tensors]


def _finish(y: Tensor, x: Tensor) -> Tensor:
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def _stats(values: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack([v.to(stats_dtype(dtype)) for v in values]).contiguous()


def _stat(value: Tensor, dtype: torch.dtype) -> Tensor:
    # a copy: in eval mode the statistics are the op's own inputs, and custom-op outputs must not alias inputs
    return value.to(stats_dtype(dtype), copy=True).contiguous()


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
                  shuffle_groups: int, stride: int) -> list[Tensor]:
    """Returns [grad x, grad bn_weight, grad bn_bias, grad weights...]."""
    dt = _compute_dtype(x)
    xs, bw, bb, sm, sv, g = _upcast([x, bn_weight, bn_bias, save_mean, save_var, grad], dt)
    if shuffle_groups > 0:
        g = channel_unshuffle(g, shuffle_groups)
    channels = x.shape[1]
    grad_x = torch.zeros_like(xs)
    grad_ws, grad_bw, grad_bb = [], [], []
    for i, w in enumerate(_upcast(weights, dt)):
        z = F.conv2d(xs, w, None, stride, w.shape[-1] // 2, 1, channels)
        a = batch_norm(z, bw[i], bb[i], sm[i], sv[i], False, eps)[0]
        g_branch = g[:, i * channels:(i + 1) * channels] if concat else g
        g_z, g_gamma, g_beta = batch_norm_backward(activate_backward(g_branch, a, activation), z, bw[i], sm[i], sv[i],
                                                   training, eps)
        g_x, g_w, _ = conv_backward(g_z, xs, w, stride, channels)
        grad_x += g_x
        grad_ws.append(g_w.to(weights[i].dtype))
        grad_bw.append(g_gamma)
        grad_bb.append(g_beta)
    return [grad_x.to(x.dtype).contiguous(memory_format=output_memory_format(x)),
            torch.stack(grad_bw).to(bn_weight.dtype), torch.stack(grad_bb).to(bn_bias.dtype), *grad_ws]


# --------------------------------------------------------------------------------------------------
# upsample + depthwise conv (EUCB front)
# --------------------------------------------------------------------------------------------------
def _upsample(x: Tensor, mode: str, scale: int) -> Tensor:
    if mode == "nearest":
        return F.interpolate(x, scale_factor=scale, mode="nearest")
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def _updw_math(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale):
    u = _upsample(x, mode, scale)
    k = weight.shape[-1]
    z = F.conv2d(u, weight, None, 1, k // 2, 1, x.shape[1])
    a, m, v = batch_norm(z, bn_weight, bn_bias, mean, var, training, eps)
    return activate(a, activation), m, v


def updw_forward(x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor,
                 training: bool, eps: float, mode: str, activation: str, scale: int) -> tuple[Tensor, Tensor, Tensor]:
    dt = _compute_dtype(x)
    xs, w, bw, bb, rm, rv = _upcast([x, weight, bn_weight, bn_bias, mean, var], dt)
    y, m, v = _updw_math(xs, w, bw, bb, rm, rv, training, eps, mode, activation, scale)
    return _finish(y, x), _stat(m, x.dtype), _stat(v, x.dtype)


def updw_backward(grad: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, save_mean: Tensor,
                  save_var: Tensor, training: bool, eps: float, mode: str, activation: str,
                  scale: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dt = _compute_dtype(x)
    xs, w, bw, bb, sm, sv, g = _upcast([x, weight, bn_weight, bn_bias, save_mean, save_var, grad], dt)
    u = _upsample(xs, mode, scale)
    z = F.conv2d(u, w, None, 1, w.shape[-1] // 2, 1, x.shape[1])
    a = batch_norm(z, bw, bb, sm, sv, False, eps)[0]
    g_z, g_gamma, g_beta = batch_norm_backward(activate_backward(g, a, activation), z, bw, sm, sv, training, eps)
    g_u, g_w, _ = conv_backward(g_z, u, w, 1, x.shape[1])
    n, c, h, wd = x.shape
    if mode == "nearest":
        g_x = torch.ops.aten.upsample_nearest2d_backward(g_u, [h * scale, wd * scale], [n, c, h, wd], float(scale),
                                                         float(scale))
    else:
        g_x = torch.ops.aten.upsample_bilinear2d_backward(g_u, [h * scale, wd * scale], [n, c, h, wd], False,
                                                          float(scale), float(scale))
    return (g_x.to(x.dtype).contiguous(memory_format=output_memory_format(x)), g_w.to(weight.dtype),
            g_gamma.to(bn_weight.dtype), g_beta.to(bn_bias.dtype))


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
    return (_finish(out, x), *(_stat(s, x.dtype) for s in stats))


def lgag_backward(grad: Tensor, g: Tensor, x: Tensor, wg: Tensor, bg: Tensor, wx: Tensor, bx: Tensor, wpsi: Tensor,
                  bpsi: Tensor, bn_g_weight: Tensor, bn_g_bias: Tensor, bn_x_weight: Tensor, bn_x_bias: Tensor,
                  bn_psi_weight: Tensor, bn_psi_bias: Tensor, save_stats: list[Tensor], training: bool, eps: float,
                  groups: int, activation: str, add_gate_input: bool) -> list[Tensor]:
    """Returns grads for (g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g w/b, bn_x w/b, bn_psi w/b), in that order."""
    dt = _compute_dtype(x)
    params = [g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias, bn_psi_weight,
              bn_psi_bias]
    g_, x_, wg_, bg_, wx_, bx_, wpsi_, bpsi_, gam_g, bet_g, gam_x, bet_x, gam_p, bet_p = _upcast(params, dt)
    mg, vg, mx, vx, mp, vp = _upcast(save_stats, dt)
    grad = grad.to(dt)
    pad = wg.shape[-1] // 2
    # recompute the forward from the inputs and the saved statistics
    zg = F.conv2d(g_, wg_, bg_, 1, pad, 1, groups)
    zx = F.conv2d(x_, wx_, bx_, 1, pad, 1, groups)
    s = batch_norm(zg, gam_g, bet_g, mg, vg, False, eps)[0] + batch_norm(zx, gam_x, bet_x, mx, vx, False, eps)[0]
    h = activate(s, activation)
    zp = F.conv2d(h, wpsi_, bpsi_)
    psi = torch.sigmoid(batch_norm(zp, gam_p, bet_p, mp, vp, False, eps)[0])
    # out = x * psi (+ g)
    grad_ap = (grad * x_).sum(1, keepdim=True) * psi * (1 - psi)
    grad_zp, grad_gam_p, grad_bet_p = batch_norm_backward(grad_ap, zp, gam_p, mp, vp, training, eps)
    grad_h, grad_wpsi, grad_bpsi = conv_backward(grad_zp, h, wpsi_, 1, 1, bias=True)
    grad_s = activate_backward(grad_h, s, activation)
    grad_zg, grad_gam_g, grad_bet_g = batch_norm_backward(grad_s, zg, gam_g, mg, vg, training, eps)
    grad_zx, grad_gam_x, grad_bet_x = batch_norm_backward(grad_s, zx, gam_x, mx, vx, training, eps)
    grad_g, grad_wg, grad_bg = conv_backward(grad_zg, g_, wg_, 1, groups, bias=True)
    grad_x, grad_wx, grad_bx = conv_backward(grad_zx, x_, wx_, 1, groups, bias=True)
    grad_x = grad_x + grad * psi
    if add_gate_input:
        grad_g = grad_g + grad
    grads = [grad_g, grad_x, grad_wg, grad_bg, grad_wx, grad_bx, grad_wpsi, grad_bpsi, grad_gam_g, grad_bet_g,
             grad_gam_x, grad_bet_x, grad_gam_p, grad_bet_p]
    out = [gr.to(p.dtype) for gr, p in zip(grads, params)]
    out[0] = out[0].contiguous(memory_format=output_memory_format(g))
    out[1] = out[1].contiguous(memory_format=output_memory_format(x))
    return out


# --------------------------------------------------------------------------------------------------
# grouped multi-dilation depthwise conv with a per-group channels-first LayerNorm prologue (EGE-UNet GAB)
# and multi-dilation depthwise conv with a GroupNorm epilogue whose groups are the dilation groups (MALUNet DGA)
# --------------------------------------------------------------------------------------------------
def dilated_padding(k: int, dilation: int) -> int:
    """'Same' zero padding of a k×k conv with ``dilation`` (odd k): ``dilation · (k // 2)``."""
    return dilation * (k // 2)


def _group_sizes(weights: Sequence[Tensor]) -> list[int]:
    return [int(w.shape[0]) for w in weights]


def _dilated_dw(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], dilations: Sequence[int]) -> Tensor:
    """Each channel group ``i`` (``weights[i].shape[0]`` channels, in order) convolved depthwise with
    ``weights[i]`` (dilation ``dilations[i]``, same-size zero padding) plus ``biases[i]``; groups concatenated."""
    outs = []
    for xi, w, b, d in zip(x.split(_group_sizes(weights), 1), weights, biases, dilations):
        outs.append(F.conv2d(xi, w, b, 1, dilated_padding(w.shape[-1], d), d, w.shape[0]))
    return torch.cat(outs, 1)


def _dilated_dw_backward(grad: Tensor, x: Tensor, weights: Sequence[Tensor],
                         dilations: Sequence[int]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(grad input, grad weights, grad biases) of ``_dilated_dw``."""
    sizes = _group_sizes(weights)
    gxs, gws, gbs = [], [], []
    for gi, xi, w, d in zip(grad.split(sizes, 1), x.split(sizes, 1), weights, dilations):
        p = dilated_padding(w.shape[-1], d)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gi.contiguous(), xi.contiguous(), w, [w.shape[0]], [1, 1], [p, p], [d, d], False, [0, 0], w.shape[0],
            [True, True, True])
        gxs.append(gx)
        gws.append(gw)
        gbs.append(gb)
    return torch.cat(gxs, 1), gws, gbs


def _channels_last_view(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def _from_channels_last_view(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def layer_norm_channels_first(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Per-pixel LayerNorm over the channels of an NCHW tensor (biased variance, ``eps`` inside the root)."""
    y = F.layer_norm(_channels_last_view(x), (x.shape[1],), weight, bias, eps)
    return _from_channels_last_view(y)


def _layer_norm_cf_stats(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(normalised output (NCHW view), mean, rstd) of the channels-first LayerNorm; aten's layout for stats."""
    out, mean, rstd = torch.ops.aten.native_layer_norm(_channels_last_view(x).contiguous(), [x.shape[1]], weight,
                                                       bias, eps)
    return _from_channels_last_view(out), mean, rstd


def _layer_norm_cf_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor,
                            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _, mean, rstd = _layer_norm_cf_stats(x, weight, bias, eps)
    gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
        _channels_last_view(grad).contiguous(), _channels_last_view(x).contiguous(), [x.shape[1]], mean, rstd,
        weight, bias, [True, True, True])
    return _from_channels_last_view(gx), gw, gb


def _lndw_math(x, ln_weights, ln_biases, weights, biases, dilations, eps):
    sizes = _group_sizes(weights)
    normed = [layer_norm_channels_first(xi, lw, lb, eps)
              for xi, lw, lb in zip(x.split(sizes, 1), ln_weights, ln_biases)]
    return _dilated_dw(torch.cat(normed, 1), weights, biases, dilations)


def lndw_forward(x: Tensor, ln_weights: list[Tensor], ln_biases: list[Tensor], weights: list[Tensor],
                 biases: list[Tensor], dilations: list[int], eps: float) -> Tensor:
    """``layernorm_dilated_dwconv``: per channel group ``i``, a channels-first LayerNorm over the group's channels
    (affine ``ln_weights[i]``, ``ln_biases[i]``), then a depthwise conv with ``weights[i]`` (dilation
    ``dilations[i]``, zero padding ``dilations[i]·(k//2)``: the *normalised* map is zero-padded) plus
    ``biases[i]``. Outputs of the groups concatenated in order."""
    dt = _compute_dtype(x)
    y = _lndw_math(x.to(dt), _upcast(ln_weights, dt), _upcast(ln_biases, dt), _upcast(weights, dt),
                   _upcast(biases, dt), dilations, eps)
    return _finish(y, x)


def lndw_backward(grad: Tensor, x: Tensor, ln_weights: list[Tensor], ln_biases: list[Tensor], weights: list[Tensor],
                  biases: list[Tensor], dilations: list[int],
                  eps: float) -> list[Tensor]:
    """Returns [grad x, grad ln_weights..., grad ln_biases..., grad weights..., grad biases...]; recomputes the
    LayerNorm."""
    dt = _compute_dtype(x)
    xs, g = x.to(dt), grad.to(dt)
    lws, lbs, ws = _upcast(ln_weights, dt), _upcast(ln_biases, dt), _upcast(weights, dt)
    sizes = _group_sizes(weights)
    x_groups = xs.split(sizes, 1)
    normed = torch.cat([_layer_norm_cf_stats(xi, lw, lb, eps)[0] for xi, lw, lb in zip(x_groups, lws, lbs)], 1)
    g_normed, g_ws, g_bs = _dilated_dw_backward(g, normed, ws, dilations)
    g_xs, g_lws, g_lbs = [], [], []
    for gi, xi, lw, lb in zip(g_normed.split(sizes, 1), x_groups, lws, lbs):
        gx, glw, glb = _layer_norm_cf_backward(gi, xi, lw, lb, eps)
        g_xs.append(gx)
        g_lws.append(glw)
        g_lbs.append(glb)
    grad_x = torch.cat(g_xs, 1).to(x.dtype).contiguous(memory_format=output_memory_format(x))
    return [grad_x, *(t.to(p.dtype) for t, p in zip(g_lws, ln_weights)),
            *(t.to(p.dtype) for t, p in zip(g_lbs, ln_biases)), *(t.to(p.dtype) for t, p in zip(g_ws, weights)),
            *(t.to(p.dtype) for t, p in zip(g_bs, biases))]


def _dwgn_math(x, weights, biases, gn_weight, gn_bias, dilations, eps):
    z = _dilated_dw(x, weights, biases, dilations)
    return F.group_norm(z, len(weights), gn_weight, gn_bias, eps)


def dwgn_forward(x: Tensor, weights: list[Tensor], biases: list[Tensor], gn_weight: Tensor, gn_bias: Tensor,
                 dilations: list[int], eps: float) -> Tensor:
    """``dilated_dwconv_groupnorm``: the grouped multi-dilation depthwise conv (as in ``lndw_forward``, without the
    LayerNorm) followed by ``GroupNorm(len(weights), C)``: the norm groups are the dilation groups (all of equal
    size)."""
    dt = _compute_dtype(x)
    y = _dwgn_math(x.to(dt), _upcast(weights, dt), _upcast(biases, dt), gn_weight.to(dt), gn_bias.to(dt),
                   dilations, eps)
    return _finish(y, x)


def dwgn_backward(grad: Tensor, x: Tensor, weights: list[Tensor], biases: list[Tensor], gn_weight: Tensor,
                  gn_bias: Tensor, dilations: list[int],
                  eps: float) -> list[Tensor]:
    """Returns [grad x, grad gn_weight, grad gn_bias, grad weights..., grad biases...]; recomputes the conv and
    the GroupNorm statistics."""
    dt = _compute_dtype(x)
    xs, g = x.to(dt), grad.to(dt)
    ws, bs, gw, gb = _upcast(weights, dt), _upcast(biases, dt), gn_weight.to(dt), gn_bias.to(dt)
    z = _dilated_dw(xs, ws, bs, dilations).contiguous()
    n, c, h, w = z.shape
    groups = len(weights)
    _, mean, rstd = torch.ops.aten.native_group_norm(z, gw, gb, n, c, h * w, groups, eps)
    g_z, g_gw, g_gb = torch.ops.aten.native_group_norm_backward(g.contiguous(), z, mean, rstd, gw, n, c, h * w,
                                                                groups, [True, True, True])
    g_x, g_ws, g_bs = _dilated_dw_backward(g_z, xs, ws, dilations)
    return [g_x.to(x.dtype).contiguous(memory_format=output_memory_format(x)), g_gw.to(gn_weight.dtype),
            g_gb.to(gn_bias.dtype), *(t.to(p.dtype) for t, p in zip(g_ws, weights)),
            *(t.to(p.dtype) for t, p in zip(g_bs, biases))]


# --------------------------------------------------------------------------------------------------
# MSCAM attention: d · CAB(d) · SAB(d · CAB(d))  (docs/models.md#mscam)
# --------------------------------------------------------------------------------------------------
def _mscam_math(x, fc1, fc2, sab_weight, activation):
    """The plain CAB then SAB composition, with every intermediate the backward needs."""
    avg = F.adaptive_avg_pool2d(x, 1)
    mx, mx_idx = F.adaptive_max_pool2d(x, 1, return_indices=True)
    h_avg, h_max = F.conv2d(avg, fc1), F.conv2d(mx, fc1)
    r_avg, r_max = activate(h_avg, activation), activate(h_max, activation)
    ca = torch.sigmoid(F.conv2d(r_avg, fc2) + F.conv2d(r_max, fc2))  # (N, C, 1, 1)
    d1 = ca * x
    s_max, s_idx = torch.max(d1, dim=1, keepdim=True)
    s = torch.cat([torch.mean(d1, dim=1, keepdim=True), s_max], dim=1)
    k = sab_weight.shape[-1]
    sa = torch.sigmoid(F.conv2d(s, sab_weight, None, 1, k // 2))  # (N, 1, H, W)
    return sa * d1, dict(avg=avg, mx=mx, mx_idx=mx_idx, h_avg=h_avg, h_max=h_max, r_avg=r_avg, r_max=r_max, ca=ca,
                         d1=d1, s=s, s_idx=s_idx, sa=sa)


def _mscam_forward_only(x, fc1, fc2, sab_weight, activation):
    """The same math without what only the backward needs: max values without arg-max indices (``torch.max``
    with indices over channels_last channels is ~7× slower than ``amax``: 1.38 vs 0.20 ms at 6×64×56×56, 1
    thread), the shared MLP on the stacked [avg; max] vectors as two small GEMMs instead of four 1×1 convs, and the
    last product in place."""
    n, c = x.shape[:2]
    r = fc1.shape[0]
    pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))])  # (2N, C)
    z = activate(pooled @ fc1.view(r, c).t(), activation) @ fc2.view(c, r).t()
    ca = torch.sigmoid(z[:n] + z[n:]).view(n, c, 1, 1)
    d1 = x * ca
    s = torch.cat([d1.mean(1, keepdim=True), d1.amax(1, keepdim=True)], dim=1)
    k = sab_weight.shape[-1]
    return d1.mul_(torch.sigmoid(F.conv2d(s, sab_weight, None, 1, k // 2)))


def mscam_forward(x: Tensor, fc1: Tensor, fc2: Tensor, sab_weight: Tensor, activation: str) -> Tensor:
    """``x · ca · sa`` with ``ca = σ(fc2(act(fc1(avg(x)))) + fc2(act(fc1(max(x)))))`` (CAB, ``(N, C, 1, 1)``) and
    ``sa = σ(conv_k([mean_c(x·ca), max_c(x·ca)]))`` (SAB, ``(N, 1, H, W)``)."""
    dt = _compute_dtype(x)
    xs, w1, w2, ws = _upcast([x, fc1, fc2, sab_weight], dt)
    return _finish(_mscam_forward_only(xs, w1, w2, ws, activation), x)


def mscam_backward(grad: Tensor, x: Tensor, fc1: Tensor, fc2: Tensor, sab_weight: Tensor,
                   activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad x, grad fc1, grad fc2, grad sab_weight), recomputing the forward from ``x``. The max reductions
    route their gradient to the arg-max returned by the same aten ops the plain modules use."""
    dt = _compute_dtype(x)
    xs, w1, w2, ws, g = _upcast([x, fc1, fc2, sab_weight, grad], dt)
    _, t = _mscam_math(xs, w1, w2, ws, activation)
    n, c, h, w = xs.shape
    sa, d1, ca = t["sa"], t["d1"], t["ca"]
    # out = sa · d1
    g_d1 = g * sa
    g_q = (g * d1).sum(1, keepdim=True) * sa * (1 - sa)  # through σ of the SAB conv output q
    g_s, g_ws, _ = conv_backward(g_q, t["s"], ws, 1, 1)
    g_d1 = g_d1 + g_s[:, :1] / c  # channel mean
    g_d1 = g_d1.scatter_add(1, t["s_idx"], g_s[:, 1:])  # channel max
    # d1 = ca · x
    g_x = g_d1 * ca
    g_z = (g_d1 * xs).sum((2, 3), keepdim=True) * ca * (1 - ca)  # through σ of the CAB logits z
    g_r_avg, g_w2a, _ = conv_backward(g_z, t["r_avg"], w2, 1, 1)
    g_r_max, g_w2m, _ = conv_backward(g_z, t["r_max"], w2, 1, 1)
    g_h_avg = activate_backward(g_r_avg, t["h_avg"], activation)
    g_h_max = activate_backward(g_r_max, t["h_max"], activation)
    g_avg, g_w1a, _ = conv_backward(g_h_avg, t["avg"], w1, 1, 1)
    g_mx, g_w1m, _ = conv_backward(g_h_max, t["mx"], w1, 1, 1)
    g_x = g_x + g_avg / (h * w)  # global average pool
    g_x = (g_x.reshape(n, c, h * w)  # global max pool: to the arg-max pixel
           .scatter_add(2, t["mx_idx"].reshape(n, c, 1), g_mx.reshape(n, c, 1)).reshape(n, c, h, w))
    return (g_x.to(x.dtype).contiguous(memory_format=output_memory_format(x)), (g_w1a + g_w1m).to(fc1.dtype),
            (g_w2a + g_w2m).to(fc2.dtype), g_ws.to(sab_weight.dtype))


# --------------------------------------------------------------------------------------------------
# fused MUTATION loss statistics: CE and Dice sums of every subset of the upsampled heads
# --------------------------------------------------------------------------------------------------
def mutation_subsets(n: int) -> list[tuple[int, ...]]:
    """The non-empty subsets of ``range(n)`` in the order of ``emcad.losses.combine_heads``."""
    return [s for r in range(1, n + 1) for s in itertools.combinations(range(n), r)]


def _mutation_upsampled(logits: Sequence[Tensor], size: tuple[int, int], dt: torch.dtype) -> list[Tensor]:
    return [F.interpolate(z.to(dt), size=size, mode="bilinear", align_corners=False) if tuple(z.shape[-2:]) != size
            else z.to(dt) for z in logits]


def mutation_stats_forward(logits: list[Tensor], target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ce[S], inter[S, K], psq[S, K], tcount[K])``: over all pixels of the (B, H, W) ``target``, for each subset
    ``s`` of the heads (``mutation_subsets``) with ``p_s = softmax(sum_{i in s} up(logits[i]))``: the summed
    ``-log p_s[target]``, ``sum p_s[c] [target == c]``, ``sum p_s[c]^2``, and the class counts. The heads are
    upsampled once; one subset's softmax is alive at a time."""
    dt = _compute_dtype(logits[0])
    size = tuple(target.shape[-2:])
    k = logits[0].shape[1]
    ups = _mutation_upsampled(logits, size, dt)
    tgt = target.long().unsqueeze(1)
    onehot = torch.zeros_like(ups[0]).scatter_(1, tgt, 1.0)
    tcount = onehot.sum((0, 2, 3))
    ce, inter, psq = [], [], []
    for s in mutation_subsets(len(ups)):
        z = ups[s[0]]
        for i in s[1:]:
            z = z + ups[i]
        logp = torch.log_softmax(z, dim=1)
        ce.append(-logp.gather(1, tgt).sum())
        p = logp.exp_()
        inter.append((p * onehot).sum((0, 2, 3)))
        psq.append((p * p).sum((0, 2, 3)))
        del z, logp, p
    sdt = stats_dtype(logits[0].dtype)
    return (torch.stack(ce).to(sdt), torch.stack(inter).to(sdt).reshape(-1, k), torch.stack(psq).to(sdt),
            tcount.to(sdt))


def mutation_stats_backward(grad_ce: Tensor, grad_inter: Tensor, grad_psq: Tensor, logits: list[Tensor],
                            target: Tensor) -> list[Tensor]:
    """Gradients of ``<grad_ce, ce> + <grad_inter, inter> + <grad_psq, psq>`` w.r.t. each head, analytically:
    per pixel ``dz_s = grad_ce[s] (p_s - onehot) + p_s (g - <g, p_s>)`` with
    ``g = grad_inter[s] onehot + 2 grad_psq[s] p_s``; ``G_i = sum_{s contains i} dz_s``; the head's gradient is
    the bilinear adjoint of ``G_i`` (aten's ``upsample_bilinear2d_backward``)."""
    dt = _compute_dtype(logits[0])
    size = tuple(target.shape[-2:])
    ups = _mutation_upsampled(logits, size, dt)
    tgt = target.long().unsqueeze(1)
    onehot = torch.zeros_like(ups[0]).scatter_(1, tgt, 1.0)
    gce, gin, gps = (g.to(dt) for g in (grad_ce, grad_inter, grad_psq))
    acc: list[Optional[Tensor]] = [None] * len(ups)
    for j, s in enumerate(mutation_subsets(len(ups))):
        z = ups[s[0]]
        for i in s[1:]:
            z = z + ups[i]
        p = torch.softmax(z, dim=1)
        del z
        gi = gin[j].view(1, -1, 1, 1)
        gp = gps[j].view(1, -1, 1, 1)
        g = gi * onehot + 2 * gp * p
        dz = gce[j] * (p - onehot) + p * (g - (g * p).sum(1, keepdim=True))
        del p, g
        for i in s:
            acc[i] = dz if acc[i] is None else acc[i] + dz
    out = []
    for z, gz in zip(logits, acc):
        h, w = z.shape[-2:]
        if (h, w) != size:
            gz = torch.ops.aten.upsample_bilinear2d_backward(gz, list(size), list(z.shape), False, None, None)
        out.append(gz.to(z.dtype).contiguous(memory_format=output_memory_format(z)))
    return out


# --------------------------------------------------------------------------------------------------
# PVTv2 Mix-FFN middle: depthwise 3×3 + bias + GELU on the token layout (B, H·W, C)
# --------------------------------------------------------------------------------------------------
def token_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, H·W, C) tokens as a (B, C, H, W) map: a channels_last view when the tokens are contiguous."""
    b, _, c = tokens.shape
    return tokens.reshape(b, height, width, c).permute(0, 3, 1, 2)


def map_tokens(z: Tensor) -> Tensor:
    """(B, C, H, W) map back to contiguous (B, H·W, C) tokens."""
    b, c, h, w = z.shape
    return z.permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()


def token_dwconv_gelu_forward(x: Tensor, weight: Tensor, bias: Tensor, height: int, width: int) -> Tensor:
    """``GELU(dwconv3×3(x as an H×W map) + bias)`` (exact erf GELU, zero padding 1), as contiguous tokens."""
    dt = _compute_dtype(x)
    xs, w, b = _upcast([x, weight, bias], dt)
    z = F.conv2d(token_map(xs, height, width), w, b, 1, 1, 1, w.shape[0])
    return map_tokens(F.gelu(z)).to(x.dtype)


def token_dwconv_gelu_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, height: int,
                               width: int) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad weight, grad bias), recomputing the conv output from ``x``."""
    dt = _compute_dtype(x)
    xs, w, b, g = _upcast([x, weight, bias, grad], dt)
    xm = token_map(xs, height, width)
    z = F.conv2d(xm, w, b, 1, 1, 1, w.shape[0])
    g_z = torch.ops.aten.gelu_backward(token_map(g, height, width).contiguous(memory_format=torch.channels_last), z)
    g_x, g_w, g_b = conv_backward(g_z, xm, w, 1, w.shape[0], bias=True)
    return map_tokens(g_x).to(x.dtype), g_w.to(weight.dtype), g_b.to(bias.dtype)
