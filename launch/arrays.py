"""``cytosyn launch tile|featurize|sample``: data preparation as a SLURM job array over ``--part i/N``.

Task ``i`` of the array runs ``cytosyn <stage> --config OUTPUT/launch/<stage>.yaml --part i/N``; the
stages split their work by ``--part`` themselves (slides ``i, i+N, …``; input or output shards ``i,
i+N, …``) and resume what a killed task left, so the array needs no coordination beyond the shared
output folder. A 10,000-slide tiling or a 40M-tile featurize is then one command.

Shared with the training launcher (:mod:`cytosyn.launch.render`, :mod:`cytosyn.launch.validate`): the
launch settings (:class:`~cytosyn.launch.config.LaunchConfig`: partition, time, account, qos, setup
lines, environment, ``max_attempts``, ``requeue_signal_seconds``, extra ``#SBATCH`` lines), the
environment block, the attempt bookkeeping in bash (``record``, ``wait_for``), the storage checks and
the sbatch submission. Requeue rule, as for training: ``requeue_signal_seconds`` before the time limit
SLURM signals the batch script, which requeues its own array task (the stage's work so far is kept and
the requeued task resumes it), at most ``max_attempts`` starts per task; a preempted task is requeued by
SLURM (``--requeue``). A task that fails (bad input, full disk) is not started again.

Without ``--submit`` the script and the stage config are written and the ``sbatch`` command printed;
``--dry-run`` writes nothing. ``cytosyn status OUTPUT`` aggregates the parts
(:mod:`cytosyn.launch.array_status`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cytosyn.launch.config import LaunchConfig
from cytosyn.launch.launch import (
    _FLAGS,
    OutputLocationError,
    SubmitError,
    _now_iso,
    _submit_sbatch,
    append_attempt_record,
    load_launch_config,
    split_overrides,
)
from cytosyn.launch.render import (
    EX_TEMPFAIL,
    JobSpec,
    _common,
    _q,
    _setup_block,
    _Template,
    environment_block,
)
from cytosyn.launch.validate import LaunchError, ValidationReport, check_shared_storage

from cytosyn.config import ConfigError, config_to_dict, load_config
from cytosyn.fileio import atomic_write_text

STAGES = ("tile", "featurize", "sample")
ARRAY_FILE = "array.json"  # OUTPUT/launch/array.json: what the array is (read by cytosyn status)
SLURM_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize (indexes 0..1000); sites often raise it


@dataclass(frozen=True)
class StageSpec:
    name: str
    item: str  # what its parts split: "slide" or "shard"
    gpus: int  # GPUs per task unless the launch settings say otherwise


SPECS = {
    "tile": StageSpec("tile", "slide", 0),
    "featurize": StageSpec("featurize", "shard", 1),
    "sample": StageSpec("sample", "shard", 1),
}


def load_stage_config(stage: str, path: Path, overrides: Sequence[str]) -> Any:
    """The stage's own config, validated exactly as ``cytosyn <stage>`` validates it."""
    if stage == "tile":
        from cytosyn.data_prep.tile_config import TileConfig

        cfg = load_config(TileConfig, path, overrides)
        if not cfg.slides.input:
            raise ConfigError("no slides given: set slides.input in the tile config")
        return cfg
    if stage == "featurize":
        from cytosyn.data_prep.featurize_config import FeaturizeConfig

        return load_config(FeaturizeConfig, path, overrides)
    if stage == "sample":
        from cytosyn.sample import SampleConfig

        return load_config(SampleConfig, path, overrides)
    raise ConfigError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")


def stage_items(stage: str, cfg: Any) -> list[str]:
    """The units the stage's ``--part i/N`` splits, in the order it splits them (part i takes i, i+N, …)."""
    from cytosyn.manifest import ManifestError, read_manifest

    if stage == "tile":
        from cytosyn.data_prep.tiler import discover_slides

        return [s.slide_id for s in discover_slides(cfg.slides.input, cfg.slides.extensions)]
    if stage == "featurize":
        try:
            return [e.name for e in read_manifest(cfg.input).shards]
        except ManifestError as err:
            raise LaunchError(f"featurize input: {err}") from None
    from cytosyn.sample import shard_name

    if cfg.mode == "conditional":
        try:
            available = read_manifest(cfg.split).samples
        except ManifestError as err:
            raise LaunchError(f"sample split: {err}") from None
        total = min(available, cfg.max_references or available)
    else:
        total = cfg.num_images
    return [shard_name(cfg.name, j) for j in range(-(-total // cfg.samples_per_shard))]


def stage_output(cfg: Any) -> Path:
    return Path(os.path.abspath(cfg.output))


def stage_command(stage: str, cfg: LaunchConfig) -> str:
    """The command of one array task (``$CONFIG``, ``$PART``, ``$PARTS`` are set by the script)."""
    command = f'cytosyn {stage} --config "$CONFIG" --part "$PART/$PARTS"'
    if stage == "tile":  # one tiler worker per core of the task (never changes the output bytes)
        command += f" --workers {cfg.cpus_per_task}"
    return f"srun --ntasks=1 --cpus-per-task={cfg.cpus_per_task} {command}"


# ------------------------------------------------------------------------------------------- render

_ARRAY_SBATCH = """#!/bin/bash
@@{directives}
#
# cytosyn @@{stage} as a SLURM job array, rendered by `cytosyn launch @@{stage}` — submit with:
#     sbatch @@{script}
# @@{parts} task(s); task i runs `cytosyn @@{stage} --part i/@@{parts}` on @@{items} (@@{per_part} each),
# one process with @@{cpus} core(s)@@{gpu_text}. The stage resumes what an earlier attempt of the task
# finished, so a task can be started again at any time; progress: cytosyn status @@{output}
#
# Time limit and preemption: SLURM signals this script @@{signal_s} s before the time limit
# (--signal=B:USR1); it then requeues its own array task, which starts again under the same id and
# continues where it stopped. A preempted task is requeued by SLURM (--requeue). At most
# @@{max_attempts} starts per task (max_attempts); a task that fails is not started again.

RUN_DIR=@@{output}
CONFIG=@@{config}
PARTS=@@{parts}
ATTEMPTS="$RUN_DIR/launch/attempts.jsonl"
MAX_ATTEMPTS=@@{max_attempts}
export CYTOSYN_MAX_ATTEMPTS=$MAX_ATTEMPTS
PART="${SLURM_ARRAY_TASK_ID:?this script runs as a task of a SLURM job array: submit it with sbatch}"
JOB_ID="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-unknown}}_$PART"
attempt=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))

@@{setup}
set -uo pipefail  # after the setup lines: module and venv scripts often trip over `set -u`
@@{common}
@@{environment}

if (( attempt > MAX_ATTEMPTS )); then
  echo "cytosyn: task $JOB_ID has been started $MAX_ATTEMPTS times (max_attempts); not starting it again." >&2
  record gave_up ", \\"part\\": $PART, \\"max_attempts\\": $MAX_ATTEMPTS"
  exit 1
fi

# Near the time limit (USR1): requeue this task, then let SLURM's TERM end the stage, which keeps
# what it finished. TERM alone (scancel, preemption): note it and let the stage end.
got_term=0
requeued=0
step=""
requeue_task() {
  requeued=1
  if (( attempt < MAX_ATTEMPTS )); then
    record requeue ", \\"part\\": $PART"
    scontrol requeue "$JOB_ID" || echo "cytosyn: 'scontrol requeue $JOB_ID' failed; submit again to resume" >&2
  else
    echo "cytosyn: time limit near on attempt $attempt of $MAX_ATTEMPTS (max_attempts): not requeueing $JOB_ID." >&2
  fi
  if [[ -n "$step" ]]; then kill -TERM "$step" 2>/dev/null; fi
}
trap 'requeue_task' USR1
trap 'got_term=1' TERM

record start ", \\"part\\": $PART, \\"parts\\": $PARTS, \\"nodes\\": \\"${SLURM_JOB_NODELIST:-$HOSTNAME}\\""
echo "cytosyn: @@{stage} part $PART/$PARTS, attempt $attempt/$MAX_ATTEMPTS of task $JOB_ID on ${SLURM_JOB_NODELIST:-$HOSTNAME}" >&2
@@{launch_command} &
step=$!
wait_for "$step"; rc=$?
step=""
record end ", \\"part\\": $PART, \\"exit_code\\": $rc, \\"requeued\\": $( (( requeued )) && echo true || echo false ), \\"signal\\": \\"$( (( got_term )) && echo TERM || echo none )\\""
if (( requeued )); then exit @@{ex_tempfail}; fi
exit "$rc"
"""


def array_directives(
    stage: str,
    cfg: LaunchConfig,
    output: Path,
    workdir: Path,
    parts: int,
    gpus: int,
    max_concurrent: int | None,
) -> list[str]:
    """The ``#SBATCH`` lines of the array (same keys and checks as the training job's)."""
    for path in (output, workdir):
        if any(c.isspace() for c in str(path)):
            raise LaunchError(f"{path} contains whitespace, which #SBATCH lines cannot carry")
    job_name = cfg.job_name if "job_name" in cfg.model_fields_set else f"cytosyn-{stage}"
    array = f"0-{parts - 1}" + (f"%{max_concurrent}" if max_concurrent else "")
    lines = [
        f"--job-name={job_name}",
        f"--array={array}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={cfg.cpus_per_task}",
    ]
    if gpus:
        lines.append(f"--gpus-per-node={gpus}")
    lines.append(f"--time={cfg.time}")
    lines += [f"--{key}={value}" for key in ("partition", "account", "qos") if (value := getattr(cfg, key))]
    lines += [
        f"--signal=B:USR1@{cfg.requeue_signal_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--output={output}/launch/slurm/%x-%A_%a.out",
        f"--error={output}/launch/slurm/%x-%A_%a.err",
        f"--chdir={workdir}",
    ]
    return [f"#SBATCH {line}" for line in lines] + list(cfg.extra_sbatch)


def render_array(
    stage: str,
    cfg: LaunchConfig,
    *,
    output: Path,
    config_path: Path,
    workdir: Path,
    parts: int,
    items: int,
    gpus: int,
    max_concurrent: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The array's batch script (``OUTPUT/launch/<stage>-array.sbatch``)."""
    spec = SPECS[stage]
    # Tiler workers are the task's cores; featurize and sample run one compute process.
    job = JobSpec(output, config_path, workdir, num_workers=cfg.cpus_per_task - 1 if stage == "tile" else 0)
    per = (
        f"{items // parts}–{-(-items // parts)} {spec.item}s"
        if items % parts
        else f"{items // parts} {spec.item}s"
    )
    values = {
        "directives": "\n".join(array_directives(stage, cfg, output, workdir, parts, gpus, max_concurrent)),
        "stage": stage,
        "script": output / "launch" / f"{stage}-array.sbatch",
        "parts": parts,
        "items": f"{items} {spec.item}s",
        "per_part": per,
        "cpus": cfg.cpus_per_task,
        "gpu_text": f" and {gpus} GPU(s)" if gpus else "",
        "output": _q(output),
        "signal_s": cfg.requeue_signal_seconds,
        "max_attempts": cfg.max_attempts,
        "config": _q(config_path),
        "common": _common(cfg),
        "setup": _setup_block(cfg),
        "environment": environment_block(cfg, job, environ),
        "launch_command": stage_command(stage, cfg),
        "ex_tempfail": EX_TEMPFAIL,
    }
    return _Template(_ARRAY_SBATCH).substitute(values)


# ------------------------------------------------------------------------------------------- launch


@dataclass
class ArrayResult:
    stage: str
    output: Path
    parts: int
    items: int
    script_path: Path
    config_path: Path
    script: str
    command: list[str]
    dry_run: bool
    submitted: bool = False
    job_id: str | None = None
    warnings: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = []
        if self.dry_run:
            lines += [self.script.rstrip(), "", f"dry run: nothing written; would write {self.script_path}"]
        lines += [f"warning: {w}" for w in self.warnings]
        per = -(-self.items // self.parts)
        head = f"{self.stage}: {self.parts} array task(s) over {self.items} {SPECS[self.stage].item}s (≤ {per} each)"
        lines.append(head)
        if self.submitted:
            lines.append(
                f"submitted SLURM array job {self.job_id}; follow it with: cytosyn status {self.output}"
            )
        elif not self.dry_run:
            lines.append(
                f"wrote {self.script_path} and {self.config_path}; submit with: {' '.join(self.command)}"
            )
        return "\n".join(lines)


def validate_array(
    stage: str, cfg: LaunchConfig, parts: int, items: list[str], output: Path, force: bool
) -> ValidationReport:
    report = ValidationReport()
    spec = SPECS[stage]
    if parts < 1:
        report.errors.append(f"--parts must be ≥ 1 (got {parts})")
        return report
    if not items:
        report.errors.append(f"{stage}: no {spec.item}s to work on")
    elif parts > len(items):
        msg = (
            f"{parts} parts for {len(items)} {spec.item}s: {parts - len(items)} task(s) would have nothing to do; "
            f"use --parts {len(items)} or fewer"
        )
        (report.warnings if force else report.errors).append(
            msg + (" (accepted: force)" if force else " (force to launch anyway)")
        )
    if parts > SLURM_MAX_ARRAY_SIZE:
        report.warnings.append(
            f"{parts} array tasks: SLURM's default MaxArraySize allows {SLURM_MAX_ARRAY_SIZE}; check `scontrol show "
            "config | grep MaxArraySize` on your cluster, or use fewer parts"
        )
    if cfg.nodes != 1:
        report.errors.append(
            f"nodes = {cfg.nodes}: each array task runs on one node (use more --parts instead)"
        )
    if cfg.backend != "slurm":
        report.errors.append(
            f"backend {cfg.backend}: data-stage arrays are SLURM job arrays; without SLURM run "
            f"`cytosyn {stage} --part i/N` on each machine (cytosyn status still aggregates the parts)"
        )
    report.warnings += [w.replace("run_dir", "output") for w in check_shared_storage(output, nodes=parts)]
    return report


def _probe_output(output: Path) -> None:
    probe = output / "launch" / f".launch-probe-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"cytosyn launch write probe\n")
        probe.unlink()
    except OSError as err:
        raise OutputLocationError(
            f"cannot write to the output folder {output}: {err.strerror or err}"
        ) from None


def run_array_launch(
    stage: str,
    stage_config: Path,
    overrides: Sequence[str],
    cfg: LaunchConfig,
    parts: int,
    *,
    submit: bool = False,
    max_concurrent: int | None = None,
    workdir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ArrayResult:
    """Validate, render, write (unless ``cfg.dry_run``) and with ``submit`` submit a stage's array."""
    if stage not in SPECS:
        raise ConfigError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    workdir = Path(os.path.abspath(workdir or Path.cwd()))
    stage_cfg = load_stage_config(stage, stage_config, overrides)
    output = stage_output(stage_cfg)
    try:
        items = stage_items(stage, stage_cfg)
    except (FileNotFoundError, ValueError) as err:
        raise LaunchError(f"{stage}: {err}") from None
    report = validate_array(stage, cfg, parts, items, output, cfg.force)
    if max_concurrent is not None and max_concurrent < 1:
        report.errors.append(f"--max-concurrent must be ≥ 1 (got {max_concurrent})")
    report.raise_if_errors()
    gpus = cfg.gpus_per_node if "gpus_per_node" in cfg.model_fields_set else SPECS[stage].gpus
    config_path = output / "launch" / f"{stage}.yaml"
    script = render_array(
        stage, cfg, output=output, config_path=config_path, workdir=workdir, parts=parts, items=len(items),
        gpus=gpus, max_concurrent=max_concurrent, environ=environ,
    )  # fmt: skip
    script_path = output / "launch" / f"{stage}-array.sbatch"
    result = ArrayResult(
        stage, output, parts, len(items), script_path, config_path, script, ["sbatch", str(script_path)],
        cfg.dry_run, warnings=list(report.warnings),
    )  # fmt: skip
    if cfg.dry_run:
        return result
    _probe_output(output)
    data = config_to_dict(stage_cfg)
    data.pop("part", None)
    if isinstance(data.get("run"), dict):
        data["run"].pop("part", None)  # every task gets its own --part
    atomic_write_text(config_path, yaml.safe_dump(data, sort_keys=False))
    atomic_write_text(script_path, script)
    script_path.chmod(0o755)
    array = {
        "stage": stage,
        "parts": parts,
        "item": SPECS[stage].item,
        "items": [items[i::parts] for i in range(parts)],
        "config": str(config_path),
        "script": str(script_path),
        "rendered_at": _now_iso(),
        "job_ids": [],
    }
    if submit:
        (output / "launch" / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM does not create log folders
        result.job_id = _submit_sbatch(result.command, workdir)
        result.submitted = True
        array["job_ids"] = [*_previous_job_ids(output), result.job_id]
        append_attempt_record(
            output,
            {"event": "submit", "time": _now_iso(), "host": socket.gethostname(), "backend": "slurm",
             "job_id": result.job_id, "script": str(script_path), "stage": stage, "parts": parts},
        )  # fmt: skip
    atomic_write_text(output / "launch" / ARRAY_FILE, json.dumps(array, indent=1) + "\n")
    return result


def _previous_job_ids(output: Path) -> list[str]:
    try:
        return list(json.loads((output / "launch" / ARRAY_FILE).read_text()).get("job_ids", []))
    except (OSError, ValueError, AttributeError):
        return []


# ---------------------------------------------------------------------------------------------- CLI


def add_array_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``cytosyn launch tile|featurize|sample`` adds to the training launcher's."""
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # cytosyn launch <stage> ...
    parser.add_argument("--parts", type=int, help="array size N: task i runs --part i/N (data stages)")
    parser.add_argument(
        "--submit", action="store_true", help="submit the rendered array with sbatch (data stages)"
    )
    parser.add_argument(
        "--max-concurrent", type=int, help="at most this many array tasks at once (#SBATCH --array=...%%K)"
    )


def cmd_array(args: argparse.Namespace, stage: str, overrides: list[str]) -> int:
    """``cytosyn launch <stage>``: 0 rendered / submitted / dry run, 1 refused, 4 output unusable."""
    stage_overrides, launch_overrides = split_overrides(overrides)
    flags = {name: getattr(args, attr, None) for attr, name in _FLAGS}
    flags["dry_run"] = True if args.dry_run else None
    flags["force"] = True if args.force else None
    try:
        cfg = load_launch_config(args.launch_config, flags, launch_overrides)
        if args.parts is None:
            raise LaunchError(f"cytosyn launch {stage} needs --parts N (the number of array tasks)")
        result = run_array_launch(
            stage,
            args.config,
            stage_overrides,
            cfg,
            args.parts,
            submit=args.submit,
            max_concurrent=args.max_concurrent,
        )
    except OutputLocationError as err:
        print(f"cytosyn launch {stage}: {err}", file=sys.stderr)
        return 4
    except (LaunchError, SubmitError) as err:
        print(f"cytosyn launch {stage}: {err}", file=sys.stderr)
        return 1
    print(result.report())
    return 0
