"""The parts of ``benchmarks/gpu_check.sh``: one GPU, no network, one JSON line per part, then a table.

    python benchmarks/gpu_check.py PART [--smoke]       # PART: see PARTS; prints one JSON line
    python benchmarks/gpu_check.py table FOLDER          # the table of every PART.json in FOLDER

Parts (each independent, each time-boxed by the shell script):

- ``peak``: the best dense bf16 matmul rate (8192³), the baseline of every MFU below.
- ``step`` / ``compiled``: one SiT-XL/2 + REPA training step (bf16 autocast, fused AdamW, device-side
  clipping — the protocol of cytosyn/training/optimization.py) at the largest batch that fits among
  128/96/64/48/32, eager and ``torch.compile``d: images/s, TFLOP/s (3 × analytic forward FLOPs) and MFU
  against the same part's own matmul peak and against the GPU's nominal dense bf16 peak.
- ``keys``: the per-step cost of the keyed randomness at batch 256 on the device (host time, synchronised).
- ``ddp`` / ``deepspeed``: ``cytosyn train`` itself for a short SiT-XL/2 run (online H0-mini-sized REPA
  encoder with random weights, batch 32, synthetic featurized split), with DDP and with DeepSpeed ZeRO-2;
  the DeepSpeed part stops, resumes from its checkpoint folder and checks the step count. images/s are
  cytosyn's own ``perf/images_per_s`` after the first logging interval.
- ``sampling``: 250-step Euler–Maruyama and 30-step Heun, CFG 2.5 on [0, 0.75], SiT-XL/2, batch 32.
- ``featurize``: tiles/s of an H0-mini-sized ViT (CLS + patch tokens) plus SD-VAE encoding, bf16.
- ``agreement``: the same SiT-B/2 step's loss and gradient in fp32 and under bf16 autocast.

``--smoke`` runs every part on the CPU with tiny models (SiT-T/2, vit-tiny16, tiny-f8) in seconds: it
checks the plumbing, not the speed (tests/test_benchmarks.py is not needed for that: run it by hand).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cytosyn.compat import import_torchvision

import_torchvision()

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # train_step.py and sampling.py, reused below
NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "GH200": 989.0, "B200": 2250.0}
PARTS = ("peak", "step", "compiled", "keys", "ddp", "deepspeed", "sampling", "featurize", "agreement")


def _device(smoke: bool) -> torch.device:
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --smoke to check the plumbing on a CPU)")
    return torch.device("cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _nominal_peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in NOMINAL_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def matmul_peak(device: torch.device, n: int, repeats: int = 20) -> float:
    """Best dense matmul TFLOP/s (bf16 on a GPU, fp32 on a CPU): benchmarks/train_step.py's measurement."""
    from train_step import matmul_peak as flops_per_s

    return flops_per_s(device, torch.bfloat16 if device.type == "cuda" else torch.float32, n, repeats) / 1e12


# -------------------------------------------------------------------------------------------- parts


def part_peak(device: torch.device, smoke: bool) -> dict:
    tflops = matmul_peak(device, 1024 if smoke else 8192)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": name, "matmul_tflops": tflops, "nominal_tflops": _nominal_peak()}


def _train_step_fn(preset: str, batch: int, device: torch.device, compiled: bool):
    from cytosyn.models import build_sit
    from cytosyn.models.repa import repa_loss
    from cytosyn.training.optimization import StepGuard
    from cytosyn.training.randomness import sample_keys, training_draws

    torch.manual_seed(0)
    model = build_sit(preset, input_size=28, in_channels=4, cond_dim=768, cond_dropout=0.0, repa_dim=768)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    guard = StepGuard(model.parameters(), 1.0, device)
    forward = torch.compile(model) if compiled else model
    x0 = torch.randn(batch, 4, 28, 28, device=device)
    cond = torch.randn(batch, 768, device=device)
    tokens_target = torch.randn(batch, 196, 768, device=device)
    names = [f"tile{i}" for i in range(batch)]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    state = {"step": 0}

    def step() -> None:
        keys = sample_keys(0, state["step"], names).keys.to(device, non_blocking=True)
        t, noise, _, drop = training_draws(keys, (4, 28, 28), drop_probability=0.1, posterior=False)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        with amp:
            v, tokens = forward(x_t, t, cond, uncond_mask=drop, return_repa=True)
        loss = (v.float() - (noise - x0)).square().mean() + 0.5 * repa_loss(tokens, tokens_target)
        loss.backward()
        guard.before_step(opt)
        opt.step()
        StepGuard.after_step(opt)
        opt.zero_grad(set_to_none=True)
        guard.record()
        state["step"] += 1

    return model, step


def _time_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def part_step(device: torch.device, smoke: bool, compiled: bool = False) -> dict:
    preset = "SiT-T/2" if smoke else "SiT-XL/2"
    peak = matmul_peak(device, 1024 if smoke else 8192, repeats=10)
    batches = [4] if smoke else ([64, 48, 32] if compiled else [128, 96, 64, 48, 32])
    last_error = None
    for batch in batches:
        try:
            model, step = _train_step_fn(preset, batch, device, compiled)
            seconds = _time_steps(step, device, warmup=3 if compiled else 2, steps=3 if smoke else 10)
        except torch.OutOfMemoryError as err:
            last_error = f"batch {batch}: out of memory"
            del err
            torch.cuda.empty_cache()
            continue
        flops = 3 * model.flops_per_image() * batch / seconds / 1e12
        nominal = _nominal_peak()
        out = {
            "preset": preset,
            "batch": batch,
            "images_per_s": batch / seconds,
            "tflops": flops,
            "mfu_vs_measured_peak": flops / peak,
            "measured_peak_tflops": peak,
        }
        if nominal:
            out["mfu_vs_nominal_peak"] = flops / nominal
        if device.type == "cuda":
            out["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out
    raise RuntimeError(last_error or "no batch size fitted")


def part_keys(device: torch.device, smoke: bool) -> dict:
    from cytosyn.training.randomness import sample_keys, training_draws

    names = [f"TCGA-XX-{i:04d}__slide-{i % 7}__{i * 13}" for i in range(256)]
    times, host = [], []
    for step in range(30):
        _sync(device)
        t0 = time.perf_counter()
        keys = sample_keys(0, step, names).keys
        if device.type == "cuda":
            keys = keys.pin_memory()
        training_draws(keys.to(device, non_blocking=True), (4, 28, 28), drop_probability=0.1)
        t1 = time.perf_counter()
        _sync(device)
        host.append(t1 - t0)
        times.append(time.perf_counter() - t0)
    return {"batch": 256, "host_ms": 1e3 * sorted(host)[15], "total_ms": 1e3 * sorted(times)[15]}


def _synthetic_split(folder: Path, samples: int, smoke: bool) -> Path:
    """A featurized split of random tiles (JPEG), random conditions and random VAE moments."""
    import io

    import numpy as np
    from PIL import Image

    from cytosyn.data.testing import npy_bytes, write_split
    from cytosyn.manifest import FeatureEntry

    cond_dim = 192 if smoke else 768
    size = 224
    rng = np.random.default_rng(0)

    def sample(i: int) -> dict:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        return {
            "__key__": f"TCGA-XX-{i:04d}__s{i % 5}__{i}",
            "jpg": buf.getvalue(),
            "json": json.dumps({"slide_id": f"s{i % 5}"}).encode(),
            "cond.npy": npy_bytes(rng.standard_normal(cond_dim).astype(np.float16)),
            "vae.npy": npy_bytes(rng.standard_normal((2, 4, 28, 28)).astype(np.float16)),
        }

    per_shard = max(1, samples // 16)
    features = [
        FeatureEntry(member="cond.npy", kind="embedding", model_id="random", details={"shape": [cond_dim]}),
        FeatureEntry(
            member="vae.npy",
            kind="vae",
            model_id="random",
            details={
                "shape": [2, 4, 28, 28],
                "latent_stats": {"mean": [0.0] * 4, "std": [1.0] * 4, "mean_std": [1.0] * 4},
            },
        ),
    ]
    write_split(
        folder, (sample(i) for i in range(samples)), [per_shard] * (samples // per_shard), "jpg", features
    )
    return folder


def _train_config(run_dir: Path, split: Path, smoke: bool, strategy: str, steps: int) -> dict:
    return {
        "run_dir": str(run_dir),
        "data": {
            "train": str(split),
            "condition": "cond",
            "repa_target": None,
            "batch_size": 4 if smoke else 32,
            "num_workers": 0 if smoke else 6,
            "shuffle_buffer": 64,
            "mode": "resampled",
        },
        "model": {"preset": "SiT-T/2" if smoke else "SiT-XL/2"},
        "repa": {
            "weight": 0.5,
            "online_encoder": "vit-tiny16" if smoke else "h0-mini",
            "online_random_init": True,
        },
        "trainer": {
            "max_steps": steps,
            "accelerator": "cpu" if smoke else "gpu",
            "devices": 1,
            "strategy": strategy,
            "precision": "bf16-mixed",
            "log_every_n_steps": 5,
            "checkpoint_every_n_steps": steps,
        },
        "validation": {"every_n_steps": 0},
        "logging": {"wandb": "disabled"},
    }


def _cytosyn_train(config: dict, folder: Path, env: dict) -> tuple[float, str]:
    import yaml

    path = folder / f"train-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cytosyn.cli", "train", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"cytosyn train failed: {proc.stderr[-1500:]}")
    return time.perf_counter() - t0, proc.stderr + proc.stdout


def _images_per_s(run_dir: Path) -> float | None:
    import csv

    rates = [
        float(r["perf/images_per_s"])
        for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
        if r.get("perf/images_per_s")
    ]
    rates = rates[1:] or rates  # the first interval holds start-up (and compilation) time
    return sum(rates) / len(rates) if rates else None


def part_train(device: torch.device, smoke: bool, strategy: str) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if smoke and strategy.startswith("deepspeed"):
        env["CYTOSYN_CPU_DEEPSPEED_FOR_TESTS"] = "1"
    with tempfile.TemporaryDirectory(prefix="cytosyn-gpu-check-") as tmp:
        folder = Path(tmp)
        env["TORCH_EXTENSIONS_DIR"] = str(folder / "torch_extensions")
        split = _synthetic_split(folder / "split", 64 if smoke else 1024, smoke)
        steps = 4 if smoke else 30
        run_dir = folder / "run"
        first_steps = steps if strategy == "ddp" else steps // 2
        seconds, _ = _cytosyn_train(_train_config(run_dir, split, smoke, strategy, first_steps), folder, env)
        out = {"steps": first_steps, "seconds": seconds, "images_per_s": _images_per_s(run_dir)}
        if strategy.startswith("deepspeed"):
            seconds, log = _cytosyn_train(_train_config(run_dir, split, smoke, strategy, steps), folder, env)
            progress = json.loads((run_dir / "progress.json").read_text())
            out |= {
                "resumed": "resuming from" in log and progress["step"] == steps,
                "resume_seconds": seconds,
                "images_per_s_after_resume": _images_per_s(run_dir),
            }
        return out


def part_sampling(device: torch.device, smoke: bool) -> dict:
    from sampling import make_pipeline

    pipe = make_pipeline("SiT-T/2" if smoke else "SiT-XL/2", device=device, dtype="auto")
    batch = 2 if smoke else 32
    emb = torch.randn(batch, 768)
    out = {"batch": batch}
    for name, sampler in (
        ("sde_250", {"method": "euler_maruyama", "steps": 5 if smoke else 250}),
        ("heun_30", {"method": "heun", "steps": 3 if smoke else 30}),
    ):
        sampler |= {"guidance_scale": 2.5, "guidance_interval": (0.0, 0.75)}
        pipe.generate(emb[:1], sampler=sampler | {"steps": 2}, seed=0, output="latent")  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        pipe.generate(emb, sampler=sampler, seed=0, output="latent", batch_size=batch)
        _sync(device)
        out[f"{name}_images_per_s"] = batch / (time.perf_counter() - t0)
    return out


def part_featurize(device: torch.device, smoke: bool) -> dict:
    from cytosyn.models.encoders import load_encoder
    from cytosyn.models.vae import load_vae

    encoder = load_encoder("vit-tiny16" if smoke else "h0-mini", random_init=True).to(device)
    vae = load_vae("tiny-f8" if smoke else "sd-vae-ft-ema", random_init=True).to(device)
    batch = 4 if smoke else 64
    tiles = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def once() -> None:
        with amp, torch.no_grad():
            encoder(tiles, ("cls", "patch"))
            vae.encode_moments(tiles)

    seconds = _time_steps(once, device, warmup=1, steps=2 if smoke else 5)
    return {"batch": batch, "tiles_per_s": batch / seconds}


def part_agreement(device: torch.device, smoke: bool) -> dict:
    from cytosyn.models import build_sit

    torch.manual_seed(0)
    model = build_sit(
        "SiT-T/2" if smoke else "SiT-B/2", input_size=28, in_channels=4, cond_dim=768, repa_dim=None
    )
    model = model.to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # leave the adaLN-Zero start, where everything is exact
    batch = 8
    x0, noise = torch.randn(batch, 4, 28, 28, device=device), torch.randn(batch, 4, 28, 28, device=device)
    t, cond = torch.rand(batch, device=device), torch.randn(batch, 768, device=device)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    results = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
            v = model(x_t, t, cond)
        loss = (v.float() - (noise - x0)).square().mean()
        loss.backward()
        grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        results[name] = (loss.item(), grad)
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    return {
        "loss_fp32": l32,
        "loss_bf16": l16,
        "loss_rel_diff": abs(l16 - l32) / abs(l32),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)),
    }


# -------------------------------------------------------------------------------------------- table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(folder: Path) -> str:
    lines = ["| part | result | figures |", "|---|---|---|"]
    for part in PARTS:
        path = folder / f"{part}.json"
        try:
            record = json.loads(path.read_text().strip().splitlines()[-1])
        except (OSError, IndexError, json.JSONDecodeError):
            record = {"part": part, "ok": False, "note": "no result (not run, or killed by its time box)"}
        if record.get("ok"):
            figures = ", ".join(f"{k} {_fmt(v)}" for k, v in record.get("figures", {}).items())
            lines.append(f"| {part} | measured | {figures} |")
        else:
            lines.append(f"| {part} | NOT measured | {record.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=[*PARTS, "table"])
    parser.add_argument("folder", nargs="?", type=Path, help="table: the folder of PART.json results")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: plumbing only")
    args = parser.parse_args()
    if args.part == "table":
        print(table(args.folder))
        return
    torch.set_flush_denormal(True)
    if not args.smoke:
        torch.set_float32_matmul_precision("high")
    t0 = time.perf_counter()
    try:
        device = _device(args.smoke)
        run = {
            "peak": lambda: part_peak(device, args.smoke),
            "step": lambda: part_step(device, args.smoke),
            "compiled": lambda: part_step(device, args.smoke, compiled=True),
            "keys": lambda: part_keys(device, args.smoke),
            "ddp": lambda: part_train(device, args.smoke, "ddp"),
            "deepspeed": lambda: part_train(device, args.smoke, "deepspeed_stage_2"),
            "sampling": lambda: part_sampling(device, args.smoke),
            "featurize": lambda: part_featurize(device, args.smoke),
            "agreement": lambda: part_agreement(device, args.smoke),
        }[args.part]
        figures = run()
        record = {"part": args.part, "ok": True, "figures": figures}
    except BaseException as err:  # every failure becomes a row of the table, never a crash of the script
        record = {"part": args.part, "ok": False, "note": f"{type(err).__name__}: {str(err)[:300]}"}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["smoke"] = args.smoke
    if record["ok"]:
        record["figures"] = {
            k: v for k, v in record["figures"].items() if not (isinstance(v, float) and math.isnan(v))
        }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
