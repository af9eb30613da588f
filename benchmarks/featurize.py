"""Featurize throughput with the real architectures (random weights), and where the time goes.

Measured in one run on N real 224 px JPEG tiles from the bundled fixture slide:

* decode  — JPEG → uint8 arrays (the I/O-side cost featurize adds to the networks);
* encoder — H0-mini (ViT-B/14 + registers, 86M) CLS + patch tokens;
* vae     — SD-VAE (ft-ema architecture, 84M) posterior moments;
* end-to-end — ``run_featurize`` over a split of the same tiles (read, decode, both networks, npy
  encoding, shard writing, hashing).

    python benchmarks/featurize.py [--tiles 16] [--batch 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cytosyn.compat import import_torchvision

import_torchvision()

from cytosyn.data_prep.featurize import run_featurize  # noqa: E402
from cytosyn.data_prep.featurize_config import FeaturizeConfig  # noqa: E402
from cytosyn.data_prep.tile_config import TileConfig  # noqa: E402
from cytosyn.data_prep.tiler import run_tiling  # noqa: E402

from cytosyn.config import build_config  # noqa: E402
from cytosyn.demo import bundled_slide  # noqa: E402
from cytosyn.manifest import SplitManifest, write_manifest  # noqa: E402
from cytosyn.models.encoders import load_encoder  # noqa: E402
from cytosyn.models.vae import load_vae  # noqa: E402
from cytosyn.shardio import ShardWriter, iter_shard_samples  # noqa: E402


def _tiles(work: Path, n: int) -> list[tuple[str, dict[str, bytes]]]:
    cfg = build_config(
        TileConfig,
        {
            "output": str(work / "tiles"),
            "slides": {"input": [str(bundled_slide())]},
            "run": {"progress": False},
        },
    )
    run_tiling(cfg)
    samples = []
    for shard in sorted((work / "tiles" / "slides" / "cmu_small_region").glob("*.tar")):
        for (key, members), _ in iter_shard_samples(shard):
            samples.append((key, dict(members)))
    return (samples * (n // len(samples) + 1))[:n]


def _split(work: Path, samples) -> Path:
    out = work / "split"
    writer = ShardWriter(out, lambda i: f"train-{i:06d}.tar", max_samples=len(samples))
    for i, (key, members) in enumerate(samples):
        writer.write({"__key__": f"{key}_{i}", **members})
    shards = writer.close()
    write_manifest(
        SplitManifest(
            split="train",
            image_member="jpg",
            samples=len(samples),
            shards=[s.as_dict() for s in shards],
            patients=["p"],
            slides=["s"],
        ),
        out,
    )
    return out


def _timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    work = Path(tempfile.mkdtemp(prefix="cytosyn-featbench-"))
    device = torch.device(args.device)
    samples = _tiles(work, args.tiles)
    jpegs = [m["jpg"] for _, m in samples]

    def decode():
        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])

    images = torch.from_numpy(decode())
    encoder = load_encoder("h0-mini", random_init=True).to(device)
    vae = load_vae("sd-vae-ft-ema", random_init=True).to(device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run_encoder():
        with amp:
            for i in range(0, len(images), args.batch):
                encoder(images[i : i + args.batch].to(device), ("cls", "patch"))

    def run_vae():
        with amp:
            for i in range(0, len(images), args.batch):
                vae.encode_moments(images[i : i + args.batch].to(device))

    run_encoder()  # warm-up
    t_decode, t_enc, t_vae = _timed(decode, 3), _timed(run_encoder), _timed(run_vae)
    split = _split(work, samples)
    cfg = build_config(
        FeaturizeConfig,
        {
            "input": str(split),
            "output": str(work / "features"),
            "encoders": [{"name": "h0-mini", "random_init": True, "outputs": ["cls", "patch"]}],
            "vae": {"name": "sd-vae-ft-ema", "random_init": True},
            "batch_size": args.batch,
            "device": args.device,
            "decode_check": 0,
            "progress": False,
        },
    )
    t_e2e = _timed(lambda: run_featurize(cfg))
    n = len(images)
    total_parts = t_decode + t_enc + t_vae
    print(f"{n} tiles of 224 px, batch {args.batch}, device {device}, {torch.get_num_threads()} threads")
    print(f"{'stage':<28} {'s':>8} {'tiles/s':>9} {'share':>7}")
    for name, t in (("decode JPEG", t_decode), ("H0-mini (CLS + patches)", t_enc), ("SD-VAE encode", t_vae)):
        print(f"{name:<28} {t:>8.2f} {n / t:>9.2f} {t / total_parts:>7.1%}")
    print(
        f"{'run_featurize end to end':<28} {t_e2e:>8.2f} {n / t_e2e:>9.2f}   (includes model build and hashing)"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
