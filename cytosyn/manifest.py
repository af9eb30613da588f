"""The split manifest: what a dataset split is, written by ``pack`` and extended by ``featurize``.

One ``manifest.json`` per split folder::

    <dataset>/<split>/manifest.json
    <dataset>/<split>/<split>-000000.tar ...

Readers (the training loader, featurize, eval) trust shards only through it: sample counts tell the
loader how to give every rank the same number of samples without opening a shard, and sha256 lets
``pack --verify`` (and featurize) prove a shard is the one that was packed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from cytosyn.config import StrictModel
from cytosyn.fileio import atomic_write_text

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "cytosyn.split/1"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent."""


class ShardEntry(StrictModel):
    name: str  # file name relative to the split folder
    count: int  # samples in the shard
    bytes: int
    sha256: str
    digests: str | None = None  # per-sample digest file (see cytosyn.shardio), when the writer made one
    digests_sha256: str | None = None


class FeatureEntry(StrictModel):
    """A member added by ``featurize`` (e.g. ``h0-mini.npy`` or ``vae.npy``) and how it was made."""

    member: str  # sample member name, e.g. "h0-mini.npy"
    kind: str  # "embedding" or "vae"
    model_id: str  # registry name or local path
    weights_sha256: str | None = None  # None only for explicitly random-initialised models
    details: dict[str, Any] = Field(default_factory=dict)  # dtype, shapes, preprocessing, latent stats


class SplitManifest(StrictModel):
    format: str = MANIFEST_FORMAT
    split: str  # "train", "val", "test", "test_tss", ...
    image_member: str  # "jpg", "png" or "webp"
    samples: int
    shards: list[ShardEntry]
    patients: list[str]
    slides: list[str]
    stats: dict[str, Any] = Field(default_factory=dict)  # tiles per project / tss, realised quotas
    features: list[FeatureEntry] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)  # resolved config of the producing verb
    inputs: dict[str, Any] = Field(default_factory=dict)  # hashes of what it was made from
    code_version: str = ""
    history: list[dict[str, Any]] = Field(default_factory=list)  # later stages that rewrote it

    def shard_paths(self, folder: Path) -> list[Path]:
        return [Path(folder) / s.name for s in self.shards]

    def check_counts(self) -> None:
        total = sum(s.count for s in self.shards)
        if total != self.samples:
            raise ManifestError(
                f"manifest of split {self.split!r}: shards hold {total} samples, header says {self.samples}"
            )


def manifest_path(split_dir: Path) -> Path:
    return Path(split_dir) / MANIFEST_FILE


def read_manifest(split_dir: str | Path) -> SplitManifest:
    """Load and validate ``<split_dir>/manifest.json`` (or a manifest file path)."""
    path = Path(split_dir)
    if path.is_dir():
        path = manifest_path(path)
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}: is this a folder written by `cytosyn pack`?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"manifest {path} is not valid JSON: {err}") from None
    if data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(
            f"manifest {path} has format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}"
        )
    manifest = SplitManifest.model_validate(data)
    manifest.check_counts()
    return manifest


def write_manifest(manifest: SplitManifest, split_dir: str | Path) -> Path:
    """Write the manifest atomically (it is the last file of a split to be written)."""
    manifest.check_counts()
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    return atomic_write_text(manifest_path(Path(split_dir)), text)
