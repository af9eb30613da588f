"""Figures of the evaluation report, drawn with matplotlib (`cytosyn.figures`): the reference vs generated
tile grid here; each study draws its own plots (labelled axes, CIs as error bars) in its module."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cytosyn.figures import new_figure, save_figure, tile_grid

__all__ = ["has_random_weights", "new_figure", "render_image_grid", "save_figure", "yerr"]


def has_random_weights(generator: Mapping[str, Any]) -> bool:
    """True when any weights behind a generator description are random-initialised (test stand-ins)."""
    if generator.get("random_init"):
        return True
    for part in ("vae", "conditioning"):
        info = generator.get(part) or {}
        if str(info.get("weights") or "").startswith("random-init"):
            return True
    return False


def yerr(cis: list[Mapping[str, float]]) -> np.ndarray:
    """matplotlib's ``yerr`` (2 × n: below, above) from CI dicts ``{estimate, low, high}``; NaN → 0."""
    est = np.array([c["estimate"] for c in cis], dtype=np.float64)
    low = np.array([c["low"] if c["low"] is not None else np.nan for c in cis], dtype=np.float64)
    high = np.array([c["high"] if c["high"] is not None else np.nan for c in cis], dtype=np.float64)
    return np.nan_to_num(np.stack([est - low, high - est]).clip(min=0), nan=0.0)


def render_image_grid(
    rows: dict[str, np.ndarray], path: Path, *, random_weights: bool = False, title: str | None = None
) -> Path:
    """Rows of tiles (label → uint8 N×H×W×3), e.g. references above the tiles generated from them; column
    ``i`` of every row belongs together (tile ``i`` is generated from reference ``i``)."""
    rows = {k: v for k, v in rows.items() if v is not None and len(v)}
    ncols = min(8, max(len(v) for v in rows.values()))
    fig = tile_grid(
        rows,
        column_labels=[f"#{i}" for i in range(ncols)],
        title=title or "reference tiles and the tiles generated from them (same column)",
        random_weights=random_weights,
    )
    return save_figure(fig, path)
