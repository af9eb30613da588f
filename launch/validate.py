"""Checks run before a job is submitted: each names the numbers or keys involved and how to fix them.

The training config is read as a plain dict (the launcher never imports the training code); only the keys
of the launch contract are looked at: ``run_dir``, ``trainer.{num_nodes,devices,accumulate_grad_batches}``,
``data.{batch_size,num_workers,train}`` and ``optim.global_batch``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cytosyn.launch.config import LaunchConfig

log = logging.getLogger("cytosyn.launch")

# File systems every node of a cluster sees the same way.
SHARED_FS = {
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "fuse.ceph-fuse", "wekafs", "fuse.wekafs",
    "glusterfs", "fuse.glusterfs", "cifs", "smb3", "panfs", "orangefs", "pvfs2", "fuse.juicefs", "fuse.sshfs",
}  # fmt: skip
# File systems that live on one node (or in its memory).
LOCAL_FS = {
    "overlay",
    "ext2",
    "ext3",
    "ext4",
    "xfs",
    "btrfs",
    "tmpfs",
    "ramfs",
    "devtmpfs",
    "squashfs",
    "vfat",
    "zfs",
}
NODE_LOCAL_PREFIXES = ("/tmp", "/dev/shm", "/var/tmp", "/run")
LOW_FREE_BYTES = 50 * 2**30  # an XL/2 checkpoint with EMA and AdamW state is ~11 GB
_MISSING = object()


class LaunchError(ValueError):
    """A launch that must not go ahead; the message says why and how to fix it."""


class OutputLocationError(LaunchError):
    """The run folder cannot be written (the CLI maps this to exit code 4)."""


@dataclass
class ValidationReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def extend(self, errors: Sequence[str] = (), warnings: Sequence[str] = ()) -> None:
        self.errors += list(errors)
        self.warnings += list(warnings)

    def raise_if_errors(self) -> None:
        if self.errors:
            lines = ["launch refused:", *(f"  - {e}" for e in self.errors)]
            if self.warnings:
                lines += ["warnings:", *(f"  - {w}" for w in self.warnings)]
            raise LaunchError("\n".join(lines))


def get_key(tree: dict[str, Any], dotted: str, default: Any = _MISSING) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise KeyError(dotted)
            return default
        node = node[part]
    return node


def _positive_int(tree: dict[str, Any], key: str, default: Any = _MISSING) -> tuple[int | None, str | None]:
    try:
        value = get_key(tree, key, default)
    except KeyError:
        return None, f"{key}: missing from the training config (needed to check the batch arithmetic)"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None, f"{key}: must be a positive integer (got {value!r})"
    return value, None


# --------------------------------------------------------------------------------------------- batch


def check_global_batch(train: dict[str, Any]) -> list[str]:
    """global_batch == batch_size × devices × num_nodes × accumulate_grad_batches, or an error with the numbers."""
    got = {
        "optim.global_batch": _positive_int(train, "optim.global_batch"),
        "data.batch_size": _positive_int(train, "data.batch_size"),
        "trainer.devices": _positive_int(train, "trainer.devices"),
        "trainer.num_nodes": _positive_int(train, "trainer.num_nodes", 1),
        "trainer.accumulate_grad_batches": _positive_int(train, "trainer.accumulate_grad_batches", 1),
    }
    errors = [err for _, err in got.values() if err]
    if errors:
        return errors
    g, b, d, n, a = (v for v, _ in got.values())
    world = d * n
    product = b * world * a
    if product == g:
        return []
    msg = (
        f"optim.global_batch = {g} but data.batch_size × trainer.devices × trainer.num_nodes × "
        f"trainer.accumulate_grad_batches = {b} × {d} × {n} × {a} = {product} (world size {world})"
    )
    fixes = []
    if g % (b * world) == 0:
        fixes.append(f"trainer.accumulate_grad_batches={g // (b * world)}")
    for acc in dict.fromkeys((a, 1)):
        if g % (world * acc) == 0:
            fixes.append(f"data.batch_size={g // (world * acc)} with trainer.accumulate_grad_batches={acc}")
    if fixes:
        msg += "; for this world size set " + " or ".join(fixes[:2])
    else:
        msg += f"; {g} is not divisible by the world size {world}: change optim.global_batch or the GPU count"
    return [msg]


# -------------------------------------------------------------------------------------------- shards


def _split_paths(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return []


def count_train_shards(train: dict[str, Any], workdir: Path) -> tuple[int | None, list[str], list[str]]:
    """Non-empty shards of ``data.train`` from its manifest(s): (count or None, errors, warnings)."""
    from cytosyn.manifest import read_manifest  # the shared split format

    value = get_key(train, "data.train", None)
    paths = _split_paths(value)
    if not paths:
        return None, [], [f"data.train ({value!r}) is not a split folder path: shard count not checked"]
    total = 0
    for text in paths:
        path = Path(text).expanduser()
        path = path if path.is_absolute() else workdir / path
        if not path.exists():
            return None, [], [f"data.train {path} is not visible from this machine: shard count not checked"]
        try:
            manifest = read_manifest(path)
        except Exception as err:  # ManifestError or a pydantic ValidationError: training would fail too
            return None, [f"data.train {path}: unreadable split manifest: {err}"], []
        total += sum(1 for s in manifest.shards if s.count > 0)
    return total, [], []


def check_shards(
    train: dict[str, Any], world_size: int, force: bool, workdir: Path
) -> tuple[list[str], list[str]]:
    """Enough training shards for every DataLoader worker of every rank: (errors, warnings)."""
    shards, errors, warnings = count_train_shards(train, workdir)
    if shards is None:
        return errors, warnings
    workers = get_key(train, "data.num_workers", 4)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        return [f"data.num_workers: must be an integer ≥ 0 (got {workers!r})"], []
    readers = max(1, workers) * world_size
    if shards >= readers:
        return [], []
    msg = (
        f"data.train has {shards} shards but data.num_workers × world size = {max(1, workers)} × {world_size} "
        f"= {readers} readers: readers would share shards (each one scanning its shard from the start) and "
        "the shuffle would mix few shards; pack smaller shards (shards.samples_per_shard) or lower data.num_workers"
    )
    if force:
        return [], [msg + " (accepted: force)"]
    return [msg + " (force to launch anyway)"], []


# ------------------------------------------------------------------------------------------- storage


def _mounts(mounts_file: str | Path) -> Iterator[tuple[str, str]]:
    try:
        text = Path(mounts_file).read_text()
    except OSError:
        return
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            # /proc/mounts escapes spaces etc. as octal (\040)
            yield parts[1].encode().decode("unicode_escape"), parts[2]


def filesystem_type(path: Path, mounts_file: str | Path = "/proc/mounts") -> tuple[str | None, str | None]:
    """(fs type, mount point) of the mount that holds (or would hold) ``path``."""
    real = os.path.realpath(os.path.abspath(path))  # resolves the existing part; the rest stays as written
    best: tuple[str | None, str | None] = (None, None)
    best_len = -1
    for mount, fstype in _mounts(mounts_file):
        inside = real == mount or real.startswith(mount.rstrip("/") + "/") or mount == "/"
        if inside and len(mount) > best_len:
            best, best_len = (fstype, mount), len(mount)
    return best


def check_shared_storage(
    run_dir: Path, nodes: int = 1, mounts_file: str | Path = "/proc/mounts"
) -> list[str]:
    """Warnings when the run folder looks node-local: a requeued job may start on another node."""
    run_dir = Path(os.path.abspath(run_dir))
    why = "another node (a requeue, a second node) would not see its checkpoints"
    if nodes == 1:
        why = "a requeued job may start on another node, which would not see its checkpoints"
    for prefix in NODE_LOCAL_PREFIXES:
        if str(run_dir) == prefix or str(run_dir).startswith(prefix + "/"):
            return [f"run_dir {run_dir} is under {prefix}, which is node-local: {why}"]
    fstype, mount = filesystem_type(run_dir, mounts_file)
    if fstype is None:
        return [
            f"run_dir {run_dir}: could not tell its file system (no {mounts_file}); make sure it is shared"
        ]
    if fstype in SHARED_FS:
        return []
    if fstype in LOCAL_FS:
        return [f"run_dir {run_dir} looks node-local ({fstype} mounted at {mount}): {why}"]
    return [f"run_dir {run_dir} is on {fstype} (mounted at {mount}): could not tell whether it is shared"]


def check_checkpoint_dir(run_dir: Path, create: bool = True) -> list[str]:
    """RUN_DIR/checkpoints must be writable: create it and a probe file (or, with ``create=False``, check
    that the nearest existing ancestor is writable). Raises :class:`OutputLocationError`; returns warnings."""
    ckpt = Path(run_dir) / "checkpoints"
    if not create:
        probe_dir = ckpt
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        if not os.access(probe_dir, os.W_OK | os.X_OK):
            raise OutputLocationError(f"cannot create checkpoints under {ckpt}: {probe_dir} is not writable")
        return _free_space_warnings(probe_dir)
    probe = ckpt / f".launch-probe-{os.getpid()}"
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"cytosyn launch write probe\n")
        probe.unlink()
    except PermissionError as err:
        raise OutputLocationError(
            f"cannot write checkpoints to {ckpt}: permission denied ({err.filename or ckpt}); "
            "choose a run_dir you can write to"
        ) from None
    except OSError as err:
        raise OutputLocationError(f"cannot write checkpoints to {ckpt}: {err.strerror or err}") from None
    return _free_space_warnings(ckpt)


def _free_space_warnings(path: Path) -> list[str]:
    try:
        st = os.statvfs(path)
    except OSError:
        return []
    free = st.f_bavail * st.f_frsize
    if free < LOW_FREE_BYTES:
        return [f"only {free / 2**30:.1f} GiB free under {path}: a large model's checkpoint takes ~11 GB"]
    return []


# --------------------------------------------------------------------------------------------- drift


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose value in ``new`` differs from ``old``, as ``key: old → new`` lines.

    Keys only in ``old`` are not drift: training writes its fully resolved config (defaults filled in)
    over the one launch wrote, so the run folder's config may hold more keys than the user's file.
    """
    flat_old, flat_new = _flatten(old), _flatten(new)
    lines = []
    for key, value in flat_new.items():
        if key not in flat_old:
            lines.append(f"{key}: (absent) → {value!r}")
        elif not _same(flat_old[key], value):
            lines.append(f"{key}: {flat_old[key]!r} → {value!r}")
    return lines


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise LaunchError(
            f"{path} is not valid YAML ({err}); move it away to start a new run there"
        ) from None
    return data if isinstance(data, dict) else {}


def check_drift(train: dict[str, Any], run_dir: Path, force: bool) -> tuple[list[str], list[str], list[str]]:
    """Compare with RUN_DIR/config.yaml of the first start: (errors, warnings, differing-key lines)."""
    old = read_run_config(run_dir)
    if old is None:
        return [], [], []
    diff = config_diff(old, train)
    if not diff:
        return [], [], []
    shown = "\n      ".join(diff[:20]) + (f"\n      ... and {len(diff) - 20} more" if len(diff) > 20 else "")
    head = f"the config differs from {Path(run_dir) / 'config.yaml'} of the run's first start in {len(diff)} key(s):"
    if force:
        return [], [f"{head}\n      {shown}\n    (accepted: force; the old config is kept as a backup)"], diff
    tail = "resuming with other settings breaks exact resume; use a new run_dir, or force to launch anyway"
    return [f"{head}\n      {shown}\n    {tail}"], [], diff


# ---------------------------------------------------------------------------------------------- all


def validate_launch(
    train: dict[str, Any], cfg: LaunchConfig, run_dir: Path, workdir: Path
) -> ValidationReport:
    """Every check that has no side effect (the checkpoint-dir probe comes after, when launching)."""
    report = ValidationReport()
    report.extend(errors=check_global_batch(train))
    report.extend(*check_shards(train, cfg.world_size, cfg.force, workdir))
    report.extend(warnings=check_shared_storage(run_dir, cfg.nodes))
    errors, warnings, _ = check_drift(train, run_dir, cfg.force)
    report.extend(errors, warnings)
    workers = get_key(train, "data.num_workers", 4)
    if isinstance(workers, int) and not isinstance(workers, bool) and cfg.cpus_per_task < workers + 1:
        report.warnings.append(
            f"cpus_per_task = {cfg.cpus_per_task} < data.num_workers + 1 = {workers + 1}: the DataLoader "
            "workers and the training process will compete for cores"
        )
    return report
