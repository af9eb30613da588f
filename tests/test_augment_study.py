"""The augmentation study: protocol refusals and reproducible numbers, on labelled splits written here.

Tiles of two classes differ by colour (plus noise), so a classifier can learn them; real train tiles come
from patients P0–P2, test tiles from P3, synthetic tiles are marked generated with the adapter provenance
``cytosyn sample`` records.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from cytosyn.eval.run import EvalConfig, run_eval
from cytosyn.eval.studies.augment import ProtocolError
from PIL import Image

from cytosyn.config import build_config
from cytosyn.manifest import SplitManifest, write_manifest
from cytosyn.shardio import ShardWriter

COLOURS = {"red": (200, 60, 80), "blue": (70, 80, 200)}


def tile(label: str, index: int) -> bytes:
    rng = np.random.default_rng(index)
    base = np.array(COLOURS[label], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-50, 50, size=(32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_set(folder: Path, rows: list[dict], split: str, generated: bool = False) -> Path:
    writer = ShardWriter(folder, lambda i: f"{split}-{i:06d}.tar", max_samples=64)
    for i, row in enumerate(rows):
        meta = {"mpp": 0.5, "tile_px": 32, **row}
        writer.write(
            {
                "__key__": f"{split}_{i:04d}",
                "png": tile(row["label"], hash((split, i)) % 10_000),
                "json": json.dumps(meta).encode(),
            }
        )
    shards = writer.close()
    write_manifest(
        SplitManifest(
            split=split, image_member="png", samples=len(rows), shards=[s.as_dict() for s in shards],
            patients=sorted({r["patient_id"] for r in rows if r.get("patient_id")}),
            slides=sorted({r["slide_id"] for r in rows if r.get("slide_id")}),
            stats={"generated": generated},
        ),
        folder,
    )  # fmt: skip
    return folder


def real_rows(patients: list[str], per: int) -> list[dict]:
    return [
        {"label": label, "patient_id": p, "slide_id": f"{p}-S"}
        for p in patients
        for label in COLOURS
        for _ in range(per)
    ]


def synthetic_rows(per_class: int, patients: list[str] | None) -> list[dict]:
    few = {"patients": patients, "slides": [f"{p}-S" for p in patients]} if patients is not None else None
    return [
        {"label": label, "generated": True, **({"adapter": {"few_shot": few}} if few else {})}
        for label in COLOURS
        for _ in range(per_class)
    ]


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("augment")
    return {
        "train": write_set(root / "train", real_rows(["P0", "P1"], 2), "train"),
        "test": write_set(root / "test", real_rows(["P3"], 6), "test"),
        "synthetic": write_set(root / "synthetic", synthetic_rows(8, ["P0"]), "synthetic", generated=True),
        "root": root,
    }


def eval_cfg(sets, output: Path, **augment) -> EvalConfig:
    data = {
        "study": "augment",
        "extractors": [{"name": "vit-tiny16", "random_init": True}],
        "seeds": [0, 1],
        "output": str(output),
        "device": "cpu",
        "augment": {
            "train": str(sets["train"]), "test": str(sets["test"]), "synthetic": str(sets["synthetic"]),
            "n_synthetic": [0, 4, 8], "cnn": {"epochs": 1, "image_size": 16, "batch_size": 8, "arch": "resnet10t"},
        } | augment,
    }  # fmt: skip
    return build_config(EvalConfig, data)


def test_augment_study_reproduces_its_numbers_and_reports_the_real_only_baseline(sets, tmp_path):
    out_a = run_eval(eval_cfg(sets, tmp_path / "a"))
    out_b = run_eval(eval_cfg(sets, tmp_path / "b"))
    a = json.loads((out_a / "metrics.json").read_text())
    b = json.loads((out_b / "metrics.json").read_text())
    assert a["aggregate"] == b["aggregate"] and a["results"][0]["metrics"] == b["results"][0]["metrics"]
    scores = a["results"][0]["metrics"]["scores"]
    assert set(scores) == {"linear_probe", "cnn"} and set(scores["cnn"]) == {"0", "4", "8"}
    assert (
        scores["linear_probe"]["0"]["train_synthetic"] == 0
        and scores["linear_probe"]["8"]["train_synthetic"] == 16
    )
    assert scores["linear_probe"]["0"]["balanced_accuracy"] > 0.9  # colour classes: the probe learns them
    agg = a["results"][0]["metrics"]["aggregate"]["linear_probe"]["4"]["gain_balanced_accuracy"]
    assert agg["low"] <= agg["estimate"] <= agg["high"]
    report = (out_a / "report.md").read_text()
    assert "0 (real only)" in report and (out_a / "augment_gain.png").stat().st_size > 1000
    other_seed = run_eval(eval_cfg(sets, tmp_path / "c").model_copy(update={"seeds": [5]}))
    c = json.loads((other_seed / "metrics.json").read_text())
    assert c["results"][0]["metrics"]["scores"]["cnn"] != scores["cnn"]  # the seed matters


def test_augment_study_refuses_leaking_or_synthetic_test_sets(sets, tmp_path):
    root = sets["root"]
    leaky_test = write_set(root / "leaky_test", real_rows(["P1", "P3"], 1), "leaky")
    with pytest.raises(ProtocolError, match="share"):
        run_eval(eval_cfg(sets, tmp_path / "x", test=str(leaky_test)))
    fake_test = write_set(root / "fake_test", synthetic_rows(2, ["P0"]), "fake", generated=True)
    with pytest.raises(ProtocolError, match="real only"):
        run_eval(eval_cfg(sets, tmp_path / "y", test=str(fake_test)))
    from_test = write_set(root / "from_test", synthetic_rows(2, ["P3"]), "from_test", generated=True)
    with pytest.raises(ProtocolError, match="fine-tuned on test"):
        run_eval(eval_cfg(sets, tmp_path / "z", synthetic=str(from_test)))
    unknown = write_set(root / "unknown", synthetic_rows(2, None), "unknown", generated=True)
    with pytest.raises(ProtocolError, match="does not record"):
        run_eval(eval_cfg(sets, tmp_path / "w", synthetic=str(unknown)))
    out = run_eval(
        eval_cfg(
            sets,
            tmp_path / "v",
            synthetic=str(unknown),
            allow_unverified_synthetic=True,
            classifiers=["linear_probe"],
            n_synthetic=[0, 2],
        )
    )
    assert "allow_unverified_synthetic" in (out / "report.md").read_text()


def test_augment_config_is_checked_before_work(sets, tmp_path):
    with pytest.raises(ValueError, match=r"augment\.train"):
        build_config(EvalConfig, {"study": "augment", "extractors": ["vit-tiny16"], "augment": {"test": "x"}})
    with pytest.raises(ValueError, match="needs a generator"):
        build_config(EvalConfig, {"study": "domain", "extractors": ["vit-tiny16"]})
