"""The README's main command, ``cytosyn demo``, end to end on the bundled slide and tiles (slow tier).

A plumbing run (a few training steps): every stage — tile, ingest, pack + verify, featurize, train,
release, sample, evaluate — must run and leave its outputs; the numbers of so short a run mean nothing.
"""

from __future__ import annotations

import json

import pytest

from cytosyn.demo import run_demo
from cytosyn.pipeline import verify_release


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert run_demo(out, workers=1, train_steps=4) == 0
    assert (out / "grids" / "demo_grid.png").stat().st_size > 10_000
    report = out / "eval" / "report.md"
    assert report.is_file() and "FID" in report.read_text()
    release = next(p.parent for p in out.rglob("SHA256SUMS") if (p.parent / "model_index.json").is_file())
    verify_release(release)  # every file of the release matches its checksum
    assert json.loads((out / "dataset" / "pack_summary.json").read_text())["splits"]
