"""The PatchGAN discriminator and hinge losses used to fine-tune an autoencoder (VAE tuning, REPA-E).

A PatchGAN (Isola et al. 2017, "pix2pix"; used by the latent-diffusion VAEs and by REPA-E's VAE loss)
classifies overlapping image patches as real or reconstructed: a stack of 4×4 convolutions, stride 2 then
1, LeakyReLU(0.2), normalisation after every convolution but the first and the last, and one logit per
patch. Written here because no maintained pip library ships it on its own (it lives inside training
repositories such as taming-transformers); it is 30 lines.

The normalisation is GroupNorm, not pix2pix's BatchNorm: BatchNorm's batch statistics make the
discriminator's output for a tile depend on the other tiles of the batch and on the batch size per rank,
which breaks cytosyn's "same inputs, same outputs" rule for small per-rank batches; GroupNorm does not.

Losses (hinge, as in REPA-E and the LDM autoencoders):

- discriminator: ``½·(mean(relu(1 − D(real))) + mean(relu(1 + D(fake))))``;
- generator (the autoencoder): ``−mean(D(fake))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class PatchDiscriminator(nn.Module):
    """Images in [−1, 1] ``(B, 3, H, W)`` → patch logits ``(B, 1, h, w)``.

    ``layers`` stride-2 stages after the first convolution (3 → a 70×70 receptive field, pix2pix's
    default); ``width`` channels in the first stage, doubled per stage up to ``8 × width``.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=False),
                _norm(width * mult),
                nn.LeakyReLU(0.2),
            ]
        seq.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DCGAN-style initialisation: N(0, 0.02) convolutions, GroupNorm scale N(1, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge loss of the discriminator (fp32)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_generator_loss(logits_fake: Tensor) -> Tensor:
    """The autoencoder's adversarial loss against a hinge discriminator (fp32)."""
    return -logits_fake.float().mean()
