"""pack, verify, featurize and the loader at their edges (issue 13). Each test failed before its fix."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_split
from cytosyn.data_prep.pack import PackError, run_pack
from cytosyn.data_prep.pack_config import PackConfig
from cytosyn.data_prep.splits import SlideRecord, SplitError, assign_splits
from cytosyn.data_prep.synthetic import Shape, write_synthetic_slide
from cytosyn.data_prep.tile_config import TileConfig
from cytosyn.data_prep.tiler import run_tiling
from cytosyn.data_prep.verify import verify_dataset

from cytosyn.cli import main
from cytosyn.config import build_config
from cytosyn.data import LoaderConfig, build_loader
from cytosyn.data.tario import read_segment
from cytosyn.manifest import read_manifest

PATIENTS = ["TCGA-A1-0001", "TCGA-A1-0002", "TCGA-A2-0003", "TCGA-A2-0004", "TCGA-B5-0005", "TCGA-B5-0006"]
TILE = {
    "codec": {"format": "jpeg", "quality": 90},
    "grid": {"tile_px": 32, "mpp": 1.0, "min_tissue_fraction": 0.3},
    "tissue": {"mask_mpp": 2.0, "min_area_um2": 0, "max_hole_um2": 0},
    "run": {"progress": False, "overview": False},
}


def _slide(path: Path, seed: int) -> None:
    tissue = [
        Shape("rect", 32, 32, 320, 320, (200, 110, 170)),
        Shape("disk", 50, 50, 150, 150, (150, 80, 160)),
    ]
    write_synthetic_slide(path, width=384, height=384, mpp=0.5, seed=seed, tissue=tissue)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    for i, patient in enumerate(PATIENTS):
        _slide(root / "slides" / "BRCA" / f"{patient}-01Z-00-DX1.tiff", seed=i)
    cfg = build_config(
        TileConfig, {"output": str(root / "tiles"), "slides": {"input": [str(root / "slides")]}, **TILE}
    )
    assert run_tiling(cfg).done == len(PATIENTS)
    return root / "tiles"


def pack_cfg(tiles: Path, output: Path, **sections) -> PackConfig:
    data: dict = {
        "output": str(output),
        "inputs": {"tiles": [str(tiles)]},
        "split": {"ratios": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "shards": {"samples_per_shard": 16},
        "run": {"progress": False, "buffer_mb": 1},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return build_config(PackConfig, data)


@pytest.fixture(scope="module")
def packed(tiles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "ds"
    run_pack(pack_cfg(tiles, out))
    assert verify_dataset(out, progress=False).ok
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------- verify


@pytest.mark.parametrize("damage", ["manifest", "folder"])
def test_verify_fails_when_a_split_is_missing(packed, tmp_path, damage):
    ds = _copy(packed, tmp_path / "ds")
    if damage == "manifest":
        (ds / "val" / "manifest.json").unlink()
    else:
        shutil.rmtree(ds / "val")
    report = verify_dataset(ds, progress=False)
    assert not report.ok
    assert any("val" in v and "missing" in v for v in report.violations), report.violations
    assert main(["pack", "--verify", str(ds)]) == 1


def test_verify_fails_when_pack_did_not_finish(packed, tmp_path):
    ds = _copy(packed, tmp_path / "ds")
    (ds / "pack_summary.json").unlink()
    (ds / "test" / "manifest.json").unlink()  # killed between two manifests
    report = verify_dataset(ds, progress=False)
    assert not report.ok
    assert any("pack_summary.json" in v for v in report.violations), report.violations


# ------------------------------------------------------------------------------------ held-out TSS


def test_a_held_out_tss_that_matches_no_slide_is_an_error(tiles, tmp_path):
    records = [SlideRecord(f"{p}-01Z", p, p[5:7], "BRCA", 10) for p in PATIENTS]
    with pytest.raises(SplitError, match="ZZ"):
        assign_splits(records, {"train": 0.5, "val": 0.5}, holdout_tss=["A1", "ZZ"])
    with pytest.raises(PackError, match="ZZ"):
        run_pack(pack_cfg(tiles, tmp_path / "ds", split={"holdout_tss": ["B5", "ZZ"]}))


# ------------------------------------------------------------------------ workers die with the run

_SLOW_WORKERS = textwrap.dedent(
    """
    import functools, os, time
    if os.environ.get("CYTOSYN_TEST_SLOW_WORKERS"):
        import cytosyn.data_prep.pack as pack, cytosyn.data_prep.tiler as tiler
        def slow(fn):
            @functools.wraps(fn)  # pickled by name: the workers find the same wrapped function
            def wrapped(*args, **kwargs):
                while True:  # a worker that would go on forever (and write) if nobody stopped it
                    open(os.path.join(os.environ["CYTOSYN_TEST_SLOW_WORKERS"], f"alive-{os.getpid()}"), "w").close()
                    time.sleep(0.2)
            return wrapped
        pack._read_task = slow(pack._read_task)
        tiler._band_entry = slow(tiler._band_entry)
    """
)


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("verb", ["pack", "tile"])
def test_workers_stop_when_the_run_is_killed(tiles, tmp_path, verb):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_SLOW_WORKERS)
    beats = tmp_path / "beats"
    beats.mkdir()
    if verb == "pack":
        cfg = tmp_path / "pack.yaml"
        cfg.write_text(
            json.dumps(
                pack_cfg(tiles, tmp_path / "ds").model_dump(mode="json")
                | {"run": {"workers": 2, "progress": False}}
            )
        )
        args = ["pack", "--config", str(cfg)]
    else:
        slides = tmp_path / "slides"
        for i in range(3):
            _slide(slides / f"S{i}.tiff", seed=i)
        args = [
            "tile",
            "--input",
            str(slides),
            "--output",
            str(tmp_path / "tiles"),
            "--workers",
            "2",
            "run.progress=false",
        ]
    env = os.environ | {"PYTHONPATH": str(hooks), "CYTOSYN_TEST_SLOW_WORKERS": str(beats)}
    proc = subprocess.Popen([sys.executable, "-m", "cytosyn.cli", *args], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(beats.iterdir()):
        time.sleep(0.05)
    assert list(beats.iterdir()), "the workers never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        assert _group_gone(proc.pid, timeout=10), "worker processes outlived the killed run"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------- featurize


def _featurize_cfg(src: Path, out: Path) -> dict:
    return {
        "input": str(src),
        "output": str(out),
        "encoders": [{"name": "vit-tiny16", "random_init": True}],
        "vae": None,
        "decode_check": 0,
        "progress": False,
        "batch_size": 16,
    }


def test_featurize_refuses_to_write_over_another_split(packed, tmp_path):
    from cytosyn.data_prep.featurize import FeaturizeError, run_featurize
    from cytosyn.data_prep.featurize_config import FeaturizeConfig

    ds = _copy(packed, tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in (ds / "val").iterdir()}
    with pytest.raises(FeaturizeError, match="val"):
        run_featurize(build_config(FeaturizeConfig, _featurize_cfg(ds / "train", ds / "val")))
    assert {p.name: p.read_bytes() for p in (ds / "val").iterdir() if p.is_file()} == before


def test_featurize_checks_an_input_shard_before_running_the_models(packed, tmp_path, monkeypatch):
    import cytosyn.data_prep.featurize as featurize
    from cytosyn.data_prep.featurize_config import FeaturizeConfig

    ds = _copy(packed, tmp_path / "ds")
    shard = ds / "train" / read_manifest(ds / "train").shards[0].name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    calls = []
    original = featurize._run_batch
    monkeypatch.setattr(featurize, "_run_batch", lambda *a, **k: calls.append(1) or original(*a, **k))
    with pytest.raises(featurize.FeaturizeError, match="changed since packing"):
        featurize.run_featurize(build_config(FeaturizeConfig, _featurize_cfg(ds / "train", tmp_path / "f")))
    assert calls == []


# ------------------------------------------------------------------------------------- full disk


def _no_space_after(limit: int):
    import cytosyn.shardio as shardio

    original = shardio._HashingFile.write
    written = {"n": 0}

    def write(self, data):
        written["n"] += len(data)
        if written["n"] > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    return write


def test_full_disk_in_pack_exits_4(tiles, tmp_path, monkeypatch, capsys):
    import cytosyn.shardio as shardio

    cfg = tmp_path / "pack.yaml"
    cfg.write_text(json.dumps(pack_cfg(tiles, tmp_path / "ds").model_dump(mode="json")))
    monkeypatch.setattr(shardio._HashingFile, "write", _no_space_after(20_000))
    assert main(["pack", "--config", str(cfg)]) == 4
    assert "No space left" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["pack", "--config", str(cfg)]) == 0  # the rerun finishes: nothing was lost
    assert verify_dataset(tmp_path / "ds", progress=False).ok


def test_full_disk_in_featurize_exits_4(packed, tmp_path, monkeypatch, capsys):
    import cytosyn.shardio as shardio

    cfg = tmp_path / "featurize.yaml"
    cfg.write_text(json.dumps(_featurize_cfg(packed / "train", tmp_path / "f")))
    monkeypatch.setattr(shardio._HashingFile, "write", _no_space_after(20_000))
    assert main(["featurize", "--config", str(cfg)]) == 4
    assert "No space left" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- loader


def _sample_offsets(shard: Path) -> list[tuple[str, tarfile.TarInfo]]:
    with tarfile.open(shard) as tar:
        return [(m.name, m) for m in tar.getmembers()]


def test_verified_loader_drops_only_the_damaged_sample(packed, tmp_path):
    ds = _copy(packed, tmp_path / "ds")
    split = ds / "train"
    manifest = read_manifest(split)
    shard = split / manifest.shards[0].name
    members = _sample_offsets(shard)
    name, info = next((n, m) for n, m in members[8:] if n.endswith(".jpg"))
    data = bytearray(shard.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0x10  # one bit of JPEG entropy data: still decodes
    shard.write_bytes(bytes(data))
    every = {n.split(".")[0] for s in manifest.shards for n, _ in _sample_offsets(split / s.name)}
    loader = build_loader(
        split, LoaderConfig(batch_size=4, num_workers=0, verify_hashes=True, shuffle_buffer=0)
    )
    keys = {k for batch in loader for k in batch["__key__"]}
    assert loader.stats.skipped_corrupt == {"hash_mismatch": 1}, loader.stats.skipped_corrupt
    assert keys == every - {name.split(".")[0]}


def test_non_finite_features_are_skipped_and_counted(tmp_path):
    samples = []
    for i in range(12):
        vae = np.full((2, 4, 2, 2), 0.5, dtype=np.float16)
        if i == 5:
            vae[0, 1, 0, 0] = np.inf
        buf = io.BytesIO()
        np.save(buf, vae)
        samples.append(
            (
                f"s__x{i}_y0",
                {"json": json.dumps({"i": i}).encode(), "png": _png(i), "vae.npy": buf.getvalue()},
            )
        )
    split = write_split(tmp_path / "split", samples, "train", per_shard=6)
    loader = build_loader(
        split, LoaderConfig(batch_size=4, num_workers=0, shuffle_buffer=0, members=["vae.npy", "json"])
    )
    seen = [j["i"] for batch in loader for j in batch["json"]]
    assert 5 not in seen
    assert sum(loader.stats.skipped_corrupt.values()) == 1
    assert "nonfinite_member" in loader.stats.skipped_corrupt


def _png(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["truncate_at_sample", "bad_header"])
def test_a_break_in_a_shard_counts_only_the_samples_it_damaged(tmp_path, damage):
    samples = [(f"s__x{i}_y0", {"json": b'{"i": %d}' % i, "png": _png(i)}) for i in range(10)]
    split = write_split(tmp_path / "split", samples, "train", per_shard=10)
    shard = split / "train-000000.tar"
    members = _sample_offsets(shard)
    first_of_6 = next(m for n, m in members if n.startswith("s__x6_y0."))
    data = bytearray(shard.read_bytes())
    if damage == "truncate_at_sample":
        data = data[: first_of_6.offset]
    else:
        data[first_of_6.offset + 10] ^= 0xFF  # the header's name field: checksum mismatch
    shard.write_bytes(bytes(data))
    items = list(read_segment(shard, 0, 10, np.ones(10, dtype=bool), None))
    failed = [n for n, item in items if not hasattr(item, "data")]
    assert failed == [6, 7, 8, 9], failed
    assert len(items) == 10


def test_training_can_turn_on_hash_verification(tiny_features, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from conftest import tiny_train_config

    import cytosyn.training.module as module
    from cytosyn.training.config import TrainConfig

    built = []
    original = module.build_loader
    monkeypatch.setattr(
        module, "build_loader", lambda split, cfg, **kw: built.append(cfg) or original(split, cfg, **kw)
    )
    cfg = build_config(
        TrainConfig, tiny_train_config(tiny_features, tmp_path / "run"), ["data.verify_hashes=true"]
    )
    lit = module.LatentDiffusionModule(
        cfg, module.split_features(cfg, read_manifest(cfg.data.train), cfg.data.train)
    )
    lit._trainer = SimpleNamespace(world_size=1, global_rank=0)  # what train_dataloader asks of its trainer
    lit.train_dataloader()
    lit._fixed_set(cfg.data.val)
    assert len(built) == 2 and all(c.verify_hashes for c in built)
