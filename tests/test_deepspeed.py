"""DeepSpeed ZeRO-2 end to end on two CPU processes: train, kill, resume exactly, consolidate, release.

The real DeepSpeed engine runs (ZeRO-2 partitioning, torch autocast in bf16, its clipping and checkpoint
folders); only Lightning's CUDA checks are skipped and DeepSpeed's shared-memory collectives replaced by
gloo (cytosyn/training/cpu_deepspeed.py, enabled by CYTOSYN_CPU_DEEPSPEED_FOR_TESTS=1). ~3 minutes on two
cores: four `cytosyn train` launches (uninterrupted, killed, resumed, and a refused world-size change).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_train_config

from cytosyn.model_files import consolidate_deepspeed
from cytosyn.pipeline import CytoSynPipeline
from cytosyn.training.checkpoints import MARKER
from cytosyn.training.strategies import CPU_DEEPSPEED_ENV

pytestmark = pytest.mark.slow

STEPS = 8


def _config(features: dict[str, Path], run_dir: Path, path: Path, **trainer) -> Path:
    tree = tiny_train_config(features, run_dir)
    tree["data"]["batch_size"] = 4
    tree["optim"]["global_batch"] = 8
    tree["trainer"] |= {
        "devices": 2,
        "strategy": "deepspeed_stage_2",
        "precision": "bf16-mixed",
        "max_steps": STEPS,
        "checkpoint_every_n_steps": 4,
    } | trainer
    tree["optim"]["global_batch"] = tree["data"]["batch_size"] * tree["trainer"]["devices"]
    path.write_text(yaml.safe_dump(tree))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    return os.environ | {
        CPU_DEEPSPEED_ENV: "1",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),  # nothing should compile; cached if so
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _train(config: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cytosyn.cli", "train", "--config", str(config), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # rank 1 is a child of rank 0: a kill takes the whole group
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


def _metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = {}
    for row in csv.DictReader(open(run_dir / "logs" / "metrics.csv")):
        if row.get("train/loss"):
            assert int(row["step"]) not in rows, f"step {row['step']} logged twice"
            rows[int(row["step"])] = {k: float(v) for k, v in row.items() if v}
    return rows


def test_zero2_trains_resumes_exactly_and_releases_from_its_folder(tiny_features, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'cytosyn[deepspeed]')")
    env = _env(tmp_path)

    straight = tmp_path / "straight"
    _finish(_train(_config(tiny_features, straight, tmp_path / "straight.yaml"), env))

    # Killed (SIGKILL: no chance to checkpoint) after step 5, then the same command again.
    run = tmp_path / "run"
    config = _config(tiny_features, run, tmp_path / "run.yaml")
    proc = _train(config, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((run / "progress.json").read_text())["step"] >= 5:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = json.loads((run / "progress.json").read_text())["step"]
    assert 5 <= killed_at < STEPS, killed_at
    out = _finish(_train(config, env))
    assert "resuming from" in out

    # Exact resume: every step's losses and the final weights (consolidated from the ZeRO shards).
    a, b = _metrics(straight), _metrics(run)
    assert sorted(a) == sorted(b) == list(range(STEPS))
    for step in range(STEPS):
        for key in ("train/loss", "train/loss_diffusion", "train/loss_repa", "grad_norm/total"):
            assert a[step][key] == b[step][key], (step, key)
    folder = run / "checkpoints" / "last.ckpt"
    marker = json.loads((folder / MARKER).read_text())
    assert marker["global_step"] == STEPS and marker["world_size"] == 2
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    files = {}
    for name, where in (("straight", straight), ("run", run)):
        files[name] = consolidate_deepspeed(where / "checkpoints" / "last.ckpt", tmp_path / f"{name}.ckpt")
    ca = torch.load(files["straight"], weights_only=False)
    cb = torch.load(files["run"], weights_only=False)
    for key in ("state_dict", "ema_state_dict"):
        assert ca[key].keys() == cb[key].keys()
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), (key, name)

    # DeepSpeed clipped with our setting and the EMA is fp32 and moved away from the raw weights.
    states = torch.load(folder / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["ds_config"]["gradient_clipping"] == 1.0
    assert states["ds_config"]["torch_autocast"]["enabled"] is True
    ema = cb["ema_state_dict"]
    raw = cb["state_dict"]["net.model.final_layer.linear.weight"]
    averaged = ema["module.model.final_layer.linear.weight"]
    assert averaged.dtype == torch.float32 and int(ema["num_updates"]) == STEPS
    assert not torch.equal(averaged, raw) and averaged.abs().sum() > 0
    # Per-group gradient norms from the partitioned gradients add up to the engine's global norm.
    row = b[STEPS - 1]
    groups = [v for k, v in row.items() if k.startswith("grad_norm/") and k != "grad_norm/total"]
    assert len(groups) >= 4 and math.isclose(
        math.sqrt(sum(g * g for g in groups)), row["grad_norm/total"], rel_tol=1e-4
    )

    # A release made from the DeepSpeed folder samples exactly like one from the consolidated state.
    emb = np.random.default_rng(0).standard_normal((2, 192)).astype(np.float32)
    sampler = {"method": "euler", "steps": 3, "guidance_scale": 1.0}
    from_folder = CytoSynPipeline.from_checkpoint(folder, device="cpu").generate(emb, sampler=sampler, seed=3)
    from_file = CytoSynPipeline.from_checkpoint(files["run"], device="cpu").generate(
        emb, sampler=sampler, seed=3
    )
    assert np.array_equal(from_folder, from_file)
    release = subprocess.run(
        [
            sys.executable,
            "-m",
            "cytosyn.cli",
            "release",
            "--checkpoint",
            str(run),
            "--output",
            str(tmp_path / "rel"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert release.returncode == 0, release.stderr[-3000:]
    released = CytoSynPipeline.from_pretrained(tmp_path / "rel", device="cpu").generate(
        emb, sampler=sampler, seed=3
    )
    assert np.array_equal(released, from_file)

    # Resuming the 2-rank ZeRO-2 state on one process is refused with the reason, and nothing is lost.
    one = _config(tiny_features, run, tmp_path / "one.yaml", devices=1, max_steps=STEPS + 2)
    proc = _train(one, env, "--force")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "sharded over 2 ranks" in out, out[-3000:]
    assert json.loads((folder / MARKER).read_text()) == marker
