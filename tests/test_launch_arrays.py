"""``cytosyn launch tile|featurize|sample`` (SLURM job arrays over --part i/N) and ``cytosyn status`` on data
folders. SLURM is the fake sbatch / srun / scontrol of tests/test_launch.py; the rendered scripts run for
real under bash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cytosyn.launch.array_status import array_status
from cytosyn.launch.arrays import run_array_launch
from cytosyn.launch.config import LaunchConfig
from cytosyn.launch.launch import read_attempts
from cytosyn.launch.validate import LaunchError
from test_launch import calls, fake_bin

from cytosyn.cli import main
from cytosyn.config import build_config
from cytosyn.manifest import ShardEntry, SplitManifest, write_manifest
from cytosyn.parts import part_record

_WAITING_SRUN = """#!/bin/bash
echo "srun $*" >> {log}
if [ -n "${{FAKE_SRUN_WAIT:-}}" ]; then trap 'echo "srun got TERM" >> {log}; exit 143' TERM; touch "$FAKE_SRUN_WAIT"; sleep 30 & wait; fi
exit "${{FAKE_SRUN_EXIT:-0}}"
"""


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    bin_dir = fake_bin(tmp_path)
    (bin_dir / "srun").write_text(_WAITING_SRUN.format(log=tmp_path / "calls.log"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return bin_dir


def launch_cfg(**kw) -> LaunchConfig:
    kw.setdefault("setup", [])
    return build_config(LaunchConfig, kw)


def slide_folder(root: Path, n: int) -> Path:
    """n files with a slide extension: enough for discovery (the array never opens them)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"TCGA-A1-{i:04d}-01Z-00-DX1.svs").write_bytes(b"")
    return root


def tile_yaml(tmp_path: Path, slides: Path) -> Path:
    path = tmp_path / "tile.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "tiles"), "slides": {"input": [str(slides)]}}))
    return path


def featurize_yaml(tmp_path: Path, shards: int) -> Path:
    split = tmp_path / "dataset" / "train"
    entries = [
        ShardEntry(name=f"train-{i:06d}.tar", count=10, bytes=1, sha256="0" * 64) for i in range(shards)
    ]
    write_manifest(
        SplitManifest(
            split="train",
            image_member="jpg",
            samples=10 * shards,
            shards=entries,
            patients=["p"],
            slides=["s"],
        ),
        split,
    )
    path = tmp_path / "featurize.yaml"
    path.write_text(yaml.safe_dump({"input": str(split), "output": str(tmp_path / "features" / "train")}))
    return path


def sample_yaml(tmp_path: Path, shards: int) -> Path:
    path = tmp_path / "sample.yaml"
    data = {
        "model": str(tmp_path / "release"),
        "output": str(tmp_path / "synthetic"),
        "mode": "unconditional",
    }
    path.write_text(yaml.safe_dump(data | {"num_images": 4 * shards, "samples_per_shard": 4}))
    return path


def stage_config(stage: str, tmp_path: Path, items: int) -> Path:
    if stage == "tile":
        return tile_yaml(tmp_path, slide_folder(tmp_path / "slides", items))
    if stage == "featurize":
        return featurize_yaml(tmp_path, items)
    return sample_yaml(tmp_path, items)


# -------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize("stage", ["tile", "featurize", "sample"])
@pytest.mark.parametrize("parts", [1, 16, 512])
def test_array_scripts_are_valid_for_1_16_and_512_parts(tmp_path, fakes, stage, parts):
    cfg_path = stage_config(stage, tmp_path, items=max(parts, 20))
    result = run_array_launch(stage, cfg_path, [], launch_cfg(cpus_per_task=6, partition="cpu"), parts)
    script = result.script_path.read_text()
    subprocess.run(["bash", "-n", str(result.script_path)], check=True)
    assert f"#SBATCH --array=0-{parts - 1}\n" in script
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=6", "#SBATCH --partition=cpu",
                 "#SBATCH --signal=B:USR1@90", "#SBATCH --requeue", "%x-%A_%a.out", f"PARTS={parts}",
                 "export OMP_NUM_THREADS=", "export CYTOSYN_MAX_ATTEMPTS="):  # fmt: skip
        assert line in script, line
    assert ("#SBATCH --gpus-per-node=1" in script) == (stage != "tile")
    assert f'cytosyn {stage} --config "$CONFIG" --part "$PART/$PARTS"' in script
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    array = json.loads((result.output / "launch" / "array.json").read_text())
    assert array["parts"] == parts and len(array["items"]) == parts
    assert sum(len(x) for x in array["items"]) == max(parts, 20)
    config = yaml.safe_load(result.config_path.read_text())
    assert "part" not in config and "part" not in config.get("run", {})  # every task gets its own
    assert calls(tmp_path) == []  # rendered, not submitted


def test_validation_refuses_empty_tasks_and_multi_node_tasks(tmp_path, fakes):
    cfg_path = stage_config("tile", tmp_path, items=5)
    with pytest.raises(LaunchError, match="6 parts for 5 slides"):
        run_array_launch("tile", cfg_path, [], launch_cfg(), 6)
    forced = run_array_launch("tile", cfg_path, [], launch_cfg(force=True), 6)
    assert any("accepted: force" in w for w in forced.warnings)
    with pytest.raises(LaunchError, match="nodes = 2"):
        run_array_launch("tile", cfg_path, [], launch_cfg(nodes=2), 2)
    with pytest.raises(LaunchError, match="SLURM job arrays"):
        run_array_launch("tile", cfg_path, [], launch_cfg(backend="torchrun"), 2)
    with pytest.raises(LaunchError, match=r"nothing to do|no slides"):
        run_array_launch(
            "tile", tile_yaml(tmp_path, slide_folder(tmp_path / "empty", 0)), [], launch_cfg(), 1
        )
    big = stage_config("featurize", tmp_path, items=1500)
    assert any(
        "MaxArraySize" in w for w in run_array_launch("featurize", big, [], launch_cfg(), 1200).warnings
    )


def test_bad_stage_config_is_refused_like_the_stage_itself(tmp_path, fakes, capsys):
    cfg_path = stage_config("tile", tmp_path, items=4)
    code = main(["launch", "tile", "--config", str(cfg_path), "--parts", "2", "grid.tile_px=0"])
    assert code == 1 and "grid.tile_px" in capsys.readouterr().err
    assert not (tmp_path / "tiles").exists()


def test_dry_run_writes_nothing(tmp_path, fakes, capsys):
    cfg_path = stage_config("featurize", tmp_path, items=8)
    assert main(["launch", "featurize", "--config", str(cfg_path), "--parts", "4", "--dry-run"]) == 0
    assert "#SBATCH --array=0-3" in capsys.readouterr().out
    assert not (tmp_path / "features").exists()


# -------------------------------------------------------------------------------------------- submit


def test_submit_with_fake_sbatch(tmp_path, fakes, capsys):
    cfg_path = stage_config("tile", tmp_path, items=10)
    args = ["launch", "tile", "--config", str(cfg_path), "--parts", "4", "--max-concurrent", "2", "--submit"]
    assert main([*args, "--time", "04:00:00"]) == 0
    out = capsys.readouterr().out
    tiles = tmp_path / "tiles"
    assert "submitted SLURM array job 1234" in out
    assert calls(tmp_path)[:2] == [f"sbatch {tiles}/launch/tile-array.sbatch", f"cwd {tmp_path}"]
    script = (tiles / "launch" / "tile-array.sbatch").read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --time=04:00:00" in script
    assert (tiles / "launch" / "slurm").is_dir()
    records, _ = read_attempts(tiles)
    assert records[-1] | {"time": None, "host": None} == records[-1] | {
        "event": "submit", "job_id": "1234", "stage": "tile", "parts": 4, "time": None, "host": None,
    }  # fmt: skip
    assert json.loads((tiles / "launch" / "array.json").read_text())["job_ids"] == ["1234"]


def _run_task(script: Path, task: int, restart: int = 0, **env) -> subprocess.Popen:
    environ = dict(os.environ, SLURM_ARRAY_JOB_ID="1234", SLURM_ARRAY_TASK_ID=str(task), SLURM_JOB_ID="1240")
    environ |= {"SLURM_RESTART_COUNT": str(restart), **env}
    return subprocess.Popen(["bash", str(script)], env=environ, stderr=subprocess.PIPE, text=True)


def test_a_task_runs_its_part_and_requeues_itself_near_the_time_limit(tmp_path, fakes):
    cfg_path = stage_config("tile", tmp_path, items=10)
    result = run_array_launch("tile", cfg_path, [], launch_cfg(cpus_per_task=4, max_attempts=2), 4)
    proc = _run_task(result.script_path, 3)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert (
        f"srun --ntasks=1 --cpus-per-task=4 cytosyn tile --config {result.config_path} --part 3/4 --workers 4"
        in calls(tmp_path)
    )

    started = tmp_path / "srun-started"
    proc = _run_task(result.script_path, 1, FAKE_SRUN_WAIT=str(started))
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 does before the time limit
    assert proc.wait(timeout=60) == 75
    assert "scontrol requeue 1234_1" in calls(tmp_path) and "srun got TERM" in calls(tmp_path)
    events = [(r["event"], r.get("part")) for r in read_attempts(result.output)[0]]
    assert events[-3:] == [("start", 1), ("requeue", 1), ("end", 1)]
    # beyond max_attempts the task does not start again
    proc = _run_task(result.script_path, 1, restart=2)
    assert proc.wait(timeout=60) == 1 and "max_attempts" in proc.stderr.read()
    assert read_attempts(result.output)[0][-1]["event"] == "gave_up"


# -------------------------------------------------------------------------------------------- status


def test_status_aggregates_done_failed_and_missing_parts(tmp_path, fakes):
    cfg_path = stage_config("tile", tmp_path, items=8)
    result = run_array_launch("tile", cfg_path, [], launch_cfg(), 4)
    tiles = result.output
    items = json.loads((tiles / "launch" / "array.json").read_text())["items"]

    def state(slide: str, **fields) -> None:
        folder = tiles / "slides" / slide
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps(fields))

    for slide in items[0] + items[1]:  # parts 0 and 1 finished
        state(slide, status="done", tiles=100)
    state(items[2][0], status="failed", error_type="NoTissue", error="no tissue: 0 of 117 grid tiles")
    for part in (0, 1):
        with part_record(tiles, "tile", f"{part}/4") as rec:
            rec.update(tiles=200)
    with pytest.raises(OSError):
        with part_record(tiles, "tile", "2/4"):
            raise OSError(28, "No space left on device")
    # part 3 never started

    status = array_status(tiles)
    assert (status.done, status.units, status.remaining) == (4, 400, 3)
    assert status.failed_items == {items[2][0]: "NoTissue: no tissue: 0 of 117 grid tiles"}
    assert [p.state for p in status.part_status] == ["done", "done", "failed", "not started"]
    text = status.report()
    for expected in ("done        4 of 8 slides (400 tiles)", "failed      1 slides (NoTissue 1)",
                     "remaining   3 slides", "2 done, 1 failed, 1 not started",
                     "part 2 FAILED: OSError: [Errno 28] No space left on device", "throughput  "):  # fmt: skip
        assert expected in text, text
    assert main(["status", str(tiles)]) == 0


def test_status_of_a_real_part_run(tmp_path, fixture_slide):
    """A real `cytosyn tile --part 0/2` leaves a part record that status reads, with its throughput."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a", "b"):
        (slides / f"{name}.svs").symlink_to(fixture_slide)
    out = tmp_path / "tiles"
    assert (
        main(["tile", "--input", str(slides), "--output", str(out), "--part", "0/2", "run.progress=false"])
        == 0
    )
    status = array_status(out)
    assert status.stage == "tile" and status.done == 1 and status.units > 20
    assert [p.state for p in status.part_status] == ["done", "not started"]
    assert "tiles/s" in status.report()


def test_status_of_featurize_and_sample_folders(tmp_path, fakes):
    for stage, sub in (("featurize", ".featurize"), ("sample", ".sample")):
        cfg_path = stage_config(stage, tmp_path, items=6)
        result = run_array_launch(stage, cfg_path, [], launch_cfg(), 3)
        names = [
            n
            for chunk in json.loads((result.output / "launch" / "array.json").read_text())["items"]
            for n in chunk
        ]
        (result.output / sub).mkdir(parents=True)
        for name in names[:2]:
            body = (
                {"output": {"count": 10}}
                if stage == "featurize"
                else {"status": "done", "shard": {"count": 4}}
            )
            (result.output / sub / f"{name}.json").write_text(json.dumps(body))
        status = array_status(result.output)
        assert (status.stage, status.done, status.remaining) == (stage, 2, 4)
        assert status.units == (20 if stage == "featurize" else 8)
