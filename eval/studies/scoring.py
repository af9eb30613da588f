"""The scoring study: what the model cannot explain, tile by tile (generative scores, CytoDiffusion's idea).

Two variants (``scoring.variant``), both through the public pipeline and :mod:`cytosyn.scoring`:

- ``domain``: score an in-domain reference split (``references.reference``) and one or more new domains
  (``references.others``: folders or splits) with the same plan (times, shared noise, weighting fitted on
  the reference) and report how well each anomaly score separates them (ROC AUC with a stratified
  bootstrap CI), their distributions and the most / least anomalous tiles — beside the domain study's
  Fréchet numbers (``scoring.frechet``) for the same sets;
- ``classify``: generative classification of a labelled held-out split (``references.heldout``) with
  class prototypes from a labelled reference split (``references.reference``), against a linear probe
  fitted on the same encoder features of the same reference tiles (balanced accuracy, macro-F1 with CIs);
  held-out tiles whose label is not among the reference's classes (a class held out of training) are
  the "out" group of the anomaly AUCs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field
from tqdm import tqdm

from cytosyn.config import StrictModel
from cytosyn.scoring import (
    ANOMALY_SCORES,
    EngineSettings,
    PruningSettings,
    ScoringPlan,
    TileBatch,
    TileScores,
    build_conditions,
    calibrate,
    decide,
    encode_batch,
    score_batch,
)
from cytosyn.scoring.conditions import Prototypes
from cytosyn.scoring.metrics import (
    auc_difference_with_ci,
    auc_with_ci,
    classification_metrics,
    fit_linear_probe,
)
from cytosyn.scoring.run import PruningConfig, TimesConfig

from ..harness import HarnessOptions, StudyResult, describe_generator, study_settings
from ..images import ImageSet
from ..report import fmt, fmt_ci
from .base import Study, StudyContext
from .common import comparisons_headline, distances_markdown

if TYPE_CHECKING:
    from ..run import EvalConfig

__all__ = ["PROBE_SCORE", "STUDY", "ScoringStudyConfig", "scoring_study"]

PROBE_SCORE = "probe_msp"  # classify variant: the discriminative anomaly baseline
PROBE_SCORE_NOTE = (
    "baseline, not generative: 1 − the linear probe's maximum class probability on the same conditioning "
    "embeddings (maximum softmax probability, Hendrycks & Gimpel 2017)"
)


class ScoringStudyConfig(StrictModel):
    variant: Literal["domain", "classify"] = "domain"
    times: TimesConfig = Field(default_factory=lambda: TimesConfig(k=10))
    mask_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    own: bool = True
    null: bool = True
    class_reference: Path | None = (
        None  # domain variant: a labelled split whose prototypes add class conditions
    )
    min_tiles: int = Field(default=3, ge=1)  # per label, for prototypes
    pruning: PruningConfig = Field(default_factory=lambda: PruningConfig(enabled=False))
    weighting_degree: int = Field(default=3, ge=0, le=8)
    calibration_tiles: int = Field(default=32, ge=1)
    margin_k: int = Field(default=10, ge=1)
    frechet: bool = True  # domain variant: run the domain study's FD numbers on the same sets too
    top_tiles: int = Field(default=6, ge=0)
    # score the reference split's own tiles too: always in the domain variant (they are its "in" group); in
    # the classify variant they are the prototypes' own tiles, so scoring them only measures training fit
    score_reference: bool | None = None
    batch_size: int = Field(default=64, ge=1)  # rows per forward
    tiles_per_batch: int = Field(default=16, ge=1)


# --------------------------------------------------------------------------------------------------------
# Reading sets
# --------------------------------------------------------------------------------------------------------


def _label(key: str, meta: dict[str, Any] | None, kind: str) -> str | None:
    if meta and meta.get("label") is not None:
        return str(meta["label"])
    if kind == "folder" and "/" in key:  # a folder with one subfolder per class
        return key.split("/", 1)[0]
    return None


def read_tiles(
    pipe: Any, image_set: ImageSet, n: int | None, need_own: bool, batch_size: int = 16
) -> TileBatch:
    """The first ``n`` tiles of a set with labels, identity, latents and (when needed) own embeddings,
    encoded once with the model's own VAE and conditioning encoder (they do not depend on the seed)."""
    keys: list[str] = []
    labels: list[str | None] = []
    metas: list[dict[str, Any]] = []
    images: list[np.ndarray] = []
    for k, arr, m in image_set.batches(batch_size):
        if n is not None and len(keys) >= n:
            break
        k, arr, m = k[: None if n is None else n - len(keys)], arr[: None if n is None else n - len(keys)], m
        keys += k
        labels += [_label(key, meta, image_set.kind) for key, meta in zip(k, m)]
        metas += [dict(meta or {}) for meta in m[: len(k)]]
        images += list(arr)
    batch = TileBatch(keys, labels, metas, images)
    return encode_batch(pipe, batch, need_own=need_own, batch_size=batch_size)


def open_set(path: Path, n: int | None, mpp: float | None) -> ImageSet:
    """A split, shards or an image folder; a folder of class subfolders is read recursively."""
    path = Path(path)
    if (
        path.is_dir()
        and not (path / "manifest.json").is_file()
        and not any(p.is_file() for p in path.iterdir() if not p.name.startswith("."))
    ):
        return ImageSet.from_folder(path, limit=n, mpp=mpp, recursive=True)
    return ImageSet.open(path, limit=n, mpp=mpp)


def _prototypes(batch: TileBatch, min_tiles: int, source: str) -> Prototypes:
    from cytosyn.scoring import ScoringError

    assert batch.own is not None
    counts: dict[str, int] = {}
    for lab in batch.labels:
        if lab is not None:
            counts[lab] = counts.get(lab, 0) + 1
    if not counts:
        raise ScoringError(f"{source} has no labelled tiles: class conditions need a labelled split")
    few = {lab: c for lab, c in counts.items() if c < min_tiles}
    if few:
        raise ScoringError(
            f"labels with fewer than {min_tiles} tiles in {source}: {few} (all counts: {counts})"
        )
    labels = sorted(counts)
    vectors = np.stack([
        batch.own[[i for i, x in enumerate(batch.labels) if x == lab]].astype(np.float64).mean(0) for lab in labels
    ]).astype(np.float32)  # fmt: skip
    return Prototypes(labels, vectors, counts, source, sum(lab is None for lab in batch.labels))


# --------------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------------


def _per_tile(scores: TileScores) -> dict[str, Any]:
    return {
        "keys": scores.keys,
        "labels": scores.labels,
        "predicted": scores.predicted or None,
        "nfe": scores.raw.nfe,
        "scores": {k: v for k, v in scores.anomaly.items()},
        "weighted_errors": {name: scores.weighted[:, j] for j, name in enumerate(scores.names)},
    }


def _groups(
    variant: str, scored: Mapping[str, TileScores], classes: list[str]
) -> dict[str, dict[str, np.ndarray]]:
    """score → {"in": values, <out group>: values} for the separation AUCs."""
    out: dict[str, dict[str, np.ndarray]] = {}
    if variant == "domain":
        ref = scored["reference"]
        for score in ref.anomaly:
            out[score] = {"in": ref.anomaly[score]} | {
                name: s.anomaly[score] for name, s in scored.items() if name != "reference"
            }
        return out
    test = scored["heldout"]
    known = np.array([lab in classes for lab in test.labels])
    unseen = sorted({str(lab) for lab in test.labels if lab is not None and lab not in classes})
    for score, vals in test.anomaly.items():
        groups = {"in": vals[known]}
        if unseen:
            groups["unseen labels"] = vals[~known & np.array([lab is not None for lab in test.labels])]
            if len(unseen) > 1:
                groups |= {f"label {u}": vals[np.array([lab == u for lab in test.labels])] for u in unseen}
        out[score] = groups
    return out


def scoring_study(
    generator: Any,
    reference_set: ImageSet | TileBatch,
    other_sets: Mapping[str, ImageSet | TileBatch],
    config: ScoringStudyConfig | None = None,
    *,
    class_reference: ImageSet | TileBatch | None = None,
    n: int | None = None,
    seed: int = 0,
    options: HarnessOptions | None = None,
    frechet: StudyResult | None = None,
) -> StudyResult:
    """Score ``reference_set`` and ``other_sets`` with ``generator`` (a cytosyn pipeline) — see the module
    docstring. Sets may be given already read (`read_tiles`), so several seeds encode them once.
    ``frechet``: a domain-study result on the same sets, reported beside the scores."""
    cfg = config or ScoringStudyConfig()
    opts = options or HarnessOptions()
    pipe = generator
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    need_own = cfg.own or cfg.variant == "classify" or class_reference is not None
    ref = (
        reference_set
        if isinstance(reference_set, TileBatch)
        else read_tiles(pipe, reference_set, n, need_own)
    )
    others = {
        name: s if isinstance(s, TileBatch) else read_tiles(pipe, s, n, need_own)
        for name, s in other_sets.items()
    }
    protos = None
    if cfg.variant == "classify":
        protos = _prototypes(ref, cfg.min_tiles, "the reference split")
        if "heldout" not in others:
            raise ValueError("the classify variant needs the labelled held-out set as other_sets['heldout']")
    elif class_reference is not None:
        cref = (
            class_reference
            if isinstance(class_reference, TileBatch)
            else read_tiles(pipe, class_reference, n, True)
        )
        protos = _prototypes(cref, cfg.min_tiles, "scoring.class_reference")
    timings["read_encode_s"] = time.perf_counter() - t0

    grid = cfg.times.grid()
    engine = EngineSettings(grid, seed=seed, mask_fraction=cfg.mask_fraction, batch_size=cfg.batch_size)
    conditions = build_conditions(pipe, cfg.own, cfg.null, protos)
    t0 = time.perf_counter()
    weights, cal_nfe = calibrate(
        pipe,
        [ref],
        conditions,
        engine,
        cfg.calibration_tiles,
        cfg.weighting_degree,
        tiles_per_batch=cfg.tiles_per_batch,
    )
    pruning = (
        PruningSettings(cfg.pruning.min_t, cfg.pruning.every, cfg.pruning.p_threshold)
        if cfg.pruning.enabled
        else None
    )
    plan = ScoringPlan(conditions, engine, weights, pruning, cfg.margin_k)
    score_reference = cfg.variant == "domain" or bool(cfg.score_reference)
    to_score = ({"reference": ref} if score_reference else {}) | dict(others)
    scored: dict[str, TileScores] = {}
    with tqdm(
        total=sum(len(b) for b in to_score.values()),
        unit="tile",
        desc=f"score (seed {seed})",
        disable=not opts.progress,
    ) as bar:
        for name, batch in to_score.items():
            raw = score_batch(pipe, batch, plan, cfg.tiles_per_batch, progress=bar)
            scored[name] = decide(plan, batch.keys, batch.labels, batch.meta, raw)
    timings["scoring_s"] = time.perf_counter() - t0
    classes = plan.class_names
    classification: dict[str, Any] = {}
    if cfg.variant == "classify":
        classification, probe_score = _classification(
            ref, others["heldout"], scored["heldout"], classes, opts, seed
        )
        if probe_score is not None:  # the discriminative anomaly baseline, beside the generative scores
            scored["heldout"].anomaly[PROBE_SCORE] = probe_score
    separation: dict[str, dict[str, Any]] = {}
    by_score = _groups(cfg.variant, scored, classes)
    for score, groups in by_score.items():
        for name, vals in groups.items():
            if name == "in" or len(vals) == 0 or len(groups["in"]) == 0:
                continue
            separation.setdefault(name, {})[score] = auc_with_ci(
                groups["in"], vals, n_boot=opts.n_boot, seed=seed
            )
    vs_baseline = _versus_baseline(by_score, separation, opts, seed)
    metrics: dict[str, Any] = {
        "variant": cfg.variant,
        "plan": plan.describe(),
        "prototypes": None if protos is None else protos.describe(),
        "nfe": {
            "per_tile_without_pruning": len(conditions) * len(grid),
            "calibration": cal_nfe,
            "per_set": {name: int(s.raw.nfe.sum()) for name, s in scored.items()},
        },
        "anomaly_scores": {
            k: v
            for k, v in (ANOMALY_SCORES | {PROBE_SCORE: PROBE_SCORE_NOTE}).items()
            if any(k in s.anomaly for s in scored.values())
        },
        "separation_auc": separation,
        "separation_vs_baseline": vs_baseline,
        "separation_note": "ROC AUC of each score for 'out' tiles (positive) vs 'in' tiles; stratified bootstrap CI",
        "tiles": {name: _per_tile(s) for name, s in scored.items()},
    }
    metrics |= classification
    if frechet is not None:
        metrics["frechet"] = frechet.to_dict(strict=False)["metrics"]
    provenance = {name: _provenance(s) for name, s in {"reference": reference_set, **other_sets}.items()}
    return StudyResult(
        study="scoring",
        generator=describe_generator(pipe),
        settings=study_settings(opts, n=n, seed=seed, scoring=cfg.model_dump(mode="json")),
        references=provenance,
        generated=frechet.generated if frechet is not None else {},
        extractors=frechet.extractors if frechet is not None else {},
        metrics=metrics,
        warnings=list(frechet.warnings) if frechet is not None else [],
        timings_s=timings | (frechet.timings_s if frechet is not None else {}),
        samples=_top_tiles(scored, {"reference": ref, **others}, cfg, plan)
        | (frechet.samples if frechet else {}),
    )


def _versus_baseline(
    by_score: Mapping[str, Mapping[str, np.ndarray]],
    separation: Mapping[str, Mapping[str, Any]],
    opts: HarnessOptions,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """group → generative score → its AUC minus the probe baseline's on the same tiles (paired bootstrap);
    empty when there is no baseline (the domain variant)."""
    if PROBE_SCORE not in by_score:
        return {}
    base = by_score[PROBE_SCORE]
    out: dict[str, dict[str, Any]] = {}
    for name in separation:
        for score, groups in by_score.items():
            if score == PROBE_SCORE or score not in separation[name]:
                continue
            out.setdefault(name, {})[score] = auc_difference_with_ci(
                groups["in"], groups[name], base["in"], base[name], n_boot=opts.n_boot, seed=seed
            )
    return out


def _provenance(s: Any) -> dict[str, Any]:
    if isinstance(s, ImageSet):
        return s.provenance
    return {"name": "tiles", "kind": "arrays", "source": "memory", "count": len(s)}


def _classification(
    ref: TileBatch,
    test_tiles: TileBatch,
    test: TileScores,
    classes: list[str],
    opts: HarnessOptions,
    seed: int,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Generative classification vs a linear probe on the same encoder features (the model's own
    conditioning embeddings of the same reference tiles), on held-out tiles of known classes. Also
    returns the probe's anomaly score of every held-out tile (`PROBE_SCORE`: 1 − its maximum class
    probability, the maximum-softmax-probability baseline of out-of-distribution detection)."""
    idx = [i for i, lab in enumerate(test.labels) if lab in classes]
    if len(idx) < 2:
        return {
            "classification": None,
            "classification_note": "fewer than 2 held-out tiles of known classes",
        }, None
    truth = [str(test.labels[i]) for i in idx]
    gen = classification_metrics(
        truth, [str(test.predicted[i]) for i in idx], classes, n_boot=opts.n_boot, seed=seed
    )
    assert ref.own is not None and test_tiles.own is not None
    train = [i for i, lab in enumerate(ref.labels) if lab in classes]
    probe = fit_linear_probe(ref.own[train], [str(ref.labels[i]) for i in train], seed=seed)
    test_x = test_tiles.own.astype(np.float64)
    pred = probe.predict(test_x[idx])
    probe_metrics = classification_metrics(
        truth, [str(p) for p in pred], classes, n_boot=opts.n_boot, seed=seed
    )
    metrics = {
        "classification": {"generative": gen, "linear_probe": probe_metrics},
        "classification_note": "held-out tiles whose label is one of the reference's classes; the linear probe is a "
        "standardised multinomial logistic regression on the model's conditioning embeddings of the reference tiles",
    }
    return metrics, 1.0 - probe.predict_proba(test_x).max(axis=1)


def _top_tiles(
    scored: Mapping[str, TileScores],
    batches: Mapping[str, TileBatch],
    cfg: ScoringStudyConfig,
    plan: ScoringPlan,
) -> dict[str, np.ndarray]:
    """Image rows for the report grid: the most and least anomalous tiles of each set (primary score)."""
    if cfg.top_tiles == 0:
        return {}
    rows: dict[str, np.ndarray] = {}
    for name, s in scored.items():
        score = next((k for k in ("margin", "own_vs_null", "own_error") if k in s.anomaly), None)
        images = batches[name].images
        if score is None or not images:
            continue
        vals = s.anomaly[score]
        order = [i for i in np.argsort(-vals, kind="stable") if np.isfinite(vals[i])]
        rows[f"{name}: most anomalous"] = np.stack([images[i] for i in order[: cfg.top_tiles]])
        rows[f"{name}: least anomalous"] = np.stack([images[i] for i in order[::-1][: cfg.top_tiles]])
    return rows


# ------------------------------------------------------------------------------------ cytosyn eval hooks
def _check_config(cfg: EvalConfig) -> None:
    if cfg.generator.kind != "cytosyn":
        raise ValueError(
            "the scoring study needs a cytosyn generator (release or checkpoint): it measures its denoising errors"
        )
    s = cfg.scoring
    if cfg.references.reference is None:
        raise ValueError(
            "the scoring study needs references.reference (the in-domain or labelled reference split)"
        )
    if s.variant == "domain" and not cfg.references.others:
        raise ValueError("the scoring study's domain variant needs references.others (name → new-domain set)")
    if s.variant == "domain" and s.score_reference is False:
        raise ValueError(
            "scoring.score_reference: false does not apply to the domain variant: the reference tiles are its 'in' group"
        )
    if s.variant == "classify" and cfg.references.heldout is None:
        raise ValueError(
            "the scoring study's classify variant needs references.heldout (a labelled held-out split)"
        )


def _run(ctx: StudyContext) -> list[StudyResult]:
    from .domain import domain_study

    cfg = ctx.cfg
    s = cfg.scoring
    pipe = ctx.generator
    need_own = s.own or s.variant == "classify" or s.class_reference is not None
    mpp = cfg.references.mpp
    assert cfg.references.reference is not None
    ref_set = open_set(cfg.references.reference, cfg.n, mpp)
    ref = read_tiles(pipe, ref_set, cfg.n, need_own)
    if s.variant == "classify":
        assert cfg.references.heldout is not None
        other_sets = {"heldout": open_set(cfg.references.heldout, cfg.n, mpp)}
    else:
        other_sets = {name: open_set(p, cfg.n, mpp) for name, p in cfg.references.others.items()}
    others = {name: read_tiles(pipe, st, cfg.n, need_own) for name, st in other_sets.items()}
    cref = None
    if s.class_reference is not None:
        # read whole: its tiles define the class prototypes (`n` is the size of the scored sets)
        cref = read_tiles(pipe, open_set(s.class_reference, None, mpp), None, True)
    results = []
    fd_refs = None
    if s.variant == "domain" and s.frechet:
        fd_refs = (
            ctx.reference(cfg.references.reference, "reference"),
            {name: ctx.reference(p, name) for name, p in cfg.references.others.items()},
        )
    for seed in cfg.seeds:
        frechet = None
        if fd_refs is not None:
            frechet = domain_study(
                pipe, fd_refs[0], ctx.extractors, cfg.n, other_sets=fd_refs[1], fidelity_extractor=cfg.fidelity_extractor,
                steps=ctx.steps, guidance_scale=ctx.guidance_scale, seed=seed, options=ctx.options,
            )  # fmt: skip
        result = scoring_study(
            pipe,
            ref,
            others,
            s,
            class_reference=cref,
            n=cfg.n,
            seed=seed,
            options=ctx.options,
            frechet=frechet,
        )
        result.references = {"reference": ref_set.provenance} | {
            k: v.provenance for k, v in other_sets.items()
        }
        results.append(result)
    return results


def _headline(result: StudyResult) -> dict[str, float]:
    m = result.to_dict(strict=False)["metrics"]
    out: dict[str, float] = {}
    for group, per in m.get("separation_auc", {}).items():
        for score, v in per.items():
            out[f"auc/{score}/{group}"] = v["estimate"]
    for group, per in (m.get("separation_vs_baseline") or {}).items():
        for score, v in per.items():
            out[f"auc_minus_{PROBE_SCORE}/{score}/{group}"] = v["estimate"]
    cls = m.get("classification") or {}
    for name in ("generative", "linear_probe"):
        if cls.get(name):
            out[f"balanced_accuracy/{name}"] = cls[name]["balanced_accuracy"]["estimate"]
            out[f"macro_f1/{name}"] = cls[name]["macro_f1"]["estimate"]
    if m.get("frechet"):
        out |= comparisons_headline(m["frechet"])
    return out


def _markdown(results: list[StudyResult]) -> str:
    r = results[0]
    d = r.to_dict(strict=False)
    m = d["metrics"]
    plan = m["plan"]
    times = plan["engine"]["times"]
    out = [f"### Generative scores ({m['variant']} variant, seed {d['settings']['seed']})", ""]
    out.append(
        f"- {times['k']} times in [{fmt(min(times['values']))}, {fmt(max(times['values']))}], one noise draw per "
        f"tile and time shared by all conditions (seed {plan['engine']['noise_seed']}), central mask "
        f"{plan['engine']['mask_fraction']} of the latent side; conditions: "
        + ", ".join(f"`{c['name']}`" for c in plan["conditions"])
    )
    w = plan["weighting"]
    out.append(
        f"- per-time weighting fitted on {w['calibration_tiles']} reference tiles ({', '.join(w['calibration_conditions'] or [])}); "
        f"pruning: {'off' if plan['pruning'] is None else 'p < ' + fmt(plan['pruning']['p_threshold'])}; "
        f"NFE per tile without pruning {m['nfe']['per_tile_without_pruning']}, spent per set "
        + ", ".join(f"{k} {v}" for k, v in m["nfe"]["per_set"].items())
    )
    out.append("")
    if m["separation_auc"]:
        scores = sorted({s for per in m["separation_auc"].values() for s in per})
        out.append(
            "Separation of the 'out' tiles from the 'in' tiles (ROC AUC [95% CI]; 0.5 = no separation):"
        )
        out.append("")
        out.append("| out group | n in / out | " + " | ".join(f"`{s}`" for s in scores) + " |")
        out.append("|---|---|" + "---|" * len(scores))
        for group, per in m["separation_auc"].items():
            first = next(iter(per.values()))
            cells = [fmt_ci(per[s]) if s in per else "—" for s in scores]
            out.append(f"| {group} | {first['n_in']} / {first['n_out']} | " + " | ".join(cells) + " |")
        out.append("")
        out.extend(f"- `{k}`: {v}" for k, v in m["anomaly_scores"].items())
        out.append("")
    for group, per in (m.get("separation_vs_baseline") or {}).items():
        out.append(
            f"AUC minus the `{PROBE_SCORE}` baseline's, same tiles ({group}; paired stratified bootstrap, "
            "95% CI; share of replicates ≤ 0): "
            + ", ".join(f"`{k}` {fmt_ci(v)} ({fmt(v['p_not_above_zero'])})" for k, v in per.items())
        )
        out.append("")
    cls = m.get("classification")
    if cls:
        out.append(
            "Generative classification vs a linear probe on the same encoder features (held-out tiles of known classes):"
        )
        out.append("")
        out.append("| method | n | accuracy | balanced accuracy | macro-F1 |")
        out.append("|---|---|---|---|---|")
        for name in ("generative", "linear_probe"):
            c = cls.get(name)
            if c:
                out.append(
                    f"| {name} | {c['n']} | {fmt_ci(c['accuracy'])} | {fmt_ci(c['balanced_accuracy'])} | {fmt_ci(c['macro_f1'])} |"
                )
        out.append("")
        out.append(f"Chance balanced accuracy: {fmt(cls['generative']['chance_balanced_accuracy'])}.")
        out.append("")
    if m.get("frechet"):
        fake = StudyResult(**{**r.__dict__, "metrics": m["frechet"], "samples": {}})
        out += distances_markdown(fake, gap=False)
    return "\n".join(out)


def _plots(result: StudyResult, folder: Path) -> dict[str, Path]:
    from cytosyn.scoring.figures import plot_score_distributions

    from ..figures import has_random_weights

    m = result.metrics
    classes = {c.get("label") for c in m["plan"]["conditions"] if c.get("is_class")}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, tiles in m["tiles"].items():
        labels = tiles["labels"]
        for score, vals in tiles["scores"].items():
            vals = np.asarray(vals, dtype=np.float64)
            if m["variant"] == "classify" and name == "heldout":  # known classes vs labels never trained on
                known = np.array([lab in classes for lab in labels], dtype=bool)
                groups.setdefault(score, {})["held-out, known classes"] = vals[known]
                if (~known).any():
                    groups[score]["held-out, unseen labels"] = vals[~known]
            else:
                groups.setdefault(score, {})[name] = vals
    if not groups:
        return {}
    path = plot_score_distributions(
        groups,
        Path(folder) / "score_distributions.png",
        title="anomaly scores"
        + (f" ({PROBE_SCORE}: the discriminative baseline)" if PROBE_SCORE in groups else " (generative)"),
        random_weights=has_random_weights(result.generator),
    )
    return {"score_distributions": path}


STUDY = Study(
    name="scoring",
    run=_run,
    headline=_headline,
    markdown=_markdown,
    plots=_plots,
    check_config=_check_config,
    grid_title="the most and least anomalous tiles of each set (by margin, else own_vs_null, else own_error)"
    " [with Fréchet numbers: then references above their generated tiles]",
)
