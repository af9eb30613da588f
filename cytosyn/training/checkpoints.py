"""Checkpoints of a run folder: atomic writes, integrity checks, and which one a resume continues from.

Layout: ``RUN_DIR/checkpoints/`` holds ``last.ckpt`` and ``step-XXXXXXXX.ckpt``; each is a file (DDP and
single-process runs: one torch zip archive) or, with DeepSpeed, a folder (``checkpoint/`` with one model
file and one optimizer shard per rank, ``latest``, and our ``cytosyn-checkpoint.json`` marker).

Rules:

- **Atomic**: a checkpoint is written under a hidden temporary name (``.NAME.tmp-ID``) and renamed into
  place once complete, so a kill never leaves a torn checkpoint under a real name. A folder that replaces
  an existing one is swapped in two renames (old → ``.NAME.old-ID``, new → ``NAME``); a kill between
  them leaves the complete old copy, which the resume scan still considers.
- **Newest intact by step**: the resume scan reads each candidate's step (from the pickle header of a file,
  from the marker of a folder) and checks its structure, then takes the highest step that is intact —
  never "last.ckpt because of its name".
- **Nothing is lost**: if checkpoints exist but none is intact, training refuses to start
  (:class:`NoIntactCheckpointError`) unless asked to restart; a restart moves them to
  ``checkpoints/corrupt-<time>/`` rather than deleting them.
- **No leaked temporaries**: leftovers of killed writes are removed at the next start (rank 0).
- **Clear disk errors**: a full or read-only disk gives a message that says so, and names the checkpoint
  that is still intact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MARKER = "cytosyn-checkpoint.json"  # inside a DeepSpeed checkpoint folder, written last
MARKER_FORMAT = "cytosyn.deepspeed-checkpoint/1"
_TMP, _OLD = ".tmp-", ".old-"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full or read-only disk, permissions); the message says which."""


class NoIntactCheckpointError(RuntimeError):
    """The run folder has checkpoints but none of them is intact."""


def temporary_name(final: Path, token: str | None = None) -> Path:
    """Where ``final`` is written before the rename that publishes it."""
    return final.with_name(f".{final.name}{_TMP}{token or uuid.uuid4().hex[:12]}")


def describe_write_error(err: OSError, path: Path) -> str:
    """A user-facing reason for a failed checkpoint write (full disk and read-only disk said plainly)."""
    where = Path(path).parent
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        try:
            free = shutil.disk_usage(where).free / 2**30
            room = f" ({free:.2f} GiB free under {where})"
        except OSError:
            room = ""
        return f"the checkpoint disk is full: could not write {path}{room}"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the checkpoint folder {where} is not writable ({err.strerror}): could not write {path}"
    return f"could not write checkpoint {path}: {err.strerror or err}"


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as f:
            os.fsync(f.fileno())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint file to a temporary name, fsyncs it and renames it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = temporary_name(path, str(os.getpid()))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, tmp)
            _fsync_tree(tmp)
            os.replace(tmp, path)
        except OSError as err:
            raise CheckpointWriteError(
                describe_write_error(err, path) + "; the previous checkpoints are intact (resume will use "
                "the newest of them once there is room)"
            ) from err
        finally:
            tmp.unlink(missing_ok=True)


def publish_folder(tmp: Path, final: Path) -> None:
    """Move a complete checkpoint folder ``tmp`` to ``final``, replacing an existing one (two renames)."""
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}{_OLD}{uuid.uuid4().hex[:12]}")
        os.replace(final, old)
        os.replace(tmp, final)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, final)


def write_marker(folder: Path, global_step: int, micro_step: int, world_size: int) -> None:
    """The completion marker of a DeepSpeed folder: step, world size and every file with its size."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    data = {
        "format": MARKER_FORMAT,
        "global_step": global_step,
        "micro_step": micro_step,
        "world_size": world_size,
        "files": files,
    }
    with open(folder / MARKER, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------- inspection


@dataclass
class CheckpointInfo:
    path: Path
    kind: str  # "file" or "deepspeed"
    intact: bool
    problem: str | None = None
    global_step: int = -1
    micro_step: int = -1
    world_size: int | None = None

    @property
    def order(self) -> tuple[int, int, int]:
        """Newest first by step; at equal steps a real name beats a leftover of an interrupted swap."""
        return (self.global_step, self.micro_step, 0 if self.path.name.startswith(".") else 1)


def _zip_problem(path: Path) -> str | None:
    """Structural check of a torch zip archive without reading its tensors: the central directory (at the
    end: any truncation loses it) and the CRC of the small pickle that describes the contents."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pickle = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pickle is None:
                return "not a torch checkpoint (no data.pkl)"
            z.read(pickle)  # raises on a CRC mismatch
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as err:
        return f"damaged or truncated archive ({type(err).__name__}: {err})"
    return None


def _load_header(path: Path) -> dict[str, Any]:
    """The checkpoint dict with its tensors memory-mapped, not read (cheap even for large files)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Kind, step and integrity of one checkpoint (file or DeepSpeed folder)."""
    path = Path(path)
    if path.is_dir():
        return _inspect_folder(path)
    problem = _zip_problem(path)
    if problem:
        return CheckpointInfo(path, "file", False, problem)
    try:
        ckpt = _load_header(path)
        meta = ckpt.get("cytosyn") or {}
        return CheckpointInfo(
            path,
            "file",
            True,
            global_step=int(ckpt.get("global_step", -1)),
            micro_step=int(meta.get("micro_step", -1)),
            world_size=meta.get("world_size"),
        )
    except Exception as err:  # an unpicklable or foreign file: not something we can resume from
        return CheckpointInfo(path, "file", False, f"unreadable ({type(err).__name__}: {err})")


def _inspect_folder(path: Path) -> CheckpointInfo:
    marker = path / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as err:
            return CheckpointInfo(path, "deepspeed", False, f"unreadable marker ({err})")
        for rel, size in data.get("files", {}).items():
            file = path / rel
            if not file.is_file():
                return CheckpointInfo(path, "deepspeed", False, f"missing {rel}")
            if file.stat().st_size != size:
                return CheckpointInfo(
                    path, "deepspeed", False, f"{rel} has {file.stat().st_size} bytes, not {size}"
                )
            if file.suffix == ".pt" and (problem := _zip_problem(file)):
                return CheckpointInfo(path, "deepspeed", False, f"{rel}: {problem}")
        return CheckpointInfo(
            path,
            "deepspeed",
            True,
            global_step=int(data["global_step"]),
            micro_step=int(data.get("micro_step", -1)),
            world_size=data.get("world_size"),
        )
    # A folder without our marker: a DeepSpeed checkpoint written by plain Lightning (or an interrupted one).
    latest = path / "latest"
    if not latest.is_file():
        return CheckpointInfo(
            path, "deepspeed", False, "no completion marker and no 'latest' file (interrupted?)"
        )
    tag = latest.read_text().strip()
    states = path / tag / "mp_rank_00_model_states.pt"
    if not states.is_file() or (problem := _zip_problem(states)):
        return CheckpointInfo(path, "deepspeed", False, f"model states of tag {tag!r} missing or damaged")
    shards = sorted((path / tag).glob("*optim_states.pt"))
    for shard in shards:
        if problem := _zip_problem(shard):
            return CheckpointInfo(path, "deepspeed", False, f"{shard.name}: {problem}")
    try:
        client = _load_header(states)
    except Exception as err:
        return CheckpointInfo(path, "deepspeed", False, f"unreadable model states ({err})")
    meta = client.get("cytosyn") or {}
    return CheckpointInfo(
        path,
        "deepspeed",
        True,
        global_step=int(client.get("global_step", -1)),
        micro_step=int(meta.get("micro_step", -1)),
        world_size=meta.get("world_size") or (len(shards) or None),
    )


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Every checkpoint of a run folder, including complete copies left by an interrupted folder swap."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    out = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name.startswith("."):
            if _OLD in name and name[1:].split(_OLD)[0].endswith(".ckpt"):
                out.append(entry)
        elif name.endswith(".ckpt"):
            out.append(entry)
    return out


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Every checkpoint of a run folder, inspected, newest first."""
    infos = [inspect_checkpoint(p) for p in checkpoint_candidates(run_dir)]
    return sorted(infos, key=lambda i: i.order, reverse=True)


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The intact checkpoint with the highest step; None for a run without checkpoints.

    Raises :class:`NoIntactCheckpointError` when checkpoints exist but none is intact.
    """
    infos = list_checkpoints(run_dir)
    for info in infos:
        if not info.intact:
            log.error("checkpoint %s is damaged (%s): not resuming from it", info.path, info.problem)
    intact = [i for i in infos if i.intact]
    if intact:
        return intact[0].path
    if infos:
        listing = "; ".join(f"{i.path.name}: {i.problem}" for i in infos)
        raise NoIntactCheckpointError(
            f"{Path(run_dir) / CHECKPOINT_DIR} has {len(infos)} checkpoint(s) and none is intact ({listing}). "
            "Nothing was changed. Restore a good copy, or rerun with --restart to start again from step 0 "
            "(the damaged checkpoints are then moved to checkpoints/corrupt-<time>/, not deleted)."
        )
    return None


def set_aside_checkpoints(run_dir: Path) -> Path | None:
    """Move every checkpoint (and leftover) of a run to ``checkpoints/corrupt-<UTC time>/``."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    entries = [e for e in folder.iterdir() if not e.name.startswith("corrupt-")] if folder.is_dir() else []
    if not entries:
        return None
    dest = folder / f"corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    dest.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        os.replace(entry, dest / entry.name.lstrip("."))
    log.warning("moved %d damaged checkpoint(s) to %s; starting again from step 0", len(entries), dest)
    return dest


def sweep_leftovers(run_dir: Path) -> list[Path]:
    """Remove temporaries of killed writes, and swap leftovers whose replacement is complete."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        name = entry.name
        if not name.startswith("."):
            continue
        if _TMP in name:
            doomed = True
        elif _OLD in name:
            final = folder / name[1:].split(_OLD)[0]
            doomed = final.exists() and inspect_checkpoint(final).intact
        else:
            continue
        if doomed:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.info(
            "removed %d leftover temporary checkpoint file(s): %s", len(removed), [p.name for p in removed]
        )
    return removed
