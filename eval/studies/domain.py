"""The domain study: any tiles as the reference (e.g. IBD biopsies) — how well does the model cover a new domain?

Tiles are generated from the reference tiles' own embeddings and compared with them (FD with CI, KID,
PRDC, conditional fidelity); other real sets (e.g. the oncology held-out split) are compared with the
generated tiles too, and the FD between the reference and each other real set measures the domain shift.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cytosyn.generation import TileGenerator

from ..features import build_extractors
from ..harness import (
    FD_IGNORE,
    HarnessOptions,
    ReferenceFeatures,
    StudyResult,
    as_reference,
    compare_sets,
    describe_generator,
    extractor_info,
    fidelity,
    generate_or_read,
    grid_samples,
    pick_extractor,
    resolve_options,
    study_settings,
)
from ..images import ImageSet
from ..report import fmt
from ..stats import frechet_distance
from .base import Study, StudyContext
from .common import comparisons_headline, distances_markdown, fidelity_headline

if TYPE_CHECKING:
    from ..run import EvalConfig

__all__ = ["STUDY", "domain_study"]


def domain_study(
    generator: TileGenerator | ImageSet,
    reference_set: ImageSet | ReferenceFeatures,
    extractors: Mapping[str, Any] | Iterable[Any],
    n: int | None = None,
    *,
    other_sets: Mapping[str, ImageSet | ReferenceFeatures] | None = None,
    fidelity_extractor: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    options: HarnessOptions | None = None,
    **overrides: Any,
) -> StudyResult:
    """Any tiles as the reference (e.g. IBD biopsies): generate from their embeddings and compare with them.

    Same metrics as the overfitting study against ``reference_set`` (FD with CI, KID, PRDC, conditional
    fidelity). ``other_sets`` (name → set, e.g. the oncology held-out split) are also compared with the
    generated tiles, and the FD between the reference and each other set (real vs real) is reported as
    the size of the domain shift.
    """
    opts = resolve_options(options, overrides)
    exts = build_extractors(extractors)
    conditioning = None if isinstance(generator, ImageSet) else generator.conditioning_encoder
    fid_name = pick_extractor(exts, fidelity_extractor, conditioning, "conditional fidelity")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ref = as_reference(reference_set, exts, "reference", n, opts)
    refs = {"reference": ref}
    for name, other in (other_sets or {}).items():
        if name == "reference":
            raise ValueError("'reference' is reserved for the domain's own reference set")
        refs[name] = as_reference(other, exts, name, n, opts)
    timings["reference_s"] = time.perf_counter() - t0
    gen = generate_or_read(
        generator,
        ref,
        exts,
        refs,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        opts=opts,
        timings=timings,
    )
    notes: list[str] = []
    t0 = time.perf_counter()
    comparisons, _ = compare_sets(gen, refs, opts, seed, notes)
    shift = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for other in refs:
            if other == "reference":
                continue
            shift[other] = {
                name: frechet_distance(ref.stats[name], refs[other].stats[name], ignore=FD_IGNORE)
                for name in exts
            }
    fid = fidelity(gen, ref, fid_name, conditioning, opts, seed)
    timings["metrics_s"] = time.perf_counter() - t0
    return StudyResult(
        study="domain",
        generator=describe_generator(generator),
        settings=study_settings(
            opts, n=n, seed=seed, steps=steps, guidance_scale=guidance_scale, fidelity_extractor=fid_name
        ),
        references={r: x.provenance | {"cache": x.cache, "n_used": x.n} for r, x in refs.items()},
        generated=gen.provenance,
        extractors=extractor_info(exts, ref.stats, conditioning),
        metrics={
            "comparisons": comparisons,
            "domain_shift_fd": shift,
            "domain_shift_note": "FD between the real reference tiles and each other real set (no generation)",
            "conditional_fidelity": fid,
        },
        warnings=notes,
        timings_s=timings,
        samples=grid_samples(ref, gen),
    )


# ------------------------------------------------------------------------------------ cytosyn eval hooks
def _check_config(cfg: EvalConfig) -> None:
    if cfg.references.reference is None and cfg.references.heldout is None:
        raise ValueError("the domain study needs references.reference (or references.heldout)")


def _run(ctx: StudyContext) -> list[StudyResult]:
    cfg = ctx.cfg
    ref_path = cfg.references.reference or cfg.references.heldout
    assert ref_path is not None
    ref = ctx.reference(ref_path, "reference")
    others = {name: ctx.reference(p, name) for name, p in cfg.references.others.items()}
    return [
        domain_study(
            ctx.generator, ref, ctx.extractors, cfg.n, other_sets=others,
            fidelity_extractor=cfg.fidelity_extractor,
            steps=ctx.steps, guidance_scale=ctx.guidance_scale, seed=seed, options=ctx.options,
        )
        for seed in cfg.seeds
    ]  # fmt: skip


def _headline(result: StudyResult) -> dict[str, float]:
    m = result.to_dict(strict=False)["metrics"]
    return comparisons_headline(m) | fidelity_headline(m)


def _markdown(results: list[StudyResult]) -> str:
    r = results[0]
    out = distances_markdown(r, gap=False)
    m = r.to_dict(strict=False)["metrics"]
    if m.get("domain_shift_fd"):
        out.append("Domain shift (FD between real sets): " + "; ".join(
            f"reference vs {o}: " + ", ".join(f"`{k}` {fmt(v)}" for k, v in per.items())
            for o, per in m["domain_shift_fd"].items()
        ) + ".")  # fmt: skip
        out.append("")
    return "\n".join(out)


def _plots(result: StudyResult, folder: Path) -> dict[str, Path]:
    return {}


STUDY = Study(
    name="domain",
    run=_run,
    headline=_headline,
    markdown=_markdown,
    plots=_plots,
    check_config=_check_config,
)
