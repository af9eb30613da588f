"""matplotlib figures: the slide overview, tile grids with labels and the random-weights stamp."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from cytosyn.figures import RANDOM_STAMP, tile_grid


def test_slide_overview_has_legend_scale_bar_and_counts(tmp_path):
    from cytosyn.data_prep.overview import _nice_length, write_overview

    rng = np.random.default_rng(0)
    overview = rng.integers(180, 255, size=(120, 90, 3), dtype=np.uint8)
    mask = np.zeros((120, 90), bool)
    mask[20:100, 10:80] = True
    xy0 = np.array([[x, y] for y in range(640, 3200, 448) for x in range(320, 2560, 448)])  # level-0 px
    path = write_overview(
        tmp_path / "overview.png", overview, mask, xy0, (448, 448), (32.0, 32.0),
        slide_id="TCGA-XX-0001", um_per_px=8.0, tile_px=224, tile_mpp=0.5,
    )  # fmt: skip
    with Image.open(path) as im:
        assert im.size[0] > 400 and im.size[1] > 400
        pixels = np.asarray(im.convert("RGB"))
    assert (np.abs(pixels.astype(int) - [0, 60, 255]).sum(-1) < 30).sum() > 100  # tile outlines drawn
    assert _nice_length(720.0) == 500.0 and _nice_length(0.3) == 0.2


def test_tile_grid_labels_and_random_stamp(tmp_path):
    tiles = np.random.default_rng(1).integers(0, 255, size=(3, 32, 32, 3), dtype=np.uint8)
    fig = tile_grid(
        {"reference": tiles, "generated": tiles[::-1]}, column_labels=["a", "b", "c"], random_weights=True
    )
    texts = [t.get_text() for t in fig.texts]
    assert "RANDOM WEIGHTS" in texts and RANDOM_STAMP in texts
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == ["reference", "generated"]
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"]
    clean = tile_grid({"generated": tiles})
    assert not any("RANDOM" in t.get_text() for t in clean.texts)


def test_matplotlib_is_not_imported_by_the_tiler_or_cytosyn_figures():
    code = "import cytosyn.data_prep.tiler, cytosyn.figures, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-1000:]
