"""``cytosyn train``: build the Lightning trainer, resume from the run folder, handle preemption.

Run folder (``run_dir``)::

    config.yaml                  resolved config of the first start (a resume must match it, or --force);
                                 written only once a start has succeeded (checkpoint loaded, ranks ready)
    checkpoints/last.ckpt        the latest checkpoint (atomic), plus step-XXXXXXXX.ckpt (the last k kept);
                                 folders under DeepSpeed (see cytosyn/training/checkpoints.py)
    logs/metrics.csv             every logged value, appended across restarts; wandb/ when W&B is on
    wandb_run_id                 the W&B run a requeued job continues
    progress.json                step, images seen, last checkpoint, loss, images/s, status (for `cytosyn status`)

Rerunning the same command resumes from the intact checkpoint with the highest step. If checkpoints
exist but none is intact, training refuses to start unless ``restart=True`` (``--restart``), which moves
them aside and starts from step 0. On SIGUSR1, SIGTERM or SIGINT every rank finishes its step, a
checkpoint is written, the job asks SLURM to requeue it (``scontrol requeue``, bounded by
``CYTOSYN_MAX_ATTEMPTS`` that the rendered job script sets) when it runs under SLURM, and the process
exits with :data:`EXIT_REQUEUE` (75) so a plain launcher loop can restart it too.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from cytosyn.config import (
    ConfigError,
    config_differences,
    config_hash,
    config_to_dict,
    load_config,
    write_resolved_config,
)
from cytosyn.manifest import read_manifest
from cytosyn.training.callbacks import PROGRESS_FILE, Preemption, ProgressFile, RunFolder
from cytosyn.training.checkpoints import (
    CHECKPOINT_DIR,
    CheckpointWriteError,
    NoIntactCheckpointError,
    describe_write_error,
    find_resume_checkpoint,
    set_aside_checkpoints,
)
from cytosyn.training.config import TrainConfig
from cytosyn.training.logs import AppendingCSVLogger, wandb_run_id
from cytosyn.training.module import LatentDiffusionModule, TrainingDataError, split_features
from cytosyn.training.strategies import Execution, build_strategy, configure_backends, resolve_execution

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # the resolved config of a run folder, written once its start succeeded
# cytosyn checkpoints after the optimizer step on purpose (the state a resume continues from).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again": the launcher restarts the job, which resumes
MAX_ATTEMPTS_ENV = "CYTOSYN_MAX_ATTEMPTS"  # set by the rendered sbatch / torchrun scripts

__all__ = [
    "CHECKPOINT_DIR",
    "EXIT_REQUEUE",
    "PROGRESS_FILE",
    "CheckpointWriteError",
    "NoIntactCheckpointError",
    "TrainResult",
    "build_trainer",
    "find_resume_checkpoint",
    "run_training",
]


def _process_rank() -> int:
    """This process's global rank before the process group exists (torchrun, srun or Lightning's launcher)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def build_trainer(
    cfg: TrainConfig,
    callbacks: list[Callback],
    execution: Execution | None = None,
    csv_logger: AppendingCSVLogger | None = None,
) -> L.Trainer:
    """A Lightning Trainer for ``cfg`` (strategy and precision from :func:`resolve_execution`), with loggers."""
    execution = execution or resolve_execution(cfg)
    t = cfg.trainer
    strategy, plugins, precision = build_strategy(cfg, execution)
    loggers: list[Any] = [csv_logger or AppendingCSVLogger(cfg.run_dir)]
    if cfg.logging.wandb != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                save_dir=str(cfg.run_dir),
                project=cfg.logging.project,
                name=cfg.logging.name or Path(cfg.run_dir).name,
                mode=cfg.logging.wandb,
                config=config_to_dict(cfg),
                # The same W&B run across restarts (the id is stored in the run folder by rank 0).
                id=wandb_run_id(cfg.run_dir, create=_process_rank() == 0),
                resume="allow",
            )
        )
    checkpoints = ModelCheckpoint(
        dirpath=str(cfg.run_dir / CHECKPOINT_DIR),
        filename="step-{step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_top_k=t.keep_last_checkpoints,
        monitor="step",
        mode="max",
        save_last=True,
        enable_version_counter=False,  # always last.ckpt (never last-v1.ckpt beside an older last.ckpt)
    )
    from lightning.pytorch.callbacks import TQDMProgressBar

    return L.Trainer(
        accelerator=execution.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        logger=loggers,
        callbacks=[checkpoints, TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps)), *callbacks],
        plugins=plugins,
        log_every_n_steps=max(1, t.log_every_n_steps),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        sync_batchnorm=cfg.diffusion.latent_norm == "batchnorm" and execution.world_size > 1,
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


def check_config_drift(path: Path, cfg: Any, force: bool) -> bool:
    """Refuse (unless ``force``) a config whose ``identity_settings()`` differ from the one saved at ``path``
    when the run folder was started (training and fine-tuning configs both have that method).

    True when the config file must be written: a new run, or a change accepted with ``force``."""
    if not path.exists():
        return True
    old = load_config(type(cfg), path)
    if config_hash(old.identity_settings()) == config_hash(cfg.identity_settings()):
        return False
    diffs = config_differences(old.identity_settings(), cfg.identity_settings())
    message = f"run folder {path.parent} was started with another config: " + "; ".join(diffs)
    if not force:
        raise ConfigError(message + " (resume with the original config, or pass --force)")
    log.warning(
        "%s — continuing because of --force (config.yaml is replaced once the start succeeds)", message
    )
    return True


def config_writer(cfg: Any, path: Path) -> Callable[[], None]:
    """A callable that writes ``cfg`` to ``path`` (keeping a replaced file as ``<stem>.<UTC time>.yaml``),
    for `fit_module` to call once the start succeeded: a start that fails leaves no config behind, so a
    corrected rerun is not refused as "another config"."""

    def write() -> None:
        if path.exists():
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            os.replace(path, path.with_name(f"{path.stem}.{stamp}{path.suffix}"))
        write_resolved_config(cfg, path)

    return write


def _check_writable(run_dir: Path) -> None:
    """Refuse a run folder whose checkpoints cannot be written, before any work."""
    folder = run_dir / CHECKPOINT_DIR
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"cytosyn")
        probe.unlink()
    except OSError as err:
        raise CheckpointWriteError(describe_write_error(err, probe) + "; nothing was trained") from None


def _resume_point(cfg: TrainConfig, restart: bool) -> Path | None:
    try:
        return find_resume_checkpoint(cfg.run_dir)
    except NoIntactCheckpointError:
        if not restart:
            raise
    if _process_rank() == 0:
        set_aside_checkpoints(cfg.run_dir)
        metrics = cfg.run_dir / "logs" / "metrics.csv"
        if metrics.is_file():  # keep the old history, start a new one
            os.replace(
                metrics, metrics.with_name(f"metrics.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.csv")
            )
    return None


def _finish_wandb(trainer: L.Trainer) -> None:
    """End this attempt's W&B run (a process exit would; an in-process caller must, or the next attempt
    would log into a run that is still open)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish()


def _features(cfg: TrainConfig) -> dict[str, Any]:
    features = split_features(cfg, read_manifest(cfg.data.train), cfg.data.train)
    if cfg.data.val is not None:
        val_features = split_features(cfg, read_manifest(cfg.data.val), cfg.data.val)
        for key in ("cond_dim", "cond_model", "cond_weights", "latent_channels", "latent_size", "vae"):
            if val_features[key] != features[key]:
                raise TrainingDataError(
                    f"data.val was featurized differently from data.train ({key}: {val_features[key]!r} vs {features[key]!r})"
                )
    return features


def run_training(cfg: TrainConfig, force: bool = False, restart: bool = False) -> TrainResult:
    """Train (or resume) the run in ``cfg.run_dir`` until ``trainer.max_steps`` or a stop signal.

    ``force``: resume although the config differs from the run's. ``restart``: when every checkpoint is
    damaged, move them aside and start again from step 0 (otherwise that refuses to start).
    """
    resolve_execution(cfg)  # impossible strategy/precision/device combinations: refused before any work
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    _check_writable(cfg.run_dir)
    must_write = check_config_drift(cfg.run_dir / CONFIG_FILE, cfg, force)
    features = _features(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # model initialisation
    module = LatentDiffusionModule(cfg, features)
    writer = config_writer(cfg, cfg.run_dir / CONFIG_FILE) if must_write else None
    return fit_module(cfg, module, force, restart=restart, write_config=writer)


def fit_module(
    cfg: TrainConfig,
    module: LatentDiffusionModule,
    force: bool = False,
    *,
    restart: bool = False,
    write_config: Callable[[], None] | None = None,
) -> TrainResult:
    """Fit ``module`` in ``cfg.run_dir`` with training's trainer, callbacks (progress file, preemption and
    requeue, appending CSV log) and resume from the newest intact checkpoint. ``cytosyn train`` and
    ``cytosyn finetune`` both end here. ``write_config``: called once the start succeeded (`config_writer`)."""
    execution = resolve_execution(cfg)
    _check_writable(cfg.run_dir)
    resume = _resume_point(cfg, restart)
    configure_backends(execution, cfg.trainer.tf32)
    module.force_resume = force
    if cfg.trainer.compile:
        module.net["model"].compile()
    csv_logger = AppendingCSVLogger(cfg.run_dir)
    progress = ProgressFile(cfg.run_dir, cfg.trainer.log_every_n_steps)
    preemption = Preemption(cfg.run_dir, max_attempts=int(os.environ.get(MAX_ATTEMPTS_ENV, "5")))
    run_folder = RunFolder(write_config, csv_logger)
    trainer = build_trainer(cfg, [progress, preemption, run_folder], execution, csv_logger)
    preemption.install(trainer)
    if resume is not None:
        log.info("resuming from %s", resume)
    try:
        trainer.fit(module, ckpt_path=str(resume) if resume else None)
    finally:
        preemption.restore()
    module.flush_metrics()
    _finish_wandb(trainer)
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
