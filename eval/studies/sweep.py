"""The sweep study: FD (and KID, conditional fidelity, time per image) over sampling steps × guidance scales.

Every cell generates from the same reference embeddings with the same seed, so differences come from the
sampler settings alone; the report draws FD against steps, one line per guidance scale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from cytosyn.config import StrictModel
from cytosyn.generation import TileGenerator

from ..features import build_extractors
from ..figures import new_figure, save_figure, yerr
from ..harness import (
    HarnessOptions,
    ReferenceFeatures,
    StudyResult,
    as_reference,
    check_before_generating,
    compare_sets,
    describe_generator,
    embed_reference,
    extractor_info,
    fidelity,
    generate_features,
    generated_provenance,
    pick_extractor,
    resolve_options,
    study_settings,
)
from ..images import ImageSet
from ..report import fmt, fmt_ci
from .base import Study, StudyContext

if TYPE_CHECKING:
    from ..run import EvalConfig

__all__ = ["STUDY", "SweepConfig", "sweep_study"]


class SweepConfig(StrictModel):
    """``EvalConfig.sweep``: the grid of sampler settings."""

    steps: list[int] = Field(default=[10, 20, 50], min_length=1)
    guidance: list[float] = Field(default=[1.0, 1.5, 2.0], min_length=1)


def sweep_study(
    generator: TileGenerator | Callable[..., TileGenerator],
    reference_set: ImageSet | ReferenceFeatures,
    extractors: Mapping[str, Any] | Iterable[Any],
    n: int | None = None,
    *,
    steps: Sequence[int] = (10, 20, 50),
    guidance: Sequence[float] = (1.0, 1.5, 2.0),
    fidelity_extractor: str | None = None,
    seed: int = 0,
    options: HarnessOptions | None = None,
    **overrides: Any,
) -> StudyResult:
    """FD (and KID, conditional fidelity, time per image) over a grid of sampling steps × guidance scales.

    ``generator`` is a `TileGenerator` (``steps``/``guidance_scale`` passed to ``generate``) or a factory
    ``f(steps=…, guidance_scale=…) → TileGenerator`` called per cell. Every cell generates from the same
    reference embeddings with the same seed, so differences come from the sampler settings alone.
    """
    opts = resolve_options(options, overrides)
    exts = build_extractors(extractors)
    if not steps or not guidance:
        raise ValueError("sweep_study needs at least one steps value and one guidance value")
    is_factory = not isinstance(generator, TileGenerator)
    first = generator(steps=steps[0], guidance_scale=guidance[0]) if is_factory else generator
    conditioning = first.conditioning_encoder
    fid_name = pick_extractor(exts, fidelity_extractor, conditioning, "conditional fidelity")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ref = as_reference(reference_set, exts, "reference", n, opts)
    timings["reference_s"] = time.perf_counter() - t0
    prov = generated_provenance(first, opts.generated_codec, ref.n, int(first.tile_px))
    codecs = check_before_generating(exts, prov, {"reference": ref})
    assert ref.image_set is not None
    keys, emb, timings["embed_s"] = embed_reference(first, ref.image_set, opts.batch_size, opts.progress)
    cells = []
    notes: list[str] = []
    samples = {"reference": ref.samples} if ref.samples is not None else {}
    for s in steps:
        for g in guidance:
            gen_model = (
                generator(steps=s, guidance_scale=g)
                if is_factory and (s, g) != (steps[0], guidance[0])
                else first
            )
            if gen_model.conditioning_encoder != conditioning:
                raise ValueError("every generator of a sweep must use the same conditioning encoder")
            gen = generate_features(
                gen_model, emb, keys, exts, steps=s, guidance_scale=g, seed=seed, options=opts
            )
            comparisons, _ = compare_sets(gen, {"reference": ref}, opts, seed, notes)
            fid = fidelity(gen, ref, fid_name, conditioning, opts, seed)
            cells.append(
                {
                    "steps": int(s),
                    "guidance_scale": float(g),
                    "fd": {name: c["fd"] for name, c in comparisons["reference"].items()},
                    "kid": {name: c["kid"] for name, c in comparisons["reference"].items()},
                    "prdc": {name: c["prdc"] for name, c in comparisons["reference"].items()},
                    "conditional_fidelity": fid,
                    "generate_s_per_image": gen.timings["generate_s_per_image"],
                    "generated": gen.provenance,
                }
            )
            if gen.samples is not None:
                samples[f"steps={s}, g={g}"] = gen.samples
    return StudyResult(
        study="sweep",
        generator=describe_generator(first) | {"factory": is_factory},
        settings=study_settings(
            opts, n=n, seed=seed, steps=list(steps), guidance=list(guidance), fidelity_extractor=fid_name
        ),
        references={"reference": ref.provenance | {"cache": ref.cache, "n_used": ref.n}},
        generated={
            "cells": len(cells),
            "per_cell": "see metrics.cells[*].generated",
            "codec_comparison": codecs,
        },
        extractors=extractor_info(exts, ref.stats, conditioning),
        metrics={"cells": cells, "steps": list(steps), "guidance": list(guidance)},
        warnings=notes,
        timings_s=timings,
        samples=samples,
    )


# ------------------------------------------------------------------------------------ cytosyn eval hooks
def _check_config(cfg: EvalConfig) -> None:
    if cfg.references.reference is None and cfg.references.heldout is None:
        raise ValueError("the sweep study needs references.reference (or references.heldout)")
    if cfg.generator.kind == "folder":
        raise ValueError("a sweep generates at each setting: generator.kind 'folder' cannot be swept")


def _run(ctx: StudyContext) -> list[StudyResult]:
    cfg = ctx.cfg
    ref_path = cfg.references.reference or cfg.references.heldout
    assert ref_path is not None
    ref = ctx.reference(ref_path, "reference")
    return [
        sweep_study(
            ctx.generator, ref, ctx.extractors, cfg.n, steps=cfg.sweep.steps, guidance=cfg.sweep.guidance,
            fidelity_extractor=cfg.fidelity_extractor, seed=seed, options=ctx.options,
        )
        for seed in cfg.seeds
    ]  # fmt: skip


def _headline(result: StudyResult) -> dict[str, float]:
    out: dict[str, float] = {}
    for cell in result.to_dict(strict=False)["metrics"].get("cells", []):
        tag = f"steps={cell['steps']},g={cell['guidance_scale']}"
        for ext, vals in cell["fd"].items():
            out[f"fd/{ext}/{tag}"] = vals["estimate"]
    return out


def _markdown(results: list[StudyResult]) -> str:
    d = results[0].to_dict(strict=False)
    m, s = d["metrics"], d["settings"]
    out = ["### FD vs sampling steps and guidance (seed " + str(s["seed"]) + ")", ""]
    names = list(d["extractors"])
    header = ["steps", "guidance", *[f"FD `{n}`" for n in names], "cond. fidelity", "s / image"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for c in m["cells"]:
        fid = c["conditional_fidelity"]
        out.append(
            "| "
            + " | ".join(
                [
                    str(c["steps"]),
                    fmt(c["guidance_scale"]),
                    *[fmt_ci(c["fd"][n]) for n in names],
                    fmt_ci(fid["estimate"]) if fid.get("estimate") else "—",
                    fmt(c["generate_s_per_image"]),
                ]
            )
            + " |"
        )
    out.append("")
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- plots
def fd_vs_steps_figure(result: StudyResult) -> Any:
    """One panel per extractor: FD (95% CI bars) against sampling steps, one line per guidance scale."""
    m = result.to_dict(strict=False)["metrics"]
    steps, guidance = m["steps"], m["guidance"]
    names = list(result.extractors)
    fig = new_figure(3.8 * len(names) + 0.6, 3.4)
    for p, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), p + 1)
        cells = {(c["steps"], c["guidance_scale"]): c["fd"][name] for c in m["cells"]}
        for g in guidance:
            cis = [cells[(s, float(g))] for s in steps]
            ax.errorbar(
                steps,
                [c["estimate"] for c in cis],
                yerr=yerr(cis),
                marker="o",
                capsize=4,
                label=f"guidance {fmt(g)}",
            )
        if len(steps) > 1 and min(steps) > 0 and max(steps) / min(steps) >= 8:
            ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(f"FD in {name}")
        ax.set_title(f"FD vs steps ({name}), 95% CI", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plots(result: StudyResult, folder: Path) -> dict[str, Path]:
    return {"fd_vs_steps": save_figure(fd_vs_steps_figure(result), folder / "fd_vs_steps.png")}


STUDY = Study(
    name="sweep",
    run=_run,
    headline=_headline,
    markdown=_markdown,
    plots=_plots,
    check_config=_check_config,
)
