"""FLOP accounting for the fused ops, so fused models count what the plain ones count.

* ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 × MACs, BatchNorm and activations not counted):
  a formula is registered for every forward and backward op of every backend. Both delegate to torch's own
  convolution formulas for the convolutions the op fuses, so fused and plain modules count the same, in forward
  and in backward (assuming, as in training, that input and weight gradients are both needed). Note that
  FlopCounterMode copies the formula registry when it is created: ops of a backend loaded later are not seen.
* fvcore (which counts MACs, through TorchScript tracing): ``FVCORE_HANDLES`` maps op names to handles; pass it
  as ``FlopCountAnalysis(model, inputs).set_op_handle(**FVCORE_HANDLES)``. Only convolution MACs are counted,
  like fvcore does for the plain convolutions.

The MAC formulas themselves (``msdc_macs`` & co.) are plain functions of shapes, shared by both counters.
"""

from __future__ import annotations

from typing import Sequence

from torch.utils.flop_counter import conv_backward_flop, conv_flop_count, register_flop_formula


def _prod(*xs: int) -> int:
    out = 1
    for v in xs:
        out *= int(v)
    return out


def msdc_macs(x_shape: Sequence[int], weight_shapes: Sequence[Sequence[int]], out_hw: Sequence[int]) -> list[int]:
    """MACs of each depthwise branch (one per weight)."""
    n, c = x_shape[0], x_shape[1]
    return [_prod(n, c, *out_hw, ws[-2], ws[-1]) for ws in weight_shapes]


def updw_macs(x_shape: Sequence[int], weight_shape: Sequence[int], scale: int) -> int:
    n, c, h, w = x_shape
    return _prod(n, c, h * scale, w * scale, weight_shape[-2], weight_shape[-1])


def lgag_macs(g_shape, x_shape, wg_shape, wx_shape, wpsi_shape) -> list[int]:
    """MACs of (W_g conv, W_x conv, psi conv). Conv biases are not counted (as FlopCounterMode does)."""
    n, _, h, w = x_shape
    conv_g = _prod(n, h, w, *wg_shape)  # out_channels * (in/groups) * kh * kw per pixel
    conv_x = _prod(n, h, w, *wx_shape)
    conv_psi = _prod(n, h, w, *wpsi_shape)
    return [conv_g, conv_x, conv_psi]


# --------------------------------------------------------------------------------------------------
# FlopCounterMode formulas (registered per backend op by library.py)
# --------------------------------------------------------------------------------------------------
def _conv_fwd(x_shape, w_shape, out_shape) -> int:
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


def _conv_bwd(x_shape, w_shape, out_shape, stride, groups) -> int:
    """What FlopCounterMode counts for the ``aten.convolution_backward`` of the plain module (input and weight
    gradients), computed by torch's own formula so that fused and plain counts agree exactly."""
    k = w_shape[-1]
    return conv_backward_flop(list(out_shape), list(x_shape), list(w_shape), None, [stride] * 2, [k // 2] * 2,
                              [1, 1], False, [0, 0], groups, [True, True, False],
                              out_val=(list(x_shape), list(w_shape), None))


def _out_hw(size: Sequence[int], k: int, stride: int) -> list[int]:
    return [(s + 2 * (k // 2) - k) // stride + 1 for s in size]


def _msdc_convs(x, weights, stride):
    """(input shape, weight shape, output shape) of every depthwise branch."""
    return [(x, w, [x[0], x[1], *_out_hw(x[2:], w[-1], stride)]) for w in weights]


def register_msdc(fwd_op, bwd_op) -> None:
    @register_flop_formula(fwd_op._opoverload._overloadpacket)
    def _fwd(x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat, shuffle_groups, stride,
             out_shape=None, **kwargs):
        return sum(_conv_fwd(*conv) for conv in _msdc_convs(x, weights, stride))

    @register_flop_formula(bwd_op._opoverload._overloadpacket)
    def _bwd(grad, x, weights, bn_weight, bn_bias, save_mean, save_var, training, eps, activation, concat,
             shuffle_groups, stride, out_shape=None, **kwargs):
        return sum(_conv_bwd(*conv, stride, x[1]) for conv in _msdc_convs(x, weights, stride))


def _updw_conv(x, weight, scale):
    up = [x[0], x[1], x[2] * scale, x[3] * scale]
    return up, weight, up


def register_updw(fwd_op, bwd_op) -> None:
    @register_flop_formula(fwd_op._opoverload._overloadpacket)
    def _fwd(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale, out_shape=None,
             **kwargs):
        return _conv_fwd(*_updw_conv(x, weight, scale))

    @register_flop_formula(bwd_op._opoverload._overloadpacket)
    def _bwd(grad, x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps, mode, activation, scale,
             out_shape=None, **kwargs):
        return _conv_bwd(*_updw_conv(x, weight, scale), 1, x[1])


def _lgag_convs(g, x, wg, wx, wpsi):
    """(input, weight, output, groups) of the W_g, W_x and psi convolutions."""
    n, _, h, w = x
    f_int = wg[0]
    return [(g, wg, [n, f_int, h, w], g[1] // wg[1]), (x, wx, [n, f_int, h, w], x[1] // wx[1]),
            ([n, f_int, h, w], wpsi, [n, 1, h, w], 1)]


def register_lgag(fwd_op, bwd_op) -> None:
    @register_flop_formula(fwd_op._opoverload._overloadpacket)
    def _fwd(g, x, wg, bg, wx, bx, wpsi, *args, out_shape=None, **kwargs):
        return sum(_conv_fwd(i, w, o) for i, w, o, _ in _lgag_convs(g, x, wg, wx, wpsi))

    @register_flop_formula(bwd_op._opoverload._overloadpacket)
    def _bwd(grad, g, x, wg, bg, wx, bx, wpsi, *args, out_shape=None, **kwargs):
        return sum(_conv_bwd(i, w, o, 1, groups) for i, w, o, groups in _lgag_convs(g, x, wg, wx, wpsi))


# --------------------------------------------------------------------------------------------------
# grouped multi-dilation depthwise convs (layernorm_dilated_dwconv, dilated_dwconv_groupnorm)
# --------------------------------------------------------------------------------------------------
def grouped_dwconv_macs(x_shape: Sequence[int], weight_shapes: Sequence[Sequence[int]]) -> list[int]:
    """MACs of each group's depthwise conv (same-size output, any dilation; biases and norms not counted)."""
    n, _, h, w = x_shape
    return [_prod(n, ws[0], h, w, ws[-2], ws[-1]) for ws in weight_shapes]


def _grouped_dw_convs(x, weights, dilations):
    """(input shape, weight shape, output shape, dilation) of every group's depthwise conv."""
    n, _, h, w = x
    return [([n, ws[0], h, w], ws, [n, ws[0], h, w], d) for ws, d in zip(weights, dilations)]


def _dilated_conv_bwd(x_shape, w_shape, out_shape, dilation) -> int:
    """FlopCounterMode's count for ``aten.convolution_backward`` of a same-size depthwise conv with bias (input,
    weight and bias gradients requested, as the plain module does in training)."""
    pad = dilation * (w_shape[-1] // 2)
    return conv_backward_flop(list(out_shape), list(x_shape), list(w_shape), None, [1, 1], [pad, pad],
                              [dilation, dilation], False, [0, 0], w_shape[0], [True, True, True],
                              out_val=(list(x_shape), list(w_shape), [w_shape[0]]))


def register_lndw(fwd_op, bwd_op) -> None:
    @register_flop_formula(fwd_op._opoverload._overloadpacket)
    def _fwd(x, ln_weights, ln_biases, weights, biases, dilations, eps, out_shape=None, **kwargs):
        return sum(_conv_fwd(i, w, o) for i, w, o, _ in _grouped_dw_convs(x, weights, dilations))

    @register_flop_formula(bwd_op._opoverload._overloadpacket)
    def _bwd(grad, x, ln_weights, ln_biases, weights, biases, dilations, eps, out_shape=None, **kwargs):
        return sum(_dilated_conv_bwd(*conv) for conv in _grouped_dw_convs(x, weights, dilations))


def register_dwgn(fwd_op, bwd_op) -> None:
    @register_flop_formula(fwd_op._opoverload._overloadpacket)
    def _fwd(x, weights, biases, gn_weight, gn_bias, dilations, eps, out_shape=None, **kwargs):
        return sum(_conv_fwd(i, w, o) for i, w, o, _ in _grouped_dw_convs(x, weights, dilations))

    @register_flop_formula(bwd_op._opoverload._overloadpacket)
    def _bwd(grad, x, weights, biases, gn_weight, gn_bias, dilations, eps, out_shape=None, **kwargs):
        return sum(_dilated_conv_bwd(*conv) for conv in _grouped_dw_convs(x, weights, dilations))



# --------------------------------------------------------------------------------------------------
# mscam (CAB · SAB)
# --------------------------------------------------------------------------------------------------
def _mscam_convs(x, fc1, fc2, sab_weight):
    """(input, weight, output) of the plain modules' convolutions: fc1 and fc2 on the average and the max
    pooled vectors (4 convs), then the SAB conv on the 2-channel map."""
    n, c, h, w = x
    r = fc1[0]
    return [([n, c, 1, 1], fc1, [n, r, 1, 1])] * 2 + [([n, r, 1, 1], fc2, [n, fc2[0], 1, 1])] * 2 + \
        [([n, 2, h, w], sab_weight, [n, 1, h, w])]


def register_mscam(fwd_op, bwd_op) -> None:
    @register_flop_formula(fwd_op._opoverload._overloadpacket)
    def _fwd(x, fc1, fc2, sab_weight, activation, out_shape=None, **kwargs):
        return sum(_conv_fwd(*conv) for conv in _mscam_convs(x, fc1, fc2, sab_weight))

    @register_flop_formula(bwd_op._opoverload._overloadpacket)
    def _bwd(grad, x, fc1, fc2, sab_weight, activation, out_shape=None, **kwargs):
        return sum(_conv_bwd(*conv, 1, 1) for conv in _mscam_convs(x, fc1, fc2, sab_weight))

# --------------------------------------------------------------------------------------------------
# fvcore handles (MACs)
# --------------------------------------------------------------------------------------------------
def _jit_shape(value):
    return value.type().sizes()


def _fv_msdc(inputs, outputs) -> int:
    x = _jit_shape(inputs[0])
    weights = [_jit_shape(v) for v in inputs[1].node().inputs()]
    return sum(msdc_macs(x, weights, _jit_shape(outputs[0])[2:]))


def _fv_updw(inputs, outputs) -> int:
    x, w = _jit_shape(inputs[0]), _jit_shape(inputs[1])
    scale = _jit_shape(outputs[0])[2] // x[2]
    return updw_macs(x, w, scale)


def _fv_lgag(inputs, outputs) -> int:
    shapes = [_jit_shape(inputs[i]) for i in (0, 1, 2, 4, 6)]
    return sum(lgag_macs(*shapes))


def _fv_lndw(inputs, outputs) -> int:
    x = _jit_shape(inputs[0])
    weights = [_jit_shape(v) for v in inputs[3].node().inputs()]
    return sum(grouped_dwconv_macs(x, weights))


def _fv_dwgn(inputs, outputs) -> int:
    x = _jit_shape(inputs[0])
    weights = [_jit_shape(v) for v in inputs[1].node().inputs()]
    return sum(grouped_dwconv_macs(x, weights))


def fvcore_handles(backends: Sequence[str]) -> dict:
    handles = {}
    for b in backends:
        handles[f"emcad_kernels::msdc_fwd_{b}"] = _fv_msdc
        handles[f"emcad_kernels::updw_fwd_{b}"] = _fv_updw
        handles[f"emcad_kernels::lgag_fwd_{b}"] = _fv_lgag
        handles[f"emcad_kernels::lndw_fwd_{b}"] = _fv_lndw
        handles[f"emcad_kernels::dwgn_fwd_{b}"] = _fv_dwgn
    return handles
