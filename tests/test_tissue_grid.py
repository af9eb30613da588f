"""Unit tests of tissue detection, exact box integration, level choice and the grid."""

from __future__ import annotations

import numpy as np
import pytest
from cytosyn.data_prep.grid import (
    GridConfig,
    GridError,
    choose_level,
    grid_positions,
    plan_level,
    sample_indices,
)
from cytosyn.data_prep.tissue import TissueConfig, box_fractions, detect_tissue

from cytosyn.identity import parse_tcga_barcode, resolve_identity


def test_box_fractions_match_brute_force_supersampling():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 30)) > 0.5
    boxes = []
    for _ in range(50):
        x0, y0 = rng.uniform(-2, 28), rng.uniform(-2, 18)
        boxes.append((x0, y0, x0 + rng.uniform(0.3, 6), y0 + rng.uniform(0.3, 6)))
    got = box_fractions(mask, np.array(boxes))
    for (x0, y0, x1, y1), value in zip(boxes, got):
        xs = np.linspace(x0, x1, 801)[:-1] + (x1 - x0) / 1600
        ys = np.linspace(y0, y1, 801)[:-1] + (y1 - y0) / 1600
        xx, yy = np.meshgrid(xs, ys)
        inside = (xx >= 0) & (xx < 30) & (yy >= 0) & (yy < 20)
        vals = np.zeros_like(xx, dtype=bool)
        vals[inside] = mask[yy[inside].astype(int), xx[inside].astype(int)]
        assert value == pytest.approx(vals.mean(), abs=5e-3)


def _scene(background, with_tissue=True):
    img = np.full((200, 200, 3), background, np.uint8)
    if with_tissue:
        yy, xx = np.mgrid[:200, :200]
        disk = (yy - 100) ** 2 + (xx - 90) ** 2 < 50**2
        img[disk] = (200, 120, 170)
    noise = np.random.default_rng(1).integers(-4, 5, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8), (yy - 100) ** 2 + (
        xx - 90
    ) ** 2 < 50**2 if with_tissue else None


@pytest.mark.parametrize("background", [(245, 245, 245), (5, 5, 5)])
def test_detects_drawn_tissue_on_white_and_black(background):
    img, truth = _scene(background)
    mask, _ = detect_tissue(img, TissueConfig(mask_mpp=8.0))
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95


def test_blank_glass_has_no_tissue():
    img, _ = _scene((240, 238, 242), with_tissue=False)
    mask, threshold = detect_tissue(img, TissueConfig())
    assert not mask.any() and threshold >= TissueConfig().min_saturation


def test_green_pen_is_not_tissue():
    img, _ = _scene((245, 245, 245))
    img[20:30, 10:190] = (30, 160, 60)  # a green pen stroke
    mask, _ = detect_tissue(img, TissueConfig())
    assert not mask[20:30, 10:40].any()
    assert detect_tissue(img, TissueConfig(pen_hue_ranges=[]))[0][20:30, 10:40].any()  # it is the hue rule


def test_level_choice_is_largest_downsample_not_above_need():
    downsamples = [1.0, 4.000177, 16.0007, 64.01]
    assert choose_level(downsamples, 2.0) == 0
    assert choose_level(downsamples, 4.0) == 1  # metadata float noise still counts as level 1
    assert choose_level(downsamples, 15.9) == 1
    assert choose_level(downsamples, 100) == 3
    assert choose_level(downsamples, 0.5) == 0


def test_plan_level_sizes_and_refusal():
    plan = plan_level([1, 4, 16], (0.2525, 0.2525), GridConfig())
    assert plan.level == 0 and plan.level_size == (444, 444) and plan.resample == "box"
    plan = plan_level([1, 4, 16], (0.25, 0.25), GridConfig(mpp=1.0))
    assert plan.level == 1 and plan.level_size == (224, 224) and plan.resample == "none"
    assert plan.read_size == (896, 896)
    with pytest.raises(GridError, match="finer than the scan"):
        plan_level([1], (0.5, 0.5), GridConfig(mpp=0.25))
    assert plan_level([1], (0.505, 0.505), GridConfig()).resample == "bicubic"  # within tolerance


def test_grid_with_overlap_is_row_major_and_inside():
    plan = plan_level([1], (0.5, 0.5), GridConfig(stride_px=112))
    xy = grid_positions((1000, 700), plan)
    assert (xy[:, 0] + 224 <= 1000).all() and (xy[:, 1] + 224 <= 700).all()
    assert list(map(tuple, xy[:3])) == [(0, 0), (112, 0), (224, 0)]
    assert len(xy) == 7 * 5


def test_sampling_is_deterministic_and_depends_on_slide():
    a = sample_indices(100, 10, 0, "s1")
    assert np.array_equal(a, sample_indices(100, 10, 0, "s1"))
    assert not np.array_equal(a, sample_indices(100, 10, 0, "s2"))
    assert np.array_equal(sample_indices(5, 10, 0, "s1"), np.arange(5))


def test_identity_from_tcga_table_and_fallback():
    assert parse_tcga_barcode("TCGA-A1-A0SB-01Z-00-DX1.B34C68B2") == ("TCGA-A1-A0SB", "A1")
    ident = resolve_identity("TCGA-A1-A0SB-01Z-00-DX1.B34C68B2", None, "BRCA")
    assert (ident.patient_id, ident.tss, ident.project, ident.identity_source) == (
        "TCGA-A1-A0SB",
        "A1",
        "BRCA",
        "tcga_barcode",
    )
    assert resolve_identity("slide7").identity_source == "slide_id"
