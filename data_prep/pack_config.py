"""Configuration of ``cytosyn pack`` (see configs/pack.yaml for a commented example, docs/datasets.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cytosyn.config import StrictModel

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def _check_split_name(name: str) -> str:
    if not _SPLIT_NAME.match(name):
        raise ValueError(
            f"split name {name!r} must be letters, digits, '_' or '-' (it names a folder and shards)"
        )
    return name


class PackInputs(StrictModel):
    """Where the tiles come from and who the slides belong to."""

    tiles: list[Path] = Field(
        default_factory=list
    )  # tiling output folders (each holds slides/<id>/state.json)
    slide_table: Path | None = (
        None  # CSV/TSV slide_id[,patient_id,site,cohort|project]; wins over the tiles' identity
    )
    allow_slide_patients: bool = (
        False  # accept slides with no known patient (identity_source "slide_id") as their own patient
    )
    require_all_done: bool = (
        False  # refuse to pack if any slide is failed or unfinished (default: list them and go on)
    )


class SplitConfig(StrictModel):
    """Patient-level splits."""

    ratios: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )  # share of patients per split; sums to 1; 0 = not produced
    stratify: Literal["project", "none"] = "project"  # keep each project's share of patients in every split
    holdout_tss: list[str] = Field(
        default_factory=list
    )  # TSSs whose patients all go to `holdout_split` (domain-shift test)
    holdout_split: str = "test_tss"  # name of the held-out-TSS split (only produced when holdout_tss is set)

    @field_validator("ratios")
    @classmethod
    def _check_ratios(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("at least one split is needed")
        for name, ratio in value.items():
            _check_split_name(name)
            if ratio < 0:
                raise ValueError(f"ratio of {name!r} must be ≥ 0")
        total = sum(value.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"ratios must sum to 1 (got {total:g})")
        return value

    @field_validator("holdout_split")
    @classmethod
    def _check_holdout_name(cls, value: str) -> str:
        return _check_split_name(value)

    @field_validator("holdout_tss")
    @classmethod
    def _strip_tss(cls, value: list[str]) -> list[str]:
        return sorted({v.strip() for v in value if v.strip()})

    @model_validator(mode="after")
    def _holdout_not_a_ratio_split(self) -> SplitConfig:
        if self.holdout_tss and self.holdout_split in self.ratios:
            raise ValueError(f"holdout_split {self.holdout_split!r} is also a key of ratios; rename one")
        return self


class SamplingConfig(StrictModel):
    """Which tiles of the split's slides go into the split."""

    max_tiles_per_slide: int | None = None  # cap per slide (None = no cap)
    tiles_per_split: dict[str, int] = Field(
        default_factory=dict
    )  # tile budget per split name; unlisted splits take every tile (after caps)
    tss_weighting: Literal["slides", "tiles", "uniform", "none"] = (
        "slides"  # how a budget is shared among TSSs: by their slide count (CytoSyn), tile count, equally, or not per TSS at all
    )
    slide_weighting: Literal["equal", "tiles"] = (
        "equal"  # how a TSS's quota is shared among its slides: equally (water-filled) or by tile count
    )

    @field_validator("max_tiles_per_slide")
    @classmethod
    def _positive_cap(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be ≥ 1 (or null for no cap)")
        return value

    @field_validator("tiles_per_split")
    @classmethod
    def _positive_budgets(cls, value: dict[str, int]) -> dict[str, int]:
        for name, budget in value.items():
            if budget < 1:
                raise ValueError(f"budget of split {name!r} must be ≥ 1")
        return value


class OutputShardConfig(StrictModel):
    """The dataset's shards."""

    samples_per_shard: int = (
        20_000  # every shard holds exactly this many samples but the last (~0.5-0.8 GB of 224 px JPEG q95)
    )

    @field_validator("samples_per_shard")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be ≥ 1")
        return value


class PackRunConfig(StrictModel):
    """How the work runs; none of this changes the output bytes."""

    workers: int = (
        1  # processes reading input shards and writing output shards (memory: one output shard each)
    )
    progress: bool = True  # tqdm bars over input and output shards
    buffer_mb: int = 512  # memory per reading process for sample bytes on their way to the bucket files
    work_dir: Path | None = (
        None  # temporary bucket files (about the dataset's size); default <output>/.pack-work
    )

    @field_validator("buffer_mb", "workers")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be ≥ 1")
        return value


class PackConfig(StrictModel):
    """Everything ``cytosyn pack`` needs."""

    output: Path = Path("dataset")  # dataset folder: <output>/<split>/manifest.json + <split>-NNNNNN.tar
    seed: int = 0  # one seed for the split order, the tile choice and the global shuffle
    inputs: PackInputs = Field(default_factory=PackInputs)
    split: SplitConfig = Field(default_factory=SplitConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    shards: OutputShardConfig = Field(default_factory=OutputShardConfig)
    run: PackRunConfig = Field(default_factory=PackRunConfig)

    @model_validator(mode="after")
    def _budgets_name_splits(self) -> PackConfig:
        known = set(self.split.ratios) | {self.split.holdout_split}
        unknown = sorted(set(self.sampling.tiles_per_split) - known)
        if unknown:
            raise ValueError(
                f"sampling.tiles_per_split names unknown split(s) {unknown} (splits: {sorted(known)})"
            )
        return self

    def output_settings(self) -> dict[str, Any]:
        """The settings that decide the output bytes (recorded in every manifest; not output or run)."""
        return {
            "seed": self.seed,
            "inputs": self.inputs.model_dump(mode="json"),
            "split": self.split.model_dump(mode="json"),
            "sampling": self.sampling.model_dump(mode="json"),
            "shards": self.shards.model_dump(mode="json"),
        }
