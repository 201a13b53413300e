"""Training losses for EMCAD (docs/models.md#losses).

Per-head criteria:

* :func:`ce_dice_loss` (multi-class): ``0.3 · CrossEntropy + 0.7 · Dice`` with the TransUNet Dice
  (:func:`dice_loss`: softmax, one-hot target, per class ``1 − (2Σpt + 1e-5) / (Σp² + Σt² + 1e-5)`` with the sums
  over the whole batch and all pixels jointly, mean over all classes *including the background*, quirk 8 in
  docs/models.md#original-code-quirks kept as part of the recipe).
* :func:`structure_loss` (binary, F3Net/PraNet/CASCADE): boundary-weighted BCE + weighted IoU. The BCE reduction is
  an explicit choice: ``bce_reduction="none"`` (default) applies the intended per-pixel weights;
  ``bce_reduction="mean"`` reproduces the original code, whose legacy ``reduce='none'`` keyword collapsed the BCE to
  the plain unweighted mean (quirk 15 in docs/models.md#original-code-quirks).

Supervision (how the four head outputs ``[p4, p3, p2, p1]`` are combined):

* ``"mutation"`` (paper default for Synapse): the criterion on the summed logits of every non-empty subset of the
  heads (15 terms, weight 1 each, no normalisation);
* ``"heads_and_sum"`` (paper Eq. 11, binary tasks): each head alone plus the sum of all four (5 terms);
* ``"deep_supervision"``: each head alone (4 terms);
* ``"last_layer"``: only ``p1`` (the prediction).

Head resolution: the head logits may have any spatial size; heads smaller than the target (e.g. EMCADNet's
``heads="lowres"`` outputs) are bilinearly upsampled (``align_corners=False``) to the target size first. With
``supervision="mutation"`` and ``criterion="ce_dice"`` the loss runs fused by default (``fused="auto"``):
:func:`emcad_kernels.mutation_loss` reads the low-resolution heads directly and computes the 15 subset softmaxes
per pixel without building the upsampled or summed logits (same value and gradients up to rounding).

Distributed training: with ``distributed=True`` (the trainer sets it under DDP), the Dice sums are all-reduced
across processes with a differentiable all-reduce, so the Dice term is that of the global batch and DDP gradients
equal single-process gradients with the same global batch. The CE and structure terms are means over samples of
equal-sized shards, which DDP's gradient averaging already makes global.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SUPERVISIONS", "SegmentationLoss", "ce_dice_loss", "combine_heads", "dice_loss", "flatten_outputs",
           "structure_loss"]

SUPERVISIONS = ("mutation", "heads_and_sum", "deep_supervision", "last_layer")


def _global_sum(t: Tensor, distributed: bool) -> Tensor:
    from emcad_kernels.ops.mutation_loss import all_reduce_sum  # the same all-reduce as mutation_loss

    return all_reduce_sum(t) if distributed else t


def dice_loss(logits: Tensor, target: Tensor, *, smooth: float = 1e-5, softmax: bool = True,
              weight: Optional[Sequence[float]] = None, distributed: bool = False) -> Tensor:
    """TransUNet ``DiceLoss``: ``logits (B, K, H, W)``, integer ``target (B, H, W)``; mean over the K classes of
    ``1 − (2·Σ p_c t_c + smooth) / (Σ p_c² + Σ t_c² + smooth)`` (sums over batch and pixels jointly)."""
    k = logits.shape[1]
    p = torch.softmax(logits, dim=1) if softmax else logits
    t = F.one_hot(target.long(), k).movedim(-1, 1).to(p.dtype)
    dims = (0, 2, 3)
    sums = torch.stack([(p * t).sum(dims), (p * p).sum(dims), (t * t).sum(dims)])  # (3, K)
    sums = _global_sum(sums, distributed)
    per_class = 1 - (2 * sums[0] + smooth) / (sums[1] + sums[2] + smooth)
    if weight is not None:
        per_class = per_class * torch.as_tensor(weight, dtype=per_class.dtype, device=per_class.device)
    return per_class.sum() / k


def ce_dice_loss(logits: Tensor, target: Tensor, *, ce_weight: float = 0.3, dice_weight: float = 0.7,
                 distributed: bool = False) -> Tensor:
    """``0.3 · CE(logits, target) + 0.7 · Dice(logits, target)`` (the per-subset term of the MUTATION loss)."""
    ce = F.cross_entropy(logits, target.long())
    return ce_weight * ce + dice_weight * dice_loss(logits, target, distributed=distributed)


def structure_loss(logits: Tensor, mask: Tensor, *, bce_reduction: str = "none") -> Tensor:
    """Boundary-weighted BCE + weighted IoU for binary ``logits (B, 1, H, W)`` and ``mask`` in [0, 1] of the same
    shape (or ``(B, H, W)``). Weight map ``w = 1 + 5·|avgpool31(m) − m|``.

    ``bce_reduction``: ``"none"`` — weighted BCE ``Σ w·bce / Σ w`` per image (intended, default); ``"mean"`` — the
    original code's collapsed form: plain mean BCE over the batch (reproduction flag for comparisons)."""
    if bce_reduction not in ("none", "mean"):
        raise ValueError(f"bce_reduction must be 'none' (weighted, default) or 'mean' (original quirk), "
                         f"got {bce_reduction!r}")
    if mask.dim() == 3:
        mask = mask[:, None]
    mask = mask.to(logits.dtype)
    weit = 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    if bce_reduction == "none":
        wbce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
        wbce = (weit * wbce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))
    else:
        wbce = F.binary_cross_entropy_with_logits(logits, mask, reduction="mean")
    pred = torch.sigmoid(logits)
    inter = ((pred * mask) * weit).sum(dim=(2, 3))
    union = ((pred + mask) * weit).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def flatten_outputs(outputs) -> list[Tensor]:
    """Model outputs as a flat list whose last element is the prediction: EMCADNet's ``[p4, p3, p2, p1]`` as it
    is, EGE-UNet's ``((p5, …, p1), p0)`` as ``[p5, …, p1, p0]``, a single tensor as ``[t]``. Only the outputs with
    the prediction's channel count are kept (EGE-UNet's 1-channel deep-supervision masks are dropped for a
    multi-class model)."""
    if isinstance(outputs, Tensor):
        return [outputs]
    flat: list[Tensor] = []
    for o in outputs:
        flat.extend(flatten_outputs(o) if isinstance(o, (list, tuple)) else [o])
    return [o for o in flat if o.shape[1] == flat[-1].shape[1]]


def combine_heads(outputs: Sequence[Tensor], supervision: str) -> list[Tensor]:
    """The logits that the criterion is applied to, for ``outputs = [p4, p3, p2, p1]``."""
    outputs = list(outputs)
    if supervision == "mutation":
        n = len(outputs)
        return [sum(outputs[i] for i in s) for r in range(1, n + 1) for s in itertools.combinations(range(n), r)]
    if supervision == "heads_and_sum":
        return outputs + [sum(outputs)]
    if supervision == "deep_supervision":
        return outputs
    if supervision == "last_layer":
        return [outputs[-1]]
    raise ValueError(f"unknown supervision {supervision!r}; expected one of {SUPERVISIONS}")


def _common_dtype(outputs: list[Tensor]) -> list[Tensor]:
    """Heads of mixed float dtypes (e.g. some under autocast) as float32, like the plain path computes them."""
    if all(isinstance(z, Tensor) for z in outputs) and len({z.dtype for z in outputs}) > 1:
        return [z.float() for z in outputs]
    return outputs


class SegmentationLoss(torch.nn.Module):
    """The training loss of a model with four head outputs.

    Args:
        num_classes: 1 → binary (sigmoid; default criterion ``structure``); ≥ 2 → multi-class (softmax; default
            criterion ``ce_dice``).
        supervision: one of :data:`SUPERVISIONS`, or "auto": ``mutation`` for multi-class, ``heads_and_sum``
            (paper Eq. 11) for binary.
        criterion: "auto", "ce_dice" or "structure".
        structure_bce_reduction: see :func:`structure_loss`.
        ce_weight, dice_weight: the multi-class mix (0.3 / 0.7).
        distributed: reduce the Dice sums over the DDP process group (set by the trainer).
        fused: the MUTATION + ce_dice loss through :func:`emcad_kernels.mutation_loss`: "auto" (default) whenever
            it supports the call (1 to 4 float heads with equal batch and classes, integer (B, H, W) target, a
            backend that runs it), True (required: a ValueError says why it cannot run), False (plain path).
            ``last_path`` records the path of the latest call ("fused" or "plain").
    """

    def __init__(self, num_classes: int, supervision: str = "auto", criterion: str = "auto", *,
                 structure_bce_reduction: str = "none", ce_weight: float = 0.3, dice_weight: float = 0.7,
                 distributed: bool = False, fused: str | bool = "auto"):
        super().__init__()
        if not (isinstance(fused, bool) or fused == "auto"):
            raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
        if supervision == "auto":
            supervision = "mutation" if num_classes > 1 else "heads_and_sum"
        if supervision not in SUPERVISIONS:
            raise ValueError(f"unknown supervision {supervision!r}; expected 'auto' or one of {SUPERVISIONS}")
        if criterion == "auto":
            criterion = "ce_dice" if num_classes > 1 else "structure"
        if criterion == "ce_dice" and num_classes < 2:
            raise ValueError("criterion 'ce_dice' needs num_classes >= 2 (softmax); binary models use 'structure'")
        if criterion == "structure" and num_classes != 1:
            raise ValueError("criterion 'structure' needs num_classes == 1 (a single sigmoid output)")
        if criterion not in ("ce_dice", "structure"):
            raise ValueError(f"unknown criterion {criterion!r}; expected 'auto', 'ce_dice' or 'structure'")
        if structure_bce_reduction not in ("none", "mean"):
            raise ValueError(f"structure_bce_reduction must be 'none' or 'mean', got {structure_bce_reduction!r}")
        self.num_classes, self.supervision, self.criterion = num_classes, supervision, criterion
        self.structure_bce_reduction = structure_bce_reduction
        self.ce_weight, self.dice_weight, self.distributed = ce_weight, dice_weight, distributed
        self.fused = fused
        self.last_path: Optional[str] = None

    def fused_unsupported_reason(self, outputs: Sequence[Tensor], target: Tensor) -> Optional[str]:
        """Why the fused MUTATION loss cannot compute ``forward(outputs, target)`` (None: it can). ``outputs``
        are the flattened heads (at most the last four are used)."""
        if self.supervision != "mutation":
            return f"supervision is {self.supervision!r}, the fused loss computes 'mutation'"
        if self.criterion != "ce_dice":
            return f"criterion is {self.criterion!r}, the fused loss computes 'ce_dice'"
        try:
            from emcad_kernels import backends as ek_backends
            from emcad_kernels.ops import mutation_loss as fused
        except ImportError as e:  # pragma: no cover - emcad_kernels is a dependency
            return f"emcad_kernels unavailable: {e}"
        try:
            ek_backends.select(fused.prepare(_common_dtype(list(outputs)[-4:]), target, check_values=False))
        except (TypeError, ValueError, ek_backends.BackendUnavailableError) as e:
            return str(e)
        return None

    def per_head(self) -> Callable[[Tensor, Tensor], Tensor]:
        if self.criterion == "ce_dice":
            return lambda z, y: ce_dice_loss(z, y, ce_weight=self.ce_weight, dice_weight=self.dice_weight,
                                             distributed=self.distributed)
        return lambda z, y: structure_loss(z, y.float(), bce_reduction=self.structure_bce_reduction)

    def _use_fused(self, outputs: list[Tensor], target: Tensor) -> bool:
        if self.fused is False:
            return False
        reason = self.fused_unsupported_reason(outputs, target)
        if reason is None:
            return True
        if self.fused is True:
            raise ValueError(f"SegmentationLoss(fused=True): the fused MUTATION loss cannot run this call: {reason}")
        return False

    def forward(self, outputs: Sequence[Tensor] | Tensor, target: Tensor) -> Tensor:
        """``outputs``: the model's heads (any spatial size; smaller ones are upsampled to the target's)."""
        outputs = flatten_outputs(outputs)
        if self._use_fused(outputs, target):
            from emcad_kernels import mutation_loss

            self.last_path = "fused"
            # one subset per non-empty subset of the (last four) heads; a single head is its own only subset
            return mutation_loss(_common_dtype(outputs[-4:]), target, ce_weight=self.ce_weight,
                                 dice_weight=self.dice_weight, distributed=self.distributed)
        self.last_path = "plain"
        size = tuple(target.shape[-2:])
        outputs = [z if tuple(z.shape[-2:]) == size else
                   F.interpolate(z, size=size, mode="bilinear", align_corners=False) for z in outputs]
        fn = self.per_head()
        supervision = self.supervision if len(outputs) > 1 else "last_layer"
        if supervision == "mutation" and len(outputs) > 4:  # 2^n - 1 subsets: keep the paper's four heads
            outputs = outputs[-4:]
        terms = combine_heads(outputs, supervision)
        return sum(fn(z if z.dtype in (torch.float32, torch.float64) else z.float(), target) for z in terms)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, supervision={self.supervision!r}, criterion={self.criterion!r}, "
                f"fused={self.fused!r}")
