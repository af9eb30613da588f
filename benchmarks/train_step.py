"""Training-step throughput of SiT presets, and what each part of the step protocol costs, as ratios.

Part 1 (per preset): one step = forward (velocity + REPA tokens) + backward + clipping + AdamW, on 224 px
tiles (28×28×4 SD-VAE latents), conditioned on a 768-d embedding, REPA to 768-d tokens; model FLOPs per
image from the model's analytic count (``SiT.flops_per_image``; training ≈ 3× forward). Baseline: the
best dense matmul rate measured in the same run (fp32 on CPU, bf16 on GPU): "MFU" = achieved / that peak.
Two step protocols are timed back to back on the same model and data:

- ``before``: foreach AdamW, ``clip_grad_norm_`` and a host check of the norm (one sync per step);
- ``now``: cytosyn's protocol (cytosyn/training/optimization.py): fused AdamW, the norm and clipping on
  the device, a non-finite step skipped by the fused kernel (no sync).

Part 2 (micro-benchmarks, same run, ratio = before / now, > 1 means faster now):

- per-sample randomness at batch 256: one torch.Generator per sample on the host (before) vs the keyed
  hash (cytosyn/training/randomness.py). On a CPU both run on the host; on a GPU only the keys are host
  work (``benchmarks/gpu_check.sh`` measures that: part ``keys``).
- EMA update of SiT-B/2's weights: a walk over named tensors with mul + add (before) vs one cached
  ``_foreach_lerp_`` (now).

    python benchmarks/train_step.py                       # CPU: S/2 and B/2
    python benchmarks/train_step.py --device cuda --presets SiT-XL/2 --batch 64   # on a GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch

from cytosyn.compat import import_torchvision

import_torchvision()

from cytosyn.models import build_sit  # noqa: E402
from cytosyn.models.repa import repa_loss  # noqa: E402
from cytosyn.training.ema import EMA  # noqa: E402
from cytosyn.training.optimization import StepGuard  # noqa: E402
from cytosyn.training.randomness import sample_keys, training_draws  # noqa: E402


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


def _median_time(fn, device: torch.device, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_preset(preset: str, device: torch.device, batch: int, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_sit(preset, input_size=28, in_channels=4, cond_dim=768, cond_dropout=0.0, repa_dim=768).to(
        device
    )
    x = torch.randn(batch, 4, 28, 28, device=device)
    cond = torch.randn(batch, 768, device=device)
    target_tokens = torch.randn(batch, 196, 768, device=device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward_backward() -> None:
        t = torch.rand(batch, device=device)
        noise = torch.randn_like(x)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        with amp:
            v, tokens = model(x_t, t, cond, return_repa=True)
            loss = (v.float() - (noise - x)).square().mean() + 0.5 * repa_loss(tokens, target_tokens)
        loss.backward()

    before_opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step_before() -> None:
        forward_backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if math.isfinite(float(norm)):  # the host waits for the device here
            before_opt.step()
        before_opt.zero_grad(set_to_none=True)

    now_opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    guard = StepGuard(model.parameters(), 1.0, device)

    def step_now() -> None:
        forward_backward()
        guard.before_step(now_opt)
        now_opt.step()
        StepGuard.after_step(now_opt)
        now_opt.zero_grad(set_to_none=True)
        guard.record()

    before = _median_time(step_before, device, steps, warmup)
    now = _median_time(step_now, device, steps, warmup)
    flops = 3 * model.flops_per_image() * batch
    return {
        "params_m": model.num_parameters() / 1e6,
        "before_s": before,
        "step_s": now,
        "images_per_s": batch / now,
        "tflops": flops / now / 1e12,
    }


def bench_randomness(batch: int, device: torch.device, repeats: int = 7) -> tuple[float, float]:
    names = [f"TCGA-XX-{i:04d}__slide-{i % 7}__{i * 13}" for i in range(batch)]
    numel = 4 * 28 * 28

    def generators() -> None:  # the design this replaced: one generator per sample, then a copy
        draws = []
        for i, name in enumerate(names):
            g = torch.Generator().manual_seed(hash((name, i)) & 0x7FFFFFFF)
            draws.append(
                (
                    torch.rand(1, generator=g),
                    torch.randn(numel, generator=g),
                    torch.randn(numel, generator=g),
                    torch.rand(1, generator=g),
                )
            )
        torch.stack([d[1] for d in draws]).to(device)
        torch.stack([d[2] for d in draws]).to(device)

    def keyed() -> None:
        training_draws(sample_keys(0, 1, names).keys.to(device), (4, 28, 28), drop_probability=0.1)

    return (_median_time(generators, device, repeats, 1), _median_time(keyed, device, repeats, 1))


def bench_ema(preset: str, device: torch.device, repeats: int = 7) -> tuple[float, float]:
    model = build_sit(preset, input_size=28, in_channels=4, cond_dim=768, repa_dim=768).to(device)
    old_copy = copy.deepcopy(model)
    decay = 0.9999

    @torch.no_grad()
    def before() -> None:  # the previous EMA.update: named-tensor dicts, then mul + add
        src, dst = dict(model.named_parameters()), dict(old_copy.named_parameters())
        ema, live = [], []
        for name, e in dst.items():
            ema.append(e)
            live.append(src[name].detach().to(device=e.device, dtype=e.dtype))
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, live, alpha=1 - decay)
        for name, b in old_copy.named_buffers():
            b.copy_(dict(model.named_buffers())[name])

    ema = EMA(model, decay=decay)
    ema.to(device)
    return (
        _median_time(before, device, repeats, 1),
        _median_time(lambda: ema.update(model), device, repeats, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", nargs="+", default=["SiT-S/2", "SiT-B/2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--random-batch", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 2048, 12)
    print(
        f"device {device}, {torch.get_num_threads()} threads; measured {dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s"
    )
    print(
        f"{'preset':<10} {'params':>8} {'batch':>6} {'step s':>8} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'before/now':>11}"
    )
    for preset in args.presets:
        r = bench_preset(preset, device, args.batch, args.steps, args.warmup)
        print(
            f"{preset:<10} {r['params_m']:>7.1f}M {args.batch:>6} {r['step_s']:>8.3f} {r['images_per_s']:>9.2f} "
            f"{r['tflops']:>8.3f} {r['tflops'] * 1e12 / peak:>6.1%} {r['before_s'] / r['step_s']:>11.2f}"
        )
    before, now = bench_randomness(args.random_batch, device)
    print(
        f"per-sample randomness, batch {args.random_batch}: generators {1e3 * before:.1f} ms, keyed "
        f"{1e3 * now:.1f} ms (before/now {before / now:.2f}; keys alone on the host: "
        f"{1e3 * _median_time(lambda: sample_keys(0, 1, [f'k{i}' for i in range(args.random_batch)]), device, 7, 1):.2f} ms)"
    )
    before, now = bench_ema(args.presets[-1], device)
    print(
        f"EMA update, {args.presets[-1]}: before {1e3 * before:.1f} ms, now {1e3 * now:.1f} ms (before/now {before / now:.2f})"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
