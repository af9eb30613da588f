"""cytosyn launch: rendered SLURM / torchrun scripts, pre-launch checks, submission, restart loops, status.

SLURM and torchrun are replaced by small fake executables on PATH that record how they were called; the
rendered scripts themselves run for real under bash.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cytosyn.launch.config import LaunchConfig
from cytosyn.launch.launch import (
    add_launch_arguments,
    cmd_launch,
    parse_job_id,
    prepare_training_config,
    read_attempts,
    run_launch,
    status,
)
from cytosyn.launch.render import JobSpec, omp_threads, render_script
from cytosyn.launch.validate import (
    LaunchError,
    OutputLocationError,
    check_checkpoint_dir,
    check_global_batch,
    check_shared_storage,
    config_diff,
)

from cytosyn.config import ConfigError, build_config
from cytosyn.manifest import ShardEntry, SplitManifest, write_manifest

# ------------------------------------------------------------------------------------------- helpers


def write_split(folder: Path, shards: int, per_shard: int = 100) -> Path:
    entries = [
        ShardEntry(name=f"train-{i:06d}.tar", count=per_shard, bytes=1000, sha256="0" * 64)
        for i in range(shards)
    ]
    manifest = SplitManifest(
        split="train",
        image_member="jpg",
        samples=shards * per_shard,
        shards=entries,
        patients=["TCGA-AA-0001"],
        slides=["TCGA-AA-0001-01Z"],
    )
    write_manifest(manifest, folder)
    return folder


def write_train_config(tmp_path: Path, **sections) -> Path:
    """A training config honouring the launch contract (plus an opaque section launch must carry)."""
    data = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name": "SiT-XL/2", "repa": {"depth": 8}},  # opaque to launch
        "trainer": {"num_nodes": 1, "devices": 1, "accumulate_grad_batches": 1, "max_steps": 1000},
        "data": {"batch_size": 32, "num_workers": 2, "train": str(write_split(tmp_path / "split", 64))},
        "optim": {"global_batch": 32, "lr": 1.0e-4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fake_bin(tmp_path: Path) -> Path:
    """Fake sbatch / srun / scontrol / torchrun that record their arguments (one line per call)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    scripts = {
        "sbatch": f'echo "sbatch $*" >> {log}\necho "cwd $PWD" >> {log}\necho "Submitted batch job 1234"\n',
        "scontrol": f'echo "scontrol $*" >> {log}\n',
        "srun": f'echo "srun $*" >> {log}\nexit "${{FAKE_SRUN_EXIT:-0}}"\n',
        # FAKE_FAILS times "exit 75", then FAKE_FINAL; FAKE_MODE=progress: real torchrun's way (exit 1,
        # progress.json says preempted); FAKE_MODE=wait: block until TERM, then checkpoint like training.
        "torchrun": f"""echo "torchrun $*" >> {log}
n=$(cat "$FAKE_COUNTER" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$FAKE_COUNTER"
preempt() {{ printf '{{"status": "preempted", "step": %d}}' "$n" > "$FAKE_RUN_DIR/progress.json.tmp"
  mv "$FAKE_RUN_DIR/progress.json.tmp" "$FAKE_RUN_DIR/progress.json"; exit 1; }}
if [ "${{FAKE_MODE:-}}" = wait ]; then
  trap 'kill $sleeper; preempt' TERM; sleep 30 & sleeper=$!; touch "$FAKE_COUNTER.started"; wait; exit 9
fi
if [ "$n" -le "${{FAKE_FAILS:-0}}" ]; then
  if [ "${{FAKE_MODE:-}}" = progress ]; then preempt; fi
  exit 75
fi
exit "${{FAKE_FINAL:-0}}"
""",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    return bin_dir


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    bin_dir = fake_bin(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_COUNTER", str(tmp_path / "counter"))
    monkeypatch.setenv("FAKE_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    return bin_dir


def launch_cfg(**kw) -> LaunchConfig:
    kw.setdefault("restart_delay_seconds", 0)
    kw.setdefault("setup", [])
    return build_config(LaunchConfig, kw)


# -------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8)])
def test_rendered_scripts_are_valid_bash_with_the_right_arguments(tmp_path, nodes, gpus):
    spec = JobSpec(tmp_path / "run", tmp_path / "run" / "config.yaml", tmp_path, num_workers=7)
    environ = {"NCCL_SOCKET_IFNAME": "ib0", "UNRELATED": "x"}
    slurm = launch_cfg(nodes=nodes, gpus_per_node=gpus, cpus_per_task=16, partition="gpu", time="2-00:00:00")
    text = render_script(slurm, spec, environ)
    for directive in (
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus}",
        f"#SBATCH --gpus-per-node={gpus}",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path}/run/slurm/%x-%j.out",
    ):
        assert directive in text
    assert f"srun --ntasks-per-node={gpus} --cpus-per-task=16 --kill-on-bad-exit=1 cytosyn train" in text
    # every #SBATCH line comes before the first command (sbatch stops reading them there)
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))

    endpoint = "node0:29500" if nodes > 1 else None
    loop = launch_cfg(
        backend="torchrun", nodes=nodes, gpus_per_node=gpus, cpus_per_task=16, rdzv_endpoint=endpoint
    )
    text_t = render_script(loop, spec, environ)
    assert f"torchrun --nnodes={nodes} --nproc-per-node={gpus} --rdzv-backend=c10d" in text_t
    assert f"--rdzv-endpoint={endpoint or 'localhost:0'}" in text_t
    assert "--max-restarts=0 -m cytosyn.cli train --config" in text_t

    for script, name in ((text, "job.sbatch"), (text_t, "torchrun.sh")):
        path = tmp_path / name
        path.write_text(script)
        subprocess.run(["bash", "-n", str(path)], check=True)
        for env in (
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
            "export NCCL_ASYNC_ERROR_HANDLING=1",
            "export OMP_NUM_THREADS=2",  # 16 cores // (7 workers + 1)
            "export WANDB_MODE=offline",
            f"export HF_HOME={tmp_path}/run/cache/huggingface",
            "export TORCH_HOME=",
            "export TORCH_EXTENSIONS_DIR=",
            "export PYTHONUNBUFFERED=1",
            "export NCCL_SOCKET_IFNAME=ib0",  # passed through from the launching shell
        ):
            assert env in script, env
        assert "UNRELATED" not in script


def test_env_and_extra_lines_are_quoted_and_validated(tmp_path):
    spec = JobSpec(tmp_path / "run", tmp_path / "run" / "config.yaml", tmp_path)
    cfg = launch_cfg(
        env={"NCCL_DEBUG": "INFO", "WEIRD": "a b; rm -rf /"},
        extra_sbatch=["--exclusive", "#SBATCH --mem=0"],
        cache_dir="/shared/cache",
        wandb_mode="disabled",
    )
    text = render_script(cfg, spec, {})
    assert "export WEIRD='a b; rm -rf /'" in text
    assert "#SBATCH --exclusive\n#SBATCH --mem=0" in text
    assert "export HF_HOME=/shared/cache/huggingface" in text
    assert "export WANDB_MODE=disabled" in text
    assert omp_threads(8, None) == 1 and omp_threads(32, 3) == 8 and omp_threads(4, 0) == 4
    with pytest.raises(ConfigError, match="extra_sbatch"):
        launch_cfg(extra_sbatch=["mem=0"])
    with pytest.raises(ConfigError, match="env"):
        launch_cfg(env={"BAD-NAME": "1"})
    with pytest.raises(ConfigError, match="time"):
        launch_cfg(time="25:61:00")
    with pytest.raises(ConfigError, match="nodez: unknown key"):
        launch_cfg(nodez=2)
    # YAML 1.1 reads an unquoted 24:00:00 as 86400 seconds
    assert build_config(LaunchConfig, yaml.safe_load("time: 24:00:00")).time == "24:00:00"
    assert launch_cfg(time="1-12:00:00").time_seconds == 36 * 3600


# ---------------------------------------------------------------------------------------- validation


def test_inconsistent_global_batch_is_refused_with_the_numbers(tmp_path, fakes):
    train = write_train_config(tmp_path, optim={"global_batch": 256})
    with pytest.raises(LaunchError) as err:
        run_launch(train, launch_cfg(nodes=1, gpus_per_node=2), [])
    msg = str(err.value)
    assert "optim.global_batch = 256" in msg and "32 × 2 × 1 × 1 = 64" in msg
    assert "trainer.accumulate_grad_batches=4" in msg
    assert calls(tmp_path) == []  # nothing submitted
    assert not (tmp_path / "run").exists()  # nothing written
    # 4 nodes × 8 GPUs × batch 8 = 256: consistent
    tree = {
        "optim": {"global_batch": 256},
        "data": {"batch_size": 8},
        "trainer": {"devices": 8, "num_nodes": 4},
    }
    assert check_global_batch(tree) == []
    assert "missing" in check_global_batch({"data": {"batch_size": 8}, "trainer": {"devices": 1}})[0]


def test_too_few_shards_is_an_error_unless_forced(tmp_path, fakes):
    split = write_split(tmp_path / "small", 3)
    train = write_train_config(
        tmp_path, data={"train": str(split), "num_workers": 2, "batch_size": 4}, optim={"global_batch": 32}
    )
    with pytest.raises(LaunchError, match=r"3 shards .* 2 × 8 = 16 readers"):
        run_launch(train, launch_cfg(gpus_per_node=8, dry_run=True), [])
    result = run_launch(train, launch_cfg(gpus_per_node=8, dry_run=True, force=True), [])
    assert any("3 shards" in w and "force" in w for w in result.warnings)
    # a split that is not visible from here is only a warning
    result = run_launch(
        train, launch_cfg(dry_run=True), ["data.train=/nowhere/train", "optim.global_batch=4"]
    )
    assert any("not visible" in w for w in result.warnings)


def test_run_dir_on_node_local_storage_warns(tmp_path):
    assert "node-local" in check_shared_storage(Path("/tmp/somewhere/run"))[0]
    assert "/dev/shm" in check_shared_storage(Path("/dev/shm/run"))[0]
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "overlay / overlay rw 0 0\n"
        "fs1:/ /lustre lustre rw 0 0\n"
        "srv:/home /home nfs4 rw 0 0\n"
        "/dev/nvme0n1 /scratch xfs rw 0 0\n"
    )
    assert check_shared_storage(Path("/lustre/project/run"), mounts_file=mounts) == []
    assert check_shared_storage(Path("/home/me/run"), mounts_file=mounts) == []
    warning = check_shared_storage(Path("/scratch/me/run"), mounts_file=mounts)[0]
    assert "looks node-local (xfs mounted at /scratch)" in warning
    assert "node-local (overlay" in check_shared_storage(Path("/opt/run"), mounts_file=mounts)[0]


def test_unwritable_checkpoint_dir_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputLocationError, match="cannot write checkpoints"):
        check_checkpoint_dir(blocker / "run")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(OutputLocationError, match="permission denied"):
        check_checkpoint_dir(tmp_path / "run")


def test_config_drift_is_refused_unless_forced(tmp_path, fakes):
    train = write_train_config(tmp_path)
    first = run_launch(train, launch_cfg(), [])
    assert first.job_id == "1234"
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"] == {"name": "SiT-XL/2", "repa": {"depth": 8}}  # opaque keys carried

    # the same settings again: resumes, config.yaml kept
    again = run_launch(train, launch_cfg(), [])
    assert any("kept" in n for n in again.notes)

    with pytest.raises(LaunchError) as err:
        run_launch(train, launch_cfg(), ["optim.lr=2.0e-4", "model.repa.depth=4"])
    msg = str(err.value)
    assert "optim.lr: 0.0001 → 0.0002" in msg and "model.repa.depth: 8 → 4" in msg and "2 key(s)" in msg
    with pytest.raises(LaunchError, match=r"trainer.num_nodes: 1 → 2"):
        run_launch(train, launch_cfg(nodes=2, gpus_per_node=1), ["optim.global_batch=64"])

    forced = run_launch(train, launch_cfg(force=True), ["optim.lr=2.0e-4"])
    assert forced.job_id == "1234"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 2.0e-4
    backups = list((tmp_path / "run").glob("config.*.yaml"))
    assert len(backups) == 1 and yaml.safe_load(backups[0].read_text())["optim"]["lr"] == 1.0e-4

    # keys filled in by training (only in the run folder's config) are not drift
    assert config_diff({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": 2.0}}) == []
    assert config_diff({"a": True}, {"a": 1}) == ["a: True → 1"]


def test_sizes_come_from_the_training_config_unless_given(tmp_path):
    train = write_train_config(tmp_path, trainer={"num_nodes": 2, "devices": 4})
    _, cfg, _ = prepare_training_config(train, launch_cfg(), [], tmp_path)
    assert (cfg.nodes, cfg.gpus_per_node) == (2, 4)
    tree, cfg, _ = prepare_training_config(train, launch_cfg(gpus_per_node=8), ["run_dir=rel/run"], tmp_path)
    assert (cfg.nodes, cfg.gpus_per_node) == (2, 8)
    assert tree["trainer"]["devices"] == 8 and tree["trainer"]["num_nodes"] == 2
    assert tree["run_dir"] == str(tmp_path / "rel" / "run")  # made absolute: the job may run elsewhere


# ------------------------------------------------------------------------------------ SLURM end to end


def test_slurm_submission_end_to_end_with_fake_sbatch(tmp_path, fakes):
    train = write_train_config(tmp_path, optim={"global_batch": 256}, data={"batch_size": 8})
    result = run_launch(train, launch_cfg(nodes=4, gpus_per_node=8, partition="gpu", time="12:00:00"), [])
    run = tmp_path / "run"
    assert result.job_id == "1234" and result.returncode is None
    assert calls(tmp_path)[:2] == [f"sbatch {run}/launch/job.sbatch", f"cwd {tmp_path}"]
    script = (run / "launch" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=4" in script and "#SBATCH --partition=gpu" in script
    assert os.access(run / "launch" / "job.sbatch", os.X_OK)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["num_nodes"] == 4 and saved["trainer"]["devices"] == 8
    assert (run / "slurm").is_dir() and (run / "checkpoints").is_dir()
    records, _ = read_attempts(run)
    assert records[-1]["event"] == "submit" and records[-1]["job_id"] == "1234"
    assert "submitted SLURM job 1234" in result.report()
    assert parse_job_id("5678;cluster\n") == "5678" and parse_job_id("nonsense") is None


def _run_sbatch_script(tmp_path: Path, restart_count: int, srun_exit: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, SLURM_JOB_ID="1234", SLURM_RESTART_COUNT=str(restart_count))
    env["FAKE_SRUN_EXIT"] = str(srun_exit)
    script = tmp_path / "run" / "launch" / "job.sbatch"
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)


def test_sbatch_script_requeues_itself_when_training_exits_75(tmp_path, fakes):
    train = write_train_config(tmp_path, optim={"global_batch": 256}, data={"batch_size": 32})
    run_launch(train, launch_cfg(gpus_per_node=8, max_attempts=3), [])
    run = tmp_path / "run"

    proc = _run_sbatch_script(tmp_path, restart_count=0, srun_exit=75)
    assert proc.returncode == 75, proc.stderr
    log = calls(tmp_path)
    srun = next(line for line in log if line.startswith("srun"))
    assert (
        srun
        == f"srun --ntasks-per-node=8 --cpus-per-task=8 --kill-on-bad-exit=1 cytosyn train --config {run}/config.yaml"
    )
    assert "scontrol requeue 1234" in log
    events = [(r["event"], r.get("attempt"), r.get("exit_code")) for r in read_attempts(run)[0]]
    assert events[-3:] == [("start", 1, None), ("end", 1, 75), ("requeue", 1, None)]

    # the last allowed attempt does not requeue again; beyond it the script refuses to train
    proc = _run_sbatch_script(tmp_path, restart_count=2, srun_exit=75)
    assert proc.returncode == 75 and "attempt 3 of 3" in proc.stderr
    assert sum(line == "scontrol requeue 1234" for line in calls(tmp_path)) == 1
    n_srun = sum(line.startswith("srun") for line in calls(tmp_path))
    proc = _run_sbatch_script(tmp_path, restart_count=3, srun_exit=0)
    assert proc.returncode == 1 and "max_attempts" in proc.stderr
    assert sum(line.startswith("srun") for line in calls(tmp_path)) == n_srun  # not started
    assert read_attempts(run)[0][-1]["event"] == "gave_up"

    # a finished training: exit 0, no requeue
    proc = _run_sbatch_script(tmp_path, restart_count=0, srun_exit=0)
    assert proc.returncode == 0
    assert sum(line == "scontrol requeue 1234" for line in calls(tmp_path)) == 1


# ----------------------------------------------------------------------------------- torchrun loop


def test_torchrun_loop_restarts_on_75_until_finished(tmp_path, fakes, monkeypatch):
    monkeypatch.setenv("FAKE_FAILS", "2")
    train = write_train_config(tmp_path)
    result = run_launch(train, launch_cfg(backend="torchrun"), [])
    assert result.returncode == 0
    runs = [line for line in calls(tmp_path) if line.startswith("torchrun")]
    assert len(runs) == 3
    assert runs[0].startswith(
        "torchrun --nnodes=1 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=localhost:0"
    )
    assert runs[0].endswith(f"-m cytosyn.cli train --config {tmp_path}/run/config.yaml")
    records, bad = read_attempts(tmp_path / "run")
    assert bad == 0
    starts = [r for r in records if r["event"] == "start"]
    ends = [r for r in records if r["event"] == "end"]
    assert [r["attempt"] for r in starts] == [1, 2, 3]
    assert [(r["exit_code"], r["preempted"]) for r in ends] == [(75, True), (75, True), (0, False)]
    assert len({r["job_id"] for r in starts}) == 1


def test_torchrun_loop_gives_up_after_max_attempts(tmp_path, fakes, monkeypatch, capfd):
    monkeypatch.setenv("FAKE_FAILS", "99")
    train = write_train_config(tmp_path)
    result = run_launch(train, launch_cfg(backend="torchrun", max_attempts=3), [])
    assert result.returncode == 1
    assert "gave up: training was started 3 times (max_attempts)" in capfd.readouterr().err
    records, _ = read_attempts(tmp_path / "run")
    assert sum(r["event"] == "start" for r in records) == 3
    assert records[-1]["event"] == "gave_up"


def test_torchrun_loop_reads_preemption_from_progress_when_torchrun_says_1(tmp_path, fakes, monkeypatch):
    # real torchrun turns a worker's exit 75 into its own exit 1; progress.json tells the truth
    monkeypatch.setenv("FAKE_FAILS", "1")
    monkeypatch.setenv("FAKE_MODE", "progress")
    train = write_train_config(tmp_path)
    result = run_launch(train, launch_cfg(backend="torchrun"), [])
    assert result.returncode == 0
    ends = [r for r in read_attempts(tmp_path / "run")[0] if r["event"] == "end"]
    assert [(r["exit_code"], r["preempted"]) for r in ends] == [(1, True), (0, False)]


def test_torchrun_loop_stops_on_a_real_failure(tmp_path, fakes, monkeypatch):
    monkeypatch.setenv("FAKE_FINAL", "3")
    train = write_train_config(tmp_path)
    # a stale "preempted" progress.json from an earlier attempt must not count as a preemption now
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "progress.json").write_text('{"status": "preempted"}')
    result = run_launch(train, launch_cfg(backend="torchrun"), [])
    assert result.returncode == 3
    assert sum(line.startswith("torchrun") for line in calls(tmp_path)) == 1


def test_torchrun_loop_passes_term_on_and_stops_with_75(tmp_path, fakes, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "wait")
    train = write_train_config(tmp_path)
    cfg = launch_cfg(backend="torchrun")
    _, cfg, run_dir = prepare_training_config(train, cfg, [], tmp_path)
    script = render_script(cfg, JobSpec(run_dir, run_dir / "config.yaml", tmp_path, 2))
    path = tmp_path / "torchrun.sh"
    path.write_text(script)
    proc = subprocess.Popen(["bash", str(path)], stderr=subprocess.PIPE, text=True)
    started = Path(os.environ["FAKE_COUNTER"] + ".started")
    deadline = time.monotonic() + 20
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert "stopped by a signal" in err
    ends = [r for r in read_attempts(run_dir)[0] if r["event"] == "end"]
    assert [(r["exit_code"], r["preempted"]) for r in ends] == [(1, True)]


def test_torchrun_multi_node_needs_an_endpoint(tmp_path, fakes):
    train = write_train_config(tmp_path, optim={"global_batch": 64})
    with pytest.raises(LaunchError, match="rdzv_endpoint"):
        run_launch(train, launch_cfg(backend="torchrun", nodes=2, dry_run=True), [])


# ------------------------------------------------------------------------------------------ CLI glue


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    return cmd_launch(parser.parse_args(argv))


def test_cli_dry_run_writes_nothing_and_prints_the_script(tmp_path, fakes, capsys):
    train = write_train_config(tmp_path, optim={"global_batch": 64}, data={"batch_size": 8})
    code = _cli(
        [
            "--config",
            str(train),
            "--nodes",
            "1",
            "--gpus-per-node",
            "8",
            "--time",
            "48:00:00",
            "--dry-run",
            "launch.env.NCCL_DEBUG=INFO",
            "optim.lr=3.0e-4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --time=48:00:00" in out
    assert "export NCCL_DEBUG=INFO" in out and "#   lr: 0.0003" in out and "dry run: nothing written" in out
    assert not (tmp_path / "run").exists() and calls(tmp_path) == []
    assert _cli(["--config", str(train), "--gpus-per-node", "3"]) == 1  # 8 × 3 × 1 ≠ 64


def test_cli_unwritable_run_dir_exits_4(tmp_path, fakes, capsys):
    (tmp_path / "file").write_text("x")
    train = write_train_config(tmp_path, run_dir=str(tmp_path / "file" / "run"))
    assert _cli(["--config", str(train)]) == 4
    assert "cannot write checkpoints" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- status


def test_status_summarises_a_hand_written_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "launch").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 2_500_000)
    config = {
        "run_dir": str(run),
        "trainer": {"num_nodes": 4, "devices": 8, "max_steps": 400_000},
        "optim": {"global_batch": 256},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    now = time.time()
    (run / "progress.json").write_text(
        json.dumps(
            {
                "step": 12_000,
                "images_seen": 3_072_000,
                "last_checkpoint": "checkpoints/last.ckpt",
                "loss": 0.1234,
                "images_per_s": 2400.0,
                "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 120)),
                "status": "running",
            }
        )
    )
    lines = [
        {"event": "submit", "time": "2026-01-01T00:00:00Z", "host": "login1", "job_id": "1234"},
        {"event": "start", "time": "2026-01-01T00:01:00Z", "host": "gpu01", "job_id": "1234", "attempt": 1},
        {
            "event": "end",
            "time": "2026-01-02T00:00:00Z",
            "host": "gpu01",
            "job_id": "1234",
            "attempt": 1,
            "exit_code": 75,
            "preempted": True,
        },
        {"event": "start", "time": "2026-01-02T00:05:00Z", "host": "gpu07", "job_id": "1234", "attempt": 2},
    ]
    (run / "launch" / "attempts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    text = status(run)
    assert "running (progress updated 2 min ago)" in text
    assert "12,000 of 400,000 (3.0 %)" in text
    assert "3,072,000 (3.07 M)" in text
    assert "last loss    0.1234" in text
    assert "2,400.0 images/s (75.0 per GPU on 32 GPUs)" in text
    assert "to go at this rate" in text  # 388,000 steps × 256 / 2400 ≈ 11.5 days
    assert f"{run / 'checkpoints' / 'last.ckpt'} (2.5 MB, saved" in text
    assert "4 node(s) × 8 GPU(s) = 32 GPUs, global batch 256" in text
    assert "2 start(s), 1 submission(s); job(s) 1234" in text
    assert "#1 2026-01-01T00:01:00Z" in text and "exit 75 (preempted" in text
    assert "#2 2026-01-02T00:05:00Z" in text and "no end recorded" in text
    assert "1 unreadable line(s)" in text

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "none yet" in status(empty)
    with pytest.raises(FileNotFoundError):
        status(tmp_path / "missing")


def test_example_launch_config_states_the_defaults():
    from cytosyn.config import load_config

    path = Path(__file__).resolve().parent.parent / "configs" / "launch.yaml"
    assert load_config(LaunchConfig, path) == LaunchConfig()
