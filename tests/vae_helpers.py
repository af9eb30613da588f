"""Shared by the VAE-tuning tests: the real CRC tiles shipped with cytosyn, packed into splits."""

from __future__ import annotations

from pathlib import Path

from cytosyn.config import build_config


def packed_crc_tiles(root: Path) -> Path:
    """The shipped CRC tiles (224 px at 0.5 µm/px) ingested and packed into train / val by patient
    (33 / 8 tiles); returns the dataset folder."""
    from cytosyn.data_prep.ingest import run_ingest
    from cytosyn.data_prep.ingest_config import IngestConfig
    from cytosyn.data_prep.pack import run_pack
    from cytosyn.data_prep.pack_config import PackConfig

    from cytosyn.demo import bundled_crc_tiles

    crc = bundled_crc_tiles()
    ingest = {
        "output": str(root / "tiles"),
        "inputs": {"csv": [str(crc / "manifest.csv")]},
        "identity": {"rule": "per_tile", "site": "CRC", "project": "CRC"},
        "grid": {"mismatch": "skip"},
    }
    run_ingest(build_config(IngestConfig, ingest))
    pack = {
        "output": str(root / "dataset"),
        "inputs": {"tiles": [str(root / "tiles")]},
        "split": {"ratios": {"train": 0.8, "val": 0.2}, "stratify": "none"},
        "shards": {"samples_per_shard": 64},
        "run": {"progress": False},
    }
    run_pack(build_config(PackConfig, pack))
    return root / "dataset"


def tune_config(dataset: Path, run_dir: Path, **sections) -> dict:
    """A small ``tune-vae`` config (plain data) on :func:`packed_crc_tiles`: random tiny-f8, 32-px crops,
    no LPIPS, GAN from step 1, a tiny discriminator; ``sections`` update it (dicts are merged one level)."""
    base = {
        "run_dir": str(run_dir),
        "max_steps": 4,
        "checkpoint_every": 2,
        "log_every": 1,
        "vae": {"name": "tiny-f8", "random_init": True},
        "data": {
            "train": str(dataset / "train"),
            "heldout": str(dataset / "val"),
            "heldout_tiles": 2,
            "batch_size": 4,
            "crop": 32,
            "num_workers": 0,
            "shuffle_buffer": 16,
        },
        "losses": {"lpips_weights": "off", "gan_start": 1, "disc_width": 8, "disc_layers": 2},
        "optim": {"lr": 2e-3, "disc_lr": 1e-3},
    }
    for key, value in sections.items():
        base[key] = base[key] | value if isinstance(value, dict) and key in base else value
    return base
