"""The LightningModule that trains a SiT latent-diffusion model on featurized tiles.

One training step (``optim`` steps are counted separately from micro-batches):

1. latents: z = mean + σ·ε from the stored VAE moments, normalised (the split's statistics, or an
   affine-free BatchNorm whose running statistics are part of the model and of its EMA);
2. per sample, t, the noise, the posterior ε and the null-condition draw are a counter-based hash of
   (seed, micro-batch index, sample key), computed on the device (:mod:`cytosyn.training.randomness`) —
   so the run is a pure function of its inputs: resuming from a checkpoint, or running the same global
   batch on 1 or 8 processes, draws exactly the same numbers;
3. velocity loss + ``repa.weight`` × REPA loss (tokens after block ``repa_depth`` vs the encoder's patch
   tokens, resized to the SiT grid);
4. optimisation by hand (Lightning's manual mode): gradient accumulation with gradient sync only on the
   last micro-batch, clipping, fused AdamW with linear warm-up, EMA update
   (:mod:`cytosyn.training.optimization`). A step whose gradient norm is not finite is skipped on the
   device on every rank (and counted); too many in a row stop the run.

Nothing in a step waits for the GPU: losses stay on the device and are read, with the gradient norms
and skip counters, once per logging interval (``trainer.log_every_n_steps``).

The EMA (fp32) is not a submodule: it lives on global rank 0 only, outside DDP's buffer broadcast and
outside what DeepSpeed casts or shards, and travels in the checkpoint (``ema.*`` keys of the state dict;
``ema_state_dict`` in a DeepSpeed folder's client state, folded back into ``ema.*`` on consolidation).

Validation (rank 0, every ``validation.every_n_steps``): the velocity loss at fixed t values with fixed
noise on held-out-patient tiles and on a fixed set of training-patient tiles; their difference is the
overfitting signal.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from cytosyn.config import config_hash
from cytosyn.data import LoaderConfig, build_loader
from cytosyn.diffusion import BatchNormLatentNorm, FixedLatentNorm, carry_latent_statistics
from cytosyn.fileio import code_version
from cytosyn.manifest import FeatureEntry, SplitManifest
from cytosyn.models import align_tokens, build_sit, load_sit_state_dict, repa_loss
from cytosyn.models.sit import REPAE_BN_EPS
from cytosyn.models.vae import latents_from_moments
from cytosyn.training.config import TrainConfig
from cytosyn.training.ema import EMA
from cytosyn.training.logs import StepMetrics
from cytosyn.training.optimization import StepGuard, group_norms, module_groups, zero2_group_norms
from cytosyn.training.randomness import sample_keys, training_draws

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
        stored_gb = manifest.samples * math.prod(target.details["shape"]) * 2 / 1e9  # fp16 tokens
        if stored_gb > cfg.repa.stored_tokens_limit_gb:
            log.warning(
                "REPA targets: the stored %s tokens of %s take %.0f GB (%d tiles × %.0f KB), more than "
                "repa.stored_tokens_limit_gb = %.0f; reading them costs more I/O than computing them: "
                "set repa.online_encoder (and data.repa_target: null) to compute them on the fly",
                cfg.data.repa_target,
                where,
                stored_gb,
                manifest.samples,
                stored_gb * 1e6 / max(1, manifest.samples),
                cfg.repa.stored_tokens_limit_gb,
            )
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
        report = None
        if cfg.model.init_from is not None:
            state = torch.load(cfg.model.init_from, map_location="cpu", weights_only=False)
            report = load_sit_state_dict(model, state, strict=cfg.model.init_strict)
            log.info("init from %s: %s", cfg.model.init_from, report.summary())
        if cfg.diffusion.latent_norm == "fixed":
            norm: nn.Module = FixedLatentNorm(
                torch.tensor(features["latent_mean"]), torch.tensor(features["latent_std"])
            )
        else:
            norm = BatchNormLatentNorm(features["latent_channels"])
        self.latent_stats_origin = "split" if cfg.diffusion.latent_norm == "fixed" else "batchnorm"
        if report is not None and report.latent_stats and cfg.model.init_latent_stats == "checkpoint":
            self.latent_stats_origin = carry_latent_statistics(
                norm, report.latent_stats, REPAE_BN_EPS, where=str(cfg.model.init_from)
            )
            log.info("%s", self.latent_stats_origin)
        self.net = nn.ModuleDict({"model": model, "latent_norm": norm})
        # Not a submodule (see the module docstring): set around nn.Module's registration.
        object.__setattr__(self, "ema", EMA(self.net, decay=cfg.ema.decay, buffers=cfg.ema.buffers))
        self._ema_restored = False
        self.online_encoder = None
        self.micro_step = 0  # micro-batches trained (skipped ones included): the randomness counter
        self.skipped_steps = 0  # as restored / last read from the device counters
        self.guard: StepGuard | None = None
        self._metrics = StepMetrics()
        self._pending_micro = 0  # micro-step of the first row not yet drained from _metrics
        self._pending_keys: list[int] = []  # batch fingerprints of those rows
        self._log_now = False
        self._group_names: list[str] = []
        self._group_params: dict[str, list[nn.Parameter]] = {}
        self._group_norms: Tensor | None = None
        self._flushed_at: tuple[float, int] | None = None  # (time, micro_step) of the last flush
        self.last_metrics: dict[str, float] = {}  # the values of the last logging step (progress.json)
        self._loader = None
        self._loader_state_to_restore: list[dict] | None = None
        self._last_loader_state: dict | None = None
        self._val_sets: dict[str, tuple[Tensor, Tensor, Tensor | None]] | None = None
        self.disabled: dict[str, str] = {}  # rank-0 extras switched off (validation, sample grid): why
        # Per micro-batch losses of this process (tests, short runs); bounded so long runs do not grow it.
        self.history: deque[dict[str, float]] = deque(maxlen=100_000)

    @property
    def uses_deepspeed(self) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy)

    # ---- data ------------------------------------------------------------------------------------------

    def loader_members(self) -> list[str]:
        """The sample members a training batch needs (a fine-tune adds ``json`` for labels)."""
        cfg = self.cfg
        members = [f"{cfg.data.condition}.npy", "vae.npy"]
        if cfg.data.repa_target and cfg.repa.weight > 0:
            members.append(f"{cfg.data.repa_target}.npy")
        return members

    def condition_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's conditioning arguments for a batch: the stored embedding (a fine-tune may use labels)."""
        return {"cond": batch[self.cfg.data.condition].to(self.device, torch.float32)}

    def train_dataloader(self):
        cfg = self.cfg
        members = self.loader_members()
        loader_cfg = LoaderConfig(
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            mode=cfg.data.mode,
            seed=cfg.seed,
            verify_hashes=cfg.data.verify_hashes,
            members=members + (["image"] if cfg.repa.online_encoder else []),
            pin_memory=self.device.type == "cuda",  # then Lightning's copy to the GPU is non-blocking
        )
        self._loader = build_loader(
            cfg.data.train, loader_cfg, rank=self.global_rank, world_size=self.trainer.world_size
        )
        if self._loader_state_to_restore is not None:
            states = self._loader_state_to_restore
            state = states[self.global_rank] if self.global_rank < len(states) else states[0]
            self._loader.load_state_dict(state)
        return _LoaderWithState(self._loader)

    def _randomness(
        self, keys: list[str], shape: tuple[int, ...]
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Per-sample t, noise, posterior ε (or None) and dropout draw, from (seed, micro-batch, key)."""
        d = self.cfg.diffusion
        key_tensor, self._last_keys = sample_keys(self.cfg.seed, self.micro_step, keys)
        if self.device.type == "cuda":
            key_tensor = key_tensor.pin_memory()
        return training_draws(
            key_tensor.to(self.device, non_blocking=True),
            shape,
            d.time_sampling,
            d.logit_mean,
            d.logit_std,
            self.cfg.model.cond_dropout,
            posterior=d.sample_posterior,
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
                tokens = enc(batch["image"].to(self.device, non_blocking=True), ("patch",))["patch"]
        else:
            tokens = batch[cfg.data.repa_target].to(self.device, non_blocking=True)
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

    def on_fit_start(self) -> None:
        """What a step needs from outside, resolved before the first step (never on one rank mid-run) and
        before the run folder records the start as successful (callbacks' ``on_train_start``)."""
        if self.cfg.repa.weight > 0 and self.cfg.repa.online_encoder:
            self._get_online_encoder()  # a missing or gated encoder fails here, on every rank
        if self.global_rank == 0:
            self._resolve_sample_grid()

    def on_train_start(self) -> None:
        """After the checkpoint (if any) is restored — DeepSpeed restores after ``on_fit_start``."""
        if self.global_rank == 0:
            if not self._ema_restored and self.trainer.ckpt_path is not None:
                log.warning("the checkpoint has no EMA weights: the EMA restarts from the current weights")
                self.ema.copy_from(self.net)
            self.ema.to(self.device)
        else:
            object.__setattr__(self, "ema", None)  # only rank 0 saves, validates and samples with it
        model = self.net["model"]
        self._group_params = module_groups(getattr(model, "_orig_mod", model))
        self._group_names = list(self._group_params)
        self.guard = StepGuard(
            self.net.parameters(), self.cfg.optim.grad_clip, self.device, self.skipped_steps
        )
        self._flushed_at = (time.perf_counter(), self.micro_step)
        self._pending_micro = self.micro_step

    def _losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        model = self.net["model"]
        keys = list(batch["__key__"])
        moments = batch["vae"]
        shape = tuple(moments.shape[2:])
        t, noise, eps, drop = self._randomness(keys, shape)
        x0 = self._latents(moments, eps)
        cond = self.condition_inputs(batch)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        target_tokens = self._repa_targets(batch, model.cfg.grid_size)
        if target_tokens is not None:
            v, tokens = model(x_t, t, **cond, uncond_mask=drop, return_repa=True)
            loss_repa = repa_loss(tokens, target_tokens)
        else:
            v = model(x_t, t, **cond, uncond_mask=drop)
            loss_repa = torch.zeros((), device=self.device)
        loss_diff = (v.float() - (noise - x0)).square().mean()
        return loss_diff + self.cfg.repa.weight * loss_repa, loss_diff, loss_repa

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt = self.optimizers()
        accum = self.cfg.trainer.accumulate_grad_batches
        last_micro = (self.micro_step + 1) % accum == 0
        loss, loss_diff, loss_repa = self._losses(batch)
        with opt.toggle_model(sync_grad=False) if not last_micro else nullcontext():
            self.manual_backward(loss / accum)
        self._metrics.record(loss, loss_diff, loss_repa)
        self._pending_keys.append(self._last_keys)
        self._last_loader_state = batch.get("__loader_state__")
        self.micro_step += 1
        if last_micro:
            self._optimizer_step(opt)

    def _optimizer_step(self, opt) -> None:
        step = self.global_step  # index of this optimizer step (0-based)
        self._log_now = self._is_log_step(step)
        opt.step()  # → on_before_optimizer_step: norm, clipping, skip flag; then the (fused) update
        StepGuard.after_step(opt.optimizer)
        opt.zero_grad(set_to_none=True)
        if self.uses_deepspeed:
            self.guard.record(self.trainer.strategy.deepspeed_engine.get_global_grad_norm())
        else:
            self.guard.record()
        self.lr_schedulers().step()
        if self.ema is not None:
            self.ema.update(self.net)
        if self._log_now:
            self.flush_metrics(step)

    def on_before_optimizer_step(self, optimizer) -> None:
        want_groups = self._log_now and self.cfg.trainer.log_grad_norms and "grad norms" not in self.disabled
        if self.uses_deepspeed:
            if want_groups:  # gradients exist only now, partitioned; the engine clips and guards
                try:
                    self._group_norms = zero2_group_norms(self._group_params, self.device)
                except Exception as err:  # private DeepSpeed API: never let logging break a run
                    log.warning("per-group gradient norms unavailable under DeepSpeed (%s): not logged", err)
                    self.disabled["grad norms"] = str(err)
            return
        if want_groups:
            self._group_norms = group_norms(self._group_params, self.device)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self.guard.before_step(optimizer, scaler)

    def _is_log_step(self, step: int) -> bool:
        every = self.cfg.trainer.log_every_n_steps or 100  # 0: not logged, but counters still checked
        return (step + 1) % every == 0 or step + 1 == self.cfg.trainer.max_steps

    def flush_metrics(self, step: int | None = None) -> dict[str, float]:
        """Read everything recorded since the last flush (one host sync), log it, enforce the skip limit."""
        if self.guard is None or not len(self._metrics):
            return {}
        step = self.global_step - 1 if step is None else step
        world = self.trainer.world_size
        extra = [self.guard.summary_tensor()]
        if self._group_norms is not None:
            extra.append(self._group_norms.to(self.device))
        drained = self._metrics.drain(torch.cat(extra), world_mean=world > 1 and dist.is_initialized())
        for i, (row, key) in enumerate(zip(drained.local_rows, self._pending_keys)):
            self.history.append({"micro_step": self._pending_micro + i + 1, "loss": row[0], "keys": key})
        self._pending_keys = []
        self._pending_micro = self.micro_step
        skipped, worst, norm = drained.extra[:3]
        self.skipped_steps = int(skipped)
        now = time.perf_counter()
        t0, m0 = self._flushed_at or (now, self.micro_step)
        self._flushed_at = (now, self.micro_step)
        images = (self.micro_step - m0) * self.cfg.data.batch_size * world
        values: dict[str, float] = {"train/skipped_steps": skipped, "grad_norm/total": norm}
        if drained.mean_rows:
            n = len(drained.mean_rows)
            for j, name in enumerate(("train/loss", "train/loss_diffusion", "train/loss_repa")):
                values[name] = sum(r[j] for r in drained.mean_rows) / n
        if self._group_norms is not None:
            values |= {f"grad_norm/{g}": v for g, v in zip(self._group_names, drained.extra[3:])}
            self._group_norms = None
        values |= {
            "images_seen": float(self.micro_step * self.cfg.data.batch_size * world),
            "lr": self.lr_schedulers().get_last_lr()[0],
        }
        if images and now > t0:
            values["perf/images_per_s"] = images / (now - t0)
            values["perf/images_per_s_per_device"] = images / (now - t0) / world
        if self.device.type == "cuda":
            values["perf/max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.last_metrics = values
        if self.cfg.trainer.log_every_n_steps:
            self.log_values(values, step)
        limit = self.cfg.trainer.max_consecutive_nonfinite
        if worst >= limit:
            raise FloatingPointError(
                f"{int(worst)} optimizer steps in a row had a non-finite gradient norm (last logged step "
                f"{step}); stopping. The last good checkpoint is intact in {self.cfg.run_dir / 'checkpoints'}; "
                "lower optim.lr or check the data."
            )
        return values

    def log_values(self, values: dict[str, float], step: int) -> None:
        """Send values to the run's loggers (rank 0; CSV and W&B)."""
        if self.global_rank != 0:
            return
        for logger in self.loggers:
            logger.log_metrics(values, step=step)

    def configure_optimizers(self):
        o = self.cfg.optim
        params = [p for p in self.net.parameters() if p.requires_grad]
        fused = o.fused and _fused_adamw_supported(self.device)
        opt = torch.optim.AdamW(
            params,
            lr=o.lr,
            betas=o.betas,
            weight_decay=o.weight_decay,
            fused=fused or None,
            foreach=None if fused else True,
        )
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
        self._last_validated = step
        if v.every_n_steps and step % v.every_n_steps == 0:
            # Logged at the index of the step just taken, like its training row: a resume from the
            # checkpoint of this step keeps it (rows of steps ≥ the resumed step are dropped).
            self._rank0_extra("validation", lambda: self.log_values(self.validation_losses(), step - 1))
        if v.sample_grid_every_n_steps and step % v.sample_grid_every_n_steps == 0:
            path = Path(self.cfg.run_dir) / "samples" / f"step-{step:08d}.png"
            self._rank0_extra("sample grid", lambda: self.write_sample_grid(path))

    _last_validated = -1

    def _rank0_extra(self, name: str, work) -> None:
        """Run rank-0-only work (validation, sample grid); a failure switches it off with an error in the
        log instead of killing rank 0 alone, which would leave every other rank blocked in a collective."""
        if name in self.disabled:
            return
        try:
            work()
        except Exception as err:
            self.disabled[name] = f"{type(err).__name__}: {err}"
            log.exception(
                "%s failed at step %d; switched off for the rest of this run", name, self.global_step
            )

    def _resolve_sample_grid(self) -> None:
        """Load the sample grid's VAE before training starts; if it cannot be loaded, skip the grid."""
        if not self.cfg.validation.sample_grid_every_n_steps or self._grid_vae_model is not None:
            return
        try:
            self._grid_vae_model = self._grid_vae()
        except Exception as err:
            self.disabled["sample grid"] = str(err)
            log.warning("sample grid switched off for this run: its VAE cannot be loaded (%s)", err)

    _grid_vae_model = None

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
            vae = self._grid_vae_model if self._grid_vae_model is not None else self._grid_vae()
            self._grid = (moments[: v.sample_grid_size, 0], cond[: v.sample_grid_size], vae)
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
                verify_hashes=self.cfg.data.verify_hashes,
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
        if self.guard is not None:
            self.skipped_steps = int(self.guard.skipped.item())  # one sync per checkpoint
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
        if self.ema is not None:  # rank 0: the rank that writes the model file / DeepSpeed's client state
            ema_state = self.ema.state_dict()
            if "state_dict" in checkpoint and not self.uses_deepspeed:
                checkpoint["state_dict"].update({f"ema.{k}": v for k, v in ema_state.items()})
            else:  # DeepSpeed keeps only its client state besides the engine's own files
                checkpoint["ema_state_dict"] = ema_state

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
        ema_state = pop_ema_state(checkpoint)  # out of the state dict before Lightning loads it (strict)
        if ema_state is not None and self.ema is not None:
            self.ema.load_state_dict(ema_state)
            self._ema_restored = True


def pop_ema_state(checkpoint: dict[str, Any]) -> dict[str, Tensor] | None:
    """Remove and return the EMA's state from a training checkpoint (either place it can be)."""
    state = checkpoint.pop("ema_state_dict", None)
    model_state = checkpoint.get("state_dict") or {}
    in_model = {
        k[len("ema.") :]: model_state.pop(k) for k in [k for k in model_state if k.startswith("ema.")]
    }
    return state if state is not None else (in_model or None)


def _fused_adamw_supported(device: torch.device) -> bool:
    """torch ships fused AdamW kernels for CUDA and CPU (and a few other backends)."""
    return device.type in ("cuda", "cpu", "mps", "xpu")


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
