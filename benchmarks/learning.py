"""Does training learn? FID of generated vs held-out real tiles along training, beside three references.

On the real tiles the demo uses (CMU-1 crop + CRC tiles; TAEF2 latents; FID-Inception conditioning),
train the demo's SiT in segments (exact resume between them) and, at every point, generate tiles
conditioned on the held-out tiles' embeddings and unconditionally, and measure their FID (the real FID
Inception) against the held-out tiles. Measured in the same run, with the same held-out tiles:

- **untrained**: the initial model (adaLN-Zero: it predicts v = 0, so its samples decode pure noise);
- **autoencoder floor**: TAEF2 reconstructions of the held-out tiles;
- **copy**: the training tiles.

FID should fall from the untrained value toward the references as training proceeds. Prints the curve,
saves ``learning.json``, ``learning.png`` (matplotlib) and a sample grid per point.

    python benchmarks/learning.py --output bench_learning --points 0 100 200 400 800
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from cytosyn.eval.references import fid, inception_stats, reference_fids

from cytosyn.config import load_config
from cytosyn.demo import (
    SAMPLER,
    _featurize,
    _heldout,
    _pack,
    _tile_and_ingest,
    _train_tiles,
    save_captioned_grid,
)
from cytosyn.models.inception import fid_helper_weights, load_fid_inception
from cytosyn.models.sit import SiT, SiTConfig
from cytosyn.models.vae import load_vae
from cytosyn.pipeline import CytoSynPipeline
from cytosyn.training.config import TrainConfig
from cytosyn.training.run import run_training


def _pipeline_at(run_dir: Path, untrained: bool) -> CytoSynPipeline:
    pipe = CytoSynPipeline.from_checkpoint(run_dir, device="cpu")
    if untrained:  # the same architecture, freshly initialised (what training starts from)
        torch.manual_seed(0)
        pipe.model = SiT(SiTConfig.model_validate(pipe.config["sit"])).eval().requires_grad_(False)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("bench_learning"))
    parser.add_argument("--points", type=int, nargs="+", default=[0, 100, 200, 400, 800])
    parser.add_argument("--n", type=int, default=16, help="generated tiles per point and mode")
    args = parser.parse_args()
    out: Path = args.output
    t0 = time.perf_counter()
    if _tile_and_ingest(out, 1) != 0 or not _pack(out):
        raise SystemExit("data preparation failed")
    _featurize(out)
    inception = load_fid_inception(fid_helper_weights())
    heldout, emb, _ = _heldout(out)
    held = inception_stats(heldout, inception)
    train = _train_tiles(out, args.n)  # the same n as each generated set: FID is biased by n
    refs = reference_fids(train, heldout, load_vae("taef2"), inception, held)
    print(
        f"references (same held-out tiles, n={len(heldout)}): copy {refs['copy']:.1f}, "
        f"autoencoder floor {refs['autoencoder_floor']:.1f}",
        flush=True,
    )
    preset = Path(str(resources.files("cytosyn.configs") / "train_demo.yaml"))
    idx = np.arange(args.n) % len(emb)
    rows = []
    for step in sorted(set(args.points)):
        seg = time.perf_counter()
        cfg = load_config(
            TrainConfig,
            preset,
            [f"run_dir={out / 'learning_run'}", f"data.train={out / 'features' / 'train'}",
             f"data.val={out / 'features' / 'val'}", f"trainer.max_steps={max(step, 1)}",
             f"validation.every_n_steps={max(step, 1)}"],
        )  # fmt: skip
        run_training(cfg)  # resumes from the previous point's checkpoint
        train_s = time.perf_counter() - seg
        pipe = _pipeline_at(out / "learning_run", untrained=step == 0)
        cond = pipe.generate(emb[idx], sampler=SAMPLER | {"guidance_scale": 1.0}, seed=0)
        uncond = pipe.generate(None, num_images=args.n, sampler=SAMPLER | {"guidance_scale": 1.0}, seed=1)
        row = {
            "step": step,
            "fid_conditional": fid(inception_stats(cond, inception), held),
            "fid_unconditional": fid(inception_stats(uncond, inception), held),
            "train_seconds": round(train_s, 1),
        }
        rows.append(row)
        save_captioned_grid(
            out / f"samples_step{step:05d}.png",
            [(f"step {step}: REAL held-out", heldout[idx[:8]]), ("GENERATED, conditional", cond[:8]),
             ("GENERATED, unconditional", uncond[:8])],
        )  # fmt: skip
        print(f"step {step:5d}: FID cond {row['fid_conditional']:7.1f}  uncond {row['fid_unconditional']:7.1f}  "
              f"(x copy: {row['fid_conditional'] / refs['copy']:.2f})  [{train_s:.0f} s training]", flush=True)  # fmt: skip
    result = {"references": refs, "curve": rows, "n_heldout": len(heldout), "n_generated": args.n,
              "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (out / "learning.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(out / "learning.png", rows, refs, cfg.data.batch_size)
    print(f"wrote {out / 'learning.json'}, {out / 'learning.png'} and samples_step*.png")


def _plot(path: Path, rows: list[dict], refs: dict[str, float], batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["fid_conditional"] for r in rows], "o-", label="generated, conditional")
    ax.plot(steps, [r["fid_unconditional"] for r in rows], "s-", label="generated, unconditional")
    ax.axhline(refs["copy"], color="green", ls="--", label="copy: training tiles")
    ax.axhline(refs["autoencoder_floor"], color="grey", ls=":", label="TAEF2 reconstructions (floor)")
    ax.set_xlabel(f"training step (batch {batch})")
    ax.set_ylabel("FID vs held-out tiles (real Inception)")
    ax.set_title("cytosyn demo model: does training learn?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
