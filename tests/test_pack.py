"""``cytosyn pack`` and ``pack --verify`` on real per-slide shards cut by the real tiler from synthetic slides."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from cytosyn.data_prep.pack import PackError, iter_tar_samples, run_pack
from cytosyn.data_prep.pack_config import PackConfig
from cytosyn.data_prep.synthetic import write_synthetic_slide
from cytosyn.data_prep.tile_config import TileConfig
from cytosyn.data_prep.tiler import run_tiling
from cytosyn.data_prep.verify import verify_dataset

from cytosyn.config import ConfigError, build_config, load_config
from cytosyn.manifest import read_manifest
from cytosyn.shardio import ShardWriter

# patient barcode → (project folder, number of slides, slide size px)
PATIENTS = {
    "TCGA-A1-0001": ("BRCA", 2, 512),
    "TCGA-A1-0002": ("BRCA", 1, 512),
    "TCGA-A1-0003": ("BRCA", 1, 640),
    "TCGA-A2-0004": ("BRCA", 1, 512),
    "TCGA-A2-0005": ("BRCA", 1, 640),
    "TCGA-E9-0006": ("BRCA", 1, 512),
    "TCGA-05-0007": ("LUAD", 1, 512),
    "TCGA-05-0008": ("LUAD", 2, 512),
    "TCGA-05-0009": ("LUAD", 1, 640),
    "TCGA-44-0010": ("LUAD", 1, 512),
    "TCGA-44-0011": ("LUAD", 1, 640),
    "TCGA-44-0012": ("LUAD", 1, 512),
}
FAILED_SLIDE = "TCGA-A1-0099-01Z-00-DX1"  # blank: the tiler records it as failed (no tissue)
TILE_SECTIONS = {
    "codec": {"format": "png", "png_compress_level": 1},
    "grid": {"tile_px": 32, "mpp": 1.0, "min_tissue_fraction": 0.3},
    "tissue": {"mask_mpp": 2.0, "min_area_um2": 0, "max_hole_um2": 0},
    "run": {"progress": False, "overview": False},
}


def _tile(slides: Path, output: Path) -> None:
    cfg = build_config(
        TileConfig, {"output": str(output), "slides": {"input": [str(slides)]}, **TILE_SECTIONS}
    )
    summary = run_tiling(cfg)
    assert summary.done >= 1


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pack_inputs")
    seed = 0
    for patient, (project, n_slides, size) in PATIENTS.items():
        for k in range(1, n_slides + 1):
            seed += 1
            path = root / "slides" / project / f"{patient}-01Z-00-DX{k}.tiff"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_synthetic_slide(path, width=size, height=size, mpp=0.5, seed=seed)
    write_synthetic_slide(
        root / "slides" / "BRCA" / f"{FAILED_SLIDE}.tiff", width=256, height=256, mpp=0.5, tissue=[]
    )
    _tile(root / "slides", root / "tiles")
    return root / "tiles"


def pack_cfg(tiles_dirs: list[Path] | Path, output: Path, **sections) -> PackConfig:
    dirs = tiles_dirs if isinstance(tiles_dirs, list) else [tiles_dirs]
    data: dict = {
        "output": str(output),
        "inputs": {"tiles": [str(d) for d in dirs]},
        "split": {"ratios": {"train": 0.6, "val": 0.2, "test": 0.2}, "holdout_tss": ["E9"]},
        "sampling": {"max_tiles_per_slide": 30},
        "shards": {"samples_per_shard": 16},
        "run": {"progress": False, "buffer_mb": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return build_config(PackConfig, data)


@pytest.fixture(scope="module")
def packed(tiles, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("packed") / "ds"
    summary = run_pack(pack_cfg(tiles, out))
    return out, summary


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _split_files(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(folder).items() if "/" in k}


def _samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [(key, dict(members)) for (key, members), _ in iter_tar_samples(path)]


def _input_samples(tiles: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for tar in sorted((tiles / "slides").rglob("*.tar")):
        for key, members in _samples(tar):
            out[key] = members
    return out


def _copy(src: Path, tmp_path: Path, name: str = "tiles") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _rewrite_shard(folder: Path, shard: dict, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Replace a slide's shard by ``samples`` and update its state.json to match (count, bytes, sha256)."""
    (folder / shard["name"]).unlink()
    writer = ShardWriter(folder, lambda i: shard["name"], max_samples=10**9)
    for key, members in samples:
        writer.write({"__key__": key, **members})
    (info,) = writer.close()
    state_path = folder / "state.json"
    state = json.loads(state_path.read_text())
    for s in state["shards"]:
        if s["name"] == shard["name"]:
            s.update(count=info.count, bytes=info.bytes, sha256=info.sha256)
    state["tiles"] = sum(s["count"] for s in state["shards"])
    state_path.write_text(json.dumps(state))


def _first_shard(tiles: Path, slide_id: str) -> tuple[Path, dict]:
    folder = tiles / "slides" / slide_id
    state = json.loads((folder / "state.json").read_text())
    return folder, state["shards"][0]


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


def test_pack_splits_by_patient_and_verifies(packed, tiles) -> None:
    out, summary = packed
    assert list(summary.splits) == ["train", "val", "test", "test_tss"]
    assert [e["slide_id"] for e in summary.excluded] == [FAILED_SLIDE]
    assert summary.excluded[0]["status"] == "failed" and "NoTissue" in summary.excluded[0]["error"]
    assert FAILED_SLIDE in summary.report()
    assert summary.slides_used == sum(n for _, n, _ in PATIENTS.values())

    manifests = {name: read_manifest(out / name) for name in summary.splits}
    seen: dict[str, str] = {}
    for name, m in manifests.items():
        for p in m.patients:
            assert p not in seen, f"patient {p} in {seen.get(p)} and {name}"
            seen[p] = name
    assert set(seen) == set(PATIENTS)
    assert manifests["test_tss"].patients == ["TCGA-E9-0006"]
    assert all(
        m.stats["per_slide"][s]["tss"] != "E9"
        for n, m in manifests.items()
        if n != "test_tss"
        for s in m.slides
    )
    # both projects are in train (stratified)
    assert set(manifests["train"].stats["tiles_per_project"]) == {"BRCA", "LUAD"}

    rep = verify_dataset(out, progress=False)
    assert rep.ok, rep.report()
    text = rep.report()
    assert "OK" in text and "per project" in text and "per TSS" in text and "LUAD" in text
    assert sum(s["tiles"] for s in rep.splits.values()) == sum(m.samples for m in manifests.values())
    assert (out / "pack_config.yaml").is_file() and (out / "pack_summary.json").is_file()
    assert load_config(PackConfig, out / "pack_config.yaml") == pack_cfg(tiles, out)


def test_fixed_count_shards_and_byte_copies(packed, tiles) -> None:
    out, summary = packed
    inputs = _input_samples(tiles)
    all_keys = []
    for name in summary.splits:
        m = read_manifest(out / name)
        counts = [s.count for s in m.shards]
        assert all(c == 16 for c in counts[:-1]) and 1 <= counts[-1] <= 16
        assert sum(counts) == m.samples
        slide_order = []
        for entry in m.shards:
            samples = _samples(out / name / entry.name)
            assert len(samples) == entry.count
            for key, members in samples:
                assert members == inputs[key], f"sample {key} was not copied byte for byte"
                meta = json.loads(members["json"])
                assert meta["slide_id"] in m.slides
                slide_order.append(meta["slide_id"])
                all_keys.append(key)
        per_slide = Counter(slide_order)
        assert max(per_slide.values()) <= 30  # per-slide cap
        assert dict(per_slide) == {s: v["tiles"] for s, v in m.stats["per_slide"].items()}
        if len(per_slide) > 1:  # globally shuffled: slides are interleaved, not in runs
            runs = 1 + sum(a != b for a, b in itertools.pairwise(slide_order))
            assert runs > 2 * len(per_slide)
    assert len(all_keys) == len(set(all_keys))


def test_same_inputs_give_byte_identical_dataset(packed, tiles, tmp_path) -> None:
    out, _ = packed
    again = tmp_path / "again"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("someone else's")
    # two worker processes and a shared scratch folder for the buckets: same bytes
    run_pack(pack_cfg(tiles, again, run={"workers": 2, "work_dir": str(scratch)}))
    assert _split_files(again) == _split_files(out)
    assert [p.name for p in scratch.iterdir()] == ["keep.txt"]
    other_seed = tmp_path / "seed1"
    run_pack(pack_cfg(tiles, other_seed, seed=1))
    assert _split_files(other_seed) != _split_files(out)


def test_rerun_is_noop_and_other_settings_refused(tiles, tmp_path) -> None:
    out = tmp_path / "ds"
    run_pack(pack_cfg(tiles, out))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    summary = run_pack(pack_cfg(tiles, out))
    assert summary.skipped and "nothing to do" in summary.report()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(PackError, match="already holds a finished dataset"):
        run_pack(pack_cfg(tiles, out, seed=3))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PackError, match="not empty and is not a `cytosyn pack` output"):
        run_pack(pack_cfg(tiles, foreign))


def test_crash_never_leaves_manifest_pointing_at_missing_shards(packed, tiles, tmp_path, monkeypatch) -> None:
    import cytosyn.data_prep.pack as pack_mod

    ref, _ = packed
    out = tmp_path / "ds"
    # 1) crash while writing shards: no manifest at all
    real_write = ShardWriter.write
    calls = {"n": 0}

    def failing_write(self, sample):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("disk on fire")
        return real_write(self, sample)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk on fire"):
        run_pack(pack_cfg(tiles, out))
    monkeypatch.undo()
    assert not list(out.rglob("manifest.json")) and not (out / "pack_summary.json").exists()
    assert not (out / ".pack-work").exists()

    # 2) crash between two manifests: the manifest that exists points at complete shards
    real_manifest = pack_mod.write_manifest
    done = []

    def failing_manifest(manifest, folder):
        if done:
            raise KeyboardInterrupt
        done.append(manifest.split)
        return real_manifest(manifest, folder)

    monkeypatch.setattr(pack_mod, "write_manifest", failing_manifest)
    with pytest.raises(KeyboardInterrupt):
        run_pack(pack_cfg(tiles, out))
    monkeypatch.undo()
    manifests = list(out.rglob("manifest.json"))
    assert len(manifests) == 1 and not (out / "pack_summary.json").exists()
    m = read_manifest(manifests[0])
    assert all(p.is_file() for p in m.shard_paths(manifests[0].parent))

    # 3) a rerun cleans up and finishes with exactly the reference dataset
    summary = run_pack(pack_cfg(tiles, out))
    assert not summary.skipped
    assert _split_files(out) == _split_files(ref)
    assert verify_dataset(out, progress=False).ok


# --------------------------------------------------------------------------------------------------
# Sampling: caps and TSS quotas
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["slides", "uniform", "tiles"])
def test_tss_quotas_are_realised(tiles, tmp_path, weighting) -> None:
    out = tmp_path / "ds"
    budget = 45
    cfg = pack_cfg(
        tiles,
        out,
        split={"ratios": {"train": 1.0}, "holdout_tss": []},
        sampling={
            "max_tiles_per_slide": 10,
            "tiles_per_split": {"train": budget},
            "tss_weighting": weighting,
        },
    )
    run_pack(cfg)
    m = read_manifest(out / "train")
    assert m.samples == budget
    per_slide = m.stats["per_slide"]
    assert all(v["tiles"] <= 10 for v in per_slide.values())
    # what the shards really hold, per TSS
    real = Counter()
    for entry in m.shards:
        for _, members in _samples(out / "train" / entry.name):
            real[json.loads(members["json"])["tss"]] += 1
    # the configured distribution, computed here independently: weight per TSS, shares capped by
    # what each TSS has (10 tiles per slide at most)
    slides_per_tss = Counter(v["tss"] for v in per_slide.values())
    avail = Counter()
    for v in per_slide.values():
        avail[v["tss"]] += min(10, v["tiles_available"])
    weight = {"slides": slides_per_tss, "uniform": dict.fromkeys(slides_per_tss, 1), "tiles": avail}[
        weighting
    ]
    total_w = sum(weight.values())
    assert all(budget * weight[t] / total_w <= avail[t] for t in weight), "test assumes no TSS runs out"
    for t in weight:
        assert abs(real[t] - budget * weight[t] / total_w) < 1, (t, real[t], budget * weight[t] / total_w)
    recorded = m.stats["sampling"]["tss"]
    assert {t: v["selected"] for t, v in recorded.items()} == dict(real)
    assert all(abs(v["target_share"] - weight[t] / total_w) < 1e-5 for t, v in recorded.items())
    assert abs(sum(v["share"] for v in recorded.values()) - 1) < 1e-5


# --------------------------------------------------------------------------------------------------
# Verify catches what it must
# --------------------------------------------------------------------------------------------------


def test_verify_catches_tampered_shard(packed, tmp_path) -> None:
    ds = _copy(packed[0], tmp_path, "ds")
    shard = ds / "train" / "train-000001.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[2]
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF  # inside a member's data: still a valid tar
    shard.write_bytes(bytes(data))
    rep = verify_dataset(ds, progress=False)
    assert not rep.ok
    assert any("train-000001.tar sha256" in v for v in rep.violations), rep.violations
    assert any("1 sample(s) of train-000001.tar differ from their digests" in v for v in rep.violations)
    assert "FAILED" in rep.report()
    with pytest.raises(PackError, match="failed verification"):
        rep.raise_for_violations()


def test_verify_catches_truncated_and_miscounted_shards(packed, tmp_path) -> None:
    ds = _copy(packed[0], tmp_path, "ds")
    shard = ds / "val" / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    mpath = ds / "test" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0]["count"] += 1  # header and shard list stay consistent; only the tar disagrees
    m["samples"] += 1
    mpath.write_text(json.dumps(m))
    rep = verify_dataset(ds, progress=False)
    text = "\n".join(rep.violations)
    assert "val-000000.tar is truncated" in text
    assert "test-000000.tar holds 16 samples, manifest says 17" in text


def test_verify_catches_patient_leak(packed, tmp_path) -> None:
    ds = _copy(packed[0], tmp_path, "ds")
    train = read_manifest(ds / "train")
    mpath = ds / "val" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["patients"].append(train.patients[0])
    mpath.write_text(json.dumps(m))
    rep = verify_dataset(ds, progress=False)
    assert not rep.ok
    assert any("patient(s) in two splits" in v and train.patients[0] in v for v in rep.violations), (
        rep.violations
    )


def test_verify_catches_tile_from_another_split(packed, tmp_path) -> None:
    """A tile of a train patient slipped into a val shard (manifests untouched except hashes)."""
    ds = _copy(packed[0], tmp_path, "ds")
    (key, members) = _samples(ds / "train" / "train-000000.tar")[0]
    val_shard = ds / "val" / "val-000000.tar"
    samples = _samples(val_shard)
    samples[0] = (key, members)
    val_shard.unlink()
    writer = ShardWriter(val_shard.parent, lambda i: val_shard.name, max_samples=10**9)
    for k, mem in samples:
        writer.write({"__key__": k, **mem})
    (info,) = writer.close()
    mpath = ds / "val" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0].update(bytes=info.bytes, sha256=info.sha256)
    mpath.write_text(json.dumps(m))
    rep = verify_dataset(ds, progress=False)
    text = "\n".join(rep.violations)
    assert "not in the manifest" in text and "(tile JSON)" in text


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1500, 700, 2600])  # a tar header, JSON data, PNG data
def test_refuses_shard_changed_after_tiling(tiles, tmp_path, offset) -> None:
    t = _copy(tiles, tmp_path)
    folder, shard = _first_shard(t, "TCGA-44-0010-01Z-00-DX1")
    path = folder / shard["name"]
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PackError, match=r"does not match its state.json .*re-tile slide TCGA-44-0010"):
        run_pack(pack_cfg(t, tmp_path / "ds"))
    assert not list((tmp_path / "ds").rglob("manifest.json"))


def test_refuses_truncated_tar(tiles, tmp_path) -> None:
    t = _copy(tiles, tmp_path)
    folder, shard = _first_shard(t, "TCGA-05-0007-01Z-00-DX1")
    path = folder / shard["name"]
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(PackError, match="truncated or replaced after tiling"):
        run_pack(pack_cfg(t, tmp_path / "ds"))
    # the same truncated file with a state.json that agrees with it: the tar itself is refused
    state_path = folder / "state.json"
    state = json.loads(state_path.read_text())
    state["shards"][0].update(bytes=5000, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    state_path.write_text(json.dumps(state))
    with pytest.raises(PackError, match=r"is truncated or not a valid tar"):
        run_pack(pack_cfg(t, tmp_path / "ds2"))


@pytest.mark.parametrize(
    ("drop", "message"), [("json", "has no .json member"), ("png", "has no image member")]
)
def test_refuses_sample_missing_a_member(tiles, tmp_path, drop, message) -> None:
    t = _copy(tiles, tmp_path)
    folder, shard = _first_shard(t, "TCGA-A2-0004-01Z-00-DX1")
    samples = _samples(folder / shard["name"])
    key, members = samples[3]
    samples[3] = (key, {k: v for k, v in members.items() if k != drop})
    _rewrite_shard(folder, shard, samples)
    with pytest.raises(PackError, match=message):
        run_pack(pack_cfg(t, tmp_path / "ds"))


def test_refuses_duplicate_keys(tiles, tmp_path) -> None:
    """A slide whose tiles carry another slide's keys (e.g. a copied folder with fixed-up JSON)."""
    t = _copy(tiles, tmp_path)
    src, shard = _first_shard(t, "TCGA-A1-0002-01Z-00-DX1")
    dst = t / "slides" / "TCGA-A1-0002-01Z-00-DX2"
    shutil.copytree(src, dst)
    state = json.loads((dst / "state.json").read_text())
    state["slide_id"] = dst.name
    (dst / "state.json").write_text(json.dumps(state))
    samples = []
    for key, members in _samples(dst / shard["name"]):
        meta = json.loads(members["json"])
        meta["slide_id"] = dst.name
        samples.append((key, {**members, "json": json.dumps(meta).encode()}))
    _rewrite_shard(dst, shard, samples)
    with pytest.raises(PackError, match="duplicate sample key: 'TCGA-A1-0002-01Z-00-DX1__"):
        run_pack(pack_cfg(t, tmp_path / "ds", split={"ratios": {"train": 1.0}, "holdout_tss": []}))


def test_refuses_same_slide_in_two_inputs(tiles, tmp_path) -> None:
    t2 = tmp_path / "more"
    shutil.copytree(tiles / "slides" / "TCGA-A1-0002-01Z-00-DX1", t2 / "slides" / "TCGA-A1-0002-01Z-00-DX1")
    with pytest.raises(PackError, match="'TCGA-A1-0002-01Z-00-DX1' is in two input folders"):
        run_pack(pack_cfg([tiles, t2], tmp_path / "ds"))


def test_slide_table_unknown_rows_warn_and_duplicates_refuse(tiles, tmp_path) -> None:
    table = tmp_path / "slides.csv"
    table.write_text(
        "slide_id,project\nTCGA-A1-0002-01Z-00-DX1,BRCA\nTCGA-ZZ-0001-01Z-00-DX1,BRCA\nTCGA-ZZ-0002-01Z-00-DX1,LUAD\n"
    )
    summary = run_pack(pack_cfg(tiles, tmp_path / "ds", inputs={"slide_table": str(table)}))
    assert summary.unknown_table_rows == ["TCGA-ZZ-0001-01Z-00-DX1", "TCGA-ZZ-0002-01Z-00-DX1"]
    assert "slide table rows with no tiles: 2" in summary.report()
    assert read_manifest(tmp_path / "ds" / "train").inputs["slide_table"]["sha256"]

    table.write_text("slide_id,project\nTCGA-A1-0002-01Z-00-DX1,BRCA\nTCGA-A1-0002-01Z-00-DX1,LUAD\n")
    with pytest.raises(ValueError, match="duplicate slide_id 'TCGA-A1-0002-01Z-00-DX1'"):
        run_pack(pack_cfg(tiles, tmp_path / "ds2", inputs={"slide_table": str(table)}))


def test_refuses_patient_across_projects(tiles, tmp_path) -> None:
    table = tmp_path / "slides.csv"
    table.write_text("slide_id,cohort\nTCGA-A1-0001-01Z-00-DX2,LUAD\n")
    with pytest.raises(PackError, match="patient 'TCGA-A1-0001' has slides in different projects"):
        run_pack(pack_cfg(tiles, tmp_path / "ds", inputs={"slide_table": str(table)}))


def test_refuses_ratios_that_leave_a_split_empty(tiles, tmp_path) -> None:
    with pytest.raises(PackError, match=r"\['val'\] would be empty"):
        run_pack(pack_cfg(tiles, tmp_path / "ds", split={"ratios": {"train": 0.97, "val": 0.03}}))
    with pytest.raises(PackError, match="held-out split 'test_tss' would be empty"):
        run_pack(pack_cfg(tiles, tmp_path / "ds", split={"holdout_tss": ["QQ"]}))
    assert not list((tmp_path / "ds").rglob("*.tar"))


def test_slides_without_patient_need_the_flag_or_a_table(tmp_path) -> None:
    slides = tmp_path / "slides" / "IBD"
    slides.mkdir(parents=True)
    names = [f"case{i}_slide{j}" for i in range(4) for j in (1, 2)]
    for k, name in enumerate(names):
        write_synthetic_slide(slides / f"{name}.tiff", width=384, height=384, mpp=0.5, seed=100 + k)
    _tile(tmp_path / "slides", tmp_path / "tiles")
    ratios = {"split": {"ratios": {"train": 0.5, "test": 0.5}, "holdout_tss": []}}
    with pytest.raises(PackError, match=r"8 slide\(s\) have no known patient .*allow_slide_patients"):
        run_pack(pack_cfg(tmp_path / "tiles", tmp_path / "ds", **ratios))

    summary = run_pack(
        pack_cfg(tmp_path / "tiles", tmp_path / "ds", inputs={"allow_slide_patients": True}, **ratios)
    )
    assert sum(s["patients"] for s in summary.splits.values()) == 8

    table = tmp_path / "ibd.csv"
    table.write_text(
        "slide_id,patient_id,site,cohort\n" + "".join(f"{n},{n.split('_')[0]},S{n[4]},IBD\n" for n in names)
    )
    summary = run_pack(
        pack_cfg(tmp_path / "tiles", tmp_path / "ds2", inputs={"slide_table": str(table)}, **ratios)
    )
    assert sum(s["patients"] for s in summary.splits.values()) == 4
    assert len(summary.identity_overrides) == 8
    manifests = [read_manifest(tmp_path / "ds2" / n) for n in summary.splits]
    for m in manifests:  # both slides of a case in the same split
        assert sorted(m.slides) == sorted(f"{p}_slide{j}" for p in m.patients for j in (1, 2))
        assert {v["identity_source"] for v in m.stats["per_slide"].values()} == {"table"}
    assert verify_dataset(tmp_path / "ds2", progress=False).ok


def test_unfinished_and_failed_slides_are_listed_and_can_be_required(tiles, tmp_path) -> None:
    t = _copy(tiles, tmp_path)
    (t / "slides" / "TCGA-44-0099-01Z-00-DX1" / ".incomplete").mkdir(parents=True)
    summary = run_pack(pack_cfg(t, tmp_path / "ds"))
    status = {e["slide_id"]: e["status"] for e in summary.excluded}
    assert status == {FAILED_SLIDE: "failed", "TCGA-44-0099-01Z-00-DX1": "unfinished"}
    assert "EXCLUDED TCGA-44-0099-01Z-00-DX1 [unfinished]" in summary.report()
    with pytest.raises(PackError, match=r"2 slide\(s\) are not done"):
        run_pack(pack_cfg(t, tmp_path / "ds2", inputs={"require_all_done": True}))


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"sampling\.tile_budget: unknown key"):
        build_config(PackConfig, {"sampling": {"tile_budget": 3}})
    with pytest.raises(ConfigError, match="names unknown split"):
        build_config(PackConfig, {"sampling": {"tiles_per_split": {"training": 10}}})
    with pytest.raises(ConfigError, match="sum to 1"):
        build_config(PackConfig, {"split": {"ratios": {"train": 0.8, "val": 0.1}}})
    with pytest.raises(ConfigError, match=r"shards\.samples_per_shard"):
        build_config(PackConfig, {"shards": {"samples_per_shard": 0}})
    with pytest.raises(ConfigError, match="no input"):
        run_pack(build_config(PackConfig, {}))


def test_example_config_loads() -> None:
    path = Path(__file__).resolve().parent.parent / "configs" / "pack.yaml"
    cfg = load_config(PackConfig, path)
    assert cfg.shards.samples_per_shard >= 1000


def test_tar_reader_counts_by_reading(packed) -> None:
    out, _ = packed
    m = read_manifest(out / "train")
    path = out / "train" / m.shards[0].name
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert len(names) == 2 * m.shards[0].count == 2 * len(_samples(path))
