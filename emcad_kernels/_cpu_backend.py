"""Registers the ``cpu`` backend: fused C++/OpenMP kernels (``csrc/cpu``) for CPU tensors.

The kernels are the ``emcad_kernels::*_cpu_kernel`` ops of the compiled extension ``emcad_kernels._C``; this
module wraps them with the kernel interface of ``library.py`` and registers them as the custom ops
``emcad_kernels::<op>_fwd_cpu`` / ``<op>_bwd_cpu`` (fake, autograd, FLOP formulas). Priority 10: above the
reference backend, so ``auto`` picks it for every CPU call it supports. Without the extension the backend is
unavailable and says why (``_ext.CPU_EXT_ERROR``).

What the kernels support (``check`` refuses everything else with a reason; ``auto`` then uses ``reference``):

* CPU tensors of dtype float32, float64 or bfloat16 (bf16 computes in fp32);
* activations relu, relu6, leakyrelu (0.2), hswish, identity (not gelu);
* ``multi_scale_dwconv``: 1 to 8 branches, odd kernel sizes <= 9, stride 1 or 2, sum or concat, any shuffle;
* ``upsample_dwconv``: odd kernel sizes <= 9; nearest with scale 1 to 4, bilinear with scale 2;
* ``grouped_attention_gate``: odd kernel sizes <= 9; groups with at most 8 output and 16 input channels each
  (EMCAD: 1 and 2) run fused, other groupings (e.g. groups=1) run the reference composition in this backend.
* ``layernorm_dilated_dwconv`` / ``dilated_dwconv_groupnorm``: any number of channel groups, odd kernel sizes
  <= 9, any dilation (also beyond the image size).
* ``mscam``: any channel count and reduction ratio, odd SAB kernel sizes <= 9 (csrc/cpu/mscam.cpp); channels_last
  inputs run natively (vectors over channels), any other layout is read as NCHW (vectors over columns).
* ``mutation_stats`` (fused MUTATION loss): 1 to 4 heads of any size, any K >= 2 (csrc/cpu/mutation_loss.cpp).
Any memory layout and strides are read natively; outputs have the input's memory format.
"""

from __future__ import annotations

import inspect

import torch

from . import _ext, reference
from .backends import Backend, OpCall, register_backend
from .library import Kernels, OpSet, define_op_set

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
SUPPORTED_ACTIVATIONS = ("relu", "relu6", "leakyrelu", "hswish", "identity")
MAX_BRANCHES = 8
MAX_KERNEL_SIZE = 9
NEAREST_SCALES = (1, 2, 3, 4)
BILINEAR_SCALES = (2,)
MSDC_STRIDES = (1, 2)
LGAG_MAX_OUT_PER_GROUP = 8
LGAG_MAX_IN_PER_GROUP = 16
# ops whose kernels are implemented and verified; others are refused with a reason
IMPLEMENTED = ("multi_scale_dwconv", "upsample_dwconv", "grouped_attention_gate", "layernorm_dilated_dwconv",
               "dilated_dwconv_groupnorm", "mscam", "mutation_stats")
# kernel ops of the multi-dilation ops: an extension built before they existed lacks them
MULTIDILATION_KERNEL_OPS = {
    "layernorm_dilated_dwconv": ("lndw_fwd_cpu_kernel", "lndw_bwd_cpu_kernel"),
    "dilated_dwconv_groupnorm": ("dwgn_fwd_cpu_kernel", "dwgn_bwd_cpu_kernel"),
}
# kernel ops of the issue-8 ops: likewise missing from an older build
ISSUE8_KERNEL_OPS = {"mscam": ("mscam_fwd_cpu_kernel", "mscam_bwd_cpu_kernel"),
                     "mutation_stats": ("mutation_stats_fwd_cpu_kernel", "mutation_stats_bwd_cpu_kernel")}
# every op whose kernels an older extension may lack
LATE_KERNEL_OPS = {**MULTIDILATION_KERNEL_OPS, **ISSUE8_KERNEL_OPS}


def _k():
    return torch.ops.emcad_kernels


# --------------------------------------------------------------------------------------------------
# kernel interface (see library.py) -> C++ entry points
# --------------------------------------------------------------------------------------------------
def msdc_forward(x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat, shuffle_groups,
                 stride):
    return _k().msdc_fwd_cpu_kernel(x, list(weights), bn_weight, bn_bias, mean, var, training, eps, activation,
                                    concat, shuffle_groups, stride)


def msdc_backward(grad, x, weights, bn_weight, bn_bias, save_mean, save_var, training, eps, activation, concat,
                  shuffle_groups, stride):
    gx, gbw, gbb, *gws = _k().msdc_bwd_cpu_kernel(grad, x, list(weights), bn_weight, bn_bias, save_mean, save_var,
                                                  training, eps, activation, concat, shuffle_groups, stride)
    return gx, list(gws), gbw, gbb


def updw_forward(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale):
    return _k().updw_fwd_cpu_kernel(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation,
                                    scale)


def updw_backward(grad, x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps, mode, activation,
                  scale):
    return tuple(_k().updw_bwd_cpu_kernel(grad, x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps,
                                          mode, activation, scale))


def _lgag_fused(wg, groups) -> bool:
    """The fused LGAG kernels hold whole groups in one vector block: at most LGAG_MAX_OUT_PER_GROUP output
    channels and LGAG_MAX_IN_PER_GROUP input channels per group. Other groupings (e.g. a dense conv,
    groups=1) run the reference composition inside this backend."""
    return wg.shape[0] // groups <= LGAG_MAX_OUT_PER_GROUP and wg.shape[1] <= LGAG_MAX_IN_PER_GROUP


def lgag_forward(g, x, wg, bg, wx, bx, wpsi, bpsi, *rest):
    groups = rest[14]
    if not (_lgag_fused(wg, groups) and wx.shape[1] <= LGAG_MAX_IN_PER_GROUP):
        return reference.lgag_forward(g, x, wg, bg, wx, bx, wpsi, bpsi, *rest)
    return tuple(_k().lgag_fwd_cpu_kernel(g, x, wg, bg, wx, bx, wpsi, bpsi, *rest))


def lgag_backward(grad, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias,
                  bn_psi_weight, bn_psi_bias, save_stats, training, eps, groups, activation, add_gate_input):
    if not (_lgag_fused(wg, groups) and wx.shape[1] <= LGAG_MAX_IN_PER_GROUP):
        return reference.lgag_backward(grad, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight,
                                       bn_x_bias, bn_psi_weight, bn_psi_bias, list(save_stats), training, eps,
                                       groups, activation, add_gate_input)
    return list(_k().lgag_bwd_cpu_kernel(grad, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias,
                                         bn_x_weight, bn_x_bias, bn_psi_weight, bn_psi_bias, list(save_stats),
                                         training, eps, groups, activation, add_gate_input))


def lndw_forward(x, ln_weights, ln_biases, weights, biases, dilations, eps):
    return _k().lndw_fwd_cpu_kernel(x, list(ln_weights), list(ln_biases), list(weights), list(biases),
                                    list(dilations), eps)


def lndw_backward(grad, x, ln_weights, ln_biases, weights, biases, dilations, eps):
    gx, *rest = _k().lndw_bwd_cpu_kernel(grad, x, list(ln_weights), list(ln_biases), list(weights), list(biases),
                                         list(dilations), eps)
    g = len(weights)
    return gx, rest[:g], rest[g:2 * g], rest[2 * g:3 * g], rest[3 * g:]


def dwgn_forward(x, weights, biases, gn_weight, gn_bias, dilations, eps):
    return _k().dwgn_fwd_cpu_kernel(x, list(weights), list(biases), gn_weight, gn_bias, list(dilations), eps)


def dwgn_backward(grad, x, weights, biases, gn_weight, gn_bias, dilations, eps):
    gx, ggw, ggb, *rest = _k().dwgn_bwd_cpu_kernel(grad, x, list(weights), list(biases), gn_weight, gn_bias,
                                                   list(dilations), eps)
    g = len(weights)
    return gx, rest[:g], rest[g:], ggw, ggb


def mscam_forward(x, fc1, fc2, sab_weight, activation):
    return _k().mscam_fwd_cpu_kernel(x, fc1, fc2, sab_weight, activation)


def mscam_backward(grad, x, fc1, fc2, sab_weight, activation):
    return tuple(_k().mscam_bwd_cpu_kernel(grad, x, fc1, fc2, sab_weight, activation))


def mutation_stats_forward(logits, target):
    return tuple(_k().mutation_stats_fwd_cpu_kernel(list(logits), target))


def mutation_stats_backward(grad_ce, grad_inter, grad_psq, logits, target):
    return list(_k().mutation_stats_bwd_cpu_kernel(grad_ce, grad_inter, grad_psq, list(logits), target))


def _has_kernel_ops(op: str) -> bool:
    ops = LATE_KERNEL_OPS.get(op, ())
    return all(hasattr(_k(), name) for name in ops)


CPU_KERNELS = Kernels(
    msdc_forward=msdc_forward, msdc_backward=msdc_backward,
    updw_forward=updw_forward, updw_backward=updw_backward,
    lgag_forward=lgag_forward, lgag_backward=lgag_backward,
    lndw_forward=lndw_forward, lndw_backward=lndw_backward,
    dwgn_forward=dwgn_forward, dwgn_backward=dwgn_backward,
    mscam_forward=mscam_forward, mscam_backward=mscam_backward,
    mutation_stats_forward=mutation_stats_forward, mutation_stats_backward=mutation_stats_backward,
)


# --------------------------------------------------------------------------------------------------
# capability check
# --------------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check(call: OpCall) -> list[str]:
    """Reasons why the cpu kernels cannot run ``call`` (empty: they can)."""
    reasons = []
    if call.op not in IMPLEMENTED:
        reasons.append(f"{call.op} not implemented in the cpu backend yet")
    elif call.op in LATE_KERNEL_OPS and _ext.HAS_CPU_EXT and not _has_kernel_ops(call.op):
        reasons.append(f"{call.op}: the built extension lacks its kernels (stale build?); {_ext.BUILD_HINT}")
    if call.device != "cpu":
        reasons.append(f"tensor is on {call.device}")
    if call.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {_dtype_name(call.dtype)} not supported")
    if call.activation not in SUPPORTED_ACTIVATIONS:
        reasons.append(f"activation {call.activation} not supported")
    for k in call.kernel_sizes:
        if k % 2 == 0 or k > MAX_KERNEL_SIZE or k < 1:
            reasons.append(f"kernel size {k} not supported")
    if call.op == "multi_scale_dwconv":
        if call.stride not in MSDC_STRIDES:
            reasons.append(f"stride {call.stride} not supported")
        if len(call.kernel_sizes) > MAX_BRANCHES:
            reasons.append(f"{len(call.kernel_sizes)} branches not supported (at most {MAX_BRANCHES})")
    elif call.op == "upsample_dwconv":
        if call.mode == "bilinear" and call.scale not in BILINEAR_SCALES:
            reasons.append(f"bilinear scale {call.scale} not supported")
        elif call.mode == "nearest" and call.scale not in NEAREST_SCALES:
            reasons.append(f"nearest scale {call.scale} not supported")
        elif call.mode not in ("nearest", "bilinear"):
            reasons.append(f"upsample mode {call.mode} not supported")
    return reasons


def _load() -> OpSet:
    _ext.require_cpu_ext()
    return define_op_set("cpu", CPU_KERNELS, device_types=("cpu",))


_register_kwargs = {"load_now": True} if "load_now" in inspect.signature(register_backend).parameters else {}
register_backend(Backend(name="cpu", priority=10, load=_load, check=check,
                         description="fused C++/OpenMP CPU kernels (emcad_kernels._C)"), **_register_kwargs)
