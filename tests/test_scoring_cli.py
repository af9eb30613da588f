"""``cytosyn score`` end to end on a release folder and labelled featurized splits written by the test:
outputs, resume per shard, settings guard, and the bad inputs refused before any scoring."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scoring_helpers import random_pipeline, write_featurized_split

from cytosyn.cli import main
from cytosyn.config import ConfigError, build_config
from cytosyn.scoring import ScoringError
from cytosyn.scoring.run import ScoreConfig, run_score

LABELS = ["tumour", "stroma", "mucus"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("score")
    release = random_pipeline().save_pretrained(root / "release", model_card="# scoring test model\n")
    write_featurized_split(root / "ref", 18, LABELS, seed=1, split="ref", per_shard=9)
    write_featurized_split(root / "test", 14, [*LABELS, "debris"], seed=2, split="test", per_shard=5)
    write_featurized_split(root / "unlabelled", 6, [None], seed=3, split="u")
    return {
        "root": root,
        "release": release,
        "ref": root / "ref",
        "test": root / "test",
        "u": root / "unlabelled",
    }


def _cfg(setup, out: Path, **extra) -> ScoreConfig:
    data = {
        "model": str(setup["release"]),
        "input": str(setup["test"]),
        "output": str(out),
        "conditions": {"classes": {"source": "prototypes", "reference": str(setup["ref"]), "min_tiles": 3}},
        "times": {"k": 6},
        "pruning": {"min_t": 4, "every": 1},
        "weighting": {"calibration_tiles": 4},
        "n_boot": 50,
        "maps": 2,
        "grid": 3,
        "progress": False,
        "device": "cpu",
    }
    for key, value in extra.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return build_config(ScoreConfig, data)


def test_score_outputs_and_resume(setup, tmp_path):
    out = tmp_path / "scores"
    summary = run_score(_cfg(setup, out))
    assert summary.complete and summary.done == 3 and summary.skipped == 0 and summary.tiles == 14
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 14 and len({r["key"] for r in rows}) == 14
    assert {"anomaly_margin", "anomaly_own_vs_null", "anomaly_own_error", "error_own", "error_null",
            "error_class:tumour", "predicted", "label", "slide_id", "nfe"} <= set(rows[0])  # fmt: skip
    assert {r["predicted"] for r in rows} <= set(LABELS)
    s = json.loads((out / "summary.json").read_text())
    cls = s["classification"]
    assert cls["n"] == 11 and cls["tiles_with_other_labels"] == 3  # 'debris' is no class: counted, not scored
    assert (
        0
        <= cls["balanced_accuracy"]["low"]
        <= cls["balanced_accuracy"]["estimate"]
        <= cls["balanced_accuracy"]["high"]
    )
    assert s["prototypes"]["tiles_per_label"] == {"tumour": 6, "stroma": 6, "mucus": 6}
    assert s["plan"]["pruning"]["rounds"] == [4, 1, 1] and s["plan"]["engine"]["times"]["k"] == 6
    assert s["nfe"]["per_tile_without_pruning"] == 5 * 6
    assert s["nfe"]["scoring_total"] == sum(int(r["nfe"]) for r in rows)
    assert set(s["per_slide"]) == {"slide0", "slide1", "slide2"}
    weights = json.loads((out / "weights.json").read_text())
    assert weights["method"] == "fit" and weights["calibration_tiles"] == 4 and len(weights["weights"]) == 6
    for fig in ("score_distributions.png", "anomalous_tiles.png"):
        assert (out / fig).stat().st_size > 1000
    assert len(list((out / "maps").glob("*.png"))) == 2
    with np.load(out / "conditions.npz") as z:
        assert list(z["labels"]) == sorted(LABELS) and z["vectors"].shape == (3, 16)

    # resume: only the missing unit is scored again, with the same numbers
    unit = out / "units" / "test-000001.npz"
    before = unit.read_bytes()
    unit.unlink()
    (out / "units" / "test-000001.json").unlink()
    again = run_score(_cfg(setup, out))
    assert again.done == 1 and again.skipped == 2 and again.calibration_nfe == 0
    assert unit.read_bytes() == before
    assert list(csv.DictReader((out / "scores.csv").open())) == rows

    # other settings into the same folder: refused, nothing overwritten
    with pytest.raises(ConfigError, match="other settings"):
        run_score(_cfg(setup, out, noise_seed=1))


@pytest.mark.slow
def test_parts_and_batch_sizes_give_the_same_table(setup, tmp_path):
    ref = tmp_path / "one"
    run_score(_cfg(setup, ref, grid=0, maps=0, **{"pruning.enabled": False}))
    out = tmp_path / "two"
    first = run_score(
        _cfg(
            setup,
            out,
            part="0/2",
            batch_size=7,
            tiles_per_batch=2,
            grid=0,
            maps=0,
            **{"pruning.enabled": False},
        )
    )
    assert not first.complete and first.done == 2
    second = run_score(
        _cfg(
            setup,
            out,
            part="1/2",
            batch_size=7,
            tiles_per_batch=2,
            grid=0,
            maps=0,
            **{"pruning.enabled": False},
        )
    )
    assert second.complete and second.done == 1
    a = list(csv.DictReader((ref / "scores.csv").open()))
    b = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["predicted"] == rb["predicted"]
        assert float(ra["error_own"]) == pytest.approx(float(rb["error_own"]), rel=1e-6)


def test_cli_verb_and_bad_inputs(setup, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main([
        "score", "--model", str(setup["release"]), "--input", str(setup["u"]), "--output", str(out),
        "times.k=3", "conditions.own=true", "conditions.null=true", "weighting.calibration_tiles=2", "progress=false",
        "device=cpu", "grid=2",
    ])  # fmt: skip
    assert rc == 0
    assert "score: 1 units scored" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 6 and rows[0]["predicted"] == "" and "anomaly_margin" not in rows[0]

    # bad input, each refused before scoring (no units written)
    bad = tmp_path / "bad"
    with pytest.raises(ScoringError, match="no labelled tiles"):
        run_score(_cfg(setup, bad, **{"conditions.classes.reference": str(setup["u"])}))
    with pytest.raises(ScoringError, match="fewer than 7 tiles"):
        run_score(_cfg(setup, bad, **{"conditions.classes.min_tiles": 7}))
    with pytest.raises(ScoringError, match="need a class-conditional fine-tune"):
        run_score(
            _cfg(setup, bad, **{"conditions.classes.source": "labels", "conditions.classes.labels": ["a"]})
        )
    assert not list((bad / "units").glob("*.npz"))
    for override, match in (("times.k=0", "times.k"), ("times.values=[0.0,0.5]", "(0, 1]"),
                            ("mask_fraction=1.5", "mask_fraction"), ("conditions.own=false", None)):  # fmt: skip
        args = [
            "score",
            "--model",
            str(setup["release"]),
            "--input",
            str(setup["u"]),
            "--output",
            str(bad),
            override,
        ]
        if override == "conditions.own=false":
            args.append("conditions.null=false")
        assert main(args) == 1
        err = capsys.readouterr().err
        assert match is None or match in err
