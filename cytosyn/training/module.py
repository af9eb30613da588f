"""The LightningModule that trains a SiT latent-diffusion model on featurized tiles.

One training step (``optim`` steps are counted separately from micro-batches):

1. latents: z = mean + σ·ε from the stored VAE moments, normalised (the split's statistics, or an
   affine-free BatchNorm whose running statistics are part of the model and of its EMA);
2. per sample, t, the noise and the null-condition draw come from a generator seeded with
   (seed, micro-batch index, sample key) — so the run is a pure function of its inputs: resuming from a
   checkpoint, or running the same global batch on 1 or 8 processes, draws exactly the same numbers;
3. velocity loss + ``repa.weight`` × REPA loss (tokens after block ``repa_depth`` vs the encoder's patch
   tokens, resized to the SiT grid);
4. optimisation by hand (Lightning's manual mode): gradient accumulation with gradient sync only on the
   last micro-batch, clipping, AdamW with linear warm-up, EMA update. A non-finite loss on any rank
   skips the whole optimizer step on every rank (and is counted); too many in a row stop the run.

Validation (rank 0, every ``validation.every_n_steps``): the velocity loss at fixed t values with fixed
noise on held-out-patient tiles and on a fixed set of training-patient tiles; their difference is the
overfitting signal.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from cytosyn.config import config_hash
from cytosyn.data import LoaderConfig, build_loader
from cytosyn.diffusion import BatchNormLatentNorm, FixedLatentNorm, sample_time
from cytosyn.fileio import code_version
from cytosyn.manifest import FeatureEntry, SplitManifest
from cytosyn.models import align_tokens, build_sit, load_sit_state_dict, repa_loss
from cytosyn.models.vae import latents_from_moments
from cytosyn.training.config import TrainConfig
from cytosyn.training.ema import EMA

log = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """The featurized split does not provide what the config asks for."""


def _feature(manifest: SplitManifest, member: str, where: Path) -> FeatureEntry:
    for f in manifest.features:
        if f.member == member:
            return f
    have = [f.member for f in manifest.features] or "none"
    raise TrainingDataError(
        f"split {where} has no {member!r} member (it has: {have}); run `cytosyn featurize` with that encoder "
        f"or change data.condition / data.repa_target"
    )


def split_features(cfg: TrainConfig, manifest: SplitManifest, where: Path) -> dict[str, Any]:
    """What the model needs from a featurized split: condition width, latent shape and statistics."""
    cond = _feature(manifest, f"{cfg.data.condition}.npy", where)
    vae = _feature(manifest, "vae.npy", where)
    stats = vae.details.get("latent_stats")
    if not stats:
        raise TrainingDataError(
            f"split {where}: vae.npy has no latent statistics in its manifest (re-run featurize)"
        )
    deterministic = bool(vae.details.get("deterministic", False)) or int(vae.details["shape"][0]) == 1
    repa_dim = None
    if cfg.repa.weight > 0 and cfg.data.repa_target:
        target = _feature(manifest, f"{cfg.data.repa_target}.npy", where)
        repa_dim = int(target.details["shape"][-1])
    info = {
        "cond_dim": int(cond.details["shape"][-1]),
        "cond_model": cond.model_id,
        "cond_weights": cond.details.get("weights"),
        "latent_channels": int(vae.details["shape"][1]),
        "latent_size": int(vae.details["shape"][2]),
        "latent_mean": stats["mean"],
        # Training on samples z = mean + σ·ε normalises by their std; training on the means by the means' std
        # (a deterministic autoencoder has no σ: both are the same).
        "latent_std": stats["std"]
        if cfg.diffusion.sample_posterior and not deterministic
        else stats["mean_std"],
        "vae": {
            "model_id": vae.model_id,
            "weights": vae.details.get("weights"),
            "latent_channels": int(vae.details["shape"][1]),
            "downsample": vae.details.get("downsample"),
            "deterministic": deterministic,
        },
        "repa_dim": repa_dim,
    }
    return info


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class LatentDiffusionModule(L.LightningModule):
    def __init__(self, cfg: TrainConfig, features: dict[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.features = features
        self.automatic_optimization = False
        repa_dim = features["repa_dim"]
        if cfg.repa.weight > 0 and cfg.repa.online_encoder:
            from cytosyn.models.encoders import get_spec

            repa_dim = get_spec(cfg.repa.online_encoder).embed_dim
        sit_args = {
            "input_size": features["latent_size"],
            "in_channels": features["latent_channels"],
            "cond_dim": features["cond_dim"],
            # The training step draws the null condition itself (keyed per sample), so the model's own draw is off.
            "cond_dropout": 0.0,
            "repa_dim": repa_dim if cfg.repa.weight > 0 else None,
            "grad_checkpointing": cfg.trainer.grad_checkpointing,
        } | cfg.model.overrides
        model = build_sit(cfg.model.preset, **sit_args)
        if cfg.model.init_from is not None:
            state = torch.load(cfg.model.init_from, map_location="cpu", weights_only=False)
            log.info("init from %s: %s", cfg.model.init_from, load_sit_state_dict(model, state).summary())
        if cfg.diffusion.latent_norm == "fixed":
            norm: nn.Module = FixedLatentNorm(
                torch.tensor(features["latent_mean"]), torch.tensor(features["latent_std"])
            )
        else:
            norm = BatchNormLatentNorm(features["latent_channels"])
        self.net = nn.ModuleDict({"model": model, "latent_norm": norm})
        self.ema = EMA(self.net, decay=cfg.ema.decay, buffers=cfg.ema.buffers)
        self.online_encoder = None
        self.micro_step = 0  # micro-batches trained (skipped ones included): the randomness counter
        self.skipped_steps = 0
        self._bad_window = False
        self._consecutive_bad = 0
        self._loader = None
        self._loader_state_to_restore: list[dict] | None = None
        self._last_loader_state: dict | None = None
        self._val_sets: dict[str, tuple[Tensor, Tensor, Tensor | None]] | None = None
        self._t_last = None
        # Per micro-batch losses of this process (tests, short runs); bounded so long runs do not grow it.
        self.history: deque[dict[str, float]] = deque(maxlen=100_000)

    # ---- data ------------------------------------------------------------------------------------------

    def train_dataloader(self):
        cfg = self.cfg
        members = [f"{cfg.data.condition}.npy", "vae.npy"]
        if cfg.data.repa_target and cfg.repa.weight > 0:
            members.append(f"{cfg.data.repa_target}.npy")
        loader_cfg = LoaderConfig(
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            mode=cfg.data.mode,
            seed=cfg.seed,
            members=members + (["image"] if cfg.repa.online_encoder else []),
        )
        self._loader = build_loader(
            cfg.data.train, loader_cfg, rank=self.global_rank, world_size=self.trainer.world_size
        )
        if self._loader_state_to_restore is not None:
            states = self._loader_state_to_restore
            state = states[self.global_rank] if self.global_rank < len(states) else states[0]
            self._loader.load_state_dict(state)
        return _LoaderWithState(self._loader)

    def _randomness(self, keys: list[str], shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-sample t, noise, posterior ε and dropout draw, from (seed, micro-batch, key)."""
        ts, noises, eps, drops = [], [], [], []
        d = self.cfg.diffusion
        for key in keys:
            g = torch.Generator().manual_seed(sample_seed(self.cfg.seed, self.micro_step, key))
            ts.append(sample_time(1, d.time_sampling, d.logit_mean, d.logit_std, generator=g))
            noises.append(torch.randn(shape, generator=g))
            eps.append(torch.randn(shape, generator=g))
            drops.append(torch.rand(1, generator=g) < self.cfg.model.cond_dropout)
        dev = self.device
        return (
            torch.cat(ts).to(dev),
            torch.stack(noises).to(dev),
            torch.stack(eps).to(dev),
            torch.cat(drops).to(dev),
        )

    def _latents(self, moments: Tensor, eps: Tensor | None) -> Tensor:
        z = latents_from_moments(moments.to(self.device, torch.float32), eps)
        return self.net["latent_norm"].normalize(z)

    def _repa_targets(self, batch: dict[str, Any], grid: int) -> Tensor | None:
        cfg = self.cfg
        if cfg.repa.weight <= 0:
            return None
        if cfg.repa.online_encoder:
            enc = self._get_online_encoder()
            with torch.no_grad():
                tokens = enc(batch["image"].to(self.device), ("patch",))["patch"]
        else:
            tokens = batch[cfg.data.repa_target].to(self.device)
        return align_tokens(tokens.float(), grid, mode=cfg.repa.alignment)

    def _get_online_encoder(self):
        if self.online_encoder is None:
            from cytosyn.models.encoders import load_encoder

            r = self.cfg.repa
            enc = load_encoder(r.online_encoder, r.online_weights, random_init=r.online_random_init)
            object.__setattr__(
                self, "online_encoder", enc.to(self.device)
            )  # not a submodule: frozen, not saved
        return self.online_encoder

    # ---- training --------------------------------------------------------------------------------------

    def _losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        model = self.net["model"]
        keys = list(batch["__key__"])
        self._last_keys = sample_seed(*keys)  # a fingerprint of the batch, for resume checks
        moments = batch["vae"]
        shape = tuple(moments.shape[2:])
        t, noise, eps, drop = self._randomness(keys, shape)
        x0 = self._latents(moments, eps if self.cfg.diffusion.sample_posterior else None)
        cond = batch[self.cfg.data.condition].to(self.device, torch.float32)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        target_tokens = self._repa_targets(batch, model.cfg.grid_size)
        if target_tokens is not None:
            v, tokens = model(x_t, t, cond, uncond_mask=drop, return_repa=True)
            loss_repa = repa_loss(tokens, target_tokens)
        else:
            v = model(x_t, t, cond, uncond_mask=drop)
            loss_repa = torch.zeros((), device=self.device)
        loss_diff = (v.float() - (noise - x0)).square().mean()
        return loss_diff + self.cfg.repa.weight * loss_repa, loss_diff, loss_repa

    def _all_ranks_finite(self, value: Tensor) -> bool:
        flag = torch.tensor(float(torch.isfinite(value).all()), device=self.device)
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.cfg
        opt = self.optimizers()
        accum = cfg.trainer.accumulate_grad_batches
        last_micro = (self.micro_step + 1) % accum == 0
        if self._t_last is None:
            self._t_last = time.perf_counter()
        loss, loss_diff, loss_repa = self._losses(batch)
        if not self._all_ranks_finite(loss):
            self._bad_window = True
            log.warning(
                "non-finite loss at micro-batch %d (step %d): skipping this step",
                self.micro_step,
                self.global_step,
            )
        if not self._bad_window:
            with opt.toggle_model(sync_grad=last_micro):
                self.manual_backward(loss / accum)
        self._last_loader_state = batch.get("__loader_state__")
        self.micro_step += 1
        if last_micro:
            self._optimizer_step(opt)
        self._log_step(loss, loss_diff, loss_repa, last_micro)

    def _optimizer_step(self, opt) -> None:
        cfg = self.cfg
        params = [p for p in self.net.parameters() if p.requires_grad]
        norms = self._grad_norms() if self._should_log() else {}
        total = torch.tensor(0.0)
        if not self._bad_window and self.trainer.strategy.__class__.__name__ != "DeepSpeedStrategy":
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            total = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if not torch.isfinite(total):  # gradients are synced: every rank sees the same norm
                self._bad_window = True
                log.warning("non-finite gradient norm at step %d: skipping this step", self.global_step)
        if self._bad_window:
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._consecutive_bad += 1
            self._bad_window = False
            if self._consecutive_bad >= cfg.trainer.max_consecutive_nonfinite:
                raise FloatingPointError(
                    f"{self._consecutive_bad} optimizer steps in a row had a non-finite loss or gradient "
                    f"(last at step {self.global_step}); stopping. The last good checkpoint is intact in "
                    f"{cfg.run_dir / 'checkpoints'}; lower optim.lr or check the data."
                )
            return
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self.ema.update(self.net)
        self._consecutive_bad = 0
        if norms:
            norms["grad_norm/total"] = float(total)
            self.log_dict(norms, on_step=True, rank_zero_only=True)

    def _grad_norms(self) -> dict[str, float]:
        """Gradient norm per top-level module group (before clipping), for spotting a collapse early."""
        groups: dict[str, float] = {}
        for name, p in self.net["model"].named_parameters():
            if p.grad is None:
                continue
            group = name.split(".")[0]
            groups[group] = groups.get(group, 0.0) + float(p.grad.detach().float().square().sum())
        return {f"grad_norm/{k}": math.sqrt(v) for k, v in groups.items()}

    def _should_log(self) -> bool:
        every = self.cfg.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def _log_step(self, loss: Tensor, loss_diff: Tensor, loss_repa: Tensor, last_micro: bool) -> None:
        world = self.trainer.world_size
        images_seen = self.micro_step * self.cfg.data.batch_size * world
        values = {
            "train/loss": loss.detach(),
            "train/loss_diffusion": loss_diff.detach(),
            "train/loss_repa": loss_repa.detach(),
        }
        self.log_dict(values, on_step=True, prog_bar=False, sync_dist=world > 1)
        self.log("images_seen", float(images_seen), on_step=True, prog_bar=True)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        if last_micro:
            now = time.perf_counter()
            dt = now - self._t_last
            self._t_last = now
            imgs = self.cfg.images_per_step
            self.log("perf/images_per_s", imgs / dt, on_step=True)
            self.log("perf/images_per_s_per_device", imgs / dt / world, on_step=True)
            self.log("lr", self.lr_schedulers().get_last_lr()[0], on_step=True)
            if self.device.type == "cuda":
                self.log("perf/max_memory_gb", torch.cuda.max_memory_allocated() / 2**30, on_step=True)
        self.history.append(
            {"micro_step": self.micro_step, "loss": float(loss.detach()), "keys": self._last_keys}
        )

    def configure_optimizers(self):
        o = self.cfg.optim
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        warm = max(1, o.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation on held-out patients ------------------------------------------------------------

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        v = self.cfg.validation
        at_boundary = self.micro_step % self.cfg.trainer.accumulate_grad_batches == 0
        step = self.global_step
        if not at_boundary or step == 0 or step == self._last_validated or self.global_rank != 0:
            return
        if v.every_n_steps and step % v.every_n_steps == 0:
            self.log_dict(self.validation_losses(), rank_zero_only=True)
        if v.sample_grid_every_n_steps and step % v.sample_grid_every_n_steps == 0:
            self.write_sample_grid(Path(self.cfg.run_dir) / "samples" / f"step-{step:08d}.png")
        self._last_validated = step

    _last_validated = -1

    def _grid_vae(self):
        """The featurized split's VAE: rebuilt from its seed if random, else from validation.vae_weights."""
        from cytosyn.models.vae import VAEError, check_vae_matches, load_vae_as_recorded

        info = self.features["vae"]
        try:
            vae = load_vae_as_recorded(info["model_id"], info["weights"], self.cfg.validation.vae_weights)
            check_vae_matches(vae, info, "sample grid")
            return vae
        except VAEError as err:
            raise TrainingDataError(f"sample grid: {err}") from None

    @torch.no_grad()
    def write_sample_grid(self, path: Path) -> Path:
        """Tiles generated by the EMA model from a few fixed conditions (top: real tiles' latents decoded)."""
        from PIL import Image

        from cytosyn.sampling import SamplerConfig, sample

        v = self.cfg.validation
        if self._grid is None:
            split = self.cfg.data.val or self.cfg.data.train
            moments, cond = self._fixed_set(split)
            self._grid = (moments[: v.sample_grid_size, 0], cond[: v.sample_grid_size], self._grid_vae())
        real_latents, cond, vae = self._grid
        net = self.ema.module
        model, norm = net["model"], net["latent_norm"]
        noise = torch.randn(real_latents.shape, generator=torch.Generator().manual_seed(v.seed)).to(
            self.device
        )
        x0 = sample(
            lambda x, t, c, u: model(x, t, c, uncond_mask=u),
            noise,
            cond.to(self.device),
            SamplerConfig(method="euler", steps=v.sample_steps, guidance_scale=1.0),
        )
        rows = []
        for latents in (real_latents.to(self.device), norm.denormalize(x0)):
            images = vae.to(self.device).decode(latents.float())
            images = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
            rows.append(np.concatenate(list(images), axis=1))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)
        return path

    _grid = None

    def _fixed_set(self, split: Path) -> tuple[Tensor, Tensor]:
        """The first ``max_batches`` batches of a split in a fixed order: posterior means and conditions."""
        v = self.cfg.validation
        loader = build_loader(
            split,
            LoaderConfig(
                batch_size=self.cfg.data.batch_size,
                num_workers=0,
                shuffle_buffer=0,
                seed=v.seed,
                members=[f"{self.cfg.data.condition}.npy", "vae.npy"],
            ),
        )
        xs, cs = [], []
        for i, batch in enumerate(loader):
            if i >= v.max_batches:
                break
            xs.append(batch["vae"].float())
            cs.append(batch[self.cfg.data.condition].float())
        return torch.cat(xs), torch.cat(cs)

    @torch.no_grad()
    def validation_losses(self, use_ema: bool = False) -> dict[str, float]:
        """Velocity loss at fixed t with fixed noise on held-out and on training patients, and the gap."""
        cfg = self.cfg
        if self._val_sets is None:
            self._val_sets = {"train_ref": self._fixed_set(cfg.data.train)}
            if cfg.data.val is not None:
                self._val_sets["val"] = self._fixed_set(cfg.data.val)
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        out: dict[str, float] = {}
        try:
            for name, (moments, cond) in self._val_sets.items():
                g = torch.Generator().manual_seed(cfg.validation.seed)
                noise = torch.randn(moments[:, 0].shape, generator=g)
                eps = (
                    torch.randn(moments[:, 0].shape, generator=g) if cfg.diffusion.sample_posterior else None
                )
                z = latents_from_moments(
                    moments.to(self.device), None if eps is None else eps.to(self.device)
                )
                x0 = net["latent_norm"].normalize(z)  # the same distribution as training, with fixed draws
                noise = noise.to(self.device)
                cond = cond.to(self.device)
                per_t = []
                for tv in cfg.validation.t_values:
                    t = torch.full((x0.shape[0],), tv, device=self.device)
                    x_t = (1 - tv) * x0 + tv * noise
                    losses = []
                    for i in range(0, x0.shape[0], cfg.data.batch_size):
                        sl = slice(i, i + cfg.data.batch_size)
                        v = net["model"](x_t[sl], t[sl], cond[sl])
                        losses.append((v.float() - (noise[sl] - x0[sl])).square().mean(dim=(1, 2, 3)))
                    loss_t = float(torch.cat(losses).mean())
                    out[f"{name}/loss_t{tv:g}"] = loss_t
                    per_t.append(loss_t)
                out[f"{name}/loss"] = sum(per_t) / len(per_t)
        finally:
            net.train(was_training)
        if "val/loss" in out:
            out["overfit_gap"] = out["val/loss"] - out["train_ref/loss"]
        return out

    # ---- checkpoints ------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = [self._last_loader_state]
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            states = [None] * self.trainer.world_size
            dist.all_gather_object(states, self._last_loader_state)
        checkpoint["cytosyn"] = {
            "format": "cytosyn.train/1",
            "config": self.cfg.model_dump(mode="json"),
            "identity_hash": config_hash(self.cfg.identity_settings()),
            "features": self.features,
            "micro_step": self.micro_step,
            "skipped_steps": self.skipped_steps,
            "loader_states": states,
            "world_size": self.trainer.world_size,
            "images_seen": self.micro_step * self.cfg.data.batch_size * self.trainer.world_size,
            "code_version": code_version(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("cytosyn")
        if meta is None:
            raise ValueError("not a cytosyn training checkpoint (no 'cytosyn' section)")
        mine = config_hash(self.cfg.identity_settings())
        if meta["identity_hash"] != mine and not getattr(self, "force_resume", False):
            raise ValueError(
                "the checkpoint was made with other settings than this config (model, data, optimiser, "
                "diffusion or topology differ); resume with the original config, or pass --force"
            )
        self.micro_step = meta["micro_step"]
        self.skipped_steps = meta["skipped_steps"]
        self._loader_state_to_restore = [s for s in meta["loader_states"] if s is not None] or None


class _LoaderWithState:
    """The training loader as one endless stream, each batch carrying the loader's state *after* it.

    - Endless: the loader moves itself to the next epoch when one is done, so Lightning sees a single
      epoch and its epoch counter never drives the data. (On a resume right after an epoch's last batch,
      Lightning's and the loader's epoch numbers would otherwise disagree and a whole epoch be skipped.)
      Training length is ``trainer.max_steps``.
    - State per batch: Lightning fetches one batch ahead, so the state checkpointed with step k must be
      the one right after batch k, not after the prefetched k+1, or a resumed run would skip a batch.
    """

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        while True:
            for batch in self.loader:
                batch["__loader_state__"] = self.loader.state_dict()
                yield batch
