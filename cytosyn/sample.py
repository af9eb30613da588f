"""``cytosyn sample``: a synthetic dataset from a checkpoint or a release folder.

Three modes:

- ``conditional`` (default): one generated tile per sample of a featurized split, conditioned on the
  split's stored embedding (``<encoder>.npy``, the model's conditioning member). Each generated sample's
  JSON records the reference key, split, shard and tile identity, and the sampler settings, so the
  evaluation can pair every generated tile with its reference.
- ``unconditional``: ``num_images`` tiles from the null condition.
- ``labelled``: ``per_class`` tiles of every class of a label-conditioned model (``adapter=`` a labelled
  adapter folder from ``cytosyn finetune``, or a merged labelled release); each sample's JSON carries its
  ``label`` (the tile contract's field) and the adapter's provenance (few-shot patients), so the
  augmentation study can check that no test patient was used to make them.

Output folder (the format of real split datasets, so the loader and the eval harness read it as is)::

    <output>/<name>-000000.tar ...     webdataset shards: <key>.png (lossless by default) + <key>.json
    <output>/manifest.json             a split manifest (written when every shard is complete)
    <output>/config.yaml               the resolved config
    <output>/.sample/<shard>.json      per-shard state: done, count, sha256, settings hash (resume)
    <output>/grid.png                  the first tiles (next to their references when conditional)

Resumable per output shard: a shard with a state file of the same settings is skipped; a killed run
leaves at most a hidden ``.<shard>.partial`` file, removed on the next run. ``part=i/N`` makes this process
take output shards i, i+N, ... (one process per GPU); the process that completes the set writes the
manifest and the grid. Image ``i`` of the set draws its noise from ``(seed, i)``: a shard's content does
not depend on the batch size, on the part split nor on which process made it.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator, model_validator

from cytosyn.config import (
    StrictModel,
    config_hash,
    guard_output_settings,
    parse_part,
    write_resolved_config,
)
from cytosyn.data_prep.codec import CodecConfig, TileEncoder
from cytosyn.fileio import atomic_write_text, code_version, sha256_file
from cytosyn.manifest import ManifestError, SplitManifest, read_manifest, write_manifest
from cytosyn.shardio import ShardWriter, iter_shard_samples

log = logging.getLogger(__name__)

STATE_DIR = ".sample"
SETTINGS_FILE = "settings.json"
GRID_FILE = "grid.png"
SAMPLE_FORMAT = "cytosyn.sample/1"
_REFERENCE_FIELDS = (
    "slide_id",
    "patient_id",
    "tss",
    "project",
    "x",
    "y",
    "level",
    "read_size",
    "mpp",
    "tile_px",
)


class SampleError(RuntimeError):
    """A sampling run that cannot go on; the message says which input or setting is at fault."""


class SamplerSettings(StrictModel):
    """Which sampler: a preset (None: the model's default for the mode) with fields replaced."""

    preset: str | None = None  # cytosyn_default, unconditional_default, fast_heun_30, fast_euler_50
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    # any other SamplerConfig field, e.g. {time_grid: shifted, shift: 3.0}
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SamplerSettings:
        from cytosyn.pipeline import resolve_sampler
        from cytosyn.sampling import sampler_preset

        # Validate the combination now (on SamplerConfig's defaults when no preset is named).
        try:
            base = sampler_preset(self.preset).model_dump() if self.preset else {}
        except ValueError as err:
            raise ValueError(str(err)) from None
        resolve_sampler({**base, **self.overrides}, {}, steps=self.steps, guidance_scale=self.guidance_scale)
        return self


class SampleConfig(StrictModel):
    model: Path  # a release folder (verified against SHA256SUMS) or a training checkpoint / run folder
    adapter: Path | None = None  # an adapter folder (cytosyn finetune) applied to the model
    output: Path = Path("samples")
    mode: Literal["conditional", "unconditional", "labelled"] = "conditional"
    per_class: int = Field(default=16, ge=1)  # labelled mode: tiles per class
    labels: list[str] | None = None  # labelled mode: these classes (default: every class of the adapter)
    split: Path | None = None  # featurized split whose embeddings condition the tiles (conditional mode)
    embedding_member: str | None = None  # default: the model's conditioning member (e.g. h0-mini.npy)
    max_references: int | None = Field(default=None, ge=1)  # the first N samples of the split
    num_images: int = Field(default=64, ge=1)  # unconditional mode
    # split name of the synthetic set: shards <name>-000000.tar, manifest split field
    name: str = Field(default="synthetic", pattern=r"^[A-Za-z0-9_\-]+$")
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    seed: int = 0
    batch_size: int = Field(default=16, ge=1)
    samples_per_shard: int = Field(default=256, ge=1)
    codec: CodecConfig = Field(default_factory=lambda: CodecConfig(format="png"))
    part: str = "0/1"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    vae_weights: Path | None = None  # local diffusers folder of the model's VAE
    grid_size: int = Field(default=16, ge=0)  # tiles (or reference/generated pairs) in grid.png; 0: none
    progress: bool = True

    @field_validator("part")
    @classmethod
    def _check_part(cls, value: str) -> str:
        parse_part(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        if self.mode == "conditional" and self.split is None:
            raise ValueError(
                "mode 'conditional' needs split= (a featurized split); or set mode=unconditional"
            )
        return self

    def content_settings(self) -> dict[str, Any]:
        """Settings that decide the content of the shards (part, batch size, device, progress do not)."""
        data = self.model_dump(
            mode="json",
            exclude={"part", "batch_size", "device", "progress", "grid_size", "vae_weights", "output"},
        )
        data.pop("split")  # the reference split is identified by its manifest's sha256, not its path
        data.pop("adapter")  # identified by its sha256 in the settings' inputs
        if self.mode != "conditional":
            for key in ("embedding_member", "max_references"):
                data.pop(key)
        if self.mode != "unconditional":
            data.pop("num_images")
        if self.mode != "labelled":
            data.pop("per_class")
            data.pop("labels")
        return data


@dataclass
class SampleSummary:
    output: Path
    total_shards: int = 0
    done: int = 0  # shards generated by this process
    skipped: int = 0  # shards found complete
    images: int = 0  # images generated by this process
    seconds: float = 0.0
    manifest_written: bool = False
    grid: Path | None = None
    shard_names: list[str] = field(default_factory=list)

    def report(self) -> str:
        rate = f", {self.images / self.seconds:.2f} images/s" if self.seconds > 0 and self.images else ""
        lines = [
            f"sample: {self.done} shards generated ({self.images} images{rate}), {self.skipped} already complete, "
            f"{self.total_shards} in the set; output {self.output}",
            "manifest written" if self.manifest_written else "manifest not written yet (other parts pending)",
        ]
        if self.grid is not None:
            lines.append(f"grid: {self.grid}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    index: int  # position in the split (manifest order)
    key: str
    shard: str
    embedding: np.ndarray
    meta: dict[str, Any]
    image: bytes | None = None
    image_ext: str | None = None


class ReferenceReader:
    """Reads ranges of a featurized split in manifest order, checking every shard against its sha256."""

    def __init__(self, split: Path, manifest: SplitManifest, member: str):
        self.split = Path(split)
        self.manifest = manifest
        self.member = member
        self.starts: list[int] = []
        total = 0
        for entry in manifest.shards:
            self.starts.append(total)
            total += entry.count
        self._cache: tuple[int, bool, list[Reference]] | None = None

    def _read_shard(self, j: int, with_images: bool) -> list[Reference]:
        if self._cache is not None and self._cache[0] == j and (self._cache[1] or not with_images):
            return self._cache[2]
        entry = self.manifest.shards[j]
        path = self.split / entry.name
        if not path.is_file():
            raise SampleError(f"reference shard {path} is missing (listed in {self.split}/manifest.json)")
        refs: list[Reference] = []
        reader = None
        for (key, members), shard_reader in iter_shard_samples(path):
            reader = shard_reader
            m = dict(members)
            ext = self.member.removesuffix(".npy")
            if f"{ext}.npy" not in m:
                raise SampleError(f"{path}: sample {key!r} has no {self.member} member")
            emb = np.load(io.BytesIO(m[f"{ext}.npy"]), allow_pickle=False)
            meta = json.loads(m["json"]) if "json" in m else {}
            image_ext = self.manifest.image_member
            refs.append(
                Reference(
                    index=self.starts[j] + len(refs),
                    key=key,
                    shard=entry.name,
                    embedding=emb.reshape(-1).astype(np.float32),
                    meta={k: meta[k] for k in _REFERENCE_FIELDS if k in meta},
                    image=m.get(image_ext) if with_images else None,
                    image_ext=image_ext,
                )
            )
        if reader is not None and reader.sha.hexdigest() != entry.sha256:
            raise SampleError(
                f"reference shard {path} does not match its sha256 in the manifest (changed since featurize)"
            )
        if len(refs) != entry.count:
            raise SampleError(
                f"reference shard {path} holds {len(refs)} samples, the manifest says {entry.count}"
            )
        self._cache = (j, with_images, refs)
        return refs

    def read(self, start: int, stop: int, with_images: bool = False) -> list[Reference]:
        out: list[Reference] = []
        for j, entry in enumerate(self.manifest.shards):
            a, b = self.starts[j], self.starts[j] + entry.count
            if b <= start or a >= stop:
                continue
            out += [r for r in self._read_shard(j, with_images) if start <= r.index < stop]
        return out


def _reference_member(cfg: SampleConfig, pipe: Any, manifest: SplitManifest) -> str:
    cond = pipe.config.get("conditioning") or {}
    member = cfg.embedding_member or cond.get("member")
    if not member:
        raise SampleError("the model records no conditioning member; set embedding_member=<encoder>.npy")
    if not member.endswith(".npy"):
        member += ".npy"
    feature = next((f for f in manifest.features if f.member == member), None)
    if feature is None:
        have = [f.member for f in manifest.features if f.kind == "embedding"] or "none"
        raise SampleError(
            f"split {cfg.split} has no {member} embeddings (it has: {have}); featurize it with the model's "
            f"conditioning encoder {pipe.conditioning_encoder!r}"
        )
    width = int((feature.details.get("shape") or [0])[-1])
    if width != pipe.cond_dim:
        raise SampleError(
            f"split {cfg.split}: {member} has width {width}, the model is conditioned on {pipe.conditioning_encoder!r} "
            f"embeddings of width {pipe.cond_dim}"
        )
    if feature.model_id != pipe.conditioning_encoder:
        raise SampleError(
            f"split {cfg.split}: {member} was made by encoder {feature.model_id!r}, the model is conditioned on "
            f"{pipe.conditioning_encoder!r}"
        )
    recorded, used = cond.get("weights"), feature.details.get("weights")
    if recorded and used and recorded != used:
        raise SampleError(
            f"split {cfg.split}: {member} was made with {feature.model_id} weights {used}, the model was trained "
            f"on embeddings from weights {recorded}"
        )
    return member


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def _state_path(output: Path, shard: str) -> Path:
    return output / STATE_DIR / f"{shard}.json"


def _load_state(output: Path, shard: str, settings_hash: str) -> dict[str, Any] | None:
    path = _state_path(output, shard)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    file = output / shard
    if state.get("settings_hash") != settings_hash or state.get("status") != "done":
        return None
    if not file.is_file() or file.stat().st_size != state["shard"]["bytes"]:
        return None
    return state


def _check_settings(output: Path, settings: dict[str, Any], settings_hash: str) -> None:
    guard_output_settings(output, output / STATE_DIR / SETTINGS_FILE, settings, settings_hash, "samples")


def _clean_partials(output: Path, names: set[str]) -> None:
    for path in output.glob(".*.partial"):
        if path.name[1:].removesuffix(".partial") in names:
            path.unlink(missing_ok=True)


def run_sample(cfg: SampleConfig) -> SampleSummary:
    """Generate (or resume) the synthetic dataset of ``cfg`` (see the module docstring)."""
    from tqdm import tqdm

    from cytosyn.pipeline import image_seed, load_pipeline

    part_i, part_n = parse_part(cfg.part)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = SampleSummary(output=output)
    pipe = load_pipeline(cfg.model, vae_weights=cfg.vae_weights, device=cfg.device, dtype=cfg.precision)
    if cfg.adapter is not None:
        pipe.load_adapter(cfg.adapter)
    labels: list[str] = []
    if cfg.mode == "labelled":
        names = pipe.label_names
        if names is None:
            raise SampleError(
                f"mode 'labelled' needs a label-conditioned model (adapter=...): {cfg.model} has no labels"
            )
        unknown = [x for x in cfg.labels or [] if x not in names]
        if unknown:
            raise SampleError(f"labels {unknown} are not classes of the model; it knows {names}")
        labels = [name for name in (cfg.labels or names) for _ in range(cfg.per_class)]
    conditional = cfg.mode in ("conditional", "labelled")
    if cfg.mode == "conditional" and pipe.cond_dim is None:
        raise SampleError(f"model {cfg.model} is unconditional; use mode=unconditional")
    s = cfg.sampler
    sampler_cfg = pipe.resolve_sampler(
        {**pipe.resolve_sampler(s.preset, conditional).model_dump(), **s.overrides},
        conditional,
        steps=s.steps,
        guidance_scale=s.guidance_scale,
    )
    reader: ReferenceReader | None = None
    manifest_in: SplitManifest | None = None
    inputs: dict[str, Any] = {
        "model": {"path": str(cfg.model), "name": pipe.name, "weights_sha256": pipe.weights_sha256}
    }
    if cfg.mode == "conditional":
        assert cfg.split is not None
        try:
            manifest_in = read_manifest(cfg.split)
        except ManifestError as err:
            raise SampleError(str(err)) from None
        member = _reference_member(cfg, pipe, manifest_in)
        reader = ReferenceReader(cfg.split, manifest_in, member)
        total = min(manifest_in.samples, cfg.max_references or manifest_in.samples)
        inputs["reference_split"] = {
            "path": str(cfg.split),
            "split": manifest_in.split,
            "manifest_sha256": sha256_file(Path(cfg.split) / "manifest.json"),
            "member": member,
        }
    elif cfg.mode == "labelled":
        total = len(labels)
    else:
        total = cfg.num_images
    if pipe.adapter is not None:
        inputs["adapter"] = {
            "path": str(cfg.adapter),
            **{k: pipe.adapter.get(k) for k in ("name", "kind", "sha256", "base_weights_sha256", "labels")},
            "few_shot": {
                k: (pipe.adapter.get("few_shot") or {}).get(k)
                for k in ("patients", "slides", "tiles", "source")
            },
        }
    settings = cfg.content_settings() | {
        "resolved_sampler": sampler_cfg.model_dump(mode="json"),
        "precision": pipe._precision_name(),
        "inputs": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in inputs.items()},
    }
    settings.pop("model", None)
    if labels:
        settings["label_names"] = list(dict.fromkeys(labels))
    settings_hash = config_hash(settings)
    _check_settings(output, settings, settings_hash)
    write_resolved_config(cfg, output / "config.yaml")

    per = cfg.samples_per_shard
    plan = [(j, a, min(total, a + per)) for j, a in enumerate(range(0, total, per))]
    names = {shard_name(cfg.name, j) for j, _, _ in plan}
    summary.total_shards = len(plan)
    summary.shard_names = sorted(names)
    _clean_partials(output, names)
    encoder = TileEncoder(cfg.codec)
    mine = [p for p in plan if p[0] % part_n == part_i]
    todo = [p for p in mine if _load_state(output, shard_name(cfg.name, p[0]), settings_hash) is None]
    summary.skipped = len(mine) - len(todo)
    bar = tqdm(total=sum(b - a for _, a, b in todo), unit="img", disable=not cfg.progress, desc="sample")
    sampler_dump = sampler_cfg.model_dump(mode="json")
    model_info = {"name": pipe.name, "weights_sha256": pipe.weights_sha256}
    for j, start, stop in todo:
        name = shard_name(cfg.name, j)
        t_shard = time.perf_counter()
        refs = reader.read(start, stop) if reader is not None else []
        if labels:
            images = pipe.generate(
                None,
                labels=labels[start:stop],
                sampler=sampler_cfg,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                index_offset=start,
                progress=bar,
            )
        elif reader is not None:
            emb = np.stack([r.embedding for r in refs])
            images = pipe.generate(
                emb,
                sampler=sampler_cfg,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                index_offset=start,
                progress=bar,
            )
        else:
            images = pipe.generate(
                None,
                num_images=stop - start,
                sampler=sampler_cfg,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                index_offset=start,
                progress=bar,
            )
        writer = ShardWriter(output, lambda _i, _n=name: _n, max_samples=stop - start)
        try:
            for k, image in enumerate(images):
                i = start + k
                meta: dict[str, Any] = {
                    "format": SAMPLE_FORMAT,
                    "generated": True,
                    "index": i,
                    "seed": cfg.seed,
                    "image_seed": image_seed(cfg.seed, i),
                    "mode": cfg.mode,
                    "model": model_info,
                    "sampler": sampler_dump,
                    "precision": pipe._precision_name(),
                    "tile_px": pipe.tile_px,
                    "mpp": pipe.mpp,
                    "codec": encoder.settings,
                }
                if refs:
                    r = refs[k]
                    key = f"{r.key}__gen"
                    meta["reference_key"] = r.key
                    meta["reference"] = {
                        "key": r.key,
                        "split": manifest_in.split if manifest_in else None,
                        "split_dir": str(cfg.split),
                        "shard": r.shard,
                        "index": r.index,
                        "member": reader.member if reader else None,
                        **r.meta,
                    }
                elif labels:
                    key = f"{labels[i]}_{i:09d}"
                    meta["label"] = labels[i]
                    meta["reference_key"] = None
                    meta["adapter"] = inputs.get("adapter")
                else:
                    key = f"uncond_{i:09d}"
                    meta["reference_key"] = None
                meta["key"] = key
                writer.write(
                    {
                        "__key__": key,
                        encoder.extension: encoder.encode(image),
                        "json": json.dumps(meta, sort_keys=True).encode(),
                    }
                )
            shards = writer.close()
        except BaseException:
            writer.abort()
            raise
        info = shards[0]
        state = {
            "status": "done",
            "shard": info.as_dict(),
            "indices": [start, stop],
            "settings_hash": settings_hash,
            "seconds": round(time.perf_counter() - t_shard, 3),
            "code_version": code_version(),
        }
        atomic_write_text(_state_path(output, name), json.dumps(state, indent=1) + "\n")
        summary.done += 1
        summary.images += stop - start
    bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.manifest_written = _finish_if_complete(cfg, plan, settings, settings_hash, inputs, manifest_in)
    if summary.manifest_written and cfg.grid_size > 0:
        random = any(
            str((pipe.config.get(part) or {}).get("weights") or "").startswith("random-init")
            for part in ("vae", "conditioning")
        )
        summary.grid = write_grid(output, cfg.grid_size, reader, random_weights=random, title=pipe.name)
    return summary


def _finish_if_complete(
    cfg: SampleConfig,
    plan: list[tuple[int, int, int]],
    settings: dict[str, Any],
    settings_hash: str,
    inputs: dict[str, Any],
    manifest_in: SplitManifest | None,
) -> bool:
    output = Path(cfg.output)
    states = [_load_state(output, shard_name(cfg.name, j), settings_hash) for j, _, _ in plan]
    if any(s is None for s in states):
        return False
    shards = [s["shard"] for s in states]  # type: ignore[index]
    stats: dict[str, Any] = {"generated": True, "mode": cfg.mode, "tiles": sum(s["count"] for s in shards)}
    if cfg.mode == "labelled":
        stats["tiles_per_label"] = {name: cfg.per_class for name in settings.get("label_names", [])}
        stats["adapter"] = inputs.get("adapter")
    if manifest_in is not None:
        ref_stats = manifest_in.stats if isinstance(manifest_in.stats, dict) else {}
        stats["reference"] = {
            "split": manifest_in.split,
            "samples_used": sum(s["count"] for s in shards),
            "patients": len(manifest_in.patients),
            "slides": len(manifest_in.slides),
            "tiles_per_project": ref_stats.get("tiles_per_project", {}),
        }
    manifest = SplitManifest(
        split=cfg.name,
        image_member=TileEncoder(cfg.codec).extension,
        samples=sum(s["count"] for s in shards),
        shards=shards,
        patients=[],  # generated tiles belong to no patient; the references' are in stats.reference
        slides=[],
        stats=stats,
        config={"sample": cfg.model_dump(mode="json"), "settings_hash": settings_hash, "settings": settings},
        inputs=inputs,
        code_version=code_version(),
    )
    write_manifest(manifest, output)
    return True


def write_grid(
    output: Path,
    size: int,
    reader: ReferenceReader | None = None,
    *,
    random_weights: bool = False,
    title: str | None = None,
    per_row: int = 8,
) -> Path | None:
    """``grid.png``: the first ``size`` generated tiles, labelled by sample index; when conditional, each
    row of generated tiles sits under the row of references they were generated from. ``random_weights``
    stamps the figure (a model whose VAE or conditioning encoder was random-initialised)."""
    from cytosyn.figures import save_figure, tile_grid

    manifest = read_manifest(output)
    tiles: list[tuple[bytes, dict[str, Any]]] = []
    for entry in manifest.shards:
        for (_key, members), _ in iter_shard_samples(output / entry.name):
            m = dict(members)
            tiles.append((m[manifest.image_member], json.loads(m["json"])))
            if len(tiles) >= size:
                break
        if len(tiles) >= size:
            break
    if not tiles:
        return None
    refs: dict[int, bytes] = {}
    if reader is not None:
        indices = [meta["reference"]["index"] for _, meta in tiles if meta.get("reference")]
        if indices:
            for r in reader.read(min(indices), max(indices) + 1, with_images=True):
                if r.image is not None:
                    refs[r.index] = r.image

    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    rows: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(tiles), per_row):
        chunk = tiles[start : start + per_row]
        span = f"{start}–{start + len(chunk) - 1}"
        if refs:
            blank = np.full_like(decode(chunk[0][0]), 255)
            rows[f"reference\n{span}"] = [
                decode(refs[i]) if (i := (meta.get("reference") or {}).get("index", -1)) in refs else blank
                for _, meta in chunk
            ]
        rows[f"generated\n{span}"] = [decode(data) for data, _ in chunk]
    fig = tile_grid(
        rows,
        column_labels=[f"+{c}" for c in range(min(per_row, len(tiles)))],
        title=(title or "generated tiles") + (" — references above their generated tiles" if refs else ""),
        random_weights=random_weights,
    )
    return save_figure(fig, output / GRID_FILE)


__all__ = [
    "ReferenceReader",
    "SampleConfig",
    "SampleError",
    "SampleSummary",
    "SamplerSettings",
    "run_sample",
    "write_grid",
]
