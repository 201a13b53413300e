"""PNG figures without a plotting library: training curves and image / ground truth / prediction overlays.

Text (titles, axes, legends, column headers) is drawn with Pillow's ``ImageDraw`` and its built-in font; Pillow is
a dependency of the package. Should it be missing anyway, the figures are still drawn with numpy alone, without any
text, and a warning on stderr says so.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

from emcad.data.io import encode_png, atomic_write_bytes

__all__ = ["PALETTE", "colorize", "overlay", "plot_curves", "save_overlay_grid", "to_uint8_image"]

PALETTE = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
    [170, 110, 40], [255, 250, 200], [128, 0, 0],
], dtype=np.uint8)
_LINE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


_warned_no_text = False


def _pil():
    global _warned_no_text
    try:
        from PIL import Image, ImageDraw
        return Image, ImageDraw
    except ImportError:
        if not _warned_no_text:
            _warned_no_text = True
            print("warning: Pillow is not installed, so the PNG figures have no text (titles, axes, legends, "
                  "column headers); pip install pillow", file=sys.stderr)
        return None


def _save(path: str | os.PathLike, rgb: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(np.ascontiguousarray(rgb, dtype=np.uint8)))


def to_uint8_image(image) -> np.ndarray:
    """``(C, H, W)`` / ``(H, W)`` / ``(H, W, 3)`` tensor or array → ``(H, W, 3)`` uint8, min-max scaled."""
    a = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    lo, hi = float(np.min(a)), float(np.max(a))
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = (a * 255 + 0.5).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def colorize(labels) -> np.ndarray:
    lab = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    return PALETTE[np.asarray(lab, dtype=np.int64) % len(PALETTE)]


def overlay(image, labels, alpha: float = 0.5) -> np.ndarray:
    """The image with the non-background labels blended in their palette colours, ``(H, W, 3)`` uint8."""
    base = to_uint8_image(image).astype(np.float32)
    lab = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    col = colorize(lab).astype(np.float32)
    fg = (lab > 0)[..., None]
    out = np.where(fg, (1 - alpha) * base + alpha * col, base)
    return (out + 0.5).astype(np.uint8)


def _upscale(a: np.ndarray, factor: int) -> np.ndarray:
    return a.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else a


def save_overlay_grid(path: str | os.PathLike, images: Sequence, gts: Sequence, preds: Sequence, *,
                      max_rows: int = 8, scale: Optional[int] = None,
                      class_names: Optional[Sequence[str]] = None) -> None:
    """A PNG grid with one row per sample: image | ground truth overlay | prediction overlay; with
    ``class_names``, a legend below says which colour is which class."""
    n = min(len(images), max_rows)
    if n == 0:
        raise ValueError("save_overlay_grid needs at least one sample")
    tiles = []
    for i in range(n):
        row = [to_uint8_image(images[i]), overlay(images[i], gts[i]), overlay(images[i], preds[i])]
        tiles.append(row)
    h, w = tiles[0][0].shape[:2]
    if scale is None:
        scale = max(1, 160 // max(h, w))
    h, w = h * scale, w * scale
    pad, header, char_w, line_h = 4, 16, 6, 14  # Pillow's built-in font: about 6 x 11 pixels a character
    width = 3 * (w + pad) + pad
    legend = []  # (x, line, name, colour): a colour swatch and the class name, wrapped to the width
    x, line = pad, 0
    for c, name in enumerate(class_names or []):
        if c == 0:
            continue  # background is not coloured
        entry_w = char_w * (len(str(name)) + 2)
        if x > pad and x + entry_w > width - pad:
            x, line = pad, line + 1
        legend.append((x, line, str(name), tuple(int(v) for v in PALETTE[c % len(PALETTE)])))
        x += entry_w + 2 * char_w
    footer = (line + 1) * line_h + pad if legend else 0
    canvas = np.full((header + n * (h + pad) + pad + footer, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            tile = _upscale(tile, scale)[:h, :w]
            y, x = header + pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    pil = _pil()
    if pil is not None:
        Image, ImageDraw = pil
        im = Image.fromarray(canvas)
        draw = ImageDraw.Draw(im)
        for c, title in enumerate(("image", "ground truth", "prediction")):
            draw.text((pad + c * (w + pad) + 2, 2), title, fill=(0, 0, 0))
        top = header + n * (h + pad) + pad
        for x, line, name, colour in legend:
            y = top + line * line_h
            draw.rectangle((x, y + 2, x + 7, y + 9), fill=colour)
            draw.text((x + char_w * 2, y), name, fill=(0, 0, 0))
        canvas = np.asarray(im)
    _save(path, canvas)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _panel(canvas, draw, box, series, title, ylabel, ylim=None):
    """Draw line series ``[(label, xs, ys, colour)]`` into ``box = (x0, y0, x1, y1)`` of ``canvas``."""
    x0, y0, x1, y1 = box
    left, bottom, top, right = 48, 28, 20, 10
    px0, py0, px1, py1 = x0 + left, y0 + top, x1 - right, y1 - bottom
    xs_all = [x for _, xs, ys, _ in series for x, y in zip(xs, ys) if math.isfinite(y)]
    ys_all = [y for _, xs, ys, _ in series for y in ys if math.isfinite(y)]
    canvas[py0:py1 + 1, [px0, px1]] = 0
    canvas[[py0, py1], px0:px1 + 1] = 0
    if not xs_all:
        return
    xmin, xmax = min(xs_all), max(xs_all)
    if xmax == xmin:
        xmax = xmin + 1
    ymin, ymax = ylim if ylim is not None else (min(ys_all), max(ys_all))
    if ymax - ymin < 1e-12:
        ymin, ymax = ymin - 0.5, ymax + 0.5

    def tx(x):
        return px0 + (x - xmin) / (xmax - xmin) * (px1 - px0)

    def ty(y):
        return py1 - (y - ymin) / (ymax - ymin) * (py1 - py0)

    for t in _nice_ticks(ymin, ymax):
        yy = int(round(ty(t)))
        if py0 <= yy <= py1:
            canvas[yy, px0:px1:3] = 200
            if draw is not None:
                draw.text((x0 + 2, yy - 5), f"{t:.3g}", fill=(0, 0, 0))
    for t in _nice_ticks(xmin, xmax):
        xx = int(round(tx(t)))
        if px0 <= xx <= px1:
            canvas[py1:py1 + 4, xx] = 0
            if draw is not None:
                draw.text((xx - 8, py1 + 6), f"{t:g}", fill=(0, 0, 0))
    for k, (label, xs, ys, colour) in enumerate(series):
        pts = [(tx(x), ty(min(max(y, ymin), ymax))) for x, y in zip(xs, ys) if math.isfinite(y)]
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            steps = int(max(abs(xb - xa), abs(yb - ya))) + 1
            for s in range(steps + 1):
                xi = int(round(xa + (xb - xa) * s / steps))
                yi = int(round(ya + (yb - ya) * s / steps))
                canvas[max(yi - 1, 0):yi + 1, max(xi - 1, 0):xi + 1] = colour
        if len(pts) == 1:
            xi, yi = int(round(pts[0][0])), int(round(pts[0][1]))
            canvas[max(yi - 2, 0):yi + 3, max(xi - 2, 0):xi + 3] = colour
        if draw is not None:
            draw.text((px0 + 8, py0 + 4 + 12 * k), label, fill=tuple(int(c) for c in colour))
    if draw is not None:
        draw.text((x0 + left, y0 + 4), title, fill=(0, 0, 0))
        draw.text((px1 - 40, py1 + 16), "step", fill=(0, 0, 0))
        del ylabel


def plot_curves(path: str | os.PathLike, train_rows: Sequence[dict], val_rows: Sequence[dict],
                class_names: Optional[Sequence[str]] = None) -> None:
    """Two panels: training loss (raw and smoothed) and validation Dice per class and mean, against the step."""
    width, height = 960, 400
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    pil = _pil()
    image = draw = None
    # text is drawn after the numpy lines: draw into a Pillow image that shares nothing, then copy back
    steps = [r["step"] for r in train_rows]
    losses = [float(r["loss"]) for r in train_rows]
    beta = 0.9 if len(losses) > 50 else 0.6
    smooth, ema = [], 0.0
    for t, v in enumerate(losses, 1):  # debiased exponential moving average
        ema = beta * ema + (1 - beta) * v
        smooth.append(ema / (1 - beta ** t))
    loss_series = [("loss", steps, losses, (170, 200, 230)), (f"loss (EMA {beta})", steps, smooth, _LINE_COLOURS[0])]
    from emcad.training.evaluation import per_class_values

    val_steps = [r["step"] for r in val_rows]
    # rows name their classes (dice_lesion); rows of older runs hold indices (dice_1): both are read
    per_row = [per_class_values(r, "dice", class_names) for r in val_rows]
    classes = list(dict.fromkeys(k for values in per_row for k in values))
    val_series = [("dice mean", val_steps, [float(r.get("dice_mean", math.nan)) for r in val_rows],
                   _LINE_COLOURS[0])]
    for i, key in enumerate(classes, 1):
        val_series.append((f"dice {key}", val_steps, [float(v.get(key, math.nan)) for v in per_row],
                           _LINE_COLOURS[i % len(_LINE_COLOURS)]))
    if pil is not None:
        Image, ImageDraw = pil
        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
    # lines and axes go into the numpy canvas; text into the Pillow image; then merged
    _panel(canvas, draw, (0, 0, width // 2, height), loss_series, "training loss", "loss")
    _panel(canvas, draw, (width // 2, 0, width, height), val_series, "validation Dice", "dice", ylim=(0.0, 1.0))
    if image is not None:
        text = np.asarray(image)
        mask = np.any(text != 255, axis=-1)
        canvas = np.where(mask[..., None], text, canvas)
    _save(path, canvas)
