"""Metric core of the evaluation harness: streaming statistics, FD, KID, PRDC, conditional fidelity,
bootstrap intervals and the JPEG blockiness score. Features only; no models, no downloads."""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from cytosyn.eval.metrics import (
    PROVENANCE_KEYS,
    FeatureStats,
    IncompatibleStatsError,
    NotEnoughSamplesError,
    blockiness_8x8,
    bootstrap_ci,
    conditional_fidelity,
    cosine_similarity_pairs,
    frechet_distance,
    frechet_distance_ci,
    kid,
    prdc,
)
from PIL import Image

META = {"encoder": "h0-mini", "resize": "bicubic-224", "codec": "png", "fov_um": 112.0}


def correlated(rng: np.random.Generator, n: int, d: int, offset: float = 0.0, scale: float = 1.0):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * scale + offset


def direct_fd(x: np.ndarray, y: np.ndarray) -> float:
    """Reference: numpy two-pass mean/cov and scipy's general matrix square root."""
    mx, my = x.mean(0), y.mean(0)
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(cx @ cy)
    assert np.abs(root.imag).max() < 1e-6 * np.abs(root.real).max()
    return float(((mx - my) ** 2).sum() + np.trace(cx + cy - 2.0 * root.real))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ------------------------------------------------------------------------------------- streaming statistics
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_streaming_fd_equals_direct_float64(offset):
    rng = np.random.default_rng(1)
    d = 24
    # float32 features, like an encoder's output; the direct reference uses the same values in float64
    x = correlated(rng, 6000, d, offset, 0.5).astype(np.float32)
    y = (correlated(rng, 5000, d, offset, 0.5) + 0.05 * rng.normal(size=d)).astype(np.float32)

    # x streamed through three "workers" with ragged chunks (including 1-row and empty chunks), then merged
    parts = np.split(x, [1, 7, 7, 900, 2500, 2501, 4000])
    workers = [FeatureStats(metadata=META) for _ in range(3)]
    for i, part in enumerate(parts):
        batch = torch.from_numpy(part) if i % 2 else part  # mix numpy and torch float32 input
        workers[i % 3].update(batch)
    merged = workers[2].merge(workers[0]).merge(workers[1])
    sy = FeatureStats(metadata=META)
    for part in np.array_split(y, 13):
        sy.update(part)

    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    assert merged.n == len(x)
    np.testing.assert_allclose(merged.mean, x64.mean(0), rtol=1e-12, atol=1e-12 * max(offset, 1.0))
    cov_ref = np.cov(x64, rowvar=False)
    assert np.abs(merged.cov - cov_ref).max() <= 1e-9 * np.abs(cov_ref).max()
    fd, ref = frechet_distance(merged, sy), direct_fd(x64, y64)
    assert ref > 0.01
    assert rel(fd, ref) < 1e-6, (fd, ref)


def test_million_rows_large_offset_match_direct_float64():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1_000_000, 8)) * rng.uniform(0.5, 2.0, size=8) + rng.uniform(900, 1100, size=8)
    stats = FeatureStats()
    for part in np.array_split(x, 41):
        stats.update(part)
    cov_ref = np.cov(x, rowvar=False)
    assert stats.n == 1_000_000
    assert np.abs(stats.cov - cov_ref).max() <= 1e-10 * np.abs(cov_ref).max()
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-13)
    # the textbook sum / outer-product form loses ~6 digits here; the streaming update must beat it
    s1, s2 = x.sum(0), x.T @ x
    naive = (s2 - np.outer(s1, s1) / len(x)) / (len(x) - 1)
    assert np.abs(stats.cov - cov_ref).max() < np.abs(naive - cov_ref).max()


def test_fd_self_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(3)
    d = 16
    x = correlated(rng, 3000, d, offset=50.0)
    sx = FeatureStats.from_features(x)
    trace = float(np.trace(sx.cov))
    assert frechet_distance(sx, sx) < 1e-8 * trace

    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    values = []
    for t in [0.0, 0.01, 0.1, 0.5, 1.0, 3.0]:
        shift = t * direction
        fd = frechet_distance(sx, FeatureStats.from_features(x + shift))
        values.append(fd)
        # same samples shifted: covariances equal up to rounding, so FD = ||shift||²
        assert abs(fd - t**2) <= 1e-9 * trace, (t, fd)
    assert all(b > a for a, b in itertools.pairwise(values))

    # exactly equal covariances (built from moments): FD is exactly ||Δμ||²
    cov = sx.cov
    a = FeatureStats.from_moments(100, np.zeros(d), cov)
    shift = rng.normal(size=d) * 3.0
    b = FeatureStats.from_moments(100, shift, cov)
    assert rel(frechet_distance(a, b), float(shift @ shift)) < 1e-12


def test_fd_self_zero_when_rank_deficient():
    rng = np.random.default_rng(4)
    sx = FeatureStats.from_features(rng.normal(size=(20, 64)))
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        fd = frechet_distance(sx, sx)
    assert fd < 1e-8 * np.trace(sx.cov)


def test_save_load_round_trip_and_guards(tmp_path):
    rng = np.random.default_rng(5)
    ref = FeatureStats.from_features(correlated(rng, 500, 8, 3.0), {**META, "dataset_hash": "abc"})
    path = ref.save(tmp_path / "ref_stats.npz")
    loaded = FeatureStats.load(path, expected_meta={**META, "dataset_hash": "abc"})
    assert loaded.n == ref.n and loaded.metadata == ref.metadata
    np.testing.assert_array_equal(loaded.mean, ref.mean)
    np.testing.assert_array_equal(loaded.cov, ref.cov)

    gen = FeatureStats.from_features(correlated(rng, 400, 8, 3.2), {**META, "dataset_hash": "other"})
    assert frechet_distance(loaded, gen) == frechet_distance(ref, gen)  # provenance keys may differ

    # a loaded file keeps accumulating exactly like the original
    more = correlated(rng, 50, 8, 3.0)
    np.testing.assert_allclose(loaded.update(more).cov, ref.update(more).cov, rtol=0, atol=1e-14)

    # a cached reference made with other settings is refused, naming the keys
    with pytest.raises(IncompatibleStatsError, match=r"encoder.*h0-mini.*uni2-h"):
        FeatureStats.load(path, expected_meta={"encoder": "uni2-h"})
    with pytest.raises(IncompatibleStatsError, match="dataset_hash"):
        FeatureStats.load(path, expected_meta={"dataset_hash": "zzz"})

    other = FeatureStats.from_features(
        correlated(rng, 400, 8), {**META, "encoder": "uni2-h", "resize": "area-224", "extra": 1}
    )
    with pytest.raises(IncompatibleStatsError) as err:
        frechet_distance(loaded, other)
    msg = str(err.value)
    assert "encoder" in msg and "resize" in msg and "extra" in msg and "codec" not in msg
    with pytest.raises(IncompatibleStatsError, match="encoder"):
        loaded.merge(other)

    # codec as the variable under study: allowed only when asked for
    jpeg = FeatureStats.from_features(correlated(rng, 400, 8), {**META, "codec": "jpeg-q90"})
    with pytest.raises(IncompatibleStatsError, match="codec"):
        frechet_distance(loaded, jpeg)
    assert frechet_distance(loaded, jpeg, ignore=PROVENANCE_KEYS | {"codec"}) > 0

    # different feature widths are never comparable
    with pytest.raises(IncompatibleStatsError, match="dimensions"):
        loaded.check_compatible(FeatureStats.from_features(rng.normal(size=(30, 9)), META))

    # corruption is detected
    data = dict(np.load(path))
    data["mean"] = data["mean"] + 1e-9
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(ValueError, match="checksum"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_too_few_samples_and_non_finite_rows():
    rng = np.random.default_rng(6)
    one = FeatureStats.from_features(rng.normal(size=(1, 4)))
    two = FeatureStats.from_features(rng.normal(size=(50, 4)))
    with pytest.raises(NotEnoughSamplesError, match="at least 2 samples"):
        frechet_distance(one, two)
    with pytest.raises(NotEnoughSamplesError, match="at least 2 samples"):
        _ = one.cov
    with pytest.raises(NotEnoughSamplesError):
        _ = FeatureStats().mean

    few = FeatureStats.from_features(rng.normal(size=(5, 10)))
    with pytest.warns(RuntimeWarning, match="at least 10"):
        frechet_distance(few, FeatureStats.from_features(rng.normal(size=(50, 10))))

    stats = FeatureStats.from_features(rng.normal(size=(10, 4)))
    bad = rng.normal(size=(10, 4))
    bad[2, 1], bad[7, 3], bad[7, 0] = np.nan, np.inf, np.nan
    with pytest.raises(ValueError, match="2 of 10 rows"):
        stats.update(bad)
    with pytest.raises(ValueError, match="2 of 10 rows"):
        stats.update(torch.from_numpy(bad).to(torch.bfloat16))
    assert stats.n == 10  # nothing folded in from a refused batch
    with pytest.raises(ValueError, match="dimension"):
        stats.update(rng.normal(size=(3, 5)))
    with pytest.raises(ValueError, match="2-D"):
        stats.update(rng.normal(size=4))


# --------------------------------------------------------------------------------------------------- PRDC
def test_prdc_hand_computed_example():
    # k = 1. Reals 0, 2, 6, 14 have 1-NN radii 2, 2, 4, 8. Fakes 1, 30, 31 have radii 29, 1, 1.
    # precision: only 1 is inside a real ball (|1−0| < 2)                     → 1/3
    # density:   1 lies in the balls of 0 and 2; 30, 31 in none              → 2/(1·3)
    # recall:    ball(1, 29) holds every real                                  → 1
    # coverage:  balls of 0 and 2 hold the fake 1; 6 (5 ≥ 4) and 14 (16 ≥ 8) hold none → 1/2
    real = np.array([[0.0], [2.0], [6.0], [14.0]])
    fake = np.array([[1.0], [30.0], [31.0]])
    assert tuple(prdc(real, fake, k=1)) == (1 / 3, 1.0, 2 / 3, 0.5)


def test_prdc_fake_subset_of_real_manifold():
    # k = 2. Reals 0..9: radii 2 (ends) and 1 (inside). Fakes 0, 1, 2: radii 2, 1, 2. Balls are open.
    # precision: every fake coincides with a real                                   → 1
    # density:   fake 0 ∈ ball(0); fake 1 ∈ ball(0), ball(1); fake 2 ∈ ball(2)      → 4/(2·3)
    # recall:    (−2, 2) ∪ (0, 2) ∪ (0, 4) holds reals 0, 1, 2, 3                   → 4/10
    # coverage:  reals 0, 1, 2 (distance 0); real 3 has radius 1 and nearest fake at 1 → 3/10
    real = np.arange(10.0)[:, None]
    fake = np.array([[0.0], [1.0], [2.0]])
    result = prdc(real, fake, k=2)
    assert result.precision == 1.0
    assert result.recall < 1.0
    assert tuple(result) == (1.0, 0.4, 4 / 6, 0.3)


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 16)) + 100.0
    same = prdc(x, x, k=5)
    assert same.precision == same.recall == same.coverage == 1.0
    assert abs(same.density - 1.0) < 0.02

    far = prdc(x, x + 1e3, k=5)
    assert tuple(far) == (0.0, 0.0, 0.0, 0.0)

    with pytest.raises(NotEnoughSamplesError, match="k\\+1=6"):
        prdc(x, x[:5], k=5)


def test_prdc_chunked_equals_unchunked():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(700, 12))
    fake = rng.normal(size=(530, 12)) * 1.2 + 0.3
    full = prdc(real, fake, k=5, chunk_size=10_000)
    assert 0 < full.precision < 1 and 0 < full.recall < 1
    for chunk in (1, 7, 64, 529):
        assert prdc(real, fake, k=5, chunk_size=chunk) == full
    assert prdc(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), k=5).precision > 0


# ---------------------------------------------------------------------------------------------------- KID
def naive_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2.0 * kxy


def test_kid_matches_naive_unbiased_estimator():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(17, 5)), rng.normal(size=(17, 5)) + 0.4
    # one subset of the full size is a permutation of each set: exactly the full-sample estimator
    result = kid(x, y, subsets=1, subset_size=17, seed=0)
    assert rel(result.mean, naive_mmd2_unbiased(x, y)) < 1e-12
    assert result.std == 0.0


def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(1500, 32)), rng.normal(size=(1500, 32))
    same = kid(a, b, subsets=50, subset_size=300, seed=1)
    assert abs(same.mean) < same.std
    shifted = kid(a, b + 0.3, subsets=50, subset_size=300, seed=1)
    assert shifted.mean > 3 * shifted.std > 0
    assert kid(a, b, subsets=50, subset_size=300, seed=1) == same  # seeded
    with pytest.warns(RuntimeWarning, match="subset_size"):
        kid(a[:100], b, subsets=2, subset_size=300)


# ------------------------------------------------------------------------------------ conditional fidelity
def test_conditional_fidelity():
    rng = np.random.default_rng(11)
    ref = rng.normal(size=(6, 4))
    assert rel(conditional_fidelity(ref, 3.0 * ref), 1.0) < 1e-15
    assert rel(conditional_fidelity(ref, -ref), -1.0) < 1e-15
    pair = np.array([[1.0, 0.0], [1.0, 1.0]])
    gen = np.array([[0.0, 2.0], [1.0, 0.0]])
    np.testing.assert_allclose(cosine_similarity_pairs(pair, gen), [0.0, np.sqrt(0.5)], atol=1e-15)
    assert rel(conditional_fidelity(pair, gen), np.sqrt(0.5) / 2) < 1e-15
    with pytest.raises(ValueError, match="same shape"):
        conditional_fidelity(ref, ref[:5])
    with pytest.raises(ValueError, match="zero vector"):
        conditional_fidelity(ref, np.zeros_like(ref))


# ---------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_estimate_and_narrows():
    rng = np.random.default_rng(12)
    widths = []
    for n in (200, 5000):
        x = rng.normal(loc=2.0, size=n)
        est, low, high = bootstrap_ci(np.mean, x, n_boot=300, seed=0)
        assert est == float(np.mean(x))
        assert low < est < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # ~1/sqrt(n): expect a factor of 5

    # rows are resampled jointly: perfectly paired data stay perfectly paired
    ref = rng.normal(size=(50, 8))
    ci = bootstrap_ci(conditional_fidelity, ref, 2.0 * ref, n_boot=50, seed=0)
    assert ci.low == pytest.approx(1.0, abs=1e-12) and ci.high == pytest.approx(1.0, abs=1e-12)


def test_fd_bootstrap_over_generated_features():
    rng = np.random.default_rng(13)
    d = 8
    ref = FeatureStats.from_features(correlated(rng, 20_000, d), META)
    shift = np.full(d, 0.25)
    widths = []
    for n in (400, 4000):
        gen = correlated(rng, n, d) + shift
        ci = frechet_distance_ci(gen, ref, n_boot=60, seed=0, gen_metadata=META)
        assert ci.estimate == frechet_distance(FeatureStats.from_features(gen, META), ref)
        assert ci.low < ci.estimate < ci.high
        widths.append(ci.high - ci.low)
    assert widths[1] < widths[0]
    with pytest.raises(IncompatibleStatsError, match="encoder"):
        frechet_distance_ci(gen, ref, n_boot=5, gen_metadata={**META, "encoder": "uni2-h"})


# --------------------------------------------------------------------------------------------- blockiness
def _smooth_tile() -> np.ndarray:
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float64)
    rgb = np.stack(
        [60 + 0.37 * xx + 0.21 * yy, 60 + 40 * np.sin(xx / 23.0) + 0.3 * yy, 200 - 0.29 * xx - 0.13 * yy],
        axis=-1,
    )
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _jpeg_round_trip(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_blockiness_8x8():
    img = _smooth_tile()
    smooth = blockiness_8x8(img[None])
    assert abs(smooth - 1.0) < 0.05
    jpeg10 = _jpeg_round_trip(img, 10)
    q10 = blockiness_8x8(jpeg10[None])
    q95 = blockiness_8x8(_jpeg_round_trip(img, 95)[None])
    assert q10 > 10.0
    assert q10 > 5 * q95
    # the score reads the grid anchored at (0, 0): a crop that moves the grid by 4 px hides the blocking
    assert blockiness_8x8(jpeg10[None, 4:, 4:]) < 1.0
    # blocks stacked in one direction only: the score is the same along rows and along columns
    yy, xx = np.mgrid[0:64, 0:64]
    rows = np.round(20 * (yy // 8) + 0.37 * xx).astype(np.uint8)
    assert blockiness_8x8(rows[None]) > 3.0
    assert blockiness_8x8(rows.T[None]) == pytest.approx(blockiness_8x8(rows[None]), rel=1e-12)
    # grey input, per-image scores, flat image
    grey = np.stack([img[..., 1], _jpeg_round_trip(img, 10)[..., 1]])
    per = blockiness_8x8(grey, per_image=True)
    assert per.shape == (2,) and abs(per[0] - 1.0) < 0.1 and per[1] > 2.0
    assert blockiness_8x8(np.full((1, 16, 16), 128, np.uint8)) == 1.0
    with pytest.raises(TypeError, match="uint8"):
        blockiness_8x8(img[None].astype(np.float32))


def test_no_warnings_on_healthy_inputs():
    rng = np.random.default_rng(14)
    a = FeatureStats.from_features(rng.normal(size=(100, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance(a, a)
