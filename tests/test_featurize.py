"""``cytosyn featurize`` on real fixture tiles with random-initialised models of the real architectures."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_tile_samples, write_split
from cytosyn.data_prep.featurize import FeaturizeError, run_featurize
from cytosyn.data_prep.featurize_config import FeaturizeConfig
from PIL import Image

from cytosyn.config import build_config
from cytosyn.manifest import read_manifest


def _members(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def split(tmp_path_factory, fixture_slide) -> Path:
    """A packed-style split of 12 real JPEG tiles from the fixture slide, in two shards (7 + 5)."""
    root = tmp_path_factory.mktemp("featurize")
    samples = fixture_tile_samples(root / "tiles", fixture_slide)[:12]
    return write_split(root / "dataset" / "train", samples, "train", per_shard=7)


H0_MINI = [{"name": "h0-mini", "random_init": True, "outputs": ["cls", "patch"]}]


def _cfg(split: Path, out: Path, **extra) -> FeaturizeConfig:
    """A small run: ViT-Tiny (fast on CPU) unless a test asks for another encoder."""
    data = {
        "input": str(split),
        "output": str(out),
        "encoders": [{"name": "vit-tiny16", "random_init": True, "outputs": ["cls", "patch"]}],
        "vae": {"name": "tiny-f8", "random_init": True},
        "batch_size": 5,
        "decode_check": 4,
        "progress": False,
    }
    data.update(extra)
    return build_config(FeaturizeConfig, data)


@pytest.fixture(scope="module")
def featurized(split, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("feat") / "train"
    summary = run_featurize(_cfg(split, out, encoders=H0_MINI))  # the real conditioning architecture
    assert summary.done == 2 and summary.manifest_written
    return out


def test_members_shapes_dtypes_and_untouched_bytes(split, featurized):
    manifest = read_manifest(featurized)
    before = read_manifest(split)
    assert [s.name for s in manifest.shards] == [s.name for s in before.shards]
    assert manifest.samples == before.samples == 12
    for entry in before.shards:
        src, dst = _members(split / entry.name), _members(featurized / entry.name)
        assert list(src) == list(dst)  # same samples, same order
        for key, members in src.items():
            out = dst[key]
            assert out["jpg"] == members["jpg"] and out["json"] == members["json"]
            cls = np.load(io.BytesIO(out["h0-mini.npy"]))
            patch = np.load(io.BytesIO(out["h0-mini_patch.npy"]))
            vae = np.load(io.BytesIO(out["vae.npy"]))
            assert (cls.dtype, cls.shape) == (np.float16, (768,))
            assert (patch.dtype, patch.shape) == (np.float16, (256, 768))
            assert (vae.dtype, vae.shape) == (np.float16, (2, 4, 28, 28))
    kinds = {f.member: f for f in manifest.features}
    assert set(kinds) == {"h0-mini.npy", "h0-mini_patch.npy", "vae.npy"}
    assert kinds["h0-mini.npy"].details["random_init"] is True and kinds["h0-mini.npy"].weights_sha256 is None
    assert kinds["h0-mini.npy"].details["mean"] == pytest.approx([0.707223, 0.578729, 0.703617])
    assert manifest.history[-1]["verb"] == "featurize"
    grid = np.asarray(Image.open(featurized / "decode_check.png"))
    assert grid.shape == (2 * 224, 4 * 224, 3)


def test_latent_statistics_equal_a_direct_computation(featurized):
    manifest = read_manifest(featurized)
    moments = [
        np.load(io.BytesIO(m["vae.npy"])).astype(np.float64)
        for entry in manifest.shards
        for m in _members(featurized / entry.name).values()
    ]
    stacked = np.stack(moments)  # (N, 2, C, h, w)
    means, variances = stacked[:, 0], np.exp(stacked[:, 1])
    stats = next(f for f in manifest.features if f.member == "vae.npy").details["latent_stats"]
    np.testing.assert_allclose(stats["mean"], means.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats["mean_std"], means.std(axis=(0, 2, 3)), rtol=1e-7)
    expected_std = np.sqrt(means.var(axis=(0, 2, 3)) + variances.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(stats["std"], expected_std, rtol=1e-7)
    assert stats["count_per_channel"] == 12 * 28 * 28


def test_deterministic_and_a_rerun_is_a_no_op(split, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    run_featurize(_cfg(split, first))
    run_featurize(_cfg(split, again))
    for entry in read_manifest(split).shards:
        assert (again / entry.name).read_bytes() == (first / entry.name).read_bytes()
    rerun = run_featurize(_cfg(split, again))
    assert (rerun.done, rerun.skipped) == (0, 2) and rerun.manifest_written


def test_stored_latents_decode_like_the_vae_itself(split, featurized):
    from cytosyn.models.vae import load_vae

    vae = load_vae("tiny-f8", random_init=True)  # the same seed ⇒ the same weights
    entry = read_manifest(split).shards[0]
    for members in list(_members(featurized / entry.name).values())[:3]:
        tile = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))
        direct = vae.decode(vae.encode_moments(torch.from_numpy(tile[None]))[:, 0])
        stored = torch.from_numpy(np.load(io.BytesIO(members["vae.npy"]))[0][None]).float()
        from_store = vae.decode(stored)
        assert (from_store - direct).abs().max() < 0.02  # fp16 storage only


def test_parts_split_shards_and_the_last_one_writes_the_manifest(split, tmp_path):
    out = tmp_path / "parts"
    first = run_featurize(_cfg(split, out, part="0/2"))
    assert (first.done, first.manifest_written) == (1, False)
    assert not (out / "manifest.json").exists()
    second = run_featurize(_cfg(split, out, part="1/2"))
    assert (second.done, second.manifest_written) == (1, True)
    assert read_manifest(out).samples == 12


def test_changed_input_shard_is_refused(split, tmp_path):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in split.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    first = tampered / read_manifest(split).shards[0].name
    data = bytearray(first.read_bytes())
    data[1000] ^= 0xFF  # inside the first JPEG: still a valid tar, different bytes
    first.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(FeaturizeError, match="changed since packing"):
        run_featurize(_cfg(tampered, out))
    assert not (out / first.name).exists()  # nothing under the final name
    assert not list(out.glob(".*.partial"))


def test_local_weights_are_hashed_and_nan_weights_are_refused(split, tmp_path):
    from safetensors.torch import save_file

    from cytosyn.models.encoders import load_encoder

    enc = load_encoder("vit-tiny16", random_init=True, seed=3)
    state = {k: v.contiguous() for k, v in enc.model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    out = tmp_path / "local"
    cfg = _cfg(
        split, out, encoders=[{"name": "vit-tiny16", "weights": str(tmp_path)}], vae=None, decode_check=0
    )
    run_featurize(cfg)
    (feature,) = read_manifest(out).features
    assert feature.weights_sha256 and len(feature.weights_sha256) == 64
    assert feature.details["random_init"] is False

    state["norm.weight"] = torch.full_like(state["norm.weight"], float("nan"))
    (tmp_path / "nan").mkdir()
    save_file(state, tmp_path / "nan" / "model.safetensors")
    cfg = _cfg(
        split,
        tmp_path / "nan_out",
        encoders=[{"name": "vit-tiny16", "weights": str(tmp_path / "nan")}],
        vae=None,
    )
    with pytest.raises(FeaturizeError, match="non-finite"):
        run_featurize(cfg)


def test_missing_and_unavailable_weights_say_what_to_do(split, tmp_path):
    with pytest.raises(FeaturizeError, match="does not exist"):
        run_featurize(
            _cfg(split, tmp_path / "a", encoders=[{"name": "uni2-h", "weights": str(tmp_path / "nope.bin")}])
        )
    with pytest.raises(FeaturizeError, match="unknown encoder"):
        run_featurize(_cfg(split, tmp_path / "b", encoders=[{"name": "uni3"}]))
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: a hub download fails at once
    with pytest.raises(FeaturizeError, match="local path"):
        run_featurize(_cfg(split, tmp_path / "c", encoders=[{"name": "h0-mini"}]))


_KILL = """
import sys
from pathlib import Path
from cytosyn.config import build_config
from cytosyn.data_prep.featurize import run_featurize
from cytosyn.data_prep.featurize_config import FeaturizeConfig
cfg = build_config(FeaturizeConfig, {"input": sys.argv[1], "output": sys.argv[2], "batch_size": 1,
    "encoders": [{"name": "vit-tiny16", "random_init": True}], "vae": {"name": "tiny-f8", "random_init": True},
    "decode_check": 0, "progress": False})
run_featurize(cfg)
"""


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_output(split, tmp_path):
    reference = tmp_path / "reference"
    args = {"encoders": [{"name": "vit-tiny16", "random_init": True}], "batch_size": 1, "decode_check": 0}
    run_featurize(_cfg(split, reference, **args))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILL, str(split), str(out)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / ".featurize").glob("*.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    states = list((out / ".featurize").glob("*.json"))
    assert len(states) == 1, "the run should have been killed after its first shard"
    assert not (out / "manifest.json").exists()
    resumed = run_featurize(_cfg(split, out, **args))
    assert (resumed.skipped, resumed.done) == (1, 1)
    for entry in read_manifest(split).shards:
        assert (out / entry.name).read_bytes() == (reference / entry.name).read_bytes()
