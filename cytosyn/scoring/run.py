"""``cytosyn score``: per-tile denoising errors, generative classification and anomaly scores of a model.

Output folder::

    <output>/config.yaml            the resolved config
    <output>/settings.json          everything that decides the numbers (model hash, input shards' sha256,
                                    conditions, times, noise seed, mask, pruning) and its hash
    <output>/conditions.npz         the condition vectors (class prototypes), for reuse and audit
    <output>/weights.json           the per-time weighting (fitted on calibration tiles, or given)
    <output>/units/<unit>.npz       raw errors (N, M, K) of one input shard (NaN: pruned), NFE, pruning record
    <output>/units/<unit>.json      its state (done, count, settings hash, NFE, seconds): resume skips it
    <output>/scores.csv             one row per tile: key, slide, label, predicted class, anomaly scores,
                                    weighted error per condition, NFE
    <output>/summary.json           settings, NFE, timing, classification metrics with CIs (labelled
                                    input), per-slide and per-label aggregates
    <output>/score_distributions.png, anomalous_tiles.png, maps/<key>.png (counterfactual maps)

Resumable per input shard (per block of files for image folders): a unit whose state matches the
settings is skipped; ``part=i/N`` takes units i, i+N, ... and the process that completes the set writes
the table, the summary and the figures.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from cytosyn.config import (
    StrictModel,
    config_hash,
    guard_output_settings,
    parse_part,
    write_resolved_config,
)
from cytosyn.fileio import atomic_write_bytes, atomic_write_text, code_version

from .conditions import Prototypes, build_conditions, class_prototypes
from .data import TileSource, open_source
from .decide import ANOMALY_SCORES, TimeWeights, slide_aggregates
from .engine import Condition, EngineSettings, ScoringError, TileErrors, TimeGrid, error_maps
from .score import (
    PruningSettings,
    ScoringPlan,
    TileScores,
    calibrate,
    concat_errors,
    decide,
    score_batch,
)

log = logging.getLogger(__name__)

__all__ = ["ScoreConfig", "ScoreSummary", "run_score"]

UNITS_DIR = "units"
SCORE_FORMAT = "cytosyn.scores/1"


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------


class TimesConfig(StrictModel):
    k: int = Field(default=20, ge=1, le=1000)  # number of fixed times (evenly spaced on [t_min, t_max])
    t_min: float = Field(default=0.05, gt=0.0, le=1.0)
    t_max: float = Field(default=0.95, gt=0.0, le=1.0)
    values: list[float] | None = None  # explicit times in (0, 1] instead of k/t_min/t_max
    order: Literal["interleaved", "ascending"] = "interleaved"

    @model_validator(mode="after")
    def _check(self) -> TimesConfig:
        try:
            TimeGrid.build(
                self.k if self.values is None else None, self.t_min, self.t_max, self.values, self.order
            )
        except ScoringError as err:
            raise ValueError(str(err)) from None
        return self

    def grid(self) -> TimeGrid:
        return TimeGrid.build(
            self.k if self.values is None else None, self.t_min, self.t_max, self.values, self.order
        )


class ClassesConfig(StrictModel):
    source: Literal["none", "prototypes", "labels"] = "none"
    reference: Path | None = None  # labelled split or class folder for prototypes (default: the input)
    labels: list[str] | None = None  # which labels, in this order (default: every label of the reference)
    min_tiles: int = Field(default=5, ge=1)  # fewer tiles for a label: refused before any scoring


class ConditionsConfig(StrictModel):
    own: bool = True  # the tile's own conditioning embedding
    null: bool = True  # the learned null condition
    classes: ClassesConfig = Field(default_factory=ClassesConfig)


class WeightingConfig(StrictModel):
    mode: Literal["fit", "uniform", "from"] = "fit"
    degree: int = Field(default=3, ge=0, le=8)
    calibration_tiles: int = Field(default=64, ge=1)  # the first N input tiles
    condition: str = "auto"  # own, null, all, or auto (own, else null, else all)
    source: Path | None = None  # mode=from: a previous score folder (its weights.json) or a weights.json file


class PruningConfig(StrictModel):
    enabled: bool = True
    min_t: int = Field(default=20, ge=1)  # times evaluated before the first test
    every: int = Field(default=5, ge=1)  # times between tests
    p_threshold: float = Field(default=2e-3, gt=0.0, lt=1.0)


class ScoreConfig(StrictModel):
    model: Path  # release folder or training checkpoint / run folder
    adapter: Path | None = (
        None  # a few-shot fine-tune's adapter folder (LoRA / class labels) applied to the model
    )
    input: Path  # split folder (manifest.json; featurized or not) or image folder (class subfolders = labels)
    output: Path = Path("scores")
    conditions: ConditionsConfig = Field(default_factory=ConditionsConfig)
    times: TimesConfig = Field(default_factory=TimesConfig)
    noise_seed: int = 0
    mask_fraction: float = Field(default=1.0, gt=0.0, le=1.0)  # central square of the latent side
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    margin_k: int = Field(default=10, ge=1)
    primary_score: Literal["auto", "margin", "own_vs_null", "own_error"] = "auto"
    maps: int = Field(default=4, ge=0)  # counterfactual maps of the N most anomalous tiles (class conditions)
    grid: int = Field(default=8, ge=0)  # most / least anomalous tiles shown
    n_boot: int = Field(default=1000, ge=10)
    batch_size: int = Field(default=64, ge=1)  # rows (tile × condition × time) per forward
    tiles_per_batch: int = Field(default=16, ge=1)
    tiles_per_unit: int = Field(default=256, ge=1)  # image folders: tiles per resumable unit
    part: str = "0/1"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    vae_weights: Path | None = None
    encoder_weights: Path | None = None
    progress: bool = True

    @field_validator("part")
    @classmethod
    def _check_part(cls, value: str) -> str:
        parse_part(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> ScoreConfig:
        c = self.conditions
        if not (c.own or c.null or c.classes.source != "none"):
            raise ValueError(
                "no conditions: enable conditions.own, conditions.null or conditions.classes.source"
            )
        if self.weighting.mode == "from" and self.weighting.source is None:
            raise ValueError("weighting.mode=from needs weighting.source (a score folder or weights.json)")
        if self.primary_score == "margin" and c.classes.source == "none":
            raise ValueError("primary_score=margin needs class conditions (conditions.classes.source)")
        if self.primary_score == "own_vs_null" and not (c.own and c.null):
            raise ValueError("primary_score=own_vs_null needs conditions.own and conditions.null")
        if self.primary_score == "own_error" and not c.own:
            raise ValueError("primary_score=own_error needs conditions.own")
        return self

    def content_settings(self) -> dict[str, Any]:
        """Settings that decide the per-unit errors (paths, batch sizes, device, figures do not)."""
        data = self.model_dump(
            mode="json",
            include={"conditions", "times", "noise_seed", "mask_fraction", "weighting", "pruning"},
        )
        data["conditions"]["classes"].pop("reference")
        data["weighting"].pop("source")
        return data


@dataclass
class ScoreSummary:
    output: Path
    tiles: int = 0
    units: int = 0
    done: int = 0
    skipped: int = 0
    nfe: int = 0
    calibration_nfe: int = 0
    seconds: float = 0.0
    complete: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)

    def report(self) -> str:
        rate = f", {self.nfe / self.seconds:.1f} NFE/s" if self.seconds > 0 and self.nfe else ""
        lines = [
            f"score: {self.done} units scored ({self.nfe} NFE{rate}), {self.skipped} already complete, "
            f"{self.units} in the input ({self.tiles} tiles); output {self.output}",
        ]
        if not self.complete:
            lines.append("table not written yet (other parts pending)")
        cls = self.metrics.get("classification")
        if cls:
            ba = cls["balanced_accuracy"]
            lines.append(
                f"generative classification on {cls['n']} labelled tiles: balanced accuracy {ba['estimate']:.3f} "
                f"[{ba['low']:.3f}, {ba['high']:.3f}] (chance {cls['chance_balanced_accuracy']:.3f})"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Preparing the plan
# --------------------------------------------------------------------------------------------------------


def _prototypes(cfg: ScoreConfig, pipe: Any, source: TileSource) -> Prototypes | None:
    classes = cfg.conditions.classes
    if classes.source != "prototypes":
        return None
    ref = source if classes.reference is None else open_source(classes.reference, pipe, cfg.tiles_per_unit)
    return class_prototypes(ref, pipe, classes.min_tiles, classes.labels)


def _given_weights(cfg: ScoreConfig, grid: TimeGrid) -> TimeWeights | None:
    if cfg.weighting.mode == "uniform":
        return TimeWeights.uniform(grid.values)
    if cfg.weighting.mode == "from":
        src = Path(cfg.weighting.source)  # type: ignore[arg-type]
        file = src / "weights.json" if src.is_dir() else src
        if not file.is_file():
            raise ScoringError(f"weighting.source {src}: no weights.json there")
        weights = TimeWeights.from_dict(json.loads(file.read_text()))
        weights.check(grid.values)
        weights.method = f"from {file}"
        return weights
    return None


def _state(output: Path, unit: str, digest: str) -> dict[str, Any] | None:
    path = output / UNITS_DIR / f"{unit}.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    npz = output / UNITS_DIR / f"{unit}.npz"
    if state.get("settings_hash") != digest or state.get("status") != "done" or not npz.is_file():
        return None
    if npz.stat().st_size != state.get("bytes"):
        return None
    return state


def _save_unit(
    output: Path, name: str, keys: list[str], res: TileErrors, digest: str, extra: dict[str, Any]
) -> None:
    import io

    buf = io.BytesIO()
    np.savez(
        buf, keys=np.asarray(keys, dtype=str), errors=res.errors, nfe=res.nfe, dropped_at=res.dropped_at,
        drop_p=res.drop_p,
    )  # fmt: skip
    data = buf.getvalue()
    atomic_write_bytes(output / UNITS_DIR / f"{name}.npz", data)
    state = {
        "status": "done", "unit": name, "count": len(keys), "bytes": len(data), "settings_hash": digest,
        "nfe": int(res.nfe.sum()), "seconds": round(res.seconds, 3), "code_version": code_version(),
    } | extra  # fmt: skip
    atomic_write_text(output / UNITS_DIR / f"{name}.json", json.dumps(state, indent=1) + "\n")


def _load_unit(output: Path, name: str) -> tuple[list[str], TileErrors]:
    with np.load(output / UNITS_DIR / f"{name}.npz", allow_pickle=False) as z:
        return [str(k) for k in z["keys"]], TileErrors(z["errors"], z["nfe"], z["dropped_at"], z["drop_p"])


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def prepare_conditions(
    cfg: ScoreConfig, pipe: Any, source: TileSource
) -> tuple[list[Condition], EngineSettings, PruningSettings | None, Prototypes | None]:
    """Conditions (class prototypes read here), times and pruning of a run: every bad setting is refused
    here, before any network evaluation."""
    grid = cfg.times.grid()
    engine = EngineSettings(
        grid, seed=cfg.noise_seed, mask_fraction=cfg.mask_fraction, batch_size=cfg.batch_size
    )
    protos = _prototypes(cfg, pipe, source)
    labels = cfg.conditions.classes.labels if cfg.conditions.classes.source == "labels" else None
    if cfg.conditions.classes.source == "labels" and not labels:
        labels = list(getattr(pipe, "label_names", None) or [])
    conditions = build_conditions(pipe, cfg.conditions.own, cfg.conditions.null, protos, labels)
    pruning = (
        PruningSettings(cfg.pruning.min_t, cfg.pruning.every, cfg.pruning.p_threshold)
        if cfg.pruning.enabled
        else None
    )
    _given_weights(cfg, grid)  # a weights file that does not fit is refused now
    return conditions, engine, pruning, protos


def prepare_weights(
    cfg: ScoreConfig, pipe: Any, source: TileSource, conditions: list[Condition], engine: EngineSettings
) -> tuple[TimeWeights, int]:
    """The per-time weighting (given, uniform, or fitted on calibration tiles) and the NFE it cost."""
    weights = _given_weights(cfg, engine.grid)
    if weights is not None:
        return weights, 0
    return calibrate(
        pipe, source.iter_all(), conditions, engine, cfg.weighting.calibration_tiles, cfg.weighting.degree,
        cfg.weighting.condition, cfg.tiles_per_batch,
    )  # fmt: skip


def run_score(cfg: ScoreConfig) -> ScoreSummary:
    """Score (or resume scoring) ``cfg.input`` with ``cfg.model`` (see the module docstring)."""
    from tqdm import tqdm

    from cytosyn.pipeline import load_pipeline

    part_i, part_n = parse_part(cfg.part)
    output = Path(cfg.output)
    (output / UNITS_DIR).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = load_pipeline(
        cfg.model, vae_weights=cfg.vae_weights, encoder_weights=cfg.encoder_weights, device=cfg.device,
        dtype=cfg.precision,
    )  # fmt: skip
    if cfg.adapter is not None:
        if not hasattr(pipe, "load_adapter"):
            raise ScoringError("this cytosyn's pipeline cannot load adapters (class-conditional fine-tunes)")
        pipe.load_adapter(cfg.adapter)
    source = open_source(cfg.input, pipe, cfg.tiles_per_unit)
    summary = ScoreSummary(output=output, tiles=source.count, units=len(source.units))
    weights_file = output / "weights.json"
    settings = cfg.content_settings() | {
        "model": {
            "name": pipe.name,
            "weights_sha256": pipe.weights_sha256,
            "precision": pipe._precision_name(),
            "adapter": json.loads(json.dumps(getattr(pipe, "adapter", None), default=str)),
        },
        "input": {"kind": source.kind, "units": [[u.name, u.count, u.sha256] for u in source.units]},
        "format": SCORE_FORMAT,
    }
    conditions, engine, pruning, protos = prepare_conditions(cfg, pipe, source)
    settings["conditions_resolved"] = [c.describe() for c in conditions]
    digest = config_hash(settings)
    guard_output_settings(output, output / "settings.json", settings, digest, "scores")
    write_resolved_config(cfg, output / "config.yaml")
    if cfg.weighting.mode == "fit" and weights_file.is_file():  # resume: the calibration is not redone
        weights = TimeWeights.from_dict(json.loads(weights_file.read_text()))
        weights.check(engine.grid.values)
    else:
        weights, summary.calibration_nfe = prepare_weights(cfg, pipe, source, conditions, engine)
        atomic_write_text(weights_file, json.dumps(weights.describe(), indent=1) + "\n")
    plan = ScoringPlan(conditions, engine, weights, pruning, cfg.margin_k)
    if protos is not None and not (output / "conditions.npz").is_file():
        import io

        buf = io.BytesIO()
        np.savez(buf, labels=np.asarray(protos.labels, dtype=str), vectors=protos.vectors)
        atomic_write_bytes(output / "conditions.npz", buf.getvalue())

    mine = [u for j, u in enumerate(source.units) if j % part_n == part_i]
    todo = [u for u in mine if _state(output, u.name, digest) is None]
    summary.skipped = len(mine) - len(todo)
    bar = tqdm(total=sum(u.count for u in todo), unit="tile", disable=not cfg.progress, desc="score")
    for unit in todo:
        batch = unit.read(False)
        res = score_batch(pipe, batch, plan, cfg.tiles_per_batch, progress=bar)
        _save_unit(output, unit.name, batch.keys, res, digest, {"input_sha256": unit.sha256})
        summary.done += 1
        summary.nfe += int(res.nfe.sum())
    bar.close()
    summary.seconds = time.perf_counter() - t0
    if all(_state(output, u.name, digest) is not None for u in source.units):
        summary.metrics = finish(cfg, pipe, source, plan, protos, output, digest, summary)
        summary.complete = True
    return summary


# --------------------------------------------------------------------------------------------------------
# The table, the summary and the figures
# --------------------------------------------------------------------------------------------------------


def _primary(cfg: ScoreConfig, scores: TileScores) -> str | None:
    if cfg.primary_score != "auto":
        return cfg.primary_score
    for name in ("margin", "own_vs_null", "own_error"):
        if name in scores.anomaly:
            return name
    return None


def collect(source: TileSource, plan: ScoringPlan, output: Path) -> TileScores:
    """Every unit's stored errors, decided (the labels and identities are read again from the input)."""
    keys: list[str] = []
    labels: list[str | None] = []
    meta: list[dict[str, Any]] = []
    parts: list[TileErrors] = []
    for unit in source.units:
        batch = unit.read(False)
        stored_keys, res = _load_unit(output, unit.name)
        if stored_keys != batch.keys:
            raise ScoringError(f"unit {unit.name}: stored keys differ from the input's (the input changed)")
        keys += batch.keys
        labels += batch.labels
        meta += batch.meta
        parts.append(res)
    raw = concat_errors(parts, len(plan.conditions), len(plan.engine.grid))
    return decide(plan, keys, labels, meta, raw)


def write_table(scores: TileScores, path: Path) -> Path:
    rows = scores.rows()
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def classification_summary(scores: TileScores, n_boot: int) -> dict[str, Any] | None:
    """Metrics over the labelled tiles whose label is one of the class conditions (others counted)."""
    from .metrics import classification_metrics

    if not scores.class_names or not scores.predicted:
        return None
    idx = [i for i, lab in enumerate(scores.labels) if lab is not None and lab in scores.class_names]
    other = sum(1 for lab in scores.labels if lab is not None and lab not in scores.class_names)
    if len(idx) < 2:
        return None
    out = classification_metrics(
        [scores.labels[i] for i in idx], [scores.predicted[i] for i in idx], scores.class_names, n_boot=n_boot
    )  # type: ignore[misc]
    out["tiles_with_other_labels"] = other
    out["unlabelled_tiles"] = sum(1 for lab in scores.labels if lab is None)
    pruned = scores.raw.dropped_at[:, [scores.names.index(f"class:{c}") for c in scores.class_names]] >= 0
    out["pruning"] = {
        "mean_classes_pruned_per_tile": float(pruned.sum(axis=1).mean()),
        "true_class_pruned": int(
            sum(pruned[i, scores.class_names.index(str(scores.labels[i]))] for i in idx)
        ),
    }
    return out


def per_label(scores: TileScores) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for lab in sorted({str(lab) for lab in scores.labels if lab is not None}):
        idx = [i for i, x in enumerate(scores.labels) if x == lab]
        out[lab] = {"tiles": len(idx)} | {
            name: float(np.nanmean(vals[idx])) for name, vals in scores.anomaly.items()
        }
    return out


def finish(
    cfg: ScoreConfig, pipe: Any, source: TileSource, plan: ScoringPlan, protos: Prototypes | None, output: Path,
    digest: str, summary: ScoreSummary,
) -> dict[str, Any]:  # fmt: skip
    scores = collect(source, plan, output)
    write_table(scores, output / "scores.csv")
    primary = _primary(cfg, scores)
    metrics: dict[str, Any] = {
        "format": SCORE_FORMAT,
        "settings_hash": digest,
        "model": pipe.describe(),
        "input": {"path": str(cfg.input), "kind": source.kind, "tiles": len(scores)} | source.details,
        "plan": plan.describe(),
        "prototypes": None if protos is None else protos.describe(),
        "nfe": {
            "scoring_total": int(scores.raw.nfe.sum()),
            "per_tile_mean": float(scores.raw.nfe.mean()) if len(scores) else 0.0,
            "per_tile_without_pruning": len(plan.conditions) * len(plan.engine.grid),
            "calibration": summary.calibration_nfe,
        },
        "anomaly_scores": {k: v for k, v in ANOMALY_SCORES.items() if k in scores.anomaly},
        "primary_score": primary,
        "classification": classification_summary(scores, cfg.n_boot),
        "per_label": per_label(scores),
        "per_slide": slide_aggregates([m.get("slide_id") for m in scores.meta], scores.anomaly),
        "code_version": code_version(),
    }
    metrics["figures"] = write_figures(cfg, pipe, source, plan, scores, primary, output)
    atomic_write_text(output / "summary.json", json.dumps(_plain(metrics), indent=1, allow_nan=False) + "\n")
    return metrics


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def images_of(source: TileSource, keys: set[str]) -> dict[str, np.ndarray]:
    """Decoded images of the tiles ``keys`` (reads only the units holding them)."""
    found: dict[str, np.ndarray] = {}
    for unit in source.units:
        if len(found) == len(keys):
            break
        batch = unit.read(True)
        for k, im in zip(batch.keys, batch.images or []):
            if k in keys:
                found[k] = im
    return found


def write_figures(
    cfg: ScoreConfig, pipe: Any, source: TileSource, plan: ScoringPlan, scores: TileScores, primary: str | None,
    output: Path,
) -> dict[str, Any]:  # fmt: skip
    from cytosyn.eval.figures import has_random_weights

    from .figures import plot_score_distributions, plot_tile_rows

    random = has_random_weights(pipe.describe())

    figures: dict[str, Any] = {}
    if not scores.anomaly or len(scores) == 0:
        return figures
    groups: dict[str, dict[str, np.ndarray]] = {}
    labelled = any(lab is not None for lab in scores.labels)
    for name, vals in scores.anomaly.items():
        if labelled:
            groups[name] = {
                str(lab): vals[[i for i, x in enumerate(scores.labels) if x == lab]]
                for lab in sorted({x for x in scores.labels}, key=str)
            }
        else:
            groups[name] = {"tiles": vals}
    figures["distributions"] = plot_score_distributions(
        groups, output / "score_distributions.png", random_weights=random
    ).name
    if primary is None:
        return figures
    vals = scores.anomaly[primary]
    order = [i for i in np.argsort(-vals, kind="stable") if np.isfinite(vals[i])]
    top, bottom = order[: cfg.grid], order[::-1][: cfg.grid]
    maps_for = order[: cfg.maps] if plan.class_idx and cfg.maps else []
    want = {scores.keys[i] for i in [*top, *bottom, *maps_for]}
    images = images_of(source, want) if want else {}

    def caption(i: int) -> str:
        pred = f" → {scores.predicted[i]}" if scores.predicted else ""
        lab = f"{scores.labels[i]}" if scores.labels[i] is not None else ""
        return f"{lab}{pred}\n{primary} {vals[i]:.3g}"

    if cfg.grid:
        rows = {
            "most anomalous": [(images[scores.keys[i]], caption(i)) for i in top if scores.keys[i] in images],
            "least anomalous": [
                (images[scores.keys[i]], caption(i)) for i in bottom if scores.keys[i] in images
            ],
        }
        figures["anomalous_tiles"] = plot_tile_rows(
            rows,
            output / "anomalous_tiles.png",
            title=f"anomaly score: {primary} (larger = more anomalous)",
            random_weights=random,
        ).name
    if maps_for:
        figures["maps"] = write_maps(pipe, plan, scores, maps_for, images, output / "maps", source, random)
    return figures


def write_maps(
    pipe: Any, plan: ScoringPlan, scores: TileScores, idx: list[int], images: dict[str, np.ndarray], folder: Path,
    source: TileSource, random_weights: bool = False,
) -> list[str]:  # fmt: skip
    """Counterfactual maps: per tile, each class's error map minus the predicted class's map."""
    from .data import TileBatch, encode_batch
    from .figures import plot_counterfactual

    folder.mkdir(parents=True, exist_ok=True)
    classes = [plan.conditions[i] for i in plan.class_idx]
    keys = [scores.keys[i] for i in idx if scores.keys[i] in images]
    if not keys:
        return []
    if source.featurized:  # the stored latents, exactly as the errors were measured
        stored: dict[str, np.ndarray] = {}
        for unit in source.units:
            b = unit.read(False)
            stored |= {k: b.latents[j] for j, k in enumerate(b.keys) if k in images and b.latents is not None}
        latents = np.stack([stored[k] for k in keys])
    else:
        batch = TileBatch(keys, [None] * len(keys), [{}] * len(keys), [images[k] for k in keys])
        latents = encode_batch(pipe, batch, need_own=False).latents
    maps = error_maps(pipe, latents, keys, classes, plan.engine, plan.weights.weights)  # type: ignore[arg-type]
    written = []
    for j, key in enumerate(keys):
        i = scores.keys.index(key)
        pred = scores.predicted[i]
        p = scores.class_names.index(str(pred))
        diffs = maps[j] - maps[j, p][None]
        name = f"{key}.png"
        plot_counterfactual(
            images[key], diffs, scores.class_names, str(pred), folder / name,
            caption=f"{scores.labels[i] or ''} → {pred}", random_weights=random_weights,
        )  # fmt: skip
        written.append(f"maps/{name}")
    return written
