"""Property tests of the pure split / quota / shuffle logic of ``cytosyn pack`` (no files)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
from cytosyn.data_prep.splits import (
    SlideRecord,
    SplitError,
    allocate,
    assign_splits,
    choose_tiles,
    plan_quotas,
    shuffle_order,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROJECTS = ["BRCA", "LUAD", "COAD", "KIRC"]
TSSS = ["A1", "A2", "B5", "C3", "E9"]
RATIOS = [
    {"train": 0.8, "val": 0.1, "test": 0.1},
    {"train": 0.7, "val": 0.15, "test": 0.15},
    {"train": 0.5, "test": 0.5},
    {"train": 1.0},
    {"train": 0.6, "val": 0.0, "test": 0.4},
]


@st.composite
def slide_tables(draw, min_patients: int = 1, max_patients: int = 80) -> list[SlideRecord]:
    n = draw(st.integers(min_patients, max_patients))
    records = []
    for p in range(n):
        project = draw(st.sampled_from(PROJECTS))
        home_tss = draw(st.sampled_from(TSSS))
        for s in range(draw(st.integers(1, 3))):
            # mostly the patient's own TSS, sometimes another (non-TCGA cohorts)
            tss = home_tss if draw(st.integers(0, 9)) else draw(st.sampled_from(TSSS))
            records.append(SlideRecord(f"S{p:03d}-{s}", f"P{p:03d}", tss, project, draw(st.integers(1, 60))))
    return records


def _check_assignment(slides, a, ratios, holdout) -> None:
    patients = {r.patient_id for r in slides}
    # every patient in exactly one split, every slide with its patient
    assert set(a.patient_split) == patients
    for r in slides:
        assert a.slide_split[r.slide_id] == a.patient_split[r.patient_id]
    per_split = defaultdict(set)
    for r in slides:
        per_split[a.slide_split[r.slide_id]].add(r.patient_id)
    names = list(per_split)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert not per_split[x] & per_split[y], f"patient in {x} and {y}"
    # produced splits: positive ratios (+ held-out), none empty, nothing else
    expected = [k for k, v in ratios.items() if v > 0] + (["test_tss"] if holdout else [])
    assert a.splits == expected
    assert set(per_split) == set(expected)
    # held-out split = exactly the patients with a slide at a held-out TSS
    if holdout:
        want = {r.patient_id for r in slides if r.tss in holdout}
        assert set(a.patients("test_tss")) == want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    slides=slide_tables(),
    ratios=st.sampled_from(RATIOS),
    holdout=st.sampled_from([[], ["E9"], ["A2", "C3"]]),
    stratify=st.booleans(),
    seed=st.integers(0, 3),
)
def test_no_patient_in_two_splits(slides, ratios, holdout, stratify, seed) -> None:
    try:
        a = assign_splits(slides, ratios, stratify=stratify, holdout_tss=holdout, seed=seed)
    except SplitError as err:
        # only legitimate when a split really cannot get a patient
        msg = str(err)
        if holdout and not {r.tss for r in slides} & set(holdout):
            assert "held-out split 'test_tss' would be empty" in msg
        elif set(holdout) - {r.tss for r in slides}:  # a held-out TSS with no slide: a typo, refused
            assert "match no usable slide" in msg
        else:
            rest = {r.patient_id for r in slides} - {r.patient_id for r in slides if r.tss in holdout}
            smallest = min(v for v in ratios.values() if v > 0)
            assert "would be empty" in msg and len(rest) < 2 / smallest, msg
        return
    _check_assignment(slides, a, ratios, holdout)


@settings(max_examples=60, deadline=None)
@given(slides=slide_tables(), seed=st.integers(0, 5), data=st.data())
def test_deterministic_and_order_independent(slides, seed, data) -> None:
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    try:
        a = assign_splits(slides, ratios, seed=seed, holdout_tss=["E9"])
    except SplitError:
        return
    shuffled = data.draw(st.permutations(slides))
    b = assign_splits(shuffled, ratios, seed=seed, holdout_tss=["E9"])
    assert a == b


@settings(max_examples=80, deadline=None)
@given(
    slides=slide_tables(min_patients=20, max_patients=120),
    ratios=st.sampled_from(RATIOS[:3]),
    seed=st.integers(0, 9),
)
def test_stratification_roughly_respected(slides, ratios, seed) -> None:
    a = assign_splits(slides, ratios, stratify=True, seed=seed)
    project_of = {r.patient_id: r.project for r in slides}
    by_project = Counter(project_of.values())
    got = Counter((project_of[p], s) for p, s in a.patient_split.items())
    for project, n in by_project.items():
        for split, r in ratios.items():
            assert abs(got[(project, split)] - n * r) <= 2, (project, split, got[(project, split)], n * r)
    # and the whole table within one patient of its share
    totals = Counter(a.patient_split.values())
    for split, r in ratios.items():
        assert abs(totals[split] - len(project_of) * r) < 1 + 1e-9


def test_unstratified_is_exact_to_one_patient() -> None:
    slides = [SlideRecord(f"S{i}", f"P{i}", "A1", PROJECTS[i % 4], 5) for i in range(103)]
    a = assign_splits(slides, {"train": 0.8, "val": 0.1, "test": 0.1}, stratify=False)
    totals = Counter(a.patient_split.values())
    assert (
        abs(totals["train"] - 82.4) < 1 and abs(totals["val"] - 10.3) < 1 and abs(totals["test"] - 10.3) < 1
    )


def test_seed_changes_assignment() -> None:
    slides = [SlideRecord(f"S{i}", f"P{i}", "A1", "BRCA", 5) for i in range(50)]
    ratios = {"train": 0.6, "val": 0.2, "test": 0.2}
    assert assign_splits(slides, ratios, seed=0) != assign_splits(slides, ratios, seed=1)


def test_errors() -> None:
    two = [SlideRecord("S1", "P1", "A1", "BRCA", 3), SlideRecord("S2", "P1", "A1", "LUAD", 3)]
    with pytest.raises(SplitError, match="different projects"):
        assign_splits(two, {"train": 1.0})
    with pytest.raises(SplitError, match="listed twice"):
        assign_splits([two[0], two[0]], {"train": 1.0})
    few = [SlideRecord(f"S{i}", f"P{i}", "A1", "BRCA", 3) for i in range(4)]
    with pytest.raises(SplitError, match=r"\['val', 'test'\] would be empty"):
        assign_splits(few, {"train": 0.9, "val": 0.05, "test": 0.05})
    with pytest.raises(SplitError, match="held-out split 'test_tss' would be empty"):
        assign_splits(few, {"train": 1.0}, holdout_tss=["ZZ"])
    with pytest.raises(SplitError, match="sum to 1"):
        assign_splits(few, {"train": 0.5, "val": 0.2})
    with pytest.raises(SplitError, match="no usable slides"):
        assign_splits([], {"train": 1.0})


def test_mixed_tss_patient_goes_to_holdout_with_all_slides() -> None:
    slides = [
        SlideRecord("S1", "P1", "E9", "BRCA", 3),
        SlideRecord("S2", "P1", "A1", "BRCA", 3),
        *[SlideRecord(f"T{i}", f"Q{i}", "A1", "BRCA", 3) for i in range(10)],
    ]
    a = assign_splits(slides, {"train": 0.5, "val": 0.5}, holdout_tss=["E9"])
    assert a.slide_split["S1"] == a.slide_split["S2"] == "test_tss"
    assert a.mixed_tss_patients == ["P1"]


# --------------------------------------------------------------------------------------------------
# Quotas
# --------------------------------------------------------------------------------------------------


def _reference_waterfill(total: int, cap: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Independent reference: shares min(cap, λ·w) with λ found by bisection."""
    target = min(total, cap.sum())
    lo, hi = 0.0, 1.0
    while np.minimum(cap, hi * w).sum() < target - 1e-9 and hi < 1e18:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.minimum(cap, mid * w).sum() < target:
            lo = mid
        else:
            hi = mid
    return np.minimum(cap, hi * w)


@settings(max_examples=300, deadline=None)
@given(
    caps=st.lists(st.integers(0, 200), min_size=1, max_size=12),
    data=st.data(),
)
def test_allocate_matches_waterfilling(caps, data) -> None:
    weights = data.draw(st.lists(st.integers(1, 20), min_size=len(caps), max_size=len(caps)))
    total = data.draw(st.integers(0, 2 * sum(caps) + 5))
    cap = np.array(caps)
    got = allocate(total, cap, weights)
    assert got.sum() == min(total, cap.sum())
    assert (got >= 0).all() and (got <= cap).all()
    ref = _reference_waterfill(total, cap.astype(float), np.array(weights, float))
    assert np.all(np.abs(got - ref) < 1 + 1e-6), (got, ref)


def test_allocate_examples() -> None:
    assert allocate(10, [3, 100, 100], [1, 1, 1]).tolist() == [3, 4, 3]
    assert allocate(100, [3, 5, 7], [1, 1, 1]).tolist() == [3, 5, 7]
    assert allocate(9, [100, 100], [2, 1]).tolist() == [6, 3]
    # zero-weight items only take what the weighted ones cannot
    assert allocate(7, [0, 5, 5], [0, 1, 0]).tolist() == [0, 5, 2]


def _split_slides() -> list[SlideRecord]:
    # TSS A1: 4 slides of 30 tiles; A2: 2 slides of 100; B5: 1 slide of 8
    out = [SlideRecord(f"A1-{i}", f"PA{i}", "A1", "BRCA", 30) for i in range(4)]
    out += [SlideRecord(f"A2-{i}", f"PB{i}", "A2", "BRCA", 100) for i in range(2)]
    out += [SlideRecord("B5-0", "PC0", "B5", "BRCA", 8)]
    return out


@pytest.mark.parametrize(
    ("weighting", "budget", "cap", "expected"),
    [
        # 70 tiles by slide count 4:2:1 → 40, 20, 10; B5 has only 8, its surplus goes 4:2 → 41.33, 20.67
        ("slides", 70, None, {"A1": 41, "A2": 21, "B5": 8}),
        # 23.3 each; B5 capped at 8, the other 62 shared equally
        ("uniform", 70, None, {"A1": 31, "A2": 31, "B5": 8}),
        # tiles after a cap of 25 per slide: 100, 50, 8 → 50 tiles as 31.6, 15.8, 2.5
        ("tiles", 50, 25, {"A1": 32, "A2": 16, "B5": 2}),
    ],
)
def test_tss_quotas(weighting, budget, cap, expected) -> None:
    plan = plan_quotas(_split_slides(), budget=budget, max_tiles_per_slide=cap, tss_weighting=weighting)
    assert {t: v["selected"] for t, v in plan.tss.items()} == expected
    assert plan.selected == budget == sum(plan.slide_counts.values())
    if cap:
        assert max(plan.slide_counts.values()) <= cap
    # within a TSS the quota is shared equally among slides (water-filled)
    a1 = [plan.slide_counts[f"A1-{i}"] for i in range(4)]
    assert max(a1) - min(a1) <= 1
    shares = {t: v["target_share"] for t, v in plan.tss.items()}
    assert abs(sum(shares.values()) - 1) < 1e-5


def test_quotas_without_budget_take_everything_after_cap() -> None:
    plan = plan_quotas(_split_slides(), budget=None, max_tiles_per_slide=20)
    assert plan.slide_counts == {**{f"A1-{i}": 20 for i in range(4)}, "A2-0": 20, "A2-1": 20, "B5-0": 8}
    assert plan.available == plan.selected == 128


def test_quotas_none_weighting_is_proportional_to_tiles() -> None:
    plan = plan_quotas(_split_slides(), budget=64, tss_weighting="none", slide_weighting="tiles")
    # 328 tiles, 64 wanted: 30 → 5.85, 100 → 19.5, 8 → 1.56
    assert plan.slide_counts["A2-0"] in (19, 20) and plan.slide_counts["B5-0"] in (1, 2)
    assert plan.selected == 64


# --------------------------------------------------------------------------------------------------
# Tile choice and shuffle
# --------------------------------------------------------------------------------------------------


def test_choose_tiles() -> None:
    a = choose_tiles("S1", 100, 10, seed=0)
    assert len(a) == 10 and len(set(a.tolist())) == 10 and a.tolist() == sorted(a.tolist())
    assert ((a >= 0) & (a < 100)).all()
    assert np.array_equal(a, choose_tiles("S1", 100, 10, seed=0))
    assert not np.array_equal(a, choose_tiles("S1", 100, 10, seed=1))
    assert not np.array_equal(a, choose_tiles("S2", 100, 10, seed=0))
    assert set(choose_tiles("S1", 100, 5).tolist()) <= set(choose_tiles("S1", 100, 10).tolist())  # nested
    assert choose_tiles("S1", 7, 50).tolist() == list(range(7))
    assert choose_tiles("S1", 7, 0).tolist() == []


def test_choose_tiles_is_roughly_uniform() -> None:
    hits = np.zeros(50)
    for i in range(400):
        hits[choose_tiles(f"slide{i}", 50, 10)] += 1
    assert hits.min() > 40 and hits.max() < 125  # expectation 80 per ordinal


def test_shuffle_order_is_a_deterministic_permutation() -> None:
    slides = [f"S{i}" for i in range(5)]
    ords = [np.arange(n) for n in (3, 10, 0, 7, 1)]
    pos = shuffle_order("train", slides, ords, seed=0)
    assert sorted(pos.tolist()) == list(range(21))
    assert np.array_equal(pos, shuffle_order("train", slides, ords, seed=0))
    assert not np.array_equal(pos, shuffle_order("train", slides, ords, seed=1))
    assert not np.array_equal(pos, shuffle_order("val", slides, ords, seed=0))
    # the relative order of two tiles does not depend on which other slides are present
    sub = shuffle_order("train", slides[:2], ords[:2], seed=0)
    full_rank = np.argsort(pos[:13])
    assert np.array_equal(np.argsort(sub), full_rank)
