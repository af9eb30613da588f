"""Configuration of ``cytosyn launch``: where and how a training run is started (see configs/launch.yaml).

The training config itself (``cytosyn train --config``) is *not* modelled here: launch reads it as plain
YAML and only touches the keys it must (``run_dir``, ``trainer.num_nodes``, ``trainer.devices``), so the
launcher never imports the training code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cytosyn.config import StrictModel

_TIME_RE = re.compile(r"^(?:(?P<days>\d+)-)?(?P<h>\d{1,3}):(?P<m>\d{2}):(?P<s>\d{2})$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENDPOINT_RE = re.compile(r"^(?:\[[0-9A-Fa-f:]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")

# Network settings a site typically sets in the submitting shell (or a module); copied into the script
# when set there, so every node and every requeued attempt runs with the same values.
DEFAULT_PASSTHROUGH = [
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_HCA",
    "NCCL_IB_DISABLE",
    "NCCL_IB_GID_INDEX",
    "NCCL_NET_GDR_LEVEL",
    "NCCL_DEBUG",
    "GLOO_SOCKET_IFNAME",
]


def parse_time(text: str) -> int:
    """``HH:MM:SS`` or ``D-HH:MM:SS`` → seconds (ValueError on anything else)."""
    match = _TIME_RE.match(text.strip())
    if not match:
        raise ValueError(f"time {text!r} must be HH:MM:SS or D-HH:MM:SS")
    days = int(match["days"] or 0)
    hours, minutes, seconds = int(match["h"]), int(match["m"]), int(match["s"])
    if minutes >= 60 or seconds >= 60 or (match["days"] is not None and hours >= 24):
        raise ValueError(f"time {text!r}: minutes and seconds must be < 60 (hours < 24 after a day count)")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"time {text!r} must be positive")
    return total


class LaunchConfig(StrictModel):
    """How to start ``cytosyn train`` on a cluster: SLURM batch job or a torchrun restart loop."""

    backend: Literal["slurm", "torchrun"] = "slurm"
    nodes: int = Field(1, ge=1)  # → trainer.num_nodes
    gpus_per_node: int = Field(1, ge=1)  # → trainer.devices; one process (SLURM task) per GPU
    cpus_per_task: int = Field(8, ge=1)  # CPU cores per GPU process (DataLoader workers + main process)
    partition: str | None = None
    time: str = "24:00:00"  # SLURM time limit, HH:MM:SS or D-HH:MM:SS
    account: str | None = None
    qos: str | None = None
    job_name: str = "cytosyn-train"  # never "bash"/"interactive": Lightning then ignores SLURM
    max_attempts: int = Field(5, ge=1)  # starts of the job in all (SLURM: 1 + requeues; torchrun: loop)
    requeue_signal_seconds: int = Field(90, ge=1, le=65535)  # SIGUSR1 this long before the time limit
    restart_delay_seconds: int = Field(10, ge=0)  # torchrun loop: pause before a restart
    rdzv_endpoint: str | None = None  # torchrun HOST:PORT (node 0); needed when nodes > 1
    extra_sbatch: list[str] = Field(default_factory=list)  # raw lines: "--exclusive" or "#SBATCH --mem=0"
    env: dict[str, str] = Field(default_factory=dict)  # extra environment (wins over everything rendered)
    passthrough_env: list[str] = Field(default_factory=lambda: list(DEFAULT_PASSTHROUGH))
    setup: list[str] = Field(default_factory=list)  # shell lines before training (module load, venv ...)
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # compute nodes rarely reach the web
    hf_offline: bool = True  # HF_HUB_OFFLINE=1: weights come from the cache, no hub calls from ranks
    cache_dir: Path | None = None  # HF_HOME / TORCH_HOME / TORCH_EXTENSIONS_DIR root; None = RUN_DIR/cache
    dry_run: bool = False  # validate and print the script; write and submit nothing
    force: bool = False  # accept config drift and too few shards (warnings instead of errors)

    @field_validator("time", mode="before")
    @classmethod
    def _seconds_to_time(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted 24:00:00 as the integer 86400 (base 60): take integers as seconds.
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return f"{value // 3600}:{value // 60 % 60:02d}:{value % 60:02d}"
        return value

    @field_validator("time")
    @classmethod
    def _check_time(cls, value: str) -> str:
        parse_time(value)
        return value.strip()

    @field_validator("rdzv_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not _ENDPOINT_RE.match(value):
            raise ValueError(f"{value!r} is not HOST:PORT")
        return value

    @field_validator("job_name")
    @classmethod
    def _check_job_name(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_.+-]+$", value):
            raise ValueError("use letters, digits and _ . + - only")
        if value in ("bash", "interactive"):
            raise ValueError("Lightning treats jobs named bash/interactive as interactive and ignores SLURM")
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return {k: str(v) for k, v in value.items()}

    @field_validator("passthrough_env")
    @classmethod
    def _check_passthrough(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _ENV_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _check_extra(cls, value: list[str]) -> list[str]:
        lines = []
        for line in value:
            line = line.strip()
            if line.startswith("--"):
                line = f"#SBATCH {line}"
            if not line.startswith("#SBATCH "):
                raise ValueError(f"{line!r}: give an sbatch option (--mem=0) or a full '#SBATCH ...' line")
            if "\n" in line:
                raise ValueError(f"{line!r} spans several lines")
            lines.append(line)
        return lines

    @model_validator(mode="after")
    def _check_signal_fits(self) -> LaunchConfig:
        if self.requeue_signal_seconds >= parse_time(self.time):
            raise ValueError(
                f"requeue_signal_seconds ({self.requeue_signal_seconds}) must be shorter than time ({self.time})"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def time_seconds(self) -> int:
        return parse_time(self.time)
