"""``cytosyn ingest`` on the shipped real CRC tiles: class folders / CSV → tile shards → pack → loader."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from cytosyn.data_prep.ingest import IngestError, run_ingest
from cytosyn.data_prep.ingest_config import IngestConfig
from cytosyn.data_prep.pack import run_pack
from cytosyn.data_prep.pack_config import PackConfig
from PIL import Image

from cytosyn.config import build_config
from cytosyn.data import LoaderConfig, build_loader
from cytosyn.formats import TILE_META_FIELDS

CRC = Path(str(resources.files("cytosyn") / "assets" / "crc_tiles"))


def _cfg(output: Path, **sections) -> IngestConfig:
    data: dict = {"output": str(output), "identity": {"rule": "per_tile"}, "grid": {"source_mpp": 0.5}}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return build_config(IngestConfig, data)


def _tiles(output: Path) -> dict[str, tuple[dict, bytes, str]]:
    """key → (json, image bytes, extension) over every source of an ingest output."""
    out = {}
    for tar_path in sorted((output / "slides").glob("*/*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, m in members.items():
            ext = next(e for e in m if e != "json")
            out[key] = (json.loads(m["json"]), m[ext], ext)
    return out


def _folder_labels(*folders: Path) -> dict[str, str]:
    return {f.name: f.parent.name for root in folders for f in root.glob("*/*") if f.is_file()}


def test_class_folders_to_pack_to_loader_every_tile_once_with_its_label(tmp_path):
    folders = [CRC / "crc_val_he_7k_png", CRC / "nct_crc_he_100k"]  # PNG (kept) and TIFF (re-encoded)
    summary = run_ingest(_cfg(tmp_path / "tiles", inputs={"folders": [str(f) for f in folders]}))
    expected = _folder_labels(*folders)
    assert summary.tiles == len(expected) == 41 and not summary.skipped
    assert (summary.kept_original, summary.reencoded) == (32, 9)
    tiles = _tiles(tmp_path / "tiles")
    for meta, image, ext in tiles.values():
        assert ext == "png" and not set(TILE_META_FIELDS) - set(meta)
        assert meta["label"] == expected[Path(meta["source"]["file"]).name]
        assert meta["identity_source"].startswith("per_tile")
        original = CRC / meta["source"]["input"].split(":", 1)[1] / meta["source"]["file"]
        if meta["codec"]["origin"].startswith("original"):
            assert image == original.read_bytes()  # byte for byte
        else:  # TIFF → lossless PNG: the same pixels, and the reason is recorded
            assert meta["codec"]["source_format"] == "TIFF" and meta["codec"]["lossless"]
            same = np.asarray(Image.open(io.BytesIO(image))) == np.asarray(
                Image.open(original).convert("RGB")
            )
            assert same.all()

    pack = build_config(
        PackConfig,
        {
            "output": str(tmp_path / "dataset"),
            "inputs": {"tiles": [str(tmp_path / "tiles")]},
            "split": {"ratios": {"train": 0.6, "val": 0.2, "test": 0.2}},
            "shards": {"samples_per_shard": 8},
            "run": {"progress": False},
        },
    )
    run_pack(pack)
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        manifest = json.loads((tmp_path / "dataset" / split / "manifest.json").read_text())
        per_label = manifest["stats"]["tiles_per_label"]
        loader = build_loader(
            tmp_path / "dataset" / split, LoaderConfig(batch_size=5, num_workers=0, members=["label"])
        )
        counts: dict[str, int] = {}
        for batch in loader:
            vocab = sorted(per_label)
            for key, label, lid in zip(batch["__key__"], batch["label"], batch["label_id"].tolist()):
                assert key not in seen
                seen[key] = label
                assert vocab[lid] == label
                counts[label] = counts.get(label, 0) + 1
        assert counts == per_label  # the manifest counts what the loader yields
    assert len(seen) == 41
    assert {k: tiles[k][0]["label"] for k in seen} == seen


def test_rerun_is_a_no_op_and_outputs_are_byte_identical(tmp_path):
    cfg = dict(inputs={"folders": [str(CRC / "nct_crc_he_100k")]})
    run_ingest(_cfg(tmp_path / "a", **cfg))
    again = run_ingest(_cfg(tmp_path / "a", **cfg))
    assert again.sources_skipped == again.sources == 9
    run_ingest(_cfg(tmp_path / "b", **cfg))
    for tar_path in (tmp_path / "a" / "slides").glob("*/*.tar"):
        twin = tmp_path / "b" / tar_path.relative_to(tmp_path / "a")
        assert tar_path.read_bytes() == twin.read_bytes()


def test_non_images_truncated_images_and_stray_files_are_counted_not_dropped(tmp_path):
    root = tmp_path / "classes"
    shutil.copytree(CRC / "crc_val_he_7k_png", root)
    (root / "ADI" / "notes.txt").write_text("not a tile")
    (root / "README.md").write_text("outside any class folder")
    good = (root / "TUM").glob("*.png").__next__()
    (root / "TUM" / "broken.png").write_bytes(good.read_bytes()[:4000])  # truncated PNG
    summary = run_ingest(_cfg(tmp_path / "out", inputs={"folders": [str(root)]}))
    assert summary.tiles == 32
    assert {k: len(v) for k, v in summary.skipped.items()} == {
        "not an image file": 1,
        "file outside a class folder": 1,
        "not a readable image": 1,
    }
    report = json.loads((tmp_path / "out" / "ingest_summary.json").read_text())
    assert any("broken.png" in f for f in report["skipped"]["not a readable image"])
    with pytest.raises(IngestError, match=r"notes\.txt is not an image"):
        run_ingest(_cfg(tmp_path / "out2", inputs={"folders": [str(root)]}, non_images="refuse"))
    with pytest.raises(IngestError, match=r"broken\.png is not a readable image"):
        run_ingest(_cfg(tmp_path / "out3", inputs={"folders": [str(root)]}, unreadable="refuse"))


def test_other_sizes_refused_skipped_resampled_or_stretched_as_configured(tmp_path):
    folders = {"folders": [str(CRC / "kather2016")]}  # 150×150 px at 0.495 µm/px
    with pytest.raises(IngestError, match=r"150×150 px at 0\.495 µm/px, target 224 px"):
        run_ingest(_cfg(tmp_path / "r", inputs=folders, grid={"source_mpp": 0.495}))
    assert not (tmp_path / "r" / "slides").exists()  # refused before anything was written
    skip = _cfg(tmp_path / "s", inputs=folders, grid={"source_mpp": 0.495, "mismatch": "skip"})
    with pytest.raises(IngestError, match=r"(?s)no tiles left.*SKIPPED 24 \[other size or mpp\]"):
        run_ingest(skip)  # nothing silently dropped: an empty result is an error that counts the skips
    resample = _cfg(tmp_path / "rs", inputs=folders, grid={"source_mpp": 0.495, "mismatch": "resample"})
    with pytest.raises(IngestError, match=r"SKIPPED 24 \[field of view too small\]"):
        run_ingest(resample)  # 74 µm < 112 µm: every tile is too small
    small = _cfg(
        tmp_path / "rs2", inputs=folders, grid={"source_mpp": 0.495, "mismatch": "resample", "tile_px": 128}
    )
    out = run_ingest(small)  # 150 px at 0.495 → 148.5 px at 0.5 → centre crop 128
    assert out.tiles == 24 and out.resampled == 24
    meta, image, _ = next(iter(_tiles(tmp_path / "rs2").values()))
    assert (
        Image.open(io.BytesIO(image)).size == (128, 128) and meta["resample"] == "box"
    )  # 0.495 → 0.5 µm/px shrinks
    assert meta["read_size"] == [129, 129] and meta["effective_mpp"] == [pytest.approx(0.4988, abs=1e-3)] * 2
    # same mpp, larger tiles: a centre crop, never the original bytes under the target's size and mpp
    crop = run_ingest(
        _cfg(tmp_path / "cr", inputs={"folders": [str(CRC / "crc_val_he_7k_png")]},
             grid={"mismatch": "resample", "tile_px": 128})
    )  # fmt: skip
    assert crop.tiles == 32 and crop.resampled == 32
    for key, (meta, image, _) in _tiles(tmp_path / "cr").items():
        src = np.asarray(Image.open(CRC / "crc_val_he_7k_png" / meta["source"]["file"]).convert("RGB"))
        assert (
            meta["resample"] == "crop"
            and meta["read_size"] == [128, 128]
            and (meta["x"], meta["y"]) == (48, 48)
        )
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image))), src[48:176, 48:176]), key
    stretch = run_ingest(
        _cfg(tmp_path / "st", inputs=folders, grid={"source_mpp": 0.495, "mismatch": "stretch"})
    )
    assert stretch.tiles == 24
    meta = next(iter(_tiles(tmp_path / "st").values()))[0]
    assert meta["effective_mpp"] == [pytest.approx(150 * 0.495 / 224)] * 2  # the real scale, recorded


def test_csv_rules_missing_columns_duplicates_identity_and_label_tables(tmp_path):
    rows = list(csv.DictReader((CRC / "manifest.csv").open()))
    good = [r for r in rows if r["width"] == "224"][:6]

    def write(name: str, header: list[str], body: list[list[str]]) -> Path:
        target = tmp_path / name
        with target.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(body)
        return target

    full = ["path", "label", "patient_id", "slide_id", "site", "mpp"]
    body = [
        [str(CRC / r["path"]), r["label"], f"P{i // 2}", f"S{i}", "X", r["mpp"]] for i, r in enumerate(good)
    ]
    table = write("tiles.csv", full, body)
    columns = {"rule": "columns"}
    summary = run_ingest(_cfg(tmp_path / "ok", inputs={"csv": [str(table)]}, identity=columns, grid={}))
    assert summary.tiles == 6 and summary.sources == 6
    metas = [m for m, _, _ in _tiles(tmp_path / "ok").values()]
    assert sorted({m["patient_id"] for m in metas}) == ["P0", "P1", "P2"]
    assert {m["identity_source"] for m in metas} == {"table"}

    no_patient = write(
        "nopatient.csv", ["path", "label", "slide_id", "mpp"], [[*b[:2], b[3], b[5]] for b in body]
    )
    with pytest.raises(IngestError, match=r"lacks column\(s\) \['patient_id'\]"):
        run_ingest(_cfg(tmp_path / "x1", inputs={"csv": [str(no_patient)]}, identity=columns, grid={}))
    dup = write("dup.csv", full, [*body, body[2]])
    with pytest.raises(IngestError, match=r"line 8: path .* is already on line 4"):
        run_ingest(_cfg(tmp_path / "x2", inputs={"csv": [str(dup)]}, identity=columns, grid={}))
    with pytest.raises(IngestError, match="class folders carry none"):
        run_ingest(
            _cfg(tmp_path / "x3", inputs={"folders": [str(CRC / "nct_crc_he_100k")]}, identity=columns)
        )

    labels = write("labels.csv", ["path", "label"], [[body[0][0], "SPECIAL"], ["/nowhere.png", "X"]])
    out = run_ingest(
        _cfg(
            tmp_path / "lt",
            inputs={"csv": [str(table)], "label_table": str(labels)},
            identity=columns,
            grid={},
        )
    )
    assert out.labels.get("SPECIAL") == 1 and out.label_table_unmatched == ["/nowhere.png"]
    state = json.loads(next((tmp_path / "lt" / "slides").glob("*/state.json")).read_text())
    assert len(state["label_table"]["sha256"]) == 64  # label tables are data: hashed
    nomatch = write("nomatch.csv", ["path", "label"], [["/nowhere.png", "X"]])
    with pytest.raises(IngestError, match="matches no tile"):
        run_ingest(
            _cfg(
                tmp_path / "x4",
                inputs={"csv": [str(table)], "label_table": str(nomatch)},
                identity=columns,
                grid={},
            )
        )


def test_mixed_output_formats_refused_before_writing(tmp_path):
    root = tmp_path / "classes" / "TUM"
    root.mkdir(parents=True)
    src = next((CRC / "crc_val_he_7k_png" / "TUM").glob("*.png"))
    shutil.copy(src, root / "a.png")
    Image.open(src).save(root / "b.jpg", quality=95)
    cfg = _cfg(tmp_path / "out", inputs={"folders": [str(tmp_path / "classes")]})
    with pytest.raises(IngestError, match="several formats"):
        run_ingest(cfg)
    assert not (tmp_path / "out" / "slides").exists()
    ok = run_ingest(
        _cfg(tmp_path / "out2", inputs={"folders": [str(tmp_path / "classes")]}, codec={"keep_original": []})
    )
    assert ok.reencoded == 2  # the JPEG's decoded pixels are kept losslessly as PNG
