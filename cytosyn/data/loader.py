"""The training loader: a split's shards → batches, split across ranks and workers, resumable.

Usage::

    loader = build_loader(split_dir, LoaderConfig(batch_size=32), rank=rank, world_size=world_size)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:  # len(loader) batches, the same number on every rank
            batch["image"]  # uint8 B×3×H×W (or float32 in [-1, 1] with image_format="float")
            batch["h0-mini"], batch["vae"]  # the .npy members, stacked, dtype kept (fp16)
            batch["json"], batch["__key__"]  # lists
            ...
        ckpt["loader"] = loader.state_dict()  # at any step, not only at epoch ends

See docs/loader.md for the rules (which rank reads what, what is dropped, resume, corrupt samples).

Design: the :class:`torch.utils.data.IterableDataset` below yields whole batches, each worker its own
(batch ``j`` of a rank is built by worker ``j mod num_workers``), and the DataLoader runs with
``batch_size=None``. DataLoader hands out worker outputs round-robin in task order, so the rank's
batches arrive as 0, 1, 2, …; each batch carries its worker's cursor (how far into its planned sample
order it has read, corrupt samples included) and the wrapper records the cursor of the last batch
*handed out* per worker. Resuming tells every worker where to continue; the worker recomputes its sample
order (a pure function of seed, epoch, rank and worker, see :mod:`cytosyn.data.plan`) and streams from
the first sample it still has to emit, never decoding the ones already consumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cytosyn.config import StrictModel
from cytosyn.data.decode import (
    SHAPE_MISMATCH,
    DecodeSpec,
    collate,
    decode_sample,
    private_alloc,
    shape_signature,
)
from cytosyn.data.plan import (
    Segment,
    epoch_batches,
    epoch_plan,
    epoch_worker_order,
    pass_chunk_bounds,
    pass_worker_order,
    pass_worker_segments,
)
from cytosyn.data.tario import Failure, RawSample, read_segment
from cytosyn.manifest import SplitManifest, read_manifest

log = logging.getLogger(__name__)

STATE_FORMAT = "cytosyn.loader/1"


class LoaderConfig(StrictModel):
    batch_size: int = Field(32, ge=1)  # per rank
    num_workers: int = Field(4, ge=0)  # DataLoader worker processes (0 = read in the main process)
    mode: Literal["epoch", "resampled"] = "epoch"
    shuffle_buffer: int = Field(1000, ge=0)  # samples a worker holds to shuffle (0 or 1 = no shuffle)
    seed: int = Field(0, ge=0)
    members: list[str] | None = None  # "image", "json", "label", "<name>.npy"; None = all but label
    image_format: Literal["uint8", "float"] = "uint8"  # uint8 in [0, 255] or float32 in [-1, 1]
    verify_hashes: bool = False  # sha256-check each shard (once per worker process) before first use
    drop_last: bool = False  # drop each rank's last partial batch (then an epoch is not exact-once)
    pin_memory: bool = False
    prefetch_factor: int = Field(2, ge=1)  # batches in flight per worker


@dataclass
class LoaderStats:
    """Counters over the batches handed out by this loader (saved in its state)."""

    samples_seen: int = 0  # real samples handed out (padding excluded)
    batches_seen: int = 0
    skipped_corrupt: dict[str, int] = field(default_factory=dict)  # reason → samples skipped
    padded: int = 0  # repeated samples used to fill batches short of good samples
    dropped: int = 0  # epoch mode: samples left out by the N mod world_size rule, completed epochs
    passes: int = 0  # epoch mode: epochs completed; resampled: passes every worker has completed

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped_corrupt.values())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# What the workers run (everything here is picklable and recomputed inside each worker).


@dataclass(frozen=True)
class _Spec:
    folder: str
    shard_names: tuple[str, ...]
    shard_counts: tuple[int, ...]
    shard_sha256: tuple[str, ...]
    verify_hashes: bool
    decode: DecodeSpec
    image_format: str
    batch_size: int
    seed: int
    rank: int
    world_size: int
    num_workers: int  # effective (≥ 1)
    window: int
    drop_last: bool
    mode: str
    prefetch_factor: int

    @property
    def total(self) -> int:
        return sum(self.shard_counts)


@dataclass(frozen=True)
class _WorkerPos:
    pass_index: int  # epoch (epoch mode) or pass (resampled mode)
    cursor: int  # samples of the worker's planned order consumed (corrupt ones included)
    batches: int  # batches handed out since the origin


@dataclass(frozen=True)
class _Start:
    workers: tuple[_WorkerPos, ...]
    rotation: int  # DataLoader worker i plays logical worker (i + rotation) mod num_workers


def _identity(x: Any) -> Any:
    return x


class _SharedRing:
    """Batch tensors in shared memory, allocated once per worker process, reused in turn, and
    passed to the main process once.

    By default a DataLoader worker copies every output tensor into a freshly created shared-memory
    segment and passes its file descriptor to the main process, which maps it: for a batch of 32
    images at 224 px that costs ~100 µs per image in page faults and descriptor passing, a third of
    decoding it. Here each worker fills ``slots`` preallocated segments in turn. A segment travels
    to the main process (as a tensor) the first time it is used; afterwards a batch only names it
    (:class:`_Slot`), and the main process, which kept the mapping, copies the batch out as soon as
    it receives it (:meth:`TrainLoader._unpack`). Reuse is safe because a worker has at most
    ``prefetch_factor`` batches in flight: it writes the slot of its batch ``t`` only after the main
    process has handed out (and so copied) its batch ``t - prefetch_factor``, and
    ``slots = prefetch_factor + 2``.
    """

    def __init__(self, worker: int, slots: int):
        self.worker = worker
        self.slots = slots
        self.buffers: dict[tuple, list[torch.Tensor]] = {}
        self.turns: dict[tuple, int] = {}
        self.ids: dict[int, tuple] = {}  # id(tensor) → slot id
        self.sent: set[tuple] = set()

    def __call__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        k = (key, shape, dtype)
        ring = self.buffers.setdefault(k, [])
        turn = self.turns.get(k, 0)
        self.turns[k] = turn + 1
        if len(ring) < self.slots:
            t = torch.empty(shape, dtype=dtype).share_memory_()
            self.ids[id(t)] = (self.worker, key, tuple(shape), str(dtype), len(ring))
            ring.append(t)
        return ring[turn % self.slots]

    def pack(self, batch: dict[str, Any]) -> None:
        """Replace the batch's ring tensors by slot references (with the tensor on first use)."""
        for name, value in batch.items():
            if isinstance(value, torch.Tensor) and id(value) in self.ids:
                slot = self.ids[id(value)]
                first = slot not in self.sent
                self.sent.add(slot)
                batch[name] = _Slot(slot, value if first else None)


@dataclass(frozen=True)
class _Slot:
    slot: tuple
    tensor: torch.Tensor | None  # only the first time the slot is sent


def _read_chunk(
    spec: _Spec, segments: Iterable[Segment], need: np.ndarray, start: int
) -> Iterator[tuple[int, RawSample | Failure]]:
    """Yield ``(i, item)`` for each chunk position ``i ≥ start`` with ``need[i]``, in position order."""
    base = 0
    folder = Path(spec.folder)
    read = spec.decode.read_members
    for seg in segments:
        n = len(seg)
        if base + n > start:
            mask = need[base : base + n]
            sha = spec.shard_sha256[seg.shard] if spec.verify_hashes else None
            for num, item in read_segment(
                folder / spec.shard_names[seg.shard], seg.lo, seg.hi, mask, read, sha
            ):
                yield base + num - seg.lo, item
        base += n


def _emit(
    spec: _Spec, segments: tuple[Segment, ...] | list[Segment], order: np.ndarray, cursor: int
) -> Iterator[tuple[int, RawSample | Failure]]:
    """Yield ``(cursor_after, item)`` for ``order[cursor:]``, reading the chunk once, in file order.

    Samples read ahead of their turn wait in ``held``; with a windowed-shuffle order that is at most
    ``window`` samples (the shuffle buffer).
    """
    length = len(order)
    if cursor >= length:
        return
    rest = order[cursor:]
    need = np.zeros(length, dtype=bool)
    need[rest] = True
    reader = _read_chunk(spec, segments, need, int(rest.min()))
    held: dict[int, RawSample | Failure] = {}
    for out in range(cursor, length):
        idx = int(order[out])
        while idx not in held:
            try:
                j, item = next(reader)
            except StopIteration:  # cannot happen: read_segment yields every wanted number
                raise RuntimeError(f"shard reader ended before sample {idx} of its chunk") from None
            held[j] = item
        yield out + 1, held.pop(idx)


def _failure_record(f: Failure) -> tuple[str, str, str | None, str]:
    return (f.reason, f.shard, f.key, f.detail)


def _pad_samples(spec: _Spec, own: Iterable[Segment], need: int, sig: tuple | None) -> list[dict[str, Any]]:
    """``need`` good samples to fill a short batch: the first readable ones of the worker's own part
    (file order), else of the whole split; repeated if there are fewer. Deterministic."""
    found: list[dict[str, Any]] = []
    everything = [Segment(s, 0, c) for s, c in enumerate(spec.shard_counts)]
    for segs in (list(own), everything):
        total = sum(len(s) for s in segs)
        for _, item in _read_chunk(spec, segs, np.ones(total, dtype=bool), 0):
            if isinstance(item, RawSample):
                item = decode_sample(item, spec.decode)
            if isinstance(item, Failure):
                continue
            if sig is None:
                sig = shape_signature(item, spec.decode)
            elif shape_signature(item, spec.decode) != sig:
                continue
            found.append(item)
            if len(found) >= need:
                return found
    if not found:
        raise RuntimeError(f"split {spec.folder} has no readable sample to fill a batch with")
    return [found[i % len(found)] for i in range(need)]


def _build_batches(
    spec: _Spec,
    worker: int,
    stream: Iterator[tuple[tuple[int, int], RawSample | Failure]],
    targets: Iterator[tuple[int, int]],
    start: _WorkerPos,
    pad: Callable[[int, tuple | None], list[dict[str, Any]]] | None,
    give_up_after: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Fill batches of the target sizes from the stream, skipping (and recording) corrupt samples."""
    pos = (start.pass_index, start.cursor)
    done = start.batches
    shared = get_worker_info() is not None
    ring = _SharedRing(worker, spec.prefetch_factor + 2) if shared else None
    alloc = ring if ring is not None else private_alloc
    bad_run = 0
    for index, size in targets:
        samples: list[dict[str, Any]] = []
        corrupt: list[tuple[str, str, str | None, str]] = []
        sig: tuple | None = None
        while len(samples) < size:
            try:
                pos, item = next(stream)
            except StopIteration:
                break
            if isinstance(item, RawSample):
                item = decode_sample(item, spec.decode)
            if not isinstance(item, Failure):
                s = shape_signature(item, spec.decode)
                if sig is None:
                    sig = s
                elif s != sig:
                    item = Failure(SHAPE_MISMATCH, "", item["__key__"], f"{s} != {sig}")
            if isinstance(item, Failure):
                corrupt.append(_failure_record(item))
                bad_run += 1
                if give_up_after is not None and bad_run > give_up_after:
                    raise RuntimeError(
                        f"worker {worker} of rank {spec.rank} read a whole pass of its part of "
                        f"{spec.folder} without one good sample (last: {corrupt[-1]})"
                    )
                continue
            bad_run = 0
            samples.append(item)
        padded = 0
        if len(samples) < size:
            if pad is None:  # pragma: no cover - the resampled stream never ends
                raise RuntimeError("sample stream ended early")
            padded = size - len(samples)
            samples.extend(pad(padded, sig))
        done += 1
        batch = collate(samples, spec.decode, spec.image_format, alloc)
        batch["__meta__"] = {
            "worker": worker,
            "index": index,
            "pass": pos[0],
            "cursor": pos[1],
            "batches": done,
            "corrupt": corrupt,
            "padded": padded,
            "samples": len(samples) - padded,
        }
        if ring is not None:
            ring.pack(batch)
        yield batch


def _epoch_worker(spec: _Spec, worker: int, start: _WorkerPos) -> Iterator[dict[str, Any]]:
    epoch = start.pass_index
    plan = epoch_plan(
        spec.shard_counts,
        spec.seed,
        epoch,
        spec.rank,
        spec.world_size,
        spec.batch_size,
        spec.num_workers,
        spec.drop_last,
    )
    segs = plan.worker_segments[worker]
    sizes = plan.worker_batch_sizes(worker)
    order = epoch_worker_order(spec.seed, epoch, spec.rank, worker, sum(sizes), spec.window)
    stream = (((epoch, c), item) for c, item in _emit(spec, segs, order, start.cursor))
    targets = ((worker + spec.num_workers * t, sizes[t]) for t in range(start.batches, len(sizes)))
    yield from _build_batches(
        spec, worker, stream, targets, start, lambda need, sig: _pad_samples(spec, segs, need, sig)
    )


def _pass_stream(
    spec: _Spec, worker: int, start: _WorkerPos
) -> Iterator[tuple[tuple[int, int], RawSample | Failure]]:
    p, cursor = start.pass_index, start.cursor
    while True:
        segs = pass_worker_segments(
            spec.shard_counts, spec.seed, p, spec.rank, spec.world_size, worker, spec.num_workers
        )
        length = sum(len(s) for s in segs)
        order = pass_worker_order(spec.seed, p, spec.rank, worker, length, spec.window)
        for c, item in _emit(spec, segs, order, cursor):
            yield ((p + 1, 0) if c == length else (p, c)), item
        p, cursor = p + 1, 0


def _resampled_worker(spec: _Spec, worker: int, start: _WorkerPos) -> Iterator[dict[str, Any]]:
    g = spec.rank * spec.num_workers + worker
    a, b = pass_chunk_bounds(spec.total, spec.world_size * spec.num_workers, g)
    t = start.batches
    targets = ((worker + spec.num_workers * (t + i), spec.batch_size) for i in range(10**18))
    yield from _build_batches(spec, worker, _pass_stream(spec, worker, start), targets, start, None, b - a)


class _BatchStream(IterableDataset):
    """Yields this DataLoader worker's batches (each a dict of tensors plus ``__meta__``)."""

    def __init__(self, spec: _Spec, start: _Start):
        super().__init__()
        self.spec = spec
        self.start = start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != self.spec.num_workers:
            raise RuntimeError(f"planned for {self.spec.num_workers} workers, DataLoader runs {n}")
        worker = (wid + self.start.rotation) % n
        pos = self.start.workers[worker]
        if self.spec.mode == "epoch":
            yield from _epoch_worker(self.spec, worker, pos)
        else:
            yield from _resampled_worker(self.spec, worker, pos)


# ----------------------------------------------------------------------------------------------------
# The public loader.


def _resolve_members(manifest: SplitManifest, members: list[str] | None) -> DecodeSpec:
    image_member = manifest.image_member
    features = tuple(f.member for f in manifest.features)
    if members is None:
        return DecodeSpec(image_member, True, True, features)
    image = json_ = label = False
    arrays: list[str] = []
    for m in members:
        if m in ("image", image_member):
            image = True
        elif m == "json":
            json_ = True
        elif m == "label":
            label = True
        elif m.endswith(".npy"):
            if m not in arrays:
                arrays.append(m)
        else:
            raise ValueError(
                f"unknown member {m!r}: use 'image', 'json', 'label' or a '.npy' member "
                f"(this split's image member is {image_member!r}, features {list(features)})"
            )
    vocab: tuple[str, ...] = ()
    if label:
        per_label = manifest.stats.get("tiles_per_label") or {}
        vocab = tuple(sorted(k for k in per_label if k != "(none)"))
        if not vocab:
            raise ValueError(
                f"member 'label' asked for, but split {manifest.split!r} has no labelled tiles "
                "(its manifest's stats.tiles_per_label is empty: ingest class folders or a CSV with labels)"
            )
    return DecodeSpec(image_member, image, json_, tuple(arrays), label, vocab)


def _fingerprint(manifest: SplitManifest) -> str:
    shards = [[s.name, s.count, s.sha256] for s in manifest.shards]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


class TrainLoader:
    """Iterable of batches for one rank; see the module docstring and docs/loader.md."""

    def __init__(self, split_dir: Path, cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.split_dir = Path(split_dir)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.manifest = read_manifest(self.split_dir)
        self.num_workers = max(1, cfg.num_workers)  # logical workers (1 when reading in-process)
        total = self.manifest.samples
        if self.cfg.mode == "epoch" and epoch_batches(total, world_size, cfg.batch_size, cfg.drop_last) < 1:
            raise ValueError(
                f"split {self.split_dir} has {total} samples: not one batch of {cfg.batch_size} per rank "
                f"for {world_size} ranks" + (" with drop_last" if cfg.drop_last else "")
            )
        if self.cfg.mode == "resampled" and total < world_size * self.num_workers:
            raise ValueError(
                f"split {self.split_dir} has {total} samples, fewer than ranks × workers = "
                f"{world_size * self.num_workers}"
            )
        self._spec = _Spec(
            folder=str(self.split_dir),
            shard_names=tuple(s.name for s in self.manifest.shards),
            shard_counts=tuple(s.count for s in self.manifest.shards),
            shard_sha256=tuple(s.sha256 for s in self.manifest.shards),
            verify_hashes=cfg.verify_hashes,
            decode=_resolve_members(self.manifest, cfg.members),
            image_format=cfg.image_format,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
            window=cfg.shuffle_buffer,
            drop_last=cfg.drop_last,
            mode=cfg.mode,
            prefetch_factor=cfg.prefetch_factor,
        )
        self._dataset_id = _fingerprint(self.manifest)
        self.stats = LoaderStats()
        self.epoch = 0
        self._reset_position(0)

    # -- position -----------------------------------------------------------------------------------

    def _reset_position(self, pass_index: int, origin: int = 0) -> None:
        """Every worker at the start of epoch/pass ``pass_index``; ``origin`` = rank batches before."""
        self._batches = origin  # batches handed out (this epoch in epoch mode, in total in resampled mode)
        self._origin = origin  # batch count at which the workers' batch counters are zero
        self._origin_pass = pass_index  # resampled mode: the pass every worker started at, at the origin
        self._workers = [_WorkerPos(pass_index, 0, 0) for _ in range(self.num_workers)]

    def set_epoch(self, epoch: int) -> None:
        """Epoch mode: iterate ``epoch`` next. A no-op when it is the current epoch (so a resumed
        position is kept); after a completed epoch the loader has already moved to the next one."""
        if self.cfg.mode != "epoch":
            return
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_position(epoch)

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank). Not defined in resampled mode."""
        if self.cfg.mode != "epoch":
            raise TypeError("a resampled loader is endless; see batches_per_pass")
        return epoch_batches(self.manifest.samples, self.world_size, self.cfg.batch_size, self.cfg.drop_last)

    @property
    def batches_per_pass(self) -> int:
        """Nominal batches per rank for one pass over the split (resampled mode: for scheduling)."""
        return -(-self.manifest.samples // (self.world_size * self.cfg.batch_size))

    # -- iteration ----------------------------------------------------------------------------------

    def _data_loader(self) -> DataLoader:
        rotation = (self._batches - self._origin) % self.num_workers
        dataset = _BatchStream(self._spec, _Start(tuple(self._workers), rotation))
        nw = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=nw,
            collate_fn=_identity,
            pin_memory=False,  # done by _unpack, straight from the workers' shared buffers
            prefetch_factor=self.cfg.prefetch_factor if nw > 0 else None,
            persistent_workers=False,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch (epoch mode), or an endless stream (resampled mode)."""
        expected_end = len(self) if self.cfg.mode == "epoch" else None
        if expected_end is None or self._batches < expected_end:
            slots: dict[tuple, torch.Tensor] = {}  # the workers' shared buffers, mapped once
            for batch in self._data_loader():
                meta = batch.pop("__meta__")
                self._unpack(batch, slots)
                self._consume(meta)
                yield batch
        if expected_end is not None:
            if self._batches != expected_end:
                raise RuntimeError(f"rank {self.rank} got {self._batches} batches, planned {expected_end}")
            self._finish_epoch()

    def _unpack(self, batch: dict[str, Any], slots: dict[tuple, torch.Tensor]) -> None:
        """Copy ring-buffer tensors out of shared memory now: the worker reuses them (see _SharedRing)."""
        pin = self.cfg.pin_memory and torch.cuda.is_available()
        for name, value in batch.items():
            if isinstance(value, _Slot):
                if value.tensor is not None:
                    slots[value.slot] = value.tensor
                src = slots[value.slot]
                if pin:
                    batch[name] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True).copy_(src)
                else:
                    batch[name] = torch.from_numpy(src.numpy().copy())  # one thread, unlike clone()
            elif pin and isinstance(value, torch.Tensor):
                batch[name] = value.pin_memory()

    def _consume(self, meta: dict[str, Any]) -> None:
        if meta["index"] != self._batches - self._origin:
            raise RuntimeError(
                f"batch order broken: got batch {meta['index']} of worker {meta['worker']}, "
                f"expected {self._batches - self._origin}"
            )
        self._workers[meta["worker"]] = _WorkerPos(meta["pass"], meta["cursor"], meta["batches"])
        self._batches += 1
        st = self.stats
        st.batches_seen += 1
        st.samples_seen += meta["samples"]
        st.padded += meta["padded"]
        for reason, *_ in meta["corrupt"]:
            st.skipped_corrupt[reason] = st.skipped_corrupt.get(reason, 0) + 1
        if self.cfg.mode == "resampled":
            st.passes = max(st.passes, min(w.pass_index for w in self._workers))
        if meta["corrupt"]:
            shown = "; ".join(
                f"{r} {s}:{k or '?'}{' (' + d + ')' if d else ''}" for r, s, k, d in meta["corrupt"][:5]
            )
            more = len(meta["corrupt"]) - 5
            log.warning(
                "rank %d batch %d: skipped %d corrupt sample(s) [%s%s] (totals: %s)",
                self.rank,
                self._batches - 1,
                len(meta["corrupt"]),
                shown,
                f"; +{more} more" if more > 0 else "",
                st.skipped_corrupt,
            )
        if meta["padded"]:
            log.warning(
                "rank %d batch %d: %d sample(s) repeated to keep the batch size (padded total %d)",
                self.rank,
                self._batches - 1,
                meta["padded"],
                st.padded,
            )

    def _finish_epoch(self) -> None:
        n, w = self.manifest.samples, self.world_size
        used = (n // w) if not self.cfg.drop_last else len(self) * self.cfg.batch_size
        self.stats.dropped += n - used * w
        self.stats.passes += 1
        self.epoch += 1
        self._reset_position(self.epoch)

    # -- state --------------------------------------------------------------------------------------

    def _topology(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.cfg.batch_size,
            "drop_last": self.cfg.drop_last,
            "shuffle_buffer": self.cfg.shuffle_buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable): where every worker of this rank stands, and the stats."""
        return {
            "format": STATE_FORMAT,
            "mode": self.cfg.mode,
            "seed": self.cfg.seed,
            "dataset": self._dataset_id,
            "rank": self.rank,
            **self._topology(),
            "epoch": self.epoch,
            "batches": self._batches,
            "origin": self._origin,
            "origin_pass": self._origin_pass,
            "workers": [asdict(w) for w in self._workers],
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        """Continue where ``state`` stopped.

        Same world size, workers, batch size, drop_last and shuffle buffer: exactly the remaining
        samples in the same order. A state saved by another rank (e.g. only rank 0's is checkpointed):
        worker cursors are recomputed from the batch counts, exact unless corrupt samples were skipped.
        Anything else changed: with ``strict`` an error; otherwise a warning and a restart at the next
        consistent point: the next epoch (epoch mode) or the next pass (resampled mode), so no sample is
        repeated within an epoch/pass, and the unvisited rest of the interrupted one is skipped.
        Mode, seed or dataset changed: always an error.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a loader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})"
            )
        for key, mine in (("mode", self.cfg.mode), ("seed", self.cfg.seed), ("dataset", self._dataset_id)):
            if state[key] != mine:
                raise ValueError(
                    f"loader state has {key}={state[key]!r}, this loader {mine!r}: cannot resume"
                )
        self.stats = LoaderStats(**state["stats"])
        workers = [_WorkerPos(**w) for w in state["workers"]]
        topo = self._topology()
        changed = {k: (state[k], v) for k, v in topo.items() if state[k] != v}
        if changed:
            if strict:
                raise ValueError(
                    f"loader state was saved with different settings {changed}; cannot resume exactly"
                )
            if self.cfg.mode == "epoch":
                epoch = state["epoch"] + (1 if state["batches"] > 0 else 0)
                log.warning(
                    "loader settings changed since the checkpoint %s: restarting at epoch %d (the rest of epoch "
                    "%d after %d batches is skipped)",
                    changed,
                    epoch,
                    state["epoch"],
                    state["batches"],
                )
                self.epoch = epoch
                self._reset_position(epoch)
            else:
                p = max(w.pass_index + (1 if w.cursor > 0 else 0) for w in workers)
                log.warning(
                    "loader settings changed since the checkpoint %s: restarting at pass %d (the rest of the "
                    "interrupted pass is skipped)",
                    changed,
                    p,
                )
                self._reset_position(p, origin=state["batches"])
            return
        self.epoch = state["epoch"]
        self._batches = state["batches"]
        self._origin = state["origin"]
        self._origin_pass = state["origin_pass"]
        if state["rank"] == self.rank:
            self._workers = workers
            return
        log.info(
            "loader state of rank %d loaded on rank %d: cursors recomputed from batch counts",
            state["rank"],
            self.rank,
        )
        self._workers = [self._nominal_position(w, pos) for w, pos in enumerate(workers)]

    def _nominal_position(self, worker: int, pos: _WorkerPos) -> _WorkerPos:
        """Where ``worker`` of this rank stands after ``pos.batches`` batches if nothing was corrupt."""
        if self.cfg.mode == "epoch":
            plan = epoch_plan(
                self._spec.shard_counts,
                self.cfg.seed,
                self.epoch,
                self.rank,
                self.world_size,
                self.cfg.batch_size,
                self.num_workers,
                self.cfg.drop_last,
            )
            cursor = sum(plan.worker_batch_sizes(worker)[: pos.batches])
            return _WorkerPos(self.epoch, cursor, pos.batches)
        g = self.rank * self.num_workers + worker
        a, b = pass_chunk_bounds(self.manifest.samples, self.world_size * self.num_workers, g)
        done = pos.batches * self.cfg.batch_size
        return _WorkerPos(self._origin_pass + done // (b - a), done % (b - a), pos.batches)


def build_loader(split_dir: str | Path, cfg: LoaderConfig, rank: int = 0, world_size: int = 1) -> TrainLoader:
    """A :class:`TrainLoader` over the split in ``split_dir`` (a folder with ``manifest.json``)."""
    return TrainLoader(Path(split_dir), cfg, rank=rank, world_size=world_size)
