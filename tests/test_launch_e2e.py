"""Real 2-process runs through torchrun and the launcher, stopped by signals mid-run and relaunched."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_train_config


def _write_train_yaml(features: dict[str, Path], run_dir: Path, path: Path) -> Path:
    tree = tiny_train_config(features, run_dir)
    tree["data"]["batch_size"] = 4
    tree["trainer"] |= {"devices": 2, "strategy": "ddp", "max_steps": 24, "checkpoint_every_n_steps": 1000}
    tree["optim"]["global_batch"] = 8
    tree["data"]["train"], tree["data"]["val"] = str(features["train"]), str(features["val"])
    path.write_text(yaml.safe_dump(tree))
    return path


def _launch(train_yaml: Path, cwd: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "cytosyn.cli", "launch", "--config", str(train_yaml), "--backend", "torchrun",
        "--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "1", "launch.restart_delay_seconds=0",
    ]  # fmt: skip
    return _start(cmd, cwd)


def _start(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """A job in its own process group (signals go to the whole job, as SLURM or a terminal send them)."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=os.environ | {"PYTHONUNBUFFERED": "1"} | env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((run / "progress.json").read_text())["step"] >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the job never reached step {step}")


def _raw_torchrun(train_yaml: Path, cwd: Path) -> subprocess.Popen:
    """`torchrun` itself, as a user would start it in a terminal (Ctrl-C reaches the whole group)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "localhost:0", "--max-restarts", "0", "-m", "cytosyn.cli", "train", "--config",
        str(train_yaml),
    ]  # fmt: skip
    return _start(cmd, cwd, OMP_NUM_THREADS="1")


def _metrics_rows(run_dir: Path) -> dict[int, float]:
    rows: dict[int, float] = {}
    for step, loss in _losses(run_dir):
        assert step not in rows, f"step {step} logged twice"
        rows[step] = loss
    return rows


@pytest.mark.slow
def test_three_attempts_sigint_then_sigterm_resume_exactly_with_the_whole_history(tiny_features, tmp_path):
    """Attempt 1 under plain torchrun, stopped by Ctrl-C (SIGINT to torchrun and its workers); attempt 2
    through the launcher's torchrun loop, stopped like a SLURM preemption (SIGTERM to the whole job);
    attempt 3 finishes. Each stop checkpoints at a step boundary; the metrics history holds every step
    exactly once and equals an uninterrupted run's, and so do the final weights."""
    reference = _launch(_write_train_yaml(tiny_features, tmp_path / "ref", tmp_path / "ref.yaml"), tmp_path)
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]

    run = tmp_path / "run"
    train_yaml = _write_train_yaml(tiny_features, run, tmp_path / "run.yaml")
    progress = run / "progress.json"

    first = _raw_torchrun(train_yaml, tmp_path)
    _wait_for_step(run, first, 6)
    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    out, _ = first.communicate(timeout=300)
    state = json.loads(progress.read_text())
    assert state["status"] == "preempted" and 6 <= state["step"] < 24, (state, out[-3000:])
    first_stop = state["step"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == first_stop

    second = _launch(train_yaml, tmp_path)
    _wait_for_step(run, second, first_stop + 4)
    os.killpg(second.pid, signal.SIGTERM)  # what SLURM does to the whole job at preemption
    second.communicate(timeout=300)
    state = json.loads(progress.read_text())
    assert state["status"] == "preempted" and first_stop < state["step"] < 24, state
    events = [json.loads(line) for line in (run / "launch" / "attempts.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "end" and events[-1]["preempted"] is True

    third = _launch(train_yaml, tmp_path)
    out, _ = third.communicate(timeout=600)
    assert third.returncode == 0, out[-3000:]
    assert json.loads(progress.read_text())["status"] == "finished"

    ref_losses, run_losses = _metrics_rows(tmp_path / "ref"), _metrics_rows(run)
    assert sorted(run_losses) == sorted(ref_losses) == list(range(24))  # complete across 3 attempts
    for step in range(24):
        assert run_losses[step] == pytest.approx(ref_losses[step], rel=1e-6, abs=1e-7), step
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-7), key
