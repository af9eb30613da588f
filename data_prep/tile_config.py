"""Configuration of ``cytosyn tile`` (see configs/tile.yaml for a commented example)."""

from __future__ import annotations

from pathlib import Path

from cytosyn.data_prep.codec import CodecConfig
from cytosyn.data_prep.grid import GridConfig
from cytosyn.data_prep.slide import SLIDE_EXTENSIONS
from cytosyn.data_prep.tissue import TissueConfig
from pydantic import Field, field_validator

from cytosyn.config import StrictModel, parse_part


class SlidesConfig(StrictModel):
    """Which slides, and what is known about them beyond their files."""

    input: list[Path] = Field(default_factory=list)  # files, folders (searched recursively), or .txt lists
    extensions: list[str] = Field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    mpp_overrides: Path | None = None  # CSV slide_id,mpp (or mpp_x,mpp_y): wins over slide metadata
    slide_table: Path | None = None  # CSV slide_id,patient_id,site,cohort for non-TCGA slides / projects
    project_from_folder: bool = True  # project = the slide's parent folder name when the table has none


class ShardConfig(StrictModel):
    """Size bounds of the per-slide shards."""

    max_samples: int = Field(1024, ge=1)  # tiles per shard at most
    max_bytes: int = Field(1 << 30, ge=1)  # bytes of tile members per shard at most
    # A slide's tiles are cut in bands of this many, in parallel; each band writes its own shards, so
    # this decides the shard layout (it is part of the settings hash), never the worker count.
    tiles_per_task: int = Field(1024, ge=1)


class RunConfig(StrictModel):
    """How the work runs; none of this changes the output bytes."""

    workers: int = 1  # worker processes (slides and bands of large slides run in parallel)
    part: str = "0/1"  # "i/N": this machine takes slides i, i+N, i+2N, ... of the sorted list
    progress: bool = True
    overview: bool = True  # write overview.png (tissue mask + kept tiles) per slide
    strip_px: int = Field(
        4096, ge=1
    )  # read a row of neighbouring tiles as one region up to this wide (level px)
    keep_level_mb: int = Field(
        64, ge=0
    )  # slides without a pyramid up to this size are decoded once, not twice

    @field_validator("part")
    @classmethod
    def _check_part(cls, value: str) -> str:
        parse_part(value)
        return value

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be ≥ 1")
        return value


class TileConfig(StrictModel):
    """Everything ``cytosyn tile`` needs."""

    output: Path = Path("tiles")
    slides: SlidesConfig = Field(default_factory=SlidesConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def output_settings(self) -> dict:
        """The settings that decide the output bytes (hashed into every slide's state)."""
        return {
            # finer_than_scan only decides whether a slide is refused, never the bytes of one tiled.
            "grid": self.grid.model_dump(mode="json", exclude={"finer_than_scan"}),
            "tissue": self.tissue.model_dump(mode="json"),
            "codec": self.codec.model_dump(mode="json"),
            "shards": self.shards.model_dump(mode="json"),
            "project_from_folder": self.slides.project_from_folder,
        }
