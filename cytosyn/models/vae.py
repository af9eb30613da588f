"""VAEs for latent diffusion, through diffusers' ``AutoencoderKL``.

The registry records each VAE's exact architecture (so a random-initialised copy for tests has the
real geometry), where its weights live, and its published latent scale/shift. cytosyn stores the
*raw* posterior moments (mean, log-variance) of every tile and normalises latents with statistics
measured on the training split (see DESIGN.md); the published scale and shift are recorded for
reference and for PixCell-style models that use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cytosyn.compat import import_torchvision
from cytosyn.models.encoders import load_as_recorded, sha256_state_dict


class VAEError(RuntimeError):
    """A VAE that cannot be built or loaded; the message says how to fix it."""


_SD_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


@dataclass(frozen=True)
class VAESpec:
    name: str
    config: dict[str, Any]
    hub_id: str | None = None
    subfolder: str | None = None
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    licence: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)


VAE_REGISTRY: dict[str, VAESpec] = {
    spec.name: spec
    for spec in [
        VAESpec(
            "sd-vae-ft-ema", _SD_CONFIG, "stabilityai/sd-vae-ft-ema", scaling_factor=0.18215, licence="MIT"
        ),
        VAESpec(
            "sd-vae-ft-mse", _SD_CONFIG, "stabilityai/sd-vae-ft-mse", scaling_factor=0.18215, licence="MIT"
        ),
        VAESpec(
            "sd3.5-vae",
            _SD_CONFIG
            | {
                "latent_channels": 16,
                "use_quant_conv": False,
                "use_post_quant_conv": False,
                "scaling_factor": 1.5305,
                "shift_factor": 0.0609,
                "sample_size": 1024,
            },
            "stabilityai/stable-diffusion-3.5-large",
            subfolder="vae",
            scaling_factor=1.5305,
            shift_factor=0.0609,
            licence="Stability AI Community License (gated)",
            notes="PixCell's VAE (16 channels)",
        ),
        VAESpec(
            "tiny-f8",
            {
                "in_channels": 3,
                "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4,
                "block_out_channels": [8, 16, 16, 16],
                "layers_per_block": 1,
                "latent_channels": 4,
                "norm_num_groups": 4,
                "sample_size": 224,
            },
            notes="a small f8/4-channel AutoencoderKL with the SD-VAE geometry, for tests and the CPU demo",
        ),
    ]
}


class LatentVAE(nn.Module):
    """An ``AutoencoderKL`` plus its identity; images in [0, 255] uint8 or [-1, 1] float."""

    def __init__(self, spec: VAESpec, vae: nn.Module, weights_id: str):
        super().__init__()
        self.spec = spec
        self.vae = vae.eval().requires_grad_(False)
        self.weights_id = weights_id

    @property
    def is_random(self) -> bool:
        return self.weights_id.startswith("random-init")

    @staticmethod
    def to_model_range(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or (B, 3, H, W) → float (B, 3, H, W) in [-1, 1]."""
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior (mean, log-variance) stacked on a new axis 1: (B, 2, C, h, w)."""
        x = self.to_model_range(images)
        f = self.spec.downsample
        if x.shape[-1] % f or x.shape[-2] % f:
            raise VAEError(
                f"VAE {self.spec.name!r} needs image sides divisible by {f}, got {tuple(x.shape[-2:])}"
            )
        posterior = self.vae.encode(x).latent_dist
        return torch.stack([posterior.mean, posterior.logvar], dim=1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents → images as float in [-1, 1]."""
        return self.vae.decode(latents).sample.clamp(-1, 1)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "latent_channels": self.spec.latent_channels,
            "downsample": self.spec.downsample,
            "published_scaling_factor": self.spec.scaling_factor,
            "published_shift_factor": self.spec.shift_factor,
            "weights": self.weights_id,
            "random_init": self.is_random,
            "input_range": "[-1, 1] from uint8/127.5-1",
        }


def get_vae_spec(name: str) -> VAESpec:
    if name not in VAE_REGISTRY:
        raise VAEError(
            f"unknown VAE {name!r}; known: {', '.join(sorted(VAE_REGISTRY))} (or a local diffusers folder)"
        )
    return VAE_REGISTRY[name]


def load_vae(
    name: str, weights: str | Path | None = None, *, random_init: bool = False, seed: int = 0
) -> LatentVAE:
    """A VAE by registry name, from a local diffusers folder, the hub, or (only if asked) random init."""
    import_torchvision()
    from diffusers import AutoencoderKL

    spec = get_vae_spec(name)
    if random_init:
        if weights is not None:
            raise VAEError(f"VAE {name!r}: random_init and weights are exclusive")
        torch.manual_seed(seed)
        return LatentVAE(spec, AutoencoderKL(**spec.config), f"random-init:seed={seed}")
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise VAEError(
                f"VAE weights path {path} does not exist (expected a diffusers folder with config.json)"
            )
        try:
            vae = AutoencoderKL.from_pretrained(
                str(path),
                subfolder=spec.subfolder
                if (path / (spec.subfolder or "")).is_dir() and spec.subfolder
                else None,
            )
        except (OSError, ValueError) as err:
            raise VAEError(
                f"VAE {name!r}: cannot load a diffusers AutoencoderKL from {path}: {err}"
            ) from None
    else:
        if spec.hub_id is None:
            raise VAEError(f"VAE {name!r} has no hub weights; use random_init (tests) or a local folder")
        try:
            vae = AutoencoderKL.from_pretrained(spec.hub_id, subfolder=spec.subfolder)
        except Exception as err:
            raise VAEError(
                f"VAE {name!r}: could not load {spec.hub_id} from the hub ({type(err).__name__}: {err}). Offline or "
                f"gated? Download the diffusers folder and pass its path as the VAE weights."
            ) from None
    if vae.config.latent_channels != spec.latent_channels:
        raise VAEError(
            f"VAE {name!r}: the loaded weights have {vae.config.latent_channels} latent channels, the registry "
            f"entry {spec.latent_channels}"
        )
    return LatentVAE(spec, vae, f"sha256:{sha256_state_dict(vae.state_dict())}")


def load_vae_as_recorded(name: str, recorded: str | None, weights: str | Path | None = None) -> LatentVAE:
    """The VAE a manifest, checkpoint or release recorded (see :func:`cytosyn.models.encoders.load_as_recorded`)."""
    hint = "pass the diffusers folder of the VAE that made the latents"
    return load_as_recorded(load_vae, "VAE", name, recorded, weights, VAEError, hint)
