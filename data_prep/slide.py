"""Opening whole-slide images with OpenSlide and knowing their physical resolution.

Resolution is taken in microns per pixel, never in "magnification": from ``openslide.mpp-x/y`` (which
OpenSlide fills from the vendor metadata it understands), then from a few vendor fallbacks, and a
per-slide override table wins over both. A slide with no usable mpp is refused with a message saying
how to supply one, because guessing a scale silently corrupts every tile cut from it.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide

# What OpenSlide can open (as of 4.0); used to discover slides in a folder.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
)  # fmt: skip

# A physical pixel size outside this range is a metadata error (e.g. a 72-dpi default tag).
PLAUSIBLE_MPP = (0.05, 50.0)


class SlideError(RuntimeError):
    """A slide that cannot be tiled; the message says why and, when possible, what to do."""


class MissingMppError(SlideError):
    """The slide records no usable physical pixel size and no override was given."""


@dataclass(frozen=True)
class Resolution:
    mpp_x: float
    mpp_y: float
    source: str  # where it came from: "override", "openslide.mpp-x", ...


def read_mpp_overrides(path: str | Path) -> dict[str, tuple[float, float]]:
    """Read a CSV with ``slide_id`` and ``mpp`` (or ``mpp_x`` and ``mpp_y``) columns."""
    path = Path(path)
    table: dict[str, tuple[float, float]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        if "slide_id" not in cols or not ({"mpp"} <= cols or {"mpp_x", "mpp_y"} <= cols):
            raise ValueError(f"mpp override table {path} needs columns slide_id and mpp (or mpp_x, mpp_y)")
        for line_no, row in enumerate(reader, start=2):
            slide_id = row["slide_id"].strip()
            try:
                if row.get("mpp_x"):
                    value = (float(row["mpp_x"]), float(row["mpp_y"]))
                else:
                    value = (float(row["mpp"]), float(row["mpp"]))
            except (TypeError, ValueError) as err:
                raise ValueError(f"mpp override table {path} line {line_no}: {err}") from None
            if slide_id in table:
                raise ValueError(f"mpp override table {path} line {line_no}: duplicate slide_id {slide_id!r}")
            if not all(_plausible(v) for v in value):
                raise ValueError(f"mpp override table {path} line {line_no}: implausible mpp {value}")
            table[slide_id] = value
    return table


def _plausible(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]


def _as_float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _tiff_resolution_mpp(props: dict[str, str]) -> tuple[float, float] | None:
    unit = props.get("tiff.ResolutionUnit", "").lower()
    per_unit_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    xres, yres = _as_float(props.get("tiff.XResolution")), _as_float(props.get("tiff.YResolution"))
    if per_unit_um is None or not xres or not yres:
        return None
    return per_unit_um / xres, per_unit_um / yres


def resolve_resolution(
    slide_id: str, props: dict[str, str], override: tuple[float, float] | None = None
) -> Resolution:
    """Decide the slide's level-0 mpp, or raise :class:`MissingMppError` with instructions."""
    if override is not None:
        return Resolution(override[0], override[1], "override")
    candidates: list[tuple[str, float | None, float | None]] = [
        ("openslide.mpp-x", _as_float(props.get("openslide.mpp-x")), _as_float(props.get("openslide.mpp-y"))),
        ("aperio.MPP", _as_float(props.get("aperio.MPP")), _as_float(props.get("aperio.MPP"))),
    ]
    tiff = _tiff_resolution_mpp(props)
    if tiff:
        candidates.append(("tiff.XResolution", *tiff))
    rejected = []
    for source, mx, my in candidates:
        my = my if my is not None else mx
        if mx is None:
            continue
        if _plausible(mx) and _plausible(my):
            return Resolution(mx, my, source)
        rejected.append(f"{source}={mx}")
    detail = f" (implausible values ignored: {', '.join(rejected)})" if rejected else ""
    raise MissingMppError(
        f"slide {slide_id!r} records no usable microns-per-pixel{detail}. Supply it in the mpp override "
        f"table (config slides.mpp_overrides: a CSV with columns slide_id,mpp)."
    )


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open a slide with OpenSlide, turning its low-level errors into a :class:`SlideError`."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise SlideError(
            f"{path}: broken symbolic link (it points to {os.readlink(path)}, which does not exist)"
        )
    if not path.exists():
        raise SlideError(f"{path}: file does not exist")
    size = path.stat().st_size
    if size == 0:
        raise SlideError(f"{path}: empty file (0 bytes)")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        hint = _untiled_tiff_hint(path)
        raise SlideError(f"{path}: not a slide format OpenSlide can read{hint}") from None
    except openslide.OpenSlideError as err:
        raise SlideError(f"{path}: corrupt or truncated slide ({err})") from None


def _untiled_tiff_hint(path: Path) -> str:
    """Explain the common case of a plain (strip-based) TIFF, which OpenSlide refuses."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if tif.pages and not tif.pages[0].is_tiled:
                return (
                    " — it is an untiled TIFF; convert it to a tiled pyramid first, e.g. "
                    "`vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`"
                )
    except Exception:
        return ""
    return ""


def reader_versions() -> dict[str, str]:
    """What decoded the slide: the OpenSlide C library and openslide-python versions (provenance)."""
    return {"openslide": openslide.__library_version__, "openslide-python": openslide.__version__}


def background_rgb(props: dict[str, str]) -> tuple[int, int, int]:
    """The colour OpenSlide reports for unscanned areas (``openslide.background-color``), white if absent."""
    text = props.get("openslide.background-color", "")
    if len(text) == 6:
        try:
            return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
        except ValueError:
            pass
    return 255, 255, 255


def read_rgb(
    slide: openslide.OpenSlide,
    location: tuple[int, int],
    level: int,
    size: tuple[int, int],
    background: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Read a region as an RGB uint8 array, compositing transparent (unscanned) pixels on ``background``.

    ``location`` is in level-0 pixels and ``size`` in pixels of ``level``, as in OpenSlide.
    """
    try:
        rgba = np.asarray(slide.read_region(location, level, size))
    except openslide.OpenSlideError as err:
        raise SlideError(
            f"unreadable region at level {level}, level-0 location {location}, size {size}: {err}"
        ) from None
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    # openslide-python un-premultiplies OpenSlide's ARGB, so this is the ordinary "over" composite.
    a = alpha[..., None].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + (1.0 - a) * np.asarray(background, np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
