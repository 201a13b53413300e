"""The grouped multi-dilation depthwise ops of EGE-UNet and MALUNet (docs/kernels.md#multi-dilation-ops):

* ``layernorm_dilated_dwconv``: per channel group a channels-first LayerNorm, then a dilated depthwise conv
  (EGE-UNet's GAB; with one group and dilation 1 also GHPA's ``norm2`` + ``ldw.0``);
* ``dilated_dwconv_groupnorm``: the dilated depthwise convs, then a GroupNorm whose groups are the dilation groups
  (MALUNet's DGA; with all dilations 1 also the depthwise half of its GAU).

Read top to bottom: the public functions, their argument checks, the two op descriptors. Kernels:
``reference.lndw_*`` / ``reference.dwgn_*``, ``csrc/cpu/lndw.cpp`` / ``csrc/cpu/dwgn.cpp``, ``triton/lndw.py`` /
``triton/dwgn.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import flops, reference
from ..backends import register_op, run
from ..descriptor import Call, OpDescriptor, Support
from ..testing import ExampleInputs
from ._args import (MAX_KERNEL_SIZE, check_eps, check_feature_map, check_like, check_tensor, dense_grad,
                    empty_like_output)


def layernorm_dilated_dwconv(x: Tensor, ln_weights: Optional[Sequence[Optional[Tensor]]],
                             ln_biases: Optional[Sequence[Optional[Tensor]]], weights: Sequence[Tensor],
                             biases: Optional[Sequence[Optional[Tensor]]] = None, *, dilations: Sequence[int],
                             eps: float = 1e-6, backend: Optional[str] = None) -> Tensor:
    """Grouped multi-dilation depthwise conv with a per-group channels-first LayerNorm prologue (EGE-UNet's GAB).

    The channels of ``x`` are split, in order, into ``len(weights)`` groups of ``weights[i].shape[0]`` channels.
    For group ``i``: ``z = LN_cf(x_i)`` (per pixel over the group's channels, biased variance, ``eps`` inside the
    root, affine ``ln_weights[i]`` / ``ln_biases[i]``), then ``y_i = dwconv(z, weights[i], biases[i])`` with
    dilation ``dilations[i]`` and zero padding ``dilations[i]·(k//2)`` (``weights[i]`` is ``[g_i, 1, k, k]``,
    odd ``k <= 9``; the padding zeros stand for the *normalised* map, exactly as ``Conv2d`` after the LayerNorm).
    Returns ``cat(y_0, y_1, ...)`` with ``x``'s shape and memory format. ``None`` affine/bias entries mean
    ones/zeros. There are no running statistics: training and evaluation compute the same thing.
    """
    return run(prepare_lndw(x, ln_weights, ln_biases, weights, biases, dilations=dilations, eps=eps), backend)


def dilated_dwconv_groupnorm(x: Tensor, weights: Sequence[Tensor], biases: Optional[Sequence[Optional[Tensor]]],
                             gn_weight: Optional[Tensor], gn_bias: Optional[Tensor], *, dilations: Sequence[int],
                             eps: float = 1e-5, backend: Optional[str] = None) -> Tensor:
    """Grouped multi-dilation depthwise conv followed by a GroupNorm whose groups are the dilation groups
    (MALUNet's DGA).

    ``x`` is split into ``G = len(weights)`` equal channel groups; group ``i`` is convolved depthwise with
    ``weights[i]`` (``[C/G, 1, k, k]``, odd ``k <= 9``, dilation ``dilations[i]``, zero padding
    ``dilations[i]·(k//2)``) plus ``biases[i]``; the concatenation is normalised by ``GroupNorm(G, C)`` with affine
    ``gn_weight`` / ``gn_bias`` (``[C]``; None means ones/zeros) and ``eps``. Returns a tensor of ``x``'s shape
    and memory format. GroupNorm has no running statistics: training and evaluation compute the same thing.
    """
    return run(prepare_dwgn(x, weights, biases, gn_weight, gn_bias, dilations=dilations, eps=eps), backend)


class MultiDilationAttrs(NamedTuple):
    kernel_sizes: tuple[int, ...]
    dilations: tuple[int, ...]


def _group_weights(x: Tensor, weights, dilations) -> tuple[list[Tensor], list[int], list[int], list[int]]:
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
        check_tensor(name, w, 4)
        check_like(name, w, x)
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
        check_tensor(f"{name}[{i}]", v, 1)
        if v.numel() != g:
            raise ValueError(f"{name}[{i}] has {v.numel()} elements, expected {g} (the channels of group {i})")
        check_like(f"{name}[{i}]", v, x, allow_fp32=allow_fp32)
        out.append(v)
    return out


def prepare_lndw(x, ln_weights, ln_biases, weights, biases=None, *, dilations, eps=1e-6) -> Call:
    check_feature_map("x", x)
    weights, sizes, kernel_sizes, dilations = _group_weights(x, weights, dilations)
    lws = _group_vectors("ln_weights", ln_weights, sizes, x, 1.0, allow_fp32=True)
    lbs = _group_vectors("ln_biases", ln_biases, sizes, x, 0.0, allow_fp32=True)
    bs = _group_vectors("biases", biases, sizes, x, 0.0, allow_fp32=False)
    args = (x, lws, lbs, weights, bs, dilations, check_eps(eps))
    return Call(LNDW, args, x.device.type, x.dtype, MultiDilationAttrs(tuple(kernel_sizes), tuple(dilations)))


def prepare_dwgn(x, weights, biases, gn_weight, gn_bias, *, dilations, eps=1e-5) -> Call:
    check_feature_map("x", x)
    weights, sizes, kernel_sizes, dilations = _group_weights(x, weights, dilations)
    if any(g != sizes[0] for g in sizes):
        raise ValueError(f"weights must split the channels into equal groups (the GroupNorm groups), got group "
                         f"sizes {sizes}")
    bs = _group_vectors("biases", biases, sizes, x, 0.0, allow_fp32=False)
    c = x.shape[1]
    gn = []
    for name, t, fill in (("gn_weight", gn_weight, 1.0), ("gn_bias", gn_bias, 0.0)):
        if t is None:
            t = torch.full((c,), fill, dtype=x.dtype, device=x.device)
        check_tensor(name, t, 1)
        if t.numel() != c:
            raise ValueError(f"{name} has {t.numel()} elements, expected {c} (the channels)")
        check_like(name, t, x, allow_fp32=True)
        gn.append(t)
    args = (x, weights, bs, gn[0], gn[1], dilations, check_eps(eps))
    return Call(DWGN, args, x.device.type, x.dtype, MultiDilationAttrs(tuple(kernel_sizes), tuple(dilations)))


# --------------------------------------------------------------------------------------------------
# kernel ops: schemas, fakes, autograd, FLOPs
# --------------------------------------------------------------------------------------------------
LNDW_FORWARD_SCHEMA = ("(Tensor x, Tensor[] ln_weights, Tensor[] ln_biases, Tensor[] weights, Tensor[] biases, "
                       "int[] dilations, float eps) -> Tensor")
# returns [grad x, grad ln_weights..., grad ln_biases..., grad weights..., grad biases...]
LNDW_BACKWARD_SCHEMA = ("(Tensor grad, Tensor x, Tensor[] ln_weights, Tensor[] ln_biases, Tensor[] weights, "
                        "Tensor[] biases, int[] dilations, float eps) -> Tensor[]")
DWGN_FORWARD_SCHEMA = ("(Tensor x, Tensor[] weights, Tensor[] biases, Tensor gn_weight, Tensor gn_bias, "
                       "int[] dilations, float eps) -> Tensor")
# returns [grad x, grad gn_weight, grad gn_bias, grad weights..., grad biases...]
DWGN_BACKWARD_SCHEMA = ("(Tensor grad, Tensor x, Tensor[] weights, Tensor[] biases, Tensor gn_weight, "
                        "Tensor gn_bias, int[] dilations, float eps) -> Tensor[]")


def _fake_forward(x, *args):
    return empty_like_output(x, x.shape)


def _fake_lndw_backward(grad, x, ln_weights, ln_biases, weights, biases, dilations, eps):
    return [empty_like_output(x, x.shape), *(torch.empty_like(t) for t in (*ln_weights, *ln_biases, *weights,
                                                                              *biases))]


def _fake_dwgn_backward(grad, x, weights, biases, gn_weight, gn_bias, dilations, eps):
    return [empty_like_output(x, x.shape), torch.empty_like(gn_weight), torch.empty_like(gn_bias),
            *(torch.empty_like(t) for t in (*weights, *biases))]


def _lndw_setup_context(ctx, inputs, output):
    x, ln_weights, ln_biases, weights, biases, dilations, eps = inputs
    ctx.save_for_backward(x, *ln_weights, *ln_biases, *weights, *biases)
    ctx.config = (dilations, eps)
    ctx.groups = len(weights)


def _lndw_backward(backward_op, ctx, grad):
    x, *params = ctx.saved_tensors
    g = ctx.groups
    parts = [params[i * g:(i + 1) * g] for i in range(4)]
    gx, *rest = backward_op(dense_grad(grad, x), x, *parts, *ctx.config)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, *(rest[i * g:(i + 1) * g] if need[i + 1] else None for i in range(4)), None,
            None)


def _dwgn_setup_context(ctx, inputs, output):
    x, weights, biases, gn_weight, gn_bias, dilations, eps = inputs
    ctx.save_for_backward(x, gn_weight, gn_bias, *weights, *biases)
    ctx.config = (dilations, eps)
    ctx.groups = len(weights)


def _dwgn_backward(backward_op, ctx, grad):
    x, gn_weight, gn_bias, *params = ctx.saved_tensors
    g = ctx.groups
    gx, ggw, ggb, *rest = backward_op(dense_grad(grad, x), x, params[:g], params[g:], gn_weight, gn_bias,
                                      *ctx.config)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, rest[:g] if need[1] else None, rest[g:] if need[2] else None,
            ggw if need[3] else None, ggb if need[4] else None, None, None)


def _convs(x, weights, dilations):
    """(input shape, weight shape, output shape, dilation) of every group's depthwise conv."""
    n, _, h, w = x
    return [([n, ws[0], h, w], ws, [n, ws[0], h, w], d) for ws, d in zip(weights, dilations)]


def _lndw_flops_forward(x, ln_weights, ln_biases, weights, biases, dilations, eps, out_shape=None, **kwargs):
    return sum(flops.conv_forward(i, w, o) for i, w, o, _ in _convs(x, weights, dilations))


def _lndw_flops_backward(grad, x, ln_weights, ln_biases, weights, biases, dilations, eps, out_shape=None, **kwargs):
    return sum(flops.dilated_conv_backward(*conv) for conv in _convs(x, weights, dilations))


def _dwgn_flops_forward(x, weights, biases, gn_weight, gn_bias, dilations, eps, out_shape=None, **kwargs):
    return sum(flops.conv_forward(i, w, o) for i, w, o, _ in _convs(x, weights, dilations))


def _dwgn_flops_backward(grad, x, weights, biases, gn_weight, gn_bias, dilations, eps, out_shape=None, **kwargs):
    return sum(flops.dilated_conv_backward(*conv) for conv in _convs(x, weights, dilations))


def _fvcore(weights_input: int):
    """MACs of each group's depthwise conv (biases and norms not counted)."""
    def handle(inputs, outputs) -> int:
        weights = flops.jit_list_shapes(inputs[weights_input])
        return sum(flops.conv_macs(o, w) for _, w, o, _ in _convs(flops.jit_shape(inputs[0]), weights,
                                                                   [1] * len(weights)))

    return handle


# --------------------------------------------------------------------------------------------------
# what each backend's kernels cover (cpu: every configuration; cuda: none)
# --------------------------------------------------------------------------------------------------
def _triton(call: Call) -> list[str]:
    # one program covers one group; group geometry travels as scalar kernel arguments (4 slots) and the conv window
    # is a compile-time K×K shared by all groups
    ks = call.attrs.kernel_sizes
    reasons = []
    if len(ks) > 4:
        reasons.append(f"{len(ks)} channel groups are not supported (at most 4)")
    if len(set(ks)) > 1:
        reasons.append(f"different kernel sizes per group {ks} are not supported (one size for all groups)")
    if max(ks) > 7:
        reasons.append(f"kernel size {max(ks)} is not supported (odd sizes up to 7)")
    return reasons


def _lndw_examples(device, dtype) -> list:
    """EGE-UNet's GAB shape in small: three groups (3, 3, 4 channels), 3x3, dilations 1, 2, 3; channels_last with
    two 5x5 groups and default affine parameters and biases."""
    t = ExampleInputs(device, dtype, seed=15)
    sizes = (3, 3, 4)
    first = ((t.randn(2, 10, 7, 5), [t.randn(g, scale=0.2, offset=1.0) for g in sizes],
              [t.randn(g, scale=0.1) for g in sizes], [t.randn(g, 1, 3, 3, scale=0.3) for g in sizes],
              [t.randn(g, scale=0.1) for g in sizes]), dict(dilations=(1, 2, 3)))
    return [first, ((t.randn(1, 8, 6, 5, channels_last=True), None, None,
                     [t.randn(4, 1, 5, 5, scale=0.3) for _ in range(2)]), dict(dilations=(1, 2)))]


def _dwgn_examples(device, dtype) -> list:
    """MALUNet's DGA in small: three groups of 3 channels, 3x3, dilations 1, 2, 5; channels_last with two 5x5
    groups and default biases and GroupNorm affine parameters."""
    t = ExampleInputs(device, dtype, seed=16)
    first = ((t.randn(2, 9, 7, 5), [t.randn(3, 1, 3, 3, scale=0.3) for _ in range(3)],
              [t.randn(3, scale=0.1) for _ in range(3)], t.randn(9, scale=0.2, offset=1.0), t.randn(9, scale=0.1)),
             dict(dilations=(1, 2, 5)))
    return [first, ((t.randn(1, 8, 5, 6, channels_last=True), [t.randn(4, 1, 5, 5, scale=0.3) for _ in range(2)],
                     None, None, None), dict(dilations=(2, 1)))]


LNDW = register_op(OpDescriptor(
    name="layernorm_dilated_dwconv", kernel="lndw", forward_schema=LNDW_FORWARD_SCHEMA,
    backward_schema=LNDW_BACKWARD_SCHEMA, prepare=prepare_lndw, fake_forward=_fake_forward,
    fake_backward=_fake_lndw_backward, setup_context=_lndw_setup_context, backward=_lndw_backward,
    flops_forward=_lndw_flops_forward, flops_backward=_lndw_flops_backward,
    reference=(reference.lndw_forward, reference.lndw_backward), fvcore=_fvcore(3), examples=_lndw_examples,
    support={"cpu": Support(),
             "triton": Support(_triton, kernels=("emcad_kernels.triton.lndw", "lndw_forward", "lndw_backward"))}))

DWGN = register_op(OpDescriptor(
    name="dilated_dwconv_groupnorm", kernel="dwgn", forward_schema=DWGN_FORWARD_SCHEMA,
    backward_schema=DWGN_BACKWARD_SCHEMA, prepare=prepare_dwgn, fake_forward=_fake_forward,
    fake_backward=_fake_dwgn_backward, setup_context=_dwgn_setup_context, backward=_dwgn_backward,
    flops_forward=_dwgn_flops_forward, flops_backward=_dwgn_flops_backward,
    reference=(reference.dwgn_forward, reference.dwgn_backward), fvcore=_fvcore(1), examples=_dwgn_examples,
    support={"cpu": Support(),
             "triton": Support(_triton, kernels=("emcad_kernels.triton.dwgn", "dwgn_forward", "dwgn_backward"))}))
