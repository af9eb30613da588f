"""``cytosyn finetune``: few-shot adaptation of a released (or checkpointed) model, as a thin layer over training.

What it adds to ``cytosyn train`` and nothing more:

1. the **base**: a release folder or training checkpoint, loaded through the public pipeline (hashes
   verified); its SiT weights and latent normalisation start the fine-tune, and its weights sha256 is what
   the adapter records;
2. the **few-shot split**: N tiles per class drawn from a labelled featurized split
   (:mod:`cytosyn.training.fewshot`), copied byte for byte into ``<run_dir>/few_shot/`` and streamed by the
   ordinary loader;
3. the **change**: LoRA (peft) on the attention and MLP linears, base weights frozen, or full
   fine-tuning; in ``conditioning: label`` mode a zero-initialised class-label embedding with a null label
   (the condition dropout trains the null label for classifier-free guidance); in ``embedding`` mode the
   model stays conditioned on encoder embeddings as in training;
4. the **adapter** folder at the end (``<run_dir>/adapter``, :mod:`cytosyn.adapters`), from the EMA
   (default) or raw weights.

Everything else — the Lightning module's training step, per-sample seeded randomness, EMA, atomic
checkpoints, exact resume from the newest intact checkpoint, SIGUSR1/SIGTERM preemption with requeue,
CSV/wandb logs, ``progress.json`` — is training's own (:class:`~cytosyn.training.module.LatentDiffusionModule`
and :func:`~cytosyn.training.run.fit_module`), so a fine-tune resumes and is launched exactly like a
training run. Rerunning the same command resumes; a changed config is refused unless ``--force``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from cytosyn.adapters import (
    ADAPTER_FORMAT,
    LoraSettings,
    adapter_tensors,
    inject_lora,
    label_indices,
    mark_trainable,
    write_adapter_folder,
)
from cytosyn.config import (
    ConfigError,
    StrictModel,
)
from cytosyn.fileio import code_version
from cytosyn.manifest import read_manifest
from cytosyn.training.config import (
    DataConfig,
    DiffusionConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RepaConfig,
    TrainConfig,
    TrainerConfig,
    ValidationConfig,
)
from cytosyn.training.ema import EMA
from cytosyn.training.fewshot import FewShotConfig, select_few_shot, write_few_shot_split
from cytosyn.training.module import LatentDiffusionModule, TrainingDataError
from cytosyn.training.run import TrainResult, check_config_drift, config_writer, fit_module

log = logging.getLogger(__name__)

FINETUNE_CONFIG_FILE = "finetune.yaml"
ADAPTER_DIR = "adapter"
FEW_SHOT_DIR = "few_shot"


class FinetuneData(StrictModel):
    train: Path = Path("features/train")  # a labelled featurized split (tile JSON has `label`)
    exclude: list[Path] = Field(default_factory=list)  # splits (e.g. test) whose patients must not be used
    batch_size: int = Field(default=8, ge=1)
    num_workers: int = Field(default=0, ge=0)
    shuffle_buffer: int = Field(default=64, ge=0)


class FinetuneEMA(StrictModel):
    decay: float = Field(default=0.999, ge=0.0, le=1.0)  # few hundred steps: a short average
    warmup: bool = True  # decay min(decay, (1+n)/(10+n)): the EMA leaves the base quickly


class FinetuneConfig(StrictModel):
    base: Path  # release folder (verified) or training checkpoint / run folder
    run_dir: Path = Path("runs/finetune")
    name: str | None = None  # adapter name (default: the run folder's name)
    seed: int = 0
    conditioning: Literal["label", "embedding"] = "label"
    method: Literal["lora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    cond_dropout: float = Field(default=0.1, ge=0.0, le=1.0)  # null label / embedding rate (CFG)
    data: FinetuneData = Field(default_factory=FinetuneData)
    few_shot: FewShotConfig = Field(default_factory=FewShotConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: FinetuneEMA = Field(default_factory=FinetuneEMA)
    trainer: TrainerConfig = Field(
        default_factory=lambda: TrainerConfig(
            max_steps=500, log_every_n_steps=10, checkpoint_every_n_steps=100, keep_last_checkpoints=2
        )
    )
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig(wandb="disabled"))
    adapter_weights: Literal["ema", "raw"] = "ema"

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.diffusion.latent_norm != "fixed":
            raise ValueError(
                "diffusion.latent_norm: a fine-tune keeps the base model's latent normalisation (fixed)"
            )
        if self.method == "full" and self.lora != LoraSettings():
            raise ValueError("lora settings are set but method is 'full'")
        return self

    def identity_settings(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"logging"})
        for key in ("max_steps", "log_every_n_steps", "checkpoint_every_n_steps", "keep_last_checkpoints"):
            data["trainer"].pop(key)
        data["data"].pop("num_workers")
        return data


# ---------------------------------------------------------------------------------------- the base
@dataclass
class Base:
    config: dict[str, Any]  # the release config.json content (what the pipeline holds)
    state: dict[str, torch.Tensor]  # model.* and latent_norm.*
    weights_sha256: str
    name: str
    source: str


def load_base(path: Path) -> Base:
    """The base model's config and weights through the public pipeline (a release is hash-verified)."""
    from cytosyn.pipeline import load_pipeline

    pipe = load_pipeline(path, device="cpu", dtype="fp32")
    if pipe.adapter is not None or pipe.model.label_embedder is not None:
        raise ConfigError(f"base {path} already carries labels or an adapter; fine-tune from its base model")
    return Base(pipe.config, pipe.state_dict(), pipe.weights_sha256, pipe.name, str(path))


def base_features(base: Base, cfg: FinetuneConfig, split: Path) -> tuple[dict[str, Any], str]:
    """Training's ``features`` for the base (latents normalised as the base did) and the condition member,
    after checking that the split's latents come from the base's VAE."""
    manifest = read_manifest(split)
    latent, vae, cond = (
        base.config["latent"],
        base.config.get("vae") or {},
        base.config.get("conditioning") or {},
    )
    vae_entry = next((f for f in manifest.features if f.member == "vae.npy"), None)
    if vae_entry is None:
        raise TrainingDataError(
            f"split {split} has no vae.npy latents (run cytosyn featurize with the base's VAE)"
        )
    if vae_entry.model_id != vae.get("name") or (
        vae.get("weights")
        and vae_entry.details.get("weights")
        and vae_entry.details["weights"] != vae["weights"]
    ):
        raise TrainingDataError(
            f"split {split}: latents were made by VAE {vae_entry.model_id!r} ({vae_entry.details.get('weights')}), "
            f"the base model decodes with {vae.get('name')!r} ({vae.get('weights')}): featurize with the base's VAE"
        )
    shape = vae_entry.details.get("shape") or []
    if len(shape) >= 3 and (int(shape[1]), int(shape[2])) != (int(latent["channels"]), int(latent["size"])):
        raise TrainingDataError(
            f"split {split}: latents {shape} do not match the base's {latent['channels']}×{latent['size']}"
        )
    member = "none"
    if cfg.conditioning == "embedding":
        member = str(cond.get("member") or "").removesuffix(".npy")
        if not member or not any(f.member == f"{member}.npy" for f in manifest.features):
            raise TrainingDataError(
                f"split {split} has no {member}.npy embeddings (the base's conditioning member)"
            )
    features = {
        "cond_dim": base.config["sit"].get("cond_dim"),
        "cond_model": cond.get("encoder"),
        "cond_weights": cond.get("weights"),
        "latent_channels": int(latent["channels"]),
        "latent_size": int(latent["size"]),
        "latent_mean": list(latent["shift"]),
        "latent_std": list(latent["scale"]),
        "vae": {"model_id": vae.get("name"), "weights": vae.get("weights")},
        "repa_dim": None,
    }
    return features, member


def training_config(cfg: FinetuneConfig, base: Base, few_shot_dir: Path, member: str) -> TrainConfig:
    """The `TrainConfig` training's module and trainer run with: the base's architecture, no REPA, no
    held-out validation (the few-shot split is all there is)."""
    sit = dict(base.config["sit"])
    preset = sit.pop("preset", None) or "SiT-XL/2"
    sit.pop("grad_checkpointing", None)
    return TrainConfig(
        run_dir=cfg.run_dir,
        seed=cfg.seed,
        data=DataConfig(
            train=few_shot_dir, val=None, condition=member, repa_target=None,
            batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer, mode="epoch",
        ),
        model=ModelConfig(preset=preset, overrides=sit, cond_dropout=cfg.cond_dropout),
        diffusion=cfg.diffusion,
        repa=RepaConfig(weight=0.0),
        optim=cfg.optim,
        ema={"decay": cfg.ema.decay},
        trainer=cfg.trainer,
        validation=ValidationConfig(every_n_steps=0, sample_grid_every_n_steps=0),
        logging=cfg.logging,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- the module
class FinetuneModule(LatentDiffusionModule):
    """Training's module, started from the base weights, with LoRA / labels and only those parameters trained."""

    def __init__(
        self,
        train_cfg: TrainConfig,
        features: dict[str, Any],
        cfg: FinetuneConfig,
        base: Base,
        label_names: list[str],
        selection: dict[str, Any],
    ):
        super().__init__(train_cfg, features)
        self.ft = cfg
        self.base_info = {"weights_sha256": base.weights_sha256, "name": base.name, "source": base.source}
        self.label_names = list(label_names)
        self.selection = selection
        model = self.net["model"]
        model_state = {k[len("model.") :]: v for k, v in base.state.items() if k.startswith("model.")}
        model.load_state_dict(model_state, strict=True)
        # The base's (shift, scale) as fixed statistics: the latent space the base denoises in.
        self.net["latent_norm"].requires_grad_(False)
        if cfg.conditioning == "label":
            model.add_label_embedder(len(self.label_names))
        if cfg.method == "lora":
            inject_lora(model, cfg.lora)
        self.trainable = mark_trainable(model, cfg.method)
        # Replaces the base class's EMA, outside the module tree like it (see cytosyn.training.module).
        object.__setattr__(
            self, "ema", EMA(self.net, decay=cfg.ema.decay, warmup=cfg.ema.warmup, buffers="copy")
        )
        n_train = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.net.parameters())
        log.info(
            "fine-tune %s: %d of %d parameters trainable (%.2f%%)",
            cfg.method,
            n_train,
            n_all,
            100 * n_train / n_all,
        )

    def loader_members(self) -> list[str]:
        members = ["vae.npy", "json"]
        if self.ft.conditioning == "embedding":
            members.insert(0, f"{self.cfg.data.condition}.npy")
        return members

    def condition_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.ft.conditioning == "embedding":
            return super().condition_inputs(batch)
        field = self.ft.few_shot.label_field
        names = [str(meta[field]) for meta in batch["json"]]
        labels = torch.tensor(label_indices(names, self.label_names), dtype=torch.long, device=self.device)
        return {"cond": None, "labels": labels}

    def validation_losses(self, use_ema: bool = False) -> dict[str, float]:
        return {}  # no held-out split in a few-shot run: the augmentation study measures the result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["cytosyn"]["finetune"] = {
            "config": self.ft.model_dump(mode="json"),
            "base": self.base_info,
            "label_names": self.label_names,
        }

    def adapter_config(self, steps: int) -> dict[str, Any]:
        cfg = self.ft
        return {
            "format": ADAPTER_FORMAT,
            "name": cfg.name or Path(cfg.run_dir).name,
            "kind": cfg.method,
            "conditioning": cfg.conditioning,
            "lora": cfg.lora.model_dump(mode="json") if cfg.method == "lora" else None,
            "labels": {
                "names": self.label_names,
                "null_index": len(self.label_names),
                "field": cfg.few_shot.label_field,
            }
            if cfg.conditioning == "label"
            else None,
            "base": self.base_info,
            "few_shot": self.selection,
            "training": {
                "steps": steps,
                "weights": cfg.adapter_weights,
                "trainable_parameters": len(self.trainable),
                "config": cfg.model_dump(mode="json"),
                "code_version": code_version(),
            },
        }

    def write_adapter(self, folder: Path, steps: int) -> Path:
        net = self.ema.module if self.ft.adapter_weights == "ema" else self.net
        tensors = adapter_tensors(net["model"], self.ft.method)
        return write_adapter_folder(folder, self.adapter_config(steps), tensors)


# ---------------------------------------------------------------------------------------- the run
@dataclass
class FinetuneResult:
    train: TrainResult
    adapter: Path | None
    few_shot: dict[str, Any]


def run_finetune(cfg: FinetuneConfig, force: bool = False) -> FinetuneResult:
    """Fine-tune (or resume) in ``cfg.run_dir``; writes ``<run_dir>/adapter`` when the run finishes."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    must_write = check_config_drift(cfg.run_dir / FINETUNE_CONFIG_FILE, cfg, force)
    base = load_base(cfg.base)
    features, member = base_features(base, cfg, cfg.data.train)
    selection = select_few_shot(cfg.data.train, cfg.few_shot, exclude=cfg.data.exclude)
    few_shot_dir = write_few_shot_split(cfg.data.train, selection, cfg.run_dir / FEW_SHOT_DIR)
    train_cfg = training_config(cfg, base, few_shot_dir, member)
    torch.set_flush_denormal(True)
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = FinetuneModule(train_cfg, features, cfg, base, selection.label_names, selection.to_dict())
    writer = config_writer(cfg, cfg.run_dir / FINETUNE_CONFIG_FILE) if must_write else None
    result = fit_module(train_cfg, module, force, write_config=writer)
    adapter = None
    if result.status == "finished" and module.global_rank == 0:
        adapter = module.write_adapter(cfg.run_dir / ADAPTER_DIR, result.global_step)
    return FinetuneResult(train=result, adapter=adapter, few_shot=selection.to_dict())


__all__ = [
    "ADAPTER_DIR",
    "FinetuneConfig",
    "FinetuneModule",
    "FinetuneResult",
    "load_base",
    "run_finetune",
]
