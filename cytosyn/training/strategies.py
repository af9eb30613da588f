"""How a run executes: accelerator, precision and distribution strategy — checked before any work.

Every combination that cannot work is refused here with the reason, before data, model or processes are
touched (:func:`resolve_execution`). What each choice means:

- **Precision** ``bf16-mixed`` (GPU default) and ``16-mixed``: fp32 master weights, autocast around the
  forward; the loss, REPA loss and latent statistics are computed in fp32. fp16 uses a GradScaler: the
  training step unscales before clipping and the scaler is updated on every step, skipped or not.
- **DDP** (``ddp``; the default with more than one process): ``gradient_as_bucket_view`` (no second copy of
  the gradients) and no per-step buffer broadcast (the latent statistics are constant or synchronised,
  the EMA lives outside the module).
- **DeepSpeed ZeRO-2** (``deepspeed_stage_2``): optimizer state and gradients sharded across ranks. cytosyn
  keeps the parameters in fp32 and lets DeepSpeed run the forward under ``torch.autocast`` (its
  ``torch_autocast`` mode), instead of DeepSpeed's ``bf16`` mode that would cast the whole module — and
  every tensor of the batch — to bf16. So the numerics match DDP's bf16-mixed, the fp32 EMA is updated
  from exact fp32 weights, and gradients of linear/conv layers are still reduced in bf16. Clipping and
  the non-finite-step guard are DeepSpeed's (``gradient_clipping``; a step whose global gradient norm is
  not finite is skipped by the engine). Checkpoints are folders, written atomically with a completion
  marker (:class:`CytosynDeepSpeedStrategy`).
- **ZeRO-3 is refused**: it shards the parameters themselves, so the fp32 EMA would need an all-gather of
  the whole model every step, and its checkpoints are not covered by cytosyn's tests. SiT-XL/2 (675 M
  parameters: ~11 GB of weights, EMA and AdamW state) fits ZeRO-2 or DDP on any 40 GB GPU.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from cytosyn.config import ConfigError
from cytosyn.training.checkpoints import (
    MARKER,
    CheckpointWriteError,
    _fsync_tree,
    describe_write_error,
    publish_folder,
    temporary_name,
    write_marker,
)
from cytosyn.training.config import TrainConfig

log = logging.getLogger(__name__)

# Set by tests only: lets DeepSpeed run on CPU processes (see cytosyn/training/cpu_deepspeed.py).
CPU_DEEPSPEED_ENV = "CYTOSYN_CPU_DEEPSPEED_FOR_TESTS"


@dataclass(frozen=True)
class Execution:
    accelerator: str  # "gpu" or "cpu"
    precision: str  # "bf16-mixed", "16-mixed" or "32-true"
    strategy: str  # "single", "ddp" or "deepspeed_stage_2"
    world_size: int

    @property
    def deepspeed(self) -> bool:
        return self.strategy.startswith("deepspeed")


def resolve_execution(cfg: TrainConfig) -> Execution:
    """Accelerator, precision and strategy of ``cfg``; :class:`ConfigError` for a combination that cannot work."""
    t = cfg.trainer
    if t.accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    else:
        accelerator = "gpu" if t.accelerator in ("gpu", "cuda") else t.accelerator
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.accelerator: a GPU was asked for but CUDA is not available on this machine"
        )
    precision = (
        t.precision if t.precision != "auto" else ("bf16-mixed" if accelerator == "gpu" else "32-true")
    )
    world = t.devices * t.num_nodes
    strategy = t.strategy if t.strategy != "auto" else ("ddp" if world > 1 else "single")
    if strategy == "deepspeed_stage_3":
        raise ConfigError(
            "trainer.strategy: deepspeed_stage_3 is refused. ZeRO-3 shards the parameters themselves, so the "
            "fp32 EMA would need an all-gather of the whole model every step, and ZeRO-3 checkpoints are not "
            "covered by cytosyn's tests. SiT-XL/2 (~11 GB of weights, EMA and AdamW state) fits "
            "deepspeed_stage_2 (or ddp) on any 40 GB GPU: use deepspeed_stage_2."
        )
    if strategy.startswith("deepspeed"):
        if accelerator == "cpu" and os.environ.get(CPU_DEEPSPEED_ENV) != "1":
            raise ConfigError(
                "trainer.strategy: DeepSpeed needs CUDA GPUs (Lightning refuses it on CPU); use ddp on CPU"
            )
        if precision == "16-mixed":
            raise ConfigError(
                "trainer.precision: 16-mixed is refused with DeepSpeed (its fp16 loss scaling would clip "
                "scaled gradients under cytosyn's manual optimisation); use bf16-mixed, which needs no "
                "scaling, or the ddp strategy for fp16"
            )
        if t.accumulate_grad_batches != 1:
            raise ConfigError("trainer.accumulate_grad_batches must be 1 with DeepSpeed")
    if accelerator == "gpu" and precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "trainer.precision: this GPU has no bf16 support; use 16-mixed (fp16 with loss scaling)"
        )
    return Execution(accelerator, precision, strategy, world)


def deepspeed_config(cfg: TrainConfig, execution: Execution) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO-2, fp32 parameters with torch autocast, DeepSpeed's clipping."""
    config: dict[str, Any] = {
        "zero_optimization": {
            "stage": 2,
            "contiguous_gradients": True,
            "overlap_comm": True,
            "reduce_scatter": True,
            "reduce_bucket_size": 2e8,
            "allgather_bucket_size": 2e8,
        },
        "zero_allow_untested_optimizer": True,  # torch's fused AdamW, given by configure_optimizers
        "gradient_clipping": float(cfg.optim.grad_clip),
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "steps_per_print": 2**31 - 1,  # cytosyn logs itself
        "wall_clock_breakdown": False,
    }
    if execution.precision == "bf16-mixed":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


class CytosynDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with atomic checkpoint folders and a world-size check on resume."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        final = Path(self.broadcast(str(filepath)))
        tmp = temporary_name(final, self.broadcast(uuid.uuid4().hex[:12]))
        meta = checkpoint.get("cytosyn") or {}
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except OSError as err:
            raise CheckpointWriteError(describe_write_error(err, final)) from err
        self.barrier()
        if self.is_global_zero:
            try:
                _fsync_tree(tmp)
                write_marker(
                    tmp,
                    int(checkpoint.get("global_step", -1)),
                    int(meta.get("micro_step", -1)),
                    self.world_size,
                )
                publish_folder(tmp, final)
            except OSError as err:
                raise CheckpointWriteError(
                    describe_write_error(err, final) + "; the previous checkpoints are intact"
                ) from err
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        import json

        marker = Path(checkpoint_path) / MARKER
        if marker.is_file():
            saved = json.loads(marker.read_text()).get("world_size")
            if saved is not None and saved != self.world_size:
                raise ConfigError(
                    f"{checkpoint_path} is a ZeRO-2 checkpoint of {saved} ranks: its optimizer state is sharded "
                    f"over {saved} ranks and cannot be loaded on {self.world_size}. Resume on {saved} GPUs, or "
                    "start a new run from its consolidated weights (model.init_from)"
                )
        return super().load_checkpoint(checkpoint_path, weights_only)


def build_strategy(cfg: TrainConfig, execution: Execution) -> tuple[Any, list[Any], str | None]:
    """(strategy, plugins, Trainer precision flag or None when a precision plugin is in ``plugins``)."""
    from cytosyn.training.checkpoints import AtomicCheckpointIO

    plugins: list[Any] = []
    precision: str | None = execution.precision
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # One requeue mechanism: cytosyn's Preemption callback (checkpoint at a step boundary, bounded
        # attempts). Lightning's own auto-requeue would save an extra checkpoint from a signal handler.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if execution.deepspeed:
        strategy_cls: type[CytosynDeepSpeedStrategy] = CytosynDeepSpeedStrategy
        backend = None
        if execution.accelerator == "cpu":
            from cytosyn.training.cpu_deepspeed import CPUDeepSpeedStrategyForTests

            strategy_cls, backend = CPUDeepSpeedStrategyForTests, "gloo"
        strategy: Any = strategy_cls(config=deepspeed_config(cfg, execution), process_group_backend=backend)
        precision = "32-true"  # autocast is DeepSpeed's (torch_autocast): Lightning must not cast the batch
        return strategy, plugins, precision
    if execution.strategy == "ddp":
        strategy = DDPStrategy(
            find_unused_parameters=False, gradient_as_bucket_view=True, broadcast_buffers=False
        )
    else:
        strategy = "auto"
    plugins.append(AtomicCheckpointIO())
    if execution.precision == "16-mixed":
        from lightning.pytorch.plugins.precision import MixedPrecision

        device = "cuda" if execution.accelerator == "gpu" else "cpu"
        scaler = torch.amp.GradScaler(device, init_scale=cfg.trainer.loss_scale_init)
        plugins.append(MixedPrecision("16-mixed", device, scaler=scaler))
        precision = None  # given by the plugin (Lightning would otherwise turn CPU fp16 into bf16)
    return strategy, plugins, precision


def configure_backends(execution: Execution, tf32: bool) -> None:
    """TF32 tensor cores for the fp32 parts of a GPU step (the autocast region is bf16/fp16 anyway)."""
    if execution.accelerator == "gpu" and tf32:
        torch.set_float32_matmul_precision("high")
    # Adam's second moments and small gradients drift into denormal floats, which x86 CPUs compute
    # ~10x slower; flushing them to zero changes nothing measurable (no effect on GPUs).
    torch.set_flush_denormal(True)
