"""``cytosyn train``: build the Lightning trainer, resume from the run folder, handle preemption.

Run folder (``run_dir``)::

    config.yaml                  resolved config of the first start (a resume must match it, or --force)
    checkpoints/last.ckpt        the latest checkpoint (atomic), plus step-XXXXXXXX.ckpt (the last k kept)
    logs/metrics.csv             every logged value (CSV), and wandb/ when wandb logging is on
    progress.json                step, images seen, last checkpoint, loss, images/s, status (for `cytosyn status`)

Rerunning the same command resumes from the newest intact checkpoint. On SIGUSR1 or SIGTERM (SLURM's
warning before the time limit, or a preemption) every rank finishes its step, a checkpoint is written,
the job asks SLURM to requeue it (``scontrol requeue``) when it runs under SLURM, and the process exits
with :data:`EXIT_REQUEUE` (75) so a plain launcher loop can restart it too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from cytosyn.config import (
    ConfigError,
    config_differences,
    config_hash,
    config_to_dict,
    load_config,
    write_resolved_config,
)
from cytosyn.fileio import atomic_write_text
from cytosyn.manifest import read_manifest
from cytosyn.training.config import TrainConfig
from cytosyn.training.module import LatentDiffusionModule, TrainingDataError, split_features

log = logging.getLogger(__name__)
# cytosyn checkpoints after the optimizer step on purpose (the state a resume continues from).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again": the launcher restarts the job, which resumes
CHECKPOINT_DIR = "checkpoints"
PROGRESS_FILE = "progress.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it: a kill never leaves a torn checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _intact(path: Path) -> bool:
    """A torch checkpoint is a zip archive: check its central directory and CRCs without unpickling."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run: last.ckpt, else step-*.ckpt newest first (corrupt ones skipped)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    candidates = [folder / "last.ckpt", *sorted(folder.glob("step-*.ckpt"), reverse=True)]
    for path in candidates:
        if path.is_file():
            if _intact(path):
                return path
            log.error("checkpoint %s is corrupted (truncated or damaged zip): skipping it", path)
    return None


# --------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------


class ProgressFile(Callback):
    """Keeps ``progress.json`` up to date (rank 0) for humans and ``cytosyn status``."""

    def __init__(self, run_dir: Path, every_n_steps: int):
        self.path = Path(run_dir) / PROGRESS_FILE
        self.every = max(1, every_n_steps)
        self.status = "running"

    def write(self, trainer: L.Trainer, module: LatentDiffusionModule, status: str | None = None) -> None:
        if trainer.global_rank != 0:
            return
        metrics = trainer.callback_metrics
        last = Path(module.cfg.run_dir) / CHECKPOINT_DIR / "last.ckpt"
        data = {
            "step": trainer.global_step,
            "images_seen": module.micro_step * module.cfg.data.batch_size * trainer.world_size,
            "skipped_steps": module.skipped_steps,
            "loss": float(metrics["train/loss"]) if "train/loss" in metrics else None,
            "images_per_s": float(metrics["perf/images_per_s"]) if "perf/images_per_s" in metrics else None,
            "last_checkpoint": str(last) if last.exists() else None,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": status or self.status,
        }
        atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.write(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.write(trainer, module)

    def on_exception(self, trainer, module, exception) -> None:
        self.write(trainer, module, status="failed")


class Preemption(Callback):
    """SIGUSR1/SIGTERM → checkpoint at the next step boundary on every rank, requeue, stop."""

    def __init__(self, run_dir: Path, max_attempts: int):
        self.run_dir = Path(run_dir)
        self.max_attempts = max_attempts
        self.requested = False
        self.preempted = False

    def _handler(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing at the next step and stopping", signum)
        self.requested = True

    def on_train_start(self, trainer, module) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some notebook runners)
                log.warning("cannot install a handler for signal %s here", sig)

    def on_train_end(self, trainer, module) -> None:
        """A finished run always leaves its final weights in last.ckpt (every rank takes part)."""
        if not self.preempted:
            trainer.save_checkpoint(self.run_dir / CHECKPOINT_DIR / "last.ckpt")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.micro_step % module.cfg.trainer.accumulate_grad_batches:
            return  # only at optimizer-step boundaries
        flag = torch.tensor(float(self.requested), device=module.device)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return
        trainer.save_checkpoint(self.run_dir / CHECKPOINT_DIR / "last.ckpt")
        self.preempted = True
        trainer.should_stop = True
        if trainer.global_rank == 0:
            self._requeue()

    def _requeue(self) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts + 1 >= self.max_attempts:
            log.error(
                "job %s was already started %d times (max_attempts %d): not requeuing",
                job,
                restarts + 1,
                self.max_attempts,
            )
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode:
            log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        else:
            log.info("requeued SLURM job %s", job)


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


def _accelerator(cfg: TrainConfig) -> str:
    if cfg.trainer.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if cfg.trainer.accelerator == "cuda" else cfg.trainer.accelerator


def build_trainer(cfg: TrainConfig, callbacks: list[Callback]) -> L.Trainer:
    """A Lightning Trainer for ``cfg``: bf16 on GPU / fp32 on CPU, DDP or DeepSpeed ZeRO-2, loggers."""
    t = cfg.trainer
    accelerator = _accelerator(cfg)
    precision = (
        t.precision if t.precision != "auto" else ("bf16-mixed" if accelerator == "gpu" else "32-true")
    )
    world = t.devices * t.num_nodes
    plugins: list[Any] = []
    if t.strategy == "deepspeed_stage_2":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy: Any = DeepSpeedStrategy(stage=2)
    elif t.strategy == "ddp" or world > 1:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=False)
        plugins.append(AtomicCheckpointIO())
    else:
        strategy = "auto"
        plugins.append(AtomicCheckpointIO())
    loggers: list[Any] = [CSVLogger(str(cfg.run_dir), name="logs", version="")]
    if cfg.logging.wandb != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                save_dir=str(cfg.run_dir),
                project=cfg.logging.project,
                name=cfg.logging.name or Path(cfg.run_dir).name,
                mode=cfg.logging.wandb,
                config=config_to_dict(cfg),
            )
        )
    checkpoints = ModelCheckpoint(
        dirpath=str(cfg.run_dir / CHECKPOINT_DIR),
        filename="step-{step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_top_k=t.keep_last_checkpoints,
        monitor="images_seen",
        mode="max",
        save_last=True,
    )
    return L.Trainer(
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        logger=loggers,
        callbacks=[checkpoints, *callbacks],
        plugins=plugins,
        log_every_n_steps=t.log_every_n_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        sync_batchnorm=cfg.diffusion.latent_norm == "batchnorm" and world > 1,
        enable_model_summary=False,
        default_root_dir=str(cfg.run_dir),
    )


@dataclass
class TrainResult:
    status: str  # "finished" or "preempted"
    global_step: int
    images_seen: int
    skipped_steps: int
    resumed_from: Path | None
    history: list[dict[str, float]]  # loss per micro-batch trained by this process (this run only)
    validation: dict[str, float]  # held-out and train-patient losses at the end (rank 0)


def check_config_drift(path: Path, cfg: Any, force: bool) -> None:
    """Refuse (unless ``force``) a config whose ``identity_settings()`` differ from the one saved at ``path``
    when the run folder was started (training and fine-tuning configs both have that method)."""
    if not path.exists():
        return
    old = load_config(type(cfg), path)
    if config_hash(old.identity_settings()) == config_hash(cfg.identity_settings()):
        return
    diffs = config_differences(old.identity_settings(), cfg.identity_settings())
    message = f"run folder {path.parent} was started with another config: " + "; ".join(diffs)
    if not force:
        raise ConfigError(message + " (resume with the original config, or pass --force)")
    log.warning("%s — continuing because of --force", message)


def run_training(cfg: TrainConfig, force: bool = False) -> TrainResult:
    """Train (or resume) the run in ``cfg.run_dir`` until ``trainer.max_steps`` or a preemption signal."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    check_config_drift(cfg.run_dir / "config.yaml", cfg, force)
    if force or not (cfg.run_dir / "config.yaml").exists():
        write_resolved_config(cfg, cfg.run_dir / "config.yaml")
    train_manifest = read_manifest(cfg.data.train)
    features = split_features(cfg, train_manifest, cfg.data.train)
    if cfg.data.val is not None:
        val_features = split_features(cfg, read_manifest(cfg.data.val), cfg.data.val)
        for key in ("cond_dim", "cond_model", "cond_weights", "latent_channels", "latent_size", "vae"):
            if val_features[key] != features[key]:
                raise TrainingDataError(
                    f"data.val was featurized differently from data.train ({key}: {val_features[key]!r} vs {features[key]!r})"
                )
    # Adam's second moments and small gradients drift into denormal floats, which x86 CPUs compute
    # ~10x slower; flushing them to zero changes nothing measurable (no effect on GPUs).
    torch.set_flush_denormal(True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # model initialisation
    module = LatentDiffusionModule(cfg, features)
    return fit_module(cfg, module, force)


def fit_module(cfg: TrainConfig, module: LatentDiffusionModule, force: bool = False) -> TrainResult:
    """Fit ``module`` in ``cfg.run_dir`` with training's trainer, callbacks (progress file, preemption and
    requeue) and resume from the newest intact checkpoint. ``cytosyn train`` and ``cytosyn finetune``
    both end here."""
    module.force_resume = force
    if cfg.trainer.compile:
        module.net["model"].compile()
    progress = ProgressFile(cfg.run_dir, cfg.trainer.log_every_n_steps)
    preemption = Preemption(cfg.run_dir, max_attempts=int(os.environ.get("CYTOSYN_MAX_ATTEMPTS", "5")))
    trainer = build_trainer(cfg, [progress, preemption])
    resume = find_resume_checkpoint(cfg.run_dir)
    if resume is not None:
        log.info("resuming from %s", resume)
    trainer.fit(module, ckpt_path=str(resume) if resume else None)
    status = "preempted" if preemption.preempted else "finished"
    progress.write(trainer, module, status=status)
    validation = module.validation_losses() if trainer.global_rank == 0 and status == "finished" else {}
    return TrainResult(
        status=status,
        global_step=trainer.global_step,
        images_seen=module.micro_step * cfg.data.batch_size * trainer.world_size,
        skipped_steps=module.skipped_steps,
        resumed_from=resume,
        history=list(module.history),
        validation=validation,
    )
