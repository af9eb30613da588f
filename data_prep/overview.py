"""``overview.png`` of a tiled slide, drawn with matplotlib: tissue, kept tiles, legend, scale bar, counts.

Called from the tiler's planning step (once per slide, in a worker process). matplotlib is imported
here, lazily, so a tiler worker that writes no overview never loads it; tile outlines are painted into
the pixel array (one numpy slice per edge) rather than as thousands of matplotlib patches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_overview"]

TISSUE_RGB = np.array([0, 200, 0], np.float32)
TILE_RGB = np.array([0, 60, 255], np.uint8)


def _nice_length(target: float) -> float:
    """The largest 1-2-5 × 10^k not above ``target`` (a readable scale-bar length)."""
    if target <= 0:
        return 1.0
    exp = 10 ** np.floor(np.log10(target))
    return float(max(m * exp for m in (1, 2, 5) if m * exp <= target))


def write_overview(
    path: Path,
    overview: np.ndarray,
    mask: np.ndarray,
    xy0: np.ndarray,
    read_size: tuple[int, int],
    mask_ds: tuple[float, float],
    *,
    slide_id: str,
    um_per_px: float,
    tile_px: int,
    tile_mpp: float,
) -> Path:
    """Write the overview PNG: the slide at ``um_per_px`` µm per overview pixel, tissue tinted, every kept
    tile outlined (``xy0``: level-0 corners, ``read_size``: level-0 size, ``mask_ds``: level-0 px per
    overview px), with a legend, a scale bar in µm and the tile count in the title."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from cytosyn.figures import new_figure, save_figure

    scale = max(1, int(np.ceil(600 / max(overview.shape[:2]))))
    img = overview.astype(np.float32)
    img[mask] = img[mask] * 0.6 + TISSUE_RGB * 0.4
    img = np.repeat(np.repeat(img.astype(np.uint8), scale, axis=0), scale, axis=1)
    h, w = img.shape[:2]
    for x, y in np.asarray(xy0).reshape(-1, 2):
        x0, y0 = int(x / mask_ds[0] * scale), int(y / mask_ds[1] * scale)
        x1 = min(w - 1, int((x + read_size[0]) / mask_ds[0] * scale) - 1)
        y1 = min(h - 1, int((y + read_size[1]) / mask_ds[1] * scale) - 1)
        if x1 < x0 or y1 < y0:
            continue
        img[y0, x0 : x1 + 1] = img[y1, x0 : x1 + 1] = TILE_RGB
        img[y0 : y1 + 1, x0] = img[y0 : y1 + 1, x1] = TILE_RGB
    aspect = h / w
    fig_w = 6.0
    fig_h = fig_w * aspect + 0.45
    fig = new_figure(fig_w, fig_h, dpi=100)
    ax = fig.add_axes((0.01, 0.01, 0.98, 1 - 0.02 - 0.4 / fig_h))  # laid out by hand: no tight bbox pass
    ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    um_per_img_px = um_per_px / scale
    bar_um = _nice_length(0.25 * w * um_per_img_px)
    label = f"{bar_um / 1000:g} mm" if bar_um >= 1000 else f"{bar_um:g} µm"
    ax.add_artist(
        AnchoredSizeBar(ax.transData, bar_um / um_per_img_px, label, "lower right", pad=0.4, color="black",
                        frameon=True, size_vertical=max(1, h // 150))
    )  # fmt: skip
    n = len(np.asarray(xy0).reshape(-1, 2))
    tissue_pct = 100.0 * float(mask.mean()) if mask.size else 0.0
    ax.legend(
        handles=[
            Patch(facecolor=(0.3, 0.78, 0.3), label=f"tissue ({tissue_pct:.0f}% of the overview)"),
            Line2D([0], [0], color=TILE_RGB / 255, lw=2, label=f"kept tile ({n})"),
        ],
        loc="upper right",
        fontsize=8,
        framealpha=0.85,
    )
    ax.set_title(
        f"{slide_id}: {n} tiles of {tile_px} px at {tile_mpp:g} µm/px ({tile_px * tile_mpp:g} µm field of view)",
        fontsize=10,
    )
    return save_figure(fig, path, tight=False, compress_level=1)
