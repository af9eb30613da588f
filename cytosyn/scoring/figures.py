"""Figures of a scoring run, with matplotlib through `cytosyn.figures` (no pyplot state, reproducible PNG
bytes, the "random weights" stamp): score distributions, the most and least anomalous tiles, and
counterfactual error maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cytosyn.figures import new_figure, save_figure, stamp_random

__all__ = ["plot_counterfactual", "plot_score_distributions", "plot_tile_rows"]


def plot_score_distributions(
    groups: Mapping[str, Mapping[str, np.ndarray]],
    path: Path,
    title: str = "anomaly scores",
    random_weights: bool = False,
) -> Path:
    """One panel per score: overlaid histograms (densities) of each group, e.g. ``reference`` vs a new
    domain, or one per label. ``groups``: score name → {group name → values}."""
    names = list(groups)
    fig = new_figure(4.2 * len(names), 3.4)
    for j, score in enumerate(names):
        ax = fig.add_subplot(1, len(names), j + 1)
        per = {g: np.asarray(v, dtype=np.float64) for g, v in groups[score].items()}
        per = {g: v[np.isfinite(v)] for g, v in per.items()}
        finite = [v for v in per.values() if v.size]
        allv = np.concatenate(finite) if finite else np.zeros(1)
        lo, hi = float(allv.min()), float(allv.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 25)
        for g, v in per.items():
            ax.hist(v, bins=bins, alpha=0.55, label=f"{g} (n={v.size})", density=True)
        ax.set_title(score, fontsize=10)
        ax.set_xlabel("score (larger = more anomalous)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    if random_weights:
        stamp_random(fig)
    return save_figure(fig, path)


def plot_tile_rows(
    rows: Mapping[str, Sequence[tuple[np.ndarray, str]]],
    path: Path,
    title: str = "",
    cell_in: float = 1.6,
    random_weights: bool = False,
) -> Path:
    """Rows of tiles with a caption under each (e.g. "most anomalous" / "least anomalous")."""
    rows = {k: list(v) for k, v in rows.items() if v}
    cols = max((len(v) for v in rows.values()), default=1)
    n_rows = max(1, len(rows))
    fig = new_figure(cell_in * cols + 1.2, (cell_in + 0.45) * n_rows + (0.4 if title else 0))
    for r, (label, tiles) in enumerate(rows.items()):
        for c in range(cols):
            ax = fig.add_subplot(n_rows, cols, r * cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(tiles):
                image, caption = tiles[c]
                ax.imshow(image)
                ax.set_xlabel(caption, fontsize=6)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if random_weights:
        stamp_random(fig)
    return save_figure(fig, path)


def plot_counterfactual(
    image: np.ndarray,
    diffs: np.ndarray,
    names: Sequence[str],
    predicted: str,
    path: Path,
    caption: str = "",
    random_weights: bool = False,
) -> Path:
    """The tile, then one overlay per class: its error map minus the predicted class's map (upsampled to
    the tile, diverging colours centred on 0, one shared scale): red where that class would explain the
    tile worse than the predicted one, blue where better."""
    from PIL import Image

    n = len(names)
    fig = new_figure(1.9 * (n + 1) + 0.8, 2.4)
    axes = [fig.add_subplot(1, n + 1, j + 1) for j in range(n + 1)]
    axes[0].imshow(image)
    axes[0].set_title(caption or "tile", fontsize=7)
    vmax = float(np.nanmax(np.abs(diffs))) or 1.0
    size = (image.shape[1], image.shape[0])
    im = None
    for j, name in enumerate(names):
        up = Image.fromarray(diffs[j].astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
        axes[j + 1].imshow(image)
        im = axes[j + 1].imshow(np.asarray(up), cmap="RdBu_r", vmin=-vmax, vmax=vmax, alpha=0.6)
        axes[j + 1].set_title(("★ " if name == predicted else "") + name, fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01, label="error − error(predicted)")
    if random_weights:
        stamp_random(fig)
    return save_figure(fig, path)
