"""Training-step throughput of SiT presets, and the achieved FLOP rate against a matmul peak measured here.

One step = forward (velocity + REPA tokens) + backward + AdamW, on 224 px tiles (28×28×4 SD-VAE latents),
conditioned on a 768-d embedding, REPA to 768-d tokens. Model FLOPs per image come from the model's
analytic count (``SiT.flops_per_image``; training ≈ 3× forward). The baseline is the best dense matmul
rate measured in the same run (fp32 on CPU, bf16 on GPU): "MFU" = achieved / that peak.

    python benchmarks/train_step.py                       # CPU: S/2 and B/2
    python benchmarks/train_step.py --device cuda --presets SiT-XL/2 --batch 64   # on a GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import time

import torch

from cytosyn.models import build_sit
from cytosyn.models.repa import repa_loss


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best FLOP/s of an n×n matmul (the hardware's practical dense peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_preset(preset: str, device: torch.device, batch: int, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_sit(preset, input_size=28, in_channels=4, cond_dim=768, cond_dropout=0.0, repa_dim=768).to(
        device
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, 28, 28, device=device)
    cond = torch.randn(batch, 768, device=device)
    target_tokens = torch.randn(batch, 196, 768, device=device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        t = torch.rand(batch, device=device)
        noise = torch.randn_like(x)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        with amp:
            v, tokens = model(x_t, t, cond, return_repa=True)
            loss = (v.float() - (noise - x)).square().mean() + 0.5 * repa_loss(tokens, target_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]  # median
    flops = 3 * model.flops_per_image() * batch
    return {
        "params_m": model.num_parameters() / 1e6,
        "step_s": step,
        "images_per_s": batch / step,
        "tflops": flops / step / 1e12,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", nargs="+", default=["SiT-S/2", "SiT-B/2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 2048, 12)
    print(
        f"device {device}, {torch.get_num_threads()} threads; measured {dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s"
    )
    print(
        f"{'preset':<10} {'params':>8} {'batch':>6} {'step s':>8} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>6}"
    )
    for preset in args.presets:
        r = bench_preset(preset, device, args.batch, args.steps, args.warmup)
        print(
            f"{preset:<10} {r['params_m']:>7.1f}M {args.batch:>6} {r['step_s']:>8.3f} {r['images_per_s']:>9.2f} "
            f"{r['tflops']:>8.3f} {r['tflops'] * 1e12 / peak:>6.1%}"
        )


if __name__ == "__main__":
    main()
