"""FID of one tile set against another, and the reference points a generated set is read against.

A FID number alone says little on small sets (it is biased upwards when few images are compared), so
learning curves and the demo put it beside references measured *with the same tiles and the same
network in the same run*:

- **copy**: training tiles vs the held-out tiles — what a model that copies its training set scores;
- **autoencoder floor**: held-out tiles vs their own autoencoder reconstructions — no latent model
  decoded by that autoencoder can be expected to do much better;
- **untrained**: samples of the randomly initialised model — where training starts.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from cytosyn.eval.stats import FeatureStats, frechet_distance


def inception_stats(images: np.ndarray, inception: Callable, batch: int = 16) -> FeatureStats:
    """Float64 statistics of the FID Inception features of uint8 tiles (N, H, W, 3)."""
    stats = FeatureStats()
    for start in range(0, len(images), batch):
        stats.update(inception(torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))))
    return stats


def fid(
    a: FeatureStats | np.ndarray, b: FeatureStats | np.ndarray, inception: Callable | None = None
) -> float:
    """FID between two tile sets (uint8 arrays, or their :func:`inception_stats`)."""
    sa = a if isinstance(a, FeatureStats) else inception_stats(a, inception)
    sb = b if isinstance(b, FeatureStats) else inception_stats(b, inception)
    return float(frechet_distance(sa, sb, check_meta=False))


@torch.no_grad()
def autoencoder_reconstructions(images: np.ndarray, vae, batch: int = 8) -> np.ndarray:
    """uint8 tiles → encoded and decoded by ``vae`` (a :class:`cytosyn.models.vae.LatentVAE`), uint8."""
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
        recon = vae.decode(vae.encode_latents(x))
        out.append(((recon + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def reference_fids(
    train: np.ndarray,
    heldout: np.ndarray,
    vae,
    inception: Callable,
    heldout_stats: FeatureStats | None = None,
) -> dict[str, float]:
    """``copy`` (train vs held-out) and ``autoencoder_floor`` (held-out reconstructions vs held-out)."""
    ref = heldout_stats or inception_stats(heldout, inception)
    return {
        "copy": fid(inception_stats(train, inception), ref),
        "autoencoder_floor": fid(inception_stats(autoencoder_reconstructions(heldout, vae), inception), ref),
    }
