"""Tiles to score, read in units (one per input shard, or per block of a folder) so a run resumes per unit.

Inputs:

- a **split folder** (``manifest.json``, written by ``pack`` / ``ingest`` / ``featurize``): one unit per
  shard, each shard checked against its sha256. When the split was featurized with the model's VAE and
  conditioning encoder, the stored posterior means (``vae.npy``) and embeddings are used; otherwise the
  tiles are encoded with the model's own VAE and encoder.
- an **image folder**: ``*.png / *.jpg / *.jpeg / *.tif / *.tiff / *.webp`` files, in sorted order; a
  folder with one subfolder per class gives each tile that class as its label. Units of
  ``tiles_per_unit`` files.

Each tile carries its key (the shard key, or the file's relative path with ``/`` and ``.`` replaced),
its label (tile JSON ``label``, or the class folder) and its identity (slide, patient) when known.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from cytosyn.data.decode import decode_image, load_npy
from cytosyn.manifest import ManifestError, SplitManifest, read_manifest
from cytosyn.shardio import iter_shard_samples

from .engine import ScoringError

__all__ = ["IMAGE_SUFFIXES", "TileBatch", "TileSource", "Unit", "encode_batch", "open_source"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
_IDENTITY = ("slide_id", "patient_id", "tss", "project", "x", "y", "mpp", "tile_px")


@dataclass
class TileBatch:
    """The tiles of one unit. ``latents``: normalised ``(N, C, H, W)`` when the input stores them (else
    None: encode ``images``); ``own``: ``(N, D)`` conditioning embeddings when stored (else None)."""

    keys: list[str]
    labels: list[str | None]
    meta: list[dict[str, Any]]
    images: list[np.ndarray] | None = None
    latents: np.ndarray | None = None
    own: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Unit:
    """One resumable piece of the input: its name (the output's per-unit file stem), its tile count and
    a reader (``with_images``: also decode the images)."""

    name: str
    count: int
    sha256: str | None
    read: Callable[[bool], TileBatch]


@dataclass
class TileSource:
    path: Path
    kind: str  # "split" or "folder"
    units: list[Unit]
    featurized: bool  # latents and own embeddings come from the input (no encoding needed)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(u.count for u in self.units)

    def iter_all(self, with_images: bool = False) -> Iterator[TileBatch]:
        for unit in self.units:
            yield unit.read(with_images)


def _safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


# --------------------------------------------------------------------------------------------------------
# Split folders
# --------------------------------------------------------------------------------------------------------


def _feature_members(path: Path, manifest: SplitManifest, pipe: Any) -> tuple[str, str] | None:
    """(embedding member, "vae.npy") when the split holds the model's own features; None when it holds
    none (the tiles are then encoded); a clear error when it holds features of another encoder or VAE."""
    if not manifest.features:
        return None
    from cytosyn.sample import SampleError, _reference_member

    try:  # the same checks `cytosyn sample` makes: member present, same encoder, weights and width
        member = _reference_member(SimpleNamespace(embedding_member=None, split=path), pipe, manifest)
    except SampleError as err:
        raise ScoringError(str(err)) from None
    vae = next((f for f in manifest.features if f.member == "vae.npy"), None)
    if vae is None:
        raise ScoringError(
            f"split {path} has {member} but no vae.npy latents: featurize it with the model's VAE"
        )
    want = (pipe.config.get("vae") or {}).get("name")
    if want and vae.model_id != want:
        raise ScoringError(
            f"split {path}: vae.npy was made by {vae.model_id!r}, the model decodes with {want!r}"
        )
    recorded, used = (pipe.config.get("vae") or {}).get("weights"), vae.details.get("weights")
    if recorded and used and recorded != used:
        raise ScoringError(f"split {path}: vae.npy made with VAE weights {used}, the model's are {recorded}")
    return member, "vae.npy"


def _read_split_shard(
    path: Path, entry: Any, image_member: str, members: tuple[str, str] | None, pipe: Any, with_images: bool
) -> TileBatch:
    file = path / entry.name
    if not file.is_file():
        raise ScoringError(f"shard {file} is missing (listed in {path}/manifest.json)")
    keys: list[str] = []
    labels: list[str | None] = []
    metas: list[dict[str, Any]] = []
    images: list[np.ndarray] = []
    own: list[np.ndarray] = []
    moments: list[np.ndarray] = []
    reader = None
    need_images = with_images or members is None
    for (key, raw), shard_reader in iter_shard_samples(file):
        reader = shard_reader
        m = dict(raw)
        meta = json.loads(m["json"]) if "json" in m else {}
        keys.append(key)
        labels.append(None if meta.get("label") is None else str(meta["label"]))
        metas.append({k: meta[k] for k in _IDENTITY if k in meta})
        if members is not None:
            emb_member, vae_member = members
            for member in members:
                if member.removesuffix(".npy") + ".npy" not in m:
                    raise ScoringError(f"{file}: sample {key!r} has no {member} member")
            own.append(load_npy(m[emb_member]).reshape(-1).astype(np.float32))
            mom = load_npy(m[vae_member]).astype(np.float32)
            moments.append(mom[0] if mom.ndim == 4 else mom)  # (2, C, h, w) moments → the posterior mean
        if need_images:
            if image_member not in m:
                raise ScoringError(f"{file}: sample {key!r} has no {image_member} image")
            images.append(decode_image(m[image_member]))
    if reader is not None and reader.sha.hexdigest() != entry.sha256:
        raise ScoringError(
            f"shard {file} does not match its sha256 in the manifest (changed since it was written)"
        )
    if len(keys) != entry.count:
        raise ScoringError(f"shard {file} holds {len(keys)} samples, the manifest says {entry.count}")
    batch = TileBatch(keys, labels, metas, images if need_images else None)
    if members is not None and keys:
        import torch

        mean = torch.from_numpy(np.stack(moments)).to(pipe.device)
        batch.latents = pipe.latent_norm.normalize(mean).float().cpu().numpy()
        batch.own = np.stack(own)
    return batch


def _split_source(path: Path, pipe: Any, manifest: SplitManifest) -> TileSource:
    members = _feature_members(path, manifest, pipe)
    units = []
    for entry in manifest.shards:
        stem = entry.name.removesuffix(".tar")

        def read(with_images: bool, _e: Any = entry) -> TileBatch:
            return _read_split_shard(path, _e, manifest.image_member, members, pipe, with_images)

        units.append(Unit(stem, entry.count, entry.sha256, read))
    labels = (manifest.stats or {}).get("tiles_per_label")
    return TileSource(
        path, "split", units, featurized=members is not None,
        details={"split": manifest.split, "samples": manifest.samples, "features": members, "tiles_per_label": labels},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------------


def _folder_files(path: Path) -> tuple[list[Path], bool]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ScoringError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no manifest.json")
    direct = [p for p in files if p.parent == path]
    nested = [p for p in files if p.parent != path]
    if direct and nested:
        raise ScoringError(
            f"{path} mixes images at its top level with images in subfolders; put every image in a class "
            f"subfolder (labelled) or all at the top level (unlabelled)"
        )
    return files, bool(nested)


def _folder_source(path: Path, tiles_per_unit: int) -> TileSource:
    from PIL import Image

    files, labelled = _folder_files(path)

    def read_block(block: list[Path], with_images: bool) -> TileBatch:
        keys, labels, metas, images = [], [], [], []
        for f in block:
            rel = f.relative_to(path)
            keys.append(_safe_key(str(rel.with_suffix(""))))
            labels.append(rel.parts[0] if labelled else None)
            metas.append({"file": str(rel)})
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB")))
        return TileBatch(keys, labels, metas, images)

    units = []
    for j, start in enumerate(range(0, len(files), tiles_per_unit)):
        block = files[start : start + tiles_per_unit]
        digest = _digest_files(block)
        units.append(Unit(f"folder-{j:06d}", len(block), digest, lambda w, _b=block: read_block(_b, w)))
    keys = [_safe_key(str(f.relative_to(path).with_suffix(""))) for f in files]
    if len(set(keys)) != len(keys):
        raise ScoringError(
            f"{path}: two files map to the same tile key (names differing only in . or suffix)"
        )
    return TileSource(
        path, "folder", units, featurized=False, details={"files": len(files), "labelled": labelled}
    )


def _digest_files(files: list[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(str(f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def open_source(path: str | Path, pipe: Any, tiles_per_unit: int = 256) -> TileSource:
    """The tiles at ``path`` (a split folder with ``manifest.json``, or an image folder)."""
    path = Path(path)
    if not path.exists():
        raise ScoringError(f"input {path} does not exist")
    if (path / "manifest.json").is_file():
        try:
            manifest = read_manifest(path)
        except ManifestError as err:
            raise ScoringError(str(err)) from None
        return _split_source(path, pipe, manifest)
    if path.is_dir():
        return _folder_source(path, tiles_per_unit)
    raise ScoringError(f"input {path} is neither a split folder (manifest.json) nor an image folder")


def encode_batch(pipe: Any, batch: TileBatch, need_own: bool, batch_size: int = 16) -> TileBatch:
    """Fill ``latents`` (and ``own`` when ``need_own``) of a batch from its images with the model's VAE and
    conditioning encoder; tiles must have the model's size."""
    if batch.latents is not None and (batch.own is not None or not need_own):
        return batch
    if not batch.images:
        return batch
    sizes = {im.shape[:2] for im in batch.images}
    px = pipe.tile_px
    if sizes != {(px, px)}:
        raise ScoringError(
            f"tiles of sizes {sorted(sizes)} but the model works on {px}×{px} px tiles (at {pipe.mpp} mpp); "
            f"resample them to the model's field of view first"
        )
    arr = np.stack(batch.images)
    if batch.latents is None:
        batch.latents = pipe.encode_latents(arr, batch_size=batch_size).numpy()
    if need_own and batch.own is None:
        batch.own = pipe.embed(arr, batch_size=batch_size).numpy()
    return batch
