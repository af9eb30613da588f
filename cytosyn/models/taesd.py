"""The Tiny AutoEncoder family (TAESD / TAEF2), written for cytosyn from its public description.

TAESD (Ollin Boer Bohan, MIT licence) distils a large latent-diffusion VAE into two small plain
convolutional networks. TAEF2 is the member that approximates the FLUX.2 VAE: 8× downsampling, 32 latent
channels, 1.34 M parameters per side, and images in [0, 1] (not [−1, 1] like diffusers' VAEs).

Layout (what the released state dicts expect; layer indices are the keys' first component):

- *residual block* (64 → 64 channels): ``conv`` = conv3×3 → ReLU → conv3×3 → ReLU → conv3×3, ``skip`` = an
  identity (no weights), output ReLU(conv(x) + x). The three deepest blocks of each side also carry a
  ``pool`` branch added to the input first: 1×1 conv 64 → 256 (no bias) → GroupNorm(4 groups) → ReLU →
  1×1 conv 256 → 64 (no bias). GroupNorm normalises over the whole image, so unlike the rest of the
  network these blocks see global statistics: encoding a tile alone or inside a larger image differs.
- *encoder*: conv3×3(3→64), block, then three stages of [stride-2 conv3×3 (no bias), 3 blocks], the last
  stage's blocks with the pool branch, then conv3×3(64→32).
- *decoder*: soft clamp ``3·tanh(z/3)``, conv3×3(32→64), ReLU, three stages of [3 blocks, nearest 2×
  upsampling, conv3×3 (no bias)] (the first stage's blocks with the pool branch), block, conv3×3(64→3).

The latents are deterministic (no posterior): TAEF2 is distilled to reproduce the FLUX.2 VAE's latent
*means*, with values roughly in [−3, 3].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

WIDTH = 64
POOL_WIDTH = 4 * WIDTH
POOL_GROUPS = 4


def _conv3(c_in: int, c_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=bias)


class ResidualBlock(nn.Module):
    """Three 3×3 convolutions with a residual connection, optionally preceded by a global-norm branch."""

    def __init__(self, channels: int = WIDTH, global_norm: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            _conv3(channels, channels),
            nn.ReLU(),
            _conv3(channels, channels),
            nn.ReLU(),
            _conv3(channels, channels),
        )
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Module | None = None
        if global_norm:
            self.pool = nn.Sequential(
                nn.Conv2d(channels, POOL_WIDTH, kernel_size=1, bias=False),
                nn.GroupNorm(POOL_GROUPS, POOL_WIDTH),
                nn.ReLU(),
                nn.Conv2d(POOL_WIDTH, channels, kernel_size=1, bias=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class SoftClamp(nn.Module):
    """``limit · tanh(z / limit)``: keeps out-of-range latents (e.g. from a diffusion model) decodable."""

    def __init__(self, limit: float = 3.0):
        super().__init__()
        self.limit = limit

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(z / self.limit) * self.limit


def _stage_blocks(n: int, global_norm: bool) -> list[nn.Module]:
    return [ResidualBlock(WIDTH, global_norm) for _ in range(n)]


def tiny_encoder(latent_channels: int = 32, global_norm: bool = True) -> nn.Sequential:
    """Image in [0, 1] (B, 3, H, W) → latents (B, C, H/8, W/8)."""
    layers: list[nn.Module] = [_conv3(3, WIDTH), ResidualBlock(WIDTH)]
    for stage in range(3):
        layers.append(_conv3(WIDTH, WIDTH, stride=2, bias=False))
        layers += _stage_blocks(3, global_norm and stage == 2)
    layers.append(_conv3(WIDTH, latent_channels))
    return nn.Sequential(*layers)


def tiny_decoder(latent_channels: int = 32, global_norm: bool = True) -> nn.Sequential:
    """Latents (B, C, h, w) → image in about [0, 1] (B, 3, 8h, 8w) (not clamped)."""
    layers: list[nn.Module] = [SoftClamp(3.0), _conv3(latent_channels, WIDTH), nn.ReLU()]
    for stage in range(3):
        layers += _stage_blocks(3, global_norm and stage == 0)
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv3(WIDTH, WIDTH, bias=False)]
    layers += [ResidualBlock(WIDTH), _conv3(WIDTH, 3)]
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """Encoder + decoder of a TAESD-family autoencoder; state dict keys ``encoder.*`` and ``decoder.*``."""

    downsample = 8

    def __init__(self, latent_channels: int = 32, global_norm: bool = True):
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = tiny_encoder(latent_channels, global_norm)
        self.decoder = tiny_decoder(latent_channels, global_norm)

    def encode(self, images01: Tensor) -> Tensor:
        return self.encoder(images01)

    def decode(self, latents: Tensor) -> Tensor:
        return self.decoder(latents)
