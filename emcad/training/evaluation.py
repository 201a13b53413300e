"""Inference helpers shared by training-time validation, ``emcad evaluate`` and ``emcad predict``.

* :func:`predict_logits`: logits of any image size. H and W must be multiples of 32 for EMCADNet; other sizes are
  handled by ``mode="resize"`` (resize to ``size``, predict, resize the logits back: bilinear), ``mode="pad"``
  (reflect-pad to the next multiple of 32, crop back), or ``mode="sliding"`` (windows of ``size`` with
  ``overlap``, logits averaged with a Gaussian-free flat weight; the image is padded to at least one window).
* :func:`labels_from_logits`: argmax for multi-class, ``logit > 0`` for binary (one output channel).
* :func:`evaluate_dataset`: per-case metrics of a 2-D dataset (each image a case).
* :func:`evaluate_volumes`: per-case (3-D) metrics of Synapse test volumes, slice by slice (resize to the model's
  input size with cubic splines, back with order 0, as the original evaluation).
"""

from __future__ import annotations

import inspect

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from emcad.metrics import CaseMetrics, case_metrics, summarize

__all__ = ["HEADS", "MULTIPLE", "class_keys", "evaluate_dataset", "evaluate_volumes", "format_summary",
           "forward_head", "labels_from_logits", "per_class_values", "predict_logits"]

HEADS = ("last", "sum")
MULTIPLE = 32


def forward_head(model: torch.nn.Module, x: Tensor, head: str = "last") -> Tensor:
    """The prediction logits: ``p1`` (the last output, EMCAD.md §8.2) or the sum of all heads (CASCADE). Models
    whose forward takes ``heads`` (EMCADNet) then compute and upsample p1 only."""
    from emcad.losses import flatten_outputs

    if head == "last" and "heads" in inspect.signature(model.forward).parameters:
        return model(x, heads="last")[-1]
    out = flatten_outputs(model(x))
    if head == "last":
        return out[-1]
    if head == "sum":
        return sum(out)
    raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")


def labels_from_logits(logits: Tensor) -> Tensor:
    """``(B, K, H, W)`` logits → ``(B, H, W)`` int64 labels (argmax; ``logit > 0`` when K == 1)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def _round_up(v: int, m: int = MULTIPLE) -> int:
    return -(-v // m) * m


@torch.no_grad()
def predict_logits(model: torch.nn.Module, image: Tensor, *, mode: str = "resize",
                   size: Optional[Sequence[int]] = None, overlap: float = 0.5, head: str = "last",
                   batch_size: int = 8) -> Tensor:
    """Logits ``(B, K, H, W)`` at the input size for ``image (B, C, H, W)`` of any size (see module docstring).
    When H and W are already multiples of 32 and ``size`` is None or equal, the model runs directly."""
    if image.dim() == 3:
        image = image[None]
    b, _, h, w = image.shape
    if mode not in ("resize", "pad", "sliding"):
        raise ValueError(f"mode must be 'resize', 'pad' or 'sliding', got {mode!r}")
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if size[0] % MULTIPLE or size[1] % MULTIPLE:
            raise ValueError(f"size must be multiples of {MULTIPLE}, got {size[0]}x{size[1]}")
    if mode == "resize":
        target = size or (_round_up(h), _round_up(w))
        if (h, w) == tuple(target):
            return forward_head(model, image, head)
        x = F.interpolate(image, size=target, mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(forward_head(model, x, head), size=(h, w), mode="bilinear", align_corners=False)
    if mode == "pad":
        ph, pw = _round_up(h) - h, _round_up(w) - w
        x = image
        if ph or pw:
            pad_mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(image, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode=pad_mode)
        out = forward_head(model, x, head)
        return out[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
    # sliding window
    wh, ww = size or (min(_round_up(h), 224), min(_round_up(w), 224))
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    x = F.pad(image, (0, pw, 0, ph), mode="replicate") if ph or pw else image
    H, W = x.shape[-2:]
    sh, sw = max(1, int(wh * (1 - overlap))), max(1, int(ww * (1 - overlap)))
    ys = list(range(0, H - wh + 1, sh))
    xs = list(range(0, W - ww + 1, sw))
    if ys[-1] != H - wh:
        ys.append(H - wh)
    if xs[-1] != W - ww:
        xs.append(W - ww)
    acc: Optional[Tensor] = None
    count = torch.zeros(1, 1, H, W, device=image.device)
    windows = [(y, x0) for y in ys for x0 in xs]
    for i in range(0, len(windows), max(1, batch_size // max(b, 1))):
        chunk = windows[i:i + max(1, batch_size // max(b, 1))]
        tiles = torch.cat([x[..., y:y + wh, x0:x0 + ww] for y, x0 in chunk])
        logits = forward_head(model, tiles, head).float()
        if acc is None:
            acc = torch.zeros(b, logits.shape[1], H, W, device=image.device)
        for j, (y, x0) in enumerate(chunk):
            acc[..., y:y + wh, x0:x0 + ww] += logits[j * b:(j + 1) * b]
            count[..., y:y + wh, x0:x0 + ww] += 1
    return (acc / count)[..., :h, :w]


@torch.no_grad()
def evaluate_dataset(model: torch.nn.Module, dataset, num_classes: int, *, batch_size: int = 16,
                     device: str | torch.device = "cpu", head: str = "last", convention: str = "standard",
                     compute_hd95: bool = True, spacing: Optional[Sequence[float]] = None,
                     keep: int = 0, autocast_dtype: Optional[torch.dtype] = None,
                     progress: Optional[Callable] = None) -> tuple[dict, list[CaseMetrics], list]:
    """Evaluate every image of ``dataset`` as one case; the model is put in eval mode (the caller switches it
    back). Returns ``(summary, cases, kept)``: :func:`emcad.metrics.summarize` output, the per-case metrics and
    the first ``keep`` ``(image, label, prediction)`` triples (for overlay figures)."""
    model.eval()
    cases: list[CaseMetrics] = []
    kept: list = []
    names = getattr(dataset, "names", None)
    device = torch.device(device)
    n = len(dataset)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        pairs = [dataset[i] for i in idx]
        images = torch.stack([p[0] for p in pairs]).to(device)
        labels = torch.stack([p[1] for p in pairs])
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = predict_logits(model, images, mode="pad", head=head)
        preds = labels_from_logits(logits.float()).cpu()
        for j, i in enumerate(idx):
            name = names[i] if names is not None else str(i)
            cases.append(case_metrics(preds[j], labels[j], num_classes, name=name, spacing=spacing,
                                      convention=convention, compute_hd95=compute_hd95))
            if len(kept) < keep:
                kept.append((images[j].cpu(), labels[j], preds[j]))
        if progress is not None:
            progress(len(idx))
    return summarize(cases), cases, kept


@torch.no_grad()
def evaluate_volumes(model: torch.nn.Module, volumes, num_classes: int, size: Sequence[int], *,
                     device: str | torch.device = "cpu", head: str = "last", convention: str = "standard",
                     batch_size: int = 16, spacing: Optional[Sequence[float]] = None,
                     progress: Optional[Callable] = None) -> tuple[dict, list[CaseMetrics]]:
    """Per-volume 3-D metrics for :class:`emcad.data.SynapseVolumes` (EMCAD.md §8.2)."""
    from emcad.data.synapse import zoom_slice

    model.eval()
    device = torch.device(device)
    cases = []
    for i in range(len(volumes)):
        name, image, label = volumes[i]
        pred = np.zeros_like(label)
        for s0 in range(0, image.shape[0], batch_size):
            sl = [zoom_slice(image[s], size, order=3).astype(np.float32)
                  for s in range(s0, min(s0 + batch_size, image.shape[0]))]
            x = torch.from_numpy(np.stack(sl))[:, None].to(device)
            lab = labels_from_logits(forward_head(model, x, head).float()).cpu().numpy()
            for j, s in enumerate(range(s0, s0 + len(sl))):
                pred[s] = zoom_slice(lab[j], image.shape[1:], order=0)
        cases.append(case_metrics(pred, label, num_classes, name=name, spacing=spacing, convention=convention))
        if progress is not None:
            progress(1)
    return summarize(cases), cases


def format_summary(summary: dict, class_names: Optional[Sequence[str]] = None) -> str:
    """A small text table of per-class and mean metrics."""
    metrics = list(summary["mean"])
    lines = [f"{'class':<16}" + "".join(f"{m:>10}" for m in metrics)]
    for c, vals in summary["per_class"].items():
        label = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        lines.append(f"{label:<16}" + "".join(f"{vals[m]:>10.4f}" if not math.isnan(vals[m]) else f"{'nan':>10}"
                                              for m in metrics))
    lines.append(f"{'mean':<16}" + "".join(f"{summary['mean'][m]:>10.4f}" for m in metrics))
    return "\n".join(lines)


def class_keys(classes: Sequence[int], class_names: Optional[Sequence[str]] = None) -> dict[int, str]:
    """The name under which each class index's metrics are stored (``dice_<key>`` columns, JSON keys): the class
    name with spaces as ``_`` ("right kidney" -> "right_kidney"); the index itself where there is no usable name
    (none given, empty, "mean", or the same name twice)."""
    names = list(class_names or [])
    keys = {}
    for c in classes:
        name = str(names[c]).strip().replace(" ", "_") if 0 <= c < len(names) else ""
        keys[c] = name or str(c)
    counts: dict[str, int] = {}
    for k in keys.values():
        counts[k] = counts.get(k, 0) + 1
    return {c: (k if counts[k] == 1 and k != "mean" else str(c)) for c, k in keys.items()}


def per_class_values(row: dict, metric: str, class_names: Optional[Sequence[str]] = None) -> dict[str, float]:
    """``{class key: value}`` of ``metric`` from a validation row, whether it holds ``dice_<name>`` keys or the
    index keys (``dice_1``) that earlier versions wrote (those are mapped to the class names)."""
    prefix = metric + "_"
    index_keys = class_keys(range(len(class_names or [])), class_names)
    out = {}
    for key, value in row.items():
        if not key.startswith(prefix) or key == prefix + "mean":
            continue
        suffix = key[len(prefix):]
        if suffix.isdigit():
            suffix = index_keys.get(int(suffix), suffix)
        out[suffix] = value
    return out
