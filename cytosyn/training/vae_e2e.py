"""REPA-E stage 1 (``cytosyn tune-vae`` with ``mode: e2e``): the VAE and a SiT trained together from images.

Per step, in this order (the order REPA-E's training loop uses; RECIPE.md), with one draw of t, noise and
condition dropout shared by both passes:

1. **VAE update** — the SiT (and its latent BatchNorm) frozen and in eval mode: the VAE's latents ``z``
   (with gradient) are normalised with the BatchNorm's *running* statistics, noised, and passed through the
   SiT; the REPA loss of its block-``repa_depth`` tokens against the frozen encoder's patch tokens of the
   same images is added to the VAE losses with weight ``vae_repa_weight`` (1.5). Its gradient reaches the
   VAE *through* the frozen SiT. The diffusion loss is not part of this update.
2. **SiT update** — on ``z.detach()`` (stop-gradient: the diffusion loss never reaches the VAE),
   BatchNorm in training mode (batch statistics, running statistics updated): velocity MSE +
   ``sit_repa_weight`` (0.5) × REPA; AdamW, clipping, EMA (parameters and the BatchNorm's buffers).
3. **Discriminator update** (in :mod:`cytosyn.training.vae_tuning`).

The conditioning embedding (CLS) and the REPA targets (patch tokens) come from one frozen encoder run on the
images (CytoSyn uses H0-mini for both); its tokens are resized to the SiT grid by ``align_tokens``.
Losses and the latent normalisation run in fp32 whatever the autocast setting (the reported fp16 collapse).

Products: the tuned VAE (exported by the caller) and the stage-1 SiT's EMA as ``stage1_sit.pt`` in REPA-E's
checkpoint layout (``{"ema": {..., "bn.running_mean", "bn.running_var"}}``), which ``model.init_from`` of
``cytosyn train`` loads strictly with its latent statistics. REPA-E's best results come from training a
fresh SiT on the tuned VAE's latents (stage 2, ``cytosyn featurize`` + ``cytosyn train``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cytosyn.config import StrictModel


class E2EConfig(StrictModel):
    """The ``e2e:`` section of a ``tune-vae`` config (mode e2e)."""

    sit_preset: str = "SiT-XL/2"
    sit_overrides: dict[str, Any] = Field(default_factory=dict)  # any SiTConfig key (depth, repa_depth, ...)
    sit_init_from: Path | None = None  # a SiT / REPA-E checkpoint (strict load; its latent stats carried)
    encoder: str = "h0-mini"  # frozen encoder: CLS conditions the SiT, patch tokens are the REPA targets
    encoder_weights: Path | None = None
    encoder_random_init: bool = False  # tests only (recorded)
    condition: Literal["cls", "none"] = "cls"  # none: an unconditional SiT
    image_size: int = Field(224, ge=8)  # tile side the SiT is built for (data.crop when set)
    alignment: Literal["area", "bilinear", "adaptive_avg"] = "area"
    vae_repa_weight: float = Field(1.5, ge=0)
    sit_repa_weight: float = Field(0.5, ge=0)
    sit_lr: float = Field(1e-4, gt=0)
    sit_grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.9999, ge=0, le=1)
    cond_dropout: float = Field(0.1, ge=0, le=1)
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"


class E2EPart:
    """The SiT side of REPA-E stage 1: SiT, latent BatchNorm, frozen encoder, SiT optimiser and EMA."""

    def __init__(self, cfg: E2EConfig, ae: nn.Module, device: torch.device, tune_cfg: Any, ctx: Any = None):
        from cytosyn.diffusion import BatchNormLatentNorm, carry_latent_statistics
        from cytosyn.models import build_sit, load_sit_state_dict
        from cytosyn.models.encoders import load_encoder
        from cytosyn.models.sit import REPAE_BN_EPS
        from cytosyn.training.ema import EMA
        from cytosyn.training.vae_dist import DistContext

        self.cfg, self.device, self.seed = cfg, device, tune_cfg.seed
        self.ctx = ctx or DistContext()
        self.precision = tune_cfg.precision
        self._crop: int | None = tune_cfg.data.crop
        self.encoder = load_encoder(
            cfg.encoder, cfg.encoder_weights, random_init=cfg.encoder_random_init, seed=tune_cfg.seed
        ).to(device)
        self.encoder.eval().requires_grad_(False)
        size = tune_cfg.data.crop or cfg.image_size
        f, channels = ae.spec.downsample, ae.spec.latent_channels
        if size % f:
            raise ValueError(f"e2e: tiles of {size} px are not divisible by the VAE's downsampling {f}")
        torch.manual_seed(tune_cfg.seed)
        self.sit = build_sit(
            cfg.sit_preset,
            **{
                "input_size": size // f,
                "in_channels": channels,
                "cond_dim": self.encoder.spec.embed_dim if cfg.condition == "cls" else None,
                "cond_dropout": 0.0,  # drawn here, keyed on (seed, step)
                "repa_dim": self.encoder.spec.embed_dim,
            }
            | cfg.sit_overrides,
        ).to(device)
        self.norm = BatchNormLatentNorm(channels, eps=REPAE_BN_EPS).to(device)
        self.init_report = None
        if cfg.sit_init_from is not None:
            state = torch.load(cfg.sit_init_from, map_location="cpu", weights_only=False)
            try:
                self.init_report = load_sit_state_dict(self.sit, state, strict=True)
            except ValueError as err:
                raise ValueError(
                    f"e2e.sit_init_from {cfg.sit_init_from}: {err} (does the VAE's latent channels / "
                    f"downsampling match the checkpoint's SiT?)"
                ) from None
            if self.init_report.latent_stats:
                carry_latent_statistics(self.norm, self.init_report.latent_stats, REPAE_BN_EPS)
        self.net = nn.ModuleDict({"model": self.sit, "latent_norm": self.norm})
        self.opt = torch.optim.AdamW(self.sit.parameters(), lr=cfg.sit_lr, weight_decay=0.0)
        self.ema = EMA(self.net, decay=cfg.ema_decay, buffers="copy")
        self.phase = "idle"  # "vae" / "sit" while that update runs (tests hook on it)
        self._draws: tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None] | None = None

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def loader_members(self) -> list[str]:
        return []  # everything comes from the images

    # ---- per-step pieces -------------------------------------------------------------------------------

    def _step_draws(self, z: Tensor, batch: dict[str, Any], step: int):
        """t, noise, dropout, REPA targets and condition for this step: one draw for both passes."""
        from cytosyn.diffusion import sample_time
        from cytosyn.training.vae_tuning import random_crop, step_generator

        if self._draws is not None and self._draws[0] == step:
            return self._draws[1:]
        rank = self.ctx.rank
        gen = step_generator(self.seed, step, 2, rank)
        b = z.shape[0]
        t = sample_time(b, self.cfg.time_sampling, generator=gen).to(self.device)
        noise = torch.randn(tuple(z.shape), generator=gen).to(self.device)
        drop = (torch.rand(b, generator=gen) < self.cfg.cond_dropout).to(self.device)
        images = random_crop(batch["image"], self._crop, step_generator(self.seed, step, 1, rank))
        from cytosyn.models import align_tokens

        with torch.no_grad(), self.autocast():
            out = self.encoder(images.to(self.device), ("cls", "patch"))
        targets = align_tokens(out["patch"].float(), self.sit.cfg.grid_size, mode=self.cfg.alignment)
        cond = out["cls"].float() if self.cfg.condition == "cls" else None
        self._draws = (step, t, noise, drop, targets, cond)
        return self._draws[1:]

    def _sit_forward(self, x0: Tensor, t: Tensor, noise: Tensor, drop: Tensor, cond: Tensor | None):
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise
        with self.autocast():  # the SiT under bf16 autocast when asked; the losses are computed in fp32
            return self.sit(x_t, t, cond, uncond_mask=drop, return_repa=True)

    def vae_repa_term(
        self, total: Tensor, post: Any, batch: dict[str, Any], step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The VAE update's REPA loss (through the frozen, eval-mode SiT) added to the VAE loss."""
        from cytosyn.models import repa_loss

        self.phase = "vae"
        t, noise, drop, targets, cond = self._step_draws(post.z, batch, step)
        self.net.eval()
        self.sit.requires_grad_(False)
        x0 = self.norm.normalize(post.z.float())  # running statistics (eval mode), gradient to z
        _, tokens = self._sit_forward(x0, t, noise, drop, cond)
        loss = repa_loss(tokens, targets)
        return total + self.cfg.vae_repa_weight * loss, {"vae_repa": loss}

    def sit_update(
        self, z: Tensor, batch: dict[str, Any], step: int, clip_and_step: Callable[..., bool]
    ) -> dict[str, Tensor]:
        """The SiT update on detached latents: velocity MSE + sit_repa_weight × REPA; EMA.
        ``clip_and_step(opt, params, loss, clip)`` clips, and steps unless the loss or gradient norm is not
        finite (then the step is skipped and counted by the caller)."""
        from cytosyn.models import repa_loss

        self.phase = "sit"
        if z.requires_grad:
            raise ValueError("sit_update needs detached latents (the diffusion loss must not reach the VAE)")
        t, noise, drop, targets, cond = self._step_draws(z, batch, step)
        self.net.train()
        self.sit.requires_grad_(True)
        x0 = self.norm.normalize(z.float())  # batch statistics; running statistics updated
        v, tokens = self._sit_forward(x0, t, noise, drop, cond)
        diff = (v.float() - (noise - x0)).square().mean()
        repa = repa_loss(tokens, targets)
        loss = diff + self.cfg.sit_repa_weight * repa
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        ok = clip_and_step(self.opt, self.sit.parameters(), loss, self.cfg.sit_grad_clip)
        self.ctx.average_([self.norm.running_mean, self.norm.running_var])  # one estimate on every rank
        if ok:
            self.ema.update(self.net)
        self.phase = "idle"
        return {"diffusion": diff, "sit_repa": repa, "sit_skipped": torch.tensor(float(not ok))}

    # ---- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])

    def describe(self) -> dict[str, Any]:
        return {
            "sit": self.sit.cfg.model_dump(mode="json"),
            "encoder": self.encoder.describe(),
            "vae_repa_weight": self.cfg.vae_repa_weight,
            "sit_repa_weight": self.cfg.sit_repa_weight,
            "sit_init_from": str(self.cfg.sit_init_from) if self.cfg.sit_init_from else None,
        }

    def export_sit(self, path: Path) -> Path:
        """The stage-1 SiT's EMA in REPA-E's checkpoint layout (loadable by ``model.init_from``)."""
        ema = self.ema.module
        state = {k: v.detach().cpu() for k, v in ema["model"].state_dict().items()}
        bn = ema["latent_norm"].bn
        state |= {
            "bn.running_mean": bn.running_mean.detach().cpu(),
            "bn.running_var": bn.running_var.detach().cpu(),
            "bn.num_batches_tracked": bn.num_batches_tracked.detach().cpu(),
        }
        torch.save({"ema": state, "sit_config": self.sit.cfg.model_dump(mode="json")}, path)
        return path
