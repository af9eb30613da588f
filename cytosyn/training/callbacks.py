"""Callbacks of ``cytosyn train``: preemption and signals, progress.json, and the run folder's bookkeeping.

Signals: SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption, scancel, torchrun passing
on a stop) and SIGINT (Ctrl-C, also through torchrun) all mean "checkpoint at the next step boundary and
stop". A second SIGINT more than :data:`REPEAT_WINDOW_S` after the first stops at once without a
checkpoint (the previous one is kept); within that window it is the same Ctrl-C arriving twice — once
from the terminal and once forwarded by torchrun — and is ignored. torchrun kills its workers 30 s after
forwarding a signal: a checkpoint that takes longer than that is lost (the previous one stays). cytosyn installs its
handlers before training and switches Lightning's off: Lightning's own SIGTERM handling broadcasts a tensor
from inside the signal handler and then every step, and its SLURM auto-requeue would save a second
checkpoint from a signal handler — one mechanism, here, is enough.

Ranks agree on the flag at every optimizer-step boundary through a CPU (gloo) all-reduce: it does not wait
for the GPU, so it costs no host sync, only a small message between the ranks' CPU threads.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from cytosyn.fileio import atomic_write_text
from cytosyn.training.checkpoints import CHECKPOINT_DIR, sweep_leftovers

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 3.0


class ProgressFile(Callback):
    """Keeps ``progress.json`` up to date (rank 0) for humans and ``cytosyn status``."""

    def __init__(self, run_dir: Path, every_n_steps: int):
        self.path = Path(run_dir) / PROGRESS_FILE
        self.every = max(1, every_n_steps)
        self.status = "running"
        self.checkpoint_step: int | None = None

    def write(self, trainer: L.Trainer, module, status: str | None = None) -> None:
        if trainer.global_rank != 0:
            return
        metrics = module.last_metrics
        last = Path(module.cfg.run_dir) / CHECKPOINT_DIR / "last.ckpt"
        data = {
            "step": trainer.global_step,
            "images_seen": module.micro_step * module.cfg.data.batch_size * trainer.world_size,
            "skipped_steps": module.skipped_steps,
            "loss": metrics.get("train/loss"),
            "images_per_s": metrics.get("perf/images_per_s"),
            # Relative to the run folder (status and humans join it with the run folder they were given).
            "last_checkpoint": f"{CHECKPOINT_DIR}/last.ckpt" if last.exists() else None,
            "last_checkpoint_step": self.checkpoint_step,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": status or self.status,
        }
        atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.checkpoint_step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.write(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.write(trainer, module)

    def on_exception(self, trainer, module, exception) -> None:
        self.write(trainer, module, status="failed")


class _CpuAgreement:
    """``any(flag over ranks)`` through a gloo group: CPU tensors only, so no wait on the GPU."""

    def __init__(self) -> None:
        self.group: Any = None
        self.ready = False

    def any(self, flag: bool, world_size: int) -> bool:
        if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return flag
        if not self.ready:  # every rank gets here at the same (first) step boundary
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self.ready = True
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item() > 0)


class Preemption(Callback):
    """SIGUSR1/SIGTERM/SIGINT → checkpoint at the next step boundary on every rank, requeue, stop."""

    def __init__(self, run_dir: Path, max_attempts: int):
        self.run_dir = Path(run_dir)
        self.max_attempts = max_attempts
        self.requested: int | None = None  # the signal received
        self._requested_at = 0.0
        self.preempted = False
        self._agreement = _CpuAgreement()
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            if time.monotonic() - self._requested_at < REPEAT_WINDOW_S:
                return  # the same Ctrl-C, forwarded by torchrun
            log.error("second Ctrl-C: stopping now without a checkpoint (the previous checkpoint is kept)")
            raise KeyboardInterrupt
        if self.requested is not None:
            return
        self._requested_at = time.monotonic()
        log.warning(
            "received %s: checkpointing at the next step and stopping%s",
            signal.Signals(signum).name,
            " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
        )
        self.requested = signum

    def install(self, trainer: L.Trainer) -> None:
        """Take the stop signals over from Lightning (call before ``trainer.fit``)."""
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            connector.register_signal_handlers = lambda: None  # Lightning's would replace ours
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
            # Lightning broadcasts its SIGTERM flag from rank 0 and reads it back at every step (a host
            # sync and a collective per step); cytosyn's flag is agreed on below, on the CPU.
            epoch_loop._broadcast_sigterm_tensor = lambda: None
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some notebook runners)
                log.warning("cannot install a handler for signal %s here", sig)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer, module) -> None:
        """A finished run always leaves its final weights in last.ckpt (every rank takes part)."""
        if not self.preempted:
            trainer.save_checkpoint(self.run_dir / CHECKPOINT_DIR / "last.ckpt")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.micro_step % module.cfg.trainer.accumulate_grad_batches:
            return  # only at optimizer-step boundaries
        if not self._agreement.any(self.requested is not None, trainer.world_size):
            return
        module.flush_metrics()
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
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.error("scontrol requeue %s failed: %s", job, err)
            return
        if result.returncode:
            log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        else:
            log.info("requeued SLURM job %s", job)


class RunFolder(Callback):
    """Bookkeeping once a start has succeeded (the checkpoint loaded, every rank ready), on rank 0:
    write the resolved config, drop metric rows that will be trained again, remove leftover temporaries."""

    def __init__(self, write_config, csv_logger=None):
        self.write_config = write_config  # callable, or None when config.yaml is already right
        self.csv_logger = csv_logger

    def on_train_start(self, trainer, module) -> None:
        if trainer.global_rank != 0:
            return
        if self.write_config is not None:
            self.write_config()
        if self.csv_logger is not None:
            self.csv_logger.drop_from_step(trainer.global_step)
        sweep_leftovers(module.cfg.run_dir)
