"""Registers the ``cuda`` backend: the hand-written CUDA kernels of ``csrc/cuda`` (extension ``emcad_kernels._C_cuda``).

The extension is built by ``pip install --no-build-isolation -e .`` when torch has CUDA and nvcc is found (or with
``FORCE_CUDA=1``). It registers ``torch.ops.emcad_kernels.<op>_{fwd,bwd}_cuda_kernel`` for the CUDA dispatch key;
this module wraps them into the kernel interface of ``library.py`` so that ``define_op_set("cuda", ...)`` gives
the custom ops ``emcad_kernels::<op>_{fwd,bwd}_cuda`` with fake tensors, autograd and FLOP formulas.

Without the extension (CPU-only machines) the backend is registered but unavailable, with the reason
"CUDA extension not built (...)"; ``import emcad_kernels`` never fails because of it.

Coverage (anything else is refused by ``check`` with a reason, so ``auto`` picks another backend):

* every op: CUDA tensors, float32 / float16 / bfloat16 (fp32 accumulation) and float64, all activations,
  NCHW and channels_last (other layouts are made dense first);
* ``multi_scale_dwconv``: 1-4 branches, odd kernel sizes <= 7, stride 1, sum or concat, any shuffle groups;
* ``upsample_dwconv``: nearest, scale 2, 3x3 (four 2x2 polyphase stencils);
* ``grouped_attention_gate``: 3x3 grouped convs with one gate channel per group (F_int == groups) and at most 4
  input channels per group (EMCAD: 2). Other channel layouts, which ``check`` cannot see, run the reference
  composite on the GPU inside this backend (with a one-time warning), as do empty inputs.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from . import reference
from .backends import Backend, OpCall, register_backend
from .library import Kernels, define_op_set

NOT_BUILT = "CUDA extension not built (torch has no CUDA / nvcc not found at install time)"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACTIVATIONS = ("relu", "relu6", "leakyrelu", "gelu", "hswish", "identity")
MAX_BRANCHES = 4
MAX_KERNEL_SIZE = 7
MAX_CHANNELS_PER_GROUP = 4

_extension = None
_warned: set[str] = set()


def load_extension():
    """Imports ``emcad_kernels._C_cuda`` (which registers the ``*_cuda_kernel`` ops) or raises ImportError saying
    why it is unavailable."""
    global _extension
    if _extension is None:
        try:
            _extension = importlib.import_module("emcad_kernels._C_cuda")
        except ModuleNotFoundError:
            raise ImportError(NOT_BUILT) from None
        except ImportError as e:  # built, but not loadable here (other torch / CUDA ABI)
            raise ImportError(f"CUDA extension emcad_kernels._C_cuda failed to load: {e}") from None
    return _extension


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _lgag_native(g, x, wg, groups) -> bool:
    """Whether the CUDA kernels cover this channel layout (one gate channel per group, <= 4 inputs per group)."""
    if g.numel() == 0 or x.numel() == 0 or wg.shape[-1] != 3 or wg.shape[0] != groups:
        return False
    cg, cx = g.shape[1], x.shape[1]
    return (cg % groups == 0 and cx % groups == 0 and cg // groups <= MAX_CHANNELS_PER_GROUP
            and cx // groups <= MAX_CHANNELS_PER_GROUP)


def _lgag_fallback_warning(g, x, wg, groups):
    if g.numel() and x.numel():
        _warn_once(f"lgag{g.shape[1]}/{x.shape[1]}/{tuple(wg.shape)}/{groups}",
                   f"emcad_kernels cuda backend: grouped_attention_gate with g channels {g.shape[1]}, x channels "
                   f"{x.shape[1]}, weight {tuple(wg.shape)} and groups={groups} is not covered by the CUDA kernels "
                   "(they need F_int == groups, <= 4 input channels per group, 3x3); running the reference "
                   "composite on the GPU")


# --------------------------------------------------------------------------------------------------
# kernel interface (library.py) on top of the C++ ops
# --------------------------------------------------------------------------------------------------
def make_kernels(namespace: str = "emcad_kernels") -> Kernels:
    """The kernel interface implemented with the C++ ops ``torch.ops.<namespace>.*_cuda_kernel``. (The test suite
    uses ``namespace="emcad_kernels_emu"``: the same binding compiled for the CPU over the emulated kernels.)"""

    def ops():
        return getattr(torch.ops, namespace)

    def msdc_forward(x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat, shuffle_groups,
                     stride):
        if x.numel() == 0:
            return reference.msdc_forward(x, weights, bn_weight, bn_bias, mean, var, training, eps, activation,
                                          concat, shuffle_groups, stride)
        y, save_mean, save_var = ops().msdc_fwd_cuda_kernel(x, list(weights), bn_weight, bn_bias, mean, var,
                                                            bool(training), float(eps), activation, bool(concat),
                                                            int(shuffle_groups))
        return y, save_mean, save_var

    def msdc_backward(grad, x, weights, bn_weight, bn_bias, save_mean, save_var, training, eps, activation, concat,
                      shuffle_groups, stride):
        if x.numel() == 0:
            return reference.msdc_backward(grad, x, weights, bn_weight, bn_bias, save_mean, save_var, training, eps,
                                           activation, concat, shuffle_groups, stride)
        gx, gbw, gbb, *gws = ops().msdc_bwd_cuda_kernel(grad, x, list(weights), bn_weight, bn_bias, save_mean,
                                                        save_var, bool(training), float(eps), activation,
                                                        bool(concat), int(shuffle_groups))
        return gx, list(gws), gbw, gbb

    def updw_forward(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale):
        if x.numel() == 0:
            return reference.updw_forward(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation,
                                          scale)
        y, save_mean, save_var = ops().updw_fwd_cuda_kernel(x, weight, bn_weight, bn_bias, mean, var,
                                                            bool(training), float(eps), mode, activation, int(scale))
        return y, save_mean, save_var

    def updw_backward(grad, x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps, mode, activation,
                      scale):
        if x.numel() == 0:
            return reference.updw_backward(grad, x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps,
                                           mode, activation, scale)
        gx, gw, gbw, gbb = ops().updw_bwd_cuda_kernel(grad, x, weight, bn_weight, bn_bias, save_mean, save_var,
                                                      bool(training), float(eps), mode, activation, int(scale))
        return gx, gw, gbw, gbb

    def lgag_forward(g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, mean_g, var_g, bn_x_weight,
                     bn_x_bias, mean_x, var_x, bn_psi_weight, bn_psi_bias, mean_psi, var_psi, training, eps, groups,
                     activation, add_gate_input):
        if not _lgag_native(g, x, wg, groups):
            _lgag_fallback_warning(g, x, wg, groups)
            return reference.lgag_forward(g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, mean_g, var_g,
                                          bn_x_weight, bn_x_bias, mean_x, var_x, bn_psi_weight, bn_psi_bias,
                                          mean_psi, var_psi, training, eps, groups, activation, add_gate_input)
        bn = [bn_g_weight, bn_g_bias, mean_g, var_g, bn_x_weight, bn_x_bias, mean_x, var_x, bn_psi_weight,
              bn_psi_bias, mean_psi, var_psi]
        return tuple(ops().lgag_fwd_cuda_kernel(g, x, wg, bg, wx, bx, wpsi, bpsi, bn, bool(training), float(eps),
                                                int(groups), activation, bool(add_gate_input)))

    def lgag_backward(grad, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias,
                      bn_psi_weight, bn_psi_bias, save_stats, training, eps, groups, activation, add_gate_input):
        if not _lgag_native(g, x, wg, groups):
            return reference.lgag_backward(grad, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias,
                                           bn_x_weight, bn_x_bias, bn_psi_weight, bn_psi_bias, save_stats, training,
                                           eps, groups, activation, add_gate_input)
        bn_weights = [bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias, bn_psi_weight, bn_psi_bias]
        return list(ops().lgag_bwd_cuda_kernel(grad, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_weights, list(save_stats),
                                               bool(training), float(eps), int(groups), activation,
                                               bool(add_gate_input)))

    return Kernels(msdc_forward=msdc_forward, msdc_backward=msdc_backward, updw_forward=updw_forward,
                   updw_backward=updw_backward, lgag_forward=lgag_forward, lgag_backward=lgag_backward)


# --------------------------------------------------------------------------------------------------
# capability check and registration
# --------------------------------------------------------------------------------------------------
def check(call: OpCall) -> list[str]:
    reasons = []
    if call.device != "cuda":
        reasons.append(f"tensor is on {call.device}")
    if call.dtype not in DTYPES:
        reasons.append(f"unsupported dtype {call.dtype}")
    if call.activation not in ACTIVATIONS:
        reasons.append(f"unsupported activation {call.activation!r}")
    if call.op == "multi_scale_dwconv":
        if len(call.kernel_sizes) > MAX_BRANCHES:
            reasons.append(f"{len(call.kernel_sizes)} branches: the cuda backend supports at most {MAX_BRANCHES}")
        if any(k > MAX_KERNEL_SIZE or k % 2 == 0 for k in call.kernel_sizes):
            reasons.append(f"unsupported kernel size in {call.kernel_sizes}: the cuda backend supports odd kernel "
                           f"sizes up to {MAX_KERNEL_SIZE}")
        if call.stride != 1:
            reasons.append(f"unsupported stride {call.stride}: the cuda backend supports stride 1 only")
    elif call.op == "upsample_dwconv":
        if call.mode != "nearest":
            reasons.append(f"unsupported mode {call.mode!r}: the cuda backend supports 'nearest' only")
        if call.scale != 2:
            reasons.append(f"unsupported scale {call.scale}: the cuda backend supports scale 2 only")
        if tuple(call.kernel_sizes) != (3,):
            reasons.append(f"unsupported kernel size {call.kernel_sizes}: the cuda backend supports 3 only")
    elif call.op == "grouped_attention_gate":
        if tuple(call.kernel_sizes) != (3,):
            reasons.append(f"unsupported kernel size {call.kernel_sizes}: the cuda backend supports 3 only")
    return reasons


def _load():
    load_extension()
    return define_op_set("cuda", make_kernels(), device_types=("cuda",))


register_backend(Backend(
    name="cuda", priority=20, load=_load, check=check,
    description="hand-written CUDA C++ kernels (csrc/cuda), fp32/fp16/bf16/fp64, NCHW and channels_last"),
    load_now=True)
