"""The Fréchet-distance interval and the bias-corrected FD, checked by simulation (issue 13).

A world with known Gaussians: reference statistics fixed (as in every report), generated features drawn
afresh. The interval must cover the FD that n generated samples give on average at the stated rate, a
fresh draw's FD must fall in the fresh-draw interval at that rate, and the interval must not buy its
coverage by being wide. The percentile bootstrap this replaced failed all three at n < dim: its
replicates sat above the estimate they were meant to bracket.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from cytosyn.eval.metrics import frechet_distance_ci
from cytosyn.eval.stats import FeatureStats, fd_intervals, frechet_distance

DIM = 24


class World:
    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
        spectrum = 1.0 / (1 + np.arange(DIM)) ** 0.7
        self.ref_cov = (q * spectrum) @ q.T
        self.gen_cov = (q * (spectrum * np.clip(1 + 0.3 * rng.standard_normal(DIM), 0.3, None))) @ q.T
        self.shift = 0.1 * rng.standard_normal(DIM)
        self.gen_chol = np.linalg.cholesky(self.gen_cov)
        ref = rng.standard_normal((3000, DIM)) @ np.linalg.cholesky(self.ref_cov).T
        self.ref = FeatureStats.from_features(ref)
        self.rng = np.random.default_rng(seed + 1)
        self.fd_inf = frechet_distance(FeatureStats.from_moments(10**12, self.shift, self.gen_cov), self.ref)

    def draw(self, n: int) -> np.ndarray:
        return self.shift + self.rng.standard_normal((n, DIM)) @ self.gen_chol.T

    def fd(self, x: np.ndarray) -> float:
        return frechet_distance(FeatureStats.from_features(x), self.ref)


@pytest.mark.parametrize("n", [16, 96, 400])  # below, near and well above the feature dimension (24)
def test_intervals_cover_fresh_draws_at_the_stated_rate(n):
    world = World()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fresh = np.array([world.fd(world.draw(n)) for _ in range(400)])
        expected = fresh.mean()
        spread = np.subtract(*np.quantile(fresh, [0.975, 0.025]))
        trials, covered, fresh_hits, fresh_total, widths = 80, 0, 0, 0, []
        for t in range(trials):
            ci = frechet_distance_ci(world.draw(n), world.ref, seed=t)
            assert ci.low < ci.estimate < ci.high  # an interval contains its own estimate
            covered += ci.low <= expected <= ci.high
            others = fresh[world.rng.integers(0, len(fresh), 20)]
            fresh_hits += int(((ci.fresh_low <= others) & (others <= ci.fresh_high)).sum())
            fresh_total += len(others)
            widths.append(ci.fresh_high - ci.fresh_low)
    assert covered / trials >= 0.88, f"n={n}: covers E[FD_n] in {covered}/{trials}"
    assert fresh_hits / fresh_total >= 0.90, f"n={n}: fresh draws inside {fresh_hits}/{fresh_total}"
    # conservative, not useless: the fresh-draw interval is at most twice the true spread of fresh draws
    assert np.mean(widths) <= 2.0 * spread, (np.mean(widths), spread)


def test_bias_corrected_fd_extrapolates_to_infinite_n():
    world = World(seed=3)
    x = world.draw(40 * DIM)
    ci = fd_intervals(x, {"ref": world.ref})[0]["ref"]
    assert ci.estimate > 1.1 * world.fd_inf  # the raw FD carries its small-sample bias
    assert ci.fd_inf == pytest.approx(world.fd_inf, rel=0.05)
    small, _ = fd_intervals(world.draw(2 * DIM), {"ref": world.ref})
    assert small["ref"].fd_inf is None  # too few samples per dimension for a linear extrapolation


def test_paired_gap_uses_the_same_subsets():
    world = World(seed=5)
    other = FeatureStats.from_features(world.draw(3000))
    x = world.draw(300)
    cis, gap = fd_intervals(x, {"a": world.ref, "b": other}, gap=("a", "b"), seed=1)
    assert gap.estimate == pytest.approx(cis["a"].estimate - cis["b"].estimate)
    # pairing removes the shared fluctuation of the generated set: narrower than independent errors
    assert gap.se < np.hypot(cis["a"].se, cis["b"].se)
