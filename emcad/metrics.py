"""Segmentation metrics: Dice, IoU (Jaccard) and HD95, per class and per case.

HD95 is the 95th percentile of the symmetric surface distances, as in medpy's ``hd95``: the surface of a mask is the
set of its foreground pixels/voxels that have a background neighbour (face connectivity), distances come from
``scipy.ndimage.distance_transform_edt`` with the pixel ``spacing``, and the percentile is taken over the union of
both directed distance sets. Masks may be 2-D or 3-D.

Empty-mask conventions (per case and class; P = prediction, G = ground truth):

``convention="standard"`` (default):

=========  =========  ======  ======  ==========================================
P          G          Dice    IoU     HD95
=========  =========  ======  ======  ==========================================
non-empty  non-empty  2|P∩G|/(|P|+|G|)  |P∩G|/|P∪G|  hd95(P, G)
non-empty  empty      0       0       the image diagonal (the largest distance
empty      non-empty  0       0       possible in the grid, with spacing)
empty      empty      NaN     NaN     NaN  (class absent: no information)
=========  =========  ======  ======  ==========================================

NaN entries are left out of the averages (:func:`nanmean`), so a class that is absent from a case and correctly
not predicted neither helps nor hurts; a missed or hallucinated structure scores Dice 0 and the worst HD95.

``convention="transunet"`` reproduces the TransUNet/EMCAD evaluation code (docs/models.md#synapse-data-and-evaluation,
docs/models.md#original-code-quirks) for comparisons with published numbers: P non-empty and G non-empty → the standard
values; P non-empty and G empty → Dice 1, HD95 0; P empty → Dice 0, HD95 0 (whatever G). IoU follows Dice's rule there.
It flatters HD95 (a missed
organ scores 0) and should not be used for new results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = ["CONVENTIONS", "CaseMetrics", "binary_metrics", "case_metrics", "dice_coefficient", "hd95",
           "iou_score", "nanmean", "summarize"]

CONVENTIONS = ("standard", "transunet")


def _as_bool(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a).astype(bool)


def dice_coefficient(pred, gt) -> float:
    """``2|P∩G| / (|P| + |G|)``; NaN when both are empty."""
    p, g = _as_bool(pred), _as_bool(gt)
    denom = p.sum() + g.sum()
    return float(2.0 * np.logical_and(p, g).sum() / denom) if denom else math.nan


def iou_score(pred, gt) -> float:
    """``|P∩G| / |P∪G|``; NaN when both are empty."""
    p, g = _as_bool(pred), _as_bool(gt)
    union = np.logical_or(p, g).sum()
    return float(np.logical_and(p, g).sum() / union) if union else math.nan


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances from the surface voxels of ``a`` to the surface of ``b`` (both non-empty)."""
    from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

    footprint = generate_binary_structure(a.ndim, 1)
    a_border = a ^ binary_erosion(a, structure=footprint, iterations=1)
    b_border = b ^ binary_erosion(b, structure=footprint, iterations=1)
    dt = distance_transform_edt(~b_border, sampling=spacing)
    return dt[a_border]


def _diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing))))


def hd95(pred, gt, spacing: Optional[Sequence[float]] = None) -> float:
    """95th-percentile Hausdorff distance between two non-empty masks (medpy's definition); raises ValueError if
    either is empty (see :func:`binary_metrics` for the empty-mask conventions)."""
    p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape:
        raise ValueError(f"hd95: shapes differ: {p.shape} vs {g.shape}")
    if not p.any() or not g.any():
        raise ValueError("hd95 is undefined for an empty mask; use binary_metrics for the conventions")
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * p.ndim
    d = np.concatenate([_surface_distances(p, g, spacing), _surface_distances(g, p, spacing)])
    return float(np.percentile(d, 95))


def binary_metrics(pred, gt, *, spacing: Optional[Sequence[float]] = None, convention: str = "standard",
                   compute_hd95: bool = True) -> dict[str, float]:
    """``{"dice", "iou", "hd95"}`` of one binary prediction against one binary ground truth under ``convention``
    (see the module docstring). ``compute_hd95=False`` gives NaN for HD95 (fast validation)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")
    p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction and ground truth shapes differ: {p.shape} vs {g.shape}")
    sp = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * p.ndim
    pn, gn = bool(p.any()), bool(g.any())
    if pn and gn:
        return {"dice": dice_coefficient(p, g), "iou": iou_score(p, g),
                "hd95": hd95(p, g, sp) if compute_hd95 else math.nan}
    if convention == "transunet":
        if pn:  # gt empty
            return {"dice": 1.0, "iou": 1.0, "hd95": 0.0}
        return {"dice": 0.0, "iou": 0.0, "hd95": 0.0}
    if not pn and not gn:
        return {"dice": math.nan, "iou": math.nan, "hd95": math.nan}
    return {"dice": 0.0, "iou": 0.0, "hd95": _diagonal(p.shape, sp) if compute_hd95 else math.nan}


@dataclass
class CaseMetrics:
    """Metrics of one case: ``per_class[c] = {"dice", "iou", "hd95"}`` for the evaluated classes."""

    name: str
    per_class: dict[int, dict[str, float]] = field(default_factory=dict)

    def mean(self, metric: str) -> float:
        return nanmean([v[metric] for v in self.per_class.values()])


def case_metrics(pred_labels, gt_labels, num_classes: int, *, name: str = "", classes: Optional[Sequence[int]] = None,
                 spacing: Optional[Sequence[float]] = None, convention: str = "standard",
                 compute_hd95: bool = True) -> CaseMetrics:
    """Per-class metrics of a label map (2-D or 3-D). ``num_classes`` is the model's: 1 (binary: labels 0/1) or
    K ≥ 2. ``classes`` defaults to the foreground classes (1 … K−1, or [1] for binary)."""
    p = pred_labels.detach().cpu().numpy() if hasattr(pred_labels, "detach") else np.asarray(pred_labels)
    g = gt_labels.detach().cpu().numpy() if hasattr(gt_labels, "detach") else np.asarray(gt_labels)
    if classes is None:
        classes = [1] if num_classes == 1 else list(range(1, num_classes))
    out = CaseMetrics(name)
    for c in classes:
        out.per_class[int(c)] = binary_metrics(p == c, g == c, spacing=spacing, convention=convention,
                                               compute_hd95=compute_hd95)
    return out


def nanmean(values) -> float:
    """Mean of the non-NaN values; NaN if there are none."""
    a = np.asarray([v for v in values], dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def summarize(cases: Sequence[CaseMetrics], metrics: Sequence[str] = ("dice", "iou", "hd95")) -> dict:
    """Per-class means over cases (NaN entries skipped) and their mean over classes:
    ``{"per_class": {c: {metric: mean}}, "mean": {metric: mean over classes}, "cases": n}``."""
    classes = sorted({c for case in cases for c in case.per_class})
    per_class = {c: {m: nanmean([case.per_class[c][m] for case in cases if c in case.per_class]) for m in metrics}
                 for c in classes}
    mean = {m: nanmean([per_class[c][m] for c in classes]) for m in metrics}
    return {"per_class": per_class, "mean": mean, "cases": len(cases)}
