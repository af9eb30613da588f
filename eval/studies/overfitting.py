"""The overfitting study: are generated tiles closer to the training patients' tiles than to new patients'?

Tiles are generated from held-out patients' embeddings and compared, in every extractor, with held-out
tiles and with training-patient tiles (FD with bootstrap CI, KID, PRDC); the paired-bootstrap gap
``FD_heldout − FD_train`` > 0 means the model reproduces its training patients better than new ones
(slide-level overfitting). Nearest-neighbour `memorisation` asks the same tile by tile.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cytosyn.generation import TileGenerator

from ..features import build_extractors
from ..figures import new_figure, save_figure, yerr
from ..harness import (
    HarnessOptions,
    ReferenceFeatures,
    StudyResult,
    as_reference,
    compare_sets,
    describe_generator,
    encoder_name,
    extractor_info,
    fidelity,
    generate_or_read,
    grid_samples,
    pick_extractor,
    resolve_options,
    study_settings,
)
from ..images import ImageSet
from ..metrics import BootstrapCI, bootstrap_ci
from ..report import fmt, fmt_ci
from .base import Study, StudyContext
from .common import comparisons_headline, distances_markdown, fidelity_headline

if TYPE_CHECKING:
    from ..run import EvalConfig

__all__ = ["STUDY", "memorisation", "overfitting_study"]

RATIO_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95)


def _nn_dist(a: np.ndarray, b: np.ndarray, exclude_self: bool = False, block: int = 1024) -> np.ndarray:
    """Euclidean distance from each row of ``a`` to its nearest row of ``b`` (float64, in row blocks)."""
    center = b.mean(0)
    x = torch.from_numpy(np.asarray(a, np.float64) - center)
    y = torch.from_numpy(np.asarray(b, np.float64) - center)
    y_sq = (y * y).sum(1)
    out = np.empty(x.shape[0])
    for s in range(0, x.shape[0], block):
        xb = x[s : s + block]
        d = ((xb * xb).sum(1)[:, None] + y_sq[None, :] - 2 * xb @ y.T).clamp_min_(0)
        if exclude_self:
            rows = torch.arange(xb.shape[0])
            d[rows, rows + s] = float("inf")
        out[s : s + block] = d.min(1).values.sqrt().numpy()
    return out


def memorisation(
    gen_features: np.ndarray,
    train_features: np.ndarray,
    heldout_features: np.ndarray,
    *,
    equalise: bool = True,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Nearest-neighbour memorisation: is each generated tile nearer to a training tile than to a held-out one?

    For generated tile g: ``d_train`` = distance to its nearest training tile, ``d_heldout`` = to its
    nearest held-out tile (Euclidean, in one feature space). Reported: the ratio ``d_train / d_heldout``
    (quantiles and a histogram on [0, 2]), the fraction with ``d_train < d_heldout`` (bootstrap CI over
    generated tiles), the fraction of near-exact training copies (``d_train`` below 1e-3 × the median
    held-out → train nearest distance), and a baseline: the same fraction for held-out tiles themselves
    (each held-out tile's nearest training tile vs its nearest *other* held-out tile) — what a model
    drawing new tiles like the held-out patients' would score. Nearest distances shrink with the number
    of candidates, so with ``equalise`` both candidate sets are subsampled (seeded) to the same size.
    """
    g = np.asarray(gen_features, np.float64)
    t = np.asarray(train_features, np.float64)
    h = np.asarray(heldout_features, np.float64)
    rng = np.random.default_rng(seed)
    if equalise and len(t) != len(h):
        m = min(len(t), len(h))
        t = t[np.sort(rng.choice(len(t), m, replace=False))] if len(t) > m else t
        h = h[np.sort(rng.choice(len(h), m, replace=False))] if len(h) > m else h
    d_t = _nn_dist(g, t)
    d_h = _nn_dist(g, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d_h > 0, d_t / np.where(d_h > 0, d_h, 1), np.where(d_t > 0, np.inf, 1.0))
    closer = (d_t < d_h).astype(np.float64)
    frac = (
        bootstrap_ci(np.mean, closer, n_boot=n_boot, alpha=alpha, seed=seed)
        if len(closer) >= 2
        else BootstrapCI(float(closer.mean()), float("nan"), float("nan"))
    )
    # baseline: held-out tiles vs train (one fewer train candidate, to match the n−1 other held-out tiles)
    t_base = t[rng.permutation(len(t))[: max(len(h) - 1, 1)]] if equalise and len(t) >= len(h) else t
    base_t = _nn_dist(h, t_base)
    base_h = _nn_dist(h, h, exclude_self=True) if len(h) > 1 else np.full(len(h), np.inf)
    scale = float(np.median(base_t)) if len(base_t) else 0.0
    finite = np.clip(ratio[np.isfinite(ratio)], 0, 2)
    hist, edges = np.histogram(finite, bins=20, range=(0.0, 2.0))
    return {
        "n_generated": len(g),
        "n_train_candidates": len(t),
        "n_heldout_candidates": len(h),
        "equalised": bool(equalise),
        "fraction_closer_to_train": frac,
        "ratio_quantiles": {str(q): float(np.quantile(ratio, q, method="nearest")) for q in RATIO_QUANTILES},
        "ratio_histogram": {
            "edges": edges.tolist(),
            "counts": hist.tolist(),
            "above_2": int((ratio > 2).sum()),
        },
        "near_copy_fraction": float((d_t <= 1e-3 * scale).mean()) if scale > 0 else float((d_t == 0).mean()),
        "near_copy_threshold": 1e-3 * scale,
        "heldout_baseline_fraction": float((base_t < base_h).mean()),
        "median_d_train": float(np.median(d_t)),
        "median_d_heldout": float(np.median(d_h)),
    }


def overfitting_study(
    generator: TileGenerator | ImageSet,
    train_set: ImageSet | ReferenceFeatures,
    heldout_set: ImageSet | ReferenceFeatures,
    extractors: Mapping[str, Any] | Iterable[Any],
    n: int | None = None,
    *,
    fidelity_extractor: str | None = None,
    memorisation_extractor: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    options: HarnessOptions | None = None,
    **overrides: Any,
) -> StudyResult:
    """Slide-level overfitting: generate from held-out patients' embeddings, compare with held-out and training tiles.

    ``n`` tiles are read from each set (first ``n``), and tile i is generated from held-out tile i's
    embedding. Per extractor: FD (bootstrap CI) against held-out and against training tiles and their gap
    ``FD_heldout − FD_train`` (paired bootstrap; > 0 means the generated tiles sit closer to the training
    patients'), KID and PRDC (k = 5) against each. Conditional fidelity in ``fidelity_extractor`` (default:
    the first extractor whose encoder is not the conditioning one; naming the conditioning encoder is an
    error). `memorisation` in ``memorisation_extractor``'s space (default: the fidelity extractor).
    ``generator`` may also be an `ImageSet` of already generated tiles.
    """
    opts = resolve_options(options, overrides)
    exts = build_extractors(extractors)
    conditioning = None if isinstance(generator, ImageSet) else generator.conditioning_encoder
    fid_name = pick_extractor(exts, fidelity_extractor, conditioning, "conditional fidelity")
    mem_name = memorisation_extractor or fid_name or next(iter(exts))
    if mem_name not in exts:
        raise ValueError(f"memorisation extractor {mem_name!r} is not among the extractors {sorted(exts)}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    held = as_reference(heldout_set, exts, "heldout", n, opts)
    train = as_reference(train_set, exts, "train", n, opts)
    timings["reference_s"] = time.perf_counter() - t0
    refs = {"heldout": held, "train": train}
    gen = generate_or_read(
        generator,
        held,
        exts,
        refs,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        opts=opts,
        timings=timings,
    )
    notes: list[str] = []
    if held.n != train.n:
        notes.append(
            f"held-out ({held.n}) and training ({train.n}) references differ in size: FD is biased by 1/n, so the "
            "gap mixes sample size with overfitting; use equal sizes"
        )
    t0 = time.perf_counter()
    comparisons, gaps = compare_sets(gen, refs, opts, seed, notes, gap=("heldout", "train"))
    fid = fidelity(gen, held, fid_name, conditioning, opts, seed)
    mem = memorisation(
        gen.features[mem_name],
        train.features[mem_name],
        held.features[mem_name],
        equalise=opts.equalise_nn,
        n_boot=opts.n_boot,
        alpha=opts.alpha,
        seed=seed,
    ) | {"extractor": mem_name}
    timings["metrics_s"] = time.perf_counter() - t0
    if all(encoder_name(e) == conditioning for e in exts.values()):
        notes.append(f"every extractor is the conditioning encoder ({conditioning}); add another one")
    return StudyResult(
        study="overfitting",
        generator=describe_generator(generator),
        settings=study_settings(
            opts,
            n=n,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            fidelity_extractor=fid_name,
            memorisation_extractor=mem_name,
        ),
        references={r: ref.provenance | {"cache": ref.cache, "n_used": ref.n} for r, ref in refs.items()},
        generated=gen.provenance,
        extractors=extractor_info(exts, held.stats, conditioning),
        metrics={
            "comparisons": comparisons,
            "overfitting_gap": gaps,
            "overfitting_gap_note": "FD_heldout − FD_train per extractor, paired bootstrap over generated tiles; "
            "> 0: the generated tiles are closer to the training patients' tiles than to new patients'",
            "conditional_fidelity": fid,
            "memorisation": mem,
        },
        warnings=notes,
        timings_s=timings,
        samples=grid_samples(held, gen),
    )


# ------------------------------------------------------------------------------------ cytosyn eval hooks
def _check_config(cfg: EvalConfig) -> None:
    if cfg.references.heldout is None or cfg.references.train is None:
        raise ValueError("the overfitting study needs references.heldout and references.train")


def _run(ctx: StudyContext) -> list[StudyResult]:
    cfg = ctx.cfg
    assert cfg.references.heldout is not None and cfg.references.train is not None
    held = ctx.reference(cfg.references.heldout, "heldout")
    train = ctx.reference(cfg.references.train, "train")
    return [
        overfitting_study(
            ctx.generator, train, held, ctx.extractors, cfg.n,
            fidelity_extractor=cfg.fidelity_extractor,
            memorisation_extractor=cfg.memorisation_extractor,
            steps=ctx.steps, guidance_scale=ctx.guidance_scale, seed=seed, options=ctx.options,
        )
        for seed in cfg.seeds
    ]  # fmt: skip


def _headline(result: StudyResult) -> dict[str, float]:
    m = result.to_dict(strict=False)["metrics"]
    out = comparisons_headline(m)
    for ext, gap in m.get("overfitting_gap", {}).items():
        out[f"fd_gap/{ext}"] = gap["estimate"]
    out |= fidelity_headline(m)
    mem = m.get("memorisation")
    if mem:
        out["memorisation/fraction_closer_to_train"] = mem["fraction_closer_to_train"]["estimate"]
        out["memorisation/median_ratio"] = mem["ratio_quantiles"]["0.5"]
    return out


def _markdown(results: list[StudyResult]) -> str:
    r = results[0]
    out = distances_markdown(r, gap=True)
    mem = r.to_dict(strict=False)["metrics"]["memorisation"]
    q = mem["ratio_quantiles"]
    out.append(f"### Memorisation (nearest neighbours in `{mem['extractor']}`)")
    out.append("")
    out.append(
        f"Fraction of generated tiles nearer to a training tile than to any held-out tile: "
        f"{fmt_ci(mem['fraction_closer_to_train'])} (held-out tiles themselves: "
        f"{fmt(mem['heldout_baseline_fraction'])}); near-exact training copies: "
        f"{fmt(mem['near_copy_fraction'])}. Ratio d_train / d_heldout: median {fmt(q['0.5'])}, 5% "
        f"{fmt(q['0.05'])}, 95% {fmt(q['0.95'])} ({mem['n_train_candidates']} training and "
        f"{mem['n_heldout_candidates']} held-out candidates)."
    )
    out.append("")
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- plots
def overfitting_figure(result: StudyResult) -> Any:
    """Per extractor: FD of the generated tiles against held-out vs training-patient tiles (95% CI bars)."""
    m = result.to_dict(strict=False)["metrics"]
    names = list(result.extractors)
    fig = new_figure(4.4 * len(names) + 0.6, 3.8)
    for p, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), p + 1)
        cis = [m["comparisons"]["heldout"][name]["fd"], m["comparisons"]["train"][name]["fd"]]
        ax.bar(
            ["held-out patients", "training patients"],
            [c["estimate"] for c in cis],
            yerr=yerr(cis),
            capsize=6,
            color=["#1f77b4", "#ff7f0e"],
            error_kw={"elinewidth": 1.5},
        )
        ax.set_xlabel("reference tiles")
        ax.set_ylabel("Fréchet distance to generated tiles")
        gap = m["overfitting_gap"].get(name)
        ax.set_title(f"{name}\ngap (held-out − train) {fmt_ci(gap)}" if gap else name, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Slide-level overfitting: FD with 95% bootstrap CI", fontsize=10)
    fig.tight_layout()
    return fig


def memorisation_figure(result: StudyResult) -> Any:
    """Histogram of d_train / d_held-out per generated tile (< 1: nearer to a training tile)."""
    mem = result.to_dict(strict=False)["metrics"]["memorisation"]
    counts, edges = np.asarray(mem["ratio_histogram"]["counts"]), np.asarray(mem["ratio_histogram"]["edges"])
    fig = new_figure(5.2, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
    ax.axvline(1.0, color="#d62728", lw=2, label="equally near (ratio 1)")
    ax.set_xlabel(f"nearest training / nearest held-out distance ({mem['extractor']})")
    ax.set_ylabel("generated tiles")
    ax.set_title(
        f"closer to a training tile: {fmt_ci(mem['fraction_closer_to_train'])} "
        f"(held-out tiles themselves: {fmt(mem['heldout_baseline_fraction'])})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plots(result: StudyResult, folder: Path) -> dict[str, Path]:
    return {
        "overfitting_fd": save_figure(overfitting_figure(result), folder / "overfitting_fd.png"),
        "memorisation": save_figure(memorisation_figure(result), folder / "memorisation.png"),
    }


STUDY = Study(
    name="overfitting",
    run=_run,
    headline=_headline,
    markdown=_markdown,
    plots=_plots,
    check_config=_check_config,
)
