"""``cytosyn demo``: the whole pipeline on bundled data, small enough for a laptop CPU.

1. tile the bundled real H&E slide (an Aperio crop of OpenSlide's CMU-1) and six synthetic pyramidal
   slides named like TCGA slides of three tissue source sites;
2. pack them into patient-level train / val / test splits and verify the result.

Each later stage (featurize, train, sample, eval) extends this.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from cytosyn.config import build_config

# (slide id, tissue source site): two patients per site, one slide each.
_SYNTHETIC = [(f"TCGA-{tss}-{i:04d}-01Z-00-DX1", tss) for i, tss in enumerate(["A1", "A1", "B2", "B2", "C3", "C3"])]


def bundled_slide() -> Path:
    """Path of the real fixture slide shipped inside the package."""
    return Path(str(resources.files("cytosyn") / "assets" / "cmu_small_region.svs"))


def _write_inputs(slides: Path) -> Path:
    """Copy the real slide, write the synthetic ones (once), and a slide table naming the cohort."""
    from cytosyn.data_prep.synthetic import write_synthetic_slide

    slides.mkdir(parents=True, exist_ok=True)
    real = slides / "cmu_small_region.svs"
    if not real.exists():
        shutil.copyfile(bundled_slide(), real)
    for seed, (slide_id, _) in enumerate(_SYNTHETIC):
        path = slides / f"{slide_id}.tiff"
        if not path.exists():
            write_synthetic_slide(path, width=3072, height=2048, mpp=0.5, seed=seed)
    table = slides.parent / "slide_table.csv"
    rows = ["slide_id,patient_id,site,cohort", "cmu_small_region,CMU-1,CMU,SKIN"]
    rows += [f"{sid},{sid[:12]},{tss},DEMO" for sid, tss in _SYNTHETIC]
    table.write_text("\n".join(rows) + "\n")
    return table


def run_demo(output: Path, workers: int = 1) -> int:
    from cytosyn.data_prep.pack import run_pack, verify_dataset
    from cytosyn.data_prep.pack_config import PackConfig
    from cytosyn.data_prep.tile_config import TileConfig
    from cytosyn.data_prep.tiler import run_tiling

    output = Path(output)
    slides = output / "slides_in"
    table = _write_inputs(slides)

    print(f"[demo 1/2] tile {len(_SYNTHETIC) + 1} slides → {output / 'tiles'}")
    tile_cfg = build_config(
        TileConfig,
        {
            "output": str(output / "tiles"),
            "slides": {"input": [str(slides)], "slide_table": str(table)},
            "run": {"workers": workers},
        },
    )
    tiled = run_tiling(tile_cfg)
    print(tiled.report())
    if tiled.failed:
        return 3

    print(f"[demo 2/2] pack patient-level splits → {output / 'dataset'}")
    pack_cfg = build_config(
        PackConfig,
        {
            "output": str(output / "dataset"),
            "inputs": {"tiles": [str(output / "tiles")], "slide_table": str(table)},
            "split": {"ratios": {"train": 0.6, "val": 0.2, "test": 0.2}},
            "shards": {"samples_per_shard": 64},
        },
    )
    print(run_pack(pack_cfg).report())
    verified = verify_dataset(output / "dataset")
    print(verified.report())
    if not verified.ok:
        return 1
    print(f"demo done: tiles under {output / 'tiles'}, dataset under {output / 'dataset'}")
    return 0
