"""``cytosyn demo``: the whole pipeline on bundled data, small enough for a laptop CPU.

So far: tile the bundled real H&E slide (an Aperio crop of OpenSlide's CMU-1) and a synthetic pyramidal
slide written on the spot. Each later stage (pack, featurize, train, sample, eval) extends this.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from cytosyn.config import build_config


def bundled_slide() -> Path:
    """Path of the real fixture slide shipped inside the package."""
    return Path(str(resources.files("cytosyn") / "assets" / "cmu_small_region.svs"))


def run_demo(output: Path, workers: int = 1) -> int:
    from cytosyn.data_prep.synthetic import write_synthetic_slide
    from cytosyn.data_prep.tile_config import TileConfig
    from cytosyn.data_prep.tiler import run_tiling

    output = Path(output)
    slides = output / "slides_in"
    slides.mkdir(parents=True, exist_ok=True)
    real = slides / "cmu_small_region.svs"
    if not real.exists():
        shutil.copyfile(bundled_slide(), real)
    synthetic = slides / "synthetic_0p25mpp.tiff"
    if not synthetic.exists():
        write_synthetic_slide(synthetic, width=4096, height=3072, mpp=0.25, vendor="generic", seed=1)

    print(f"[demo 1/1] tiling {real.name} and {synthetic.name} → {output / 'tiles'}")
    cfg = build_config(
        TileConfig,
        {
            "output": str(output / "tiles"),
            "slides": {"input": [str(slides)]},
            "run": {"workers": workers},
        },
    )
    summary = run_tiling(cfg)
    print(summary.report())
    if summary.failed:
        return 3
    print(f"demo done: tiles and overviews under {output / 'tiles' / 'slides'}")
    return 0
