"""``cytosyn launch`` and ``cytosyn status``: render, check and submit a training job; summarise a run folder.

Launch only renders and submits commands (DESIGN.md): it reads the training config as plain YAML, sets
``trainer.num_nodes`` / ``trainer.devices`` from the launch settings, checks the whole job
(:mod:`cytosyn.launch.validate`), writes ``RUN_DIR/config.yaml`` (first start) and the job script
``RUN_DIR/launch/job.sbatch`` or ``RUN_DIR/launch/torchrun.sh``, then runs ``sbatch`` or the script.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from cytosyn.launch.config import LaunchConfig
from cytosyn.launch.render import JobSpec, render_script, script_name
from cytosyn.launch.validate import (
    LaunchError,
    OutputLocationError,
    check_checkpoint_dir,
    config_diff,
    get_key,
    read_run_config,
    validate_launch,
)

from cytosyn.config import ConfigError, apply_overrides, build_config, load_yaml
from cytosyn.fileio import atomic_write_text

log = logging.getLogger("cytosyn.launch")

ATTEMPTS_FILE = "attempts.jsonl"
_JOB_ID_RE = re.compile(r"Submitted batch job (\d+)")
_PARSABLE_RE = re.compile(r"^\s*(\d+)(?:;\S+)?\s*$")  # sbatch --parsable: "1234" or "1234;cluster"


class SubmitError(LaunchError):
    """sbatch (or the launcher script) could not be started or refused the job."""


@dataclass
class LaunchResult:
    backend: str
    run_dir: Path
    config_path: Path  # RUN_DIR/config.yaml (what the job trains from)
    script_path: Path  # RUN_DIR/launch/job.sbatch or torchrun.sh
    script: str  # the rendered script
    command: list[str]  # what was (or would be) run to start it
    dry_run: bool
    job_id: str | None = None  # SLURM job id
    returncode: int | None = None  # torchrun: exit status of the launcher loop
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    train_config: dict[str, Any] = field(default_factory=dict)  # the resolved training config

    def report(self, warnings: bool = False) -> str:
        """What happened (the script and resolved config too, for a dry run). Warnings are logged by
        :func:`run_launch` as they arise; ``warnings=True`` repeats them here."""
        lines = []
        if self.dry_run:
            lines += [self.script.rstrip(), "", "# ---- resolved training config ----"]
            lines += ["# " + line for line in yaml.safe_dump(self.train_config, sort_keys=False).splitlines()]
            lines += [
                "",
                f"dry run: nothing written or submitted; would write {self.config_path} and "
                f"{self.script_path}, then run: {' '.join(self.command)}",
            ]
        lines += [f"note: {n}" for n in self.notes]
        if warnings:
            lines += [f"warning: {w}" for w in self.warnings]
        if self.job_id is not None:
            lines.append(
                f"submitted SLURM job {self.job_id} ({self.script_path}); "
                f"follow it with: cytosyn status {self.run_dir}"
            )
        if self.returncode is not None:
            lines.append(
                f"torchrun launcher exited with {self.returncode} ({_describe_exit(self.returncode)})"
            )
        return "\n".join(lines)


def _describe_exit(code: int) -> str:
    return {
        0: "training finished",
        75: "checkpoint saved, start again to resume",
        1: "failed or gave up",
    }.get(code, "failed")


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_attempt_record(run_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line in RUN_DIR/launch/attempts.jsonl (the launcher scripts append there too)."""
    path = Path(run_dir) / "launch" / ATTEMPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def parse_job_id(stdout: str) -> str | None:
    match = _JOB_ID_RE.search(stdout)
    if match:
        return match.group(1)
    match = _PARSABLE_RE.match(stdout)
    return match.group(1) if match else None


def _resolve_run_dir(tree: dict[str, Any], workdir: Path) -> Path:
    value = tree.get("run_dir")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"run_dir: the training config must name the run folder (got {value!r})")
    path = Path(value).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else workdir / path))


def prepare_training_config(
    train_config_path: Path, cfg: LaunchConfig, overrides: Sequence[str], workdir: Path
) -> tuple[dict[str, Any], LaunchConfig, Path]:
    """Training YAML + overrides, sized by the launch config: (tree, launch config, absolute run_dir).

    ``nodes`` / ``gpus_per_node`` given explicitly in the launch config win; otherwise they are taken from
    ``trainer.num_nodes`` / ``trainer.devices`` of the training config. Either way both agree afterwards.
    """
    tree = apply_overrides(load_yaml(train_config_path), overrides)
    trainer = tree.setdefault("trainer", {})
    if not isinstance(trainer, dict):
        raise ConfigError("trainer: must be a section of the training config")
    cfg = cfg.model_copy()
    for name, key in (("nodes", "num_nodes"), ("gpus_per_node", "devices")):
        value = trainer.get(key)
        if (
            name not in cfg.model_fields_set
            and isinstance(value, int)
            and not isinstance(value, bool)
            and value > 0
        ):
            setattr(cfg, name, value)
    trainer["num_nodes"] = cfg.nodes
    trainer["devices"] = cfg.gpus_per_node
    run_dir = _resolve_run_dir(tree, workdir)
    tree["run_dir"] = str(run_dir)
    return tree, cfg, run_dir


def run_launch(
    train_config_path: Path,
    cfg: LaunchConfig,
    overrides: list[str],
    *,
    workdir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchResult:
    """Check, write and submit (or, with ``cfg.dry_run``, only render) a training job.

    Raises :class:`ConfigError` for an unreadable config, :class:`LaunchError` when a check fails (the
    message lists every failed check), :class:`OutputLocationError` when RUN_DIR cannot be written,
    :class:`SubmitError` when sbatch refuses. ``workdir`` (default: the current directory) is where
    relative paths of the training config resolve and where the job runs.
    """
    workdir = Path(os.path.abspath(workdir or Path.cwd()))
    tree, cfg, run_dir = prepare_training_config(Path(train_config_path), cfg, overrides, workdir)

    report = validate_launch(tree, cfg, run_dir, workdir)
    if cfg.backend == "torchrun" and cfg.nodes > 1 and not cfg.rdzv_endpoint:
        report.errors.append(
            f"torchrun on {cfg.nodes} nodes needs rdzv_endpoint (HOST:PORT on node 0, reachable from every node)"
        )
    report.raise_if_errors()
    warnings = list(report.warnings)

    num_workers = get_key(tree, "data.num_workers", None)
    spec = JobSpec(
        run_dir=run_dir,
        config_path=run_dir / "config.yaml",
        workdir=workdir,
        num_workers=num_workers
        if isinstance(num_workers, int) and not isinstance(num_workers, bool)
        else None,
    )
    try:
        script = render_script(cfg, spec, environ)
    except ValueError as err:
        raise LaunchError(str(err)) from None
    script_path = run_dir / "launch" / script_name(cfg)
    command = ["sbatch", str(script_path)] if cfg.backend == "slurm" else ["bash", str(script_path)]
    result = LaunchResult(
        backend=cfg.backend,
        run_dir=run_dir,
        config_path=spec.config_path,
        script_path=script_path,
        script=script,
        command=command,
        dry_run=cfg.dry_run,
        warnings=warnings,
        train_config=tree,
    )

    if cfg.dry_run:
        result.warnings += check_checkpoint_dir(run_dir, create=False)
        _log_warnings(result.warnings)
        return result

    result.warnings += check_checkpoint_dir(run_dir, create=True)
    _log_warnings(result.warnings)
    result.notes.append(_write_run_config(tree, run_dir))
    atomic_write_text(script_path, script)
    script_path.chmod(0o755)
    if cfg.backend == "slurm":
        (run_dir / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM does not create log folders
        result.job_id = _submit_sbatch(command, workdir)
        submit = {"event": "submit", "time": _now_iso(), "host": socket.gethostname(), "backend": "slurm"}
        submit |= {"job_id": result.job_id, "script": str(script_path)}
        submit |= {"nodes": cfg.nodes, "gpus_per_node": cfg.gpus_per_node}
        append_attempt_record(run_dir, submit)
    else:
        if cfg.nodes > 1:
            result.notes.append(
                f"this node runs the launcher; start the same script on the other {cfg.nodes - 1} node(s): "
                f"bash {script_path}"
            )
            log.warning("%s", result.notes[-1])  # now, not after the run
        log.info("starting %s", " ".join(command))
        result.returncode = _run_foreground(command, workdir)
    return result


def _log_warnings(warnings: Sequence[str]) -> None:
    for warning in warnings:
        log.warning("%s", warning)


def _write_run_config(tree: dict[str, Any], run_dir: Path) -> str:
    """Write RUN_DIR/config.yaml on the first start; on a forced drift keep the old one as a backup."""
    path = run_dir / "config.yaml"
    text = yaml.safe_dump(tree, sort_keys=False)
    old = read_run_config(run_dir)
    if old is None:
        atomic_write_text(path, text)
        return f"wrote {path} (first start)"
    if not config_diff(old, tree):
        return f"kept {path} (same settings: the job resumes from the run's last checkpoint)"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"config.{stamp}.yaml")
    os.replace(path, backup)
    atomic_write_text(path, text)
    return f"replaced {path} (force); the previous config is kept as {backup}"


def _submit_sbatch(command: list[str], workdir: Path) -> str:
    try:
        proc = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise SubmitError(
            "sbatch is not on PATH: submit from a SLURM login node, or use backend torchrun"
        ) from None
    except subprocess.TimeoutExpired:
        raise SubmitError(
            "sbatch did not answer within 300 s; check `squeue -u $USER` before retrying"
        ) from None
    if proc.returncode != 0:
        raise SubmitError(
            f"sbatch refused the job (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        )
    job_id = parse_job_id(proc.stdout)
    if job_id is None:
        raise SubmitError(f"could not find a job id in sbatch's answer: {proc.stdout.strip()!r}")
    return job_id


def _run_foreground(command: list[str], workdir: Path) -> int:
    """Run the torchrun launcher and wait; Ctrl-C reaches it too (it checkpoints and stops), so wait on."""
    proc = subprocess.Popen(command, cwd=workdir)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            log.warning("interrupted: waiting for training to save its checkpoint and stop")
            proc.terminate()


# ---------------------------------------------------------------------------------------------- status


def _parse_time(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        return stamp.timestamp()
    return None


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    return f"{days} d {hours} h" if days else f"{hours} h {minutes:02d} min"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def _count(n: Any) -> str:
    if n is None:
        return "not reported"
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    text = f"{int(n):,}"
    if n >= 1e9:
        return f"{text} ({n / 1e9:.2f} B)"
    if n >= 1e6:
        return f"{text} ({n / 1e6:.2f} M)"
    return text


def _path_size(path: Path) -> int:
    if path.is_dir():  # a DeepSpeed checkpoint is a folder
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def read_attempts(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of RUN_DIR/launch/attempts.jsonl and the number of unreadable lines."""
    path = Path(run_dir) / "launch" / ATTEMPTS_FILE
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def _attempt_lines(records: list[dict[str, Any]], now: float, limit: int = 8) -> list[str]:
    starts = [r for r in records if r.get("event") == "start"]
    submits = [r for r in records if r.get("event") == "submit"]
    ends = {(r.get("job_id"), r.get("attempt"), r.get("host")): r for r in records if r.get("event") == "end"}
    gave_up = [r for r in records if r.get("event") == "gave_up"]
    jobs = list(dict.fromkeys(str(r.get("job_id")) for r in starts + submits))
    head = f"{len(starts)} start(s)"
    if submits:
        head += f", {len(submits)} submission(s)"
    if jobs:
        head += f"; job(s) {', '.join(jobs[-4:])}" + (" ..." if len(jobs) > 4 else "")
    lines = [f"  attempts     {head}"]
    for rec in starts[-limit:]:
        end = ends.get((rec.get("job_id"), rec.get("attempt"), rec.get("host")))
        start_t = _parse_time(rec.get("time"))
        when = f"{rec.get('time')}" + (f" ({_ago(now - start_t)})" if start_t else "")
        what = f"    #{rec.get('attempt')} {when} on {rec.get('host')}, job {rec.get('job_id')}: "
        if end is None:
            what += "no end recorded (running, or killed before it could record)"
        else:
            code = end.get("exit_code")
            what += f"exit {code}"
            if end.get("preempted") is True:
                what += " (preempted: checkpoint saved, start again)"
            elif code == 0:
                what += " (finished)"
            elif code is not None:
                what += " (failed)"
            if end.get("signal"):
                what += f", got SIG{end['signal']}"
        lines.append(what)
    if len(starts) > limit:
        lines.insert(1, f"    ... {len(starts) - limit} earlier start(s) not shown")
    if submits and not starts:
        last = submits[-1]
        lines.append(f"    job {last.get('job_id')} submitted {last.get('time')}: not started yet (pending?)")
    for rec in gave_up[-1:]:
        lines.append(f"    gave up at {rec.get('time')} after max_attempts = {rec.get('max_attempts')}")
    return lines


def status(run_dir: Path) -> str:
    """A human summary of a run folder: progress, last checkpoint, throughput, attempts, status."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    now = time.time()
    lines = [f"run {run_dir.resolve()}"]

    progress: dict[str, Any] = {}
    progress_path = run_dir / "progress.json"
    if progress_path.is_file():
        try:
            loaded = json.loads(progress_path.read_text())
            progress = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, OSError) as err:
            lines.append(f"  progress     {progress_path} unreadable ({err})")
    else:
        lines.append("  progress     none yet (training has not written progress.json)")

    config: dict[str, Any] = {}
    try:
        config = read_run_config(run_dir) or {}
    except LaunchError as err:
        lines.append(f"  config       {err}")

    if progress:
        state = str(progress.get("status", "unknown"))
        updated = _parse_time(progress.get("updated_at")) or progress_path.stat().st_mtime
        state_line = f"  status       {state} (progress updated {_ago(now - updated)})"
        if state == "running" and now - updated > 30 * 60:
            state_line += (
                " — no update for a while: the job may have died; check RUN_DIR/slurm/ or the launcher log"
            )
        lines.append(state_line)
        step = progress.get("step")
        max_steps = get_key(config, "trainer.max_steps", None)
        step_text = _count(step)
        if isinstance(step, int) and isinstance(max_steps, int) and max_steps > 0:
            step_text += f" of {max_steps:,} ({100 * step / max_steps:.1f} %)"
        lines.append(f"  step         {step_text}")
        lines.append(f"  images seen  {_count(progress.get('images_seen'))}")
        loss = progress.get("loss")
        lines.append(
            f"  last loss    {loss:.4g}" if isinstance(loss, (int, float)) else f"  last loss    {loss}"
        )
        rate = progress.get("images_per_s")
        if isinstance(rate, (int, float)) and rate > 0:
            rate_text = f"  throughput   {rate:,.1f} images/s"
            world = _world(config)
            if world:
                rate_text += f" ({rate / world:,.1f} per GPU on {world} GPUs)"
            global_batch = get_key(config, "optim.global_batch", None)
            if (
                isinstance(step, int)
                and isinstance(max_steps, int)
                and isinstance(global_batch, int)
                and step < max_steps
            ):
                rate_text += f"; {_duration((max_steps - step) * global_batch / rate)} to go at this rate"
            lines.append(rate_text)
        else:
            lines.append(f"  throughput   {_count(rate)}")

    ckpt_value = progress.get("last_checkpoint")
    ckpt = (
        Path(ckpt_value)
        if isinstance(ckpt_value, str) and ckpt_value
        else run_dir / "checkpoints" / "last.ckpt"
    )
    if not ckpt.is_absolute():
        # Recorded relative to the run folder; older runs recorded it relative to the working directory
        # of training (already starting with the run folder's own relative path).
        ckpt = run_dir / ckpt if (run_dir / ckpt).exists() or not ckpt.exists() else ckpt
    if ckpt.exists():
        st = ckpt.stat()
        lines.append(f"  checkpoint   {ckpt} ({_bytes(_path_size(ckpt))}, saved {_ago(now - st.st_mtime)})")
    else:
        lines.append(f"  checkpoint   none yet ({ckpt} does not exist)")

    world = _world(config)
    if world:
        nodes = get_key(config, "trainer.num_nodes", 1)
        devices = get_key(config, "trainer.devices", "?")
        text = f"  job size     {nodes} node(s) × {devices} GPU(s) = {world} GPUs"
        global_batch = get_key(config, "optim.global_batch", None)
        if global_batch is not None:
            text += f", global batch {global_batch}"
        lines.append(text)

    records, bad = read_attempts(run_dir)
    if records:
        lines += _attempt_lines(records, now)
    else:
        lines.append("  attempts     none recorded (no launch/attempts.jsonl)")
    if bad:
        lines.append(f"    ({bad} unreadable line(s) in launch/{ATTEMPTS_FILE} skipped)")
    return "\n".join(lines)


def _world(config: dict[str, Any]) -> int | None:
    nodes = get_key(config, "trainer.num_nodes", 1)
    devices = get_key(config, "trainer.devices", None)
    if isinstance(nodes, int) and isinstance(devices, int):
        return nodes * devices
    return None


# ------------------------------------------------------------------------------------------ CLI glue

_FLAGS = (
    ("backend", "backend"),
    ("nodes", "nodes"),
    ("gpus_per_node", "gpus_per_node"),
    ("cpus_per_task", "cpus_per_task"),
    ("partition", "partition"),
    ("time", "time"),
    ("account", "account"),
    ("qos", "qos"),
    ("rdzv_endpoint", "rdzv_endpoint"),
    ("max_attempts", "max_attempts"),
)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cytosyn launch`` (add to a subparser; then call :func:`cmd_launch`)."""
    parser.add_argument("--config", type=Path, required=True, help="training config YAML (cytosyn train)")
    parser.add_argument("--launch-config", type=Path, help="launch settings YAML (see configs/launch.yaml)")
    parser.add_argument("--backend", choices=["slurm", "torchrun"], help="slurm (sbatch) or torchrun")
    parser.add_argument("--nodes", type=int, help="nodes (→ trainer.num_nodes)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (→ trainer.devices)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per GPU process")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--time", help="SLURM time limit, HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--qos", help="SLURM QOS")
    parser.add_argument("--rdzv-endpoint", help="torchrun HOST:PORT of node 0 (multi-node)")
    parser.add_argument("--max-attempts", type=int, help="starts of the job in all (requeues + 1)")
    parser.add_argument("--dry-run", action="store_true", help="check and print the script; write nothing")
    parser.add_argument("--force", action="store_true", help="launch despite config drift or too few shards")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides of the training config (optim.lr=2e-4); launch.KEY=VALUE sets a launch setting",
    )


def load_launch_config(
    path: Path | None = None, flags: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> LaunchConfig:
    """Launch settings: YAML file (optional), then ``launch.``-less dotted ``overrides``, then ``flags``
    (given values only; ``None`` = not given)."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    for key, value in (flags or {}).items():
        if value is not None:
            data[key] = value
    return build_config(LaunchConfig, data)


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training overrides, launch overrides with the ``launch.`` prefix removed)."""
    train = [text for text in overrides if not text.startswith("launch.")]
    launch = [text.removeprefix("launch.") for text in overrides if text.startswith("launch.")]
    return train, launch


def cmd_launch(args: argparse.Namespace) -> int:
    """``cytosyn launch``: 0 submitted / finished / dry run, 1 refused, 4 run folder unusable; with the
    torchrun backend the launcher's own exit status (75 = checkpoint saved, start again)."""
    train_overrides, launch_overrides = split_overrides(args.overrides)
    flags = {name: getattr(args, attr, None) for attr, name in _FLAGS}
    flags["dry_run"] = True if args.dry_run else None
    flags["force"] = True if args.force else None
    cfg = load_launch_config(args.launch_config, flags, launch_overrides)
    try:
        result = run_launch(args.config, cfg, train_overrides)
    except OutputLocationError as err:
        print(f"cytosyn launch: {err}", file=sys.stderr)
        return 4
    except LaunchError as err:
        print(f"cytosyn launch: {err}", file=sys.stderr)
        return 1
    print(result.report())
    return result.returncode if result.returncode is not None else 0


def cmd_status(args: argparse.Namespace) -> int:
    """``cytosyn status RUN_DIR``: 0, or 1 when there is no run folder."""
    try:
        print(status(args.run_dir))
    except FileNotFoundError as err:
        print(f"cytosyn status: {err}", file=sys.stderr)
        return 1
    return 0
