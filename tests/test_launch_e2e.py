"""A real 2-process run through the torchrun launcher, preempted mid-run and relaunched."""

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
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


@pytest.mark.slow
def test_preempted_torchrun_job_resumes_to_the_same_losses(tiny_features, tmp_path):
    reference = _launch(_write_train_yaml(tiny_features, tmp_path / "ref", tmp_path / "ref.yaml"), tmp_path)
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]

    run = tmp_path / "run"
    first = _launch(_write_train_yaml(tiny_features, run, tmp_path / "run.yaml"), tmp_path)
    progress = run / "progress.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if json.loads(progress.read_text())["step"] >= 6:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.1)
    else:
        first.kill()
        pytest.fail("the job never reached step 6")
    os.killpg(first.pid, signal.SIGTERM)  # what SLURM does to the whole job at preemption
    first.communicate(timeout=300)
    state = json.loads(progress.read_text())
    assert state["status"] == "preempted" and 6 <= state["step"] < 24, state
    events = [json.loads(line) for line in (run / "launch" / "attempts.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "end" and events[-1]["preempted"] is True

    second = _launch(tmp_path / "run.yaml", tmp_path)  # the same command again
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    assert json.loads(progress.read_text())["status"] == "finished"

    ref_losses, run_losses = dict(_losses(tmp_path / "ref")), dict(_losses(run))
    assert max(ref_losses) == max(run_losses) == 23
    for step in range(state["step"], 24):  # every step trained after the resume
        assert run_losses[step] == pytest.approx(ref_losses[step], rel=1e-6, abs=1e-7), step
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-7), key
