"""Figures with matplotlib, shared by every stage: tile grids, the "random weights" stamp, saving.

matplotlib is imported only inside these functions (tiler workers and data_prep verbs that draw nothing
stay light), and only through its object-oriented API (``matplotlib.figure.Figure`` + the Agg canvas):
no pyplot, no global backend switch, so a user's interactive matplotlib session is left alone.
Saved PNGs carry no software/version metadata, so the same figure gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cytosyn.fileio import atomic_write_bytes

__all__ = ["RANDOM_STAMP", "new_figure", "save_figure", "stamp_random", "tile_grid"]

RANDOM_STAMP = "RANDOM WEIGHTS — test artifact, not a model"


def new_figure(width_in: float, height_in: float, dpi: int = 100) -> Any:
    """A matplotlib Figure attached to an Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(
    fig: Any, path: str | Path, dpi: int | None = None, *, tight: bool = True, compress_level: int = 6
) -> Path:
    """PNG bytes of ``fig`` written atomically to ``path`` (no metadata: reproducible bytes).

    ``tight`` crops to the drawn content (it renders the figure twice: hot paths lay the figure out
    themselves and pass False); ``compress_level`` is zlib's (1: fast, for per-slide overviews)."""
    buf = io.BytesIO()
    extra = {"bbox_inches": "tight", "pad_inches": 0.1} if tight else {}
    fig.savefig(
        buf,
        format="png",
        dpi=dpi,
        metadata={"Software": None},
        pil_kwargs={"compress_level": compress_level},
        **extra,
    )
    return atomic_write_bytes(Path(path), buf.getvalue())


def stamp_random(fig: Any, text: str = RANDOM_STAMP) -> None:
    """A large red diagonal stamp across the figure and a banner under it: random weights are visible."""
    fig.text(
        0.5,
        0.5,
        "RANDOM WEIGHTS",
        color=(0.85, 0.1, 0.1, 0.45),
        fontsize=max(14, int(fig.get_figwidth() * 6)),
        fontweight="bold",
        ha="center",
        va="center",
        rotation=25,
        zorder=1000,
    )
    fig.text(
        0.5, 0.0, text, color="white", backgroundcolor=(0.8, 0.1, 0.1), fontsize=10, ha="center", va="top"
    )


def tile_grid(
    rows: Mapping[str, Sequence[np.ndarray]],
    *,
    column_labels: Sequence[str] | None = None,
    title: str | None = None,
    random_weights: bool = False,
    cell_in: float = 1.25,
    max_cols: int = 8,
) -> Any:
    """A figure of uint8 tiles, one row per ``rows`` entry, labelled rows and (optional) columns.

    ``rows``: label → tiles (H×W×3 uint8), e.g. {"reference": [...], "generated": [...]}; at most
    ``max_cols`` per row. ``random_weights`` adds :func:`stamp_random`.
    """
    rows = {k: list(v)[:max_cols] for k, v in rows.items() if v is not None and len(v)}
    if not rows:
        raise ValueError("tile_grid needs at least one non-empty row")
    ncols = max(len(v) for v in rows.values())
    label_in = 1.3
    fig = new_figure(label_in + ncols * cell_in, 0.5 + len(rows) * cell_in + (0.35 if title else 0))
    grid = fig.add_gridspec(len(rows), ncols, wspace=0.04, hspace=0.04 if not column_labels else 0.18)
    for r, (label, tiles) in enumerate(rows.items()):
        for c in range(ncols):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(tiles):
                ax.imshow(
                    np.asarray(tiles[c]), interpolation="lanczos" if tiles[c].shape[0] > 256 else "nearest"
                )
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10, labelpad=8)
            if r == 0 and column_labels is not None and c < len(column_labels):
                ax.set_title(column_labels[c], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11, y=1.0)
    if random_weights:
        stamp_random(fig)
    return fig
