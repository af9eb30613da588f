"""Small file helpers shared by every stage: atomic writes, hashing, provenance."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

_HASH_CHUNK = 8 << 20

# The storage itself refuses to take more: a full disk, an exhausted quota, a read-only file system.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_storage_error(err: BaseException) -> bool:
    """Whether ``err`` means the output storage is full or read-only (the CLI then exits 4: rerun later)."""
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader (or a rerun after a crash) sees either the old file or the complete new one, never a
    half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; team members must be able to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: Path, text: str) -> Path:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """Full sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: str | Path, edge_bytes: int = 1 << 20) -> str:
    """A cheap identity of a large input file: its size plus sha256 of its first and last MiB.

    Hashing every byte of thousands of multi-GB slides would cost more than tiling them; this catches
    a replaced, truncated or re-exported slide, which is what a rerun needs to know.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(edge_bytes))
        if size > edge_bytes:
            f.seek(max(edge_bytes, size - edge_bytes))
            digest.update(f.read(edge_bytes))
    return f"size{size}-edges-sha256:{digest.hexdigest()}"


@lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe`` of the cytosyn checkout when available, else the package version."""
    from cytosyn import __version__

    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return __version__
