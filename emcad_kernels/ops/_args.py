"""Argument checks, BatchNorm handling and fake-tensor helpers shared by the op files.

Every error names the argument and says what was expected.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ..reference import output_memory_format, stats_dtype

# Parameter-free activations, in the order of their kernel codes (csrc/common/codes.h, triton/_utils.py).
ACTIVATIONS = ("identity", "relu", "relu6", "leakyrelu", "hswish", "gelu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_KERNEL_SIZE = 9  # depthwise kernels of the MSDC-like ops; every backend's limit is at most this


class BatchNormParams(NamedTuple):
    """BatchNorm state as explicit tensors. ``weight``/``bias`` may be None (affine=False), the running
    statistics may be None (track_running_stats=False: batch statistics are then always used)."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]

    @classmethod
    def from_module(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> "BatchNormParams":
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var)


BatchNormLike = Union[BatchNormParams, Sequence[Optional[Tensor]], torch.nn.modules.batchnorm._BatchNorm]


def check_tensor(name: str, t, dim: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor, got shape {tuple(t.shape)}")
    return t


def check_input(name: str, x) -> Tensor:
    check_tensor(name, x, 4)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_like(name: str, t: Tensor, x: Tensor, *, allow_fp32: bool = False) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    if t.dtype != x.dtype and not (allow_fp32 and t.dtype == torch.float32):
        extra = " (or float32)" if allow_fp32 else ""
        raise TypeError(f"{name} has dtype {t.dtype}, expected {x.dtype}{extra} like the input")


def check_activation(activation) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


def check_depthwise_weight(name: str, w, channels: int, x: Tensor) -> int:
    """A ``[C, 1, k, k]`` depthwise weight with odd ``k <= MAX_KERNEL_SIZE``; returns ``k``."""
    check_tensor(name, w, 4)
    check_like(name, w, x)
    c_out, c_in, kh, kw = w.shape
    if c_out != channels or c_in != 1:
        raise ValueError(f"{name} must have shape [{channels}, 1, k, k] for a depthwise conv over {channels} "
                         f"channels, got {tuple(w.shape)}")
    if kh != kw or kh % 2 == 0 or kh > MAX_KERNEL_SIZE:
        raise ValueError(f"{name} must have a square odd kernel size <= {MAX_KERNEL_SIZE}, got {kh}x{kw}")
    return int(kh)


class BatchNormArgs(NamedTuple):
    """One BatchNorm normalised for the kernels: affine and statistics tensors always present."""

    weight: Tensor
    bias: Tensor
    mean: Tensor  # running mean, or zeros when batch statistics are used
    var: Tensor
    running_mean: Optional[Tensor]  # what ``update_running_stats`` writes (None: not tracked)
    running_var: Optional[Tensor]
    use_batch_stats: bool


def batch_norm_args(name: str, bn: BatchNormLike, channels: int, x: Tensor, training: bool) -> BatchNormArgs:
    if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
        bn = BatchNormParams.from_module(bn)
    if not isinstance(bn, (tuple, list)) or len(bn) != 4:
        raise TypeError(f"{name} must be BatchNormParams(weight, bias, running_mean, running_var), "
                        f"a 4-sequence of tensors, or an nn.BatchNorm2d")
    weight, bias, running_mean, running_var = bn
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must both be given or both be None")
    stat_dtype = stats_dtype(x.dtype)
    parts = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for part, t in parts.items():
        if t is not None:
            check_tensor(f"{name}.{part}", t, 1)
            if t.numel() != channels:
                raise ValueError(f"{name}.{part} has {t.numel()} elements, expected {channels} (the channels)")
            check_like(f"{name}.{part}", t, x, allow_fp32=True)

    def filled(t, value):
        return t if t is not None else torch.full((channels,), value, dtype=stat_dtype, device=x.device)

    return BatchNormArgs(filled(weight, 1.0), filled(bias, 0.0), filled(running_mean, 0.0), filled(running_var, 1.0),
                         running_mean, running_var, training or running_mean is None)


def same_batch_stats_mode(names: str, bns: Sequence[BatchNormArgs]) -> bool:
    use = bns[0].use_batch_stats
    if any(b.use_batch_stats != use for b in bns):
        raise ValueError(f"{names}: either all track running statistics or none does")
    return use


def check_batch_stats_count(count: int, name: str) -> None:
    if count <= 1:
        raise ValueError(f"{name}: training-mode BatchNorm needs more than 1 value per channel "
                         f"(batch × height × width = {count})")


def update_running_stats(stats: Sequence[tuple], count: int, momentum: float) -> None:
    """nn.BatchNorm2d's update, for the BNs of one fused call: exponential average of the mean and of the
    *unbiased* variance. ``stats`` holds ``(running_mean, running_var, batch_mean, batch_var)`` per BN; BNs without
    running statistics are skipped. ``_foreach`` ops do all BNs in three launches instead of five per BN."""
    stats = [s for s in stats if s[0] is not None]
    if not stats:
        return
    with torch.no_grad():
        unbiased = torch._foreach_mul([v for _, _, _, v in stats], count / (count - 1))
        running, batch = [], []
        for (rm, rv, mean, _), var in zip(stats, unbiased):
            running += [rm, rv]
            batch += [mean.to(rm.dtype), var.to(rv.dtype)]
        torch._foreach_mul_(running, 1.0 - momentum)
        torch._foreach_add_(running, batch, alpha=momentum)


def conv_out_size(size: int, k: int, stride: int) -> int:
    """Output size of a conv with odd kernel ``k`` and padding ``k // 2``."""
    return (size + 2 * (k // 2) - k) // stride + 1


# ---- fake tensors (shapes for torch.compile and opcheck) ----------------------------------------------
def empty_like_output(x: Tensor, shape) -> Tensor:
    """An op output for input ``x``: ``x``'s dtype and device, its memory format (``output_memory_format``)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def empty_stats(x: Tensor, *shape: int) -> Tensor:
    """Statistics output: float32 for fp16/bf16 inputs, else the input dtype."""
    return x.new_empty(shape, dtype=stats_dtype(x.dtype))


def dense_grad(grad: Tensor, x: Tensor) -> Tensor:
    """Kernels want a dense upstream gradient in the output's layout (autograd may hand over expanded views)."""
    return grad.contiguous(memory_format=output_memory_format(x))
