"""Public functional API of the fused ops.

Each function validates its arguments (errors name the argument), picks a backend (``backends.py``), calls that
backend's custom op (``library.py``) and, in training mode, updates the BatchNorm running statistics in place
exactly like ``nn.BatchNorm2d`` (momentum, unbiased running variance). ``num_batches_tracked`` belongs to the
module and is not touched here, as with ``torch.nn.functional.batch_norm``.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import backends
from .backends import OpCall

ACTIVATIONS = ("relu", "relu6", "leakyrelu", "gelu", "hswish", "identity")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_KERNEL_SIZE = 9


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


# --------------------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, dim: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor, got shape {tuple(t.shape)}")
    return t


def _check_input(name: str, x) -> Tensor:
    _check_tensor(name, x, 4)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _check_like(name: str, t: Tensor, x: Tensor, *, allow_fp32: bool = False) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    if t.dtype != x.dtype and not (allow_fp32 and t.dtype == torch.float32):
        extra = " (or float32)" if allow_fp32 else ""
        raise TypeError(f"{name} has dtype {t.dtype}, expected {x.dtype}{extra} like the input")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_depthwise_weight(name: str, w, channels: int, x: Tensor) -> int:
    _check_tensor(name, w, 4)
    _check_like(name, w, x)
    c_out, c_in, kh, kw = w.shape
    if c_out != channels or c_in != 1:
        raise ValueError(f"{name} must have shape [{channels}, 1, k, k] for a depthwise conv over {channels} "
                         f"channels, got {tuple(w.shape)}")
    if kh != kw or kh % 2 == 0 or kh > MAX_KERNEL_SIZE:
        raise ValueError(f"{name} must have a square odd kernel size <= {MAX_KERNEL_SIZE}, got {kh}x{kw}")
    return kh


def _bn_tensors(name: str, bn: BatchNormLike, channels: int, x: Tensor, training: bool):
    """Normalises a BatchNorm argument to (weight, bias, mean, var, running_mean, running_var, use_batch_stats)."""
    if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
        bn = BatchNormParams.from_module(bn)
    if not isinstance(bn, (tuple, list)) or len(bn) != 4:
        raise TypeError(f"{name} must be BatchNormParams(weight, bias, running_mean, running_var), "
                        f"a 4-sequence of tensors, or an nn.BatchNorm2d")
    weight, bias, running_mean, running_var = bn
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must both be given or both be None")
    stat_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    parts = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for part, t in parts.items():
        if t is not None:
            _check_tensor(f"{name}.{part}", t, 1)
            if t.numel() != channels:
                raise ValueError(f"{name}.{part} has {t.numel()} elements, expected {channels} (the channels)")
            _check_like(f"{name}.{part}", t, x, allow_fp32=True)
    if weight is None:
        weight = torch.ones(channels, dtype=stat_dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(channels, dtype=stat_dtype, device=x.device)
    use_batch_stats = training or running_mean is None
    mean = running_mean if running_mean is not None else torch.zeros(channels, dtype=stat_dtype, device=x.device)
    var = running_var if running_var is not None else torch.ones(channels, dtype=stat_dtype, device=x.device)
    return weight, bias, mean, var, running_mean, running_var, use_batch_stats


def _check_batch_stats_count(count: int, name: str) -> None:
    if count <= 1:
        raise ValueError(f"{name}: training-mode BatchNorm needs more than 1 value per channel "
                         f"(batch × height × width = {count})")


def _update_running_stats(stats: Sequence[tuple], count: int, momentum: float) -> None:
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


def _out_size(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


# --------------------------------------------------------------------------------------------------
# multi_scale_dwconv
# --------------------------------------------------------------------------------------------------
def multi_scale_dwconv(x: Tensor, weights: Sequence[Tensor], bn: Sequence[BatchNormLike], *,
                       activation: str = "relu6", combine: str = "sum", shuffle_groups: Optional[int] = None,
                       stride: int = 1, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                       backend: Optional[str] = None) -> Tensor:
    """Parallel depthwise convolutions (MSDC of EMCAD's MSCB), fused.

    For each weight ``w_i`` of shape ``[C, 1, k_i, k_i]`` (odd ``k_i <= 9``, padding ``k_i // 2``):
    ``a_i = act(BN_i(dwconv(x, w_i, stride)))``. The branches are summed (``combine="sum"``) or concatenated
    along channels (``"concat"``), then channel-shuffled with ``shuffle_groups`` groups (ShuffleNet order) if
    given. ``bn[i]`` is the BatchNorm of branch ``i``. Returns a tensor in ``x``'s memory format.
    """
    call, args, update = _prepare_msdc(x, weights, bn, activation, combine, shuffle_groups, stride, training, eps)
    y, batch_mean, batch_var = backends.select(call, backend).ops.msdc(*args)
    if training:
        update(batch_mean, batch_var, momentum)
    return y


def _prepare_msdc(x, weights, bn, activation, combine, shuffle_groups, stride, training, eps):
    """Validates a multi_scale_dwconv call; returns (OpCall, op arguments, running-stats updater)."""
    _check_input("x", x)
    n, c, h, w = x.shape
    weights = list(weights)
    bn = list(bn)
    if len(weights) == 0:
        raise ValueError("weights must hold at least one depthwise kernel")
    if len(bn) != len(weights):
        raise ValueError(f"bn must hold one BatchNorm per branch: got {len(bn)} for {len(weights)} weights")
    kernel_sizes = tuple(_check_depthwise_weight(f"weights[{i}]", wt, c, x) for i, wt in enumerate(weights))
    _check_activation(activation)
    if combine not in ("sum", "concat"):
        raise ValueError(f"combine must be 'sum' or 'concat', got {combine!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    out_channels = c * len(weights) if combine == "concat" else c
    if shuffle_groups is not None and (shuffle_groups < 1 or out_channels % shuffle_groups):
        raise ValueError(f"shuffle_groups must divide the {out_channels} output channels, got {shuffle_groups}")
    ho, wo = _out_size(h, max(kernel_sizes), stride), _out_size(w, max(kernel_sizes), stride)

    bns = [_bn_tensors(f"bn[{i}]", b, c, x, training) for i, b in enumerate(bn)]
    use_batch_stats = bns[0][6]
    if any(b[6] != use_batch_stats for b in bns):
        raise ValueError("bn: either all branches track running statistics or none does")
    count = n * ho * wo
    if use_batch_stats:
        _check_batch_stats_count(count, "bn")

    call = OpCall("multi_scale_dwconv", x.device.type, x.dtype, activation, kernel_sizes, stride)
    args = (x, weights, torch.stack([b[0] for b in bns]), torch.stack([b[1] for b in bns]),
            torch.stack([b[2] for b in bns]), torch.stack([b[3] for b in bns]), use_batch_stats, float(eps),
            activation, combine == "concat", int(shuffle_groups or 0), stride)

    def update(batch_mean, batch_var, momentum):
        _update_running_stats([(b[4], b[5], batch_mean[i], batch_var[i]) for i, b in enumerate(bns)], count,
                              momentum)

    return call, args, update


# --------------------------------------------------------------------------------------------------
# upsample_dwconv
# --------------------------------------------------------------------------------------------------
def upsample_dwconv(x: Tensor, weight: Tensor, bn: BatchNormLike, *, scale: int = 2, mode: str = "nearest",
                    activation: str = "relu", training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                    backend: Optional[str] = None) -> Tensor:
    """Upsampling by ``scale`` then a depthwise conv (padding k//2, no bias), BatchNorm and activation: EUCB's
    ``up_dwc``. Semantics are exactly ``nn.Upsample(scale_factor=scale, mode=mode)`` (``align_corners=False``
    for bilinear) followed by ``nn.Conv2d(C, C, k, padding=k//2, groups=C, bias=False)``. Fused backends never
    build the upsampled tensor."""
    call, args, update = _prepare_updw(x, weight, bn, scale, mode, activation, training, eps)
    y, batch_mean, batch_var = backends.select(call, backend).ops.updw(*args)
    if training:
        update(batch_mean, batch_var, momentum)
    return y


def _prepare_updw(x, weight, bn, scale, mode, activation, training, eps):
    _check_input("x", x)
    n, c, h, w = x.shape
    k = _check_depthwise_weight("weight", weight, c, x)
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    _check_activation(activation)
    bw, bb, mean, var, rm, rv, use_batch_stats = _bn_tensors("bn", bn, c, x, training)
    count = n * h * w * scale * scale
    if use_batch_stats:
        _check_batch_stats_count(count, "bn")
    call = OpCall("upsample_dwconv", x.device.type, x.dtype, activation, (k,), 1, mode, scale)
    args = (x, weight, bw, bb, mean, var, use_batch_stats, float(eps), mode, activation, scale)

    def update(batch_mean, batch_var, momentum):
        _update_running_stats([(rm, rv, batch_mean, batch_var)], count, momentum)

    return call, args, update


# --------------------------------------------------------------------------------------------------
# grouped_attention_gate
# --------------------------------------------------------------------------------------------------
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
    call, args, update = _prepare_lgag(g, x, wg, bg, bn_g, wx, bx, bn_x, wpsi, bpsi, bn_psi, groups,
                                       add_gate_input, activation, training, eps)
    out, *stats = backends.select(call, backend).ops.lgag(*args)
    if training:
        update(stats, momentum)
    return out


def _prepare_lgag(g, x, wg, bg, bn_g, wx, bx, bn_x, wpsi, bpsi, bn_psi, groups, add_gate_input, activation,
                  training, eps):
    _check_input("g", g)
    _check_input("x", x)
    _check_like("g", g, x)
    if g.shape[0] != x.shape[0] or g.shape[2:] != x.shape[2:]:
        raise ValueError(f"g and x must have the same batch and spatial size, got {tuple(g.shape)} and "
                         f"{tuple(x.shape)}")
    if add_gate_input and g.shape[1] != x.shape[1]:
        raise ValueError(f"add_gate_input needs g and x with equal channels, got {g.shape[1]} and {x.shape[1]}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    _check_activation(activation)
    n, _, h, w = x.shape
    f_int = None
    for name, wt, inp in (("wg", wg, g), ("wx", wx, x)):
        _check_tensor(name, wt, 4)
        _check_like(name, wt, x)
        cin = inp.shape[1]
        if cin % groups or wt.shape[0] % groups:
            raise ValueError(f"groups={groups} must divide the input channels ({cin}) and the output channels "
                             f"({wt.shape[0]}) of {name}")
        if wt.shape[1] != cin // groups:
            raise ValueError(f"{name} must have shape [F_int, {cin // groups}, k, k] for {cin} input channels in "
                             f"{groups} groups, got {tuple(wt.shape)}")
        if wt.shape[2] != wt.shape[3] or wt.shape[2] % 2 == 0:
            raise ValueError(f"{name} must have a square odd kernel, got {wt.shape[2]}x{wt.shape[3]}")
        f_int = wt.shape[0] if f_int is None else f_int
    if wx.shape[0] != f_int or wx.shape[2] != wg.shape[2]:
        raise ValueError(f"wg and wx must have the same number of output channels and kernel size, got "
                         f"{tuple(wg.shape)} and {tuple(wx.shape)}")
    _check_tensor("wpsi", wpsi, 4)
    _check_like("wpsi", wpsi, x)
    if tuple(wpsi.shape) != (1, f_int, 1, 1):
        raise ValueError(f"wpsi must have shape [1, {f_int}, 1, 1], got {tuple(wpsi.shape)}")
    biases = []
    for name, b, size in (("bg", bg, f_int), ("bx", bx, f_int), ("bpsi", bpsi, 1)):
        if b is None:
            b = torch.zeros(size, dtype=x.dtype, device=x.device)
        _check_tensor(name, b, 1)
        _check_like(name, b, x)
        if b.numel() != size:
            raise ValueError(f"{name} must have {size} elements, got {b.numel()}")
        biases.append(b)
    norm_g = _bn_tensors("bn_g", bn_g, f_int, x, training)
    norm_x = _bn_tensors("bn_x", bn_x, f_int, x, training)
    norm_psi = _bn_tensors("bn_psi", bn_psi, 1, x, training)
    use_batch_stats = norm_g[6]
    if norm_x[6] != use_batch_stats or norm_psi[6] != use_batch_stats:
        raise ValueError("bn_g, bn_x, bn_psi: either all track running statistics or none does")
    count = n * h * w
    if use_batch_stats:
        _check_batch_stats_count(count, "bn_g")

    call = OpCall("grouped_attention_gate", x.device.type, x.dtype, activation, (wg.shape[-1],), 1, groups=groups)
    args = (g, x, wg, biases[0], wx, biases[1], wpsi, biases[2], *norm_g[:4], *norm_x[:4], *norm_psi[:4],
            use_batch_stats, float(eps), groups, activation, bool(add_gate_input))

    def update(stats, momentum):
        _update_running_stats([(norm[4], norm[5], stats[2 * i], stats[2 * i + 1])
                               for i, norm in enumerate((norm_g, norm_x, norm_psi))], count, momentum)

    return call, args, update


# --------------------------------------------------------------------------------------------------
# layernorm_dilated_dwconv / dilated_dwconv_groupnorm (EGE-UNet GAB, MALUNet DGA)
# --------------------------------------------------------------------------------------------------
def layernorm_dilated_dwconv(x: Tensor, ln_weights: Optional[Sequence[Optional[Tensor]]],
                             ln_biases: Optional[Sequence[Optional[Tensor]]], weights: Sequence[Tensor],
                             biases: Optional[Sequence[Optional[Tensor]]] = None, *, dilations: Sequence[int],
                             eps: float = 1e-6, backend: Optional[str] = None) -> Tensor:
    """Grouped multi-dilation depthwise conv with a per-group channels-first LayerNorm prologue (EGE-UNet's GAB,
    EGE-UNet_MALUNet.md §2.3, §7.1).

    The channels of ``x`` are split, in order, into ``len(weights)`` groups of ``weights[i].shape[0]`` channels.
    For group ``i``: ``z = LN_cf(x_i)`` (per pixel over the group's channels, biased variance, ``eps`` inside the
    root, affine ``ln_weights[i]`` / ``ln_biases[i]``), then ``y_i = dwconv(z, weights[i], biases[i])`` with
    dilation ``dilations[i]`` and zero padding ``dilations[i]·(k//2)`` (``weights[i]`` is ``[g_i, 1, k, k]``,
    odd ``k <= 9``; the padding zeros stand for the *normalised* map, exactly as ``Conv2d`` after the LayerNorm).
    Returns ``cat(y_0, y_1, ...)`` with ``x``'s shape and memory format. ``None`` affine/bias entries mean
    ones/zeros. One group with dilation 1 is GHPA's ``norm2`` + ``ldw.0`` (a 3×3 depthwise with LN prologue).
    There are no running statistics: training and evaluation compute the same thing.
    """
    call, args, _ = _prepare_lndw(x, ln_weights, ln_biases, weights, biases, dilations, eps)
    return backends.select(call, backend).ops.lndw(*args)


def dilated_dwconv_groupnorm(x: Tensor, weights: Sequence[Tensor], biases: Optional[Sequence[Optional[Tensor]]],
                             gn_weight: Optional[Tensor], gn_bias: Optional[Tensor], *, dilations: Sequence[int],
                             eps: float = 1e-5, backend: Optional[str] = None) -> Tensor:
    """Grouped multi-dilation depthwise conv followed by a GroupNorm whose groups are the dilation groups
    (MALUNet's DGA, EGE-UNet_MALUNet.md §3.2, §7.1; with all dilations 1 also the depthwise half of its GAU
    ``DepthWiseConv2d``).

    ``x`` is split into ``G = len(weights)`` equal channel groups; group ``i`` is convolved depthwise with
    ``weights[i]`` (``[C/G, 1, k, k]``, odd ``k <= 9``, dilation ``dilations[i]``, zero padding
    ``dilations[i]·(k//2)``) plus ``biases[i]``; the concatenation is normalised by ``GroupNorm(G, C)`` with affine
    ``gn_weight`` / ``gn_bias`` (``[C]``; None means ones/zeros) and ``eps``. Returns a tensor of ``x``'s shape
    and memory format. GroupNorm has no running statistics: training and evaluation compute the same thing.
    """
    call, args, _ = _prepare_dwgn(x, weights, biases, gn_weight, gn_bias, dilations, eps)
    return backends.select(call, backend).ops.dwgn(*args)


def _check_group_weights(x: Tensor, weights, dilations) -> tuple[list[Tensor], list[int], list[int], list[int]]:
    """Validates per-group depthwise weights and dilations; returns (weights, group sizes, kernel sizes,
    dilations)."""
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError("weights must be a sequence of depthwise weights, one [g_i, 1, k, k] tensor per group")
    weights = list(weights)
    if len(weights) == 0:
        raise ValueError("weights must hold at least one depthwise kernel (one per channel group)")
    if isinstance(dilations, (int, Tensor)) or not isinstance(dilations, (list, tuple)):
        raise TypeError(f"dilations must be a sequence of ints, one per group, got {type(dilations).__name__}")
    dilations = list(dilations)
    if len(dilations) != len(weights):
        raise ValueError(f"dilations must hold one dilation per group: got {len(dilations)} for {len(weights)} "
                         f"weights")
    for i, d in enumerate(dilations):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"dilations[{i}] must be a positive int, got {d!r}")
    sizes, kernel_sizes = [], []
    for i, w in enumerate(weights):
        name = f"weights[{i}]"
        _check_tensor(name, w, 4)
        _check_like(name, w, x)
        g, c_in, kh, kw = w.shape
        if c_in != 1 or g < 1:
            raise ValueError(f"{name} must have shape [g, 1, k, k] (a depthwise conv over its group's g channels), "
                             f"got {tuple(w.shape)}")
        if kh != kw or kh % 2 == 0 or kh > MAX_KERNEL_SIZE:
            raise ValueError(f"{name} must have a square odd kernel size <= {MAX_KERNEL_SIZE}, got {kh}x{kw}")
        sizes.append(int(g))
        kernel_sizes.append(int(kh))
    if sum(sizes) != x.shape[1]:
        raise ValueError(f"weights cover {sum(sizes)} channels ({'+'.join(map(str, sizes))}) but x has "
                         f"{x.shape[1]} channels")
    return weights, sizes, kernel_sizes, dilations


def _group_vectors(name: str, values, sizes: Sequence[int], x: Tensor, fill: float, *,
                   allow_fp32: bool) -> list[Tensor]:
    """A per-group list of 1-D tensors (None entries, or None for the whole list, become ``fill``)."""
    if values is None:
        values = [None] * len(sizes)
    if isinstance(values, Tensor) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a sequence with one 1-D tensor (or None) per group")
    values = list(values)
    if len(values) != len(sizes):
        raise ValueError(f"{name} must hold one entry per group: got {len(values)} for {len(sizes)} groups")
    out = []
    for i, (v, g) in enumerate(zip(values, sizes)):
        if v is None:
            v = torch.full((g,), fill, dtype=x.dtype, device=x.device)
        _check_tensor(f"{name}[{i}]", v, 1)
        if v.numel() != g:
            raise ValueError(f"{name}[{i}] has {v.numel()} elements, expected {g} (the channels of group {i})")
        _check_like(f"{name}[{i}]", v, x, allow_fp32=allow_fp32)
        out.append(v)
    return out


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


def _prepare_lndw(x, ln_weights, ln_biases, weights, biases, dilations, eps):
    """Validates a layernorm_dilated_dwconv call; returns (OpCall, op arguments, None)."""
    _check_input("x", x)
    weights, sizes, kernel_sizes, dilations = _check_group_weights(x, weights, dilations)
    lws = _group_vectors("ln_weights", ln_weights, sizes, x, 1.0, allow_fp32=True)
    lbs = _group_vectors("ln_biases", ln_biases, sizes, x, 0.0, allow_fp32=True)
    bs = _group_vectors("biases", biases, sizes, x, 0.0, allow_fp32=False)
    eps = _check_eps(eps)
    call = OpCall("layernorm_dilated_dwconv", x.device.type, x.dtype, "identity", tuple(kernel_sizes), 1,
                  groups=len(weights), dilations=tuple(dilations))
    return call, (x, lws, lbs, weights, bs, dilations, eps), None


def _prepare_dwgn(x, weights, biases, gn_weight, gn_bias, dilations, eps):
    """Validates a dilated_dwconv_groupnorm call; returns (OpCall, op arguments, None)."""
    _check_input("x", x)
    weights, sizes, kernel_sizes, dilations = _check_group_weights(x, weights, dilations)
    if any(g != sizes[0] for g in sizes):
        raise ValueError(f"weights must split the channels into equal groups (the GroupNorm groups), got group "
                         f"sizes {sizes}")
    bs = _group_vectors("biases", biases, sizes, x, 0.0, allow_fp32=False)
    c = x.shape[1]
    gn = []
    for name, t, fill in (("gn_weight", gn_weight, 1.0), ("gn_bias", gn_bias, 0.0)):
        if t is None:
            t = torch.full((c,), fill, dtype=x.dtype, device=x.device)
        _check_tensor(name, t, 1)
        if t.numel() != c:
            raise ValueError(f"{name} has {t.numel()} elements, expected {c} (the channels)")
        _check_like(name, t, x, allow_fp32=True)
        gn.append(t)
    gn_w, gn_b = gn
    eps = _check_eps(eps)
    call = OpCall("dilated_dwconv_groupnorm", x.device.type, x.dtype, "identity", tuple(kernel_sizes), 1,
                  groups=len(weights), dilations=tuple(dilations))
    return call, (x, weights, bs, gn_w, gn_b, dilations, eps), None



# --------------------------------------------------------------------------------------------------
# mscam (EMCAD CAB · SAB, issue 8)
# --------------------------------------------------------------------------------------------------
def mscam(x: Tensor, cab_fc1: Tensor, cab_fc2: Tensor, sab_weight: Tensor, *, activation: str = "relu",
          backend: Optional[str] = None) -> Tensor:
    """EMCAD's channel then spatial attention applied to ``x`` (the attention part of MSCAM, EMCAD.md §2.5–2.7):
    ``ca = σ(fc2(act(fc1(avgpool(x)))) + fc2(act(fc1(maxpool(x)))))`` (CAB, ``(N, C, 1, 1)``),
    ``d1 = ca · x``, ``sa = σ(conv_k([mean_c(d1), max_c(d1)]))`` (SAB, ``(N, 1, H, W)``, padding ``k // 2``, no
    bias) and returns ``d1 · sa`` in ``x``'s memory format. ``cab_fc1`` is ``[R, C, 1, 1]``, ``cab_fc2``
    ``[C, R, 1, 1]`` (no biases), ``sab_weight`` ``[1, 2, k, k]`` with odd ``k``. Differentiable in ``x`` and
    all three weights."""
    call, args, _ = _prepare_mscam(x, cab_fc1, cab_fc2, sab_weight, activation)
    return backends.select(call, backend).ops.mscam(*args)


def _prepare_mscam(x, cab_fc1, cab_fc2, sab_weight, activation):
    """Validates an mscam call; returns (OpCall, op arguments, None)."""
    _check_input("x", x)
    c = x.shape[1]
    _check_activation(activation)
    for name, t in (("cab_fc1", cab_fc1), ("cab_fc2", cab_fc2), ("sab_weight", sab_weight)):
        _check_tensor(name, t, 4)
        _check_like(name, t, x)
    r = cab_fc1.shape[0]
    if tuple(cab_fc1.shape) != (r, c, 1, 1) or r < 1:
        raise ValueError(f"cab_fc1 must have shape [R, {c}, 1, 1] (a 1×1 conv from the {c} input channels), got "
                         f"{tuple(cab_fc1.shape)}")
    if tuple(cab_fc2.shape) != (c, r, 1, 1):
        raise ValueError(f"cab_fc2 must have shape [{c}, {r}, 1, 1] (back to the {c} input channels), got "
                         f"{tuple(cab_fc2.shape)}")
    k = sab_weight.shape[-1]
    if sab_weight.shape[:2] != (1, 2) or sab_weight.shape[2] != k or k % 2 == 0:
        raise ValueError(f"sab_weight must have shape [1, 2, k, k] with odd k, got {tuple(sab_weight.shape)}")
    call = OpCall("mscam", x.device.type, x.dtype, activation, (int(k),), 1)
    return call, (x, cab_fc1, cab_fc2, sab_weight, activation), None


# --------------------------------------------------------------------------------------------------
# mutation_stats / mutation_loss (fused MUTATION deep-supervision loss, issue 8)
# --------------------------------------------------------------------------------------------------
MAX_MUTATION_HEADS = 4
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_mutation_args(logits, target, *, check_values: bool = True) -> tuple[list[Tensor], Tensor]:
    """Validates the arguments of :func:`mutation_stats` (errors name the argument); returns the heads as a list
    and the target as int64. ``check_values=False`` skips the pass over the target's values."""
    if isinstance(logits, Tensor) or not isinstance(logits, (list, tuple)):
        raise TypeError(f"logits must be a list of 1 to {MAX_MUTATION_HEADS} head logits (B, K, h, w), got "
                        f"{type(logits).__name__}")
    logits = list(logits)
    if not 1 <= len(logits) <= MAX_MUTATION_HEADS:
        raise ValueError(f"logits must hold 1 to {MAX_MUTATION_HEADS} heads (2^n - 1 subsets), got {len(logits)}")
    for i, z in enumerate(logits):
        _check_input(f"logits[{i}]", z)
        if z.device != logits[0].device:
            raise ValueError(f"logits[{i}] is on {z.device} but logits[0] is on {logits[0].device}")
        if z.dtype != logits[0].dtype:
            raise TypeError(f"logits[{i}] has dtype {z.dtype} but logits[0] has {logits[0].dtype}; all heads must "
                            f"have one dtype")
        if z.shape[0] != logits[0].shape[0] or z.shape[1] != logits[0].shape[1]:
            raise ValueError(f"logits[{i}] has shape {tuple(z.shape)}: batch and classes must equal those of "
                             f"logits[0] {tuple(logits[0].shape)}")
        if z.shape[2] < 1 or z.shape[3] < 1:
            raise ValueError(f"logits[{i}] has an empty spatial size {tuple(z.shape)}")
    b, k = logits[0].shape[:2]
    if k < 2:
        raise ValueError(f"logits must have at least 2 classes (softmax), got K={k}")
    _check_tensor("target", target, 3)
    if target.dtype not in INTEGER_DTYPES:
        raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if target.device != logits[0].device:
        raise ValueError(f"target is on {target.device} but the logits are on {logits[0].device}")
    if target.shape[0] != b:
        raise ValueError(f"target has batch {target.shape[0]} but the logits have batch {b}")
    if target.shape[1] < 1 or target.shape[2] < 1:
        raise ValueError(f"target has an empty spatial size {tuple(target.shape)}")
    if check_values and target.numel():
        lo, hi = (int(v) for v in torch.aminmax(target))  # one pass, one host sync
        if lo < 0 or hi >= k:
            raise ValueError(f"target values must be class indices in [0, {k}), got values in [{lo}, {hi}]")
    return logits, target.long()


def _prepare_mutation_stats(logits, target, check_values: bool = True):
    """Validates a mutation_stats call; returns (OpCall, op arguments, None)."""
    logits, target = check_mutation_args(logits, target, check_values=check_values)
    z = logits[0]
    call = OpCall("mutation_stats", z.device.type, z.dtype, "identity", (), 1, groups=len(logits))
    return call, (logits, target), None


def mutation_stats(logits: Sequence[Tensor], target: Tensor, *,
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sums behind the fused MUTATION loss, ``(ce[S], inter[S, K], psq[S, K], tcount[K])``.

    ``logits``: 1 to 4 head logits ``(B, K, h_i, w_i)`` (one dtype and device, any spatial sizes, NCHW or
    channels_last), each bilinearly upsampled (``align_corners=False``) to the size of ``target`` ``(B, H, W)``
    (integer class indices in ``[0, K)``). For every non-empty subset ``s`` of the heads, in the order of
    ``emcad.losses.combine_heads``, with ``p_s = softmax_K(sum_{i in s} up(logits[i]))``, summed over all pixels:
    ``ce[s] = sum -log p_s[target]``, ``inter[s, c] = sum p_s[c] [target == c]``, ``psq[s, c] = sum p_s[c]^2``;
    ``tcount[c]`` counts the pixels of class ``c``. float64 for float64 logits, else float32. Differentiable in
    the logits (``tcount`` is not). Fused backends never build the upsampled or summed logits."""
    call, args, _ = _prepare_mutation_stats(logits, target)
    return backends.select(call, backend).ops.mutation_stats(*args)


def _all_reduce_sum(t: Tensor) -> Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def mutation_loss(logits: Sequence[Tensor], target: Tensor, *, ce_weight: float = 0.3, dice_weight: float = 0.7,
                  smooth: float = 1e-5, distributed: bool = False, backend: Optional[str] = None) -> Tensor:
    """EMCAD's MUTATION deep-supervision loss with the ``ce_dice`` criterion, fused: equal to
    ``emcad.losses.SegmentationLoss(K, supervision="mutation", criterion="ce_dice")`` on the heads upsampled to
    the target size, i.e. ``sum_s [ce_weight * CE_s + dice_weight * Dice_s]`` over the ``2^n - 1`` subsets, with
    ``CE_s = ce[s] / (B H W)`` and ``Dice_s = mean_c (1 - (2 inter[s,c] + smooth) / (psq[s,c] + tcount[c] +
    smooth))`` (see :func:`mutation_stats`). ``distributed=True`` all-reduces the Dice sums over the default
    process group (differentiably) first, like ``emcad.losses.dice_loss``. Returns a scalar in the statistics'
    dtype (float32 for fp16/bf16/fp32 logits)."""
    ce, inter, psq, tcount = mutation_stats(logits, target, backend=backend)
    s, k = inter.shape
    if distributed:
        sums = _all_reduce_sum(torch.cat([inter.reshape(-1), psq.reshape(-1), tcount]))
        inter, psq, tcount = sums[:s * k].view(s, k), sums[s * k:2 * s * k].view(s, k), sums[2 * s * k:]
    npix = target.numel()
    dice = 1 - (2 * inter + smooth) / (psq + tcount + smooth)
    return (ce * (ce_weight / npix) + dice_weight * dice.mean(1)).sum()


def explain(op: str, *args, backend: Optional[str] = None, **kwargs) -> str:
    """Which backend would run ``op(*args, **kwargs)`` and why the others would not. Nothing is computed.

    ``op`` is a function name of this module; the arguments are those of that function, e.g.
    ``explain("multi_scale_dwconv", x, weights, bn, training=True)``.
    """
    if op not in _PREPARE:
        raise ValueError(f"op must be one of {tuple(_PREPARE)}, got {op!r}")
    fn, prepare = _PREPARE[op]
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop("momentum", None)
    params.pop("backend", None)
    call = prepare(**params)[0]
    return backends.explain_call(call, backend)


_PREPARE = {
    "multi_scale_dwconv": (multi_scale_dwconv, _prepare_msdc),
    "upsample_dwconv": (upsample_dwconv, _prepare_updw),
    "grouped_attention_gate": (grouped_attention_gate, _prepare_lgag),
    "layernorm_dilated_dwconv": (layernorm_dilated_dwconv, _prepare_lndw),
    "dilated_dwconv_groupnorm": (dilated_dwconv_groupnorm, _prepare_dwgn),
    "mscam": (mscam, _prepare_mscam),
    "mutation_stats": (mutation_stats, _prepare_mutation_stats),
}
