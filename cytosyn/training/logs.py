"""Training logs that survive restarts, and per-step metrics gathered without per-step host syncs.

- ``logs/metrics.csv`` is **appended to** across attempts (Lightning's CSV logger deletes it at every
  start). On a resume from step S, rows of steps ≥ S — logged by an attempt that was killed after its last
  checkpoint and about to be trained again — are dropped first, so every step appears once. Header changes
  rewrite the file through a temporary file and a rename.
- The **W&B run id** is kept in ``RUN_DIR/wandb_run_id`` and passed back with ``resume="allow"``, so a
  requeued job continues the same W&B run instead of starting a new one.
- :class:`StepMetrics` keeps each micro-batch's losses as device tensors and turns them into numbers only
  at logging steps (one synchronisation per interval instead of several per step).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from torch import Tensor

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping the existing file and its columns instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(k for k in header if k)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        rows = read_rows(Path(self.metrics_file_path))
        _write_rows(Path(self.metrics_file_path), fieldnames, rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AppendingCSVLogger(CSVLogger):
    """``RUN_DIR/logs/metrics.csv``, continued across restarts (see the module docstring)."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir), name="logs", version="", flush_logs_every_n_steps=1)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @property
    def metrics_path(self) -> Path:
        return Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE

    def drop_from_step(self, step: int) -> int:
        """Remove rows of steps ≥ ``step`` (they are about to be trained again); returns how many."""
        path = self.metrics_path
        if not path.is_file():
            return 0
        self.experiment.save()
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fieldnames = list(reader.fieldnames or [])
            rows = list(reader)
        keep = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(keep) != len(rows):
            _write_rows(path, fieldnames, keep)
            log.info(
                "metrics.csv: dropped %d row(s) of steps ≥ %d (trained again after the resume)",
                len(rows) - len(keep),
                step,
            )
        return len(rows) - len(keep)


def wandb_run_id(run_dir: Path, create: bool) -> str | None:
    """The run's W&B id from ``RUN_DIR/wandb_run_id``; made and stored on the first start (``create``)."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip() or None
    if not create:
        return None
    import uuid

    from cytosyn.fileio import atomic_write_text

    run_id = uuid.uuid4().hex[:12]  # W&B ids: letters and digits
    atomic_write_text(path, run_id + "\n")
    return run_id


@dataclass
class Drained:
    mean_rows: list[list[float]]  # per micro-batch, averaged over the ranks
    local_rows: list[list[float]]  # per micro-batch, this rank's own values
    extra: list[float]  # the extra values passed to drain()


class StepMetrics:
    """Per-micro-batch values kept on the device; :meth:`drain` returns them all in one transfer."""

    def __init__(self) -> None:
        self._rows: list[Tensor] = []

    def record(self, *values: Tensor) -> None:
        self._rows.append(torch.stack([v.detach().float().reshape(()) for v in values]))

    def __len__(self) -> int:
        return len(self._rows)

    def drain(self, extra: Tensor | None = None, world_mean: bool = False) -> Drained:
        """Everything recorded since the last drain, plus ``extra``, as Python floats: the one host sync.

        ``world_mean`` also averages the rows over the ranks (one all-reduce of a small tensor; every rank
        must call it at the same step).
        """
        rows = torch.stack(self._rows) if self._rows else torch.zeros(0, 0)
        self._rows = []
        k, width = rows.shape
        parts = [rows.reshape(-1)]
        if world_mean and rows.numel():
            import torch.distributed as dist

            shared = rows.clone()
            dist.all_reduce(shared, op=dist.ReduceOp.SUM)
            parts.append((shared / dist.get_world_size()).reshape(-1))
        if extra is not None:
            parts.append(extra.detach().float().reshape(-1).to(rows.device if rows.numel() else extra.device))
        values = torch.cat([p.to(parts[-1].device) for p in parts]).tolist() if parts else []
        n = k * width
        local = [values[i : i + width] for i in range(0, n, width)]
        mean = (
            [values[n + i : n + i + width] for i in range(0, n, width)]
            if len(parts) > 1 and world_mean and n
            else local
        )
        offset = n * (2 if (world_mean and n) else 1)
        return Drained(mean, local, values[offset:])
