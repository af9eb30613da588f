"""The file contracts between stages (see docs/formats.md), in one place every stage imports.

Per-slide tile shards (output of ``cytosyn tile``)::

    <output>/slides/<slide_id>/<slide_id>-b<band>-<index>.tar   webdataset shards
    <output>/slides/<slide_id>/state.json                      status, shards (count, bytes, sha256), config hash
    <output>/slides/<slide_id>/overview.png                    optional: tissue mask and kept tiles

Each sample has ``__key__`` (no dots), one image member (``jpg``, ``png`` or ``webp``) and a ``json``
member whose fields are listed in :data:`TILE_META_FIELDS`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SLIDES_DIR = "slides"
SLIDE_STATE_FILE = "state.json"
OVERVIEW_FILE = "overview.png"
INCOMPLETE_DIR = ".incomplete"
IMAGE_EXTENSIONS = ("jpg", "png", "webp")

# Fields every tile's JSON carries; enough to re-read the exact region from the slide.
TILE_META_FIELDS = (
    "slide_id",
    "patient_id",
    "tss",
    "project",
    "identity_source",
    "x",  # level-0 pixel of the tile's top-left corner
    "y",
    "level",  # pyramid level read
    "downsample",  # that level's downsample as OpenSlide reports it
    "level_size",  # [w, h] pixels read at `level`
    "read_size",  # [w, h] level-0 pixels covered
    "source_mpp",  # [x, y] level-0 microns per pixel of the slide
    "mpp_source",  # where source_mpp came from ("openslide.mpp-x", "override", ...)
    "mpp",  # target microns per pixel of the tile
    "effective_mpp",  # [x, y] read_size * source_mpp / tile_px, what the tile really is
    "tile_px",
    "resample",  # "none", "box" (area) or "bicubic" (upsampling)
    "tissue_fraction",
    "codec",  # {"format", exact settings, "library", "version", codec library versions}
)

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def _escape(match: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in match.group(0).encode("utf-8"))


def key_safe(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9_-]`` percent-encoded (UTF-8 bytes, ``%2E``).

    Injective — two different ids never give the same key part, unlike replacing them all by ``_``
    (``S.1`` and ``S_1`` used to collide) — and the identity on ids that are already safe, so the keys
    of ordinary (TCGA) slides are unchanged. No dot (webdataset splits keys at the first dot), no slash.
    """
    return _KEY_UNSAFE.sub(_escape, text)


def tile_key(slide_id: str, x: int, y: int) -> str:
    """A webdataset key for a tile: ``<slide id, percent-encoded where unsafe>__x<X>_y<Y>``."""
    return f"{key_safe(slide_id)}__x{x}_y{y}"


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, compact) so equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def missing_tile_fields(meta: dict[str, Any]) -> list[str]:
    """Fields of :data:`TILE_META_FIELDS` that a tile's JSON lacks."""
    return [name for name in TILE_META_FIELDS if name not in meta]


def slide_dir(output: Path, slide_id: str) -> Path:
    return Path(output) / SLIDES_DIR / slide_id


def iter_slide_states(output: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (slide folder, parsed state.json) for every slide folder under a tiling output."""
    root = Path(output) / SLIDES_DIR
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        state_path = folder / SLIDE_STATE_FILE
        if state_path.is_file():
            yield folder, json.loads(state_path.read_text())
