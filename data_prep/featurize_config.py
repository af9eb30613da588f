"""Configuration of ``cytosyn featurize`` (see configs/featurize.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from cytosyn.config import StrictModel, parse_part


class FeatureEncoderConfig(StrictModel):
    """One conditioning / REPA encoder to run over every tile."""

    name: str = "h0-mini"  # registry name (h0-mini, uni2-h, virchow2, h-optimus-0/1, phikon-v2, dinov2-*) or timm:<arch>
    weights: Path | None = None  # local weights file or folder; None = the hub (when online)
    random_init: bool = False  # random weights, only for tests and the demo (recorded in the manifest)
    seed: int = 0  # for random_init
    outputs: list[Literal["cls", "patch", "mean_patch"]] = Field(default_factory=lambda: ["cls"])


class FeatureVAEConfig(StrictModel):
    name: str = "sd-vae-ft-ema"  # sd-vae-ft-ema | sd-vae-ft-mse | sd3.5-vae | taef2 | tiny-f8
    weights: Path | None = None  # local diffusers folder (taef2: a .safetensors file); None = hub / bundled
    random_init: bool = False
    seed: int = 0


class FeaturizeConfig(StrictModel):
    input: Path = Path("dataset/train")  # a split folder written by `cytosyn pack` (has manifest.json)
    output: Path = Path("features/train")  # the featurized split folder (same shard names)
    encoders: list[FeatureEncoderConfig] = Field(default_factory=lambda: [FeatureEncoderConfig()])
    vae: FeatureVAEConfig | None = Field(default_factory=FeatureVAEConfig)
    batch_size: int = 64
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast dtype on GPU; CPU always runs fp32
    verify_input: bool = True  # check each input shard's sha256 against the input manifest while reading
    decode_check: int = 8  # tiles reconstructed from stored latents into decode_check.png (0 = off)
    part: str = "0/1"  # i/N: this process takes input shards i, i+N, ... (one process per GPU)
    progress: bool = True

    @field_validator("part")
    @classmethod
    def _check_part(cls, value: str) -> str:
        parse_part(value)
        return value

    @field_validator("batch_size")
    @classmethod
    def _check_batch(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be ≥ 1")
        return value

    def output_settings(self) -> dict:
        """What decides the output bytes (batching and precision can change the last bits on a GPU)."""
        return self.model_dump(mode="json", include={"encoders", "vae", "batch_size", "precision"})
