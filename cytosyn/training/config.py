"""Configuration of ``cytosyn train`` (presets in configs/train_*.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from cytosyn.config import StrictModel


class DataConfig(StrictModel):
    train: Path = Path("features/train")  # featurized split (manifest.json with embeddings + vae.npy)
    val: Path | None = None  # featurized held-out-patient split (validation losses, overfitting gap)
    condition: str = "h0-mini"  # embedding member (without .npy) that conditions the model
    repa_target: str | None = "h0-mini_patch"  # stored patch tokens member; None = no REPA or online
    batch_size: int = 32  # per GPU (per process)
    num_workers: int = 4
    shuffle_buffer: int = 1000
    mode: Literal["epoch", "resampled"] = "epoch"
    verify_hashes: bool = (
        False  # check shards against the manifest's sha256 (damaged samples skipped, counted)
    )


class ModelConfig(StrictModel):
    preset: str = "SiT-XL/2"  # SiT-T/2 (tests), SiT-S/2, SiT-B/2, SiT-L/2, SiT-XL/2
    overrides: dict[str, Any] = Field(default_factory=dict)  # any SiTConfig key (depth, repa_depth, ...)
    cond_dropout: float = 0.1  # probability of the null condition per sample (classifier-free guidance)
    init_from: Path | None = None  # a SiT/REPA(-E) checkpoint to fine-tune from (see load_sit_state_dict)
    # Refuse an init_from checkpoint that differs from the model in more than the expected keys.
    init_strict: bool = True
    # checkpoint: a REPA-E checkpoint's latent BatchNorm statistics become the latent normalisation
    # (the weights were trained with them); split: keep the featurized split's statistics.
    init_latent_stats: Literal["checkpoint", "split"] = "checkpoint"


class DiffusionConfig(StrictModel):
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    latent_norm: Literal["fixed", "batchnorm"] = "fixed"  # fixed: the split's latent statistics
    sample_posterior: bool = True  # z = mean + σ·ε from the stored moments (False: the mean)


class RepaConfig(StrictModel):
    weight: float = 0.5  # 0 disables REPA
    alignment: Literal["area", "bilinear", "adaptive_avg"] = "area"  # encoder token grid → SiT grid
    online_encoder: str | None = None  # compute targets from the images with this registry encoder
    online_weights: Path | None = None
    online_random_init: bool = False  # tests only
    # Stored patch tokens take ~390 KB per tile (256×768 fp16): above this size the training start warns
    # that computing them online (repa.online_encoder) is cheaper than reading them.
    stored_tokens_limit_gb: float = 200.0


class OptimConfig(StrictModel):
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the learning rate
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    global_batch: int | None = None  # images per optimizer step; checked against the topology when set
    fused: bool = True  # torch's fused AdamW (one kernel; skips a non-finite step on the device)


class EMAConfig(StrictModel):
    decay: float = 0.9999
    buffers: Literal["copy", "average"] = "copy"


class TrainerConfig(StrictModel):
    max_steps: int = 400_000
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int = 1  # processes (GPUs) per node
    num_nodes: int = 1
    # auto: ddp when more than one process. deepspeed_stage_3 is refused with the reason (strategies.py).
    strategy: Literal["auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3"] = "auto"
    precision: Literal["auto", "bf16-mixed", "16-mixed", "32-true"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    loss_scale_init: float = 65536.0  # 16-mixed only: the GradScaler's first scale
    tf32: bool = True  # GPU: TF32 tensor cores for the fp32 matmuls outside autocast
    accumulate_grad_batches: int = 1
    grad_checkpointing: bool = False
    compile: bool = False
    log_every_n_steps: int = 50  # values are read from the GPU only at these steps (one sync each)
    log_grad_norms: bool = True  # per-module-group gradient norms at logging steps
    checkpoint_every_n_steps: int = 5000
    keep_last_checkpoints: int = 3
    max_consecutive_nonfinite: int = 20  # skipped steps in a row before the run stops


class ValidationConfig(StrictModel):
    every_n_steps: int = 5000  # 0 disables
    t_values: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    max_batches: int = 8  # per split (val and the train-patient reference)
    seed: int = 1234  # fixed noise: the same for every evaluation
    sample_grid_every_n_steps: int = 0  # 0 disables; needs the VAE of the featurized split
    sample_grid_size: int = 8  # fixed conditions: the first tiles of the val split (train if none)
    sample_steps: int = 30  # Euler ODE steps, EMA weights, no guidance
    vae_weights: Path | None = (
        None  # local VAE folder for the grid (random-init VAEs are rebuilt from their seed)
    )


class LoggingConfig(StrictModel):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "cytosyn"
    name: str | None = None


class TrainConfig(StrictModel):
    run_dir: Path = Path("runs/cytosyn")
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    repa: RepaConfig = Field(default_factory=RepaConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        world = self.trainer.devices * self.trainer.num_nodes
        per_step = self.data.batch_size * world * self.trainer.accumulate_grad_batches
        if self.optim.global_batch is not None and self.optim.global_batch != per_step:
            raise ValueError(
                f"optim.global_batch={self.optim.global_batch} but data.batch_size × devices × num_nodes × "
                f"accumulate_grad_batches = {self.data.batch_size} × {self.trainer.devices} × "
                f"{self.trainer.num_nodes} × {self.trainer.accumulate_grad_batches} = {per_step}"
            )
        if self.trainer.strategy.startswith("deepspeed") and self.trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "trainer.accumulate_grad_batches must be 1 with deepspeed_stage_2 (cytosyn optimises manually; "
                "reach the global batch with more GPUs or a larger data.batch_size)"
            )
        if self.repa.online_encoder and self.data.repa_target:
            raise ValueError("set either data.repa_target (stored tokens) or repa.online_encoder, not both")
        return self

    @property
    def images_per_step(self) -> int:
        return (
            self.data.batch_size
            * self.trainer.devices
            * self.trainer.num_nodes
            * self.trainer.accumulate_grad_batches
        )

    def identity_settings(self) -> dict[str, Any]:
        """Settings a resumed run must share with its checkpoint (everything but run length and logging)."""
        data = self.model_dump(mode="json", exclude={"logging", "validation"})
        data["trainer"].pop("max_steps")
        for key in (
            "log_every_n_steps",
            "log_grad_norms",
            "checkpoint_every_n_steps",
            "keep_last_checkpoints",
        ):
            data["trainer"].pop(key)
        data["data"].pop("num_workers")
        data["repa"].pop("stored_tokens_limit_gb")
        return data
