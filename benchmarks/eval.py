"""Benchmark of evaluation feature extraction on CPU: images/s per extractor against the bare decode cost.

Tiles the real H&E fixture (``cytosyn/assets/cmu_small_region.svs``) to lossless PNG 224-px tiles,
then measures in the same run:

(a) bare cost: reading and decoding the tiles through `cytosyn.eval.images.ImageSet` (PNG → uint8
    batches), and the in-memory JPEG q75 re-encoding of the JPEG study;
(b) `extract_features` with one extractor at a time (random-initialised weights, real architectures):
    the FID Inception-v3 stand-in (timm ``inception_v3``, 299 px), H0-mini (ViT-B/14 + registers,
    SwiGLU), UNI2-h (ViT-g/14-sized, 681M parameters; fewer images), and with
    ``CYTOSYN_FID_INCEPTION=<file>`` the TorchScript FID Inception itself;
(c) all of them in one `extract_features` pass (the harness's normal mode).

Each model runs one warm-up batch first (not timed). Numbers are for the machine they ran on; compare
only rows of one run.

    python benchmarks/eval.py [--images 16] [--uni-images 4] [--batch 8] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cytosyn.eval.features import EncoderExtractor, extract_features
from cytosyn.eval.images import ImageSet, apply_codec
from cytosyn.eval.inception import load_fid_inception, random_fid_inception

from cytosyn.models.encoders import load_encoder

SLIDE = Path(__file__).resolve().parent.parent / "cytosyn" / "assets" / "cmu_small_region.svs"


def make_tiles(workdir: Path) -> list[Path]:
    from cytosyn.data_prep.tile_config import TileConfig
    from cytosyn.data_prep.tiler import run_tiling

    from cytosyn.config import build_config
    from cytosyn.formats import slide_dir

    cfg = build_config(
        TileConfig,
        {
            "output": str(workdir / "tiles"),
            "slides": {"input": [str(SLIDE)]},
            "codec": {"format": "png", "png_compress_level": 1},
            "run": {"progress": False, "overview": False},
        },
    )
    run_tiling(cfg)
    return sorted(slide_dir(workdir / "tiles", "cmu_small_region").glob("*.tar"))


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16, help="tiles per extractor (default 16)")
    parser.add_argument("--uni-images", type=int, default=4, help="tiles for UNI2-h (default 4)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cytosyn-bench-eval-"))
    shards = make_tiles(workdir)
    n = args.images
    tiles = ImageSet.from_shards(shards, limit=n)
    warm = next(tiles.batches(2))[1]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {tiles.provenance['count']} real "
        f"fixture tiles, {tiles.provenance['tile_px']} px, stored as {tiles.provenance['codec_label']}"
    )

    rows: list[tuple[str, int, float]] = []
    decode_s = timed(lambda: [None for _ in tiles.batches(args.batch)], repeats=3)
    rows.append(("bare: read + decode PNG tiles", n, decode_s))
    batch = np.stack([t.image for t in tiles])
    rows.append(("bare: JPEG q75 re-encode + decode", n, timed(lambda: apply_codec(batch, {"jpeg": 75}), 3)))

    extractors = {
        "fid-inception (random stand-in)": (random_fid_inception(0), n),
        "h0-mini (random init)": (EncoderExtractor(load_encoder("h0-mini", random_init=True)), n),
    }
    if os.environ.get("CYTOSYN_FID_INCEPTION"):
        extractors["fid-inception (TorchScript file)"] = (
            load_fid_inception(os.environ["CYTOSYN_FID_INCEPTION"]),
            n,
        )
    extractors["uni2-h (random init)"] = (
        EncoderExtractor(load_encoder("uni2-h", random_init=True)),
        args.uni_images,
    )
    for label, (ext, count) in extractors.items():
        subset = ImageSet.from_shards(shards, limit=count)
        ext.features(torch.from_numpy(warm))  # warm-up, not timed
        seconds = timed(lambda e=ext, s=subset: extract_features(s, {"x": e}, batch_size=args.batch))
        rows.append((label, count, seconds))
    together = {k: e for k, (e, c) in extractors.items() if c == n}
    seconds = timed(lambda: extract_features(tiles, together, batch_size=args.batch))
    rows.append((f"one pass, {len(together)} extractors together", n, seconds))

    per_image_decode = decode_s / n
    print()
    print(f"| {'what':<44} | images | seconds | images/s | × decode cost |")
    print(f"|{'-' * 46}|-------:|--------:|---------:|--------------:|")
    for label, count, secs in rows:
        ratio = (secs / count) / per_image_decode
        print(f"| {label:<44} | {count:>6} | {secs:>7.2f} | {count / secs:>8.2f} | {ratio:>13.3g} |")


if __name__ == "__main__":
    main()
