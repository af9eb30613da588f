"""Scoring throughput (``cytosyn.scoring``) against the bare cost of the model's forward passes.

For each SiT size (random weights, every weight perturbed; 224 px tiles = 28×28×4 latents, 768-d
conditions like H0-mini's CLS token) and each (conditions M, times K) setting, this measures in the
same run:

(a) :func:`cytosyn.scoring.denoising_errors` on ``--tiles`` tiles: per-tile shared noise, M conditions
    (own embedding, null, and M − 2 class prototypes) × K times, rows batched ``--batch`` at a time,
    errors reduced on the device — ``tiles/s`` and ``NFE/s`` (one NFE = one tile under one condition at
    one time);
(b) the baseline right after it: the same number of forward passes of the pipeline's velocity function
    at the same batch size with fixed inputs — ``forward-only NFE/s`` — and ``ratio`` = forward-only
    time / scoring time (1.0: the engine adds nothing to the network's cost).

Tiles/s of a setting is NFE/s ÷ (M·K): the cost of scoring is linear in conditions × times, which is
why class pruning (fewer class conditions per tile after the first times) matters for many classes.
CPU timings move with the machine's load: the load average is printed first. ``--device cuda`` runs
the pipeline in bf16 autocast, as ``cytosyn score`` does on a GPU.

    python benchmarks/scoring.py [--models SiT-T/2 SiT-S/2] [--conditions 2 11] [--times 10 20]
                                 [--tiles 8] [--batch 64] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from sampling import COND_DIM, LATENT, make_pipeline

from cytosyn.pipeline import CytoSynPipeline
from cytosyn.scoring import Condition, EngineSettings, TimeGrid, denoising_errors


def forward_seconds(pipe: CytoSynPipeline, batch: int, calls: int) -> float:
    """Seconds for ``calls`` forward passes at ``batch`` through the pipeline's velocity function."""
    x = torch.randn(batch, *LATENT, device=pipe.device)
    t = torch.full((batch,), 0.5, device=pipe.device)
    cond = torch.randn(batch, COND_DIM, device=pipe.device)
    mask = torch.zeros(batch, dtype=torch.bool, device=pipe.device)
    _sync(pipe)
    t0 = time.perf_counter()
    for _ in range(calls):
        pipe.velocity(x, t, cond, mask)
    _sync(pipe)
    return time.perf_counter() - t0


def _sync(pipe: CytoSynPipeline) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()


def conditions(m: int, rng: np.random.Generator) -> list[Condition]:
    out = [Condition("own", "own"), Condition("null", "null")][:m]
    out += [
        Condition(
            f"class:{j}", "embedding", vector=rng.standard_normal(COND_DIM).astype(np.float32), is_class=True
        )
        for j in range(max(0, m - 2))
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["SiT-T/2", "SiT-S/2"])
    parser.add_argument("--conditions", nargs="+", type=int, default=[2, 11])
    parser.add_argument("--times", nargs="+", type=int, default=[10, 20])
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="rows (tile × condition × time) per forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(
        f"torch {torch.__version__}, device {args.device}, CPU threads {torch.get_num_threads()}, {args.tiles} tiles, "
        f"rows per forward {args.batch}, latents {LATENT}"
    )
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((args.tiles, *LATENT)).astype(np.float32)
    own = rng.standard_normal((args.tiles, COND_DIM)).astype(np.float32)
    keys = [f"tile{i}" for i in range(args.tiles)]
    rows = []
    for preset in args.models:
        pipe = make_pipeline(preset)
        if args.device != "cpu":
            pipe = CytoSynPipeline(pipe.config, pipe.state_dict(), device=args.device, dtype="auto")
        params = sum(p.numel() for p in pipe.model.parameters()) / 1e6
        print(f"{preset}: {params:.1f}M parameters, precision {pipe._precision_name()}")
        forward_seconds(pipe, args.batch, 2)  # warm-up
        for m in args.conditions:
            conds = conditions(m, rng)
            for k in args.times:
                settings = EngineSettings(TimeGrid.build(k=k), seed=0, batch_size=args.batch)
                _sync(pipe)
                t0 = time.perf_counter()
                res = denoising_errors(pipe, lat, keys, conds, settings, own=own)
                _sync(pipe)
                seconds = time.perf_counter() - t0
                nfe = int(res.nfe.sum())
                full, rest = divmod(nfe, args.batch)
                base = [
                    forward_seconds(pipe, args.batch, full)
                    + (forward_seconds(pipe, rest, 1) if rest else 0.0)
                ]
                baseline = statistics.median(base)
                rows.append((preset, m, k, nfe, seconds, baseline))
                print(
                    f"  M={m} K={k}: {seconds:.2f} s for {nfe} NFE (forward only {baseline:.2f} s)",
                    flush=True,
                )
    print()
    print(
        "| model | conditions M | times K | NFE per tile | s | tiles/s | NFE/s | forward-only NFE/s | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset, m, k, nfe, seconds, baseline in rows:
        print(
            f"| {preset} | {m} | {k} | {m * k} | {seconds:.2f} | {args.tiles / seconds:.3g} | {nfe / seconds:.1f} | "
            f"{nfe / baseline:.1f} | {baseline / seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
