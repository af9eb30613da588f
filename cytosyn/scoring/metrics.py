"""Summary numbers of a scoring run, with bootstrap confidence intervals.

- :func:`classification_metrics`: accuracy, balanced accuracy and macro-F1 (scikit-learn's definitions)
  with percentile bootstrap CIs over tiles, plus the confusion matrix;
- :func:`auc_with_ci`: ROC AUC of a score separating "out" (positive, e.g. a new domain or a held-out
  class) from "in" tiles, with a stratified bootstrap (in and out tiles resampled separately, so every
  replicate has both groups — a plain joint bootstrap can draw a replicate with one group only);
- :func:`linear_probe`: the discriminative baseline, a multinomial logistic regression on the same
  encoder features.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .engine import ScoringError

__all__ = ["auc_with_ci", "classification_metrics", "linear_probe"]


def _ci(estimate: float, reps: np.ndarray, alpha: float) -> dict[str, float]:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return {"estimate": estimate, "low": float("nan"), "high": float("nan")}
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return {"estimate": estimate, "low": float(low), "high": float(high)}


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 (each ``{estimate, low, high}``) and the confusion matrix."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

    yt, yp = np.asarray(list(y_true), dtype=object), np.asarray(list(y_pred), dtype=object)
    if yt.shape != yp.shape:
        raise ScoringError(f"{len(yt)} true labels for {len(yp)} predictions")
    if yt.size < 2:
        raise ScoringError(f"classification metrics need at least 2 labelled tiles, got {yt.size}")
    labs = list(labels) if labels is not None else sorted({*yt.tolist(), *yp.tolist()})
    fns = {
        "accuracy": lambda a, b: accuracy_score(a, b),
        "balanced_accuracy": lambda a, b: balanced_accuracy_score(a, b),
        "macro_f1": lambda a, b: f1_score(a, b, labels=sorted(set(a.tolist())), average="macro", zero_division=0),
    }
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, yt.size, size=(n_boot, yt.size))
    out: dict[str, Any] = {}
    with warnings.catch_warnings():  # a replicate may miss a class: sklearn warns, the value stays defined
        warnings.simplefilter("ignore")
        for name, fn in fns.items():
            est = float(fn(yt, yp))
            reps = np.array([fn(yt[i], yp[i]) for i in idx], dtype=np.float64)
            out[name] = _ci(est, reps, alpha)
    out["n"] = int(yt.size)
    out["chance_balanced_accuracy"] = 1.0 / max(1, len(set(yt.tolist())))
    out["labels"] = labs
    out["confusion"] = confusion_matrix(yt, yp, labels=labs).tolist()  # rows: true, columns: predicted
    out["bootstrap"] = {"replicates": n_boot, "alpha": alpha, "seed": seed, "unit": "tile"}
    return out


def auc_with_ci(
    scores_in: np.ndarray, scores_out: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, Any]:
    """ROC AUC of ``score`` for out (positive) vs in tiles, with a stratified percentile bootstrap."""
    from sklearn.metrics import roc_auc_score

    a = np.asarray(scores_in, dtype=np.float64)
    b = np.asarray(scores_out, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size < 1 or b.size < 1:
        raise ScoringError(f"an AUC needs tiles on both sides, got {a.size} in and {b.size} out with finite scores")
    y = np.r_[np.zeros(a.size), np.ones(b.size)]
    est = float(roc_auc_score(y, np.r_[a, b]))
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for r in range(n_boot):
        reps[r] = roc_auc_score(y, np.r_[a[rng.integers(0, a.size, a.size)], b[rng.integers(0, b.size, b.size)]])
    return _ci(est, reps, alpha) | {"n_in": int(a.size), "n_out": int(b.size), "bootstrap": n_boot}


def linear_probe(
    train_x: np.ndarray,
    train_y: Sequence[str],
    test_x: np.ndarray,
    seed: int = 0,
    c: float = 1.0,
) -> np.ndarray:
    """Predicted labels of ``test_x`` by a standardised multinomial logistic regression fitted on
    ``train_x`` (scikit-learn, L2, ``C = c``): the usual linear probe on frozen encoder features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(train_y)) < 2:
        raise ScoringError("a linear probe needs at least 2 labels in its training split")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))
    model.fit(np.asarray(train_x, dtype=np.float64), np.asarray(list(train_y), dtype=object))
    return model.predict(np.asarray(test_x, dtype=np.float64))
