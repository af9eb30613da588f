"""``cytosyn tune-vae``: adapt an autoencoder to H&E before training the latent-diffusion model.

Two modes, one stage (REPA-E's best result is exactly this two-stage form: tune the VAE, then train the
final SiT on the frozen tuned VAE's latents; RECIPE.md):

- ``mode: finetune`` — the VAE alone, from packed image tiles: L1 + LPIPS + KL (KL autoencoders) +
  PatchGAN hinge (from ``losses.gan_start``), and the discriminator's own update
  (:mod:`cytosyn.training.vae_losses`).
- ``mode: e2e`` — REPA-E stage 1 (:mod:`cytosyn.training.vae_e2e`): the same VAE losses plus
  ``e2e.vae_repa_weight`` × the REPA loss *through the VAE* (SiT frozen for that update), and a SiT
  trained on the detached latents with ``e2e.sit_repa_weight`` × REPA.

Both end by exporting the tuned VAE (:mod:`cytosyn.models.tuned_vae`: weights in the base entry's own
format + ``tuned_vae.json`` + ``SHA256SUMS``) with a reconstruction report (PSNR, SSIM) on held-out
tiles, before vs after. Featurize then takes ``vae.name: <base entry>``, ``vae.weights: <folder>``.

Written as a plain PyTorch loop, not a LightningModule: REPA-E needs three optimisers stepped in a fixed
order with the SiT frozen in between, which Lightning's DeepSpeed strategy (one engine) cannot hold; the
stage is data-parallel over torchrun's processes by itself (:mod:`cytosyn.training.vae_dist`). Exact
resume: the checkpoint holds every module, every optimiser, every rank's loader position and the step; all
randomness is keyed on (seed, step, rank), so an interrupted run resumed on the same number of processes
reproduces the uninterrupted run's losses and weights bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from cytosyn.config import StrictModel, config_differences, config_hash, config_to_dict, write_resolved_config
from cytosyn.fileio import code_version
from cytosyn.training.vae_dist import DistContext

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cytosyn-vae-tune/1"
# Settings that may change between an interrupted run and its resume (they do not change a step).
HISTORY_LIMIT = 10_000  # per-step loss rows kept in memory and in the checkpoint
RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "log_every", "export")


class VAETuneError(RuntimeError):
    """A tuning run that cannot start or resume; the message says why and how to fix it."""


class TuneVAESection(StrictModel):
    name: str = "taef2"  # registry entry (taef2, sd-vae-ft-ema, sd-vae-ft-mse, sd3.5-vae, tiny-f8)
    weights: Path | None = None  # local weights (file or folder); None: the bundled / hub weights
    random_init: bool = False  # tests only (recorded)
    seed: int = 0


class TuneDataSection(StrictModel):
    train: Path = Path("dataset/train")  # a packed split with images (pack's output; no features needed)
    heldout: Path | None = Path("dataset/val")  # held-out-patient split for the reconstruction report
    heldout_tiles: int = Field(64, ge=1)  # tiles of ``heldout`` in the report (the first ones, in order)
    batch_size: int = Field(8, ge=1)
    # Train on random crops of this side (a multiple of the VAE's downsampling; keyed on seed and step);
    # None: whole tiles. The held-out report always uses whole tiles.
    crop: int | None = Field(None, ge=8)
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(256, ge=0)
    verify_hashes: bool = False


class TuneLossSection(StrictModel):
    l1: float = Field(1.0, ge=0)
    lpips: float = Field(1.0, ge=0)
    # A local torchvision VGG16 / AlexNet state dict (or a whole LPIPS state dict), or "off" to train
    # without LPIPS; there is no default: random LPIPS features would silently make a meaningless loss.
    lpips_weights: str | None = None
    lpips_net: Literal["vgg", "alex"] = "vgg"
    kl: float = Field(1e-6, ge=0)  # KL autoencoders only (a deterministic one has no posterior)
    gan: float = Field(0.1, ge=0)
    gan_start: int = Field(0, ge=0)  # first step with the adversarial term and discriminator updates
    disc_width: int = Field(64, ge=4)
    disc_layers: int = Field(3, ge=1)

    @field_validator("lpips_weights", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false: that is the explicit "off" the user wrote.
        if value is False:
            return "off"
        if value is True:
            raise ValueError("expected a weights path or off")
        return value

    @property
    def lpips_off(self) -> bool:
        return self.lpips == 0 or (self.lpips_weights or "").strip().lower() == "off"


class TuneOptimSection(StrictModel):
    lr: float = Field(1e-4, gt=0)  # autoencoder
    disc_lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_skipped_in_a_row: int = Field(20, ge=1)  # non-finite losses/gradients: skipped, counted, then stop


class TuneVAEConfig(StrictModel):
    run_dir: Path = Path("runs/vae_tune")
    seed: int = 0
    mode: Literal["finetune", "e2e"] = "finetune"
    max_steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(10, ge=1)
    device: str = "auto"  # auto: cuda when available
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: networks under autocast; losses, norms, weights fp32
    export: Path | None = None  # the tuned VAE folder; default <run_dir>/vae
    vae: TuneVAESection = Field(default_factory=TuneVAESection)
    data: TuneDataSection = Field(default_factory=TuneDataSection)
    losses: TuneLossSection = Field(default_factory=TuneLossSection)
    optim: TuneOptimSection = Field(default_factory=TuneOptimSection)
    e2e: dict[str, Any] = Field(default_factory=dict)  # mode e2e: see cytosyn.training.vae_e2e.E2EConfig

    @model_validator(mode="after")
    def _check(self) -> TuneVAEConfig:
        if self.losses.lpips > 0 and not self.losses.lpips_weights:
            raise ValueError(
                "losses.lpips_weights: LPIPS needs local pretrained weights (a torchvision vgg16/alexnet "
                "state dict; nothing is downloaded), or set losses.lpips_weights: off to train without it "
                "(recorded in the run and the exported VAE)"
            )
        if self.mode == "finetune" and self.e2e:
            raise ValueError("e2e: settings given but mode is finetune")
        if self.mode == "e2e":
            from cytosyn.training.vae_e2e import E2EConfig

            E2EConfig.model_validate(self.e2e)
        return self

    @property
    def export_dir(self) -> Path:
        return self.export if self.export is not None else self.run_dir / "vae"


@dataclass
class TuneResult:
    steps: int
    skipped: int
    export: Path
    descriptor: dict[str, Any]
    report: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


# ---- pieces -----------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, stream: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU generator keyed on (seed, step, stream, rank): the same draws on a resumed run."""
    digest = hashlib.sha256(f"cytosyn-vae-tune:{seed}:{step}:{stream}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def build_lpips(cfg: TuneLossSection, device: torch.device) -> tuple[nn.Module | None, dict[str, Any]]:
    if cfg.lpips_off:
        return None, {"lpips": "off (explicit: losses.lpips_weights = off or losses.lpips = 0)"}
    from cytosyn.models.lpips import LPIPSLoss

    loss = LPIPSLoss(cfg.lpips_weights, cfg.lpips_net).to(device)  # type: ignore[arg-type]
    return loss, {"lpips": loss.record}


def images_to_model_range(batch_images: Tensor, device: torch.device) -> Tensor:
    """uint8 (B, 3, H, W) → float32 in [−1, 1] on ``device``."""
    return batch_images.to(device, non_blocking=True).float() / 127.5 - 1.0


def random_crop(x: Tensor, size: int | None, gen: torch.Generator) -> Tensor:
    """A ``size``×``size`` crop per sample at offsets drawn from ``gen`` (whole tiles when ``size`` is None)."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise VAETuneError(f"data.crop {size} is larger than the tiles ({h}×{w})")
    ys = torch.randint(0, h - size + 1, (x.shape[0],), generator=gen).tolist()
    xs = torch.randint(0, w - size + 1, (x.shape[0],), generator=gen).tolist()
    return torch.stack([img[:, y : y + size, x0 : x0 + size] for img, y, x0 in zip(x, ys, xs)])


def read_heldout(cfg: TuneVAEConfig) -> Tensor | None:
    """The first ``heldout_tiles`` images of the held-out split, in the split's order (uint8 B×3×H×W)."""
    if cfg.data.heldout is None:
        return None
    from cytosyn.data import LoaderConfig, build_loader

    n = cfg.data.heldout_tiles
    loader = build_loader(
        cfg.data.heldout,
        LoaderConfig(batch_size=min(n, 16), num_workers=0, shuffle_buffer=0, members=["image"], seed=0),
    )
    chunks, have = [], 0
    for batch in loader:
        chunks.append(batch["image"])
        have += batch["image"].shape[0]
        if have >= n:
            break
    if not chunks:
        raise VAETuneError(f"held-out split {cfg.data.heldout} has no images")
    return torch.cat(chunks)[:n]


RECONSTRUCTIONS_DIR = "reconstructions"  # <run_dir>/reconstructions/{original,base,tuned}/00000.png ...


def write_tiles(folder: Path, images: Tensor) -> Path:
    """uint8 tiles (B, 3, H, W) → ``folder/00000.png ...``, replaced as a whole (written beside, then
    renamed), so a folder is never half old, half new."""
    import shutil

    from PIL import Image

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, img in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        Image.fromarray(img).save(tmp / f"{i:05d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


@torch.no_grad()
def reconstruction_metrics(
    ae: nn.Module, images: Tensor, device: torch.device, batch: int = 8, save_to: Path | None = None
) -> dict[str, Any]:
    """PSNR (dB, per tile then averaged) and SSIM (Gaussian 11×11, σ 1.5) of posterior-mean reconstructions
    of uint8 tiles, on [0, 1] images clamped like a decoded tile. ``save_to``: also write the
    reconstructions there as PNG (rounded to uint8), for an rFID by ``cytosyn eval`` (training does not
    import ``eval``: DESIGN.md)."""
    from cytosyn.compat import import_torchvision

    import_torchvision()
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    was_training = ae.training
    ae.eval()
    psnr, ssims, tiles = [], [], []
    for i in range(0, images.shape[0], batch):
        x = images_to_model_range(images[i : i + batch], device)
        rec = ae.decode(ae.encode(x).mean).float().clamp(-1, 1)
        a, b = (rec + 1) / 2, (x + 1) / 2
        mse = (a - b).square().reshape(a.shape[0], -1).mean(dim=1).clamp_min(1e-12)
        psnr.append(10 * torch.log10(1.0 / mse))
        ssims.append(ssim(a, b, data_range=1.0, reduction="none"))
        if save_to is not None:
            tiles.append((a * 255).round().to(torch.uint8).cpu())
    ae.train(was_training)
    if save_to is not None:
        write_tiles(save_to, torch.cat(tiles))
    p, s = torch.cat(psnr).double(), torch.cat(ssims).double()
    return {
        "tiles": int(p.numel()),
        "psnr_db": float(p.mean()),
        "psnr_db_std": float(p.std()) if p.numel() > 1 else 0.0,
        "ssim": float(s.mean()),
    }


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resume_settings(cfg: TuneVAEConfig) -> dict[str, Any]:
    data = config_to_dict(cfg)
    for key in RESUMABLE_CHANGES:
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node[p]
        node.pop(parts[-1], None)
    return data


# ---- the run ----------------------------------------------------------------------------------------------


class _Tuner:
    """Everything a step touches; ``state_dict`` / ``load_state_dict`` cover all of it (exact resume)."""

    def __init__(self, cfg: TuneVAEConfig, device: torch.device, ctx: DistContext | None = None):
        from cytosyn.models.discriminator import PatchDiscriminator
        from cytosyn.models.vae import load_vae
        from cytosyn.training.vae_losses import TrainableAutoencoder, VAELossWeights

        self.cfg, self.device = cfg, device
        self.ctx = ctx or DistContext()
        v = cfg.vae
        vae = load_vae(v.name, v.weights, random_init=v.random_init, seed=v.seed)
        self.ae = TrainableAutoencoder(vae).to(device)
        self.lpips, self.lpips_record = build_lpips(cfg.losses, device)
        torch.manual_seed(cfg.seed)
        self.disc = PatchDiscriminator(3, cfg.losses.disc_width, cfg.losses.disc_layers).to(device)
        o = cfg.optim
        self.opt_vae = torch.optim.AdamW(
            self.ae.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay
        )
        self.opt_disc = torch.optim.AdamW(
            self.disc.parameters(), lr=o.disc_lr, betas=o.betas, weight_decay=o.weight_decay
        )
        self.weights = VAELossWeights(cfg.losses.l1, cfg.losses.lpips, cfg.losses.kl, cfg.losses.gan)
        if self.ae.deterministic:
            self.weights = VAELossWeights(self.weights.l1, self.weights.lpips, 0.0, self.weights.gan)
        self.e2e = None
        if cfg.mode == "e2e":
            from cytosyn.training.vae_e2e import E2EConfig, E2EPart

            try:
                self.e2e = E2EPart(E2EConfig.model_validate(cfg.e2e), self.ae, device, cfg, self.ctx)
            except ValueError as err:  # the SiT / checkpoint / tile size does not fit this VAE
                raise VAETuneError(str(err)) from None
        self.step = 0
        self.skipped = 0
        self.skipped_in_a_row = 0
        self.history: list[dict[str, float]] = []
        self.before: dict[str, Any] | None = None

    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One step: the VAE update (and, in e2e mode, the SiT update), then the discriminator's."""
        from cytosyn.training.vae_losses import autoencoder_losses, discriminator_loss

        cfg = self.cfg
        rank = self.ctx.rank
        crop_gen = step_generator(cfg.seed, self.step, 1, rank)
        x = random_crop(images_to_model_range(batch["image"], self.device), cfg.data.crop, crop_gen)
        self.ae.check_images(x)
        eps = None
        if not self.ae.deterministic:
            f, c = self.ae.spec.downsample, self.ae.spec.latent_channels
            shape = (x.shape[0], c, x.shape[2] // f, x.shape[3] // f)
            eps = torch.randn(shape, generator=step_generator(cfg.seed, self.step, 0, rank)).to(self.device)
        use_gan = self.step >= cfg.losses.gan_start and cfg.losses.gan > 0
        self.disc.requires_grad_(False)
        with self.autocast():
            post = self.ae.encode(x, eps)
            recon = self.ae.decode(post.z)
        terms = autoencoder_losses(
            x, recon, post, self.weights, self.lpips, self.disc if use_gan else None, use_gan
        )
        total = terms["total"]
        extra: dict[str, Tensor] = {}
        if self.e2e is not None:
            total, extra = self.e2e.vae_repa_term(total, post, batch, self.step)
            terms["total"] = total
        self.opt_vae.zero_grad(set_to_none=True)
        total.backward()
        ok = self._clip_and_step(self.opt_vae, self.ae.parameters(), total)
        if self.e2e is not None:
            extra |= self.e2e.sit_update(post.z.detach(), batch, self.step, self._clip_and_step)
        d_loss = torch.zeros((), device=self.device)
        if use_gan:
            self.disc.requires_grad_(True)
            with self.autocast():
                d_loss = discriminator_loss(self.disc, x, recon)
            self.opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            ok = self._clip_and_step(self.opt_disc, self.disc.parameters(), d_loss) and ok
        row = {k: float(v.detach()) for k, v in terms.items()} | {"disc": float(d_loss.detach())}
        row |= {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in extra.items()}
        row["step"] = float(self.step)
        row["skipped"] = float(not ok)
        self.step += 1
        return row

    def _clip_and_step(
        self, opt: torch.optim.Optimizer, params, loss: Tensor, clip: float | None = None
    ) -> bool:
        """Average gradients over ranks, clip, and step unless the (rank-mean) loss or the gradient norm is
        not finite (then skipped and counted: the same decision on every rank)."""
        params = [p for p in params if p.grad is not None]
        self.ctx.average_grads(params)
        loss = self.ctx.mean(loss.detach())
        clip = self.cfg.optim.grad_clip if clip is None else clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        if not (math.isfinite(float(loss.detach())) and math.isfinite(float(norm))):
            opt.zero_grad(set_to_none=True)
            self.skipped += 1
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.cfg.optim.max_skipped_in_a_row:
                raise VAETuneError(
                    f"{self.skipped_in_a_row} steps in a row had a non-finite loss or gradient (step "
                    f"{self.step}); lower the learning rate or check the data"
                )
            log.warning("step %d: non-finite loss or gradient, skipped (%d so far)", self.step, self.skipped)
            return False
        opt.step()
        self.skipped_in_a_row = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        state = {
            "vae": self.ae.net.state_dict(),
            "disc": self.disc.state_dict(),
            "opt_vae": self.opt_vae.state_dict(),
            "opt_disc": self.opt_disc.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "skipped_in_a_row": self.skipped_in_a_row,
            "history": self.history,
            "before": self.before,
        }
        if self.e2e is not None:
            state["e2e"] = self.e2e.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ae.net.load_state_dict(state["vae"])
        self.disc.load_state_dict(state["disc"])
        self.opt_vae.load_state_dict(state["opt_vae"])
        self.opt_disc.load_state_dict(state["opt_disc"])
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        self.skipped_in_a_row = int(state["skipped_in_a_row"])
        self.history = list(state["history"])
        self.before = state["before"]
        if self.e2e is not None:
            self.e2e.load_state_dict(state["e2e"])


def run_vae_tuning(cfg: TuneVAEConfig, force: bool = False) -> TuneResult:
    """Tune (or resume tuning) the VAE of ``cfg`` and export it; see the module docstring. Under torchrun
    (``WORLD_SIZE`` > 1) every process trains on its share of the data with averaged gradients; rank 0
    logs, checkpoints, measures the held-out report and exports."""
    ctx = DistContext.from_env(cfg.device)
    try:
        return _run(cfg, force, ctx)
    finally:
        ctx.close()


def _check_run_dir(cfg: TuneVAEConfig, force: bool, ctx: DistContext) -> None:
    run_dir = cfg.run_dir
    settings_path = run_dir / "settings.json"
    settings = _resume_settings(cfg)
    if settings_path.is_file() and not force:
        old = json.loads(settings_path.read_text())
        if config_hash(old) != config_hash(settings):
            raise VAETuneError(
                f"{run_dir} holds a tuning run with other settings ({'; '.join(config_differences(old, settings))}); "
                f"use another run_dir, or --force to start over"
            )
    ctx.barrier()  # every rank has read the old settings before rank 0 replaces them
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if force:
            (run_dir / "checkpoints" / "last.pt").unlink(missing_ok=True)
            (run_dir / "log.jsonl").unlink(missing_ok=True)
        settings_path.write_text(json.dumps(settings, indent=2, sort_keys=True))
        write_resolved_config(cfg, run_dir / "config.yaml")
    ctx.barrier()


def _run(cfg: TuneVAEConfig, force: bool, ctx: DistContext) -> TuneResult:
    from cytosyn.data import LoaderConfig, build_loader

    run_dir = cfg.run_dir
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    log_path = run_dir / "log.jsonl"
    _check_run_dir(cfg, force, ctx)
    device = ctx.device(cfg.device)
    tuner = _Tuner(cfg, device, ctx)
    heldout = read_heldout(cfg) if ctx.is_main else None
    try:
        loader = build_loader(
            cfg.data.train,
            LoaderConfig(
                batch_size=cfg.data.batch_size,
                num_workers=cfg.data.num_workers,
                shuffle_buffer=cfg.data.shuffle_buffer,
                mode="resampled",
                seed=cfg.seed,
                members=["image", *(tuner.e2e.loader_members() if tuner.e2e else [])],
                verify_hashes=cfg.data.verify_hashes,
            ),
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
    except ValueError as err:
        raise VAETuneError(f"training split {cfg.data.train}: {err}") from None
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise VAETuneError(f"{ckpt_path}: not a cytosyn tune-vae checkpoint")
        if len(state["loaders"]) != ctx.world_size:
            raise VAETuneError(
                f"{ckpt_path} was written by {len(state['loaders'])} processes; resume it on as many "
                f"(exact resume needs the same world size), or start a new run_dir"
            )
        tuner.load_state_dict(state["tuner"])
        loader.load_state_dict(state["loaders"][ctx.rank], strict=True)
        log.info("resumed %s at step %d", ckpt_path, tuner.step)
        if ctx.is_main and log_path.is_file():  # rows logged after the checkpoint are redone: drop them
            rows = [r for r in log_path.read_text().splitlines() if r and json.loads(r)["step"] < tuner.step]
            log_path.write_text("".join(r + "\n" for r in rows))
    elif heldout is not None:
        recon = run_dir / RECONSTRUCTIONS_DIR  # heldout is read on the main process only
        tuner.before = reconstruction_metrics(tuner.ae, heldout, device, save_to=recon / "base")
        write_tiles(recon / "original", heldout)

    with open(log_path, "a") if ctx.is_main else open(os.devnull, "w") as logf:
        stream = iter(loader)
        while tuner.step < cfg.max_steps:
            try:
                batch = next(stream)
            except RuntimeError as err:  # e.g. a split whose samples have no image
                raise VAETuneError(f"training split {cfg.data.train}: {err}") from None
            row = tuner.train_step(batch)
            tuner.history.append(row)
            del tuner.history[:-HISTORY_LIMIT]  # log.jsonl has the whole run; the checkpoint stays small
            if tuner.step % cfg.log_every == 0 or tuner.step == cfg.max_steps:
                logf.write(json.dumps(row) + "\n")
                logf.flush()
                log.info("step %d: %s", tuner.step, {k: round(v, 5) for k, v in row.items()})
            if tuner.step % cfg.checkpoint_every == 0 or tuner.step == cfg.max_steps:
                loaders = ctx.gather(loader.state_dict())
                if ctx.is_main:
                    _atomic_save(
                        {
                            "format": CHECKPOINT_FORMAT,
                            "tuner": tuner.state_dict(),
                            "loaders": loaders,
                            "world_size": ctx.world_size,
                            "code_version": code_version(),
                        },
                        ckpt_path,
                    )
                ctx.barrier()
    if not ctx.is_main:
        desc = ctx.broadcast(None)
        return TuneResult(tuner.step, tuner.skipped, cfg.export_dir, desc, {}, tuner.history)
    desc, report = _export(cfg, tuner, heldout, device, run_dir)
    ctx.broadcast(desc)
    return TuneResult(tuner.step, tuner.skipped, cfg.export_dir, desc, report, tuner.history)


def _export(
    cfg: TuneVAEConfig, tuner: _Tuner, heldout: Tensor | None, device: torch.device, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    recon = run_dir / RECONSTRUCTIONS_DIR
    after = (
        reconstruction_metrics(tuner.ae, heldout, device, save_to=recon / "tuned")
        if heldout is not None
        else None
    )
    report = {
        "heldout_split": str(cfg.data.heldout) if cfg.data.heldout else None,
        "before": tuner.before,
        "after": after,
        "psnr_gain_db": (after["psnr_db"] - tuner.before["psnr_db"]) if after and tuner.before else None,
        "ssim_gain": (after["ssim"] - tuner.before["ssim"]) if after and tuner.before else None,
        "rfid": "not computed here (training does not import eval): the held-out tiles and their base and tuned "
        f"reconstructions are PNG folders under {recon}/{{original,base,tuned}}; docs/training.md shows the "
        "`cytosyn eval` config that gives their Fréchet distances"
        if heldout is not None
        else None,
        "reconstruction": "posterior mean (deterministic), clamped to [-1, 1], compared on [0, 1]",
    }
    from cytosyn.models.tuned_vae import export_tuned_vae

    descriptor = {
        "base_weights": tuner.ae.start_weights,
        "mode": cfg.mode,
        "steps": tuner.step,
        "skipped_steps": tuner.skipped,
        "losses": {
            "l1": tuner.weights.l1,
            "lpips_weight": tuner.weights.lpips if tuner.lpips is not None else 0.0,
            "kl": tuner.weights.kl,
            "gan": tuner.weights.gan,
            "gan_start": cfg.losses.gan_start,
        }
        | tuner.lpips_record,
        "config_hash": config_hash(cfg),
        "code_version": code_version(),
    }
    if tuner.e2e is not None:
        descriptor["e2e"] = tuner.e2e.describe()
        tuner.e2e.export_sit(run_dir / "stage1_sit.pt")
    tuner.ae.eval()
    desc = export_tuned_vae(tuner.ae.wrapper, cfg.export_dir, descriptor, report)
    return desc, report
