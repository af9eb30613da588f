"""Per-part records of the data stages (tile, featurize, sample), for ``cytosyn status``.

A data verb run with ``--part i/N`` (by hand, or as task ``i`` of a SLURM array made by ``cytosyn
launch tile|featurize|sample``) records its life in ``<output>/.parts/<stage>-part<i>-of<N>.json``:
``running`` when it starts (host, pid, SLURM ids), then ``done`` with its counts and seconds, or
``failed`` with the error, or ``interrupted`` when SLURM (or a person) sent SIGTERM/SIGINT. The work
itself is tracked by each stage (slide states, shard states); these records add what only the process
knows: that it failed, why, and how fast it went. Written atomically; a record left ``running`` by a
process killed with SIGKILL shows as such, with the time it was last written.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cytosyn.config import parse_part
from cytosyn.fileio import atomic_write_text

log = logging.getLogger(__name__)

PARTS_DIR = ".parts"
_SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")


def part_record_path(output: Path, stage: str, part: str) -> Path:
    i, n = parse_part(part)
    return Path(output) / PARTS_DIR / f"{stage}-part{i:05d}-of{n:05d}.json"


def read_part_records(output: Path, stage: str) -> dict[tuple[int, int], dict[str, Any]]:
    """Every readable record of ``stage`` under ``output``, keyed by (part, parts)."""
    records: dict[tuple[int, int], dict[str, Any]] = {}
    folder = Path(output) / PARTS_DIR
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob(f"{stage}-part*-of*.json")):
        try:
            rec = json.loads(path.read_text())
            records[(int(rec["part"]), int(rec["parts"]))] = rec
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


class PartRecord:
    """The record of one running part; ``update(**fields)`` adds counts before it is closed."""

    def __init__(self, output: Path, stage: str, part: str):
        i, n = parse_part(part)
        self.path = part_record_path(output, stage, part)
        self.data: dict[str, Any] = {
            "stage": stage,
            "part": i,
            "parts": n,
            "status": "running",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.time(),
            "slurm": {k: os.environ[k] for k in _SLURM_KEYS if k in os.environ},
        }
        self._t0 = time.perf_counter()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)

    def write(self, status: str | None = None, **fields: Any) -> None:
        if status is not None:
            self.data["status"] = status
        self.data.update(fields)
        self.data["updated_at"] = time.time()
        self.data["seconds"] = round(time.perf_counter() - self._t0, 3)
        try:
            atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        except OSError as err:  # the stage reports an unusable output itself; a record never stops it
            log.warning("could not write the part record %s: %s", self.path, err)


@contextmanager
def part_record(output: Path, stage: str, part: str) -> Iterator[PartRecord]:
    """Record a part's run: ``running`` now, then ``done`` / ``failed`` / ``interrupted`` at its end.

    SIGTERM (SLURM's time limit, ``scancel``, a requeue) is turned into an orderly end: the record says
    ``interrupted`` and the process exits 143; the stage's own state keeps what was finished, so the
    requeued task continues from there.
    """
    record = PartRecord(output, stage, part)
    record.write()

    def on_term(signum: int, _frame: Any) -> None:
        record.write("interrupted", error=f"stopped by {signal.Signals(signum).name}")
        os._exit(128 + signum)

    main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        yield record
    except KeyboardInterrupt:
        record.write("interrupted", error="stopped by SIGINT")
        raise
    except BaseException as err:
        record.write("failed", error_type=type(err).__name__, error=str(err) or type(err).__name__)
        raise
    else:
        record.write(record.data.get("status") if record.data.get("status") != "running" else "done")
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
