"""Image sets for evaluation: uint8 RGB tiles in a deterministic order, with their provenance.

An image set is one of

- a **split folder** written by ``cytosyn pack`` (``manifest.json`` + webdataset shards): tiles in
  manifest shard order, then tar order; every shard read to its end is checked against the manifest's
  sha256;
- a **folder of image files** (``.png``, ``.jpg``/``.jpeg``, ``.webp``): sorted by relative path; a
  sidecar ``<name>.json`` next to an image is read as its metadata;
- a **list of tar shards**: in the order given, then tar order;
- **arrays in memory** (`ImageSet.from_arrays`), e.g. generated tiles that were never written.

Iterating yields `Tile` objects (key, H×W×3 uint8 array, JSON metadata or None, stored codec). The set
must be homogeneous: one image size, one stored PIL mode, one stored codec, one target mpp; anything
else raises `ImageSetError` naming the first offending tile. After a full (or ``limit``-ed) pass,
`ImageSet.provenance` says what was read: source, count, codec of the stored images (from the tile JSON
``codec`` field when present, else from the file itself — for JPEG the quality is recovered from the
quantisation tables when they are libjpeg's standard ones), tile size, field of view, and sha256 of the
ordered keys and of the decoded pixels.

Nothing here re-encodes an image unless asked: `apply_codec` (or `ImageSet.with_codec`) re-encodes in
memory with PIL for the JPEG study, with the exact settings recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, JpegImagePlugin, features

from cytosyn.manifest import read_manifest
from cytosyn.shardio import iter_shard_samples

__all__ = [
    "FILE_EXTENSIONS",
    "ImageSet",
    "ImageSetError",
    "Tile",
    "apply_codec",
    "codec_label",
    "codec_settings",
    "jpeg_quality_from_tables",
    "parse_codec",
]

#: File extensions read from a folder (lower-case), and the shard member names of an image.
FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_MEMBER_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_FORMAT_NAMES = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "MPO": "jpeg"}
_SUBSAMPLING_NAMES = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
_SUBSAMPLING_CODES = {v: k for k, v in _SUBSAMPLING_NAMES.items()}


class ImageSetError(ValueError):
    """An image set that cannot be read as one homogeneous set of RGB tiles."""


@dataclass(frozen=True)
class Tile:
    """One decoded tile: ``image`` is H×W×3 uint8 (RGB), ``codec`` the stored codec (canonical dict)."""

    key: str
    image: np.ndarray
    meta: dict[str, Any] | None
    codec: dict[str, Any]


# ------------------------------------------------------------------------------------------------ codecs
# libjpeg's base quantisation tables (ITU T.81 Annex K), natural (row-major) order.
_STD_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.int64,
)  # fmt: skip
_STD_CHROMA = np.full(64, 99, dtype=np.int64)
_STD_CHROMA[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 24, 25]] = [
    17,
    18,
    24,
    47,
    18,
    21,
    26,
    66,
    24,
    26,
    56,
    47,
    66,
]


def _scaled_table(base: np.ndarray, quality: int) -> np.ndarray:
    """libjpeg's ``jpeg_set_quality`` scaling with ``force_baseline`` (what PIL calls)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255)


_QUALITY_BY_TABLES: dict[tuple[bytes, bytes], int] = {}
for _q in range(100, 0, -1):  # first match wins; on ties (rare, coarse tables) keep the highest quality
    _QUALITY_BY_TABLES.setdefault(
        (_scaled_table(_STD_LUMA, _q).tobytes(), _scaled_table(_STD_CHROMA, _q).tobytes()), _q
    )


def jpeg_quality_from_tables(tables: Mapping[int, Sequence[int]]) -> int | None:
    """The libjpeg/PIL ``quality`` that produced these quantisation tables, or None if they are custom.

    ``tables`` is PIL's ``image.quantization`` (table id → 64 values; Pillow returns them in natural
    order). The match is exact against libjpeg's standard tables scaled for qualities 1–100, so a JPEG
    written by PIL, libjpeg(-turbo), OpenCV or most tools with a plain ``quality`` is identified; one
    with custom tables (Photoshop, camera firmware) returns None.
    """
    if 0 not in tables:
        return None
    luma = np.asarray(tables[0], dtype=np.int64).tobytes()
    chroma = np.asarray(tables.get(1, tables[0]), dtype=np.int64).tobytes()
    return _QUALITY_BY_TABLES.get((luma, chroma))


def _canonical_codec(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Settings that decide the pixels: format, lossless, and for JPEG quality and chroma subsampling."""
    fmt = str(raw.get("format", "?")).lower()
    fmt = "jpeg" if fmt in ("jpg", "jpeg") else fmt
    out: dict[str, Any] = {"format": fmt}
    if fmt == "jpeg":
        out["lossless"] = False
        out["quality"] = raw.get("quality")
        out["subsampling"] = raw.get("subsampling")
        if raw.get("qtables_sha256"):
            out["qtables_sha256"] = raw["qtables_sha256"]
    else:
        out["lossless"] = bool(raw.get("lossless", fmt == "png"))
    return out


def codec_label(codec: Mapping[str, Any]) -> str:
    """A short name for a canonical codec: ``png``, ``webp-lossless``, ``jpeg-q90-4:4:4``, ``jpeg-q?-4:2:0``.

    A re-encoded set (``applied`` present) reads ``<stored>+<applied>``, e.g. ``png+jpeg-q50-4:2:0``.
    """
    fmt = codec.get("format", "?")
    if fmt == "jpeg":
        q = codec.get("quality")
        if q is None and codec.get("qtables_sha256"):
            quality = f"qtables-{str(codec['qtables_sha256'])[:8]}"
        else:
            quality = f"q{q if q is not None else '?'}"
        label = f"jpeg-{quality}-{codec.get('subsampling') or '?'}"
    elif fmt == "webp":
        label = "webp-lossless" if codec.get("lossless") else "webp-lossy"
    else:
        label = str(fmt)
    applied = codec.get("applied")
    if applied:
        label += "+" + codec_label(applied)
    return label


def parse_codec(codec: str | Mapping[str, Any]) -> dict[str, Any] | None:
    """A codec request → canonical settings; ``"lossless"`` (no re-encoding) → None.

    Accepted: ``"lossless"``, ``{"jpeg": 75}``, ``{"jpeg": 75, "subsampling": "4:4:4"}``,
    ``{"format": "jpeg", "quality": 75}``, ``"jpeg-q75"``/``"q75"``.
    """
    if isinstance(codec, str):
        text = codec.strip().lower()
        if text in ("lossless", "none", ""):
            return None
        for prefix in ("jpeg-q", "jpg-q", "q"):
            if text.startswith(prefix) and text[len(prefix) :].isdigit():
                return parse_codec({"jpeg": int(text[len(prefix) :])})
        raise ValueError(f"unknown codec {codec!r}: use 'lossless' or {{'jpeg': quality}}")
    if not isinstance(codec, Mapping):
        raise TypeError(f"codec must be 'lossless' or a mapping like {{'jpeg': 75}}, got {codec!r}")
    spec = dict(codec)
    if "jpeg" in spec:
        quality = spec.pop("jpeg")
    elif spec.get("format") in ("jpeg", "jpg"):
        spec.pop("format")
        quality = spec.pop("quality", None)
        if spec.pop("lossless", False):
            raise ValueError(f"JPEG is never lossless: {codec!r}")
    else:
        raise ValueError(f"unknown codec {codec!r}: only JPEG re-encoding is supported ({{'jpeg': quality}})")
    subsampling = spec.pop("subsampling", "4:2:0")
    if spec:
        raise ValueError(f"unknown codec settings {sorted(spec)} in {codec!r}")
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    if subsampling not in _SUBSAMPLING_CODES:
        raise ValueError(f"JPEG subsampling must be one of {sorted(_SUBSAMPLING_CODES)}, got {subsampling!r}")
    return {"format": "jpeg", "lossless": False, "quality": quality, "subsampling": subsampling}


def codec_settings(codec: str | Mapping[str, Any]) -> dict[str, Any]:
    """What a report records about a requested codec: settings plus the encoder library and versions."""
    parsed = parse_codec(codec)
    if parsed is None:
        return {"format": "lossless", "reencoded": False}
    return parsed | {
        "reencoded": True,
        "optimize": False,
        "progressive": False,
        "library": "Pillow",
        "version": PIL.__version__,
        "libjpeg": features.version("jpg"),
    }


def apply_codec(images: np.ndarray, codec: str | Mapping[str, Any]) -> np.ndarray:
    """Re-encode uint8 RGB images (N×H×W×3 or H×W×3) in memory and decode them back.

    ``"lossless"`` returns ``images`` itself (no copy, no re-encoding). ``{"jpeg": q}`` saves every image
    with PIL as baseline JPEG at quality ``q`` with 4:2:0 chroma subsampling (PIL's default; override with
    ``{"jpeg": q, "subsampling": "4:4:4"}``), no optimisation, then decodes with PIL. The settings are
    those of `codec_settings`.
    """
    parsed = parse_codec(codec)
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.shape[-1:] != (3,) or arr.ndim not in (3, 4):
        raise TypeError(f"images must be uint8 H×W×3 or N×H×W×3, got {arr.dtype} {arr.shape}")
    if parsed is None:
        return images
    single = arr.ndim == 3
    batch = arr[None] if single else arr
    out = np.empty_like(batch)
    for i, image in enumerate(batch):
        buf = io.BytesIO()
        Image.fromarray(image).save(
            buf,
            format="JPEG",
            quality=parsed["quality"],
            subsampling=_SUBSAMPLING_CODES[parsed["subsampling"]],
            optimize=False,
            progressive=False,
        )
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out[0] if single else out


def _webp_lossless(data: bytes) -> bool | None:
    """Whether a WebP file holds a lossless (VP8L) bitstream; None if it cannot be told."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    pos = 12
    while pos + 8 <= len(data):
        tag = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if tag == b"VP8L":
            return True
        if tag == b"VP8 ":
            return False
        pos += 8 + size + (size & 1)
    return None


def _codec_from_file(im: Image.Image, data: bytes) -> dict[str, Any]:
    fmt = _FORMAT_NAMES.get(im.format or "", (im.format or "?").lower())
    if fmt == "jpeg":
        tables = getattr(im, "quantization", None) or {}
        quality = jpeg_quality_from_tables(tables)
        raw: dict[str, Any] = {
            "format": "jpeg",
            "quality": quality,
            "subsampling": _SUBSAMPLING_NAMES.get(JpegImagePlugin.get_sampling(im)),
        }
        if quality is None and tables:
            digest = hashlib.sha256()
            for tid in sorted(tables):
                digest.update(np.asarray(tables[tid], dtype=np.int64).tobytes())
            raw["qtables_sha256"] = digest.hexdigest()
        return _canonical_codec(raw)
    if fmt == "webp":
        return _canonical_codec({"format": "webp", "lossless": _webp_lossless(data)})
    return _canonical_codec({"format": fmt, "lossless": fmt == "png"})


# --------------------------------------------------------------------------------------------- raw items
@dataclass(frozen=True)
class _Raw:
    key: str
    data: bytes | np.ndarray  # encoded bytes, or an already decoded H×W×3 uint8 array
    meta: dict[str, Any] | None
    where: str  # for error messages


def _parse_json(blob: bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ImageSetError(f"{where}: unreadable JSON metadata: {err}") from None
    if not isinstance(meta, dict):
        raise ImageSetError(f"{where}: JSON metadata must be an object, got {type(meta).__name__}")
    return meta


def _sample_item(key: str, members: list[tuple[str, bytes]], shard: Path, image_member: str | None) -> _Raw:
    found = dict(members)
    where = f"{shard}:{key}"
    if image_member is not None:
        if image_member not in found:
            raise ImageSetError(f"{where}: no {image_member!r} image member (members: {sorted(found)})")
        data = found[image_member]
    else:
        present = [m for m in _MEMBER_EXTENSIONS if m in found]
        if len(present) != 1:
            raise ImageSetError(
                f"{where}: expected exactly one image member among {_MEMBER_EXTENSIONS}, found {present or 'none'}"
            )
        data = found[present[0]]
    meta = _parse_json(found["json"], where) if "json" in found else None
    return _Raw(key, data, meta, where)


# ------------------------------------------------------------------------------------------------- sets
class ImageSet:
    """A re-iterable, ordered set of RGB uint8 tiles with provenance (see the module docstring).

    Build one with `from_split`, `from_folder`, `from_shards`, `from_arrays` or `open` (which guesses).
    ``limit`` keeps the first ``limit`` tiles. ``mpp`` states the microns per pixel of tiles that carry
    no metadata (generated tiles): it is recorded, and checked against tile JSON when both exist.
    """

    def __init__(
        self,
        kind: str,
        source: Any,
        raw_items: Any,  # a callable returning an iterator of _Raw
        *,
        limit: int | None = None,
        mpp: float | None = None,
        name: str | None = None,
        extra: Mapping[str, Any] | None = None,
        applied: dict[str, Any] | None = None,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        self.kind = kind
        self.source = source
        self._raw_items = raw_items
        self.limit = limit
        self.mpp = mpp
        self.name = name or (
            Path(str(source)).name if not isinstance(source, list) else f"{len(source)} shards"
        )
        self._extra = dict(extra or {})
        self._applied = applied  # canonical JPEG settings when re-encoded in memory (with_codec)
        self._provenance: dict[str, Any] | None = None

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_split(
        cls, folder: str | Path, *, limit: int | None = None, mpp: float | None = None
    ) -> ImageSet:
        """A split folder with ``manifest.json`` (from ``cytosyn pack``)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        entries = list(manifest.shards)
        member = manifest.image_member

        def items() -> Iterator[_Raw]:
            # A shard is verified once read to its end (a limit that stops inside it skips the check).
            for entry in entries:
                path = folder / entry.name
                last = None
                count = 0
                for (key, members), reader in iter_shard_samples(path):
                    count += 1
                    last = reader
                    yield _sample_item(key, members, path, member)
                if last is not None and last.sha.hexdigest() != entry.sha256:
                    raise ImageSetError(
                        f"{path}: sha256 {last.sha.hexdigest()} differs from the manifest's {entry.sha256}; "
                        "the shard changed after packing"
                    )
                if count != entry.count:
                    raise ImageSetError(f"{path}: holds {count} samples, the manifest says {entry.count}")

        extra = {
            "split": manifest.split,
            "manifest_samples": manifest.samples,
            "image_member": member,
            "shards": [e.name for e in entries],
        }
        return cls("split", str(folder), items, limit=limit, mpp=mpp, name=manifest.split, extra=extra)

    @classmethod
    def from_shards(
        cls, shards: Sequence[str | Path], *, limit: int | None = None, mpp: float | None = None
    ) -> ImageSet:
        """Webdataset tar shards, read in the order given."""
        paths = [Path(p) for p in shards]
        if not paths:
            raise ImageSetError("no shards given")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ImageSetError(f"shards not found: {missing[:5]}")

        def items() -> Iterator[_Raw]:
            for path in paths:
                for (key, members), _ in iter_shard_samples(path):
                    yield _sample_item(key, members, path, None)

        return cls("shards", [str(p) for p in paths], items, limit=limit, mpp=mpp)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        limit: int | None = None,
        mpp: float | None = None,
        recursive: bool = False,
    ) -> ImageSet:
        """A folder of ``.png``/``.jpg``/``.jpeg``/``.webp`` files, sorted by relative path.

        The key is the relative path without its extension; ``<name>.json`` beside a file is its metadata.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ImageSetError(f"{folder} is not a folder")
        pattern = "**/*" if recursive else "*"
        files = sorted(
            (p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in FILE_EXTENSIONS),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
        if not files:
            raise ImageSetError(f"no image files ({', '.join(FILE_EXTENSIONS)}) in {folder}")
        keys = [p.relative_to(folder).with_suffix("").as_posix() for p in files]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ImageSetError(f"{folder}: two files share the name {dup!r} with different extensions")

        def items() -> Iterator[_Raw]:
            for path, key in zip(files, keys):
                sidecar = path.with_suffix(".json")
                meta = _parse_json(sidecar.read_bytes(), str(sidecar)) if sidecar.is_file() else None
                yield _Raw(key, path.read_bytes(), meta, str(path))

        return cls("folder", str(folder), items, limit=limit, mpp=mpp, extra={"files": len(files)})

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray | Sequence[np.ndarray],
        *,
        keys: Sequence[str] | None = None,
        codec: Mapping[str, Any] | None = None,
        metas: Sequence[dict[str, Any] | None] | None = None,
        mpp: float | None = None,
        name: str = "arrays",
        limit: int | None = None,
    ) -> ImageSet:
        """Decoded tiles held in memory. ``codec`` is what they were decoded from (default: never encoded,
        recorded as ``{"format": "raw", "lossless": True}``)."""
        arrays = list(images)
        if keys is None:
            keys = [f"{i:08d}" for i in range(len(arrays))]
        if len(keys) != len(arrays) or (metas is not None and len(metas) != len(arrays)):
            raise ValueError("keys and metas must have one entry per image")
        stored = _canonical_codec(codec) if codec is not None else {"format": "raw", "lossless": True}

        def items() -> Iterator[_Raw]:
            for i, (key, image) in enumerate(zip(keys, arrays)):
                meta = dict(metas[i]) if metas is not None and metas[i] is not None else None
                if meta is not None:
                    meta.setdefault("codec", stored)
                else:
                    meta = {"codec": stored}
                yield _Raw(str(key), np.asarray(image), meta, f"{name}[{i}]")

        return cls("arrays", name, items, limit=limit, mpp=mpp, name=name)

    @classmethod
    def open(cls, source: str | Path | Sequence[str | Path], **kwargs: Any) -> ImageSet:
        """Guess the kind: a folder with ``manifest.json`` → split; a folder → image files; tar path(s) → shards."""
        if isinstance(source, (list, tuple)):
            return cls.from_shards(source, **kwargs)
        path = Path(source)
        if path.is_dir() and (path / "manifest.json").is_file():
            return cls.from_split(path, **kwargs)
        if path.is_dir():
            return cls.from_folder(path, **kwargs)
        if path.is_file() and path.suffix == ".tar":
            return cls.from_shards([path], **kwargs)
        raise ImageSetError(f"{source}: not a split folder, an image folder or a .tar shard")

    def with_codec(self, codec: str | Mapping[str, Any]) -> ImageSet:
        """This set seen through an in-memory re-encoding (``"lossless"`` → the same set)."""
        parsed = parse_codec(codec)
        if parsed is None:
            return self
        if self._applied is not None:
            raise ImageSetError(f"set {self.name!r} is already re-encoded ({codec_label(self._applied)})")
        view = ImageSet(
            self.kind,
            self.source,
            self._raw_items,
            limit=self.limit,
            mpp=self.mpp,
            name=self.name,
            extra=self._extra,
            applied=parsed,
        )
        return view

    # ---------------------------------------------------------------- reading
    def raw_items(self) -> Iterator[tuple[str, bytes | np.ndarray, dict[str, Any] | None]]:
        """(key, stored bytes or array, metadata) in set order, up to ``limit``; nothing decoded."""
        for i, item in enumerate(self._raw_items()):
            if self.limit is not None and i >= self.limit:
                return
            yield item.key, item.data, item.meta

    def __iter__(self) -> Iterator[Tile]:
        tracker = _Tracker(self)
        for i, item in enumerate(self._raw_items()):
            if self.limit is not None and i >= self.limit:
                break
            tile = _decode(item)
            if self._applied is not None:
                tile = Tile(tile.key, apply_codec(tile.image, self._applied), tile.meta, tile.codec)
            tracker.add(item, tile)
            yield tile
        self._provenance = tracker.finish()

    def batches(self, batch_size: int) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, Any] | None]]]:
        """(keys, B×H×W×3 uint8 array, metadata list) in set order; the last batch may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        keys: list[str] = []
        images: list[np.ndarray] = []
        metas: list[dict[str, Any] | None] = []
        for tile in self:
            keys.append(tile.key)
            images.append(tile.image)
            metas.append(tile.meta)
            if len(keys) == batch_size:
                yield keys, np.stack(images), metas
                keys, images, metas = [], [], []
        if keys:
            yield keys, np.stack(images), metas

    @property
    def provenance(self) -> dict[str, Any]:
        """What the last complete pass read (runs a pass first if there has been none)."""
        if self._provenance is None:
            for _ in self:
                pass
        assert self._provenance is not None
        return dict(self._provenance)

    def __repr__(self) -> str:
        return f"ImageSet(kind={self.kind!r}, source={self.source!r}, limit={self.limit})"


def _decode(item: _Raw) -> Tile:
    meta = item.meta
    if isinstance(item.data, np.ndarray):
        image = item.data
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageSetError(f"{item.where}: arrays must be H×W×3 uint8, got {image.dtype} {image.shape}")
        codec = _canonical_codec((meta or {}).get("codec") or {"format": "raw", "lossless": True})
        return Tile(item.key, image, meta, codec | {"mode": "RGB"})
    try:
        with Image.open(io.BytesIO(item.data)) as im:
            im.load()
            mode = im.mode
            file_codec = _codec_from_file(im, item.data)
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                alpha = np.asarray(im.convert("RGBA"))[..., 3]
                if (alpha < 255).any():
                    raise ImageSetError(
                        f"{item.where}: image has transparent pixels (mode {mode}); evaluation needs opaque RGB"
                    )
            image = np.asarray(im.convert("RGB") if mode != "RGB" else im)
    except ImageSetError:
        raise
    except Exception as err:  # PIL raises many types for corrupt data
        raise ImageSetError(f"{item.where}: cannot decode image: {err}") from None
    if meta is not None and isinstance(meta.get("codec"), Mapping):
        stored = _canonical_codec(meta["codec"])
        if stored["format"] != file_codec["format"]:
            raise ImageSetError(
                f"{item.where}: tile JSON says codec {stored['format']!r} but the bytes are {file_codec['format']!r}"
            )
        if stored["format"] == "jpeg" and file_codec.get("quality") not in (None, stored.get("quality")):
            raise ImageSetError(
                f"{item.where}: tile JSON says JPEG quality {stored.get('quality')} but the quantisation "
                f"tables are those of quality {file_codec['quality']}"
            )
        codec = stored | {"codec_source": "tile-json"}
    else:
        codec = file_codec | {"codec_source": "file"}
    return Tile(item.key, image, meta, codec | {"mode": mode})


class _Tracker:
    """Checks a set's homogeneity while it is read and builds its provenance."""

    def __init__(self, image_set: ImageSet) -> None:
        self.set = image_set
        self.count = 0
        self.first: tuple[str, tuple[int, ...], str, str] | None = None  # key, shape, mode, codec label
        self.codec: dict[str, Any] | None = None
        self.keys = hashlib.sha256()
        self.pixels = hashlib.sha256()
        self.target_mpp: float | None = None
        self.eff_mpp_sum = 0.0
        self.eff_mpp_n = 0
        self.meta_count = 0

    def add(self, item: _Raw, tile: Tile) -> None:
        codec = {k: v for k, v in tile.codec.items() if k not in ("mode", "codec_source")}
        label = codec_label(codec)
        shape, mode = tile.image.shape, tile.codec["mode"]
        if self.first is None:
            self.first = (tile.key, shape, mode, label)
            self.codec = tile.codec
        else:
            key0, shape0, mode0, label0 = self.first
            for what, a, b in (("size", shape0, shape), ("mode", mode0, mode), ("codec", label0, label)):
                if a != b:
                    fmt = (lambda s: f"{s[1]}×{s[0]}") if what == "size" else str
                    raise ImageSetError(
                        f"image set {self.set.name!r} mixes tile {what}s: {item.where} is {fmt(b)} but the first "
                        f"tile {key0!r} is {fmt(a)}; an evaluation set must be homogeneous "
                        "(split it, or convert it explicitly)"
                    )
        self.count += 1
        self.keys.update(tile.key.encode() + b"\n")
        self.pixels.update(np.ascontiguousarray(tile.image).tobytes())
        meta = tile.meta
        if meta is not None and ("mpp" in meta or "effective_mpp" in meta):
            self.meta_count += 1
            if "mpp" in meta:
                mpp = float(meta["mpp"])
                if self.target_mpp is None:
                    self.target_mpp = mpp
                elif abs(mpp - self.target_mpp) > 1e-9:
                    raise ImageSetError(
                        f"image set {self.set.name!r} mixes fields of view: {item.where} has mpp {mpp}, "
                        f"earlier tiles {self.target_mpp}"
                    )
            eff = meta.get("effective_mpp")
            if isinstance(eff, (list, tuple)) and eff:
                self.eff_mpp_sum += float(np.mean(eff))
                self.eff_mpp_n += 1

    def finish(self) -> dict[str, Any]:
        s = self.set
        if self.count == 0 or self.first is None or self.codec is None:
            raise ImageSetError(f"image set {s.name!r} ({s.source}) holds no tiles")
        _, shape, mode, label = self.first
        h, w = int(shape[0]), int(shape[1])
        mpp = self.target_mpp
        if s.mpp is not None:
            if mpp is not None and abs(mpp - s.mpp) > 1e-9:
                raise ImageSetError(
                    f"image set {s.name!r}: mpp={s.mpp} given, but the tiles' JSON says {mpp}"
                )
            mpp = float(s.mpp)
        stored = {k: v for k, v in self.codec.items() if k not in ("mode", "codec_source")}
        codec = dict(stored)
        if s._applied is not None:
            codec["applied"] = dict(s._applied)
        prov: dict[str, Any] = {
            "name": s.name,
            "kind": s.kind,
            "source": s.source,
            "count": self.count,
            "limit": s.limit,
            "tile_px": h if h == w else None,
            "image_size": [w, h],
            "stored_mode": mode,
            "stored_codec": stored,
            "stored_codec_label": label,
            "codec_source": self.codec.get("codec_source", "arrays"),
            "applied_codec": codec_settings(s._applied) if s._applied is not None else None,
            "codec": codec,
            "codec_label": codec_label(codec),
            "mpp": mpp,
            "mpp_source": "tile-json"
            if self.target_mpp is not None
            else ("given" if s.mpp is not None else None),
            "effective_mpp": round(self.eff_mpp_sum / self.eff_mpp_n, 6) if self.eff_mpp_n else None,
            "fov_um": round(mpp * h, 3) if mpp is not None and h == w else None,
            "tiles_with_metadata": self.meta_count,
            "keys_sha256": self.keys.hexdigest(),
            "pixels_sha256": self.pixels.hexdigest(),
        }
        prov.update(s._extra)
        return prov
