"""Writing webdataset shards that are deterministic, hashed while written, and atomic.

Every stage that writes shards (tile, pack, featurize, sample) goes through :class:`ShardWriter`: tar
headers carry fixed owner, mode and mtime, so the same samples give byte-identical shards; each shard's
sha256 is computed from the bytes as they are written (no second read); and a shard appears under its
final name only once it is complete.

Member names: the tar format is POSIX.1-2001 (PAX). A name that fits the 100-byte USTAR field gets a
plain USTAR header, byte for byte what earlier versions wrote; a longer one (long slide ids: a TCGA
export name easily passes 100 bytes once ``__x…_y….h0-mini_mean_patch.npy`` is appended) gets a PAX
``path`` record first, which tarfile, webdataset, GNU tar and :mod:`cytosyn.data.tario` all read.

Per-sample digests (``sample_digests=True``): beside ``<shard>`` a small ``<shard>.digests`` file holds
one 16-byte BLAKE2b digest per sample (over its member names and bytes, not the tar headers). A reader
whose shard no longer matches its sha256 can then drop exactly the damaged samples instead of the whole
shard (:func:`read_sample_digests`, :func:`sample_digest`).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cytosyn.fileio import atomic_write_bytes

_TAR_OWNER = "cytosyn"
_TAR_MTIME = 0
_TAR_MODE = 0o444


DIGESTS_SUFFIX = ".digests"
_DIGESTS_MAGIC = b"CYTOSYN-SAMPLE-DIGESTS/1\n"
_DIGEST_SIZE = 16


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name, relative to the folder it was written in
    count: int  # samples
    bytes: int
    sha256: str
    digests: str | None = None  # per-sample digest file beside the shard (``<name>.digests``), if written
    digests_sha256: str | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "count": self.count, "bytes": self.bytes}
        out["sha256"] = self.sha256
        if self.digests is not None:
            out |= {"digests": self.digests, "digests_sha256": self.digests_sha256}
        return out


def sample_digest(key: str, members: Iterable[tuple[str, bytes | bytearray | memoryview]]) -> bytes:
    """16-byte BLAKE2b of one sample: each member's name (``key.ext``) and bytes, in tar order."""
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    for ext, data in members:
        name = f"{key}.{ext}".encode()
        h.update(struct.pack("<IQ", len(name), len(data)))
        h.update(name)
        h.update(data)
    return h.digest()


def _digests_blob(digests: list[bytes]) -> bytes:
    return _DIGESTS_MAGIC + struct.pack("<Q", len(digests)) + b"".join(digests)


def read_sample_digests(path: Path, sha256: str | None = None) -> list[bytes] | None:
    """The per-sample digests of a ``.digests`` file, or None when it is missing, damaged or (with
    ``sha256``) not the file the manifest recorded."""
    try:
        blob = Path(path).read_bytes()
    except OSError:
        return None
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        return None
    head = len(_DIGESTS_MAGIC) + 8
    if not blob.startswith(_DIGESTS_MAGIC) or len(blob) < head:
        return None
    (count,) = struct.unpack_from("<Q", blob, len(_DIGESTS_MAGIC))
    if len(blob) != head + count * _DIGEST_SIZE:
        return None
    return [blob[head + i * _DIGEST_SIZE : head + (i + 1) * _DIGEST_SIZE] for i in range(count)]


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


def _sample_members(sample: Mapping[str, object]) -> list[tuple[str, bytes | bytearray | memoryview]]:
    """A sample's members as (extension, bytes), sorted by name like webdataset writes them."""
    key = str(sample["__key__"])
    members = []
    for name in sorted(k for k in sample if not k.startswith("_")):
        data = sample[name]
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"member {name!r} of {key!r} must be bytes, got {type(data).__name__}")
        members.append((name, data))
    return members


def _add_sample(
    tar: tarfile.TarFile, key: str, members: list[tuple[str, bytes | bytearray | memoryview]]
) -> int:
    """Append one sample's members with fixed headers; returns the member bytes written."""
    total = 0
    for name, data in members:
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
    members. ``name_for(index)`` names shard number ``index`` (0-based). ``sample_digests``: also write
    ``<shard>.digests`` (see the module docstring), atomically, before the shard itself.
    """

    def __init__(
        self,
        folder: Path,
        name_for: Callable[[int], str],
        max_samples: int,
        max_bytes: int | None = None,
        sample_digests: bool = False,
    ):
        if max_samples < 1:
            raise ValueError("max_samples must be ≥ 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name_for = name_for
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.sample_digests = sample_digests
        self._digests: list[bytes] = []
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
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT)  # type: ignore[arg-type]
        self._count = 0
        self._payload = 0
        self._digests = []

    def write(self, sample: Mapping[str, object]) -> None:
        key = str(sample.get("__key__", ""))
        if "__key__" not in sample or "." in key or not key:
            raise ValueError(f"sample key must exist and contain no dot: {sample.get('__key__')!r}")
        members = _sample_members(sample)
        if self._tar is None:
            self._open()
        assert self._tar is not None
        try:
            self._payload += _add_sample(self._tar, key, members)
        except (ValueError, tarfile.TarError) as err:
            raise ValueError(f"cannot write sample {key!r} into {self._final}: {err}") from err
        if self.sample_digests:
            self._digests.append(sample_digest(key, members))
        self._count += 1
        if self._count >= self.max_samples or (self.max_bytes and self._payload >= self.max_bytes):
            self._close_current()

    def _close_current(self) -> None:
        if self._tar is None or self._file is None:
            return
        self._tar.close()  # writes the end-of-archive blocks through the hashing file
        self._file.close()
        digests = digests_sha = None
        if self.sample_digests:  # before the shard: a shard under its final name always has its digests
            blob = _digests_blob(self._digests)
            digests = self._final.name + DIGESTS_SUFFIX
            digests_sha = hashlib.sha256(blob).hexdigest()
            atomic_write_bytes(self.folder / digests, blob)
        os.replace(self._tmp, self._final)
        self.shards.append(
            ShardInfo(
                self._final.name,
                self._count,
                self._file.size,
                self._file.sha.hexdigest(),
                digests,
                digests_sha,
            )
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


def _check_end_marker(path: Path, offset: int) -> None:
    """A tar ends with two zero blocks; tarfile's stream reader takes a header cut short for the end, so
    a shard truncated between members would otherwise read as a shorter, valid one."""
    with open(path, "rb") as f:
        f.seek(offset)
        if f.read(1024) != bytes(1024):
            raise tarfile.ReadError(f"no end-of-archive marker after byte {offset}")


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
                end = tar.offset
            reader.drain()
            _check_end_marker(path, end)
        except (tarfile.TarError, EOFError) as err:
            raise ShardReadError(f"{path} is truncated or not a valid tar: {err}") from None
        if current_key is not None:
            yield (current_key, members), reader
