"""Pure planning of who reads which sample, computed from the manifest's per-shard counts alone.

Positions: a split of ``N`` samples has *canonical* indices ``0 … N-1`` (shard order of the manifest,
then order inside the shard). Nothing here opens a shard; every function is a deterministic function of
its arguments, so every rank and every DataLoader worker computes the same plan independently.

Epoch mode, epoch ``e``:

1. ``D = N mod world_size`` samples are dropped: canonical indices ``(e·D + i) mod N`` for ``i < D``
   (a window that rotates through the dataset, so over the epochs every sample is dropped equally
   often; with ``D = 0`` nothing is dropped).
2. The shards are permuted with a generator seeded by ``(seed, e)``; the epoch sequence is the
   concatenation of the permuted shards (samples inside a shard stay in file order) minus the dropped
   ones: ``N - D`` positions.
3. Rank ``r`` takes the contiguous slice ``[r·S, (r+1)·S)`` with ``S = (N - D) / world_size``.
4. The rank's ``S`` samples make ``B = ceil(S / batch_size)`` batches (``floor`` with ``drop_last``);
   batch ``j`` belongs to worker ``j mod num_workers``, which is the order in which
   ``torch.utils.data.DataLoader`` collects worker outputs. Worker ``w`` reads the contiguous part of
   the rank's slice that holds as many samples as its batches need (worker 0 first).
5. Inside its part a worker emits samples in a *windowed shuffle* order (see :func:`window_shuffle`).

Resampled mode, pass ``p``: the same shard permutation seeded by ``(seed, p)``, nothing dropped, and
the pass is cut into ``world_size · num_workers`` contiguous chunks of (almost) equal length, one per
(rank, worker); each worker chains its chunks of passes 0, 1, 2, … into an endless stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Tags that keep the random streams of different purposes apart.
_TAG_SHARDS = 1
_TAG_WINDOW = 2


def rng_for(seed: int, *parts: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``parts`` (all non-negative ints)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(int(p) for p in parts)]))


@dataclass(frozen=True)
class Segment:
    """Samples ``lo … hi-1`` (in file order) of shard number ``shard`` of the manifest."""

    shard: int
    lo: int
    hi: int

    def __len__(self) -> int:
        return self.hi - self.lo


def segments_length(segments: Sequence[Segment]) -> int:
    return sum(len(s) for s in segments)


def slice_segments(segments: Sequence[Segment], start: int, stop: int) -> list[Segment]:
    """Positions ``start … stop-1`` of the sequence that ``segments`` concatenate."""
    out: list[Segment] = []
    pos = 0
    for seg in segments:
        n = len(seg)
        a, b = max(start, pos), min(stop, pos + n)
        if a < b:
            out.append(Segment(seg.shard, seg.lo + a - pos, seg.lo + b - pos))
        pos += n
        if pos >= stop:
            break
    return out


def shard_order(num_shards: int, seed: int, epoch_or_pass: int) -> np.ndarray:
    """The shard permutation of an epoch (or pass); common to every rank."""
    return rng_for(seed, _TAG_SHARDS, epoch_or_pass).permutation(num_shards)


def dropped_canonical(total: int, world_size: int, epoch: int) -> list[tuple[int, int]]:
    """Canonical index ranges ``[a, b)`` dropped in ``epoch`` (the rotating ``N mod world_size`` window)."""
    drop = total % world_size
    if drop == 0:
        return []
    start = (epoch * drop) % total
    end = start + drop
    if end <= total:
        return [(start, end)]
    return [(start, total), (0, end - total)]


def sequence_segments(
    counts: Sequence[int], seed: int, epoch_or_pass: int, dropped: Sequence[tuple[int, int]] = ()
) -> list[Segment]:
    """The permuted-shard sequence of an epoch/pass, with canonical ranges ``dropped`` left out."""
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    out: list[Segment] = []
    for s in shard_order(len(counts), seed, epoch_or_pass):
        s = int(s)
        lo, hi = int(starts[s]), int(starts[s + 1])
        pieces = [(lo, hi)]
        for a, b in dropped:
            nxt = []
            for x, y in pieces:
                if b <= x or a >= y:
                    nxt.append((x, y))
                    continue
                if x < a:
                    nxt.append((x, a))
                if b < y:
                    nxt.append((b, y))
            pieces = nxt
        out.extend(Segment(s, x - lo, y - lo) for x, y in pieces if y > x)
    return out


def window_shuffle(length: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """A shuffle-buffer order of ``range(length)`` that is computed, not simulated.

    Output order is ``argsort(i + window · u_i)`` with ``u_i`` uniform in [0, 1): every sample moves by
    less than ``window`` positions, and a reader that streams the input in order never holds more than
    ``window`` samples while emitting in this order (an input ``i`` can be emitted once input
    ``i + window`` has been read). Being an index permutation, it can be resumed at any output position
    without replaying the data.
    """
    if window <= 1 or length <= 1:
        return np.arange(length, dtype=np.int64)
    keys = np.arange(length, dtype=np.float64) + rng.random(length) * window
    return np.argsort(keys, kind="stable").astype(np.int64)


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch."""

    total: int  # N, samples in the split
    dropped: int  # samples dropped this epoch (N mod world_size, or more with drop_last)
    per_rank: int  # S
    batch_sizes: tuple[int, ...]  # sizes of the rank's batches 0 … B-1
    worker_segments: tuple[tuple[Segment, ...], ...]  # per worker, its contiguous part
    num_workers: int

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)

    def worker_batch_sizes(self, worker: int) -> list[int]:
        return list(self.batch_sizes[worker :: self.num_workers])


def epoch_batches(total: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    per_rank = total // world_size
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def epoch_plan(
    counts: Sequence[int],
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    drop_last: bool = False,
) -> EpochPlan:
    total = int(sum(counts))
    dropped = dropped_canonical(total, world_size, epoch)
    seq = sequence_segments(counts, seed, epoch, dropped)
    per_rank = total // world_size
    rank_segs = slice_segments(seq, rank * per_rank, (rank + 1) * per_rank)
    nb = epoch_batches(total, world_size, batch_size, drop_last)
    sizes = [batch_size] * nb
    if nb and not drop_last:
        sizes[-1] = per_rank - (nb - 1) * batch_size
    worker_segments = []
    pos = 0
    for w in range(num_workers):
        n = sum(sizes[w::num_workers])
        worker_segments.append(tuple(slice_segments(rank_segs, pos, pos + n)))
        pos += n
    used = sum(sizes) * world_size
    return EpochPlan(
        total=total,
        dropped=total - used,
        per_rank=per_rank,
        batch_sizes=tuple(sizes),
        worker_segments=tuple(worker_segments),
        num_workers=num_workers,
    )


def epoch_worker_order(seed: int, epoch: int, rank: int, worker: int, length: int, window: int) -> np.ndarray:
    return window_shuffle(length, window, rng_for(seed, _TAG_WINDOW, 0, epoch, rank, worker))


def pass_chunk_bounds(total: int, chunks: int, index: int) -> tuple[int, int]:
    """Chunk ``index`` of ``chunks`` near-equal contiguous chunks of ``range(total)``."""
    return index * total // chunks, (index + 1) * total // chunks


def pass_worker_segments(
    counts: Sequence[int],
    seed: int,
    pass_index: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> list[Segment]:
    total = int(sum(counts))
    seq = sequence_segments(counts, seed, pass_index)
    a, b = pass_chunk_bounds(total, world_size * num_workers, rank * num_workers + worker)
    return slice_segments(seq, a, b)


def pass_worker_order(
    seed: int, pass_index: int, rank: int, worker: int, length: int, window: int
) -> np.ndarray:
    return window_shuffle(length, window, rng_for(seed, _TAG_WINDOW, 1, pass_index, rank, worker))
