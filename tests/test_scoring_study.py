"""The ``scoring`` eval study: domain separation beside Fréchet numbers, and generative classification
against a linear probe, through ``cytosyn eval``.

Real tiles (the bundled Aperio H&E slide) are the in-domain set; crops of scikit-image's real IHC image
(stained tissue, not H&E) are the new domain. The model is a random-initialised SiT conditioned on a
random ViT-Ti/16 with a random tiny-f8 VAE (plumbing, not a result: the numbers mean nothing).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_tile, write_split
from cytosyn.eval.images import ImageSet
from cytosyn.eval.run import EvalConfig, run_eval
from cytosyn.eval.studies import ScoringStudyConfig, scoring_study
from cytosyn.eval.studies.scoring import read_tiles
from scoring_helpers import random_pipeline

from cytosyn.config import ConfigError, build_config
from cytosyn.formats import slide_dir
from cytosyn.scoring.run import ScoreConfig, run_score
from cytosyn.shardio import iter_shard_samples

N = 8


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sets(tmp_path_factory, fixture_slide) -> dict:
    from skimage.data import immunohistochemistry

    root = tmp_path_factory.mktemp("scoring_study")
    run_tile([fixture_slide], root / "tiles", run={"overview": False})
    shards = sorted(slide_dir(root / "tiles", "cmu_small_region").glob("*.tar"))
    samples = [(key, dict(members)) for s in shards for (key, members), _ in iter_shard_samples(s)]
    assert len(samples) >= 3 * N

    def labelled(part, labels):
        out = []
        for i, (key, m) in enumerate(part):
            meta = json.loads(m["json"]) | {"label": labels[i % len(labels)]}
            out.append((key, m | {"json": json.dumps(meta).encode()}))
        return out

    ref = write_split(root / "ref", labelled(samples[:N], ["a", "b"]), "ref")
    held = write_split(root / "held", labelled(samples[N : 2 * N + 3], ["a", "b", "c"]), "test")
    ihc = immunohistochemistry()
    ihc_dir = root / "ihc"
    ihc_dir.mkdir()
    for i in range(N):
        y, x = divmod(i, 2)
        (ihc_dir / f"ihc{i}.png").write_bytes(
            _png(np.ascontiguousarray(ihc[y * 64 : y * 64 + 224, x * 200 : x * 200 + 224]))
        )
    pipe = random_pipeline(real_parts=True)
    release = pipe.save_pretrained(root / "release", model_card="# random scoring-study model\n")
    return {"root": root, "ref": ref, "held": held, "ihc": ihc_dir, "pipe": pipe, "release": release}


def test_domain_study_matches_cytosyn_score(sets, tmp_path):
    """The study and the CLI measure the same thing: same tiles, same seed → the same own-embedding errors."""
    cfg = ScoringStudyConfig(times={"k": 4}, calibration_tiles=4, top_tiles=2)
    ref = read_tiles(sets["pipe"], ImageSet.from_split(sets["ref"]), None, need_own=True)  # encoded once
    ihc = read_tiles(sets["pipe"], ImageSet.from_folder(sets["ihc"], mpp=0.5), None, need_own=True)
    assert ref.labels == ["a", "b"] * (N // 2) and ihc.labels == [None] * N
    res = scoring_study(sets["pipe"], ref, {"ihc": ihc}, cfg, class_reference=ref, seed=3)
    m = res.metrics
    assert set(m["separation_auc"]) == {"ihc"}
    for score in ("margin", "own_vs_null", "own_error"):
        auc = m["separation_auc"]["ihc"][score]
        assert (
            0 <= auc["low"] <= auc["estimate"] <= auc["high"] <= 1 and auc["n_in"] == N and auc["n_out"] == N
        )
    assert m["nfe"]["per_tile_without_pruning"] == 4 * 4  # own, null, class:a, class:b × 4 times
    assert m["prototypes"]["tiles_per_label"] == {"a": N // 2, "b": N // 2}
    assert set(res.samples) == {"reference: most anomalous", "reference: least anomalous", "ihc: most anomalous",
                                "ihc: least anomalous"}  # fmt: skip

    # the CLI on the same tiles with the same noise seed measures the same errors: with one time, the
    # study's weighted error is the CLI's unweighted one times that time's fitted weight
    single = scoring_study(
        sets["pipe"], ref, {}, ScoringStudyConfig(times={"values": [0.5]}, calibration_tiles=4), seed=3
    )
    run_score(build_config(ScoreConfig, {
        "model": str(sets["release"]), "input": str(sets["ref"]), "output": str(tmp_path / "cli1"), "noise_seed": 3,
        "times": {"values": [0.5]}, "weighting": {"mode": "uniform"}, "conditions": {"own": True, "null": True},
        "progress": False, "device": "cpu", "grid": 0,
    }))  # fmt: skip
    rows1 = {r["key"]: r for r in csv.DictReader((tmp_path / "cli1" / "scores.csv").open())}
    w1 = single.metrics["plan"]["weighting"]["weights"][0]
    got = np.asarray(single.metrics["tiles"]["reference"]["weighted_errors"]["own"]) / w1
    want = np.array([float(rows1[k]["error_own"]) for k in single.metrics["tiles"]["reference"]["keys"]])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_eval_classify_variant_report(sets, tmp_path):
    cfg = build_config(EvalConfig, {
        "study": "scoring",
        "generator": {"kind": "cytosyn", "path": str(sets["release"])},
        "references": {"reference": str(sets["ref"]), "heldout": str(sets["held"])},
        "extractors": [{"name": "vit-tiny16", "random_init": True}],
        "scoring": {"variant": "classify", "times": {"k": 3}, "calibration_tiles": 4, "own": False, "null": False,
                    "pruning": {"enabled": True, "min_t": 2, "every": 1}},
        "n": 12, "n_boot": 20, "device": "cpu", "output": str(tmp_path / "report"),
    })  # fmt: skip
    out = run_eval(cfg)
    doc = json.loads((out / "metrics.json").read_text())
    m = doc["results"][0]["metrics"]
    cls = m["classification"]
    assert cls["generative"]["n"] == 8 and cls["linear_probe"]["n"] == 8  # 11 held-out tiles: 3 are class c
    assert (
        set(m["separation_auc"]) == {"unseen labels"}
        and m["separation_auc"]["unseen labels"]["margin"]["n_out"] == 3
    )
    # the reference tiles are the prototypes' own: not scored unless asked (NFE only spent on held-out tiles)
    assert set(m["tiles"]) == {"heldout"} and set(m["nfe"]["per_set"]) == {"heldout"}
    # the discriminative baseline (1 − the probe's max class probability) is scored beside the generative ones
    msp = np.asarray(m["tiles"]["heldout"]["scores"]["probe_msp"], dtype=np.float64)
    assert msp.shape == (11,) and np.all((msp >= 0) & (msp < 1))
    assert (
        m["separation_auc"]["unseen labels"]["probe_msp"]["n_out"] == 3 and "probe_msp" in m["anomaly_scores"]
    )
    gaps = m["separation_vs_baseline"]["unseen labels"]  # each generative score minus the baseline, paired
    assert set(gaps) == {"margin"} and gaps["margin"]["estimate"] == pytest.approx(
        m["separation_auc"]["unseen labels"]["margin"]["estimate"]
        - m["separation_auc"]["unseen labels"]["probe_msp"]["estimate"]
    )
    assert (
        "balanced_accuracy/generative" in doc["aggregate"]
        and "auc/margin/unseen labels" in doc["aggregate"]
        and "auc/probe_msp/unseen labels" in doc["aggregate"]
        and "auc_minus_probe_msp/margin/unseen labels" in doc["aggregate"]
    )
    report = (out / "report.md").read_text()
    assert "Generative classification vs a linear probe" in report and "unseen labels" in report
    assert (out / "score_distributions.png").stat().st_size > 1000


def test_eval_domain_variant_reads_the_class_reference_whole(sets, tmp_path):
    """``n`` sizes the scored sets, not the class reference: its every tile makes the prototypes (the
    first 4 held-out tiles alone would leave labels b and c with fewer than ``min_tiles``)."""
    cfg = build_config(EvalConfig, {
        "study": "scoring",
        "generator": {"kind": "cytosyn", "path": str(sets["release"])},
        "references": {"reference": str(sets["ref"]), "others": {"ihc": str(sets["ihc"])}, "mpp": 0.5},
        "extractors": [{"name": "vit-tiny16", "random_init": True}],
        "scoring": {"times": {"k": 2}, "calibration_tiles": 2, "top_tiles": 0, "frechet": False,
                    "class_reference": str(sets["held"]), "min_tiles": 3},
        "n": 4, "n_boot": 10, "device": "cpu", "output": str(tmp_path / "dom"),
    })  # fmt: skip
    m = json.loads((run_eval(cfg) / "metrics.json").read_text())["results"][0]["metrics"]
    assert m["prototypes"]["tiles_per_label"] == {"a": 4, "b": 4, "c": 3}
    assert {len(t["keys"]) for t in m["tiles"].values()} == {4} and "margin" in m["separation_auc"]["ihc"]


@pytest.mark.slow
def test_eval_domain_variant_with_frechet(sets, tmp_path):
    cfg = build_config(EvalConfig, {
        "study": "scoring",
        "generator": {"kind": "cytosyn", "path": str(sets["release"]), "steps": 2, "batch_size": 8},
        "references": {"reference": str(sets["ref"]), "others": {"ihc": str(sets["ihc"])}, "mpp": 0.5},
        "extractors": [{"name": "vit-tiny16", "random_init": True}],
        "scoring": {"times": {"k": 3}, "calibration_tiles": 4, "top_tiles": 2},
        "n": N, "n_boot": 10, "kid_subset_size": 4, "kid_subsets": 2, "device": "cpu", "output": str(tmp_path / "dom"),
    })  # fmt: skip
    out = run_eval(cfg)
    report = (out / "report.md").read_text()
    assert (
        "Separation of the 'out' tiles" in report
        and "### Distances" in report
        and "reference vs ihc" not in report
    )
    doc = json.loads((out / "metrics.json").read_text())
    assert "auc/own_vs_null/ihc" in doc["aggregate"] and any(k.startswith("fd/") for k in doc["aggregate"])
    assert (out / "samples.png").is_file() and (out / "score_distributions.png").is_file()


def test_scoring_study_config_is_checked(sets):
    base = {
        "study": "scoring",
        "extractors": ["inception"],
        "generator": {"kind": "cytosyn", "path": str(sets["release"])},
    }
    with pytest.raises(ConfigError, match=r"references\.reference"):
        build_config(EvalConfig, base)
    with pytest.raises(ConfigError, match=r"references\.others"):
        build_config(EvalConfig, base | {"references": {"reference": str(sets["ref"])}})
    with pytest.raises(ConfigError, match=r"references\.heldout"):
        build_config(
            EvalConfig,
            base | {"references": {"reference": str(sets["ref"])}, "scoring": {"variant": "classify"}},
        )
    with pytest.raises(ConfigError, match="cytosyn generator"):
        build_config(
            EvalConfig,
            base
            | {
                "generator": {"kind": "folder", "path": str(sets["ihc"]), "mpp": 0.5},
                "references": {"reference": str(sets["ref"]), "others": {"x": str(sets["ihc"])}},
            },
        )
    with pytest.raises(ConfigError, match="times"):
        build_config(EvalConfig, base | {"references": {"reference": str(sets["ref"]), "others": {"x": str(sets["ihc"])}},
                                         "scoring": {"times": {"values": [1.5]}}})  # fmt: skip
    with pytest.raises(ConfigError, match="score_reference"):
        build_config(EvalConfig, base | {"references": {"reference": str(sets["ref"]), "others": {"x": str(sets["ihc"])}},
                                         "scoring": {"score_reference": False}})  # fmt: skip
    assert isinstance(Path(sets["ref"]), Path)
