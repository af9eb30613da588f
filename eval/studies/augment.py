"""The augmentation study: do synthetic tiles help a downstream classifier? Measured on real, held-out patients.

CytoDiff drew its cross-validation folds over the pooled real + synthetic set, so most test images were
synthetic. Here the protocol is fixed before anything is trained:

1. **The test set is real and was split by patient before any synthetic tile existed.** `check_protocol`
   refuses a test set holding generated tiles, sharing a patient, slide, key or identical pixels with the
   real training set, or sharing a patient/slide with the tiles the generator was fine-tuned on (the
   adapter's few-shot selection, recorded in every labelled synthetic tile by ``cytosyn sample``). A
   synthetic set whose provenance does not say which patients made it is refused unless
   ``augment.allow_unverified_synthetic`` (the report then says so).
2. For each seed and each N in ``augment.n_synthetic`` (0 = real only, always reported), every classifier
   is trained on all the real training tiles + N synthetic tiles per class (a seeded draw; the draws are
   nested, so N = 500 contains N = 100's tiles) and scored on the whole test set: balanced accuracy and
   macro-F1 (`cytosyn.eval.classifiers`).
3. Over seeds: the mean with a percentile bootstrap CI, and the **gain** over real-only, paired by seed.
   The CIs describe seed-to-seed variability (classifier initialisation and synthetic draw); with a small
   test set, the test sampling error adds to it (the per-class test counts are in the report).

Classifiers: a linear probe on a frozen extractor's features (``augment.probe_extractor``, one of the
config's ``extractors``) and a small CNN from scratch (timm, ``augment.cnn``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from cytosyn.config import StrictModel
from cytosyn.manifest import read_manifest

from ..classifiers import CnnSettings, linear_probe, resize_tiles, scores, train_cnn
from ..harness import StudyResult
from ..images import ImageSet
from ..metrics import bootstrap_ci
from ..report import fmt
from .base import Study, StudyContext

if TYPE_CHECKING:
    from ..run import EvalConfig

__all__ = ["STUDY", "AugmentConfig", "ProtocolError", "augment_study", "check_protocol"]

METRICS = ("balanced_accuracy", "macro_f1")


class ProtocolError(ValueError):
    """The test set could leak into training (or is not real): the study refuses to run."""


class AugmentConfig(StrictModel):
    train: Path | None = None  # real labelled training split (e.g. the few-shot split)
    test: Path | None = None  # real labelled test split: held-out patients, made before any synthetic tile
    synthetic: Path | None = None  # labelled synthetic set (cytosyn sample mode=labelled)
    n_synthetic: list[int] = Field(default=[0, 100, 500, 5000], min_length=1)  # per class
    classifiers: list[Literal["linear_probe", "cnn"]] = Field(default=["linear_probe", "cnn"], min_length=1)
    probe_extractor: str | None = None  # name of one of `extractors` (default: the first)
    probe_c: float = Field(default=1.0, gt=0)
    cnn: CnnSettings = Field(default_factory=CnnSettings)
    label_field: str = "label"
    allow_unverified_synthetic: bool = False


# ------------------------------------------------------------------------------------------- data
@dataclass
class LabelledSet:
    """One pass over a labelled image set: labels, identities, pixel hashes, CNN-size tiles, probe features."""

    name: str
    keys: list[str]
    labels: list[str]
    patients: list[str | None]
    slides: list[str | None]
    pixel_sha: list[str]
    generated: list[bool]
    metas: list[dict[str, Any]]
    small: np.ndarray  # N × s × s × 3 uint8 (CNN input)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


def read_labelled(
    path: Path, name: str, label_field: str, extractors: Mapping[str, Any], size: int, batch_size: int = 32
) -> LabelledSet:
    import torch

    image_set = ImageSet.open(path)
    out = LabelledSet(name, [], [], [], [], [], [], [], np.zeros((0, size, size, 3), np.uint8))
    small: list[np.ndarray] = []
    feats: dict[str, list[np.ndarray]] = {k: [] for k in extractors}
    for keys, batch, metas in image_set.batches(batch_size):
        for key, image, meta in zip(keys, batch, metas):
            meta = meta or {}
            if meta.get(label_field) in (None, ""):
                raise ProtocolError(f"{name} set {path}: tile {key!r} has no {label_field!r}")
            out.keys.append(key)
            out.labels.append(str(meta[label_field]))
            out.patients.append(meta.get("patient_id"))
            out.slides.append(meta.get("slide_id"))
            out.pixel_sha.append(hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest())
            out.generated.append(bool(meta.get("generated")))
            out.metas.append(meta)
        small.append(resize_tiles(list(batch), size))
        with torch.no_grad():
            for ext_name, ext in extractors.items():
                feats[ext_name].append(
                    ext.features(torch.from_numpy(np.ascontiguousarray(batch))).float().numpy()
                )
    if not out.keys:
        raise ProtocolError(f"{name} set {path} is empty")
    out.small = np.concatenate(small)
    out.features = {k: np.concatenate(v) for k, v in feats.items()}
    out.provenance = image_set.provenance
    return out


# --------------------------------------------------------------------------------------- protocol
def _synthetic_sources(path: Path, synthetic: LabelledSet) -> tuple[set[str], set[str], bool]:
    """Patients and slides the synthetic tiles were made from (the adapter's few-shot set), and whether known."""
    patients: set[str] = set()
    slides: set[str] = set()
    known = True
    for meta in synthetic.metas:
        few = ((meta.get("adapter") or {}).get("few_shot")) or None
        if few is None or few.get("patients") is None:
            known = False
            continue
        patients |= set(few.get("patients") or [])
        slides |= set(few.get("slides") or [])
    return patients, slides, known


def check_protocol(
    train: LabelledSet,
    test: LabelledSet,
    synthetic: LabelledSet | None,
    paths: Mapping[str, Path],
    allow_unverified: bool,
) -> dict[str, Any]:
    """Refuse leaking or synthetic test sets (see the module docstring); returns what was checked."""
    test_manifest = (
        read_manifest(paths["test"]) if (Path(paths["test"]) / "manifest.json").is_file() else None
    )
    if (test_manifest and test_manifest.stats.get("generated")) or any(test.generated):
        raise ProtocolError(f"test set {paths['test']} holds generated tiles: the test set must be real only")
    if any(train.generated):
        raise ProtocolError(f"train set {paths['train']} holds generated tiles: pass real tiles as train")
    checks: dict[str, Any] = {"test_real_only": True}
    for what, a, b in (
        ("patients", train.patients, test.patients),
        ("slides", train.slides, test.slides),
        ("keys", train.keys, test.keys),
        ("identical pixels", train.pixel_sha, test.pixel_sha),
    ):
        shared = {x for x in a if x is not None} & {x for x in b if x is not None}
        if shared:
            raise ProtocolError(
                f"train and test share {len(shared)} {what} (e.g. {sorted(shared)[0]!r}): the test split must hold "
                "other patients than the few-shot / training tiles"
            )
    if None in test.patients:
        raise ProtocolError("test tiles without patient_id: the split by patient cannot be checked")
    checks["train_test_disjoint"] = ["patients", "slides", "keys", "identical pixels"]
    warnings: list[str] = []
    if synthetic is not None:
        if not all(synthetic.generated):
            raise ProtocolError(f"synthetic set {paths['synthetic']} holds tiles not marked generated")
        patients, slides, known = _synthetic_sources(paths["synthetic"], synthetic)
        if not known:
            msg = (
                f"synthetic set {paths['synthetic']} does not record which patients its generator was fine-tuned "
                "on (no adapter few-shot provenance)"
            )
            if not allow_unverified:
                raise ProtocolError(
                    msg + "; refusing (augment.allow_unverified_synthetic: true to accept it)"
                )
            warnings.append(msg + ": accepted because augment.allow_unverified_synthetic is set")
        leak = (patients & set(test.patients)) | (slides & {s for s in test.slides if s is not None})
        if leak:
            raise ProtocolError(
                f"the synthetic tiles were made by a model fine-tuned on test patients/slides {sorted(leak)[:3]}: "
                "split the test set by patient before fine-tuning"
            )
        shared_pixels = set(synthetic.pixel_sha) & set(test.pixel_sha)
        if shared_pixels:
            raise ProtocolError(f"{len(shared_pixels)} synthetic tiles are pixel-identical to test tiles")
        checks["synthetic_sources"] = {"patients": sorted(patients), "slides": sorted(slides), "known": known}
        unknown = sorted(set(synthetic.labels) - set(test.labels) - set(train.labels))
        if unknown:
            warnings.append(f"synthetic classes {unknown} are in neither the train nor the test set")
    missing = sorted(set(test.labels) - set(train.labels))
    if missing:
        warnings.append(f"test classes {missing} have no real training tile")
    checks["warnings"] = warnings
    return checks


# ------------------------------------------------------------------------------------------ study
def _draw(synthetic: LabelledSet, classes: list[str], n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Indices of n synthetic tiles per class (nested across n for one seed); notes when a class has fewer."""
    from cytosyn.training.randomness import sample_seed

    idx: list[int] = []
    notes: list[str] = []
    for c in classes:
        pool = [i for i, lab in enumerate(synthetic.labels) if lab == c]
        order = np.random.default_rng(sample_seed("augment", seed, c)).permutation(len(pool))
        take = [pool[j] for j in order[:n]]
        if len(take) < n:
            notes.append(f"N={n}: class {c!r} has {len(pool)} synthetic tiles, all used")
        idx += take
    return np.array(sorted(idx), dtype=np.int64), notes


def augment_study(
    train: LabelledSet,
    test: LabelledSet,
    synthetic: LabelledSet | None,
    settings: AugmentConfig,
    seeds: list[int],
    probe_extractor: str | None,
    checks: dict[str, Any],
    progress: Any = None,
    extractor_info: dict[str, Any] | None = None,
) -> list[StudyResult]:
    """Train and score every classifier for every N and seed; one `StudyResult` per seed (each also holds
    the aggregate over seeds, which the report and plot use)."""
    classes = sorted(set(train.labels) | set(test.labels) | (set(synthetic.labels) if synthetic else set()))
    index = {c: i for i, c in enumerate(classes)}
    y_train = np.array([index[c] for c in train.labels])
    y_test = np.array([index[c] for c in test.labels])
    ns = sorted(set(settings.n_synthetic))
    if synthetic is None and ns != [0]:
        raise ProtocolError("augment.synthetic is not set: only n_synthetic [0] (real only) can run")
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        t0 = time.perf_counter()
        rows: dict[str, dict[str, dict[str, float]]] = {}
        notes: list[str] = []
        for n in ns:
            extra = np.zeros(0, np.int64)
            if n and synthetic is not None:
                extra, more = _draw(synthetic, classes, n, seed)
                notes += more
            y_syn = (
                np.array([index[synthetic.labels[i]] for i in extra], dtype=np.int64)
                if len(extra)
                else np.zeros(0, np.int64)
            )
            y = np.concatenate([y_train, y_syn])
            for clf in settings.classifiers:
                if clf == "linear_probe":
                    assert probe_extractor is not None
                    x = train.features[probe_extractor]
                    if len(extra):
                        x = np.concatenate([x, synthetic.features[probe_extractor][extra]])  # type: ignore[union-attr]
                    pred = linear_probe(x, y, test.features[probe_extractor], seed, settings.probe_c)
                else:
                    x = (
                        train.small
                        if not len(extra)
                        else np.concatenate([train.small, synthetic.small[extra]])
                    )  # type: ignore[union-attr]
                    pred = train_cnn(x, y, test.small, len(classes), seed, settings.cnn)
                rows.setdefault(clf, {})[str(n)] = scores(y_test, pred, len(classes)) | {
                    "train_real": len(y_train),
                    "train_synthetic": len(y_syn),
                }
                if progress is not None:
                    progress.update(1)
        per_seed.append({"seed": seed, "scores": rows, "notes": notes, "seconds": time.perf_counter() - t0})
    aggregate = aggregate_scores(per_seed, ns, settings.classifiers)
    counts = {
        name: {c: s.labels.count(c) for c in classes}
        for name, s in (("train", train), ("test", test), ("synthetic", synthetic))
        if s is not None
    }
    adapter = (
        next((m.get("adapter") for m in synthetic.metas if m.get("adapter")), None) if synthetic else None
    )
    generator = {
        "name": (adapter or {}).get("name")
        or (f"synthetic set {synthetic.name}" if synthetic else "none (real only)"),
        "kind": "labelled synthetic set",
        "source": str(synthetic.provenance.get("source")) if synthetic else None,
        "adapter": adapter,
        "protocol": {
            "conditioning_encoder": "class labels (adapter)" if adapter else None,
            "tile_px": (synthetic.provenance.get("image_size") or [None])[0] if synthetic else None,
            "mpp": synthetic.provenance.get("mpp") if synthetic else None,
        },
    }
    results = []
    for entry in per_seed:
        results.append(
            StudyResult(
                study="augment",
                generator=generator,
                settings={"seed": entry["seed"], "seeds": seeds, "n_synthetic": ns, "classes": classes,
                          "augment": settings.model_dump(mode="json"), "probe_extractor": probe_extractor},
                references={"train": train.provenance, "test": test.provenance}
                | ({"synthetic": synthetic.provenance} if synthetic else {}),
                generated=synthetic.provenance if synthetic else {},
                extractors=extractor_info or {},
                metrics={"scores": entry["scores"], "aggregate": aggregate, "protocol": checks, "counts": counts},
                warnings=sorted(set(entry["notes"]) | set(checks.get("warnings", []))),
                timings_s={"seconds": entry["seconds"]},
            )
        )  # fmt: skip
    return results


def _ci(values: list[float], seed: int = 0) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) < 2:
        return {"estimate": float(arr.mean()), "low": None, "high": None}
    ci = bootstrap_ci(np.mean, arr, n_boot=1000, seed=seed)
    return {"estimate": float(ci.estimate), "low": float(ci.low), "high": float(ci.high)}


def aggregate_scores(per_seed: list[dict[str, Any]], ns: list[int], classifiers: list[str]) -> dict[str, Any]:
    """Mean and bootstrap CI over seeds of each metric, and of the paired gain over N = 0 (real only)."""
    out: dict[str, Any] = {}
    for clf in classifiers:
        for n in ns:
            for m in METRICS:
                vals = [e["scores"][clf][str(n)][m] for e in per_seed]
                out.setdefault(clf, {}).setdefault(str(n), {})[m] = _ci(vals)
                if 0 in ns:
                    gains = [e["scores"][clf][str(n)][m] - e["scores"][clf]["0"][m] for e in per_seed]
                    out[clf][str(n)][f"gain_{m}"] = _ci(gains)
    return out


# ------------------------------------------------------------------------------------ cytosyn eval hooks
def _check_config(cfg: EvalConfig) -> None:
    a = cfg.augment
    if a.train is None or a.test is None:
        raise ValueError("the augment study needs augment.train and augment.test (real labelled splits)")
    if "linear_probe" in a.classifiers and a.probe_extractor is not None:
        names = [e if isinstance(e, str) else e.get("name") for e in cfg.extractors]
        if a.probe_extractor not in names:
            raise ValueError(
                f"augment.probe_extractor {a.probe_extractor!r} is not one of extractors {names}"
            )


def _run(ctx: StudyContext) -> list[StudyResult]:
    from tqdm import tqdm

    cfg = ctx.cfg
    a = cfg.augment
    assert a.train is not None and a.test is not None
    probe = (a.probe_extractor or next(iter(ctx.extractors))) if "linear_probe" in a.classifiers else None
    exts = {probe: ctx.extractors[probe]} if probe else {}
    for ext in exts.values():
        ext.to(ctx.options.device or "cpu")
    size = a.cnn.image_size
    train = read_labelled(a.train, "train", a.label_field, exts, size, cfg.batch_size)
    test = read_labelled(a.test, "test", a.label_field, exts, size, cfg.batch_size)
    synthetic = (
        read_labelled(a.synthetic, "synthetic", a.label_field, exts, size, cfg.batch_size)
        if a.synthetic
        else None
    )
    paths = {"train": a.train, "test": a.test, "synthetic": a.synthetic}
    checks = check_protocol(train, test, synthetic, paths, a.allow_unverified_synthetic)  # type: ignore[arg-type]
    total = len(cfg.seeds) * len(set(a.n_synthetic)) * len(a.classifiers)
    info = {
        name: {
            "encoder": ext.describe().get("name", name),
            "metadata": ext.settings(tuple(test.provenance.get("image_size") or (224, 224))),
            "is_conditioning_encoder": False,
        }
        for name, ext in exts.items()
    }
    with tqdm(total=total, desc="augment", unit="fit") as bar:
        return augment_study(
            train, test, synthetic, a, list(cfg.seeds), probe, checks, progress=bar, extractor_info=info
        )


def _headline(result: StudyResult) -> dict[str, float]:
    out: dict[str, float] = {}
    for clf, per_n in result.metrics["scores"].items():
        for n, vals in per_n.items():
            for m in METRICS:
                out[f"{m}/{clf}/n{n}"] = vals[m]
                if "0" in per_n:
                    out[f"gain_{m}/{clf}/n{n}"] = vals[m] - per_n["0"][m]
    return out


def _cell(ci: Mapping[str, Any]) -> str:
    if ci.get("low") is None:
        return fmt(ci["estimate"])
    return f"{fmt(ci['estimate'])} [{fmt(ci['low'])}, {fmt(ci['high'])}]"


def _markdown(results: list[StudyResult]) -> str:
    m = results[0].metrics
    s = results[0].settings
    agg = m["aggregate"]
    out = [
        "### Protocol",
        "",
        "Test set real only and disjoint from the training tiles (patients, slides, keys, identical pixels); "
        f"synthetic tiles made from patients {m['protocol'].get('synthetic_sources', {}).get('patients', '—')} "
        f"(none of them in the test set). Seeds {s['seeds']}; CIs are percentile bootstrap over seeds.",
        "",
        "| class | " + " | ".join(m["counts"]) + " |",
        "|---|" + "---|" * len(m["counts"]),
    ]
    for c in s["classes"]:
        out.append(f"| {c} | " + " | ".join(str(v.get(c, 0)) for v in m["counts"].values()) + " |")
    out += ["", "### Balanced accuracy and macro-F1 vs synthetic tiles per class", ""]
    out.append("| classifier | N synthetic / class | balanced accuracy | gain | macro-F1 | gain |")
    out.append("|---|---|---|---|---|---|")
    for clf, per_n in agg.items():
        for n, v in per_n.items():
            label = f"{n} (real only)" if n == "0" else n
            out.append(
                f"| {clf} | {label} | {_cell(v['balanced_accuracy'])} | {_cell(v.get('gain_balanced_accuracy', {'estimate': float('nan')}))} "
                f"| {_cell(v['macro_f1'])} | {_cell(v.get('gain_macro_f1', {'estimate': float('nan')}))} |"
            )
    out.append("")
    return "\n".join(out)


def _plots(result: StudyResult, folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = result.metrics["aggregate"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric in zip(axes, METRICS):
        for clf, per_n in agg.items():
            ns = sorted(int(n) for n in per_n)
            est = [per_n[str(n)][metric]["estimate"] for n in ns]
            low = [per_n[str(n)][metric]["low"] for n in ns]
            high = [per_n[str(n)][metric]["high"] for n in ns]
            line = ax.plot(ns, est, marker="o", label=clf)[0]
            if all(v is not None for v in low + high):
                ax.fill_between(ns, low, high, alpha=0.2, color=line.get_color())
            ax.axhline(
                per_n["0"][metric]["estimate"] if "0" in per_n else np.nan,
                ls="--",
                lw=0.8,
                color=line.get_color(),
            )
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("synthetic tiles per class (0 = real only)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{metric.replace('_', ' ')} on the real test set")
        ax.legend()
    path = Path(folder) / "augment_gain.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"augment_gain": path}


STUDY = Study(
    name="augment", run=_run, headline=_headline, markdown=_markdown, plots=_plots, check_config=_check_config
)
