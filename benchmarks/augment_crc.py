"""Few-shot adaptation on the real labelled CRC tiles, end to end on CPU, and the augmentation study's table.

    python benchmarks/augment_crc.py --output augment_crc [--shots 4] [--base-steps 1500] [--ft-steps 300]
        [--per-class 0 8 32 96] [--seeds 0 1 2]

Data: the 65 real CRC tiles shipped with cytosyn (Kather et al. 2016 / 2019, CC BY 4.0). Patients are not
known for these public tiles, so the split is **by cohort** — three disjoint patient groups:
the test split is CRC-VAL-HE-7K (DACHS study, 8 classes × 4 tiles); the training pool is NCT-CRC-HE-100K
(1 tile per class) + Kather 2016 (3 per class; its classes mapped to the NCT names, "COMPLEX" left out,
150 px tiles stretched to 224 px — their effective mpp is recorded). Steps:

1. ``cytosyn ingest`` (CSV with the mapped labels, one patient per cohort) → splits by cohort →
   ``cytosyn featurize`` with the pretrained TAEF2 autoencoder and the FID Inception-v3 encoder;
2. a base SiT-T/2 trained on the training pool (``cytosyn train``) and released;
3. ``cytosyn finetune``: LoRA + class labels, ``--shots`` tiles per class (classes with fewer: all);
4. ``cytosyn sample mode=labelled``: max(``--per-class``) tiles per class;
5. ``cytosyn eval`` study ``augment``: linear probe on FID-Inception features and a timm CNN, real-only
   baseline (N = 0) and each N, balanced accuracy and macro-F1 with bootstrap CIs over seeds.

The baseline of every ratio is the real-only classifier trained in the same run (N = 0).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from importlib import resources
from pathlib import Path

from cytosyn.demo import KATHER2016_TO_NCT


def _csv(assets: Path, cohorts: list[str], out: Path) -> Path:
    rows = []
    for cohort in cohorts:
        for path in sorted((assets / cohort).glob("*/*")):
            label = path.parent.name
            label = KATHER2016_TO_NCT.get(label) if cohort == "kather2016" else label
            if label is None:
                continue
            mpp = 0.495 if cohort == "kather2016" else 0.5
            rows.append([str(path), label, f"cohort-{cohort}", f"cohort-{cohort}", cohort, mpp])
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "slide_id", "site", "mpp"])
        w.writerows(rows)
    return out


def _split_from_ingest(ingested: Path, split: Path, name: str) -> Path:
    """Every ingested tile into one split folder with its manifest (the split is the cohort itself)."""
    from cytosyn.manifest import SplitManifest, write_manifest
    from cytosyn.shardio import ShardWriter, iter_shard_samples

    writer = ShardWriter(split, lambda i: f"{name}-{i:06d}.tar", max_samples=10_000)
    patients, slides, labels, image = set(), set(), {}, None
    for shard in sorted(ingested.rglob("*.tar")):
        for (key, members), _ in iter_shard_samples(shard):
            m = dict(members)
            meta = json.loads(m["json"])
            patients.add(meta["patient_id"])
            slides.add(meta["slide_id"])
            labels[meta["label"]] = labels.get(meta["label"], 0) + 1
            image = next(e for e in ("png", "jpg", "webp") if e in m)
            writer.write({"__key__": key, **m})
    shards = writer.close()
    write_manifest(
        SplitManifest(
            split=name, image_member=image, samples=sum(s.count for s in shards),
            shards=[s.as_dict() for s in shards], patients=sorted(patients), slides=sorted(slides),
            stats={"tiles_per_label": labels},
        ),
        split,
    )  # fmt: skip
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("augment_crc"))
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--ft-steps", type=int, default=300)
    parser.add_argument("--per-class", type=int, nargs="+", default=[0, 8, 32, 96])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sample-steps", type=int, default=30)
    args = parser.parse_args()

    from cytosyn.data_prep.featurize import run_featurize
    from cytosyn.data_prep.featurize_config import FeaturizeConfig
    from cytosyn.data_prep.ingest import run_ingest
    from cytosyn.data_prep.ingest_config import IngestConfig
    from cytosyn.eval.run import EvalConfig, run_eval

    from cytosyn.config import build_config
    from cytosyn.models.inception import fid_helper_weights
    from cytosyn.release import run_release
    from cytosyn.sample import SampleConfig, run_sample
    from cytosyn.training.config import TrainConfig
    from cytosyn.training.finetune import FinetuneConfig, run_finetune
    from cytosyn.training.run import run_training

    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    assets = Path(str(resources.files("cytosyn") / "assets" / "crc_tiles"))
    timings: dict[str, float] = {}
    splits = {}
    t0 = time.perf_counter()
    for name, cohorts in (("train", ["nct_crc_he_100k", "kather2016"]), ("test", ["crc_val_he_7k_png"])):
        table = _csv(assets, cohorts, out / f"{name}.csv")
        run_ingest(build_config(IngestConfig, {
            "output": str(out / "ingested" / name), "inputs": {"csv": [str(table)]},
            "grid": {"tile_px": 224, "mpp": 0.5, "mismatch": "stretch"},
        }))  # fmt: skip
        _split_from_ingest(out / "ingested" / name, out / "dataset" / name, name)
        run_featurize(build_config(FeaturizeConfig, {
            "input": str(out / "dataset" / name), "output": str(out / "features" / name),
            "encoders": [{"name": "fid-inception-v3", "outputs": ["cls"]}],
            "vae": {"name": "taef2"}, "decode_check": 0, "progress": False,
        }))  # fmt: skip
        splits[name] = out / "features" / name
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_training(build_config(TrainConfig, {
        "run_dir": str(out / "base_run"),
        "data": {"train": str(splits["train"]), "condition": "fid-inception-v3", "repa_target": None,
                 "batch_size": 8, "num_workers": 0, "shuffle_buffer": 32},
        "model": {"preset": "SiT-T/2"}, "repa": {"weight": 0.0},
        "diffusion": {"sample_posterior": False},
        "optim": {"lr": 3e-4, "warmup_steps": 50}, "ema": {"decay": 0.995},
        "trainer": {"max_steps": args.base_steps, "accelerator": "cpu", "log_every_n_steps": 50,
                    "checkpoint_every_n_steps": 500},
        "validation": {"every_n_steps": 0}, "logging": {"wandb": "disabled"},
    }))  # fmt: skip
    run_release(out / "base_run", out / "base_release", overwrite=True)
    timings["base_train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ft = run_finetune(build_config(FinetuneConfig, {
        "base": str(out / "base_release"), "run_dir": str(out / "finetune"),
        "data": {"train": str(splits["train"]), "exclude": [str(splits["test"])], "batch_size": 8},
        "few_shot": {"shots_per_class": args.shots, "seed": 0, "too_few": "warn"},
        "optim": {"lr": 1e-3, "warmup_steps": 20},
        "trainer": {"max_steps": args.ft_steps, "accelerator": "cpu", "log_every_n_steps": 20,
                    "checkpoint_every_n_steps": 100},
    }))  # fmt: skip
    timings["finetune_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_max = max(args.per_class)
    if n_max:
        run_sample(build_config(SampleConfig, {
            "model": str(out / "base_release"), "adapter": str(ft.adapter), "mode": "labelled",
            "per_class": n_max, "output": str(out / "synthetic"), "device": "cpu", "batch_size": 32,
            "sampler": {"preset": "fast_heun_30", "steps": args.sample_steps, "guidance_scale": 2.0},
            "grid_size": 32,
        }))  # fmt: skip
    timings["sample_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report = run_eval(build_config(EvalConfig, {
        "study": "augment", "extractors": [{"name": "fid-inception", "weights": str(fid_helper_weights())}],
        "seeds": args.seeds,
        "output": str(out / "eval"), "device": "cpu",
        "augment": {
            "train": str(out / "finetune" / "few_shot"), "test": str(splits["test"]),
            "synthetic": str(out / "synthetic") if n_max else None, "n_synthetic": args.per_class,
            "cnn": {"arch": "resnet10t", "image_size": 64, "epochs": 30, "batch_size": 32},
        },
    }))  # fmt: skip
    timings["eval_s"] = time.perf_counter() - t0
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    print((report / "report.md").read_text())
    print(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
