"""The whole-slide tiler on synthetic slides with known content and on the real fixture slide."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from conftest import read_slide_tiles, run_tile, shard_digests, tile_config
from cytosyn.data_prep.synthetic import Shape, default_tissue, write_synthetic_slide
from cytosyn.data_prep.tiler import OutputError, run_tiling
from PIL import Image

from cytosyn.formats import TILE_META_FIELDS, missing_tile_fields, slide_dir

TISSUE_RGB = (220, 140, 180)
MARK_RGB = (30, 30, 160)


def _slide_with_mark(path: Path, mpp: float, vendor: str, side_um: float = 60.0):
    """A slide fully covered by tissue, with a dark square of known physical size inside tile (2, 2)."""
    level_tile = round(224 * 0.5 / mpp)  # level-0 px of one 0.5 mpp tile
    size = 8 * level_tile
    size += (-size) % 16  # keep downsamples exact
    side_px = side_um / mpp
    mark = Shape(
        "rect",
        2 * level_tile + 0.1 * level_tile,
        2 * level_tile + 0.15 * level_tile,
        side_px,
        side_px,
        MARK_RGB,
    )
    write_synthetic_slide(
        path,
        width=size,
        height=size,
        mpp=mpp,
        vendor=vendor,
        tissue=[Shape("rect", 0, 0, size, size, TISSUE_RGB)],
        shapes=[mark],
    )
    return level_tile, mark


@pytest.mark.parametrize(
    ("mpp", "vendor"), [(0.25, "generic"), (0.2525, "aperio"), (0.5, "aperio"), (0.5, "generic")]
)
def test_tile_physical_size_within_one_pixel(tmp_path, mpp, vendor):
    suffix = ".svs" if vendor == "aperio" else ".tiff"
    path = tmp_path / f"mark{suffix}"
    level_tile, mark = _slide_with_mark(path, mpp, vendor)
    out = tmp_path / "out"
    summary = run_tile([path], out)
    assert summary.done == 1, summary.report()
    tiles = {(m["x"], m["y"]): (m, img) for _, m, img, _ in read_slide_tiles(out, "mark")}
    meta, img = tiles[(2 * level_tile, 2 * level_tile)]
    assert img.shape == (224, 224, 3)
    assert meta["read_size"] == [level_tile, level_tile]
    dark = img[..., 0] < (TISSUE_RGB[0] + MARK_RGB[0]) / 2  # more than half covered by the mark
    rows, cols = np.nonzero(dark)
    expected_px = mark.w * mpp / 0.5  # the mark's physical size in 0.5 µm pixels
    assert abs((cols.max() - cols.min() + 1) - expected_px) <= 1.0
    assert abs((rows.max() - rows.min() + 1) - expected_px) <= 1.0
    # And it sits where it was drawn (left/top edges in output pixels).
    assert abs(cols.min() - (mark.x - 2 * level_tile) * mpp / 0.5) <= 1.0
    assert abs(rows.min() - (mark.y - 2 * level_tile) * mpp / 0.5) <= 1.0
    assert meta["source_mpp"] == pytest.approx([mpp, mpp])
    assert meta["effective_mpp"][0] == pytest.approx(0.5, rel=2e-3)


def _reread(slide_path: Path, meta: dict) -> np.ndarray:
    """Re-read a tile from the slide using nothing but its JSON."""
    with openslide.OpenSlide(str(slide_path)) as slide:
        region = np.asarray(
            slide.read_region((meta["x"], meta["y"]), meta["level"], tuple(meta["level_size"]))
        )
    image = Image.fromarray(np.ascontiguousarray(region[..., :3]))
    if meta["resample"] != "none":
        method = {"box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}[meta["resample"]]
        image = image.resize((meta["tile_px"], meta["tile_px"]), method)
    return np.asarray(image)


@pytest.mark.parametrize(("target_mpp", "expected_level"), [(0.5, 0), (2.0, 1)])
def test_tiles_are_rereadable_from_their_json(tmp_path, target_mpp, expected_level):
    path = tmp_path / "reread.tiff"
    write_synthetic_slide(path, width=4096, height=4096, mpp=0.25, downsamples=(1, 8, 32))
    out = tmp_path / "out"
    run_tile([path], out, grid={"mpp": target_mpp, "tile_px": 112, "min_tissue_fraction": 0.3})
    tiles = read_slide_tiles(out, "reread")
    assert len(tiles) > 3
    for _, meta, img, ext in tiles:
        assert ext == "png"
        assert missing_tile_fields(meta) == []
        assert meta["level"] == expected_level
        np.testing.assert_array_equal(_reread(path, meta), img)


def test_real_fixture_slide(tmp_path, fixture_slide):
    out = tmp_path / "out"
    summary = run_tile([fixture_slide], out, codec={"format": "jpeg", "quality": 90, "subsampling": "4:2:0"})
    assert summary.done == 1 and summary.failed == 0
    tiles = read_slide_tiles(out, "cmu_small_region")
    assert 20 < len(tiles) < 117  # tissue covers part of the 9x13 grid, not all of it
    keys = [k for k, *_ in tiles]
    assert len(set(keys)) == len(keys) and all("." not in k for k in keys)
    for _, meta, img, ext in tiles:
        assert ext == "jpg" and img.shape == (224, 224, 3)
        assert set(TILE_META_FIELDS) <= set(meta)
        assert meta["codec"]["quality"] == 90 and meta["codec"]["subsampling"] == "4:2:0"
        assert meta["codec"]["libjpeg"]  # library version recorded
        assert meta["source_mpp"] == pytest.approx([0.499, 0.499])
        assert meta["tissue_fraction"] >= 0.5
        assert meta["patient_id"] == "cmu_small_region" and meta["identity_source"] == "slide_id"
    # Row-major order: y, then x.
    order = [(m["y"], m["x"]) for _, m, *_ in tiles]
    assert order == sorted(order)
    assert (slide_dir(out, "cmu_small_region") / "overview.png").is_file()
    state = json.loads((slide_dir(out, "cmu_small_region") / "state.json").read_text())
    assert state["stats"]["overview_source"] == "thumbnail"  # one-level slide: no full decode for tissue


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0)])
def test_tissue_found_and_background_ignored(tmp_path, background):
    path = tmp_path / "disks.tiff"
    disks = default_tissue(3072, 3072, seed=3)
    write_synthetic_slide(path, width=3072, height=3072, mpp=0.5, background=background, tissue=disks)
    out = tmp_path / "out"
    assert run_tile([path], out).done == 1
    tiles = read_slide_tiles(out, "disks")
    assert tiles
    for _, meta, _, _ in tiles:
        cx, cy = meta["x"] + 112, meta["y"] + 112
        inside = [np.hypot(cx - d.x, cy - d.y) < d.w / 2 + 160 for d in disks]  # within a tile of a disk
        assert any(inside), f"tile at {(meta['x'], meta['y'])} is far from all tissue"
    # Every disk big enough to hold a tile yields at least one.
    for d in disks:
        if d.w > 2 * 224 * 1.5:
            assert any(np.hypot(m["x"] + 112 - d.x, m["y"] + 112 - d.y) < d.w / 2 for _, m, _, _ in tiles)


def test_rerun_is_byte_identical_and_skips(tmp_path, fixture_slide):
    synthetic = tmp_path / "syn.tiff"
    write_synthetic_slide(synthetic, width=2048, height=2048, mpp=0.25, seed=5)
    inputs = [fixture_slide, synthetic]
    first, second = tmp_path / "a", tmp_path / "b"
    run_tile(inputs, first, shards={"tiles_per_task": 7, "max_samples": 5})
    again = run_tile(inputs, second, shards={"tiles_per_task": 7, "max_samples": 5}, run={"workers": 2})
    assert again.done == 2
    digests = shard_digests(first)
    assert len(digests) > 4  # several bands and shards per slide
    assert digests == shard_digests(second)  # worker count does not change a byte
    rerun = run_tile(inputs, first, shards={"tiles_per_task": 7, "max_samples": 5})
    assert (rerun.skipped, rerun.done, rerun.tiles) == (2, 0, 0)
    assert shard_digests(first) == digests
    # Changing a setting that changes the output redoes the slides.
    changed = run_tile(
        inputs, first, shards={"tiles_per_task": 7, "max_samples": 5}, codec={"png_compress_level": 2}
    )
    assert changed.done == 2 and changed.skipped == 0


def test_shard_bounds(tmp_path, fixture_slide):
    out = tmp_path / "out"
    run_tile([fixture_slide], out, shards={"max_samples": 10})
    state = json.loads((slide_dir(out, "cmu_small_region") / "state.json").read_text())
    counts = [s["count"] for s in state["shards"]]
    assert max(counts) <= 10 and sum(counts) == state["tiles"]
    by_bytes = run_tile([fixture_slide], tmp_path / "bytes", shards={"max_bytes": 200_000})
    assert by_bytes.done == 1
    state = json.loads((slide_dir(tmp_path / "bytes", "cmu_small_region") / "state.json").read_text())
    assert len(state["shards"]) > 1
    assert all(s["bytes"] < 200_000 + 300_000 for s in state["shards"])  # at most one tile past the bound


def test_cap_is_deterministic_subset(tmp_path, fixture_slide):
    full = {k for k, *_ in read_slide_tiles(_tiled(tmp_path / "full", fixture_slide), "cmu_small_region")}
    capped_a = read_slide_tiles(
        _tiled(tmp_path / "a", fixture_slide, max_tiles_per_slide=9), "cmu_small_region"
    )
    capped_b = read_slide_tiles(
        _tiled(tmp_path / "b", fixture_slide, max_tiles_per_slide=9), "cmu_small_region"
    )
    keys = [k for k, *_ in capped_a]
    assert len(keys) == 9 and set(keys) <= full
    assert keys == [k for k, *_ in capped_b]
    order = [(m["y"], m["x"]) for _, m, *_ in capped_a]
    assert order == sorted(order)
    other_seed = read_slide_tiles(
        _tiled(tmp_path / "c", fixture_slide, max_tiles_per_slide=9, seed=1), "cmu_small_region"
    )
    assert [k for k, *_ in other_seed] != keys


def _tiled(out: Path, slide: Path, **grid) -> Path:
    run_tile([slide], out, grid=grid)
    return out


def test_parts_split_slides_without_overlap(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / "in" / f"s{i}.tiff"
        p.parent.mkdir(exist_ok=True)
        write_synthetic_slide(p, width=2048, height=2048, mpp=0.5, seed=i)
        paths.append(p)
    out = tmp_path / "out"
    a = run_tile([tmp_path / "in"], out, run={"part": "0/2"})
    b = run_tile([tmp_path / "in"], out, run={"part": "1/2"})
    assert (a.slides_total, b.slides_total) == (2, 1)
    assert a.done + b.done == 3
    assert sorted(p.name for p in (out / "slides").iterdir()) == ["s0", "s1", "s2"]


def _corrupt_middle_tile(path: Path) -> None:
    """Overwrite the compressed bytes of one level-0 tile in the middle of a TIFF with garbage."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
        per_row = -(-page.imagewidth // page.tilewidth)
        index = (len(offsets) // per_row // 2) * per_row + per_row // 2
        offset, count = offsets[index], counts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 256, count, dtype=np.uint8).tobytes())


def test_bad_inputs_fail_per_slide_and_the_run_goes_on(tmp_path, fixture_slide):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(fixture_slide, src / "good.svs")
    (src / "empty.svs").write_bytes(b"")
    (src / "truncated.svs").write_bytes(fixture_slide.read_bytes()[: fixture_slide.stat().st_size // 3])
    (src / "notes.svs").write_text("this is not a slide\n" * 100)
    tifffile.imwrite(src / "untiled.tif", np.full((512, 512, 3), 200, np.uint8), photometric="rgb")
    write_synthetic_slide(src / "no_mpp.tiff", width=2048, height=2048, mpp=None)
    write_synthetic_slide(src / "blank.tiff", width=1024, height=1024, mpp=0.5, tissue=[])
    write_synthetic_slide(src / "too_coarse.tiff", width=1024, height=1024, mpp=1.0)
    tissue = [Shape("rect", 0, 0, 2048, 2048, TISSUE_RGB)]
    write_synthetic_slide(src / "bad_tile.tiff", width=2048, height=2048, mpp=0.5, tissue=tissue)
    _corrupt_middle_tile(src / "bad_tile.tiff")

    out = tmp_path / "out"
    summary = run_tile([src], out)
    errors = {f["slide_id"]: f"{f['error_type']}: {f['error']}" for f in summary.failures}
    assert summary.done == 1, summary.report()
    assert set(errors) == {
        "empty",
        "truncated",
        "notes",
        "untiled",
        "no_mpp",
        "blank",
        "too_coarse",
        "bad_tile",
    }
    assert "empty file" in errors["empty"]
    assert "corrupt" in errors["truncated"] or "not a slide" in errors["truncated"]
    assert "not a slide format" in errors["notes"]
    assert "untiled TIFF" in errors["untiled"]
    assert "microns-per-pixel" in errors["no_mpp"] and "mpp_overrides" in errors["no_mpp"]
    assert errors["blank"].startswith("NoTissue")
    assert "finer than the scan" in errors["too_coarse"]
    assert "unreadable region" in errors["bad_tile"]
    for slide_id in errors:  # every failure is on disk, and nothing looks like output
        state = json.loads((slide_dir(out, slide_id) / "state.json").read_text())
        assert state["status"] == "failed" and state["error"]
        assert not list(slide_dir(out, slide_id).glob("*.tar"))
        assert not (slide_dir(out, slide_id) / ".incomplete").exists()

    # Fix two of them by config; the rerun redoes only failed slides and keeps the good one.
    (tmp_path / "mpp.csv").write_text("slide_id,mpp\nno_mpp,0.5\n")
    rerun = run_tile(
        [src], out, slides={"mpp_overrides": str(tmp_path / "mpp.csv")}, grid={"finer_than_scan": "warn"}
    )
    assert rerun.skipped == 1
    fixed = {"no_mpp", "too_coarse"}
    assert {f["slide_id"] for f in rerun.failures} == set(errors) - fixed
    no_mpp = read_slide_tiles(out, "no_mpp")
    assert no_mpp and no_mpp[0][1]["mpp_source"] == "override"
    coarse = read_slide_tiles(out, "too_coarse")
    assert coarse[0][1]["resample"] == "bicubic" and coarse[0][1]["read_size"] == [112, 112]


def test_full_disk_stops_the_run_cleanly(tmp_path, fixture_slide, monkeypatch):
    import cytosyn.shardio as shardio

    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(shardio._HashingFile, "write", no_space)
        with pytest.raises(OutputError, match="No space left"):
            run_tile([fixture_slide], out)
    state = slide_dir(out, "cmu_small_region") / "state.json"
    assert not state.exists()  # neither done nor failed: the slide is simply not finished
    assert run_tile([fixture_slide], out).done == 1


def test_unwritable_output_is_refused(tmp_path, fixture_slide):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        run_tiling(tile_config([fixture_slide], blocker / "out"))


_KILL_SCRIPT = """
import sys
from conftest import run_tile
from pathlib import Path
run_tile([Path(sys.argv[1])], Path(sys.argv[2]), shards={"tiles_per_task": 16, "max_samples": 8},
         codec={"format": "png", "png_compress_level": 9})
"""


def test_sigkill_mid_slide_then_rerun_gives_identical_output(tmp_path):
    path = tmp_path / "big.tiff"
    size = 224 * 16
    write_synthetic_slide(
        path, width=size, height=size, mpp=0.5, tissue=[Shape("rect", 0, 0, size, size, TISSUE_RGB)]
    )
    reference = tmp_path / "reference"
    run_tile(
        [path],
        reference,
        shards={"tiles_per_task": 16, "max_samples": 8},
        codec={"format": "png", "png_compress_level": 9},
    )

    out = tmp_path / "killed"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(path), str(out)], env=env)
    incomplete = slide_dir(out, "big") / ".incomplete"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(incomplete.glob("*.tar")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(incomplete.glob("*.tar")), "the run ended before it could be killed mid-slide"
    assert not (slide_dir(out, "big") / "state.json").exists()
    assert not list(slide_dir(out, "big").glob("*.tar"))  # nothing under a final name

    summary = run_tile(
        [path],
        out,
        shards={"tiles_per_task": 16, "max_samples": 8},
        codec={"format": "png", "png_compress_level": 9},
    )
    assert summary.done == 1
    assert shard_digests(out) == shard_digests(reference)


def test_in_memory_level_gives_the_same_bytes_as_strip_reads(tmp_path, fixture_slide):
    no_thumb = {"use_thumbnail": False}  # force the overview to come from level 0
    cached = run_tile([fixture_slide], tmp_path / "cached", tissue=no_thumb)
    streamed = run_tile([fixture_slide], tmp_path / "streamed", tissue=no_thumb, run={"keep_level_mb": 0})
    state = json.loads((slide_dir(tmp_path / "cached", "cmu_small_region") / "state.json").read_text())
    assert state["stats"]["overview_source"] == "level 0"
    assert cached.tiles == streamed.tiles > 0
    a = {k.split("/")[-1]: v for k, v in shard_digests(tmp_path / "cached").items()}
    b = {k.split("/")[-1]: v for k, v in shard_digests(tmp_path / "streamed").items()}
    assert a == b


def test_shards_read_back_with_webdataset(tmp_path, fixture_slide):
    import webdataset as wds

    out = tmp_path / "out"
    run_tile([fixture_slide], out, codec={"format": "webp"})
    state = json.loads((slide_dir(out, "cmu_small_region") / "state.json").read_text())
    urls = [str(slide_dir(out, "cmu_small_region") / s["name"]) for s in state["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == state["tiles"]
    for sample in samples:
        assert sample["webp"].shape == (224, 224, 3)
        assert sample["json"]["slide_id"] == "cmu_small_region"
        assert sample["json"]["codec"]["lossless"] is True


def test_data_prep_does_not_import_the_model_stack():
    code = "import sys, cytosyn.data_prep.tiler, cytosyn.data_prep.pack; print(sorted({'torch', 'lightning', 'timm', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
