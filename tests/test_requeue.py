"""Requeue bookkeeping shared by the job scripts and training: bounded attempts, and status paths."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_train_config
from cytosyn.launch.config import LaunchConfig
from cytosyn.launch.launch import status
from cytosyn.launch.render import JobSpec, render_script

from cytosyn.config import build_config
from cytosyn.training.callbacks import Preemption
from cytosyn.training.config import TrainConfig
from cytosyn.training.run import run_training


def _fake_bin(tmp_path: Path) -> Path:
    """srun records the attempt bound it sees; scontrol records its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {
        "srun": f'echo "srun sees CYTOSYN_MAX_ATTEMPTS=$CYTOSYN_MAX_ATTEMPTS" >> {tmp_path}/calls.log\n',
        "scontrol": f'echo "scontrol $*" >> {tmp_path}/calls.log\n',
    }.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("backend", ["slurm", "torchrun"])
def test_job_scripts_bound_the_attempts_training_requeues(tmp_path, backend):
    cfg = build_config(LaunchConfig, {"backend": backend, "max_attempts": 7})
    spec = JobSpec(run_dir=tmp_path / "run", config_path=tmp_path / "run" / "config.yaml", workdir=tmp_path)
    script = render_script(cfg, spec, environ={})
    assert "export CYTOSYN_MAX_ATTEMPTS=$MAX_ATTEMPTS" in script and "MAX_ATTEMPTS=7" in script
    if backend == "slurm":
        assert "Lightning saves a checkpoint" not in script  # one mechanism: cytosyn's
        path = tmp_path / "job.sbatch"
        path.write_text(script)
        env = os.environ | {"PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", "SLURM_JOB_ID": "99"}
        proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "srun sees CYTOSYN_MAX_ATTEMPTS=7" in (tmp_path / "calls.log").read_text()


@pytest.mark.parametrize(("restarts", "requeued"), [(0, True), (1, True), (2, False)])
def test_training_requeues_itself_only_while_attempts_remain(tmp_path, monkeypatch, restarts, requeued):
    monkeypatch.setenv("PATH", f"{_fake_bin(tmp_path)}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    Preemption(tmp_path, max_attempts=3)._requeue()
    log = tmp_path / "calls.log"
    assert (log.exists() and "scontrol requeue 1234" in log.read_text()) is requeued


def test_status_finds_the_checkpoint_of_a_run_folder_given_as_a_relative_path(
    tiny_features, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cfg = build_config(
        TrainConfig, tiny_train_config(tiny_features, Path("runs/rel")), ["trainer.max_steps=2"]
    )
    run_training(cfg)
    text = status(Path("runs/rel"))
    line = next(x for x in text.splitlines() if x.strip().startswith("checkpoint"))
    assert "none yet" not in line and "runs/rel/checkpoints/last.ckpt" in line, text
    assert "runs/rel/runs/rel" not in text
