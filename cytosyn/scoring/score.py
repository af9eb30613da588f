"""Scoring in memory: a fixed plan (conditions, times, weighting, pruning) applied to batches of tiles.

`cytosyn score` (:mod:`cytosyn.scoring.run`) adds files and resume around these functions; the eval
study (``cytosyn.eval.studies.scoring``) calls them on image sets directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import TileBatch, encode_batch
from .decide import (
    ClassPruner,
    TimeWeights,
    anomaly_scores,
    class_errors,
    classify,
    fit_time_weights,
    pruning_rounds,
    weighted_errors,
)
from .engine import Condition, EngineSettings, ScoringError, TileErrors, denoising_errors

__all__ = ["PruningSettings", "ScoringPlan", "TileScores", "calibrate", "decide", "score_batch"]


@dataclass(frozen=True)
class PruningSettings:
    min_t: int = 20
    every: int = 5
    p_threshold: float = 2e-3

    def describe(self) -> dict[str, Any]:
        return {
            "min_t": self.min_t,
            "every": self.every,
            "p_threshold": self.p_threshold,
            "test": "one-sided paired t-test (scipy.stats.ttest_rel, alternative='greater') of each active class's "
            "weighted errors against the current best class's, over the times both were evaluated at",
        }


@dataclass
class ScoringPlan:
    conditions: list[Condition]
    engine: EngineSettings
    weights: TimeWeights
    pruning: PruningSettings | None = None
    margin_k: int = 10

    def __post_init__(self) -> None:
        self.weights.check(self.engine.grid.values)
        if self.margin_k < 1:
            raise ScoringError(f"margin_k must be >= 1, got {self.margin_k}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.conditions]

    @property
    def class_idx(self) -> list[int]:
        return [i for i, c in enumerate(self.conditions) if c.is_class]

    @property
    def class_names(self) -> list[str]:
        return [str(self.conditions[i].label) for i in self.class_idx]

    @property
    def needs_own(self) -> bool:
        return any(c.kind == "own" for c in self.conditions)

    def rounds(self) -> list[int] | None:
        if self.pruning is None or len(self.class_idx) < 2:
            return None
        return pruning_rounds(len(self.engine.grid), self.pruning.min_t, self.pruning.every)

    def pruner(self) -> ClassPruner | None:
        if self.rounds() is None:
            return None
        assert self.pruning is not None
        return ClassPruner(self.class_idx, self.weights.weights, self.pruning.p_threshold)

    def describe(self) -> dict[str, Any]:
        return {
            "conditions": [c.describe() for c in self.conditions],
            "engine": self.engine.describe(),
            "weighting": self.weights.describe(),
            "pruning": None if self.rounds() is None else self.pruning.describe() | {"rounds": self.rounds()},  # type: ignore[union-attr]
            "margin_k": self.margin_k,
        }


def score_batch(
    pipe: Any, batch: TileBatch, plan: ScoringPlan, tiles_per_batch: int = 16, progress: Any = None
) -> TileErrors:
    """Raw errors of every tile of ``batch`` (encoded with the model's VAE/encoder when needed)."""
    if tiles_per_batch < 1:
        raise ScoringError(f"tiles_per_batch must be >= 1, got {tiles_per_batch}")
    batch = encode_batch(pipe, batch, need_own=plan.needs_own)
    if batch.latents is None or (plan.needs_own and batch.own is None):
        raise ScoringError("the tiles have neither stored latents/embeddings nor images to encode")
    parts: list[TileErrors] = []
    pruner, rounds = plan.pruner(), plan.rounds()
    for start in range(0, len(batch), tiles_per_batch):
        sl = slice(start, start + tiles_per_batch)
        parts.append(
            denoising_errors(
                pipe, batch.latents[sl], batch.keys[sl], plan.conditions, plan.engine,
                own=None if batch.own is None or not plan.needs_own else batch.own[sl],
                pruner=pruner, rounds=rounds,
            )
        )  # fmt: skip
        if progress is not None:
            progress.update(len(batch.keys[sl]))
    return concat_errors(parts, len(plan.conditions), len(plan.engine.grid))


def concat_errors(parts: Sequence[TileErrors], m: int, k: int) -> TileErrors:
    if not parts:
        return TileErrors(
            np.zeros((0, m, k)), np.zeros(0, np.int64), np.zeros((0, m), np.int64), np.zeros((0, m))
        )
    return TileErrors(
        np.concatenate([p.errors for p in parts]),
        np.concatenate([p.nfe for p in parts]),
        np.concatenate([p.dropped_at for p in parts]),
        np.concatenate([p.drop_p for p in parts]),
        seconds=sum(p.seconds for p in parts),
    )


def calibrate(
    pipe: Any,
    batches: Iterable[TileBatch],
    conditions: Sequence[Condition],
    engine: EngineSettings,
    n_tiles: int,
    degree: int = 3,
    which: str = "auto",
    tiles_per_batch: int = 16,
) -> tuple[TimeWeights, int]:
    """Fit the per-time weighting on the first ``n_tiles`` tiles of ``batches``; returns it and the NFE
    spent. ``which``: the calibration conditions — ``auto`` (own, else null, else every condition),
    ``own``, ``null`` or ``all``."""
    names = [c.name for c in conditions]
    if which == "auto":
        which = "own" if "own" in names else ("null" if "null" in names else "all")
    if which == "all":
        chosen = list(conditions)
    elif which in names:
        chosen = [conditions[names.index(which)]]
    else:
        raise ScoringError(f"weighting condition {which!r} is not among the scored conditions {names}")
    errs: list[np.ndarray] = []
    nfe, have = 0, 0
    needs_own = any(c.kind == "own" for c in chosen)
    for batch in batches:
        if have >= n_tiles:
            break
        take = min(len(batch), n_tiles - have)
        sub = TileBatch(
            batch.keys[:take], batch.labels[:take], batch.meta[:take],
            None if batch.images is None else batch.images[:take],
            None if batch.latents is None else batch.latents[:take],
            None if batch.own is None else batch.own[:take],
        )  # fmt: skip
        sub = encode_batch(pipe, sub, need_own=needs_own)
        assert sub.latents is not None
        for start in range(0, take, tiles_per_batch):
            sl = slice(start, start + tiles_per_batch)
            res = denoising_errors(
                pipe, sub.latents[sl], sub.keys[sl], chosen, engine,
                own=None if sub.own is None or not needs_own else sub.own[sl],
            )  # fmt: skip
            errs.append(res.errors)
            nfe += int(res.nfe.sum())
        have += take
    if not errs:
        raise ScoringError("no tiles to calibrate the per-time weighting on")
    weights = fit_time_weights(
        engine.grid.values, np.concatenate(errs), degree, conditions=[c.name for c in chosen]
    )
    return weights, nfe


@dataclass
class TileScores:
    """Per-tile decisions of a scored set (arrays aligned with ``keys``)."""

    keys: list[str]
    labels: list[str | None]
    meta: list[dict[str, Any]]
    names: list[str]
    raw: TileErrors
    weighted: np.ndarray  # (N, M) weighted error per condition
    class_names: list[str] = field(default_factory=list)
    class_err: np.ndarray | None = None  # (N, C) normalised class errors
    predicted: list[str | None] = field(default_factory=list)
    anomaly: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self) -> list[dict[str, Any]]:
        """One flat record per tile (what ``scores.csv`` holds)."""
        out = []
        for i, key in enumerate(self.keys):
            row: dict[str, Any] = {
                "key": key,
                "slide_id": self.meta[i].get("slide_id"),
                "patient_id": self.meta[i].get("patient_id"),
                "label": self.labels[i],
                "predicted": self.predicted[i] if self.predicted else None,
            }
            for name, vals in self.anomaly.items():
                row[f"anomaly_{name}"] = float(vals[i])
            for j, name in enumerate(self.names):
                row[f"error_{name}"] = float(self.weighted[i, j])
            row["nfe"] = int(self.raw.nfe[i])
            out.append(row)
        return out


def decide(
    plan: ScoringPlan,
    keys: Sequence[str],
    labels: Sequence[str | None],
    meta: Sequence[dict[str, Any]],
    raw: TileErrors,
) -> TileScores:
    """Weighted errors, predicted class (argmin among unpruned classes) and every anomaly score."""
    w = plan.weights.weights
    weighted = weighted_errors(raw.errors, w)
    scores = TileScores(list(keys), list(labels), list(meta), plan.names, raw, weighted)
    idx = plan.class_idx
    if idx:
        ce = class_errors(raw.errors, w, idx)
        active = raw.dropped_at[:, idx] < 0
        pred = classify(ce, active)
        scores.class_names = plan.class_names
        scores.class_err = ce
        scores.predicted = [plan.class_names[p] for p in pred]
    scores.anomaly = anomaly_scores(weighted, plan.names, scores.class_err, plan.margin_k)
    return scores
