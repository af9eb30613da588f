"""Tests for cytosyn.data_prep.synthetic: synthetic pyramidal slides that OpenSlide must open.

The tiler's geometry tests trust these slides, so the checks here read the files back through
OpenSlide itself (not through the writer's own helpers) and compare against independently computed
expectations wherever possible.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from cytosyn.data_prep.synthetic import (
    Shape,
    default_tissue,
    level_dimensions,
    render_tile,
    write_synthetic_slide,
)

BG = (240, 238, 235)
GREEN = (10, 200, 30)
BLUE = (20, 40, 220)


def _read(
    slide: openslide.OpenSlide, level: int, x0: int = 0, y0: int = 0, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Read a region as an RGB array; (x0, y0) are level-0 coordinates as OpenSlide expects."""
    if size is None:
        size = slide.level_dimensions[level]
    rgba = np.asarray(slide.read_region((x0, y0), level, size))
    assert (rgba[..., 3] == 255).all(), "region should be fully opaque inside the slide"
    return rgba[..., :3]


def _covered_indices(start: float, length: float, ds: int, n: int) -> np.ndarray:
    """Indices i in [0, n) whose sample point (i + 0.5) * ds lies in [start, start + length)."""
    pts = (np.arange(n) + 0.5) * ds
    return np.nonzero((pts >= start) & (pts < start + length))[0]


def _bbox_of_colour(img: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((img == np.asarray(colour, dtype=np.uint8)).all(axis=-1))
    assert ys.size, f"colour {colour} not found"
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# --------------------------------------------------------------------------------------------------
# Opening in OpenSlide: vendor, levels, dimensions, downsamples, mpp
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", ["generic", "aperio"])
@pytest.mark.parametrize("mpp", [0.25, 0.2525, 0.5])
def test_opens_with_expected_metadata(tmp_path: Path, vendor: str, mpp: float) -> None:
    suffix = ".tif" if vendor == "generic" else ".svs"
    path = write_synthetic_slide(
        tmp_path / f"s{suffix}", width=4096, height=3072, mpp=mpp, vendor=vendor, tissue=[]
    )
    assert path == tmp_path / f"s{suffix}"
    with openslide.OpenSlide(str(path)) as slide:
        props = dict(slide.properties)
        assert props["openslide.vendor"] == ("generic-tiff" if vendor == "generic" else "aperio")
        assert slide.level_count == 3
        # ceil(4096/16) x ceil(3072/16) = 256 x 192: exactly one tile wide, so it is kept.
        assert slide.level_dimensions == ((4096, 3072), (1024, 768), (256, 192))
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert float(props["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
        assert float(props["openslide.mpp-y"]) == pytest.approx(mpp, rel=1e-6)
        for k in range(3):
            assert props[f"openslide.level[{k}].tile-width"] == "256"
        if vendor == "aperio":
            assert float(props["aperio.MPP"]) == pytest.approx(mpp)
            assert props["aperio.AppMag"] == str(round(10 / mpp))
            assert props["openslide.objective-power"] == str(round(10 / mpp))
            assert props["tiff.ImageDescription"].startswith("Aperio Image Library")


def test_generic_layout_is_top_level_tiled_ifds_with_cm_resolution(tmp_path: Path) -> None:
    mpp = 0.2525
    path = write_synthetic_slide(
        tmp_path / "s.tiff", width=2048, height=2048, mpp=mpp, downsamples=(1, 2, 8), tissue=[]
    )
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3
        for k, (page, ds) in enumerate(zip(tif.pages, (1, 2, 8))):
            assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
            assert page.shape == (2048 // ds, 2048 // ds, 3)
            assert page.dtype == np.uint8
            assert page.photometric == tifffile.PHOTOMETRIC.RGB
            assert page.subifds is None
            assert page.subfiletype == (1 if k else 0)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert num / den == pytest.approx(10000 / (mpp * ds), rel=1e-6)
            # determinism: nothing time- or version-dependent in the file
            for name in ("DateTime", "Software", "ImageDescription"):
                assert name not in page.tags


@pytest.mark.parametrize("vendor", ["generic", "aperio"])
def test_no_mpp_means_no_mpp_properties(tmp_path: Path, vendor: str) -> None:
    suffix = ".tif" if vendor == "generic" else ".svs"
    path = write_synthetic_slide(
        tmp_path / f"s{suffix}", width=1024, height=1024, mpp=None, vendor=vendor, tissue=[]
    )
    with openslide.OpenSlide(str(path)) as slide:
        props = dict(slide.properties)
    assert "openslide.mpp-x" not in props
    assert "openslide.mpp-y" not in props
    assert "aperio.MPP" not in props
    assert props.get("tiff.ResolutionUnit", "none") == "none"
    if vendor == "aperio":
        assert props["openslide.vendor"] == "aperio"
        assert "MPP" not in props["tiff.ImageDescription"]
        assert props["aperio.AppMag"] == "20"


def test_small_levels_dropped_and_uneven_sizes(tmp_path: Path) -> None:
    # 1000 px: ceil(1000/4) = 250 and ceil(1000/16) = 63 are both under one 256 tile -> dropped.
    assert level_dimensions(1000, 1000, (1, 4, 16)) == [(1, 1000, 1000)]
    path = write_synthetic_slide(tmp_path / "a.tif", width=1000, height=1000, mpp=0.5, tissue=[])
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_count == 1
    # Sizes not divisible by the downsample: ceil, and OpenSlide's derived downsample stays close.
    dims = level_dimensions(5001, 3333, (1, 4, 16))
    assert dims == [(1, 5001, 3333), (4, 1251, 834), (16, 313, 209)]
    path = write_synthetic_slide(tmp_path / "b.tif", width=5001, height=3333, mpp=0.5, tissue=[])
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == ((5001, 3333), (1251, 834), (313, 209))
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0), rel=0.01)
        assert slide.level_downsamples[2] != 16.0  # OpenSlide derives it from the sizes


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        write_synthetic_slide(tmp_path / "x.svs", width=512, height=512, mpp=0.5)
    with pytest.raises(ValueError, match="suffix"):
        write_synthetic_slide(tmp_path / "x.tif", width=512, height=512, mpp=0.5, vendor="aperio")
    with pytest.raises(ValueError, match="start with 1"):
        write_synthetic_slide(tmp_path / "x.tif", width=512, height=512, mpp=0.5, downsamples=(2, 4))
    with pytest.raises(ValueError, match="increasing"):
        write_synthetic_slide(tmp_path / "x.tif", width=512, height=512, mpp=0.5, downsamples=(1, 4, 4))
    with pytest.raises(ValueError, match="multiple of 16"):
        write_synthetic_slide(tmp_path / "x.tif", width=512, height=512, mpp=0.5, tile_size=100)
    with pytest.raises(ValueError, match="mpp"):
        write_synthetic_slide(tmp_path / "x.tif", width=512, height=512, mpp=0.0)
    assert not list(tmp_path.iterdir()), "a rejected call must not leave files behind"


# --------------------------------------------------------------------------------------------------
# Pixels: the procedural rule, read back through OpenSlide
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", ["generic", "aperio"])
def test_rect_exact_at_level0_and_downsampled_at_level1(tmp_path: Path, vendor: str) -> None:
    rect = Shape("rect", 301, 157, 123, 77, GREEN)  # crosses the tile boundary at x=256
    frac = Shape("rect", 10.5, 20.25, 5, 3, BLUE)  # sub-pixel edges
    suffix = ".tif" if vendor == "generic" else ".svs"
    path = write_synthetic_slide(
        tmp_path / f"s{suffix}",
        width=1024,
        height=768,
        mpp=0.5,
        vendor=vendor,
        downsamples=(1, 4),
        background=BG,
        tissue=[],
        shapes=[rect, frac],
        compression="zlib",
    )
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == ((1024, 768), (256, 192))
        lvl0 = _read(slide, 0)
        lvl1 = _read(slide, 1)
        # A read at a level-0 offset lands on the same pixels.
        crop = _read(slide, 0, 290, 150, (150, 100))

    # Level 0: integer-aligned rect covers exactly columns 301..423 and rows 157..233.
    assert _bbox_of_colour(lvl0, GREEN) == (301, 157, 301 + 123 - 1, 157 + 77 - 1)
    assert (lvl0[157:234, 301:424] == GREEN).all()
    assert (lvl0[156, 301:424] == BG).all() and (lvl0[234, 301:424] == BG).all()
    assert (lvl0[157:234, 300] == BG).all() and (lvl0[157:234, 424] == BG).all()
    np.testing.assert_array_equal(crop, lvl0[150:250, 290:440])
    # Sub-pixel rect: sample points x+0.5 in [10.5, 15.5) -> 10..14; y+0.5 in [20.25, 23.25) -> 20..22.
    assert _bbox_of_colour(lvl0, BLUE) == (10, 20, 14, 22)
    # Everything else is background, exactly.
    expected = np.empty_like(lvl0)
    expected[...] = BG
    expected[157:234, 301:424] = GREEN
    expected[20:23, 10:15] = BLUE
    np.testing.assert_array_equal(lvl0, expected)

    # Level 1 (ds=4): pixel j samples level-0 x = 4j + 2.
    cols = _covered_indices(rect.x, rect.w, 4, 256)
    rows = _covered_indices(rect.y, rect.h, 4, 192)
    assert (cols[0], cols[-1], rows[0], rows[-1]) == (
        75,
        105,
        39,
        57,
    )  # 4*75+2=302, 4*105+2=422; 4*39+2=158, 4*57+2=230
    exp1 = np.empty_like(lvl1)
    exp1[...] = BG
    exp1[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = GREEN
    fcols = _covered_indices(frac.x, frac.w, 4, 256)
    frows = _covered_indices(frac.y, frac.h, 4, 192)
    assert fcols.tolist() == [3] and frows.tolist() == [5]  # 4*3+2=14 in [10.5,15.5); 22 in [20.25,23.25)
    exp1[5, 3] = BLUE
    np.testing.assert_array_equal(lvl1, exp1)


def test_disk_coverage_matches_rule(tmp_path: Path) -> None:
    disk = Shape("disk", 200.5, 150.0, 61.0, 0.0, GREEN)
    path = write_synthetic_slide(
        tmp_path / "d.tif",
        width=512,
        height=512,
        mpp=0.5,
        downsamples=(1,),
        background=BG,
        tissue=[],
        shapes=[disk],
    )
    with openslide.OpenSlide(str(path)) as slide:
        img = _read(slide, 0)
    yy, xx = np.mgrid[0:512, 0:512]
    inside = ((xx + 0.5 - 200.5) ** 2 + (yy + 0.5 - 150.0) ** 2) < 30.5**2
    np.testing.assert_array_equal((img == GREEN).all(axis=-1), inside)
    np.testing.assert_array_equal((img == BG).all(axis=-1), ~inside)


def test_shapes_drawn_over_tissue_and_levels_match_render_tile(tmp_path: Path) -> None:
    """Every stored tile equals render_tile (texture included) and shapes sit on top of tissue."""
    tissue = [Shape("disk", 400, 400, 500, 0, (234, 160, 196))]
    rect = Shape("rect", 380, 380, 40, 40, GREEN)  # inside the tissue disk
    path = write_synthetic_slide(
        tmp_path / "t.tif",
        width=1024,
        height=1024,
        mpp=0.5,
        downsamples=(1, 4),
        tissue=tissue,
        shapes=[rect],
        seed=7,
    )
    with openslide.OpenSlide(str(path)) as slide:
        levels = [_read(slide, 0), _read(slide, 1)]
    for k, ds in enumerate((1, 4)):
        img = levels[k]
        n = img.shape[0] // 256
        for tr in range(n):
            for tc in range(n):
                exp = render_tile(
                    level_index=k,
                    downsample=ds,
                    tile_row=tr,
                    tile_col=tc,
                    background=(255, 255, 255),
                    tissue=tissue,
                    shapes=[rect],
                    seed=7,
                )
                np.testing.assert_array_equal(img[tr * 256 : (tr + 1) * 256, tc * 256 : (tc + 1) * 256], exp)
    lvl0 = levels[0]
    assert (lvl0[380:420, 380:420] == GREEN).all()  # flat, no texture, on top of tissue
    yy, xx = np.mgrid[0:1024, 0:1024]
    in_disk = ((xx + 0.5 - 400) ** 2 + (yy + 0.5 - 400) ** 2) < 250**2
    in_rect = (xx >= 380) & (xx < 420) & (yy >= 380) & (yy < 420)
    tissue_px = lvl0[in_disk & ~in_rect].astype(int)
    diff = tissue_px - np.array([234, 160, 196])
    assert np.abs(diff).max() <= 10  # mild
    assert diff.std() > 2  # but really textured
    assert (diff == diff[:, :1]).all()  # luminance offset: same on R, G, B
    assert (lvl0[~in_disk] == 255).all()


def test_texture_depends_on_seed_only_inside_tissue(tmp_path: Path) -> None:
    tissue = [Shape("disk", 256, 256, 300, 0, (168, 104, 176))]
    a = render_tile(level_index=0, downsample=1, tile_row=0, tile_col=0, tissue=tissue, seed=1)
    b = render_tile(level_index=0, downsample=1, tile_row=0, tile_col=0, tissue=tissue, seed=2)
    c = render_tile(level_index=0, downsample=1, tile_row=0, tile_col=0, tissue=tissue, seed=1)
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, b)
    assert (a[:5, :5] == 255).all() and (b[:5, :5] == 255).all()  # outside the disk: background


def test_texture_differs_between_tiles_and_levels() -> None:
    """Noise is seeded per (seed, level, tile row, tile col): no tile repeats another's pattern."""
    colour = (168, 104, 176)
    everywhere = [Shape("rect", -1e6, -1e6, 2e6, 2e6, colour)]

    def noise(level_index: int, tile_row: int, tile_col: int) -> np.ndarray:
        tile = render_tile(
            level_index=level_index,
            downsample=1,
            tile_row=tile_row,
            tile_col=tile_col,
            tissue=everywhere,
            seed=5,
        )
        return tile.astype(int) - np.array(colour)

    base = noise(0, 1, 1)
    assert np.abs(base).max() <= 10 and base.std() > 2
    for other in (noise(0, 1, 2), noise(0, 2, 1), noise(1, 1, 1)):
        assert not np.array_equal(base, other)
    # constant over 4x4 blocks of level pixels
    np.testing.assert_array_equal(base, np.repeat(np.repeat(base[::4, ::4], 4, axis=0), 4, axis=1))


def test_jpeg_slide_opens_and_is_close(tmp_path: Path) -> None:
    rect = Shape("rect", 256, 256, 256, 256, GREEN)
    path = write_synthetic_slide(
        tmp_path / "j.svs",
        width=1024,
        height=1024,
        mpp=0.25,
        vendor="aperio",
        downsamples=(1, 2),
        background=BG,
        tissue=[],
        shapes=[rect],
        compression="jpeg",
        jpeg_quality=90,
    )
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == ((1024, 1024), (512, 512))
        assert "JPEG/RGB Q=90" in slide.properties["tiff.ImageDescription"]
        img = _read(slide, 0).astype(int)
    assert np.abs(img[300:470, 300:470] - GREEN).max() <= 8
    assert np.abs(img[10:200, 10:200] - BG).max() <= 8


# --------------------------------------------------------------------------------------------------
# Determinism and default tissue
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vendor", "compression"), [("generic", "zlib"), ("aperio", "jpeg")])
def test_byte_identical_rewrites(tmp_path: Path, vendor: str, compression: str) -> None:
    suffix = ".tif" if vendor == "generic" else ".svs"
    kwargs = dict(
        width=1536,
        height=1280,
        mpp=0.25,
        vendor=vendor,
        compression=compression,
        shapes=[Shape("rect", 100, 100, 64, 64, GREEN)],
        seed=3,
    )
    a = write_synthetic_slide(tmp_path / f"a{suffix}", **kwargs)
    b = write_synthetic_slide(tmp_path / f"b{suffix}", **kwargs)
    c = write_synthetic_slide(tmp_path / f"c{suffix}", **{**kwargs, "seed": 4})
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()  # the seed does matter (tissue layout and texture)


@pytest.mark.parametrize(
    ("width", "height"), [(4096, 4096), (20000, 20000), (6000, 2000), (1500, 4500), (777, 333)]
)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_default_tissue_coverage(width: int, height: int, seed: int) -> None:
    shapes = default_tissue(width, height, seed)
    assert shapes == default_tissue(width, height, seed)
    assert 3 <= len(shapes) <= 10
    for s in shapes:
        assert s.kind == "disk"
        r = s.w / 2
        assert r - 1e-9 <= s.x <= width - r + 1e-9 and r - 1e-9 <= s.y <= height - r + 1e-9
        red, green, blue = s.color
        assert red > green and blue > green  # pink/purple, not grey
    for i, s in enumerate(shapes):  # disjoint, so the area fraction is the plain sum
        for t in shapes[i + 1 :]:
            assert math.hypot(s.x - t.x, s.y - t.y) >= (s.w + t.w) / 2 - 1e-9
    frac = sum(math.pi * (s.w / 2) ** 2 for s in shapes) / (width * height)
    assert 0.20 <= frac <= 0.40


def test_default_tissue_is_used_and_covers_measured_area(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "d.tif", width=2048, height=2048, mpp=0.5, downsamples=(1, 8))
    with openslide.OpenSlide(str(path)) as slide:
        small = _read(slide, 1)
    non_bg = (small != 255).any(axis=-1).mean()
    assert 0.18 <= non_bg <= 0.42
