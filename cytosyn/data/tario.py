"""Reading ranges of samples from webdataset tar shards, skipping what is not wanted without reading it.

A sample is a run of consecutive tar members that share a key (the member name up to its first dot,
as webdataset splits it). Samples are numbered in file order; :func:`read_segment` yields, for every
wanted number in ``[lo, hi)``, exactly one item: a :class:`RawSample` or a :class:`Failure` (truncated
or unreadable shard, hash mismatch). It never raises for a damaged shard.

A small sequential tar reader (:class:`TarMembers`) is used rather than a stream: headers of members
that are not wanted (samples before ``lo``, samples other workers emit, members not decoded) are read,
but their data is seeked over, so a resumed worker or a partial shard costs one 512-byte header per
member skipped. It is several times cheaper per member than ``tarfile`` or webdataset's stream
iterator (built on ``tarfile``); see ``benchmarks/loader.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cytosyn.fileio import sha256_file
from cytosyn.shardio import read_sample_digests, sample_digest

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

# Failure reasons (keys of LoaderStats.skipped_corrupt).
TRUNCATED = "truncated_shard"
UNREADABLE = "unreadable_shard"
HASH_MISMATCH = "hash_mismatch"


@dataclass
class RawSample:
    key: str
    shard: str
    data: dict[str, bytes]  # member (extension) → bytes, only for members that were read
    present: set[str] = field(default_factory=set)  # every member the sample has


@dataclass
class Failure:
    reason: str
    shard: str
    key: str | None = None
    detail: str = ""


def split_member(name: str) -> tuple[str | None, str | None]:
    m = _KEY_EXT.match(name)
    if not m:
        return None, None
    return m.group(1), m.group(2)


_verified: dict[tuple[str, str], bool] = {}


def shard_hash_ok(path: Path, sha256: str) -> bool:
    """sha256 of a shard against the manifest, computed once per process."""
    key = (str(path), sha256)
    if key not in _verified:
        try:
            _verified[key] = sha256_file(path) == sha256
        except OSError:
            _verified[key] = False
    return _verified[key]


class TarFormatError(ValueError):
    """A damaged tar header or a member cut short."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large numbers
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    path = None
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1 : pos + length - 1]
        k, _, v = record.partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "surrogateescape")
        pos += length
    return path


class TarMembers:
    """A minimal sequential reader of regular tar members (ustar, GNU long names, pax paths).

    ``next()`` returns ``(name, size)`` of the next regular member or ``None`` at the end of the
    archive (including an archive that just stops at a block boundary); ``read()`` returns the current
    member's data, and the next ``next()`` seeks over data that was not read. Headers are checksummed;
    damage raises :class:`TarFormatError`. This is ~5× cheaper per member than ``tarfile``, which
    matters when a sample is four small members.
    """

    def __init__(self, fileobj):
        self.f = fileobj
        self._pending = 0  # bytes of the current member (plus padding) not yet consumed
        self._size = 0

    def next(self) -> tuple[str, int] | None:
        f = self.f
        if self._pending:
            f.seek(self._pending, 1)
            self._pending = 0
        long_name: str | None = None
        while True:
            header = f.read(_BLOCK)
            if len(header) < _BLOCK or header == _ZERO_BLOCK:
                return None
            try:
                stored = _octal(header[148:156])
            except ValueError:
                raise TarFormatError("bad header checksum field") from None
            if stored != sum(header) - sum(header[148:156]) + 256:
                raise TarFormatError("header checksum mismatch")
            size = _octal(header[124:136])
            padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
            kind = header[156:157]
            if kind in (b"L", b"x"):
                data = f.read(padded)
                if len(data) < padded:
                    raise TarFormatError("unexpected end of data")
                if kind == b"L":
                    long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    long_name = _pax_path(data[:size]) or long_name
                continue
            if kind not in _REGULAR:
                f.seek(padded, 1)
                long_name = None
                continue
            if long_name is not None:
                name = long_name
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:262] == b"ustar":
                    prefix = header[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            self._size = size
            self._pending = padded
            return name, size

    def read(self) -> bytes:
        data = self.f.read(self._size)
        if len(data) != self._size:
            raise TarFormatError("unexpected end of data")
        self._pending -= self._size
        return data


_digest_cache: dict[tuple[str, str], list[bytes] | None] = {}


def _sample_digests(path: Path, sha256: str) -> list[bytes] | None:
    """A shard's per-sample digests (verified against the manifest), read once per process."""
    key = (str(path), sha256)
    if key not in _digest_cache:
        _digest_cache[key] = read_sample_digests(path, sha256)
    return _digest_cache[key]


def read_segment(
    path: Path,
    lo: int,
    hi: int,
    wanted: np.ndarray,
    read_members: set[str] | None,
    expected_sha256: str | None = None,
    digests: tuple[str, str] | None = None,
) -> Iterator[tuple[int, RawSample | Failure]]:
    """Yield ``(n, item)`` for each sample number ``n`` in ``[lo, hi)`` with ``wanted[n - lo]``.

    ``read_members``: members whose bytes are read (``None`` = all); others are only noted as present.
    ``expected_sha256``: verify the whole shard first. On a mismatch, ``digests`` (the shard's
    per-sample digest file name and its sha256, see :mod:`cytosyn.shardio`) finds the damaged samples,
    which fail alone; without it every wanted sample fails.

    A break in the archive (it ends early, or a header is damaged) fails the samples from the one it
    cut: the sample before a break at a header is complete when it has every member its predecessor
    had, and is then yielded, not counted as damage.
    """
    name = Path(path).name
    idx = np.flatnonzero(wanted)
    if idx.size == 0:
        return
    first = lo + int(idx[0])
    want = wanted.tolist()

    def fail_rest(start: int, reason: str, key: str | None = None, detail: str = ""):
        for n in range(max(start, first), hi):
            if want[n - lo]:
                yield n, Failure(reason, name, key if n == start else None, detail)

    check: list[bytes] | None = None
    if expected_sha256 is not None and not shard_hash_ok(Path(path), expected_sha256):
        if digests is not None:
            check = _sample_digests(Path(path).parent / digests[0], digests[1])
        if check is None:
            why = "sha256 differs from the manifest" + ("" if digests else " (no per-sample digests)")
            yield from fail_rest(first, HASH_MISMATCH, detail=why)
            return

    def finished(number: int, key: str, data: dict[str, bytes], present: set[str]) -> RawSample | Failure:
        if check is not None and (number >= len(check) or sample_digest(key, data.items()) != check[number]):
            return Failure(HASH_MISMATCH, name, key, "sample differs from its digest")
        return RawSample(key, name, data, present)

    try:
        fileobj = open(path, "rb", buffering=1 << 16)  # closed in the finally below
    except OSError as err:
        yield from fail_rest(first, UNREADABLE, detail=str(err))
        return
    try:
        tar = TarMembers(fileobj)
        number = -1  # sample number of the current group
        key: str | None = None
        data: dict[str, bytes] = {}
        present: set[str] = set()
        previous: set[str] | None = None  # members of the last complete sample
        reading = False  # the current group is wanted
        read_all = read_members is None or check is not None  # a digest covers every member
        try:
            while True:
                try:
                    member = tar.next()
                except TarFormatError as err:  # a damaged header: the current group may be whole
                    member, broken = None, str(err)
                else:
                    broken = None if member is not None else "end"
                if member is None:
                    break
                k, ext = split_member(member[0])
                if k is None or ext is None:
                    continue
                if k != key:
                    if reading:
                        yield number, finished(number, key, data, present)  # type: ignore[arg-type]
                    if key is not None:
                        previous = present
                    number += 1
                    if number >= hi:
                        return
                    key, data, present = k, {}, set()
                    reading = number >= first and want[number - lo]
                present.add(ext)
                if reading and (read_all or ext in read_members):  # type: ignore[operator]
                    data[ext] = tar.read()
            whole = number >= 0 and previous is not None and present == previous
            if broken != "end":  # a damaged header
                if whole and reading:
                    yield number, finished(number, key, data, present)  # type: ignore[arg-type]
                yield from fail_rest(
                    number + 1 if whole else max(number, 0), TRUNCATED, None if whole else key, broken
                )
            elif number < hi - 1:  # the archive ends before the samples it should hold
                if whole and reading:
                    yield number, finished(number, key, data, present)  # type: ignore[arg-type]
                what = (
                    f"archive ends after {number + 1} samples" if number >= 0 else "archive holds no sample"
                )
                yield from fail_rest(
                    number + 1 if whole else max(number, 0), TRUNCATED, None if whole else key, what
                )
            elif reading:
                yield number, finished(number, key, data, present)  # type: ignore[arg-type]
        except (TarFormatError, OSError, ValueError) as err:  # member data cut short: this group is damaged
            yield from fail_rest(max(number, 0), TRUNCATED, key, str(err))
    finally:
        fileobj.close()
