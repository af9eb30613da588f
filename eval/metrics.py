"""Metric core of the evaluation harness: everything here works on features (or decoded pixels), never models.

- `FeatureStats` / `frechet_distance` (from `cytosyn.eval.stats`): streaming float64 moments and FD/FID.
- `kid`: kernel inception distance, unbiased MMD² with the cubic polynomial kernel, over random subsets.
- `prdc`: precision, recall, density and coverage (Naeem et al. 2020) with k-NN balls, computed in blocks.
- `conditional_fidelity`: mean cosine similarity between paired reference / generated embeddings.
- `bootstrap_ci`: percentile bootstrap intervals; `frechet_distance_ci`: FD with a half-sample interval
  and the bias-corrected FD (see `cytosyn.eval.stats.fd_intervals`).
- `blockiness_8x8`: a JPEG 8×8 blocking-artefact score on decoded images.

See docs/evaluation.md ("Metrics") for definitions, units and minimum sample counts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from .stats import (
    PROVENANCE_KEYS,
    FDInterval,
    FeatureStats,
    IncompatibleStatsError,
    NotEnoughSamplesError,
    _as_float64_rows,
    _check_finite,
    frechet_distance,
    frechet_distance_interval,
)

__all__ = [
    "PROVENANCE_KEYS",
    "BootstrapCI",
    "FeatureStats",
    "IncompatibleStatsError",
    "KIDResult",
    "NotEnoughSamplesError",
    "PRDCResult",
    "blockiness_8x8",
    "bootstrap_ci",
    "conditional_fidelity",
    "cosine_similarity_pairs",
    "frechet_distance",
    "frechet_distance_ci",
    "kid",
    "prdc",
]


def _features(x: Any, name: str) -> np.ndarray:
    arr = _as_float64_rows(x)
    _check_finite(arr, name)
    return arr


# ---------------------------------------------------------------------------------------------------- KID
class KIDResult(NamedTuple):
    """KID estimate: ``mean`` over subsets of the unbiased MMD², and ``std`` = spread of the subset values."""

    mean: float
    std: float


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def _mmd2_unbiased(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> float:
    """Unbiased MMD² (U-statistic) between samples x (m, d) and y (n, d) under the polynomial kernel.

    ``Σ_{i≠j} k(xi,xj)/(m(m−1)) + Σ_{i≠j} k(yi,yj)/(n(n−1)) − 2 Σ_{i,j} k(xi,yj)/(mn)``.
    """
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise NotEnoughSamplesError(f"unbiased MMD² needs at least 2 samples per set, got {m} and {n}")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = _poly_kernel(x, x, degree, gamma, coef0)
    kyy = _poly_kernel(y, y, degree, gamma, coef0)
    kxy = _poly_kernel(x, y, degree, gamma, coef0)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(
    feats_a: Any,
    feats_b: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> KIDResult:
    """Kernel Inception Distance (Bińkowski et al. 2018) between two feature sets.

    For each of ``subsets`` rounds, ``subset_size`` rows are drawn without replacement from each set and
    the unbiased MMD² with kernel ``k(x, y) = (γ x·y + c)^degree`` (γ = 1/dim, c = 1, degree 3 by
    default) is computed; the result is the mean and standard deviation (ddof = 1) of those values. Units:
    squared kernel-feature units (often reported ×1e3). Being unbiased, it can be slightly negative when
    the two distributions are equal. When a set has fewer than ``subset_size`` rows, the subset size
    shrinks to the smaller set (with a warning); fewer than 2 rows is an error.
    """
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise NotEnoughSamplesError(
            f"KID needs at least 2 samples per set (subset_size {subset_size} recommended); "
            f"got {a.shape[0]} and {b.shape[0]}"
        )
    if m < subset_size:
        warnings.warn(
            f"KID subset_size {subset_size} exceeds a set's size ({a.shape[0]}, {b.shape[0]}); using {m}",
            RuntimeWarning,
            stacklevel=2,
        )
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        xa = a[rng.choice(a.shape[0], m, replace=False)]
        xb = b[rng.choice(b.shape[0], m, replace=False)]
        values[s] = _mmd2_unbiased(xa, xb, degree=degree, gamma=gamma, coef0=coef0)
    std = float(values.std(ddof=1)) if subsets > 1 else 0.0
    return KIDResult(float(values.mean()), std)


# --------------------------------------------------------------------------------------------------- PRDC
class PRDCResult(NamedTuple):
    precision: float
    recall: float
    density: float
    coverage: float


def _sq_dists(x: torch.Tensor, y: torch.Tensor, x_sq: torch.Tensor, y_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of x and y, ``|x|² + |y|² − 2 x·y``, clamped at 0."""
    d = x_sq[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
    return d.clamp_min_(0.0)


def _kth_nn_sq_radii(x: torch.Tensor, x_sq: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance from each row of x to its k-th nearest *other* row of x, in row blocks."""
    n = x.shape[0]
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        d = _sq_dists(x[s:e], x, x_sq[s:e], x_sq)
        rows = torch.arange(e - s, device=x.device)
        d[rows, rows + s] = math.inf  # exclude the point itself (duplicates elsewhere still count)
        out[s:e] = torch.kthvalue(d, k, dim=1).values
    return out


def prdc(
    real: Any,
    fake: Any,
    k: int = 5,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> PRDCResult:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (Naeem et al. 2020).

    With ``r_i`` the distance from real ``X_i`` to its k-th nearest other real point, ``s_j`` the same for
    fake ``Y_j`` among fakes, and the open balls ``B(X_i, r_i)``, ``B(Y_j, s_j)`` (strict ``<``, as in the
    authors' reference code)::

        precision = 1/M Σ_j 1[∃ i: Y_j ∈ B(X_i, r_i)]      fraction of fakes on the real manifold
        recall    = 1/N Σ_i 1[∃ j: X_i ∈ B(Y_j, s_j)]      fraction of reals on the fake manifold
        density   = 1/(kM) Σ_j Σ_i 1[Y_j ∈ B(X_i, r_i)]    ≈ 1 when fake ~ real; > 1 means clumped on modes
        coverage  = 1/N Σ_i 1[∃ j: Y_j ∈ B(X_i, r_i)]      fraction of real neighbourhoods that hold a fake

    All in [0, 1] except density (≥ 0, unbounded). Distances are computed in float64 on data centred at
    the real mean, in row blocks of ``chunk_size`` (default: blocks of at most 2^24 entries, 128 MiB), so
    50k × 50k never materialises; ``device`` (e.g. ``"cuda"``) runs the blocks there. Needs at least
    ``k + 1`` samples per set.
    """
    x_np, y_np = _features(real, "real"), _features(fake, "fake")
    n, m = x_np.shape[0], y_np.shape[0]
    if x_np.shape[1] != y_np.shape[1]:
        raise ValueError(f"feature dimensions differ: {x_np.shape[1]} vs {y_np.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < k + 1 or m < k + 1:
        raise NotEnoughSamplesError(
            f"PRDC with k={k} needs at least k+1={k + 1} samples per set; got {n} real and {m} fake"
        )
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // max(n, m))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    center = x_np.mean(axis=0)  # translation-invariant; avoids cancellation in |x|²+|y|²−2x·y
    dev = torch.device(device) if device is not None else torch.device("cpu")
    x = torch.from_numpy(x_np - center).to(dev)
    y = torch.from_numpy(y_np - center).to(dev)
    x_sq, y_sq = (x * x).sum(1), (y * y).sum(1)

    r2 = _kth_nn_sq_radii(x, x_sq, k, chunk_size)  # real radii, squared
    s2 = _kth_nn_sq_radii(y, y_sq, k, chunk_size)  # fake radii, squared

    in_real = torch.zeros(m, dtype=torch.bool, device=dev)  # fake j inside some real ball
    density_count = torch.zeros((), dtype=torch.int64, device=dev)
    covered = torch.zeros(n, dtype=torch.bool, device=dev)  # real ball i holds some fake
    recalled = torch.zeros(n, dtype=torch.bool, device=dev)  # real i inside some fake ball
    for s in range(0, m, chunk_size):
        e = min(s + chunk_size, m)
        d = _sq_dists(y[s:e], x, y_sq[s:e], x_sq)  # (b, n)
        inside_real = d < r2[None, :]
        in_real[s:e] = inside_real.any(dim=1)
        density_count += inside_real.sum()
        covered |= inside_real.any(dim=0)
        recalled |= (d < s2[s:e, None]).any(dim=0)
    return PRDCResult(
        precision=float(in_real.double().mean()),
        recall=float(recalled.double().mean()),
        density=float(density_count.item() / (k * m)),
        coverage=float(covered.double().mean()),
    )


# ------------------------------------------------------------------------------------ conditional fidelity
def cosine_similarity_pairs(ref_emb: Any, gen_emb: Any) -> np.ndarray:
    """Cosine similarity of each row of ``ref_emb`` with the same row of ``gen_emb`` (float64, shape (n,))."""
    a, b = _features(ref_emb, "ref_emb"), _features(gen_emb, "gen_emb")
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    zero = (na == 0) | (nb == 0)
    if zero.any():
        raise ValueError(f"{int(zero.sum())} of {a.shape[0]} pairs contain a zero vector; cosine undefined")
    return np.einsum("ij,ij->i", a, b) / (na * nb)


def conditional_fidelity(ref_emb: Any, gen_emb: Any) -> float:
    """Mean cosine similarity between each reference tile's embedding and that of the tile generated from it.

    Row i of ``gen_emb`` must come from the image generated conditioned on reference row i, and both must
    be embedded by an encoder *other* than the conditioning one. In [−1, 1]; 1 = same direction. Needs at
    least one pair. For a CI, ``bootstrap_ci(conditional_fidelity, ref_emb, gen_emb)`` resamples pairs.
    """
    sims = cosine_similarity_pairs(ref_emb, gen_emb)
    if sims.size == 0:
        raise NotEnoughSamplesError("conditional fidelity needs at least 1 pair, got 0")
    return float(sims.mean())


# ---------------------------------------------------------------------------------------------- bootstrap
class BootstrapCI(NamedTuple):
    """Point estimate on the full sample and the percentile bootstrap interval ``[low, high]``."""

    estimate: float
    low: float
    high: float


def bootstrap_ci(
    fn: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap: ``fn(*arrays)`` and its ``1 − alpha`` interval from resampling rows jointly.

    All ``arrays`` (numpy arrays or torch tensors) must have the same number of rows; each replicate draws
    one set of row indices with replacement and applies it to all of them, so paired data stay paired.
    The interval is the ``alpha/2`` and ``1 − alpha/2`` quantiles of the replicates; it describes the
    sampling variability of the statistic at this sample size — it does not remove a statistic's bias
    (e.g. FD's upward bias at small n).
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays must have the same number of rows, got {[len(a) for a in arrays]}")
    if n < 2:
        raise NotEnoughSamplesError(f"bootstrap needs at least 2 rows to resample, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    estimate = float(fn(*arrays))
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        if any(isinstance(a, torch.Tensor) for a in arrays):
            tidx = torch.from_numpy(idx)
            reps[b] = float(
                fn(*(a[tidx.to(a.device)] if isinstance(a, torch.Tensor) else a[idx] for a in arrays))
            )
        else:
            reps[b] = float(fn(*(a[idx] for a in arrays)))
    if not np.isfinite(reps).all():
        raise ValueError(f"{int((~np.isfinite(reps)).sum())} of {n_boot} bootstrap replicates are not finite")
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(estimate, float(low), float(high))


def frechet_distance_ci(
    gen_features: Any,
    ref_stats: FeatureStats,
    n_boot: int = 20,
    alpha: float = 0.05,
    seed: int = 0,
    gen_metadata: Mapping[str, Any] | None = None,
    ignore: Iterable[str] = PROVENANCE_KEYS,
) -> FDInterval:
    """FD between generated features and fixed reference statistics, with its interval.

    Not a bootstrap any more (resampling with replacement inflates FD's small-sample bias so much that
    the interval missed its own estimate): `cytosyn.eval.stats.frechet_distance_interval`, ``n_boot``
    half-sample replicates. The result starts with ``(estimate, low, high)`` like a `BootstrapCI` and
    adds the standard error, the fresh-draw interval and the bias-corrected FD (``fd_inf``).
    """
    gen = _features(gen_features, "gen_features")
    probe = FeatureStats(metadata=gen_metadata)
    probe._check_dim(gen.shape[1])
    probe.check_compatible(ref_stats, ignore=ignore)
    with warnings.catch_warnings():
        # a rank-deficiency warning, if any, is raised once by the point estimate below
        frechet_distance(FeatureStats.from_features(gen, probe.metadata), ref_stats, ignore=ignore)
    return frechet_distance_interval(
        gen, ref_stats, meta=probe.metadata, alpha=alpha, replicates=n_boot, seed=seed, ignore=ignore
    )


# --------------------------------------------------------------------------------------------- blockiness
def blockiness_8x8(images: Any, per_image: bool = False, batch: int = 64) -> float | np.ndarray:
    """JPEG blocking score: mean |Δ luminance| across 8-px block boundaries ÷ the same inside blocks.

    ``images``: uint8, N×H×W×3 (RGB) or N×H×W (grey). Luminance is BT.601 ``Y = 0.299 R + 0.587 G +
    0.114 B`` (what JPEG encodes). For every horizontally and vertically adjacent pixel pair the absolute
    difference of Y is taken; a pair straddles a boundary when it joins column (row) 8k−1 and 8k of the
    JPEG grid, anchored at the image's top-left pixel. The score is

        mean |ΔY| over boundary pairs / mean |ΔY| over all other pairs

    pooled over horizontal and vertical pairs and over images (``per_image=True`` returns one per image).
    1.0 ≈ no blocking (smooth content has the same gradients on and off the grid); > 1 = discontinuities
    on the 8×8 grid, the signature of coarse DCT quantisation. If both means are 0 (a flat image) the
    score is 1.0. The grid must be anchored at (0, 0): tiles cropped from a JPEG at an offset that is not
    a multiple of 8 will not show their blocking here. Needs H, W ≥ 9 (at least one boundary).
    """
    arr = np.asarray(images.cpu().numpy() if isinstance(images, torch.Tensor) else images)
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {arr.dtype}")
    if arr.ndim == 4:
        if arr.shape[-1] != 3:
            raise ValueError(f"colour images must be N×H×W×3, got shape {arr.shape}")
    elif arr.ndim != 3:
        raise ValueError(f"images must be N×H×W×3 or N×H×W, got shape {arr.shape}")
    n, h, w = arr.shape[:3]
    if h < 9 or w < 9:
        raise ValueError(f"images must be at least 9×9 to have an 8-px block boundary, got {h}×{w}")
    if n == 0:
        raise NotEnoughSamplesError("blockiness needs at least 1 image, got 0")
    col_boundary = (np.arange(w - 1) % 8) == 7  # pair (x, x+1) with x ≡ 7 (mod 8)
    row_boundary = (np.arange(h - 1) % 8) == 7
    n_b = (h * col_boundary.sum() + w * row_boundary.sum()).astype(np.float64)
    n_i = (h * (~col_boundary).sum() + w * (~row_boundary).sum()).astype(np.float64)
    sums_b = np.empty(n, dtype=np.float64)
    sums_i = np.empty(n, dtype=np.float64)
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    for s in range(0, n, batch):
        chunk = arr[s : s + batch]
        y = chunk.astype(np.float32) @ weights if chunk.ndim == 4 else chunk.astype(np.float32)
        dx = np.abs(np.diff(y, axis=2)).sum(axis=1, dtype=np.float64)  # (b, w-1)
        dy = np.abs(np.diff(y, axis=1)).sum(axis=2, dtype=np.float64)  # (b, h-1)
        sums_b[s : s + batch] = dx[:, col_boundary].sum(1) + dy[:, row_boundary].sum(1)
        sums_i[s : s + batch] = dx[:, ~col_boundary].sum(1) + dy[:, ~row_boundary].sum(1)

    def ratio(sb: np.ndarray, si: np.ndarray, count: float) -> np.ndarray:
        mb, mi = sb / (count * n_b), si / (count * n_i)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(mi > 0, mb / np.where(mi > 0, mi, 1.0), np.where(mb > 0, np.inf, 1.0))
        return r

    if per_image:
        return ratio(sums_b, sums_i, 1.0)
    return float(ratio(np.array(sums_b.sum()), np.array(sums_i.sum()), float(n)))
