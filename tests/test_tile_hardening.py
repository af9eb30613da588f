"""The tiler's edges (issue 13): fractional pyramid levels, keys, long names, ranges, inputs, provenance,
tissue fractions. Each test here failed on the code before the fix it guards."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import openslide
import pytest
from conftest import read_slide_tiles, run_tile, shard_digests
from cytosyn.data_prep.codec import CodecConfig, TileEncoder
from cytosyn.data_prep.slide import read_mpp_overrides
from cytosyn.data_prep.synthetic import Shape, write_synthetic_slide
from cytosyn.data_prep.tile_config import TileConfig
from PIL import Image, features

from cytosyn.cli import main
from cytosyn.config import ConfigError, build_config
from cytosyn.formats import slide_dir, tile_key
from cytosyn.shardio import ShardWriter, iter_shard_samples

TISSUE_RGB = (200, 110, 170)


def _slide(path: Path, size: int, mpp: float | None = 0.5, seed: int = 0, **kwargs) -> Path:
    """A synthetic slide whose middle is textured tissue (a rectangle over most of it), so it tiles."""
    m = size // 8
    tissue = [
        Shape("rect", m, m, size - 2 * m, size - 2 * m, TISSUE_RGB),
        Shape("disk", m, m, 2 * m, 2 * m, (150, 80, 160)),
    ]
    return write_synthetic_slide(path, width=size, height=size, mpp=mpp, seed=seed, tissue=tissue, **kwargs)


def _reread(slide_path: Path, meta: dict) -> np.ndarray:
    """The documented re-read: read_region at the JSON's corner, composite over its background colour
    (OpenSlide leaves pixels partly transparent where it interpolates across its own tile seams)."""
    with openslide.OpenSlide(str(slide_path)) as slide:
        region = np.asarray(
            slide.read_region((meta["x"], meta["y"]), meta["level"], tuple(meta["level_size"]))
        )
    a = region[..., 3:].astype(np.float32) / 255.0
    rgb = region[..., :3].astype(np.float32) * a + (1.0 - a) * np.asarray(meta["background"], np.float32)
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    if meta["resample"] != "none":
        method = {"box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}[meta["resample"]]
        image = image.resize((meta["tile_px"], meta["tile_px"]), method)
    return np.asarray(image)


# ------------------------------------------------------------------------- fractional pyramid levels


@pytest.mark.parametrize("width", [2001, 4001])  # level 1 downsample 3.994 / 3.997 (Aperio-like non-integers)
@pytest.mark.parametrize("keep_level_mb", [64, 0])  # whole level in memory / strip reads
def test_fractional_downsample_tiles_reread_exactly(tmp_path, width, keep_level_mb):
    path = tmp_path / "frac.tiff"
    _slide(path, width, mpp=0.25, downsamples=(1, 4))
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_downsamples[1] != int(slide.level_downsamples[1])
    out = tmp_path / "out"
    grid = {"mpp": 1.0, "tile_px": 64, "min_tissue_fraction": 0.3}
    run_tile([path], out, grid=grid, run={"keep_level_mb": keep_level_mb})
    tiles = read_slide_tiles(out, "frac")
    assert len(tiles) > 5
    for _, meta, img, _ in tiles:
        assert meta["level"] == 1
        np.testing.assert_array_equal(_reread(path, meta), img, err_msg=f"tile at {meta['x']},{meta['y']}")


def test_strip_width_never_changes_the_bytes(tmp_path):
    path = tmp_path / "frac.tiff"
    _slide(path, 2001, mpp=0.25, downsamples=(1, 4))
    grid = {"mpp": 1.0, "tile_px": 64, "min_tissue_fraction": 0.3}
    digests = []
    for strip_px in (64, 4096):
        out = tmp_path / f"strip{strip_px}"
        run_tile([path], out, grid=grid, run={"keep_level_mb": 0, "strip_px": strip_px})
        digests.append({k.split("/")[-1]: v for k, v in shard_digests(out).items()})
    assert digests[0] == digests[1]


# ---------------------------------------------------------------------------------------- tile keys


def test_tile_keys_are_unique_for_ids_that_differ_outside_the_safe_set():
    ids = ["S.1", "S_1", "S 1", "S%1", "S~1", "S/1", "Sé1", "S-1", "S1"]
    keys = [tile_key(i, 10, 20) for i in ids]
    assert len(set(keys)) == len(keys), keys
    for key in keys:
        assert "." not in key and "/" not in key
    assert tile_key("TCGA-A1-0001-01Z-00-DX1", 3, 4) == "TCGA-A1-0001-01Z-00-DX1__x3_y4"  # safe ids unchanged


def test_slides_whose_ids_differ_only_in_unsafe_characters_pack_together(tmp_path):
    from cytosyn.data_prep.pack import run_pack
    from cytosyn.data_prep.pack_config import PackConfig
    from cytosyn.data_prep.verify import verify_dataset

    src = tmp_path / "slides"
    src.mkdir()
    for i, name in enumerate(["S.1", "S_1"]):
        _slide(src / f"{name}.tiff", 512, seed=i)
    grid = {"tile_px": 64, "min_tissue_fraction": 0.3}
    summary = run_tile([src], tmp_path / "tiles", grid=grid, tissue={"mask_mpp": 4.0, "min_area_um2": 0})
    assert summary.done == 2
    cfg = build_config(
        PackConfig,
        {
            "output": str(tmp_path / "ds"),
            "inputs": {"tiles": [str(tmp_path / "tiles")], "allow_slide_patients": True},
            "split": {"ratios": {"train": 0.5, "test": 0.5}},
            "run": {"progress": False},
        },
    )
    run_pack(cfg)
    assert verify_dataset(tmp_path / "ds", progress=False).ok


# --------------------------------------------------------------------------------- long member names


def test_shard_writer_takes_long_names_and_keeps_short_ones_byte_identical(tmp_path):
    long_key = "TCGA-A1-0001-01Z-00-DX1-" + "x" * 200 + "__x12345_y67890"
    sample = {"__key__": long_key, "json": b"{}", "h0-mini_mean_patch.npy": b"\x93NUMPY" + b"0" * 100}
    with ShardWriter(tmp_path, lambda i: "long.tar", max_samples=10) as writer:
        writer.write(sample)
    ((key, members), _), *_ = list(iter_shard_samples(tmp_path / "long.tar"))
    assert key == long_key and dict(members)["json"] == b"{}"
    with tarfile.open(tmp_path / "long.tar") as tar:
        assert sorted(m.name for m in tar.getmembers()) == sorted(
            f"{long_key}.{m}" for m in ("json", "h0-mini_mean_patch.npy")
        )
    # A name that fits the old 100-byte USTAR field gives exactly the bytes USTAR gave (no PAX header).
    short = {"__key__": "slide__x0_y0", "json": b'{"a":1}', "png": b"\x89PNG" + b"1" * 600}
    with ShardWriter(tmp_path, lambda i: "short.tar", max_samples=10) as writer:
        writer.write(short)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("json", "png"):
            info = tarfile.TarInfo(f"slide__x0_y0.{name}")
            info.size, info.mtime, info.mode = len(short[name]), 0, 0o444
            info.uname = info.gname = "cytosyn"
            tar.addfile(info, io.BytesIO(short[name]))
    assert (tmp_path / "short.tar").read_bytes() == buf.getvalue()


def test_long_slide_ids_tile_pack_and_featurize(tmp_path):
    from cytosyn.data_prep.featurize import run_featurize
    from cytosyn.data_prep.featurize_config import FeaturizeConfig
    from cytosyn.data_prep.pack import run_pack
    from cytosyn.data_prep.pack_config import PackConfig
    from cytosyn.data_prep.verify import verify_dataset

    slide_id = "TCGA-A1-0001-01Z-00-DX1_" + "long-export-name-" * 6  # 126 characters
    src = tmp_path / "slides"
    _slide(src / f"{slide_id}.tiff", 512)
    summary = run_tile(
        [src], tmp_path / "tiles", grid={"tile_px": 64, "min_tissue_fraction": 0.3}, tissue={"mask_mpp": 4.0}
    )
    assert summary.done == 1, summary.report()
    pack = {
        "output": str(tmp_path / "ds"),
        "inputs": {"tiles": [str(tmp_path / "tiles")]},
        "split": {"ratios": {"train": 1.0}},
        "run": {"progress": False},
    }
    run_pack(build_config(PackConfig, pack))
    assert verify_dataset(tmp_path / "ds", progress=False).ok
    feat = {
        "input": str(tmp_path / "ds" / "train"),
        "output": str(tmp_path / "features" / "train"),
        "encoders": [{"name": "vit-tiny16", "random_init": True, "outputs": ["cls", "mean_patch"]}],
        "vae": None,
        "decode_check": 0,
        "progress": False,
    }
    result = run_featurize(build_config(FeaturizeConfig, feat))
    assert result.manifest_written


# --------------------------------------------------------------------------------------- value ranges


@pytest.mark.parametrize(
    "override",
    [
        "shards.tiles_per_task=0",
        "shards.max_samples=0",
        "shards.max_bytes=0",
        "grid.mpp=0",
        "grid.mpp=-0.5",
        "grid.tile_px=0",
        "grid.tile_px=-5",
        "grid.stride_px=0",
        "grid.stride_px=-1",
        "grid.min_tissue_fraction=-0.1",
        "grid.min_tissue_fraction=1.5",
        "grid.max_tiles_per_slide=0",
        "grid.mpp_tolerance=-0.1",
        "tissue.mask_mpp=0",
        "tissue.min_saturation=-1",
        "tissue.closing_um=-2",
        "tissue.min_area_um2=-1",
        "codec.quality=0",
        "codec.quality=101",
        "codec.png_compress_level=10",
        "codec.webp_method=7",
        "run.strip_px=0",
        "run.keep_level_mb=-1",
    ],
)
def test_out_of_range_settings_are_refused_before_any_work(tmp_path, fixture_slide, override, capsys):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        build_config(TileConfig, {}, [override])
    out = tmp_path / "out"
    code = main(["tile", "--input", str(fixture_slide), "--output", str(out), override, "run.progress=false"])
    assert code == 1
    assert key in capsys.readouterr().err
    assert not (out / "slides").exists()  # nothing started: no slide folder without a state


# ---------------------------------------------------------------------------------------- inputs


def test_same_file_name_from_another_folder_does_not_replace_the_first_slide(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _slide(a / "S.tiff", 1024, seed=1)
    _slide(b / "S.tiff", 1024, seed=2)
    out = tmp_path / "out"
    assert run_tile([a], out).done == 1
    before = shard_digests(out)
    state_before = (slide_dir(out, "S") / "state.json").read_text()
    summary = run_tile([b], out)
    assert summary.failed == 1 and summary.done == 0
    assert (
        "already tiled from" in summary.failures[0]["error"]
        and str(a / "S.tiff") in summary.failures[0]["error"]
    )
    assert shard_digests(out) == before
    assert (slide_dir(out, "S") / "state.json").read_text() == state_before
    # The same file moved to another place is the same slide: skipped, not refused (the parent folder
    # keeps its name: it is the project).
    moved = tmp_path / "moved" / "a"
    moved.mkdir(parents=True)
    shutil.copy(a / "S.tiff", moved / "S.tiff")
    again = run_tile([moved], out)
    assert again.skipped == 1 and again.failed == 0


def test_symlinked_folders_are_followed_and_dangling_links_reported(tmp_path):
    src, other = tmp_path / "slides", tmp_path / "elsewhere"
    _slide(src / "A.tiff", 1024, seed=1)
    _slide(other / "B.tiff", 1024, seed=2)
    os.symlink(other, src / "linked")
    os.symlink(tmp_path / "gone.tiff", src / "C.tiff")
    os.symlink(src, src / "linked" / "loop")  # a cycle must not recurse forever
    summary = run_tile([src], tmp_path / "out")
    assert summary.slides_total == 3
    assert summary.done == 2
    assert summary.failed == 1
    (failure,) = summary.failures
    assert failure["slide_id"] == "C" and "broken symbolic link" in failure["error"]


def test_mpp_override_table_accepts_a_utf8_bom_and_warns_about_unmatched_rows(tmp_path, caplog):
    table = tmp_path / "mpp.csv"
    table.write_bytes("\ufeffslide_id,mpp\nS,0.5\nnot_a_slide,0.25\n".encode())
    assert read_mpp_overrides(table) == {"S": (0.5, 0.5), "not_a_slide": (0.25, 0.25)}
    _slide(tmp_path / "slides" / "S.tiff", 1024, mpp=None)
    with caplog.at_level(logging.WARNING):
        summary = run_tile([tmp_path / "slides"], tmp_path / "out", slides={"mpp_overrides": str(table)})
    assert summary.done == 1
    assert summary.unmatched_mpp_overrides == ["not_a_slide"]
    assert "not_a_slide" in caplog.text and "not_a_slide" in summary.report()


# ------------------------------------------------------------------------------------- provenance


def test_codec_and_reader_versions_are_the_real_libraries(tmp_path, fixture_slide):
    settings = TileEncoder(CodecConfig(format="jpeg")).settings
    if features.check_feature("libjpeg_turbo"):
        assert features.version_feature("libjpeg_turbo") in settings["libjpeg"]
        assert "turbo" in settings["libjpeg"]
    assert settings["libjpeg"] != features.version("jpg")  # "6.2" is libjpeg's API level, not a version
    run_tile([fixture_slide], tmp_path / "out", codec={"format": "jpeg"})
    _, meta, _, _ = read_slide_tiles(tmp_path / "out", "cmu_small_region")[0]
    assert meta["reader"]["openslide"] == openslide.__library_version__
    assert meta["reader"]["openslide-python"] == openslide.__version__
    state = json.loads((slide_dir(tmp_path / "out", "cmu_small_region") / "state.json").read_text())
    assert state["reader"] == meta["reader"]


# ------------------------------------------------------------------------------------ tissue fraction


def _pixel_fraction(img: np.ndarray, threshold: float, min_value: float = 0.12) -> float:
    """Tissue pixels of a tile by the tiler's own rule (saturation above the slide's threshold, not dark)."""
    f = img.astype(np.float64) / 255.0
    vmax, vmin = f.max(axis=2), f.min(axis=2)
    sat = np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-9), 0.0)
    return float(((sat > threshold) & (vmax >= min_value)).mean())


def test_recorded_tissue_fraction_is_true_to_the_tile(tmp_path, fixture_slide):
    out = tmp_path / "out"
    run_tile([fixture_slide], out, tissue={"pen_hue_ranges": []})
    state = json.loads((slide_dir(out, "cmu_small_region") / "state.json").read_text())
    threshold = state["stats"]["saturation_threshold"]
    tiles = read_slide_tiles(out, "cmu_small_region")
    assert len(tiles) > 10
    for key, meta, img, _ in tiles:
        true = _pixel_fraction(img, threshold)
        assert meta["tissue_fraction"] == pytest.approx(true, abs=0.03), key
        assert true >= 0.5 - 0.03, f"{key}: kept with {true:.2f} tissue"


def test_thin_strands_are_tissue(tmp_path):
    """A 24 µm wide strand next to a block: its tiles are tissue (a 16 µm opening used to erase it)."""
    size = 4096  # 0.25 µm/px: 1024 µm
    strand = Shape("rect", 2000, 200, 96, 3600, TISSUE_RGB)  # 24 µm × 900 µm
    block = Shape("rect", 200, 200, 1200, 1200, TISSUE_RGB)
    path = tmp_path / "strand.tiff"
    write_synthetic_slide(path, width=size, height=size, mpp=0.25, tissue=[block, strand])
    out = tmp_path / "out"
    run_tile([path], out, grid={"tile_px": 32, "min_tissue_fraction": 0.3})  # 16 µm tiles
    xs = {meta["x"] for _, meta, _, _ in read_slide_tiles(out, "strand")}
    assert any(1900 <= x <= 2100 for x in xs), sorted(xs)
