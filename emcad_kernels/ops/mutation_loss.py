"""The fused MUTATION deep-supervision loss: ``mutation_stats`` (the op) and ``mutation_loss`` on top of it
(docs/kernels.md#mutation-loss-statistics).

Read top to bottom: the public functions, the argument checks, the op descriptor. Kernels:
``reference.mutation_stats_forward/backward``, ``csrc/cpu/mutation_loss.cpp``, ``triton/mutation_loss.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import reference
from ..backends import register_op, run
from ..descriptor import Call, OpDescriptor, Support
from ..testing import ExampleInputs
from ..reference import stats_dtype
from ._args import check_input, check_tensor, empty_like_output, empty_stats

MAX_HEADS = 4
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


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
    return run(prepare(logits, target), backend)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Differentiable sum over the default process group (identity outside distributed runs)."""
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
    dtype (float32 for fp16/bf16/fp32 logits). An empty batch gives NaN (the CE is a mean over no pixels), as the
    plain loss does."""
    ce, inter, psq, tcount = mutation_stats(logits, target, backend=backend)
    s, k = inter.shape
    if distributed:
        sums = all_reduce_sum(torch.cat([inter.reshape(-1), psq.reshape(-1), tcount]))
        inter, psq, tcount = sums[:s * k].view(s, k), sums[s * k:2 * s * k].view(s, k), sums[2 * s * k:]
    npix = target.numel()
    dice = 1 - (2 * inter + smooth) / (psq + tcount + smooth)
    # an empty batch: the CE mean over no pixels is NaN, as in F.cross_entropy and the plain SegmentationLoss
    ce_scale = ce_weight / npix if npix else float("nan")
    return (ce * ce_scale + dice_weight * dice.mean(1)).sum()


class MutationAttrs(NamedTuple):
    heads: int


def check_args(logits, target, *, check_values: bool = True) -> tuple[list[Tensor], Tensor]:
    """Validates the arguments of :func:`mutation_stats` (errors name the argument); returns the heads as a list
    and the target as int64. ``check_values=False`` skips the pass over the target's values."""
    if isinstance(logits, Tensor) or not isinstance(logits, (list, tuple)):
        raise TypeError(f"logits must be a list of 1 to {MAX_HEADS} head logits (B, K, h, w), got "
                        f"{type(logits).__name__}")
    logits = list(logits)
    if not 1 <= len(logits) <= MAX_HEADS:
        raise ValueError(f"logits must hold 1 to {MAX_HEADS} heads (2^n - 1 subsets), got {len(logits)}")
    for i, z in enumerate(logits):
        check_input(f"logits[{i}]", z)
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
    check_tensor("target", target, 3)
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


def prepare(logits, target, *, check_values: bool = True) -> Call:
    logits, target = check_args(logits, target, check_values=check_values)
    z = logits[0]
    return Call(MUTATION_STATS, (logits, target), z.device.type, z.dtype, MutationAttrs(len(logits)))


# --------------------------------------------------------------------------------------------------
# kernel ops: schema, fake, autograd, FLOPs
# --------------------------------------------------------------------------------------------------
FORWARD_SCHEMA = "(Tensor[] logits, Tensor target) -> (Tensor, Tensor, Tensor, Tensor)"
# returns the gradient of every head
BACKWARD_SCHEMA = "(Tensor grad_ce, Tensor grad_inter, Tensor grad_psq, Tensor[] logits, Tensor target) -> Tensor[]"


def _fake_forward(logits, target):
    z, s, k = logits[0], 2 ** len(logits) - 1, logits[0].shape[1]
    return empty_stats(z, s), empty_stats(z, s, k), empty_stats(z, s, k), empty_stats(z, k)


def _fake_backward(grad_ce, grad_inter, grad_psq, logits, target):
    return [empty_like_output(z, z.shape) for z in logits]


def _setup_context(ctx, inputs, output):
    logits, target = inputs
    ctx.save_for_backward(target, *logits)  # the backward recomputes the softmaxes
    ctx.mark_non_differentiable(output[3])


def _backward(backward_op, ctx, grad_ce, grad_inter, grad_psq, _grad_tcount):
    target, *logits = ctx.saved_tensors
    z = logits[0]
    s, k = 2 ** len(logits) - 1, z.shape[1]

    def dense(g, *shape):
        return torch.zeros(shape, dtype=stats_dtype(z.dtype), device=z.device) if g is None else g.contiguous()

    grads = backward_op(dense(grad_ce, s), dense(grad_inter, s, k), dense(grad_psq, s, k), logits, target)
    return (list(grads) if ctx.needs_input_grad[0] else None), None


def _no_flops(*args, **kwargs) -> int:
    return 0  # softmax and bilinear sampling; FlopCounterMode counts neither for the plain loss


def _examples(device, dtype) -> list:
    """Three heads of different sizes (7 subsets, 4 classes); one channels_last head (3 classes)."""
    t = ExampleInputs(device, dtype, seed=14)
    heads = [t.randn(2, 4, h, w) for h, w in ((3, 3), (5, 4), (9, 7))]
    return [((heads, t.integers(4, 2, 11, 9)), {}),
            (([t.randn(1, 3, 4, 5, channels_last=True)], t.integers(3, 1, 8, 10)), {})]


MUTATION_STATS = register_op(OpDescriptor(
    name="mutation_stats", kernel="mutation_stats", forward_schema=FORWARD_SCHEMA, backward_schema=BACKWARD_SCHEMA,
    prepare=prepare, fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup_context,
    backward=_backward, flops_forward=_no_flops, flops_backward=_no_flops,
    reference=(reference.mutation_stats_forward, reference.mutation_stats_backward), examples=_examples,
    support={"cpu": Support(),
             "triton": Support(kernels=("emcad_kernels.triton.mutation_loss", "mutation_stats_forward",
                                        "mutation_stats_backward"))}))
