"""From raw denoising errors to decisions: per-time weighting, class pruning, the chosen class, anomaly scores.

Everything here is plain numpy on the ``(N, M, K)`` error arrays of :mod:`cytosyn.scoring.engine`, so the
decisions can be recomputed from stored errors without touching a model.

- **Per-time weighting** (:func:`fit_time_weights`): the error scale varies by orders of magnitude with
  t; a polynomial in t fitted to ``log`` of the mean error per time gives ``w(t) = 1 / fitted mean``, so
  every time contributes on the same scale (a weighted error of 1 is "typical at that t").
- **Normalised class errors** (:func:`class_errors`): per time, minus the smallest class error at that
  time, weighted, averaged over the times where the class was evaluated (CytoDiffusion's protocol; the
  subtraction does not change the ranking of classes evaluated at the same times).
- **Class pruning** (:class:`ClassPruner`): after ``min_t`` times and then every ``every`` times, each
  active class is compared with the current best by a one-sided paired t-test over the times both were
  evaluated at; a class whose p-value is below ``p_threshold`` is dropped for that tile.
- **Anomaly scores** (:func:`anomaly_scores`), larger = more anomalous:
  ``margin``: −ζ, where ζ is the best class's mean margin over its ``k`` nearest competitors minus the
  mean pairwise spread among those competitors (RECIPE.md, CytoDiffusion); ``own_vs_null``: the tile's
  weighted error under its own embedding minus under the null condition (how little its own embedding
  explains); ``own_error``: the weighted error under its own embedding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import ScoringError

__all__ = [
    "ANOMALY_SCORES",
    "ClassPruner",
    "TimeWeights",
    "anomaly_scores",
    "class_errors",
    "classify",
    "fit_time_weights",
    "margin_zeta",
    "pruning_rounds",
    "slide_aggregates",
    "weighted_errors",
]

#: name → what it measures (every score: larger = more anomalous).
ANOMALY_SCORES: dict[str, str] = {
    "margin": "−ζ: minus (best class's mean margin over its k nearest competitors − their mean pairwise spread)",
    "own_vs_null": "weighted error under the tile's own embedding minus under the null condition",
    "own_error": "weighted error under the tile's own embedding",
}


# --------------------------------------------------------------------------------------------------------
# Per-time weighting
# --------------------------------------------------------------------------------------------------------


@dataclass
class TimeWeights:
    """``weights[k]`` for grid time ``times[k]``; how they were obtained is in ``describe()``."""

    times: np.ndarray
    weights: np.ndarray
    coefficients: list[float] | None = None  # log-mean-error polynomial, lowest order first, in t
    observed_mean: np.ndarray | None = None
    method: str = "fit"
    n_tiles: int = 0
    conditions: list[str] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "times": [float(t) for t in self.times],
            "weights": [float(w) for w in self.weights],
            "log_mean_error_polynomial": self.coefficients,
            "observed_mean_error": None
            if self.observed_mean is None
            else [float(v) for v in self.observed_mean],
            "calibration_tiles": self.n_tiles,
            "calibration_conditions": self.conditions,
            "rule": "w(t) = exp(-p(t)), p = polynomial fit of log(mean error) over t (numpy Polynomial.fit)",
        }

    @classmethod
    def uniform(cls, times: Sequence[float]) -> TimeWeights:
        t = np.asarray(times, dtype=np.float64)
        return cls(t, np.ones_like(t), method="uniform")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TimeWeights:
        return cls(
            np.asarray(data["times"], dtype=np.float64),
            np.asarray(data["weights"], dtype=np.float64),
            coefficients=data.get("log_mean_error_polynomial"),
            observed_mean=None
            if data.get("observed_mean_error") is None
            else np.asarray(data["observed_mean_error"], dtype=np.float64),
            method=data.get("method", "given"),
            n_tiles=int(data.get("calibration_tiles") or 0),
            conditions=data.get("calibration_conditions"),
        )

    def check(self, times: Sequence[float]) -> None:
        if len(times) != len(self.times) or not np.allclose(
            np.asarray(times), self.times, rtol=0, atol=1e-12
        ):
            raise ScoringError(
                f"the per-time weights were made for times {list(self.times)}, this run uses {list(times)}"
            )


def fit_time_weights(
    times: Sequence[float],
    errors: np.ndarray,
    degree: int = 3,
    conditions: list[str] | None = None,
) -> TimeWeights:
    """Fit ``w(t)`` on calibration errors ``(N, M, K)`` (or ``(N, K)``): the mean error at each time over
    tiles and conditions, ``log`` of it fitted by a polynomial of ``min(degree, K − 1)`` in t."""
    t = np.asarray(times, dtype=np.float64)
    err = np.asarray(errors, dtype=np.float64)
    if err.ndim == 2:
        err = err[:, None, :]
    if err.ndim != 3 or err.shape[2] != len(t):
        raise ScoringError(f"calibration errors must be (N, M, {len(t)}), got {err.shape}")
    if err.shape[0] < 1:
        raise ScoringError("no calibration tiles to fit the per-time weighting on")
    mean = np.nanmean(err.reshape(-1, len(t)), axis=0)
    if not np.all(np.isfinite(mean)) or np.any(mean <= 0):
        raise ScoringError(
            f"cannot fit the per-time weighting: mean errors {mean.tolist()} are not all positive"
        )
    deg = int(min(max(degree, 0), len(t) - 1))
    if len(t) == 1:
        fitted = np.log(mean)
        coef = [float(fitted[0])]
    else:
        poly = np.polynomial.Polynomial.fit(t, np.log(mean), deg).convert()
        fitted = poly(t)
        coef = [float(c) for c in poly.coef]
    return TimeWeights(
        t, np.exp(-fitted), coefficients=coef, observed_mean=mean, method="fit", n_tiles=err.shape[0],
        conditions=conditions,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------------


def weighted_errors(errors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(N, M)``: the weighted error of each condition, averaged over the times where it was evaluated."""
    err = np.asarray(errors, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.nanmean(err * np.asarray(weights)[None, None, :], axis=2)


def class_errors(errors: np.ndarray, weights: np.ndarray, class_idx: Sequence[int]) -> np.ndarray:
    """``(N, C)`` normalised class errors: per time minus the smallest evaluated class error, weighted,
    averaged over each class's evaluated times."""
    err = np.asarray(errors, dtype=np.float64)[:, list(class_idx), :]
    if err.shape[1] == 0:
        return np.zeros((err.shape[0], 0))
    with warnings.catch_warnings():  # a time where no class was evaluated is an expected all-NaN slice
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.nanmin(err, axis=1, keepdims=True)
        return np.nanmean((err - low) * np.asarray(weights)[None, None, :], axis=2)


def classify(class_err: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """Index of the predicted class per tile: argmin of the normalised error among the classes that were
    not pruned (``active`` ``(N, C)``; all when None)."""
    ce = np.asarray(class_err, dtype=np.float64).copy()
    if ce.shape[1] == 0:
        raise ScoringError("no class conditions: nothing to classify")
    if active is not None:
        ce[~np.asarray(active, dtype=bool)] = np.inf
    ce[~np.isfinite(ce)] = np.inf
    return np.argmin(ce, axis=1)


# --------------------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------------------


def pruning_rounds(k: int, min_t: int, every: int) -> list[int]:
    """Round sizes over the visit order: ``min_t`` times first, then ``every`` at a time."""
    if min_t < 1 or every < 1:
        raise ScoringError(f"pruning needs min_t >= 1 and every >= 1, got {min_t}, {every}")
    if k <= min_t:
        return [k]
    sizes = [min_t]
    left = k - min_t
    while left > 0:
        sizes.append(min(every, left))
        left -= every
    return sizes


@dataclass
class ClassPruner:
    """Drops classes that are significantly worse than the current best (paired, one-sided t-test).

    Called with one tile's errors ``(M, K)`` (NaN where not evaluated), its active mask ``(M,)`` and the
    number of times evaluated; returns the new active mask and the p-values (NaN where not tested).
    Only ``class_idx`` conditions are ever dropped; the best class is never dropped; a class that cannot
    be tested (fewer than 2 common times, zero variance of the differences) is kept.
    """

    class_idx: Sequence[int]
    weights: np.ndarray
    p_threshold: float = 2e-3

    def __post_init__(self) -> None:
        if not 0.0 < self.p_threshold < 1.0:
            raise ScoringError(f"p_threshold must be in (0, 1), got {self.p_threshold}")

    def __call__(self, errors: np.ndarray, active: np.ndarray, done: int) -> tuple[np.ndarray, np.ndarray]:
        from scipy.stats import ttest_rel

        pvals = np.full(errors.shape[0], np.nan)
        cls = [c for c in self.class_idx if active[c]]
        if len(cls) < 2:
            return active, pvals
        w = np.asarray(self.weights, dtype=np.float64)
        werr = errors * w[None, :]
        means = [np.nanmean(werr[c]) for c in cls]
        best = cls[int(np.argmin(means))]
        for c in cls:
            if c == best:
                continue
            common = np.isfinite(werr[c]) & np.isfinite(werr[best])
            if common.sum() < 2:
                continue
            diff = werr[c, common] - werr[best, common]
            if np.ptp(diff) == 0:
                continue
            p = float(ttest_rel(werr[c, common], werr[best, common], alternative="greater").pvalue)
            pvals[c] = p
            if np.isfinite(p) and p < self.p_threshold:
                active[c] = False
        return active, pvals


# --------------------------------------------------------------------------------------------------------
# Anomaly scores
# --------------------------------------------------------------------------------------------------------


def margin_zeta(class_err: np.ndarray, k_max: int = 10) -> np.ndarray:
    """ζ per tile from its normalised class errors ``(N, C)`` (NaN when C < 2).

    Sorted errors e(0) ≤ e(1) ≤ …, k = min(C − 1, k_max) nearest competitors e(1..k):
    ζ = Σ_j |e(j) − e(0)| / k − Σ_{j≠l} |e(l) − e(j)| / (k(k − 1))  (the second term 0 when k = 1).
    A tile that one class explains much better than all others has a large ζ.
    """
    ce = np.sort(np.asarray(class_err, dtype=np.float64), axis=1)
    n, c = ce.shape
    if c < 2:
        return np.full(n, np.nan)
    k = min(c - 1, k_max)
    comp = ce[:, 1 : k + 1]
    margin = np.abs(comp - ce[:, :1]).sum(axis=1) / k
    if k == 1:
        return margin
    spread = np.abs(comp[:, :, None] - comp[:, None, :]).sum(axis=(1, 2)) / (k * (k - 1))
    return margin - spread


def anomaly_scores(
    weighted: np.ndarray,
    names: Sequence[str],
    class_err: np.ndarray | None = None,
    k_max: int = 10,
) -> dict[str, np.ndarray]:
    """Every anomaly score that the scored conditions allow (see :data:`ANOMALY_SCORES`)."""
    names = list(names)
    out: dict[str, np.ndarray] = {}
    if class_err is not None and class_err.shape[1] >= 2:
        out["margin"] = -margin_zeta(class_err, k_max)
    if "own" in names:
        own = weighted[:, names.index("own")]
        out["own_error"] = own
        if "null" in names:
            out["own_vs_null"] = own - weighted[:, names.index("null")]
    return out


def slide_aggregates(
    slide_ids: Sequence[str | None], scores: dict[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """Per slide: tile count and the mean, median and max of every score (tiles without a slide id are
    grouped under ``"(none)"``)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(slide_ids):
        groups.setdefault(s if s is not None else "(none)", []).append(i)
    out: dict[str, dict[str, Any]] = {}
    for slide, idx in sorted(groups.items()):
        entry: dict[str, Any] = {"tiles": len(idx)}
        for name, vals in scores.items():
            v = np.asarray(vals, dtype=np.float64)[idx]
            v = v[np.isfinite(v)]
            entry[name] = (
                {"mean": float(v.mean()), "median": float(np.median(v)), "max": float(v.max())}
                if v.size
                else None
            )
        out[slide] = entry
    return out
