"""The one door through which evaluation reaches any generative tile model.

Both cytosyn's own pipeline (:mod:`cytosyn.pipeline`) and the PixCell adapter (:mod:`cytosyn.eval.pixcell`)
implement :class:`TileGenerator`, so the harness generates, records and measures them with the same code.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class TileGenerator(Protocol):
    name: str  # e.g. "cytosyn:<release id>" or "pixcell-256"
    conditioning_encoder: (
        str | None
    )  # registry name of the encoder whose embeddings condition it (None: unconditional only)
    tile_px: int  # side of the generated tiles
    mpp: float  # microns per pixel of the generated tiles (field of view = tile_px · mpp)

    def generate(
        self,
        embeddings: torch.Tensor | None,
        *,
        num_images: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        batch_size: int = 16,
    ) -> np.ndarray:
        """uint8 tiles ``(N, tile_px, tile_px, 3)``: one per embedding row, or ``num_images``
        unconditional ones when ``embeddings`` is None. Deterministic for a given seed."""
        ...

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """Conditioning embeddings of reference tiles (uint8 ``(N, H, W, 3)``), with the model's own encoder."""
        ...

    def describe(self) -> dict[str, Any]:
        """Provenance for reports: model id, weights hashes, sampler settings, encoder, resolution."""
        ...
