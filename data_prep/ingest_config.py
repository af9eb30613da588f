"""Configuration of ``cytosyn ingest`` (see configs/ingest.yaml for a commented example, docs/ingest.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cytosyn.data_prep.codec import CodecConfig
from pydantic import Field, field_validator, model_validator

from cytosyn.config import StrictModel


class IngestInputs(StrictModel):
    """Where the tiles are: class folders and/or CSV tables (at least one)."""

    folders: list[Path] = Field(default_factory=list)  # each: <folder>/<label>/<image file>
    csv: list[Path] = Field(default_factory=list)  # path,label,patient_id,slide_id,site,mpp (others ignored)
    label_table: Path | None = None  # CSV path,label (path as in the inputs) or key,label: replaces labels


class IdentityConfig(StrictModel):
    """Who each tile belongs to. Splits are by patient, so a missing identity is refused unless a rule
    says how to derive it: that rule is recorded in every tile's ``identity_source``."""

    rule: Literal["columns", "per_tile", "pattern"] = "columns"
    # columns: patient_id and slide_id from the CSV (class folders have none: refused);
    # per_tile: each tile is its own slide and patient (a stated assumption, e.g. anonymised datasets);
    # pattern: ``pattern`` (a regex with named groups ``slide`` and optionally ``patient``) searched in the
    #   file name; no patient group = one patient per slide (stated). A name it does not match is refused.
    pattern: str | None = None
    site: str = "unknown"  # tissue source site when the CSV has no site column
    project: str | None = None  # project/cohort of every tile; None = the input folder's (or CSV's) name


class IngestGridConfig(StrictModel):
    """The target grid, and what to do with tiles of another size or mpp."""

    tile_px: int = 224
    mpp: float = 0.5
    source_mpp: float | None = None  # the tiles' µm/px when the CSV has no mpp column; None = refuse
    mpp_tolerance: float = 0.02  # relative difference of mpp treated as equal
    mismatch: Literal["refuse", "skip", "resample", "stretch"] = "refuse"
    # refuse: stop (nothing written) listing the tiles of another size/mpp; skip: leave them out, counted;
    # resample: rescale to the target mpp (area when shrinking, bicubic when enlarging) and centre-crop to
    #   tile_px; tiles whose field of view is too small are left out, counted;
    # stretch: resize to tile_px whatever the mpp (the tile's effective_mpp records the real scale).

    @field_validator("tile_px")
    @classmethod
    def _px(cls, value: int) -> int:
        if value < 8:
            raise ValueError("must be ≥ 8")
        return value

    @field_validator("mpp", "source_mpp", "mpp_tolerance")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("must be > 0")
        return value


class IngestCodecConfig(StrictModel):
    keep_original: list[Literal["png", "jpeg", "webp"]] = Field(default_factory=lambda: ["png", "jpeg"])
    # formats whose bytes are kept byte for byte (when the tile is 8-bit RGB and needs no resampling);
    # anything else (TIFF, other modes, resampled tiles) is re-encoded with `reencode` and recorded.
    reencode: CodecConfig = Field(default_factory=lambda: CodecConfig(format="png"))


class IngestConfig(StrictModel):
    output: Path = Path("tiles_ingested")  # like a `cytosyn tile` output: slides/<source>/...
    inputs: IngestInputs = Field(default_factory=IngestInputs)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    grid: IngestGridConfig = Field(default_factory=IngestGridConfig)
    codec: IngestCodecConfig = Field(default_factory=IngestCodecConfig)
    unreadable: Literal["skip", "refuse"] = "skip"  # images PIL cannot decode (truncated, corrupt)
    non_images: Literal["skip", "refuse"] = "skip"  # files in class folders that are not images
    max_samples_per_shard: int = 10_000

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        if not self.inputs.folders and not self.inputs.csv:
            raise ValueError("inputs: give at least one class folder (inputs.folders) or CSV (inputs.csv)")
        if self.identity.rule == "pattern" and not self.identity.pattern:
            raise ValueError("identity.pattern is needed with identity.rule=pattern")
        if self.codec.reencode.format == "jpeg":
            raise ValueError("codec.reencode must be lossless (png or webp): re-encoding never adds loss")
        return self

    def output_settings(self) -> dict:
        """What decides the output bytes (recorded in every source's state)."""
        return self.model_dump(mode="json", include={"identity", "grid", "codec", "max_samples_per_shard"})
