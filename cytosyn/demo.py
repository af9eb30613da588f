"""``cytosyn demo``: the whole pipeline on bundled data, small enough for a laptop CPU.

1. tile the bundled real H&E slide (an Aperio crop of OpenSlide's CMU-1) and six synthetic pyramidal
   slides named like TCGA slides of three tissue source sites;
2. pack them into patient-level train / val / test splits and verify the result;
3. featurize the splits — with RANDOM-INITIALISED small models (a ViT-Tiny encoder and a tiny f8 VAE,
   the real architectures' shape but no pretrained weights: nothing downloads, nothing is meaningful);
4. train the tiny SiT-T/2 preset for a short run (held-out validation, a sample grid, checkpoints);
5. release the checkpoint (safetensors + config + model card + SHA256SUMS) and sample tiles from the release,
   conditioned on held-out tiles' embeddings;
6. evaluate the tiny model against held-out-patient tiles (overfitting study) into a report folder.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from cytosyn.config import build_config

# (slide id, tissue source site): two patients per site, one slide each.
_SYNTHETIC = [
    (f"TCGA-{tss}-{i:04d}-01Z-00-DX1", tss) for i, tss in enumerate(["A1", "A1", "B2", "B2", "C3", "C3"])
]


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


DEMO_ENCODER = {"name": "vit-tiny16", "random_init": True, "outputs": ["cls", "patch"]}
DEMO_VAE = {"name": "tiny-f8", "random_init": True}
STEPS = 6


def run_demo(output: Path, workers: int = 1, train_steps: int = 100) -> int:
    from cytosyn.data_prep.pack import run_pack, verify_dataset
    from cytosyn.data_prep.pack_config import PackConfig
    from cytosyn.data_prep.tile_config import TileConfig
    from cytosyn.data_prep.tiler import run_tiling

    output = Path(output)
    slides = output / "slides_in"
    table = _write_inputs(slides)

    print(f"[demo 1/{STEPS}] tile {len(_SYNTHETIC) + 1} slides → {output / 'tiles'}")
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

    print(f"[demo 2/{STEPS}] pack patient-level splits → {output / 'dataset'}")
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
    _featurize(output)
    run_dir = _train(output, train_steps)
    release = _release_and_sample(output, run_dir)
    report = _evaluate(output, release)
    print(f"demo done under {output}: tiles/, dataset/, features/, run/, release/, synthetic/, eval/")
    print(f"  look at: {report / 'report.html'}, {output / 'synthetic' / 'grid.png'}, {run_dir / 'samples'}")
    return 0


def _release_and_sample(output: Path, run_dir: Path) -> Path:
    from cytosyn.release import run_release
    from cytosyn.sample import SampleConfig, run_sample

    release = output / "release"
    print(
        f"[demo 5/{STEPS}] release the checkpoint → {release}, then sample from it → {output / 'synthetic'}"
    )
    if not (release / "SHA256SUMS").exists():
        run_release(run_dir, release, name="cytosyn-demo-tiny")
    cfg = build_config(
        SampleConfig,
        {
            "model": str(release),
            "output": str(output / "synthetic"),
            "split": str(output / "features" / "val"),
            "max_references": 16,
            "sampler": {"preset": "fast_euler_50", "steps": 20},
            "grid_size": 8,
            "progress": False,
        },
    )
    print(f"  {run_sample(cfg).report()}")
    return release


def _evaluate(output: Path, release: Path) -> Path:
    from cytosyn.eval.run import EvalConfig, run_eval

    print(f"[demo 6/{STEPS}] evaluate against held-out patients (random-initialised extractors: demo only)")
    cfg = build_config(
        EvalConfig,
        {
            "study": "overfitting",
            "generator": {"kind": "cytosyn", "path": str(release), "steps": 20},
            "references": {
                "heldout": str(output / "dataset" / "val"),
                "train": str(output / "dataset" / "train"),
            },
            "extractors": [
                {"name": "vit-tiny16", "random_init": True, "seed": 1},
                {"name": "dinov2-vits14", "random_init": True},
            ],
            "fidelity_extractor": "dinov2-vits14",
            # The reference tiles are stored as JPEG q95 4:4:4 (the tiler's default): compare like with like.
            "generated_codec": {"jpeg": 95, "subsampling": "4:4:4"},
            "n": 16,
            "n_boot": 20,
            "kid_subset_size": 8,
            "kid_subsets": 10,
            "output": str(output / "eval"),
        },
    )
    report = run_eval(cfg)
    print(f"  report: {report / 'report.html'} (and report.md)")
    return report


def _featurize(output: Path) -> None:
    from cytosyn.data_prep.featurize import run_featurize
    from cytosyn.data_prep.featurize_config import FeaturizeConfig

    print(
        f"[demo 3/{STEPS}] featurize with RANDOM-INITIALISED small models (demo only) → {output / 'features'}"
    )
    for split in ("train", "val", "test"):
        cfg = build_config(
            FeaturizeConfig,
            {
                "input": str(output / "dataset" / split),
                "output": str(output / "features" / split),
                "encoders": [DEMO_ENCODER],
                "vae": DEMO_VAE,
                "batch_size": 32,
            },
        )
        print(f"  {split}: {run_featurize(cfg).report()}")


def _train(output: Path, steps: int) -> Path:
    from cytosyn.config import load_config
    from cytosyn.training.config import TrainConfig
    from cytosyn.training.run import run_training

    run_dir = output / "run"
    print(f"[demo 4/{STEPS}] train SiT-T/2 for {steps} steps on CPU → {run_dir}")
    preset = Path(str(resources.files("cytosyn.configs") / "train_tiny.yaml"))
    cfg = load_config(
        TrainConfig,
        preset,
        [
            f"run_dir={run_dir}",
            f"data.train={output / 'features' / 'train'}",
            f"data.val={output / 'features' / 'val'}",
            f"trainer.max_steps={steps}",
            f"validation.every_n_steps={steps}",
            f"validation.sample_grid_every_n_steps={steps}",
        ],
    )
    result = run_training(cfg)
    v = result.validation
    print(
        f"  {result.status} at step {result.global_step}: held-out loss {v.get('val/loss', float('nan')):.3f}, "
        f"training-patient loss {v.get('train_ref/loss', float('nan')):.3f}, overfitting gap {v.get('overfit_gap', float('nan')):+.3f}"
    )
    return run_dir
