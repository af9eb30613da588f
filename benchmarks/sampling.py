"""Sampling throughput of the inference pipeline against the bare cost of the model's forward passes.

For each SiT size (the tiny SiT-T/2 of the tests and SiT-B/2; random weights, 224 px tiles = 28×28×4
latents, conditioned on 768-d embeddings like H0-mini's CLS token) this measures, in the same run:

(a) ``CytoSynPipeline.generate(..., output="latent")`` — sampler + guidance + per-image noise
    generators, no VAE decode — for Euler, Heun and Euler–Maruyama at each step count, conditional with
    CFG 2.5 on t ∈ [0, 0.75] (the presets' guidance);
(b) the baseline, right after each (a): the same model calls without the sampler — ``plain`` forward
    passes at batch B and ``guided`` ones at 2B (classifier-free guidance doubles the batch inside its
    interval) — so both see the same machine state. ``forward-only images/s`` = B / that time, and
    ``ratio`` = forward-only time / sampler time (1.0: the sampler adds nothing to the network's cost).

A setting whose estimated time (per-call forward times × calls) exceeds ``--budget`` seconds per batch
is not run: its row shows the estimate, marked ``est.``. ``--decode`` adds the cost of decoding with the
SD-VAE architecture (random weights), which the pipeline pays once per image whatever the sampler.
CPU timings move with the machine's load: the load average is printed first.

    python benchmarks/sampling.py [--models SiT-T/2 SiT-B/2] [--steps 10 30 50 250] [--batch 8]
                                  [--budget 60] [--decode] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from cytosyn.compat import import_torchvision

import_torchvision()

from cytosyn.models.sit import SiTConfig, build_sit  # noqa: E402
from cytosyn.pipeline import RELEASE_FORMAT, CytoSynPipeline  # noqa: E402
from cytosyn.sampling import SamplerConfig, sample  # noqa: E402

COND_DIM = 768
LATENT = (4, 28, 28)
METHODS = ("euler", "heun", "euler_maruyama")


def make_pipeline(preset: str, device: str | torch.device = "cpu", dtype: str = "fp32") -> CytoSynPipeline:
    """A pipeline around a random SiT (every weight perturbed: no all-zero adaLN fast path)."""
    cfg = SiTConfig.from_preset(
        preset, input_size=LATENT[1], in_channels=LATENT[0], cond_dim=COND_DIM, repa_dim=None
    )
    torch.manual_seed(0)
    model = build_sit(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state |= {"latent_norm.mean": torch.zeros(LATENT[0]), "latent_norm.std": torch.ones(LATENT[0])}
    config = {
        "format": RELEASE_FORMAT,
        "name": f"bench-{preset}",
        "sit": cfg.model_dump(mode="json"),
        "latent": {"channels": LATENT[0], "size": LATENT[1], "norm": "fixed"},
        "conditioning": {"encoder": "h0-mini", "embed_dim": COND_DIM, "output": "cls"},
        "vae": {"name": "sd-vae-ft-ema", "downsample": 8},
    }
    return CytoSynPipeline(config, state, device=device, dtype=dtype)


def forward_seconds(pipe: CytoSynPipeline, batch: int, calls: int = 1) -> float:
    """Seconds for ``calls`` forward passes at ``batch`` (the velocity function alone, fp32)."""
    x = torch.randn(batch, *LATENT)
    t = torch.full((batch,), 0.5)
    cond = torch.randn(batch, COND_DIM)
    mask = torch.zeros(batch, dtype=torch.bool)
    t0 = time.perf_counter()
    for _ in range(calls):
        pipe.velocity(x, t, cond, mask)
    return time.perf_counter() - t0


def sampler_config(method: str, steps: int) -> SamplerConfig:
    return SamplerConfig(
        method=method,
        steps=steps,
        t_end=0.04 if method == "euler_maruyama" else 0.0,
        guidance_scale=2.5,
        guidance_interval=(0.0, 0.75),
    )


def call_counts(cfg: SamplerConfig, batch: int) -> tuple[int, int]:
    """(plain calls, guided calls) of one sampler run, from the sampler itself with a zero velocity."""
    _, stats = sample(
        lambda x, t, c, m: torch.zeros_like(x),
        torch.zeros(batch, *LATENT),
        torch.zeros(batch, COND_DIM),
        cfg,
        torch.Generator().manual_seed(0),
        return_stats=True,
    )
    return stats.nfe - stats.guided_nfe, stats.guided_nfe


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["SiT-T/2", "SiT-B/2"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 30, 50, 250])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget", type=float, default=60.0, help="max estimated seconds per measured batch")
    parser.add_argument("--repeats", type=int, default=3, help="forward calls timed for the estimates")
    parser.add_argument("--decode", action="store_true", help="also time SD-VAE decoding (random weights)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    b = args.batch
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, batch {b}, latents {LATENT}, "
          f"conditional, CFG 2.5 on t in [0, 0.75], fp32")  # fmt: skip
    rows = []
    for preset in args.models:
        pipe = make_pipeline(preset)
        params = sum(p.numel() for p in pipe.model.parameters()) / 1e6
        forward_seconds(pipe, 2 * b)  # warm-up
        t_b = statistics.median(forward_seconds(pipe, b) for _ in range(args.repeats))
        t_2b = statistics.median(forward_seconds(pipe, 2 * b) for _ in range(args.repeats))
        print(
            f"{preset}: {params:.1f}M parameters; forward {t_b * 1e3:.1f} ms at batch {b}, "
            f"{t_2b * 1e3:.1f} ms at batch {2 * b}"
        )
        emb = torch.randn(b, COND_DIM)
        for method in METHODS:
            for steps in args.steps:
                cfg = sampler_config(method, steps)
                plain, guided = call_counts(cfg, b)
                estimate = plain * t_b + guided * t_2b
                if estimate > args.budget:
                    rows.append((preset, method, steps, plain, guided, None, estimate))
                    continue
                t0 = time.perf_counter()
                pipe.generate(emb, sampler=cfg, seed=0, batch_size=b, output="latent")
                seconds = time.perf_counter() - t0
                # The same model calls without the sampler, right after (same machine state).
                baseline = forward_seconds(pipe, b, plain) + forward_seconds(pipe, 2 * b, guided)
                t_b, t_2b = (
                    (t_b + forward_seconds(pipe, b)) / 2,
                    (t_2b + forward_seconds(pipe, 2 * b)) / 2,
                )
                rows.append((preset, method, steps, plain, guided, seconds, baseline))
                print(f"  {method} {steps}: {seconds:.2f} s (forward only {baseline:.2f} s)", flush=True)
    print()
    print(
        "| model | sampler | steps | model calls (guided) | s / batch | images/s | forward-only images/s | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for preset, method, steps, plain, guided, seconds, forward in rows:
        calls = f"{plain + guided} ({guided})"
        if seconds is None:
            print(
                f"| {preset} | {method} | {steps} | {calls} | est. {forward:.1f} | est. {b / forward:.3g} | "
                f"{b / forward:.3g} | — |"
            )
        else:
            print(
                f"| {preset} | {method} | {steps} | {calls} | {seconds:.2f} | {b / seconds:.3g} | "
                f"{b / forward:.3g} | {forward / seconds:.2f} |"
            )
    if args.decode:
        from cytosyn.models.vae import load_vae

        vae = load_vae("sd-vae-ft-ema", random_init=True)
        lat = torch.randn(b, *LATENT)
        vae.decode(lat[:1])
        t0 = time.perf_counter()
        vae.decode(lat)
        seconds = time.perf_counter() - t0
        print(f"\nSD-VAE decode (sd-vae-ft-ema architecture, random weights) at 224 px: {seconds:.2f} s per batch "
              f"of {b} = {b / seconds:.2f} images/s (paid once per image, whatever the sampler)")  # fmt: skip


if __name__ == "__main__":
    main()
