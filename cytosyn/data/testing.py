"""Small synthetic splits for tests and benchmarks: real shards and a real manifest, written with the
same :class:`~cytosyn.shardio.ShardWriter` and :func:`~cytosyn.manifest.write_manifest` as ``pack``."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cytosyn.manifest import FeatureEntry, SplitManifest, write_manifest
from cytosyn.shardio import ShardWriter

EMBED_DIM = 8
VAE_SHAPE = (2, 4, 2, 2)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def sample_pixels(index: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(index).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def sample_embedding(index: int) -> np.ndarray:
    return (np.arange(EMBED_DIM, dtype=np.float32) + index).astype(np.float16)


def sample_vae(index: int) -> np.ndarray:
    return np.full(VAE_SHAPE, index % 1000, dtype=np.float16)


def synthetic_sample(index: int, size: int = 16) -> dict[str, object]:
    """Sample number ``index``: key ``s<index>``, a PNG of seeded noise, json and two fp16 features."""
    key = f"s{index:06d}"
    return {
        "__key__": key,
        "png": png_bytes(sample_pixels(index, size)),
        "json": json.dumps({"index": index, "slide_id": f"slide{index % 3}"}).encode(),
        "h0-mini.npy": npy_bytes(sample_embedding(index)),
        "vae.npy": npy_bytes(sample_vae(index)),
    }


def feature_entries() -> list[FeatureEntry]:
    return [
        FeatureEntry(member="h0-mini.npy", kind="embedding", model_id="random", details={"dtype": "float16"}),
        FeatureEntry(member="vae.npy", kind="vae", model_id="random", details={"dtype": "float16"}),
    ]


def write_split(
    folder: Path,
    samples: Iterable[dict[str, object]],
    counts: Sequence[int],
    image_member: str = "png",
    features: Sequence[FeatureEntry] | None = None,
    split: str = "train",
) -> SplitManifest:
    """Write ``samples`` into shards holding exactly ``counts`` samples each, plus ``manifest.json``."""
    folder = Path(folder)
    it = iter(samples)
    infos = []
    for i, n in enumerate(counts):
        writer = ShardWriter(folder, lambda _j, i=i: f"{split}-{i:06d}.tar", max_samples=max(n, 1))
        for _ in range(n):
            writer.write(next(it))
        infos.extend(writer.close())
    manifest = SplitManifest(
        split=split,
        image_member=image_member,
        samples=sum(counts),
        shards=[info.as_dict() for info in infos],
        patients=[],
        slides=[],
        features=list(feature_entries() if features is None else features),
    )
    write_manifest(manifest, folder)
    return manifest


def write_synthetic_split(folder: Path, counts: Sequence[int], size: int = 16) -> SplitManifest:
    """A split of ``sum(counts)`` :func:`synthetic_sample` samples (keys ``s000000`` …, in order)."""
    total = sum(counts)
    return write_split(folder, (synthetic_sample(i, size) for i in range(total)), counts)
