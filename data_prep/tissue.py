"""Tissue detection on a low-resolution overview of the slide.

H&E tissue is saturated (pink/purple) while glass is white and scanner borders or black backgrounds
are dark, so a pixel is tissue when its HSV saturation exceeds an Otsu threshold clamped to [floor, ceiling] (the floor
so a slide of pure glass yields no tissue rather than thresholding its noise; the ceiling so a slide
that is all tissue is not split in half) and its value is not too dark. Pen ink
hues can be excluded. Morphological closing/opening, hole filling and a minimum object area, all given
in microns so they mean the same at any mask resolution, clean the mask up.

The mask lives at 8 µm/px and is closed, so it says *where* tissue is, not how much of a tile is
tissue: the tiler uses it to pre-select candidate tiles, then measures each candidate's fraction on the
tile's own pixels with the same pixel rule (:func:`tile_tissue_fraction`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk, remove_small_holes, remove_small_objects

from cytosyn.config import StrictModel


class TissueConfig(StrictModel):
    """Parameters of tissue detection (every length in microns, areas in square microns)."""

    mask_mpp: float = Field(8.0, gt=0)  # resolution of the mask: 8 µm/px makes a 112 µm tile 14 mask px wide
    use_thumbnail: bool = True  # slides without a coarse pyramid level: detect on the scanner thumbnail
    min_saturation: float = Field(0.07, ge=0, le=1)  # floor of the saturation threshold (HSV, 0-1)
    use_otsu: bool = True  # move the threshold to Otsu's over the non-dark pixels, within [min, max]
    max_saturation: float = Field(0.15, ge=0, le=1)  # ceiling of that threshold: on a slide that is all
    # tissue, Otsu splits the tissue's own saturation in two; the ceiling keeps faint tissue in
    min_value: float = Field(0.12, ge=0, le=1)  # darker pixels (black backgrounds, borders) are never tissue
    pen_hue_ranges: list[tuple[float, float]] = [(0.20, 0.55)]  # green/cyan ink; [] keeps every hue
    pen_min_saturation: float = Field(0.25, ge=0, le=1)  # only strongly coloured pixels in those hues are ink
    # Morphology on the overview mask (which only pre-selects tiles; see fraction_from): closing joins
    # tissue pieces closer than ~2× this; an opening of r erases every strand narrower than 2r, so it is
    # off by default (dust is removed by min_area_um2 instead); set it to drop thin debris.
    closing_um: float = Field(16.0, ge=0)
    opening_um: float = Field(0.0, ge=0)
    max_hole_um2: float = Field(20_000.0, ge=0)  # holes smaller than this inside tissue are filled
    min_area_um2: float = Field(20_000.0, ge=0)  # connected tissue pieces smaller than this are dropped
    # Where a tile's tissue_fraction comes from: "tile" = its own pixels, measured when it is cut (the
    # mask pre-selects candidates; a candidate below grid.min_tissue_fraction is dropped and counted);
    # "mask" = the overview mask over the tile's footprint (coarse; the closing counts glass as tissue).
    fraction_from: Literal["tile", "mask"] = "tile"

    @field_validator("pen_hue_ranges")
    @classmethod
    def _check_hues(cls, value: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for lo, hi in value:
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"hue range ({lo}, {hi}) must satisfy 0 ≤ low ≤ high ≤ 1")
        return value

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> TissueConfig:
        if self.min_saturation > self.max_saturation:
            raise ValueError(
                f"min_saturation ({self.min_saturation}) must not exceed max_saturation ({self.max_saturation})"
            )
        return self


def _radius_px(um: float, mask_mpp: float) -> int:
    return max(0, round(um / mask_mpp))


def _channels(rgb: np.ndarray) -> tuple[np.ndarray, ...]:
    """R, G, B (float32, 0-1), their max (HSV value) and min, channel by channel: NumPy reductions over
    a 3-wide last axis are an order of magnitude slower."""
    r, g, b = (rgb[..., c].astype(np.float32) / 255.0 for c in range(3))
    return r, g, b, np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _hue(r: np.ndarray, g: np.ndarray, b: np.ndarray, vmax: np.ndarray, vmin: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 1), the standard formula (as ``skimage.color.rgb2hsv``, which converts in float64
    and costs ~20× more); 0 for grey pixels."""
    delta = np.where(vmax > vmin, vmax - vmin, 1.0)
    h = np.where(
        vmax == r, (g - b) / delta, np.where(vmax == g, (b - r) / delta + 2.0, (r - g) / delta + 4.0)
    )
    return np.where(h < 0, h + 6.0, h) / 6.0


def _tissue_pixels(rgb: np.ndarray, threshold: float, cfg: TissueConfig) -> tuple[np.ndarray, np.ndarray]:
    """The pixel rule: saturated above ``threshold``, not dark, and not pen ink. Returns (mask, saturation)."""
    r, g, b, vmax, vmin = _channels(rgb)
    saturation = np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-6), 0.0)
    mask = (vmax >= cfg.min_value) & (saturation > threshold)
    if cfg.pen_hue_ranges:
        candidates = mask & (saturation >= cfg.pen_min_saturation)  # only these can be ink
        if candidates.any():
            hue = _hue(r, g, b, vmax, vmin)
            for lo, hi in cfg.pen_hue_ranges:
                mask &= ~(candidates & (hue >= lo) & (hue <= hi))
    return mask, saturation


def _saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, _, _, vmax, vmin = _channels(rgb)
    return np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-6), 0.0), vmax


def detect_tissue(rgb: np.ndarray, cfg: TissueConfig) -> tuple[np.ndarray, float]:
    """Return the boolean tissue mask of an RGB overview at ``cfg.mask_mpp`` and the threshold used."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got shape {rgb.shape}")
    saturation, vmax = _saturation(rgb)
    threshold = cfg.min_saturation
    values = saturation[vmax >= cfg.min_value]
    if cfg.use_otsu and values.size > 16 and np.ptp(values) > 1e-3:
        threshold = min(max(threshold, float(threshold_otsu(values))), cfg.max_saturation)
    mask, _ = _tissue_pixels(rgb, threshold, cfg)
    return _clean(mask, cfg), threshold


def tile_tissue_fraction(tile: np.ndarray, threshold: float, cfg: TissueConfig) -> float:
    """Fraction of a tile's own pixels that are tissue by the slide's pixel rule (no morphology).

    This is what ``tissue_fraction`` records (``tissue.fraction_from: tile``): the overview mask is
    coarse (8 µm/px) and closed, so it counts glass between tissue pieces as tissue. Measured on a
    regular grid of 48×48 to 95×95 of the tile's pixels (every 4th pixel of a 224-px tile, every pixel of
    a small one): within ~1% of the full count, at a few percent of a tile's cutting cost.
    """
    step = max(1, min(tile.shape[:2]) // 48)
    mask, _ = _tissue_pixels(tile[::step, ::step], threshold, cfg)
    return float(mask.mean())


def _clean(mask: np.ndarray, cfg: TissueConfig) -> np.ndarray:
    r_close = _radius_px(cfg.closing_um, cfg.mask_mpp)
    r_open = _radius_px(cfg.opening_um, cfg.mask_mpp)
    if r_close:
        # Pad so closing does not erode tissue that touches the border of the overview.
        padded = np.pad(mask, r_close, mode="edge")
        mask = ndimage.binary_closing(padded, structure=disk(r_close))[r_close:-r_close, r_close:-r_close]
    if r_open:
        mask = ndimage.binary_opening(mask, structure=disk(r_open))
    px_area = cfg.mask_mpp**2
    hole_px = int(cfg.max_hole_um2 / px_area)
    if hole_px > 0:
        mask = remove_small_holes(mask, max_size=hole_px)
    min_px = int(cfg.min_area_um2 / px_area)
    if min_px > 0:
        mask = remove_small_objects(mask, max_size=min_px)
    return mask


def box_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Exact mean of ``mask`` over axis-aligned boxes given in (fractional) mask-pixel coordinates.

    ``boxes`` is (N, 4): x0, y0, x1, y1. The integral image of a piecewise-constant image is bilinear
    inside each pixel, so interpolating it bilinearly at the box corners integrates exactly, also for
    boxes that cut through mask pixels. Parts of a box outside the mask count as non-tissue.
    """
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    boxes = np.asarray(boxes, dtype=np.float64)
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    area = np.maximum((x1 - x0) * (y1 - y0), 1e-12)

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        xi = np.minimum(np.floor(x).astype(np.int64), w - 1)
        yi = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - xi, y - yi
        return (
            integral[yi, xi] * (1 - fx) * (1 - fy)
            + integral[yi, xi + 1] * fx * (1 - fy)
            + integral[yi + 1, xi] * (1 - fx) * fy
            + integral[yi + 1, xi + 1] * fx * fy
        )

    total = at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)
    return np.clip(total / area, 0.0, 1.0)
