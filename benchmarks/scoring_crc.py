"""A measured experiment: generative scores of a SiT trained by cytosyn on CPU on real colorectal tissue.

Data: the 65 labelled CRC tiles shipped with cytosyn (``cytosyn/assets/crc_tiles``: Kather 2016,
CRC-VAL-HE-7K, NCT-CRC-HE-100K; CC BY 4.0). Kather 2016's labels are mapped onto the 9-class scheme of
the other two (TUMOR→TUM, STROMA→STR, LYMPHO→LYM, DEBRIS→DEB, MUCOSA→NORM, ADIPOSE→ADI, EMPTY→BACK;
COMPLEX has no counterpart and is left out, counted). One class (``--holdout``, LYM by default) is held
out of training entirely. Of every other class, the first ~60% of its tiles (sorted by file name) are
training tiles, the rest test tiles; the training tiles are augmented with their 8 dihedral copies
(exact for H&E), the test tiles are not.

Tiles are centre-cropped to 128 px (64 µm at 0.5 µm/px) before ingest. Steps, each through cytosyn's
own verbs: ``ingest`` (128 px at 0.5 mpp) →
``pack`` → ``featurize`` (TAEF2 latents, FID Inception-v3 conditioning embeddings + 8×8 patch tokens for
REPA) → ``train`` (a small SiT: patch 2, ``--depth`` blocks of width ``--hidden``, on CPU) → ``release``
→ ``eval`` study ``scoring``
(variant ``classify``: generative classification of the test tiles of known classes with class
prototypes from the training split, against a linear probe on the same Inception embeddings; anomaly
AUC of the held-out class against the test tiles of known classes), once per noise seed; then variant
``domain``: the CRC test tiles (in-domain) against tiles of the bundled skin slide (``cmu_small_region``,
tiled by ``cytosyn tile`` at the same 128 px / 0.5 mpp: another organ, another scanner, a real domain
shift); ``--domain-frechet`` adds the domain study's Fréchet numbers beside the scores (off by default:
on one CPU core its interval replicates take ~30 s each, and an FD from ~30 tiles in 2048 dimensions is
rank-deficient — the report says so; a GPU machine and hundreds of tiles make it meaningful).

Every step is resumable (rerun the same command). Reports: ``<out>/eval/report.md`` (classify) and
``<out>/eval_domain/report.md`` (domain).

    python benchmarks/scoring_crc.py --out scoring_crc [--steps 2000] [--depth 6] [--hidden 256] [--holdout LYM]
                                     [--times 20] [--seeds 0 1 2] [--domain-frechet]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from PIL import Image

from cytosyn.demo import KATHER2016_TO_NCT

TILE_PX = 128
DIHEDRAL = [
    ("r0", []),
    ("r90", [Image.Transpose.ROTATE_90]),
    ("r180", [Image.Transpose.ROTATE_180]),
    ("r270", [Image.Transpose.ROTATE_270]),
    ("f", [Image.Transpose.FLIP_LEFT_RIGHT]),
    ("f90", [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_90]),
    ("f180", [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180]),
    ("f270", [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_270]),
]


def cytosyn(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "cytosyn"), *args]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def evaluate(cfg: Path, output: Path) -> None:
    """`cytosyn eval`, skipped when ``output`` holds a finished report of the same config file (a rerun
    of this script then only does what is left)."""
    done = output / "benchmark_input.yaml"
    if (output / "metrics.json").is_file() and done.is_file() and done.read_text() == cfg.read_text():
        print(f"$ cytosyn eval --config {cfg}: already done ({output / 'report.md'})", flush=True)
        return
    cytosyn("eval", "--config", str(cfg))
    shutil.copyfile(cfg, done)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def crc_folder() -> Path:
    import cytosyn

    return Path(cytosyn.__file__).parent / "assets" / "crc_tiles"


def prepare_folders(out: Path, holdout: str) -> dict:
    """raw/train/<label>/ (8 dihedral copies each) and raw/test/<label>/ (originals): the split is by tile
    (each tile is its own patient in these public sets: stated in ingest with identity.rule=per_tile)."""
    src = crc_folder()
    rows = list(csv.DictReader((src / "manifest.csv").open()))
    by_label: dict[str, list[dict]] = {}
    skipped = []
    for r in rows:
        label = KATHER2016_TO_NCT.get(r["label"], r["label"]) if r["subset"] == "kather2016" else r["label"]
        if r["subset"] == "kather2016" and r["label"] not in KATHER2016_TO_NCT:
            skipped.append(r["path"])
            continue
        by_label.setdefault(label, []).append(r)
    raw = out / "raw"
    if raw.exists():
        shutil.rmtree(raw)
    plan: dict[str, dict[str, int]] = {}
    for label, items in sorted(by_label.items()):
        items = sorted(items, key=lambda r: r["path"])
        n_train = 0 if label == holdout else max(1, round(0.6 * len(items)))
        plan[label] = {"train": n_train, "test": len(items) - n_train}
        for i, r in enumerate(items):
            stem = Path(r["path"]).stem.replace(".", "_")
            image = Image.open(src / r["path"]).convert("RGB")
            w, h = image.size  # the central 128 px (64 µm at 0.5 µm/px; Kather 2016's 0.495 is within 1%)
            image = image.crop(
                ((w - TILE_PX) // 2, (h - TILE_PX) // 2, (w + TILE_PX) // 2, (h + TILE_PX) // 2)
            )
            if i < n_train:
                folder = raw / "train" / label
                folder.mkdir(parents=True, exist_ok=True)
                for name, ops in DIHEDRAL:
                    im = image
                    for op in ops:
                        im = im.transpose(op)
                    im.save(folder / f"{stem}_{name}.png")
            else:
                folder = raw / "test" / label
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{stem}.png")
    return {"plan": plan, "skipped": skipped}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("scoring_crc"))
    parser.add_argument("--holdout", default="LYM")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--times", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument(
        "--domain-frechet", action="store_true",
        help="also the domain study's Fréchet numbers (generates tiles; each FD interval replicate costs 2048-d "
        "matrix square roots, ~30 s on one CPU core, and FD from ~30 tiles in 2048 dimensions is rank-deficient)",
    )  # fmt: skip
    parser.add_argument("--domain-tiles", type=int, default=64, help="tiles per set in the domain variant")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    split = prepare_folders(out, args.holdout)
    print(json.dumps(split, indent=1))
    for part in ("train", "test"):
        cfg = write_yaml(out / f"ingest_{part}.yaml", {
            "output": str(out / "tiles" / part),
            "inputs": {"folders": [str(out / "raw" / part)]},
            "identity": {"rule": "per_tile", "site": "kather", "project": "crc"},
            "grid": {"tile_px": TILE_PX, "mpp": 0.5, "source_mpp": 0.5, "mismatch": "refuse"},
        })  # fmt: skip
        cytosyn("ingest", "--config", str(cfg))
        cfg = write_yaml(out / f"pack_{part}.yaml", {
            "output": str(out / "dataset" / part),
            "inputs": {"tiles": [str(out / "tiles" / part)]},
            "split": {"ratios": {part: 1.0}, "stratify": "none"},
        })  # fmt: skip
        cytosyn("pack", "--config", str(cfg))
        cfg = write_yaml(out / f"featurize_{part}.yaml", {
            "input": str(out / "dataset" / part / part),
            "output": str(out / "features" / part),
            "encoders": [{"name": "fid-inception-v3", "outputs": ["cls", "patch"]}],
            "vae": {"name": "taef2"},
            "decode_check": 4,
        })  # fmt: skip
        cytosyn("featurize", "--config", str(cfg))
    cfg = write_yaml(out / "train.yaml", {
        "run_dir": str(out / "run"),
        "data": {"train": str(out / "features" / "train"), "val": str(out / "features" / "test"),
                 "condition": "fid-inception-v3", "repa_target": "fid-inception-v3_patch",
                 "batch_size": args.batch, "num_workers": 0, "shuffle_buffer": 512, "mode": "resampled"},
        "model": {"preset": "SiT-S/2", "overrides": {"depth": args.depth, "hidden_size": args.hidden,
                  "num_heads": args.hidden // 64, "repa_depth": 2, "repa_hidden": 512}},
        "diffusion": {"time_sampling": "logit_normal", "sample_posterior": False},
        "repa": {"weight": 0.5},
        "optim": {"lr": 3e-4, "warmup_steps": 100},
        "ema": {"decay": 0.999},
        "trainer": {"max_steps": args.steps, "accelerator": "cpu", "log_every_n_steps": 50,
                    "checkpoint_every_n_steps": 500},
        "validation": {"every_n_steps": 500, "max_batches": 4},
        "logging": {"wandb": "disabled"},
    })  # fmt: skip
    cytosyn("train", "--config", str(cfg))
    release = out / "release"
    if not (release / "SHA256SUMS").is_file():
        cytosyn("release", f"checkpoint={out / 'run'}", f"output={release}")
    cfg = write_yaml(out / "eval.yaml", {
        "study": "scoring",
        "generator": {"kind": "cytosyn", "path": str(release)},
        "references": {"reference": str(out / "features" / "train"), "heldout": str(out / "features" / "test")},
        "extractors": ["fid-inception"],
        "scoring": {"variant": "classify", "times": {"k": args.times}, "calibration_tiles": 64, "min_tiles": 4,
                    "pruning": {"enabled": False}},
        "n": 100000,
        "seeds": args.seeds,
        "n_boot": args.n_boot,
        "device": "cpu",
        "output": str(out / "eval"),
    })  # fmt: skip
    evaluate(cfg, out / "eval")

    from cytosyn.demo import bundled_slide

    cytosyn("tile", "--input", str(bundled_slide()), "--output", str(out / "skin_tiles"),
            f"grid.tile_px={TILE_PX}", "grid.mpp=0.5", "codec.format=png")  # fmt: skip
    cfg = write_yaml(out / "pack_skin.yaml", {
        "output": str(out / "dataset" / "skin"),
        "split": {"ratios": {"skin": 1.0}, "stratify": "none"},
        "inputs": {"tiles": [str(out / "skin_tiles")], "allow_slide_patients": True},  # one slide, one patient
    })  # fmt: skip
    cytosyn("pack", "--config", str(cfg))
    cfg = write_yaml(out / "eval_domain.yaml", {
        "study": "scoring",
        "generator": {"kind": "cytosyn", "path": str(release), "steps": 30},
        "references": {"reference": str(out / "features" / "test"), "others": {"skin": str(out / "dataset" / "skin" / "skin")}},
        "extractors": ["fid-inception"],
        "scoring": {"variant": "domain", "times": {"k": args.times}, "calibration_tiles": 64, "min_tiles": 4,
                    "class_reference": str(out / "features" / "train"), "frechet": args.domain_frechet},
        "n": args.domain_tiles,
        "seeds": args.seeds,
        "n_boot": args.n_boot if not args.domain_frechet else 100,
        "kid_subset_size": 10,
        "kid_subsets": 20,
        "device": "cpu",
        "output": str(out / "eval_domain"),
    })  # fmt: skip
    evaluate(cfg, out / "eval_domain")
    print(f"total {time.perf_counter() - t_start:.0f} s; report {out / 'eval' / 'report.md'}")


if __name__ == "__main__":
    main()
