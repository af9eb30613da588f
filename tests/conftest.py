"""Shared test fixtures: the real fixture slide, and helpers that run the tiler on small inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Tests never reach a hub or a logging service.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# Test modules import lightning/timm directly: make torchvision importable first (see cytosyn/compat.py).
from cytosyn.compat import import_torchvision

import_torchvision()

from cytosyn.data_prep.tile_config import TileConfig  # noqa: E402
from cytosyn.data_prep.tiler import TilingSummary, run_tiling  # noqa: E402

from cytosyn.config import build_config  # noqa: E402
from cytosyn.demo import bundled_slide  # noqa: E402


@pytest.fixture(scope="session")
def fixture_slide() -> Path:
    """The real Aperio H&E slide (crop of OpenSlide's CMU-1) bundled with the package."""
    path = bundled_slide()
    assert path.is_file(), f"bundled fixture slide missing at {path}"
    return path


def tile_config(inputs: list[Path], output: Path, **sections) -> TileConfig:
    """A TileConfig for tests: lossless PNG tiles, no progress bar; ``sections`` override defaults."""
    data = {
        "output": str(output),
        "slides": {"input": [str(p) for p in inputs]},
        "codec": {"format": "png", "png_compress_level": 1},
        "run": {"progress": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return build_config(TileConfig, data)


def run_tile(inputs: list[Path], output: Path, **sections) -> TilingSummary:
    return run_tiling(tile_config(inputs, output, **sections))


def read_slide_tiles(output: Path, slide_id: str) -> list[tuple[str, dict, np.ndarray, str]]:
    """Every tile of a tiled slide as (key, json, decoded RGB array, image extension), in shard order."""
    import io
    import json
    import tarfile

    from PIL import Image

    from cytosyn.formats import slide_dir

    folder = slide_dir(output, slide_id)
    state = json.loads((folder / "state.json").read_text())
    tiles = []
    for shard in state["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(folder / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, m in members.items():
            ext = next(e for e in ("png", "jpg", "webp") if e in m)
            image = np.asarray(Image.open(io.BytesIO(m[ext])).convert("RGB"))
            tiles.append((key, json.loads(m["json"]), image, ext))
    return tiles


def shard_digests(output: Path) -> dict[str, str]:
    """sha256 of every tar under a tiling output, keyed by relative path."""
    import hashlib

    return {
        str(p.relative_to(output)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(output).rglob("*.tar"))
    }


def write_split(
    folder: Path, samples: list[tuple[str, dict[str, bytes]]], split: str, per_shard: int = 16
) -> Path:
    """Write samples (key, members) as a packed-style split with a manifest (for tests past `pack`)."""
    from cytosyn.manifest import SplitManifest, write_manifest
    from cytosyn.shardio import ShardWriter

    writer = ShardWriter(folder, lambda i: f"{split}-{i:06d}.tar", max_samples=per_shard)
    for key, members in samples:
        writer.write({"__key__": key, **members})
    shards = writer.close()
    image = next(e for e in ("jpg", "png", "webp") if e in samples[0][1])
    write_manifest(
        SplitManifest(
            split=split,
            image_member=image,
            samples=len(samples),
            shards=[s.as_dict() for s in shards],
            patients=sorted({k.split("__")[0] for k, _ in samples}),
            slides=sorted({k.split("__")[0] for k, _ in samples}),
        ),
        folder,
    )
    return folder


def fixture_tile_samples(output: Path, fixture: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Tile the real fixture slide (JPEG q90) and return its samples as (key, members), in order."""
    import json
    import tarfile

    from cytosyn.formats import slide_dir

    run_tile([fixture], output, codec={"format": "jpeg", "quality": 90})
    folder = slide_dir(output, "cmu_small_region")
    samples: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((folder / "state.json").read_text())["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return sorted(samples.items())


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory) -> dict[str, Path]:
    """Featurized train (32 tiles) and held-out val (the rest) splits of the real fixture slide, made with
    random-initialised small models of real architectures (vit-tiny16 encoder, tiny-f8 VAE)."""
    from cytosyn.data_prep.featurize import run_featurize
    from cytosyn.data_prep.featurize_config import FeaturizeConfig

    root = tmp_path_factory.mktemp("training")
    samples = fixture_tile_samples(root / "tiles", bundled_slide())
    out = {}
    for name, part in (("train", samples[:32]), ("val", samples[32:])):
        write_split(root / "dataset" / name, part, name)
        cfg = build_config(
            FeaturizeConfig,
            {
                "input": str(root / "dataset" / name),
                "output": str(root / "features" / name),
                "encoders": [{"name": "vit-tiny16", "random_init": True, "outputs": ["cls", "patch"]}],
                "vae": {"name": "tiny-f8", "random_init": True},
                "decode_check": 0,
                "progress": False,
            },
        )
        run_featurize(cfg)
        out[name] = root / "features" / name
    return out


def tiny_train_config(features: dict[str, Path], run_dir: Path) -> dict:
    """The tiny SiT-T/2 training config (as plain data) on :func:`tiny_features` splits."""
    return {
        "run_dir": str(run_dir),
        "data": {
            "train": str(features["train"]),
            "val": str(features["val"]),
            "condition": "vit-tiny16",
            "repa_target": "vit-tiny16_patch",
            "batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 16,
        },
        "model": {"preset": "SiT-T/2"},
        "optim": {"lr": 1e-3, "warmup_steps": 5},
        "ema": {"decay": 0.9},
        "trainer": {
            "max_steps": 16,
            "accelerator": "cpu",
            "log_every_n_steps": 1,
            "checkpoint_every_n_steps": 8,
        },
        "validation": {"every_n_steps": 0, "max_batches": 2},
        "logging": {"wandb": "disabled"},
    }
