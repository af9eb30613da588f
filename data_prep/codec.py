"""Tile encoding with exact, recorded settings.

CytoSyn found that JPEG compression changes both the model and the metrics, so the codec is a choice
made in config and written into every tile's JSON with the library versions that produced the bytes.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import PIL
from PIL import Image, features
from pydantic import Field

from cytosyn.config import StrictModel

_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
EXTENSION = {"jpeg": "jpg", "png": "png", "webp": "webp"}


class CodecConfig(StrictModel):
    """How tiles are stored. JPEG is lossy; PNG and WebP here are always lossless."""

    format: Literal["jpeg", "png", "webp"] = "jpeg"
    quality: int = Field(95, ge=1, le=100)  # JPEG quality 1-95 (PIL advises against >95)
    subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] = "4:4:4"
    optimize: bool = False  # JPEG: optimised Huffman tables (smaller, slower)
    progressive: bool = False  # JPEG
    png_compress_level: int = Field(6, ge=0, le=9)  # PNG zlib level 0-9
    webp_method: int = Field(4, ge=0, le=6)  # lossless WebP effort 0-6 (higher = smaller, slower)


def jpeg_library() -> str:
    """The JPEG library that makes the bytes, with its real version: ``"libjpeg-turbo 3.2.0"``.

    Pillow's ``features.version("jpg")`` is the libjpeg *API level* ("6.2" for every libjpeg-turbo
    release), which says nothing about the encoder; libjpeg-turbo reports its own version separately.
    """
    if features.check_feature("libjpeg_turbo"):
        return f"libjpeg-turbo {features.version_feature('libjpeg_turbo')}"
    return f"libjpeg {features.version('jpg')}"


class TileEncoder:
    """Encodes RGB uint8 tiles to bytes; :attr:`settings` is what goes into each tile's JSON."""

    def __init__(self, cfg: CodecConfig):
        if cfg.format == "jpeg" and not 1 <= cfg.quality <= 100:
            raise ValueError(f"codec.quality must be in 1..100, got {cfg.quality}")
        self.cfg = cfg
        self.extension = EXTENSION[cfg.format]
        self.settings = self._settings()

    def _settings(self) -> dict[str, Any]:
        cfg = self.cfg
        common = {"format": cfg.format, "library": "Pillow", "version": PIL.__version__}
        if cfg.format == "jpeg":
            return common | {
                "lossless": False,
                "quality": cfg.quality,
                "subsampling": cfg.subsampling,
                "optimize": cfg.optimize,
                "progressive": cfg.progressive,
                "libjpeg": jpeg_library(),
                "libjpeg_api": features.version("jpg"),
            }
        if cfg.format == "png":
            return common | {
                "lossless": True,
                "compress_level": cfg.png_compress_level,
                "zlib": features.version("zlib"),
            }
        return common | {"lossless": True, "method": cfg.webp_method, "libwebp": features.version("webp")}

    def encode(self, tile: np.ndarray) -> bytes:
        if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3:
            raise TypeError(f"tiles must be HxWx3 uint8 arrays, got {tile.dtype} {tile.shape}")
        image = Image.fromarray(tile)
        buf = io.BytesIO()
        cfg = self.cfg
        if cfg.format == "jpeg":
            image.save(
                buf,
                format="JPEG",
                quality=cfg.quality,
                subsampling=_SUBSAMPLING[cfg.subsampling],
                optimize=cfg.optimize,
                progressive=cfg.progressive,
            )
        elif cfg.format == "png":
            image.save(buf, format="PNG", compress_level=cfg.png_compress_level)
        else:
            image.save(buf, format="WEBP", lossless=True, method=cfg.webp_method, exact=True)
        return buf.getvalue()
