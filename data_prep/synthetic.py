"""Synthetic pyramidal whole-slide images that OpenSlide can open.

Why this exists: the whole-slide tiler and its benchmark need slides whose content is known exactly
(shapes at known physical positions, a known background, known level geometry) without shipping
multi-gigabyte fixtures.  This module writes such slides procedurally, tile by tile, so memory stays
bounded by a few tiles no matter how large the slide is.

Sampling rule (the contract tests rely on)
------------------------------------------
Every level is painted from the same procedural scene defined in *level-0 pixel coordinates* (a
continuous plane; level-0 pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``).  Pixel ``(i, j)``
(row ``i``, column ``j``) of a level with nominal downsample ``ds`` takes the colour of the scene at
the level-0 point::

    (sx, sy) = ((j + 0.5) * ds, (i + 0.5) * ds)

i.e. the centre of the ``ds x ds`` level-0 block it represents.  Levels are point-sampled, not
box-filtered, so a shape edge is hard at every level.  The scene is painted in this order:

1. ``background`` everywhere;
2. each ``tissue`` shape, in order, with its colour where it covers the sample point; afterwards every
   pixel covered by any tissue shape gets a mild luminance texture (same offset on R, G and B,
   constant over 4x4-pixel blocks of the level, drawn from a generator seeded with
   ``(seed, level_index, tile_row, tile_col)``, so reruns are byte-identical);
3. each entry of ``shapes``, in order, flat colour, no texture.

Coverage: a ``rect`` covers a sample point when ``x <= sx < x + w`` and ``y <= sy < y + h``
(half-open, so an integer-aligned rect at level 0 covers exactly columns ``x .. x+w-1`` and rows
``y .. y+h-1``); a ``disk`` covers it when ``(sx - x)**2 + (sy - y)**2 < (w / 2)**2``.

Level geometry: level ``k`` with nominal downsample ``ds`` is ``ceil(width / ds) x ceil(height / ds)``
pixels.  OpenSlide does not store downsamples; it derives them as the mean of
``width / level_width`` and ``height / level_height``, so it reports exactly ``ds`` when ``ds`` divides
both dimensions and slightly less otherwise.  Content is always sampled at the nominal ``ds``.  Tiles
on the right/bottom edge are rendered in full by the same rule (the scene extends past the slide);
readers clip them to the level size.

With ``compression`` ``"none"`` or ``"zlib"`` the stored pixels are exactly what this rule gives
(see :func:`render_tile`); ``"jpeg"`` is lossy (YCbCr 4:2:0, as most scanners write).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile

__all__ = [
    "APERIO_LIBRARY",
    "Shape",
    "default_tissue",
    "level_dimensions",
    "render_tile",
    "write_synthetic_slide",
]

#: Prefix that OpenSlide's aperio driver looks for in the first page's ImageDescription.
APERIO_LIBRARY = "Aperio Image Library v12.0.0"

#: Amplitude (in 8-bit levels, +/-) of the luminance texture on tissue.
_TEXTURE_AMPLITUDE = 10
#: Texture is constant over blocks of this many level pixels (cheaper to draw, compresses better).
_TEXTURE_BLOCK = 4
#: Above this many raw level bytes the file is written as BigTIFF (classic TIFF offsets are 32-bit).
_BIGTIFF_THRESHOLD = 3 * 2**30

# Haematoxylin/eosin-like colours for default tissue: eosin pinks and haematoxylin purples.
_HE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (234, 160, 196),
    (222, 138, 182),
    (241, 186, 214),
    (168, 104, 176),
    (142, 84, 160),
    (196, 128, 188),
)


@dataclass(frozen=True)
class Shape:
    """A flat-coloured shape drawn on top of everything, in level-0 pixel coordinates.

    Coordinates are floats in the continuous level-0 plane so that shapes can be placed at sub-pixel
    (physical) positions; which pixels a shape covers at each level follows the sampling rule in the
    module docstring (rect: half-open box test; disk: strict circle test on the sample point).
    """

    kind: Literal["rect", "disk"]
    x: float  # rect: left edge; disk: centre x   (level-0 px)
    y: float  # rect: top edge;  disk: centre y
    w: float  # rect: width; disk: diameter
    h: float  # rect: height; disk: ignored (use w)
    color: tuple[int, int, int]

    def __post_init__(self) -> None:
        # Validate eagerly: a bad shape would otherwise surface as a confusing numpy error mid-write.
        if self.kind not in ("rect", "disk"):
            raise ValueError(f"Shape.kind must be 'rect' or 'disk', got {self.kind!r}")
        if self.w < 0 or (self.kind == "rect" and self.h < 0):
            raise ValueError(f"Shape size must be non-negative, got w={self.w}, h={self.h}")
        if len(self.color) != 3 or not all(0 <= int(c) <= 255 for c in self.color):
            raise ValueError(f"Shape.color must be three ints in 0..255, got {self.color!r}")

    def bbox(self) -> tuple[float, float, float, float]:
        """Level-0 bounding box ``(x0, y0, x1, y1)``; used to skip tiles the shape cannot touch."""
        if self.kind == "rect":
            return (self.x, self.y, self.x + self.w, self.y + self.h)
        r = self.w / 2.0
        return (self.x - r, self.y - r, self.x + r, self.y + r)

    def coverage(self, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
        """Boolean mask ``(len(sy), len(sx))`` of the sample points this shape covers.

        ``sx``/``sy`` are 1-D arrays of level-0 sample coordinates of a tile's columns/rows.  The tests
        are done in float64 on values that are exact (half-integers times integer downsamples), so the
        edges are exact, not subject to rounding.
        """
        if self.kind == "rect":
            inside_x = (sx >= self.x) & (sx < self.x + self.w)
            inside_y = (sy >= self.y) & (sy < self.y + self.h)
            return inside_y[:, None] & inside_x[None, :]
        r = self.w / 2.0
        dx2 = (sx - self.x) ** 2
        dy2 = (sy - self.y) ** 2
        return (dy2[:, None] + dx2[None, :]) < r * r


def default_tissue(width: int, height: int, seed: int = 0) -> list[Shape]:
    """A few deterministic H&E-coloured disks (pink/purple) covering roughly 20-40% of the slide area.

    Why: tilers need something that looks like tissue (for tissue detection / background rejection)
    but whose extent is known.  The slide is split into a grid of about six near-square cells and each
    cell gets one disk that stays inside its cell, so disks never overlap and never leave the slide;
    the area fraction is therefore the plain sum of disk areas (targeted at 25-35%).  Depends only on
    ``(width, height, seed)``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    rng = np.random.default_rng([int(seed), 0x7155])
    n_target = 6
    rows = max(1, round(math.sqrt(n_target * height / width)))
    cols = max(1, round(n_target / rows))
    cell_w = width / cols
    cell_h = height / rows
    cell_min = min(cell_w, cell_h)
    target = float(rng.uniform(0.25, 0.35))
    # Diameter fraction f (of the cell's short side) such that rows*cols disks cover `target`:
    # rows*cols * pi/4 * (f*cell_min)^2 = target * width * height.
    f0 = math.sqrt(4.0 * target * cell_w * cell_h / (math.pi * cell_min * cell_min))
    shapes: list[Shape] = []
    for r in range(rows):
        for c in range(cols):
            f = min(0.95, f0 * float(rng.uniform(0.92, 1.08)))
            d = f * cell_min
            cx = c * cell_w + d / 2 + float(rng.uniform(0.0, 1.0)) * (cell_w - d)
            cy = r * cell_h + d / 2 + float(rng.uniform(0.0, 1.0)) * (cell_h - d)
            colour = _HE_COLOURS[int(rng.integers(len(_HE_COLOURS)))]
            shapes.append(Shape("disk", cx, cy, d, d, colour))
    return shapes


def level_dimensions(
    width: int, height: int, downsamples: Sequence[int], tile_size: int = 256
) -> list[tuple[int, int, int]]:
    """The levels actually written, as ``(downsample, level_width, level_height)``.

    Level size is ``ceil(width / ds) x ceil(height / ds)`` (ceil so no level-0 pixel is lost).  A level
    other than level 0 is dropped when it is smaller than one tile in both directions (it would be a
    single, mostly padded tile that adds nothing to a pyramid).  Exposed so callers and tests can
    predict the pyramid without writing a file.
    """
    _check_downsamples(downsamples)
    levels: list[tuple[int, int, int]] = []
    for ds in downsamples:
        lw, lh = -(-width // ds), -(-height // ds)
        if ds != 1 and lw < tile_size and lh < tile_size:
            continue
        levels.append((int(ds), lw, lh))
    return levels


def render_tile(
    *,
    level_index: int,
    downsample: int,
    tile_row: int,
    tile_col: int,
    tile_size: int = 256,
    background: tuple[int, int, int] = (255, 255, 255),
    tissue: Sequence[Shape] = (),
    shapes: Sequence[Shape] = (),
    seed: int = 0,
) -> np.ndarray:
    """Render one full ``tile_size x tile_size`` RGB uint8 tile of a level by the sampling rule.

    This is the single source of truth for pixel content: the writer calls it for every tile, and
    tests call it to get the exact expected pixels.  ``level_index`` only seeds the texture (it is the
    index among the levels actually written, see :func:`level_dimensions`).
    """
    ds = float(downsample)
    sx = (np.arange(tile_size, dtype=np.float64) + (tile_col * tile_size + 0.5)) * ds
    sy = (np.arange(tile_size, dtype=np.float64) + (tile_row * tile_size + 0.5)) * ds
    # Extent of the sample points, for culling shapes that cannot touch this tile.
    x_lo, x_hi, y_lo, y_hi = sx[0], sx[-1], sy[0], sy[-1]

    def touches(s: Shape) -> bool:
        bx0, by0, bx1, by1 = s.bbox()
        return bx1 >= x_lo and bx0 <= x_hi and by1 >= y_lo and by0 <= y_hi

    tile = np.empty((tile_size, tile_size, 3), dtype=np.uint8)
    tile[...] = np.asarray(background, dtype=np.uint8)

    tissue_hit = [s for s in tissue if touches(s)]
    if tissue_hit:
        union = np.zeros((tile_size, tile_size), dtype=bool)
        for s in tissue_hit:
            m = s.coverage(sx, sy)
            if m.any():
                tile[m] = s.color
                union |= m
        if union.any():
            _add_texture(
                tile, union, seed=seed, level_index=level_index, tile_row=tile_row, tile_col=tile_col
            )

    for s in shapes:
        if touches(s):
            m = s.coverage(sx, sy)
            if m.any():
                tile[m] = s.color
    return tile


def _add_texture(
    tile: np.ndarray, mask: np.ndarray, *, seed: int, level_index: int, tile_row: int, tile_col: int
) -> None:
    """Add the deterministic luminance texture to ``tile`` where ``mask`` is set (in place).

    Seeded from (seed, level, tile position) rather than a global stream so that any tile can be
    rendered independently (and in any order) and still be byte-identical across runs.
    """
    n = tile.shape[0]
    nb = -(-n // _TEXTURE_BLOCK)
    rng = np.random.default_rng([int(seed), int(level_index), int(tile_row), int(tile_col)])
    blocks = rng.integers(-_TEXTURE_AMPLITUDE, _TEXTURE_AMPLITUDE + 1, size=(nb, nb), dtype=np.int16)
    noise = np.repeat(np.repeat(blocks, _TEXTURE_BLOCK, axis=0), _TEXTURE_BLOCK, axis=1)[:n, :n]
    vals = tile[mask].astype(np.int16) + noise[mask][:, None]
    tile[mask] = np.clip(vals, 0, 255).astype(np.uint8)


def _check_downsamples(downsamples: Sequence[int]) -> None:
    ds = list(downsamples)
    if not ds or ds[0] != 1:
        raise ValueError(f"downsamples must start with 1 (level 0), got {ds!r}")
    if any(int(d) != d or d < 1 for d in ds):
        raise ValueError(f"downsamples must be positive integers, got {ds!r}")
    if any(b <= a for a, b in itertools.pairwise(ds)):
        raise ValueError(f"downsamples must be strictly increasing, got {ds!r}")


def _format_mpp(mpp: float) -> str:
    # Short but round-trippable enough for a physical size: 0.2525 -> "0.2525", 0.25 -> "0.25".
    return format(float(mpp), ".10g")


def _aperio_descriptions(
    levels: Sequence[tuple[int, int, int]],
    *,
    tile_size: int,
    mpp: float | None,
    codec: str,
) -> list[str]:
    """ImageDescription strings for an Aperio-style SVS, one per level.

    OpenSlide's aperio driver only parses the first page: it requires the ``Aperio`` prefix, ignores
    the first ``|``-separated field and turns every ``key = value`` field into ``aperio.key``
    (``AppMag`` -> ``openslide.objective-power``, ``MPP`` -> ``openslide.mpp-x/y``).  Every tiled page
    is a pyramid level regardless of its description; the lower levels get the ``... -> WxH`` form
    that real scanners write, for the benefit of other readers.
    """
    _, w0, h0 = levels[0]
    head = f"{APERIO_LIBRARY} \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile_size}x{tile_size})"
    app_mag = max(1, round(10.0 / mpp)) if mpp is not None else 20
    first = f"{head} {codec}|AppMag = {app_mag}"
    if mpp is not None:
        first += f"|MPP = {_format_mpp(mpp)}"
    out = [first]
    for _, lw, lh in levels[1:]:
        out.append(f"{head} -> {lw}x{lh} {codec}")
    return out


def write_synthetic_slide(
    path: str | Path,
    *,
    width: int,
    height: int,
    mpp: float | None,
    vendor: Literal["generic", "aperio"] = "generic",
    downsamples: Sequence[int] = (1, 4, 16),
    tile_size: int = 256,
    background: tuple[int, int, int] = (255, 255, 255),
    tissue: Sequence[Shape] | None = None,
    shapes: Sequence[Shape] = (),
    compression: Literal["none", "zlib", "jpeg"] = "zlib",
    jpeg_quality: int = 90,
    seed: int = 0,
) -> Path:
    """Write a synthetic pyramidal slide at ``path`` and return it as a :class:`~pathlib.Path`.

    Why the layout: OpenSlide only treats a TIFF as a pyramid when every level is its own top-level
    *tiled* IFD (SubIFD pyramids show up as a single level; strip TIFFs are refused).

    * ``vendor="generic"`` (``.tif``/``.tiff``): levels > 0 carry NewSubfileType=1 (reduced image),
      which OpenSlide's generic-tiff driver requires before it counts a page as a level.  When ``mpp``
      is given, XResolution/YResolution are ``10000 / (mpp * ds)`` pixels per cm with
      ResolutionUnit=CENTIMETER, which OpenSlide turns into ``openslide.mpp-x/y``.
    * ``vendor="aperio"`` (``.svs``): the first page has an Aperio ImageDescription
      (``... |AppMag = N|MPP = mpp``; the MPP field is omitted when ``mpp`` is None, AppMag is
      ``round(10 / mpp)`` or 20).  No thumbnail/label/macro pages are written (OpenSlide then simply
      reports no associated images).
    * ``mpp=None``: no physical resolution is written.  tifffile always emits XResolution=YResolution=1
      with ResolutionUnit=NONE (1); per the TIFF spec that carries no unit, and OpenSlide reports no mpp.

    Pixels follow the sampling rule of the module docstring (see :func:`render_tile`).  Tiles are
    generated lazily and streamed into the file, so memory is a few tiles regardless of slide size.
    The output is byte-identical for identical arguments (no DateTime/Software tags, no JSON
    description, texture seeded per tile).  Files whose raw size exceeds ~3 GiB are written as BigTIFF.
    """
    path = Path(path)
    if vendor not in ("generic", "aperio"):
        raise ValueError(f"vendor must be 'generic' or 'aperio', got {vendor!r}")
    allowed = {".tif", ".tiff"} if vendor == "generic" else {".svs"}
    if path.suffix.lower() not in allowed:
        raise ValueError(f"a {vendor} slide must have suffix {sorted(allowed)}, got {path.name!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be positive and finite (or None), got {mpp!r}")
    if tile_size <= 0 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16 (TIFF rule), got {tile_size}")
    if compression not in ("none", "zlib", "jpeg"):
        raise ValueError(f"compression must be 'none', 'zlib' or 'jpeg', got {compression!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative (it seeds numpy SeedSequence), got {seed}")
    if len(background) != 3 or not all(0 <= int(c) <= 255 for c in background):
        raise ValueError(f"background must be three ints in 0..255, got {background!r}")

    levels = level_dimensions(width, height, downsamples, tile_size)
    tissue_shapes = list(default_tissue(width, height, seed) if tissue is None else tissue)
    flat_shapes = list(shapes)
    background = (int(background[0]), int(background[1]), int(background[2]))

    codec_kwargs: dict[str, object]
    if compression == "jpeg":
        codec_kwargs = {"compression": "jpeg", "compressionargs": {"level": int(jpeg_quality)}}
        codec_desc = f"JPEG/RGB Q={int(jpeg_quality)}"
    elif compression == "zlib":
        codec_kwargs = {"compression": "zlib"}
        codec_desc = "Deflate/RGB"
    else:
        codec_kwargs = {"compression": None}
        codec_desc = "Raw/RGB"

    if vendor == "aperio":
        descriptions: list[str | None] = list(
            _aperio_descriptions(levels, tile_size=tile_size, mpp=mpp, codec=codec_desc)
        )
    else:
        descriptions = [None] * len(levels)

    raw_bytes = sum(
        -(-lw // tile_size) * -(-lh // tile_size) * tile_size * tile_size * 3 for _, lw, lh in levels
    )
    bigtiff = raw_bytes > _BIGTIFF_THRESHOLD

    def tiles(level_index: int, ds: int, lw: int, lh: int) -> Iterator[np.ndarray]:
        # Row-major tile order, as TIFF expects. Background-only tiles share one read-only array.
        blank = np.empty((tile_size, tile_size, 3), dtype=np.uint8)
        blank[...] = np.asarray(background, dtype=np.uint8)
        blank.flags.writeable = False
        for tr in range(-(-lh // tile_size)):
            for tc in range(-(-lw // tile_size)):
                if not _tile_touches_any(tissue_shapes, flat_shapes, ds, tr, tc, tile_size):
                    yield blank
                    continue
                yield render_tile(
                    level_index=level_index,
                    downsample=ds,
                    tile_row=tr,
                    tile_col=tc,
                    tile_size=tile_size,
                    background=background,
                    tissue=tissue_shapes,
                    shapes=flat_shapes,
                    seed=seed,
                )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            for k, (ds, lw, lh) in enumerate(levels):
                if mpp is not None:
                    px_per_cm = 10000.0 / (mpp * ds)
                    res: dict[str, object] = {
                        "resolution": (px_per_cm, px_per_cm),
                        "resolutionunit": "CENTIMETER",
                    }
                else:
                    res = {}
                tw.write(
                    tiles(k, ds, lw, lh),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    photometric="rgb",
                    planarconfig="contig",
                    tile=(tile_size, tile_size),
                    # generic-tiff only counts pages after the first when they are "reduced image";
                    # real SVS files leave NewSubfileType at 0 on their pyramid levels.
                    subfiletype=1 if (k > 0 and vendor == "generic") else 0,
                    description=descriptions[k],
                    metadata=None,  # no JSON "shape" description
                    software=False,  # no Software tag
                    datetime=None,  # no DateTime tag (determinism)
                    maxworkers=1,  # streaming, bounded memory, deterministic order
                    **res,  # type: ignore[arg-type]
                    **codec_kwargs,  # type: ignore[arg-type]
                )
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _tile_touches_any(
    tissue: Sequence[Shape], shapes: Sequence[Shape], ds: int, tile_row: int, tile_col: int, tile_size: int
) -> bool:
    """Whether any shape's bounding box reaches the sample points of a tile (cheap pre-check)."""
    x_lo = (tile_col * tile_size + 0.5) * ds
    x_hi = (tile_col * tile_size + tile_size - 0.5) * ds
    y_lo = (tile_row * tile_size + 0.5) * ds
    y_hi = (tile_row * tile_size + tile_size - 0.5) * ds
    for s in (*tissue, *shapes):
        bx0, by0, bx1, by1 = s.bbox()
        if bx1 >= x_lo and bx0 <= x_hi and by1 >= y_lo and by0 <= y_hi:
            return True
    return False
