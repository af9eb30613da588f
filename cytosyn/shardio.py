"""Writing webdataset shards that are deterministic, hashed while written, and atomic.

Every stage that writes shards (tile, pack, featurize, sample) goes through :class:`ShardWriter`: tar
headers carry fixed owner, mode and mtime, so the same samples give byte-identical shards; each shard's
sha256 is computed from the bytes as they are written (no second read); and a shard appears under its
final name only once it is complete.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

_TAR_OWNER = "cytosyn"
_TAR_MTIME = 0
_TAR_MODE = 0o444


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name, relative to the folder it was written in
    count: int  # samples
    bytes: int
    sha256: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class _HashingFile:
    """A write-only file wrapper that hashes and counts the bytes going through it."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def _add_sample(tar: tarfile.TarFile, sample: Mapping[str, object]) -> int:
    """Append one sample's members (sorted by name, like webdataset) with fixed headers; returns bytes."""
    key = str(sample["__key__"])
    total = 0
    for name in sorted(k for k in sample if not k.startswith("_")):
        data = sample[name]
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"member {name!r} of {key!r} must be bytes, got {type(data).__name__}")
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size = len(data)
        info.mtime = _TAR_MTIME
        info.mode = _TAR_MODE
        info.uname = info.gname = _TAR_OWNER
        tar.addfile(info, io.BytesIO(data))
        total += info.size
    return total


class ShardWriter:
    """Writes samples (dicts of member name → bytes, plus ``__key__``) into size-bounded shards.

    A new shard starts when the current one holds ``max_samples`` samples or ``max_bytes`` bytes of
    members. ``name_for(index)`` names shard number ``index`` (0-based).
    """

    def __init__(
        self,
        folder: Path,
        name_for: Callable[[int], str],
        max_samples: int,
        max_bytes: int | None = None,
    ):
        if max_samples < 1:
            raise ValueError("max_samples must be ≥ 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name_for = name_for
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._file: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._payload = 0

    def _open(self) -> None:
        name = self.name_for(len(self.shards))
        self._tmp = self.folder / f".{name}.partial"
        self._final = self.folder / name
        self._file = _HashingFile(self._tmp)
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]
        self._count = 0
        self._payload = 0

    def write(self, sample: Mapping[str, object]) -> None:
        if "__key__" not in sample or "." in str(sample["__key__"]):
            raise ValueError(f"sample key must exist and contain no dot: {sample.get('__key__')!r}")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._payload += _add_sample(self._tar, sample)
        self._count += 1
        if self._count >= self.max_samples or (self.max_bytes and self._payload >= self.max_bytes):
            self._close_current()

    def _close_current(self) -> None:
        if self._tar is None or self._file is None:
            return
        self._tar.close()  # writes the end-of-archive blocks through the hashing file
        self._file.close()
        os.replace(self._tmp, self._final)
        self.shards.append(
            ShardInfo(self._final.name, self._count, self._file.size, self._file.sha.hexdigest())
        )
        self._tar = None
        self._file = None

    def close(self) -> list[ShardInfo]:
        """Finish the open shard (if any) and return every shard written."""
        self._close_current()
        return list(self.shards)

    def abort(self) -> None:
        """Drop the shard being written (used on errors); completed shards stay."""
        if self._tar is not None and self._file is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                self._tmp.unlink(missing_ok=True)
        self._tar = None
        self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------------
# Reading: sequential, hashed, grouped into samples
# --------------------------------------------------------------------------------------------------

_READ_CHUNK = 8 << 20


class ShardReadError(ValueError):
    """A shard that is truncated, not a tar, or breaks the webdataset naming rules."""


class HashingReader:
    """A read-only file wrapper that hashes and counts the bytes read through it."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_READ_CHUNK):
            pass


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot or not key:
        raise ShardReadError(f"tar member {name!r} is not named <key>.<extension>")
    return (f"{folder}/{key}" if folder else key), ext


Sample = tuple[str, list[tuple[str, bytes]]]  # key, [(member name, bytes)] in tar order


def iter_shard_samples(path: Path) -> Iterator[tuple[Sample, HashingReader]]:
    """Yield the samples of a webdataset tar in order, reading it once; the reader holds the running hash.

    After the last sample the rest of the file is read too, so ``reader.sha`` covers every byte.
    A tar that ends early, is not a tar, or repeats a key raises :class:`ShardReadError`.
    """
    with open(path, "rb") as raw:
        reader = HashingReader(raw)
        current_key: str | None = None
        members: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for info in tar:
                    if not info.isfile():
                        continue
                    try:
                        key, ext = split_member_name(info.name)
                    except ShardReadError as err:
                        raise ShardReadError(f"{path}: {err}") from None
                    fobj = tar.extractfile(info)
                    data = fobj.read() if fobj is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} ends early")
                    if key != current_key:
                        if current_key is not None:
                            yield (current_key, members), reader
                        if key in seen:
                            raise ShardReadError(
                                f"{path}: key {key!r} appears in two places in the shard (duplicate key)"
                            )
                        seen.add(key)
                        current_key, members = key, []
                    members.append((ext, data))
            reader.drain()
        except (tarfile.TarError, EOFError) as err:
            raise ShardReadError(f"{path} is truncated or not a valid tar: {err}") from None
        if current_key is not None:
            yield (current_key, members), reader
