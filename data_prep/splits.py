"""Pure logic of ``cytosyn pack``: patient-level splits, tile quotas, tile choice and the global shuffle.

Nothing here reads or writes a file, so every rule can be property-tested on made-up slide tables.

Splits (:func:`assign_splits`)
    1. Every patient's slides must agree on the project (else :class:`SplitError`).
    2. Held-out TSSs: a patient with any slide from a held-out TSS goes, with all their slides, to the
       held-out split (``test_tss``); patients whose other slides come from other TSSs are listed in
       ``SplitAssignment.mixed_tss_patients``.
    3. The other patients are ordered by stratum (project, sorted; one stratum when ``stratify`` is
       off), and inside a stratum by a seeded hash of the patient id. Walking that order, each patient
       goes to the split with the largest deficit ``n·ratio − count`` (ties: the earlier split in
       ``ratios``). This greedy apportionment keeps every split within one patient of its share over
       the whole table at every prefix, so each stratum (a contiguous run of the order) is within about
       two patients of its share too — stratification without per-stratum rounding that starves small
       splits.
    4. A split with a positive ratio (or the held-out split, when TSSs are held out) that gets no
       patient is an error.

A patient is assigned once, so no patient can be in two splits by construction.

Quotas (:func:`plan_quotas`)
    Per split: cap each slide at ``max_tiles_per_slide``; if the split has a tile budget, share it
    among TSSs in proportion to a weight (slides per TSS, tiles per TSS, or equal), then share each
    TSS's quota among its slides (equally or by tiles). Shares are water-filled (a TSS or slide that
    runs out gives its surplus to the others, in proportion) and rounded by largest remainder, so the
    total is exact whenever enough tiles exist.

Tile choice and shuffle (:func:`choose_tiles`, :func:`shuffle_order`)
    Counter-based hashing (sha256 of seed/purpose/slide id, then splitmix64 of the tile ordinal),
    pure integer arithmetic: the same on every machine and numpy version, independent of the order in
    which slides are listed.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

TssWeighting = Literal["slides", "tiles", "uniform", "none"]
SlideWeighting = Literal["equal", "tiles"]

RATIO_TOLERANCE = 1e-6


class SplitError(ValueError):
    """Slides, patients or split settings that cannot give a valid patient-level split."""


@dataclass(frozen=True)
class SlideRecord:
    """What the split and the quotas need to know about one usable slide."""

    slide_id: str
    patient_id: str
    tss: str
    project: str
    tiles: int  # tiles available in the slide's shards


@dataclass
class SplitAssignment:
    splits: list[str]  # produced splits, in order (ratio splits, then the held-out split)
    patient_split: dict[str, str]  # patient id → split
    slide_split: dict[str, str]  # slide id → split
    mixed_tss_patients: list[str] = field(default_factory=list)  # held out, with slides from other TSSs too

    def patients(self, split: str) -> list[str]:
        return sorted(p for p, s in self.patient_split.items() if s == split)

    def slides(self, split: str) -> list[str]:
        return sorted(sl for sl, s in self.slide_split.items() if s == split)


# --------------------------------------------------------------------------------------------------
# Hashing helpers (deterministic on every platform)
# --------------------------------------------------------------------------------------------------

_U64 = np.uint64


def hash64(*parts: object) -> int:
    """A 64-bit integer from the sha256 of the parts (joined with NUL)."""
    text = "\0".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    z = np.asarray(x, dtype=_U64) + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def tile_hashes(seed: int, purpose: str, slide_id: str, ordinals: np.ndarray) -> np.ndarray:
    """Pseudo-random uint64 per tile ordinal of a slide, for a given purpose ("choose", "shuffle/train")."""
    base = _U64(hash64(seed, purpose, slide_id))
    with np.errstate(over="ignore"):
        return splitmix64(base + np.asarray(ordinals, dtype=_U64))


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def check_ratios(ratios: Mapping[str, float], holdout_split: str | None = None) -> dict[str, float]:
    """Validate split ratios; return the splits with a positive ratio, in the given order."""
    if not ratios:
        raise SplitError("no split ratios given (e.g. {train: 0.8, val: 0.1, test: 0.1})")
    for name, r in ratios.items():
        if not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            raise SplitError(f"split ratio of {name!r} must be a finite number ≥ 0, got {r!r}")
    total = float(sum(ratios.values()))
    if abs(total - 1.0) > RATIO_TOLERANCE:
        raise SplitError(f"split ratios must sum to 1, got {total:g} ({dict(ratios)})")
    if holdout_split is not None and holdout_split in ratios:
        raise SplitError(f"the held-out split name {holdout_split!r} is also a ratio split; rename one")
    return {name: float(r) for name, r in ratios.items() if r > 0}


def group_patients(slides: Sequence[SlideRecord]) -> dict[str, list[SlideRecord]]:
    """Slides per patient (sorted); duplicate slide ids or a patient across projects are errors."""
    seen: set[str] = set()
    by_patient: dict[str, list[SlideRecord]] = defaultdict(list)
    for rec in slides:
        if rec.slide_id in seen:
            raise SplitError(f"slide {rec.slide_id!r} is listed twice")
        seen.add(rec.slide_id)
        by_patient[rec.patient_id].append(rec)
    for patient, recs in by_patient.items():
        recs.sort(key=lambda r: r.slide_id)
        projects = sorted({r.project for r in recs})
        if len(projects) > 1:
            detail = ", ".join(f"{r.slide_id}={r.project}" for r in recs)
            raise SplitError(
                f"patient {patient!r} has slides in different projects ({detail}); "
                "fix the project column of the slide table"
            )
    return dict(sorted(by_patient.items()))


def assign_splits(
    slides: Sequence[SlideRecord],
    ratios: Mapping[str, float],
    *,
    stratify: bool = True,
    holdout_tss: Sequence[str] = (),
    holdout_split: str = "test_tss",
    seed: int = 0,
) -> SplitAssignment:
    """Assign every patient (and so every slide) to exactly one split; see the module docstring."""
    holdout = set(holdout_tss)
    active = check_ratios(ratios, holdout_split if holdout else None)
    by_patient = group_patients(slides)
    if not by_patient:
        raise SplitError("no usable slides: nothing to split")

    patient_split: dict[str, str] = {}
    mixed: list[str] = []
    if holdout:
        present = {r.tss for r in slides}
        if not holdout & present:
            raise SplitError(
                f"held-out split {holdout_split!r} would be empty: none of the held-out TSSs "
                f"{sorted(holdout)} has a usable slide (TSSs present: {sorted(present)[:20]})"
            )
        unknown = sorted(holdout - present)
        if unknown:  # a typo: that TSS's patients would silently land in the ratio splits
            raise SplitError(
                f"held-out TSS(s) {unknown} match no usable slide (TSSs present: {sorted(present)[:20]}); "
                "fix split.holdout_tss"
            )
        for patient, recs in by_patient.items():
            tss = {r.tss for r in recs}
            if tss & holdout:
                patient_split[patient] = holdout_split
                if tss - holdout:
                    mixed.append(patient)

    rest = [p for p in by_patient if p not in patient_split]

    def stratum(p: str) -> str:
        return by_patient[p][0].project if stratify else ""

    order = sorted(rest, key=lambda p: (stratum(p), hash64(seed, "patient-order", p), p))
    names = list(active)
    counts = dict.fromkeys(names, 0)
    for n, patient in enumerate(order, start=1):
        best = max(range(len(names)), key=lambda i: (n * active[names[i]] - counts[names[i]], -i))
        counts[names[best]] += 1
        patient_split[patient] = names[best]

    empty = [name for name in names if counts[name] == 0]
    if empty:
        raise SplitError(
            f"split(s) {empty} would be empty: {len(rest)} patient(s) to share with ratios "
            f"{ {k: round(v, 6) for k, v in active.items()} }; give them more weight, drop them (ratio 0), "
            "or pack more patients"
        )
    produced = names + ([holdout_split] if holdout else [])
    slide_split = {r.slide_id: patient_split[p] for p, recs in by_patient.items() for r in recs}
    return SplitAssignment(
        produced, dict(sorted(patient_split.items())), dict(sorted(slide_split.items())), mixed
    )


# --------------------------------------------------------------------------------------------------
# Quotas
# --------------------------------------------------------------------------------------------------


def _waterfill(total: float, cap: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Real-valued shares of ``total`` proportional to ``w`` (> 0 items only), none above ``cap``."""
    share = np.zeros(len(cap), dtype=np.float64)
    active = (cap > 1e-9) & (w > 0)
    remaining = float(total)
    while remaining > 1e-9 and active.any():
        portion = np.where(active, remaining * w / w[active].sum(), 0.0)
        room = cap - share
        full = active & (portion >= room - 1e-9)
        if not full.any():
            share += portion
            break
        remaining -= float(room[full].sum())
        share[full] = cap[full]
        active &= ~full
    return share


def allocate(total: int, capacity: Sequence[int], weight: Sequence[float]) -> np.ndarray:
    """Share ``total`` integer units among items in proportion to ``weight``, none above its capacity.

    Water-filling: an item whose proportional share exceeds its capacity is filled, and the surplus is
    shared among the others in proportion again (items of weight 0 only take what the others cannot).
    The real-valued shares are then rounded by largest remainder (ties to the lower index). The result
    sums to ``min(total, sum(capacity))``.
    """
    cap = np.asarray(capacity, dtype=np.int64)
    w = np.asarray(weight, dtype=np.float64)
    if cap.shape != w.shape:
        raise ValueError("capacity and weight must have the same length")
    if (cap < 0).any() or (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("capacities and weights must be finite and ≥ 0")
    target = int(min(max(total, 0), int(cap.sum())))
    capf = cap.astype(np.float64)
    share = _waterfill(target, capf, w)
    short = target - float(share.sum())
    if short > 1e-6:  # the weighted items are full: the rest goes to the others, equally
        room = capf - share
        share += _waterfill(short, room, (room > 1e-9).astype(np.float64))
    base = np.minimum(np.floor(share + 1e-9).astype(np.int64), cap)
    left = target - int(base.sum())
    if left > 0:
        frac = share - base
        for i in sorted(range(len(cap)), key=lambda i: (-frac[i], i)):
            if left == 0:
                break
            if base[i] < cap[i]:
                base[i] += 1
                left -= 1
    return base


@dataclass
class QuotaPlan:
    slide_counts: dict[str, int]  # slide id → tiles to take
    tss: dict[str, dict[str, Any]]  # tss → slides, available, weight, target_share, selected, share
    budget: int | None
    available: int  # tiles after the per-slide cap
    selected: int


def plan_quotas(
    slides: Sequence[SlideRecord],
    *,
    budget: int | None = None,
    max_tiles_per_slide: int | None = None,
    tss_weighting: TssWeighting = "slides",
    slide_weighting: SlideWeighting = "equal",
) -> QuotaPlan:
    """How many tiles each slide of one split gives (see the module docstring)."""
    recs = sorted(slides, key=lambda r: r.slide_id)
    cap = np.array(
        [min(r.tiles, max_tiles_per_slide) if max_tiles_per_slide is not None else r.tiles for r in recs],
        dtype=np.int64,
    )
    available = int(cap.sum())
    by_tss: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(recs):
        by_tss[r.tss].append(i)
    tss_names = sorted(by_tss)
    tss_avail = np.array([cap[by_tss[t]].sum() for t in tss_names], dtype=np.int64)

    def slide_weights(idx: list[int]) -> np.ndarray:
        return cap[idx].astype(np.float64) if slide_weighting == "tiles" else np.ones(len(idx))

    if tss_weighting == "slides":
        tss_w = np.array([float(len(by_tss[t])) for t in tss_names])
    elif tss_weighting == "tiles":
        tss_w = tss_avail.astype(np.float64)
    elif tss_weighting == "uniform":
        tss_w = np.ones(len(tss_names))
    else:
        tss_w = None

    counts = np.zeros(len(recs), dtype=np.int64)
    if budget is None:
        counts = cap.copy()
    elif tss_w is None:
        counts = allocate(budget, cap, slide_weights(list(range(len(recs)))))
    else:
        tss_quota = allocate(budget, tss_avail, tss_w)
        for t, q in zip(tss_names, tss_quota):
            idx = by_tss[t]
            counts[idx] = allocate(int(q), cap[idx], slide_weights(idx))

    selected = int(counts.sum())
    tss_table: dict[str, dict[str, Any]] = {}
    w_total = float(tss_w.sum()) if tss_w is not None else 0.0
    for k, t in enumerate(tss_names):
        got = int(counts[by_tss[t]].sum())
        tss_table[t] = {
            "slides": len(by_tss[t]),
            "available": int(tss_avail[k]),
            "weight": float(tss_w[k]) if tss_w is not None else None,
            "target_share": round(float(tss_w[k]) / w_total, 6)
            if tss_w is not None and w_total > 0
            else None,
            "selected": got,
            "share": round(got / selected, 6) if selected else 0.0,
        }
    return QuotaPlan(
        slide_counts={r.slide_id: int(c) for r, c in zip(recs, counts)},
        tss=tss_table,
        budget=budget,
        available=available,
        selected=selected,
    )


# --------------------------------------------------------------------------------------------------
# Tile choice and shuffle
# --------------------------------------------------------------------------------------------------


def choose_tiles(slide_id: str, n_tiles: int, k: int, seed: int = 0) -> np.ndarray:
    """The ``k`` tile ordinals (sorted) a slide gives: a uniform, seeded subset of ``range(n_tiles)``."""
    if k >= n_tiles:
        return np.arange(n_tiles, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    ordinals = np.arange(n_tiles, dtype=np.int64)
    h = tile_hashes(seed, "choose", slide_id, ordinals)
    pick = np.lexsort((ordinals, h))[:k]
    return np.sort(pick).astype(np.int64)


def shuffle_order(
    split: str, slide_ids: Sequence[str], ordinals: Sequence[np.ndarray], seed: int = 0
) -> np.ndarray:
    """Output position of every chosen tile of a split, listed slide by slide then by ordinal.

    The position is the rank of a seeded hash of (split, slide, ordinal): a global shuffle that does
    not depend on the order of ``slide_ids`` beyond the listing itself.
    """
    if not slide_ids:
        return np.zeros(0, dtype=np.int64)
    keys = np.concatenate(
        [tile_hashes(seed, f"shuffle/{split}", s, o) for s, o in zip(slide_ids, ordinals)]
        or [np.zeros(0, dtype=_U64)]
    )
    rank = np.argsort(keys, kind="stable")
    position = np.empty(len(keys), dtype=np.int64)
    position[rank] = np.arange(len(keys), dtype=np.int64)
    return position
