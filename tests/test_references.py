"""FID references (copy, autoencoder floor) and the deterministic-latent rules of training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cytosyn.eval.references import autoencoder_reconstructions, fid, inception_stats

from cytosyn.manifest import FeatureEntry, ShardEntry, SplitManifest
from cytosyn.training.config import TrainConfig
from cytosyn.training.module import split_features


def _colour_features(images: torch.Tensor) -> torch.Tensor:
    """A cheap stand-in extractor: per-channel means and stds on a 4×4 grid (96-d)."""
    x = images.float().permute(0, 3, 1, 2).reshape(images.shape[0], 3, 4, 56, 4, 56)
    return torch.cat([x.mean(dim=(3, 5)).flatten(1), x.std(dim=(3, 5)).flatten(1)], dim=1)


def test_fid_is_zero_for_a_set_with_itself_and_grows_with_a_colour_shift():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 224, 224, 3), dtype=np.uint8)
    assert fid(a, a, _colour_features) == pytest.approx(0.0, abs=1e-6)
    shifted = np.clip(a.astype(int) + 30, 0, 255).astype(np.uint8)
    stats = inception_stats(a, _colour_features)
    assert fid(stats, inception_stats(shifted, _colour_features)) > 100


def test_autoencoder_reconstructions_are_uint8_tiles_of_the_same_shape():
    from cytosyn.models.vae import load_vae

    tiles = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    out = autoencoder_reconstructions(tiles, load_vae("tiny-f8", random_init=True))
    assert out.shape == tiles.shape and out.dtype == np.uint8


def _manifest(vae_shape: list[int], deterministic: bool) -> SplitManifest:
    stats = {"mean": [0.0] * vae_shape[1], "mean_std": [0.5] * vae_shape[1], "std": [2.0] * vae_shape[1]}
    return SplitManifest(
        split="train",
        image_member="png",
        samples=1,
        shards=[ShardEntry(name="train-000000.tar", count=1, bytes=1, sha256="0" * 64)],
        patients=["p"],
        slides=["s"],
        features=[
            FeatureEntry(member="enc.npy", kind="embedding", model_id="enc", details={"shape": [8]}),
            FeatureEntry(
                member="vae.npy",
                kind="vae",
                model_id="taef2" if deterministic else "tiny-f8",
                details={
                    "shape": vae_shape,
                    "deterministic": deterministic,
                    "downsample": 8,
                    "latent_stats": stats,
                },
            ),
        ],
    )


def test_deterministic_latents_are_normalised_by_their_own_spread_whatever_sample_posterior_says():
    cfg = TrainConfig.model_validate(
        {"data": {"condition": "enc", "repa_target": None}, "diffusion": {"sample_posterior": True}}
    )
    det = split_features(cfg, _manifest([1, 32, 28, 28], True), "x")
    assert det["latent_std"] == [0.5] * 32 and det["vae"]["deterministic"] is True
    kl = split_features(cfg, _manifest([2, 4, 28, 28], False), "x")
    assert kl["latent_std"] == [2.0] * 4  # sampled posteriors: the std of the samples
    assert kl["vae"]["latent_channels"] == 4
