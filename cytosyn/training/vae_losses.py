"""The autoencoder's training losses (VAE fine-tuning and REPA-E end-to-end tuning), all in fp32.

``L_vae = w_l1·|x̂ − x|₁ + w_lpips·LPIPS(x̂, x) + w_kl·KL(q(z|x) ‖ N(0, I)) + w_gan·(−D(x̂))``, with
``x̂ = decode(z)``, ``z ~ q(z|x)`` (the latents for a deterministic autoencoder, which has no KL term),
and the GAN term only from ``gan_start`` on (REPA-E: L1 1, LPIPS 1, KL 1e-6, GAN 0.1 with a fixed weight).
KL follows the latent-diffusion autoencoders: summed over latent elements, averaged over the batch (so
1e-6 is the usual weight). The discriminator is trained with the hinge loss on ``x`` vs ``x̂.detach()``.

:class:`TrainableAutoencoder` gives every registry entry one differentiable interface (the registry's
:class:`~cytosyn.models.vae.LatentVAE` is inference-only: frozen, ``no_grad``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cytosyn.models.discriminator import PatchDiscriminator, hinge_discriminator_loss, hinge_generator_loss
from cytosyn.models.vae import LatentVAE, VAEError


@dataclass
class Posterior:
    mean: Tensor  # (B, C, h, w): posterior mean, or the deterministic latents
    logvar: Tensor | None  # None for a deterministic autoencoder
    z: Tensor  # the latents decoded: mean + σ·eps (or the mean when no eps was given)


class TrainableAutoencoder(nn.Module):
    """A registry autoencoder made trainable: images in [−1, 1] → :class:`Posterior` → images in [−1, 1]
    (not clamped, so the losses see the decoder's real output). ``net`` is the underlying module whose
    weights are tuned and exported (diffusers ``AutoencoderKL`` or :class:`TinyAutoencoder`)."""

    def __init__(self, vae: LatentVAE):
        super().__init__()
        self.spec = vae.spec
        self.start_weights = vae.weights_id
        self._kind = vae.spec.kind
        net = vae.vae if self._kind == "diffusers-kl" else vae.model  # type: ignore[attr-defined]
        self.net = net.train().requires_grad_(True)
        object.__setattr__(self, "wrapper", vae)  # the LatentVAE sharing ``net`` (for export)

    @property
    def deterministic(self) -> bool:
        return self.spec.deterministic

    def check_images(self, x: Tensor) -> None:
        f = self.spec.downsample
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] % f or x.shape[-2] % f:
            raise VAEError(
                f"VAE {self.spec.name!r} needs (B, 3, H, W) images with sides divisible by {f}, "
                f"got {tuple(x.shape)}"
            )

    def encode(self, x: Tensor, eps: Tensor | None = None) -> Posterior:
        if self._kind == "diffusers-kl":
            dist = self.net.encode(x).latent_dist
            mean, logvar = dist.mean, dist.logvar
            z = mean if eps is None else mean + torch.exp(0.5 * logvar) * eps.to(mean.dtype)
            return Posterior(mean, logvar, z)
        z = self.net.encode((x + 1.0) / 2.0)
        return Posterior(z, None, z)

    def decode(self, z: Tensor) -> Tensor:
        if self._kind == "diffusers-kl":
            return self.net.decode(z).sample
        return self.net.decode(z) * 2.0 - 1.0


@dataclass(frozen=True)
class VAELossWeights:
    l1: float = 1.0
    lpips: float = 1.0
    kl: float = 1e-6
    gan: float = 0.1


def kl_to_standard_normal(post: Posterior) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over latent elements, averaged over the batch (fp32); 0 if deterministic."""
    if post.logvar is None:
        return post.mean.new_zeros((), dtype=torch.float32)
    mean, logvar = post.mean.float(), post.logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(dim=1).mean()


def autoencoder_losses(
    x: Tensor,
    recon: Tensor,
    post: Posterior,
    weights: VAELossWeights,
    lpips: nn.Module | None,
    disc: PatchDiscriminator | None,
    use_gan: bool,
) -> dict[str, Tensor]:
    """The autoencoder's loss terms and their weighted ``total`` (all fp32 scalars)."""
    xf, rf = x.float(), recon.float()
    terms = {"l1": (rf - xf).abs().mean(), "kl": kl_to_standard_normal(post)}
    zero = xf.new_zeros(())
    terms["lpips"] = lpips(rf, xf).mean() if lpips is not None and weights.lpips > 0 else zero
    if use_gan and disc is not None and weights.gan > 0:
        terms["gan"] = hinge_generator_loss(disc(recon))
    else:
        terms["gan"] = zero
    terms["total"] = (
        weights.l1 * terms["l1"]
        + weights.lpips * terms["lpips"]
        + weights.kl * terms["kl"]
        + weights.gan * terms["gan"]
    )
    return terms


def discriminator_loss(disc: PatchDiscriminator, x: Tensor, recon: Tensor) -> Tensor:
    """Hinge loss of the discriminator on real tiles vs (detached) reconstructions."""
    return hinge_discriminator_loss(disc(x), disc(recon.detach()))
