"""Where tiles are cut: pyramid level choice and the tile grid, in physical units.

A tile of ``tile_px`` pixels at ``mpp`` microns per pixel covers ``tile_px * mpp / source_mpp`` level-0
pixels. It is read at the level whose downsample is the largest one not above that ratio (so the read
is never upsampled when it need not be), then area-resized to ``tile_px``. The grid is laid out in
integer pixels of the chosen level, so every tile is an exact pixel rectangle of that level, and its
level-0 corner is recorded for re-reading.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from cytosyn.config import StrictModel

# Downsample ratios within this relative distance of a level's are treated as equal to it (float noise
# in the metadata, e.g. Aperio levels at 4.000177): reading that level needs no resampling at all.
_LEVEL_MATCH_RTOL = 1e-3


class GridConfig(StrictModel):
    """The tile grid: size and resolution of tiles, spacing, which ones are kept."""

    mpp: float = Field(0.5, gt=0, le=1000)  # microns per pixel of the output tiles
    tile_px: int = Field(224, ge=1, le=16384)  # output tile side in pixels (224 px at 0.5 mpp = 112 µm)
    stride_px: int | None = Field(
        None, ge=1
    )  # grid step in output pixels; None = tile_px (no overlap, no gap)
    min_tissue_fraction: float = Field(0.5, ge=0, le=1)  # tiles with less tissue than this are not kept
    max_tiles_per_slide: int | None = Field(None, ge=1)  # keep at most this many, sampled deterministically
    seed: int = Field(0, ge=0)  # for the per-slide sampling under max_tiles_per_slide
    mpp_tolerance: float = Field(0.02, ge=0, lt=1)  # a scan up to 2% coarser than the target is used as is
    finer_than_scan: Literal["error", "warn"] = "error"  # target mpp finer than the scan: refuse or warn


class GridError(ValueError):
    """The slide cannot give tiles at the requested resolution."""


@dataclass(frozen=True)
class LevelPlan:
    """How one tile is read from the slide."""

    level: int
    downsample: float  # of `level`, as OpenSlide reports it
    level_size: tuple[int, int]  # pixels read at `level` per tile (w, h)
    level_stride: tuple[int, int]  # grid step in pixels of `level`
    read_size: tuple[int, int]  # level-0 pixels covered by a tile (w, h)
    resample: str  # "none", "box" or "bicubic"
    upsampled: bool  # True when the scan is coarser than the target beyond tolerance


def choose_level(level_downsamples: Sequence[float], needed: float) -> int:
    """Index of the level with the largest downsample ≤ ``needed`` (level 0 when none is)."""
    best = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= needed * (1 + _LEVEL_MATCH_RTOL) and ds >= level_downsamples[best]:
            best = i
    return best


def plan_level(
    level_downsamples: Sequence[float],
    source_mpp: tuple[float, float],
    cfg: GridConfig,
) -> LevelPlan:
    """Choose the level and the per-tile pixel sizes for the configured tile."""
    needed_x = cfg.mpp / source_mpp[0]
    needed_y = cfg.mpp / source_mpp[1]
    needed = min(needed_x, needed_y)
    upsampled = needed < 1 - cfg.mpp_tolerance
    if upsampled and cfg.finer_than_scan == "error":
        raise GridError(
            f"target {cfg.mpp} µm/px is finer than the scan ({source_mpp[0]:.4f} µm/px): tiles would be "
            f"upsampled {1 / needed:.2f}x. Use a coarser grid.mpp, or grid.finer_than_scan=warn to allow it."
        )
    level = choose_level(level_downsamples, needed)
    ds = float(level_downsamples[level])
    stride_px = cfg.stride_px or cfg.tile_px
    size = (max(1, round(cfg.tile_px * needed_x / ds)), max(1, round(cfg.tile_px * needed_y / ds)))
    stride = (max(1, round(stride_px * needed_x / ds)), max(1, round(stride_px * needed_y / ds)))
    read_size = (round(size[0] * ds), round(size[1] * ds))
    if size == (cfg.tile_px, cfg.tile_px):
        resample = "none"
    elif size[0] >= cfg.tile_px and size[1] >= cfg.tile_px:
        resample = "box"
    else:
        resample = "bicubic"
    return LevelPlan(level, ds, size, stride, read_size, resample, upsampled)


def grid_positions(level_dims: tuple[int, int], plan: LevelPlan) -> np.ndarray:
    """All tile corners (level pixels) that fit inside the level, row-major: array (N, 2) of x, y."""
    w, h = level_dims
    (sw, sh), (tx, ty) = plan.level_size, plan.level_stride
    if w < sw or h < sh:
        return np.zeros((0, 2), dtype=np.int64)
    xs = np.arange(0, w - sw + 1, tx, dtype=np.int64)
    ys = np.arange(0, h - sh + 1, ty, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def level0_corner(level_xy: np.ndarray, downsample: float) -> np.ndarray:
    """Level-0 pixel corners of level-pixel corners (exact when the downsample is an integer)."""
    return np.rint(np.asarray(level_xy, dtype=np.float64) * downsample).astype(np.int64)


def sample_indices(n: int, cap: int | None, seed: int, slide_id: str) -> np.ndarray:
    """Indices to keep, in increasing order: all, or ``cap`` of them drawn from (seed, slide_id)."""
    if cap is None or n <= cap:
        return np.arange(n)
    digest = hashlib.sha256(f"{seed}:{slide_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return np.sort(rng.choice(n, size=cap, replace=False))


def effective_mpp(plan: LevelPlan, source_mpp: tuple[float, float], tile_px: int) -> tuple[float, float]:
    """What one output pixel really measures, after rounding the read to whole pixels."""
    return (
        plan.read_size[0] * source_mpp[0] / tile_px,
        plan.read_size[1] * source_mpp[1] / tile_px,
    )


def is_integer_downsample(ds: float) -> bool:
    return math.isclose(ds, round(ds), rel_tol=0, abs_tol=1e-9)
