"""Figures of a scoring run (matplotlib, Agg backend): score distributions, the most and least anomalous
tiles, and counterfactual error maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_counterfactual", "plot_score_distributions", "plot_tile_rows"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_score_distributions(
    groups: Mapping[str, Mapping[str, np.ndarray]], path: Path, title: str = "anomaly scores"
) -> Path:
    """One panel per score: overlaid histograms of each group (e.g. ``reference`` vs ``new domain``).

    ``groups``: score name → {group name → values}."""
    plt = _pyplot()
    names = list(groups)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, score in zip(axes[0], names):
        per = {g: np.asarray(v, dtype=np.float64) for g, v in groups[score].items()}
        per = {g: v[np.isfinite(v)] for g, v in per.items()}
        allv = (
            np.concatenate([v for v in per.values() if v.size])
            if any(v.size for v in per.values())
            else np.zeros(1)
        )
        lo, hi = float(allv.min()), float(allv.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 25)
        for g, v in per.items():
            ax.hist(v, bins=bins, alpha=0.55, label=f"{g} (n={v.size})", density=True)
        ax.set_title(score)
        ax.set_xlabel("score (larger = more anomalous)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_tile_rows(
    rows: Mapping[str, Sequence[tuple[np.ndarray, str]]], path: Path, title: str = "", cell: float = 1.6
) -> Path:
    """Rows of tiles with a caption under each (e.g. "most anomalous" / "least anomalous")."""
    plt = _pyplot()
    rows = {k: list(v) for k, v in rows.items() if v}
    cols = max((len(v) for v in rows.values()), default=1)
    fig, axes = plt.subplots(
        max(1, len(rows)), cols, figsize=(cell * cols + 1.2, (cell + 0.45) * max(1, len(rows))), squeeze=False
    )
    for r, (label, tiles) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r][c]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_counterfactual(
    image: np.ndarray,
    diffs: np.ndarray,
    names: Sequence[str],
    predicted: str,
    path: Path,
    caption: str = "",
) -> Path:
    """The tile, then one overlay per class: its error map minus the predicted class's map (upsampled to
    the tile, diverging colours centred on 0, shared scale): where the tile would have to change to look
    like that class instead."""
    plt = _pyplot()
    from PIL import Image

    n = len(names)
    fig, axes = plt.subplots(1, n + 1, figsize=(1.9 * (n + 1), 2.3), squeeze=False)
    ax0 = axes[0][0]
    ax0.imshow(image)
    ax0.set_title(caption or "tile", fontsize=7)
    vmax = float(np.nanmax(np.abs(diffs))) or 1.0
    size = (image.shape[1], image.shape[0])
    im = None
    for j, name in enumerate(names):
        ax = axes[0][j + 1]
        up = np.asarray(
            Image.fromarray(diffs[j].astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
        )
        ax.imshow(image)
        im = ax.imshow(up, cmap="RdBu_r", vmin=-vmax, vmax=vmax, alpha=0.6)
        ax.set_title(("★ " if name == predicted else "") + name, fontsize=7)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.01, label="error − error(predicted)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
