"""Cost of a REPA-E end-to-end step and of a VAE fine-tuning step, against the SiT-only step, as ratios.

Same batch of real H&E tiles (the CRC tiles shipped in cytosyn/assets), same models, same run:

- ``sit_only`` (baseline): stage 2's step — latents, condition and REPA targets precomputed (what a
  featurized split stores), SiT forward (velocity + REPA tokens) + backward + AdamW;
- ``vae_finetune``: ``tune-vae`` mode finetune — VAE encode/decode + L1 (+ LPIPS when given) + KL +
  PatchGAN generator term, VAE update, discriminator update;
- ``e2e``: ``tune-vae`` mode e2e — the above plus the frozen encoder on the images (condition + REPA
  targets), the VAE's REPA pass through the frozen SiT, and the SiT update on detached latents.

Each figure is the median wall time of ``--steps`` steps after one warm-up step, the three kinds timed
round-robin (one step of each per round) so that changes of machine load weigh on all of them alike. CPU defaults are small
(TAEF2 — the real pretrained weights — a random ViT-Tiny encoder and SiT-S/2 at 224 px, batch 4); on a GPU
pass e.g. ``--device cuda --vae sd-vae-ft-ema --vae-weights DIR --encoder h0-mini --encoder-weights F
--sit SiT-XL/2 --batch 32``.

    python benchmarks/e2e_step.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cytosyn.compat import import_torchvision

import_torchvision()

from cytosyn.config import build_config  # noqa: E402
from cytosyn.demo import bundled_crc_tiles  # noqa: E402
from cytosyn.models import align_tokens, repa_loss  # noqa: E402
from cytosyn.training.vae_tuning import TuneVAEConfig, _Tuner  # noqa: E402


def real_tiles(n: int, size: int) -> torch.Tensor:
    paths = sorted((bundled_crc_tiles() / "crc_val_he_7k_png").rglob("*.png"))[:n]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BOX)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def timed_interleaved(fns, steps: int, device: torch.device) -> list[float]:
    """Median seconds per call of each function, timed round-robin (one call of each per round) after one
    warm-up round, so a change of machine load during the run weighs on every figure alike."""
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(steps + 1):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ > 0:
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vae", default="taef2")
    ap.add_argument("--vae-weights", type=Path)
    ap.add_argument("--vae-random", action="store_true")
    ap.add_argument("--encoder", default="vit-tiny16")
    ap.add_argument("--encoder-weights", type=Path)
    ap.add_argument("--sit", default="SiT-S/2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = real_tiles(args.batch, args.size)
    common = {
        "run_dir": "/tmp/unused",
        "device": args.device,
        "precision": args.precision,
        "vae": {"name": args.vae, "weights": args.vae_weights, "random_init": args.vae_random},
        "data": {"train": "/tmp/unused", "heldout": None, "batch_size": args.batch},
        "losses": {"lpips_weights": "off"},  # LPIPS needs local VGG weights: not timed here
    }
    e2e = {
        "sit_preset": args.sit,
        "image_size": args.size,
        "encoder": args.encoder,
        "encoder_weights": args.encoder_weights,
        "encoder_random_init": args.encoder_weights is None,
    }
    finetune = _Tuner(build_config(TuneVAEConfig, common), device)
    joint = _Tuner(build_config(TuneVAEConfig, common | {"mode": "e2e", "e2e": e2e}), device)
    batch = {"image": images}

    # Stage 2's inputs, precomputed outside the timing (a featurized split stores them).
    part = joint.e2e
    with torch.no_grad():
        x = images.to(device).float() / 127.5 - 1
        z = joint.ae.encode(x).mean
        out = part.encoder(images.to(device), ("cls", "patch"))
        targets = align_tokens(out["patch"].float(), part.sit.cfg.grid_size)
        cond = out["cls"].float()
    sit = part.sit
    opt = torch.optim.AdamW(sit.parameters(), lr=1e-4)

    def sit_only() -> None:
        t = torch.rand(z.shape[0], device=device)
        noise = torch.randn_like(z)
        x0 = part.norm.normalize(z)
        tb = t.view(-1, 1, 1, 1)
        ctx = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if args.precision == "bf16"
            else torch.autocast(device_type=device.type, enabled=False)
        )
        with ctx:
            v, tokens = sit((1 - tb) * x0 + tb * noise, t, cond, return_repa=True)
        loss = (v.float() - (noise - x0)).square().mean() + 0.5 * repa_loss(tokens, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sit.parameters(), 1.0)
        opt.step()

    sit_s, ft_s, e2e_s = timed_interleaved(
        [sit_only, lambda: finetune.train_step(batch), lambda: joint.train_step(batch)], args.steps, device
    )
    threads = torch.get_num_threads()
    print(
        f"device {device} ({threads} threads), {args.precision}, batch {args.batch} × {args.size} px real CRC tiles; "
        f"VAE {args.vae}, encoder {args.encoder}, {args.sit}; median of {args.steps} steps"
    )
    print(f"{'step':<14}{'s/step':>10}{'tiles/s':>10}{'÷ sit_only':>12}")
    for name, s in (("sit_only", sit_s), ("vae_finetune", ft_s), ("e2e", e2e_s)):
        print(f"{name:<14}{s:>10.3f}{args.batch / s:>10.2f}{s / sit_s:>12.2f}")


if __name__ == "__main__":
    main()
