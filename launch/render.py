"""Render the job scripts that start ``cytosyn train``: a SLURM batch script and a torchrun restart loop.

Both are plain bash, readable on their own, and carry every setting they need (paths, environment,
attempt bookkeeping), so a user can inspect, edit or resubmit them by hand. Templates are
:class:`string.Template` with ``@@{name}`` placeholders, so bash keeps ``$`` for itself.

Bookkeeping shared by both scripts: each start and each end of an attempt appends one JSON line to
``RUN_DIR/launch/attempts.jsonl`` (read by ``cytosyn status``). An attempt counts as *preempted* (checkpoint
saved, start me again) when training exits 75, or when it exits non-zero and ``progress.json`` was rewritten
during the attempt with ``"status": "preempted"`` — torchrun reports any failed worker as exit 1, so the
worker's 75 does not survive it.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template

from cytosyn.launch.config import LaunchConfig

EX_TEMPFAIL = 75  # training's "checkpoint saved, requeue me" exit code
DEFAULT_NUM_WORKERS = 4  # the loader's default, when the training config does not say


class _Template(Template):
    delimiter = "@@"


@dataclass(frozen=True)
class JobSpec:
    """What a script needs to know about the run besides the launch config."""

    run_dir: Path  # absolute
    config_path: Path  # the resolved training config the job trains from (RUN_DIR/config.yaml)
    workdir: Path  # the job's working directory (relative paths in the training config resolve here)
    num_workers: int | None = None  # data.num_workers of the training config (for OMP_NUM_THREADS)


def script_name(cfg: LaunchConfig) -> str:
    return "job.sbatch" if cfg.backend == "slurm" else "torchrun.sh"


def omp_threads(cpus_per_task: int, num_workers: int | None) -> int:
    """Threads per process when a GPU process and its DataLoader workers share ``cpus_per_task`` cores."""
    workers = DEFAULT_NUM_WORKERS if num_workers is None else max(0, num_workers)
    return max(1, cpus_per_task // (workers + 1))


def rdzv_endpoint(cfg: LaunchConfig) -> str:
    """torchrun's rendezvous: the configured HOST:PORT, or a free local port for a single node."""
    if cfg.rdzv_endpoint:
        return cfg.rdzv_endpoint
    if cfg.nodes > 1:
        raise ValueError("rdzv_endpoint (HOST:PORT of node 0) is needed for torchrun on more than one node")
    return "localhost:0"


def rdzv_id(run_dir: Path) -> str:
    """A rendezvous id stable for a run folder: every node and every restart of the run agree on it."""
    return "cytosyn-" + hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]


def _q(value: object) -> str:
    return shlex.quote(str(value))


def environment_block(cfg: LaunchConfig, spec: JobSpec, environ: Mapping[str, str] | None = None) -> str:
    """The ``export`` lines both scripts share, each group commented with why it is there."""
    environ = os.environ if environ is None else environ
    cache = Path(cfg.cache_dir) if cfg.cache_dir is not None else spec.run_dir / "cache"
    workers = DEFAULT_NUM_WORKERS if spec.num_workers is None else spec.num_workers
    threads = omp_threads(cfg.cpus_per_task, spec.num_workers)
    lines = [
        "# ---- environment (rendered by cytosyn launch; each setting says why) ----",
        "# The Python environment `cytosyn launch` ran in, as a fallback at the END of PATH: `cytosyn` and",
        "# `torchrun` resolve even when that environment is not activated in the job; what the job's own",
        "# setup lines put on PATH still wins.",
        f'export PATH="$PATH:{_q(Path(sys.executable).parent)}"',
        "# Python output reaches the log at once: the last lines before a preemption or a crash are kept.",
        "export PYTHONUNBUFFERED=1",
        "# A segfault or a fatal signal dumps every thread's Python stack into the log.",
        "export PYTHONFAULTHANDLER=1",
        "# A failed or timed-out NCCL collective aborts the process instead of leaving the other ranks",
        "# blocked in it until the time limit (TORCH_ name: torch >= 2.2; the old name: older torch).",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "export NCCL_ASYNC_ERROR_HANDLING=1",
        f"# Each GPU process has {cfg.cpus_per_task} cores, shared with its {workers} DataLoader workers:",
        f"# {cfg.cpus_per_task} // ({workers} + 1) = {threads} thread(s) each, so OpenMP (torch CPU ops, numpy,",
        "# image decoding) does not oversubscribe the cores.",
        f"export OMP_NUM_THREADS={threads}",
    ]
    if cfg.wandb_mode == "offline":
        lines.append("# Compute nodes usually cannot reach the internet: W&B writes to RUN_DIR/wandb;")
        lines.append("# upload later from a login node with `wandb sync RUN_DIR/wandb/offline-run-*`.")
    else:
        lines.append(
            f"# W&B mode chosen in the launch config ({cfg.wandb_mode}); its files go to RUN_DIR/wandb."
        )
    lines += [f"export WANDB_MODE={cfg.wandb_mode}", f"export WANDB_DIR={_q(spec.run_dir)}"]
    lines += [
        "# Caches on shared storage: every node sees the weights featurize fetched, and JIT-built ops",
        "# (DeepSpeed, custom kernels) are compiled once, not once per node and per requeue.",
        f"export HF_HOME={_q(cache / 'huggingface')}",
        f"export TORCH_HOME={_q(cache / 'torch')}",
        f"export TORCH_EXTENSIONS_DIR={_q(cache / 'torch_extensions')}",
    ]
    if cfg.hf_offline:
        lines.append("# No hub calls from every rank (each would retry for minutes without internet):")
        lines.append("# weights must already be in HF_HOME (or given as local paths in the config).")
        lines.append("export HF_HUB_OFFLINE=1")
    passed = [
        (name, environ[name]) for name in cfg.passthrough_env if name in environ and name not in cfg.env
    ]
    if passed:
        lines.append("# Network settings of the launching shell, pinned here so every node and every attempt")
        lines.append("# (a requeued job, a restarted loop) talks over the same interfaces.")
        lines += [f"export {name}={_q(value)}" for name, value in passed]
    elif cfg.passthrough_env:
        names = ", ".join(cfg.passthrough_env[:3]) + (", ..." if len(cfg.passthrough_env) > 3 else "")
        lines.append(f"# ({names} were not set when this was rendered:")
        lines.append("#  NCCL chooses its interfaces itself; set them in the launching shell or under env:")
        lines.append("#  in the launch config to pin them.)")
    if cfg.env:
        lines.append("# Extra settings from the launch config (env:), last so they win over the above.")
        lines += [f"export {name}={_q(value)}" for name, value in cfg.env.items()]
    return "\n".join(lines)


# Bash shared by both scripts: attempt records, a signal-safe wait, and the preemption test.
_COMMON = r"""
record() {  # record EVENT [EXTRA_JSON_FIELDS]: one JSON line in attempts.jsonl (cytosyn status reads it)
  mkdir -p "$RUN_DIR/launch"
  printf '{"event": "%s", "time": "%s", "host": "%s", "backend": "@@{backend}", "job_id": "%s", "attempt": %d%s}\n' \
    "$1" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$HOSTNAME" "$JOB_ID" "$attempt" "${2:-}" >> "$ATTEMPTS"
}

wait_for() {  # wait_for PID: the exit status of PID, even when a trapped signal interrupts `wait`
  local pid=$1 rc again
  while :; do
    wait "$pid"; rc=$?
    (( rc > 128 )) || return "$rc"
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    wait "$pid" 2>/dev/null; again=$?
    (( again == 127 )) || rc=$again
    return "$rc"
  done
}

progress_stamp() {  # identity of progress.json (inode, mtime, size): did training rewrite it?
  stat -c '%i %y %s' "$RUN_DIR/progress.json" 2>/dev/null || echo none
}

was_preempted() {  # was_preempted RC STAMP_BEFORE: training saved a checkpoint and wants another start
  (( $1 == @@{ex_tempfail} )) && return 0
  (( $1 != 0 )) || return 1
  [[ "$(progress_stamp)" != "$2" ]] || return 1
  grep -Eq '"status"[[:space:]]*:[[:space:]]*"preempted"' "$RUN_DIR/progress.json" 2>/dev/null
}
"""

# Template placeholders: @@{name}; `$` is bash's own.
_SBATCH = """#!/bin/bash
@@{directives}
#
# cytosyn training job, rendered by `cytosyn launch` — submit with:  sbatch @@{script}
# @@{nodes} node(s) × @@{gpus} GPU(s) = @@{world} processes, one SLURM task per GPU: Lightning's
# SLURMEnvironment reads ranks and the master address from SLURM (no torchrun under SLURM).
# Every GPU of a node stays visible to every task of that node (no --gpus-per-task/--gpu-bind):
# Lightning picks cuda:LOCAL_RANK itself.
#
# Preemption and time limit: SLURM sends SIGUSR1 to the training processes @@{signal_s} s before the
# time limit (the --signal directive); `cytosyn train` checkpoints at the next step boundary and runs
# `scontrol requeue` (Lightning's own SLURM auto-requeue is off: one mechanism), and
# the job starts again under the same id, resuming from RUN_DIR/checkpoints/last.ckpt (logs are
# appended: --open-mode=append). If training instead exits @@{ex_tempfail} (checkpoint saved, requeue
# me) this script requeues the job itself. At most @@{max_attempts} starts (max_attempts).

RUN_DIR=@@{run_dir}
CONFIG=@@{config}
ATTEMPTS="$RUN_DIR/launch/attempts.jsonl"
MAX_ATTEMPTS=@@{max_attempts}
# Training reads this to stop requeueing itself after MAX_ATTEMPTS starts (SLURM_RESTART_COUNT + 1).
export CYTOSYN_MAX_ATTEMPTS=$MAX_ATTEMPTS
JOB_ID="${SLURM_JOB_ID:-unknown}"
attempt=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))

@@{setup}
set -uo pipefail  # after the setup lines: module and venv scripts often trip over `set -u`
@@{common}
@@{environment}

if (( attempt > MAX_ATTEMPTS )); then
  echo "cytosyn: job $JOB_ID has been started $MAX_ATTEMPTS times (max_attempts); not training again." >&2
  echo "cytosyn: raise max_attempts and launch again to go on from $RUN_DIR/checkpoints/last.ckpt" >&2
  record gave_up ", \\"max_attempts\\": $MAX_ATTEMPTS"
  exit 1
fi

# SLURM ends the job (time limit, scancel, a requeue) with SIGTERM to every process: note it and let
# srun finish, so the end of the attempt is recorded.
got_term=0
trap 'got_term=1' TERM

before=$(progress_stamp)
record start ", \\"nodes\\": \\"${SLURM_JOB_NODELIST:-$HOSTNAME}\\""
echo "cytosyn: attempt $attempt/$MAX_ATTEMPTS of job $JOB_ID on ${SLURM_JOB_NODELIST:-$HOSTNAME}" >&2
# One task per GPU. --cpus-per-task is repeated: srun no longer inherits it from sbatch (SLURM >= 22.05).
# --kill-on-bad-exit: a dead rank ends the step instead of leaving the others blocked in a collective.
@@{launch_command} &
step=$!
wait_for "$step"; rc=$?

preempted=false
if was_preempted "$rc" "$before"; then preempted=true; fi
if (( got_term )); then
  record end ", \\"exit_code\\": $rc, \\"preempted\\": $preempted, \\"signal\\": \\"TERM\\""
else
  record end ", \\"exit_code\\": $rc, \\"preempted\\": $preempted"
fi

if [[ $preempted == true ]] && (( ! got_term )); then
  # cytosyn train normally requeues the job itself on SIGUSR1 (and SLURM then ends this script with TERM);
  # this covers a training that saved its checkpoint and exited asking to be started again.
  if (( attempt < MAX_ATTEMPTS )); then
    echo "cytosyn: training saved a checkpoint and asked to be requeued (exit $rc): requeueing job $JOB_ID" >&2
    record requeue
    scontrol requeue "$JOB_ID" || echo "cytosyn: 'scontrol requeue $JOB_ID' failed; resubmit with: sbatch @@{script}" >&2
  else
    echo "cytosyn: training asked to be requeued but this was attempt $attempt of $MAX_ATTEMPTS (max_attempts)." >&2
  fi
fi
exit "$rc"
"""

_TORCHRUN = """#!/usr/bin/env bash
# cytosyn training launcher for clusters without SLURM, rendered by `cytosyn launch`.
# Start the same script on every node (@@{nodes} node(s) × @@{gpus} GPU(s) = @@{world} processes):
#     bash @@{script}
# torchrun's c10d rendezvous at @@{endpoint} (node 0) assigns node ranks; --max-restarts=0 because the
# restart policy is this loop's: training that saved a checkpoint and asked to be started again (exit
# @@{ex_tempfail}, or "status": "preempted" in progress.json — torchrun itself reports exit 1) is started
# again, at most @@{max_attempts} times in all (max_attempts); exit 0 = finished; anything else = failure.
# Signals: TERM/INT/HUP to this script are passed to torchrun as TERM (training checkpoints and exits),
# then the loop stops with exit 75 ("requeue me") for whatever supervises it; USR1 = checkpoint and
# restart here.

cd @@{workdir} || exit 1

RUN_DIR=@@{run_dir}
CONFIG=@@{config}
ATTEMPTS="$RUN_DIR/launch/attempts.jsonl"
MAX_ATTEMPTS=@@{max_attempts}
export CYTOSYN_MAX_ATTEMPTS=$MAX_ATTEMPTS  # the same bound for training's own requeue logic
RESTART_DELAY=@@{restart_delay}
JOB_ID="${CYTOSYN_JOB_ID:-torchrun-$(date -u +%Y%m%dT%H%M%SZ)-$HOSTNAME-$$}"
attempt=0

@@{setup}
set -uo pipefail  # after the setup lines: module and venv scripts often trip over `set -u`
@@{common}
@@{environment}

stop=0
child=""
forward() { if [[ -n "$child" ]]; then kill -TERM "$child" 2>/dev/null; fi; }
trap 'stop=1; forward' TERM INT HUP
trap 'forward' USR1  # torchrun dies on USR1 itself; TERM is what it passes on to the workers

while :; do
  attempt=$(( attempt + 1 ))
  if (( attempt > MAX_ATTEMPTS )); then
    echo "cytosyn: gave up: training was started $MAX_ATTEMPTS times (max_attempts) and asked for another start each time." >&2
    echo "cytosyn: the last checkpoint is kept; raise max_attempts or look for why it keeps stopping (see $ATTEMPTS)." >&2
    attempt=$MAX_ATTEMPTS
    record gave_up ", \\"max_attempts\\": $MAX_ATTEMPTS"
    exit 1
  fi
  before=$(progress_stamp)
  record start
  echo "cytosyn: attempt $attempt/$MAX_ATTEMPTS on $HOSTNAME" >&2
  @@{launch_command} &
  child=$!
  wait_for "$child"; rc=$?
  child=""
  preempted=false
  if was_preempted "$rc" "$before"; then preempted=true; fi
  record end ", \\"exit_code\\": $rc, \\"preempted\\": $preempted"
  if (( rc == 0 )); then
    echo "cytosyn: training finished (attempt $attempt)." >&2
    exit 0
  fi
  if [[ $preempted != true ]]; then
    echo "cytosyn: training failed with exit code $rc on attempt $attempt; not restarting." >&2
    exit "$rc"
  fi
  if (( stop )); then
    echo "cytosyn: stopped by a signal after training saved its checkpoint; run this script again to resume." >&2
    exit @@{ex_tempfail}
  fi
  echo "cytosyn: attempt $attempt saved a checkpoint and asked to be started again (exit $rc); restarting in $RESTART_DELAY s." >&2
  sleep "$RESTART_DELAY"
  if (( stop )); then exit @@{ex_tempfail}; fi
done
"""


def _setup_block(cfg: LaunchConfig) -> str:
    if not cfg.setup:
        needed = "`cytosyn`" if cfg.backend == "slurm" else "`torchrun` (of the Python that has cytosyn)"
        return f"# (no setup lines in the launch config: {needed} must be on PATH when the job starts)"
    return "\n".join(["# ---- setup from the launch config ----", *cfg.setup])


def sbatch_directives(cfg: LaunchConfig, spec: JobSpec) -> list[str]:
    if any(c.isspace() for c in str(spec.run_dir)):
        raise ValueError(f"run_dir {spec.run_dir} contains whitespace, which #SBATCH lines cannot carry")
    lines = [
        f"--job-name={cfg.job_name}",
        f"--nodes={cfg.nodes}",
        f"--ntasks-per-node={cfg.gpus_per_node}",
        f"--gpus-per-node={cfg.gpus_per_node}",
        f"--cpus-per-task={cfg.cpus_per_task}",
        f"--time={cfg.time}",
    ]
    lines += [f"--{key}={value}" for key in ("partition", "account", "qos") if (value := getattr(cfg, key))]
    lines += [
        f"--signal=USR1@{cfg.requeue_signal_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--output={spec.run_dir}/slurm/%x-%j.out",
        f"--error={spec.run_dir}/slurm/%x-%j.err",
        f"--chdir={spec.workdir}",
    ]
    return [f"#SBATCH {line}" for line in lines] + list(cfg.extra_sbatch)


def srun_command(cfg: LaunchConfig, spec: JobSpec) -> str:
    return (
        f"srun --ntasks-per-node={cfg.gpus_per_node} --cpus-per-task={cfg.cpus_per_task} "
        f'--kill-on-bad-exit=1 cytosyn train --config "$CONFIG"'
    )


def torchrun_command(cfg: LaunchConfig, spec: JobSpec) -> str:
    return (
        f"torchrun --nnodes={cfg.nodes} --nproc-per-node={cfg.gpus_per_node} --rdzv-backend=c10d "
        f"--rdzv-endpoint={rdzv_endpoint(cfg)} --rdzv-id={rdzv_id(spec.run_dir)} --max-restarts=0 "
        f'-m cytosyn.cli train --config "$CONFIG"'
    )


def _common(cfg: LaunchConfig) -> str:
    return _Template(_COMMON).substitute(backend=cfg.backend, ex_tempfail=EX_TEMPFAIL)


def render_sbatch(cfg: LaunchConfig, spec: JobSpec, environ: Mapping[str, str] | None = None) -> str:
    """The SLURM batch script (``RUN_DIR/launch/job.sbatch``)."""
    values = {
        "directives": "\n".join(sbatch_directives(cfg, spec)),
        "script": spec.run_dir / "launch" / "job.sbatch",
        "nodes": cfg.nodes,
        "gpus": cfg.gpus_per_node,
        "world": cfg.world_size,
        "signal_s": cfg.requeue_signal_seconds,
        "ex_tempfail": EX_TEMPFAIL,
        "max_attempts": cfg.max_attempts,
        "run_dir": _q(spec.run_dir),
        "config": _q(spec.config_path),
        "common": _common(cfg),
        "setup": _setup_block(cfg),
        "environment": environment_block(cfg, spec, environ),
        "launch_command": srun_command(cfg, spec),
    }
    return _Template(_SBATCH).substitute(values)


def render_torchrun(cfg: LaunchConfig, spec: JobSpec, environ: Mapping[str, str] | None = None) -> str:
    """The torchrun restart loop (``RUN_DIR/launch/torchrun.sh``), run on every node."""
    values = {
        "script": spec.run_dir / "launch" / "torchrun.sh",
        "nodes": cfg.nodes,
        "gpus": cfg.gpus_per_node,
        "world": cfg.world_size,
        "endpoint": rdzv_endpoint(cfg),
        "ex_tempfail": EX_TEMPFAIL,
        "max_attempts": cfg.max_attempts,
        "restart_delay": cfg.restart_delay_seconds,
        "workdir": _q(spec.workdir),
        "run_dir": _q(spec.run_dir),
        "config": _q(spec.config_path),
        "common": _common(cfg),
        "setup": _setup_block(cfg),
        "environment": environment_block(cfg, spec, environ),
        "launch_command": torchrun_command(cfg, spec),
    }
    return _Template(_TORCHRUN).substitute(values)


def render_script(cfg: LaunchConfig, spec: JobSpec, environ: Mapping[str, str] | None = None) -> str:
    """The script for ``cfg.backend``."""
    if cfg.backend == "slurm":
        return render_sbatch(cfg, spec, environ)
    return render_torchrun(cfg, spec, environ)
