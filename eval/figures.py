"""Figures shared by the evaluation report (image grids, axes); each study draws its own plots with these.

Drawn with PIL for now (matplotlib was not a dependency when this was written).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .report import fmt

__all__ = ["render_image_grid"]

# viridis at 9 stops (matplotlib's colour map, sampled), interpolated linearly.
_VIRIDIS = np.array(
    [
        [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
        [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
    ],
    dtype=np.float64,
)  # fmt: skip


def _colour(t: float) -> tuple[int, int, int]:
    if not math.isfinite(t):
        return (200, 200, 200)
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    c = _VIRIDIS[i] + (_VIRIDIS[i + 1] - _VIRIDIS[i]) * (t - i)
    return (round(c[0]), round(c[1]), round(c[2]))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: fixed bitmap font
        return ImageFont.load_default()


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _nice_range(values: list[float], include_zero: bool = True) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if include_zero:
        lo = min(0.0, lo)
    else:
        pad = 0.08 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 1.0
        lo, hi = lo - pad, hi + pad
    return lo, hi if hi > lo else lo + 1.0


def _axes(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], lo: float, hi: float) -> None:
    x0, y0, x1, y1 = box
    font = _font(11)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = y1 - (y1 - y0) * i / 4
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.line([(x0 + 1, y), (x1, y)], fill=(230, 230, 230))
        draw.text((x0 - 48, y - 6), fmt(v), fill="black", font=font)


def render_image_grid(rows: dict[str, np.ndarray], path: Path, cell: int = 112, max_cols: int = 8) -> Path:
    """Rows of tiles (label → uint8 N×H×W×3), e.g. references above the tiles generated from them."""
    rows = {k: v for k, v in rows.items() if v is not None and len(v)}
    cols = min(max_cols, max(len(v) for v in rows.values()))
    label_w, pad = 150, 4
    img = Image.new("RGB", (label_w + cols * (cell + pad), len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    for r, (label, tiles) in enumerate(rows.items()):
        y = pad + r * (cell + pad)
        draw.text((6, y + cell // 2 - 8), label, fill="black", font=_font(12))
        for c, tile in enumerate(tiles[:cols]):
            thumb = Image.fromarray(np.asarray(tile)).resize((cell, cell), Image.Resampling.BOX)
            img.paste(thumb, (label_w + c * (cell + pad), y))
    img.save(path, format="PNG")
    return path
