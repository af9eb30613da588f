"""Generative scoring: the error engine, weighting, pruning, decisions and anomaly scores.

Models: a random-initialised real SiT inside the real pipeline (errors, noise sharing, batching,
bad input) and an analytic Gaussian stand-in whose exact velocities make the right class known (pruning,
classification, anomaly AUC).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ttest_rel
from scoring_helpers import GaussianPipeline, gaussian_tiles, random_pipeline

from cytosyn.scoring import (
    ClassPruner,
    Condition,
    EngineSettings,
    PruningSettings,
    ScoringError,
    ScoringPlan,
    TileBatch,
    TimeGrid,
    TimeWeights,
    class_errors,
    decide,
    denoising_errors,
    error_maps,
    fit_time_weights,
    interleaved_order,
    margin_zeta,
    pruning_rounds,
    score_batch,
    tile_noise,
    tile_seed,
    weighted_errors,
)
from cytosyn.scoring.engine import central_mask
from cytosyn.scoring.metrics import auc_with_ci, classification_metrics


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline()


def _data(pipe, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((n, *pipe.latent_shape)).astype(np.float32)
    own = rng.standard_normal((n, pipe.cond_dim)).astype(np.float32)
    keys = [f"tile{i:03d}" for i in range(n)]
    return lat, own, keys


def _conditions(pipe, n_classes: int = 2, seed: int = 1) -> list[Condition]:
    rng = np.random.default_rng(seed)
    conds = [Condition("own", "own"), Condition("null", "null")]
    conds += [
        Condition(f"class:c{j}", "embedding", vector=rng.standard_normal(pipe.cond_dim).astype(np.float32),
                  label=f"c{j}", is_class=True)
        for j in range(n_classes)
    ]  # fmt: skip
    return conds


# ---- times and noise --------------------------------------------------------------------------------------


def test_interleaved_order_is_a_spread_permutation():
    assert interleaved_order(5) == [0, 4, 2, 1, 3]
    for k in (1, 2, 7, 20, 33):
        order = interleaved_order(k)
        assert sorted(order) == list(range(k))
    order = interleaved_order(20)
    assert {0, 19}.issubset(order[:4]) or max(order[:4]) >= 15  # the first visits cover both ends


def test_time_grid_validation():
    g = TimeGrid.build(k=4, t_min=0.1, t_max=0.7)
    assert g.values == pytest.approx((0.1, 0.3, 0.5, 0.7))
    assert TimeGrid.build(values=[0.9, 0.2]).values == (0.2, 0.9)
    for bad in ({"k": 0}, {"values": [0.0, 0.5]}, {"values": [0.5, 1.2]}, {"values": [0.3, 0.3]},
                {"k": 3, "t_min": 0.0}, {"k": 3, "values": [0.1, 0.2]}):  # fmt: skip
        with pytest.raises(ScoringError):
            TimeGrid.build(**bad)


def test_tile_noise_depends_on_seed_and_key_only():
    a = tile_noise(3, "k1", 4, (2, 3, 3))
    assert torch.equal(a, tile_noise(3, "k1", 4, (2, 3, 3)))
    assert not torch.equal(a, tile_noise(3, "k2", 4, (2, 3, 3)))
    assert not torch.equal(a, tile_noise(4, "k1", 4, (2, 3, 3)))
    assert torch.equal(a[:2], tile_noise(3, "k1", 2, (2, 3, 3)))  # more times = the same first draws


# ---- the engine against a naive reimplementation -----------------------------------------------------------


def _naive(pipe, lat, own, keys, conds, grid, seed, fraction):
    """Tile by tile, condition by condition, time by time, straight through the SiT."""
    model = pipe.model
    h, w = lat.shape[2:]
    mh, mw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - mh) // 2, (w - mw) // 2
    out = np.zeros((len(keys), len(conds), len(grid.values)))
    for i, key in enumerate(keys):
        g = torch.Generator().manual_seed(tile_seed(seed, key))
        noise = [torch.randn(lat.shape[1:], generator=g) for _ in grid.values]
        x0 = torch.from_numpy(lat[i])[None]
        for m, c in enumerate(conds):
            for k, t in enumerate(grid.values):
                eps = noise[k][None]
                x_t = (1 - t) * x0 + t * eps
                if c.kind == "own":
                    v = model(x_t, torch.tensor([t], dtype=torch.float32), torch.from_numpy(own[i])[None])
                elif c.kind == "null":
                    v = model(x_t, torch.tensor([t], dtype=torch.float32), None)
                else:
                    v = model(x_t, torch.tensor([t], dtype=torch.float32), torch.from_numpy(c.vector)[None])
                sq = (v - (eps - x0))[0].pow(2).mean(0)
                out[i, m, k] = float(sq[top : top + mh, left : left + mw].mean())
    return out


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_errors_equal_naive_reimplementation_with_shared_noise(pipe, fraction):
    lat, own, keys = _data(pipe, 3)
    conds = _conditions(pipe)
    grid = TimeGrid.build(k=4, t_min=0.1, t_max=1.0)
    settings = EngineSettings(grid, seed=7, mask_fraction=fraction, batch_size=5)
    res = denoising_errors(pipe, lat, keys, conds, settings, own=own)
    want = _naive(pipe, lat, own, keys, conds, grid, 7, fraction)
    np.testing.assert_allclose(res.errors, want, rtol=1e-5, atol=1e-7)
    assert res.nfe.tolist() == [len(conds) * 4] * 3
    assert (res.dropped_at == -1).all()
    # the conditions do matter for this model (otherwise the comparison above would prove little)
    assert np.ptp(res.errors[:, :, 0], axis=1).min() > 1e-4


def test_shared_noise_identical_conditions_give_identical_errors(pipe):
    lat, own, keys = _data(pipe, 4)
    conds = [Condition("own", "own")] + [
        Condition(f"copy{j}", "embedding", vector=own[0], is_class=True) for j in range(2)
    ]
    res = denoising_errors(
        pipe, lat, keys, conds, EngineSettings(TimeGrid.build(k=3), seed=1, batch_size=7), own=own
    )
    # the same noise for both copies (equal up to float rounding of rows batched differently)
    np.testing.assert_allclose(res.errors[:, 1], res.errors[:, 2], rtol=1e-6)
    assert np.ptp(res.errors[:, 1], axis=0).min() > 1e-3  # while tiles differ
    np.testing.assert_allclose(res.errors[0, 0], res.errors[0, 1], rtol=1e-6)  # tile 0's own = the copy


def test_determinism_across_batch_sizes_and_tile_order(pipe):
    lat, own, keys = _data(pipe, 4)
    conds = _conditions(pipe, 2)
    grid = TimeGrid.build(k=3)
    ref = denoising_errors(pipe, lat, keys, conds, EngineSettings(grid, seed=2, batch_size=1), own=own).errors
    for bs in (5, 200):
        got = denoising_errors(
            pipe, lat, keys, conds, EngineSettings(grid, seed=2, batch_size=bs), own=own
        ).errors
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    perm = [3, 0, 1, 2]
    got = denoising_errors(
        pipe, lat[perm], [keys[i] for i in perm], conds, EngineSettings(grid, seed=2), own=own[perm]
    )
    np.testing.assert_allclose(got.errors, ref[perm], rtol=1e-6, atol=1e-9)


def test_error_maps_are_consistent_with_errors(pipe):
    lat, own, keys = _data(pipe, 2)
    conds = _conditions(pipe, 2)
    grid = TimeGrid.build(k=3)
    settings = EngineSettings(grid, seed=0, batch_size=8)
    w = np.array([0.5, 1.0, 2.0])
    res = denoising_errors(pipe, lat, keys, conds, settings, own=own)
    maps = error_maps(pipe, lat, keys, conds, settings, w, own=own)
    assert maps.shape == (2, len(conds), *lat.shape[2:])
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), weighted_errors(res.errors, w), rtol=1e-5)


def test_central_mask():
    m = central_mask(8, 8, 0.5)
    assert m.sum() == 16 and m[2:6, 2:6].all() and m[0].sum() == 0


# ---- bad input: refused before any work -------------------------------------------------------------------


def test_bad_conditions_are_refused(pipe):
    lat, own, keys = _data(pipe, 2)
    s = EngineSettings(TimeGrid.build(k=2))
    with pytest.raises(ScoringError, match="width 16"):
        denoising_errors(pipe, lat, keys, [Condition("x", "embedding", vector=np.zeros(7))], s)
    with pytest.raises(ScoringError, match="own embedding"):
        denoising_errors(pipe, lat, keys, [Condition("own", "own")], s)
    with pytest.raises(ScoringError, match="no label conditioning"):
        denoising_errors(pipe, lat, keys, [Condition("class:a", "label", label="a", is_class=True)], s)
    with pytest.raises(ScoringError, match="shape"):
        denoising_errors(pipe, lat[:, :2], keys, [Condition("null", "null")], s)
    with pytest.raises(ScoringError, match="mask_fraction"):
        EngineSettings(TimeGrid.build(k=2), mask_fraction=0.0)
    uncond = random_pipeline(cond_dim=None)
    with pytest.raises(ScoringError, match="unconditional"):
        denoising_errors(uncond, lat, keys, [Condition("own", "own")], s, own=own)
    res = denoising_errors(
        uncond, lat, keys, [Condition("null", "null")], s
    )  # null works on an unconditional model
    assert np.isfinite(res.errors).all()


def test_model_without_null_embedding_refuses_null(pipe):
    class NoNull:
        def __getattr__(self, name):
            return getattr(pipe, name)

        has_null_condition = False

    lat, _, keys = _data(pipe, 1)
    with pytest.raises(ScoringError, match="no null embedding"):
        denoising_errors(
            NoNull(), lat, keys, [Condition("null", "null")], EngineSettings(TimeGrid.build(k=2))
        )


# ---- weighting ---------------------------------------------------------------------------------------------


def test_fit_time_weights_equalises_scale():
    t = np.linspace(0.05, 0.95, 12)
    scale = np.exp(2.0 - 3.0 * t + 1.5 * t**2)
    rng = np.random.default_rng(0)
    errors = scale[None, None, :] * rng.uniform(0.9, 1.1, (50, 2, 12))
    w = fit_time_weights(t, errors, degree=2)
    weighted = errors * w.weights[None, None, :]
    per_t = weighted.mean(axis=(0, 1))
    assert np.ptp(per_t) < 0.05 and abs(per_t.mean() - 1) < 0.05
    np.testing.assert_allclose(w.coefficients, [2.0, -3.0, 1.5], atol=0.05)
    again = TimeWeights.from_dict(w.describe())
    np.testing.assert_allclose(again.weights, w.weights)
    with pytest.raises(ScoringError, match="made for times"):
        again.check(t[:-1])


# ---- pruning ----------------------------------------------------------------------------------------------


def test_pruning_rounds():
    assert pruning_rounds(30, 20, 5) == [20, 5, 5]
    assert pruning_rounds(12, 20, 5) == [12]
    assert pruning_rounds(23, 20, 5) == [20, 3]


def test_pruner_keeps_true_argmin_with_large_margin_and_drops_only_significant():
    rng = np.random.default_rng(0)
    k, m = 40, 6
    for trial in range(30):
        base = rng.uniform(1.0, 2.0, k)
        offsets = np.r_[0.0, rng.uniform(0.0, 0.6, m - 1)]
        noise = rng.normal(0, 0.05 + 0.2 * (trial % 3), (m, k))
        errors = base[None] + offsets[:, None] + noise
        errors[0] = base - 0.5 + rng.normal(0, 0.02, k)  # the true class: a large margin
        pruner = ClassPruner(list(range(m)), np.ones(k), p_threshold=2e-3)
        active = np.ones(m, bool)
        seen = np.full((m, k), np.nan)
        for done in np.cumsum(pruning_rounds(k, 20, 5)):
            seen[active, :done] = errors[active, :done]
            before = active.copy()
            active, p = pruner(seen, active.copy(), int(done))
            assert active[0], "the true argmin was pruned"
            for c in np.flatnonzero(before & ~active):
                assert p[c] < 2e-3
            best = int(np.argmin([np.nanmean(seen[c]) if active[c] else np.inf for c in range(m)]))
            for c in np.flatnonzero(active):
                if c == best:
                    continue
                common = np.isfinite(seen[c]) & np.isfinite(seen[best])
                pv = ttest_rel(seen[c, common], seen[best, common], alternative="greater").pvalue
                assert not pv < 2e-3, f"class {c} kept with p = {pv}"


def test_pruning_in_the_engine_saves_evaluations_and_keeps_the_answer():
    gp = GaussianPipeline(s=0.5)
    rng = np.random.default_rng(0)
    means = 1.5 * rng.standard_normal((5, *gp.latent_shape))
    lat, ys = gaussian_tiles(means, 4, gp.s, seed=1)
    keys = [f"g{i}" for i in range(len(ys))]
    conds = [Condition(f"class:{j}", "embedding", vector=means[j].reshape(-1).astype(np.float32), label=str(j),
                       is_class=True) for j in range(5)]  # fmt: skip
    grid = TimeGrid.build(k=40, t_min=0.05, t_max=1.0)
    settings = EngineSettings(grid, seed=0)
    weights = TimeWeights.uniform(grid.values)
    full = decide(ScoringPlan(conds, settings, weights), keys, [None] * len(keys), [{}] * len(keys),
                  denoising_errors(gp, lat, keys, conds, settings))  # fmt: skip
    plan = ScoringPlan(conds, settings, weights, PruningSettings(min_t=10, every=5, p_threshold=2e-3))
    raw = denoising_errors(gp, lat, keys, conds, settings, pruner=plan.pruner(), rounds=plan.rounds())
    pruned = decide(plan, keys, [None] * len(keys), [{}] * len(keys), raw)
    assert raw.nfe.sum() < 0.6 * full.raw.nfe.sum()
    assert pruned.predicted == full.predicted == [str(y) for y in ys]
    assert (raw.dropped_at[np.arange(len(ys)), ys] == -1).all()  # the true class is never dropped here
    dropped = raw.dropped_at >= 0
    assert (raw.drop_p[dropped] < 2e-3).all() and np.isnan(raw.drop_p[~dropped]).all()
    assert set(np.unique(raw.dropped_at[dropped])) <= {10, 15, 20, 25, 30, 35}


# ---- decisions and anomaly scores --------------------------------------------------------------------------


def test_margin_zeta_closed_form():
    ce = np.array([[0.0, 1.0, 1.0, 1.0], [0.0, 0.1, 0.5, 0.9], [0.0, 0.0, 0.0, 0.0]])
    zeta = margin_zeta(ce, k_max=10)
    # k = 3 competitors: margins mean, minus the mean |pairwise difference| over the 6 ordered pairs
    assert zeta[0] == pytest.approx(1.0)
    assert zeta[1] == pytest.approx((0.1 + 0.5 + 0.9) / 3 - 2 * (0.4 + 0.8 + 0.4) / 6)
    assert zeta[2] == pytest.approx(0.0)
    assert margin_zeta(np.array([[0.2, 0.5]]))[0] == pytest.approx(0.3)  # one competitor: the margin
    assert np.isnan(margin_zeta(np.array([[0.2]])))[0]


def test_class_errors_subtract_the_per_time_minimum():
    errors = np.array([[[1.0, 2.0], [1.5, 2.5], [3.0, np.nan]]])
    ce = class_errors(errors, np.array([1.0, 0.5]), [0, 1, 2])
    np.testing.assert_allclose(ce[0], [0.0, (0.5 + 0.25) / 2, 2.0])


def test_gaussian_generative_classification_and_held_out_class_anomaly():
    """Prototype classes of an exact model: every tile classified right; a class left out of the
    conditions scores as more anomalous under the margin score (AUC near 1)."""
    gp = GaussianPipeline(s=0.4)
    rng = np.random.default_rng(3)
    means = 1.2 * rng.standard_normal((5, *gp.latent_shape))
    lat, ys = gaussian_tiles(means, 6, gp.s, seed=4)
    keys = [f"g{i}" for i in range(len(ys))]
    own = np.stack([means[y].reshape(-1) for y in ys]).astype(np.float32)
    conds = [Condition("own", "own"), Condition("null", "null")] + [
        Condition(f"class:{j}", "embedding", vector=means[j].reshape(-1).astype(np.float32), label=str(j), is_class=True)
        for j in range(4)  # class 4 is held out
    ]  # fmt: skip
    grid = TimeGrid.build(k=12, t_min=0.05, t_max=1.0)
    settings = EngineSettings(grid, seed=0)
    plan = ScoringPlan(conds, settings, TimeWeights.uniform(grid.values))
    batch = TileBatch(keys, [str(y) for y in ys], [{}] * len(ys), latents=lat, own=own)
    scores = decide(plan, keys, batch.labels, batch.meta, score_batch(gp, batch, plan, tiles_per_batch=7))
    inside = [i for i, y in enumerate(ys) if y < 4]
    assert [scores.predicted[i] for i in inside] == [str(ys[i]) for i in inside]
    out = [i for i, y in enumerate(ys) if y == 4]
    auc = auc_with_ci(scores.anomaly["margin"][inside], scores.anomaly["margin"][out], n_boot=200)
    assert auc["estimate"] > 0.9 and auc["low"] <= auc["estimate"] <= auc["high"]
    # own embedding explains each tile better than the null condition
    assert (scores.anomaly["own_vs_null"] < 0).all()


def test_classification_metrics_and_auc():
    m = classification_metrics(["a", "a", "b", "b", "c", "c"], ["a", "b", "b", "b", "c", "a"], n_boot=200)
    assert m["accuracy"]["estimate"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"]["estimate"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    for k in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert m[k]["low"] <= m[k]["estimate"] <= m[k]["high"]
    auc = auc_with_ci(np.array([0.1, 0.2, 0.3]), np.array([0.25, 0.4, 0.5]), n_boot=100)
    assert auc["estimate"] == pytest.approx(8 / 9)
    with pytest.raises(ScoringError):
        auc_with_ci(np.array([0.1]), np.array([]))


def test_vectorised_bootstrap_metrics_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from cytosyn.scoring.metrics import _confusion_metrics

    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, (30, 25))
    p = np.where(rng.random((30, 25)) < 0.5, t, rng.integers(0, 5, (30, 25)))
    got = _confusion_metrics(t, p, 5)
    for r in range(30):
        present = sorted(set(t[r].tolist()))
        assert got["accuracy"][r] == pytest.approx(accuracy_score(t[r], p[r]))
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            assert got["balanced_accuracy"][r] == pytest.approx(balanced_accuracy_score(t[r], p[r]))
        assert got["macro_f1"][r] == pytest.approx(
            f1_score(t[r], p[r], labels=present, average="macro", zero_division=0)
        )


def test_rank_auc_equals_scikit_learn():
    from sklearn.metrics import roc_auc_score

    from cytosyn.scoring.metrics import _rank_auc

    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, (20, 9)).astype(float)  # ties on purpose
    b = rng.integers(1, 7, (20, 5)).astype(float)
    got = _rank_auc(a, b)
    for r in range(20):
        assert got[r] == pytest.approx(roc_auc_score(np.r_[np.zeros(9), np.ones(5)], np.r_[a[r], b[r]]))


def test_paired_auc_difference():
    """The gap between two scores of the same tiles: its estimate is the difference of scikit-learn's AUCs;
    a score against itself gives exactly 0 in every replicate (pairing: the same tiles for both); a
    separating score against noise has a CI above 0; unpaired inputs are refused."""
    from sklearn.metrics import roc_auc_score

    from cytosyn.scoring.metrics import auc_difference_with_ci

    rng = np.random.default_rng(3)
    good_in, good_out = rng.normal(0, 1, 60), rng.normal(3, 1, 30)
    noise_in, noise_out = rng.normal(0, 1, 60), rng.normal(0, 1, 30)
    y = np.r_[np.zeros(60), np.ones(30)]
    d = auc_difference_with_ci(good_in, good_out, noise_in, noise_out, n_boot=500, seed=0)
    want = roc_auc_score(y, np.r_[good_in, good_out]) - roc_auc_score(y, np.r_[noise_in, noise_out])
    assert d["estimate"] == pytest.approx(want) and d["low"] > 0 and d["p_not_above_zero"] == 0.0
    same = auc_difference_with_ci(noise_in, noise_out, noise_in, noise_out, n_boot=200)
    assert same["estimate"] == same["low"] == same["high"] == 0.0  # unpaired resampling would spread
    with_nan = auc_difference_with_ci(
        np.r_[good_in, np.nan], good_out, np.r_[noise_in, 0.0], noise_out, n_boot=50
    )
    assert with_nan["n_in"] == 60 and with_nan["n_out"] == 30
    with pytest.raises(ScoringError, match="same tiles"):
        auc_difference_with_ci(good_in, good_out, noise_in[:-1], noise_out)


def test_label_conditions_of_a_class_conditional_model():
    """Label conditions (a class-conditional fine-tune's labels) go to the pipeline as integer labels, in
    calls apart from the embedding rows, and classify like the equivalent prototypes."""
    rng = np.random.default_rng(5)
    shape = (2, 4, 4)
    means = 1.2 * rng.standard_normal((3, *shape))
    gp = GaussianPipeline(shape, s=0.4, labels={f"L{j}": means[j].reshape(-1) for j in range(3)})
    lat, ys = gaussian_tiles(means, 4, gp.s, seed=6)
    keys = [f"g{i}" for i in range(len(ys))]
    own = np.stack([means[y].reshape(-1) for y in ys]).astype(np.float32)
    grid = TimeGrid.build(k=6, t_min=0.1, t_max=1.0)
    settings = EngineSettings(grid, seed=0, batch_size=5)  # chunks mix label and embedding rows
    by_label = [Condition("own", "own"), Condition("null", "null")] + [
        Condition(f"class:L{j}", "label", label=f"L{j}", is_class=True) for j in range(3)
    ]
    by_proto = [Condition("own", "own"), Condition("null", "null")] + [
        Condition(f"class:L{j}", "embedding", vector=means[j].reshape(-1).astype(np.float32), label=f"L{j}",
                  is_class=True) for j in range(3)
    ]  # fmt: skip
    a = denoising_errors(gp, lat, keys, by_label, settings, own=own)
    b = denoising_errors(gp, lat, keys, by_proto, settings, own=own)
    np.testing.assert_allclose(a.errors, b.errors, rtol=1e-6)
    plan = ScoringPlan(by_label, settings, TimeWeights.uniform(grid.values))
    scores = decide(plan, keys, [None] * len(keys), [{}] * len(keys), a)
    assert scores.predicted == [f"L{y}" for y in ys]
    with pytest.raises(ScoringError, match="not one of the model's labels"):
        denoising_errors(gp, lat, keys, [Condition("class:X", "label", label="X", is_class=True)], settings)
