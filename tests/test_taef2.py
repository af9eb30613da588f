"""TAEF2, the pretrained autoencoder shipped in the package: weights, reconstruction, the registry interface."""

from __future__ import annotations

import csv
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cytosyn.models.vae import (
    VAEError,
    check_vae_matches,
    get_vae_spec,
    latents_from_moments,
    load_vae,
    load_vae_as_recorded,
)

ASSETS = Path(str(resources.files("cytosyn") / "assets"))
# Measured on the 41 shipped 224 px CRC tiles (PNG + TIFF): min 23.65 dB, median ~28.5 dB; the first 8
# (ADI, DEB) are among the hardest.
PSNR_FLOOR_EACH = 22.0
PSNR_FLOOR_MEAN = 26.0


def crc_tiles_224(limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """The shipped 224 px CRC tiles (CRC-VAL-HE-7K PNGs, NCT-CRC-HE-100K TIFFs) and their labels."""
    rows = list(csv.DictReader((ASSETS / "crc_tiles" / "manifest.csv").open()))
    rows = [r for r in rows if r["width"] == "224"][:limit]
    images = [np.asarray(Image.open(ASSETS / "crc_tiles" / r["path"]).convert("RGB")) for r in rows]
    return np.stack(images), [r["label"] for r in rows]


@pytest.fixture(scope="module")
def taef2():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_vae("taef2")


def test_shipped_weights_are_the_recorded_file_and_load_strictly(taef2):
    sums = dict(
        reversed(line.split()) for line in (ASSETS / "SHA256SUMS").read_text().splitlines() if line.strip()
    )
    file = ASSETS / "taef2" / "taef2.safetensors"
    assert hashlib.sha256(file.read_bytes()).hexdigest() == sums["taef2/taef2.safetensors"]
    assert (ASSETS / "taef2" / "LICENSE").read_text().startswith("MIT License")
    n_enc = sum(p.numel() for p in taef2.model.encoder.parameters())
    n_dec = sum(p.numel() for p in taef2.model.decoder.parameters())
    assert (n_enc, n_dec) == (1_338_528, 1_338_499)  # the released state dicts' sizes
    assert taef2.weights_id.startswith("sha256:") and not taef2.is_random
    spec = get_vae_spec("taef2")
    assert (spec.latent_channels, spec.downsample, spec.deterministic) == (32, 8, True)


def test_reconstructs_real_tiles_above_a_psnr_floor(taef2):
    images, _ = crc_tiles_224(limit=8)
    moments = taef2.encode_moments(torch.from_numpy(images))
    assert moments.shape == (8, 1, 32, 28, 28)
    recon = taef2.decode(latents_from_moments(moments))
    recon_u8 = ((recon + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    mse = ((recon_u8 - images.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0**2 / mse)
    assert psnr.min() > PSNR_FLOOR_EACH, psnr
    assert psnr.mean() > PSNR_FLOOR_MEAN, psnr
    # A broken decode path (wrong range, channel order, no weights) is far below: check the floor means it.
    random_vae = load_vae("taef2", random_init=True)
    bad = random_vae.decode(latents_from_moments(random_vae.encode_moments(torch.from_numpy(images[:2]))))
    bad_u8 = ((bad + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    bad_psnr = 10 * np.log10(255.0**2 / ((bad_u8 - images[:2].astype(np.float64)) ** 2).mean())
    assert bad_psnr < PSNR_FLOOR_EACH - 5


def test_latents_are_deterministic_and_moments_rules(taef2):
    images, _ = crc_tiles_224(limit=2)
    a = taef2.encode_moments(torch.from_numpy(images))
    b = taef2.encode_moments(torch.from_numpy(images).permute(0, 3, 1, 2))  # channel-first input too
    assert torch.equal(a, b)
    eps = torch.randn_like(a[:, 0])
    # A deterministic autoencoder has no posterior: the "sample" is the latents themselves.
    assert torch.equal(latents_from_moments(a, eps), a[:, 0])
    two_rows = torch.stack([a[:, 0], torch.zeros_like(a[:, 0])], dim=1)  # KL moments with σ = 1
    assert torch.equal(latents_from_moments(two_rows, eps), a[:, 0] + eps)
    with pytest.raises(VAEError, match=r"\(B, 2, C, h, w\)"):
        latents_from_moments(a[:, 0])


def test_released_pair_and_safetensors_give_one_weights_id(taef2, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(ASSETS / "taef2" / "taef2.safetensors"))
    for part in ("encoder", "decoder"):  # the released layout: two torch state dicts
        torch.save(
            {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")},
            tmp_path / f"taef2_{part}.pth",
        )
    assert load_vae("taef2", tmp_path).weights_id == taef2.weights_id
    # as recorded: the hash must match, random weights are refused
    assert load_vae_as_recorded("taef2", taef2.weights_id).weights_id == taef2.weights_id
    with pytest.raises(VAEError, match="differ from the recorded"):
        load_vae_as_recorded("taef2", "sha256:" + "0" * 64)


def test_mismatch_is_refused_naming_both(taef2):
    recorded = {"model_id": "tiny-f8", "weights": "random-init:seed=0", "latent_channels": 4, "downsample": 8}
    with pytest.raises(VAEError) as err:
        check_vae_matches(taef2, recorded, "sampling")
    message = str(err.value)
    assert "taef2" in message and "tiny-f8" in message and "latent_channels 32 vs 4" in message
    check_vae_matches(taef2, {"model_id": "taef2", "weights": taef2.weights_id, "latent_channels": 32}, "ok")
