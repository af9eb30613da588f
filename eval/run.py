"""``cytosyn eval``: one config → one report folder (metrics.json, report.md, plots, resolved config).

`EvalConfig` names the study (``overfitting``, ``domain``, ``sweep`` or ``scoring``: the modules of
`cytosyn.eval.studies`, registered in ``STUDIES``), the generator — cytosyn's own
release folder or training checkpoint, a PixCell diffusers folder, or a folder of already generated
tiles — the reference splits, the extractors, the number of tiles, the seeds and the output folder.
`run_eval` builds the generator, reads every reference set once (reusing cached statistics only when
they were made with exactly these settings), runs the study once per seed through its `Study` hooks, and
writes the report through `cytosyn.eval.report.write_report`: a shared provenance header, the study's own
sections and plots, the aggregate over seeds and the reference vs generated image grid.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from cytosyn.config import StrictModel, config_hash, config_to_dict, write_resolved_config
from cytosyn.fileio import atomic_write_text

from .figures import has_random_weights, render_image_grid
from .harness import HarnessOptions, StudyResult
from .images import ImageSet
from .report import _jsonable, fmt, write_report
from .studies import AugmentConfig, ScoringStudyConfig, StudyContext, SweepConfig, get_study

__all__ = [
    "CytoSynGeneratorConfig",
    "EvalConfig",
    "FolderGeneratorConfig",
    "PixCellGeneratorConfig",
    "build_generator",
    "run_eval",
]

RESOLVED_CONFIG_FILE = "eval_config.yaml"


# ------------------------------------------------------------------------------------------- config
class CytoSynGeneratorConfig(StrictModel):
    kind: Literal["cytosyn"]
    path: Path  # a release folder (SHA256SUMS + config.json) or a training checkpoint / run folder
    format: Literal["auto", "release", "checkpoint"] = "auto"
    vae_weights: Path | None = None
    encoder_weights: Path | None = None
    dtype: str = "auto"
    steps: int | None = Field(default=None, ge=1)  # None: the release's defaults
    guidance_scale: float | None = None
    batch_size: int = Field(default=16, ge=1)


class PixCellGeneratorConfig(StrictModel):
    kind: Literal["pixcell"]
    path: Path  # the PixCell-256 diffusers folder (model_index.json, transformer/, scheduler/)
    vae_path: Path | None = None  # the SD3.5 'vae' folder (default: <path>/vae)
    encoder: str | None = None  # default uni2-h (or the tiny folder's stand-in)
    encoder_weights: Path | None = None  # local UNI2-h weights
    fov_policy: Literal["center_crop", "resample", "none"] = "center_crop"
    target_px: int = Field(default=224, ge=8)
    native_mpp: float = Field(default=0.5, gt=0)
    scheduler: Literal["dpm-solver", "ddpm", "ddim"] = "dpm-solver"
    steps: int = Field(default=20, ge=1)
    guidance_scale: float = 1.5
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(default=16, ge=1)


class FolderGeneratorConfig(StrictModel):
    kind: Literal["folder"]
    path: Path  # already generated tiles (.png/.jpg/.webp); names equal to reference keys pair them
    mpp: float = Field(gt=0)  # microns per pixel of the generated tiles (required: the FOV must be stated)


GeneratorConfig = Annotated[
    CytoSynGeneratorConfig | PixCellGeneratorConfig | FolderGeneratorConfig, Field(discriminator="kind")
]


class ReferencesConfig(StrictModel):
    heldout: Path | None = None  # split folder (manifest.json), image folder or .tar: held-out patients
    train: Path | None = None  # training patients (overfitting study)
    reference: Path | None = None  # domain / sweep reference (default: heldout)
    others: dict[str, Path] = {}  # domain / scoring studies: other real sets (name → path), e.g. new domains
    mpp: float | None = Field(default=None, gt=0)  # for image folders without tile JSON


class EvalConfig(StrictModel):
    study: Literal["overfitting", "domain", "sweep", "augment", "scoring"] = "overfitting"
    generator: GeneratorConfig | None = None  # every study but augment (which reads labelled sets) needs one
    references: ReferencesConfig = ReferencesConfig()
    extractors: list[str | dict[str, Any]] = Field(
        min_length=1
    )  # specs for cytosyn.eval.features.build_extractor
    fidelity_extractor: str | None = None  # default: the first extractor that is not the conditioning encoder
    memorisation_extractor: str | None = None  # default: the fidelity extractor
    n: int = Field(default=1000, ge=2)  # tiles per reference set = generated tiles
    seeds: list[int] = Field(default=[0], min_length=1)
    generated_codec: str | dict[str, Any] = "lossless"  # e.g. {jpeg: 90} to match a JPEG-stored reference
    sweep: SweepConfig = SweepConfig()
    augment: AugmentConfig = AugmentConfig()
    scoring: ScoringStudyConfig = ScoringStudyConfig()  # the scoring study (generative scores)
    n_boot: int = Field(default=200, ge=2)
    prdc_k: int = Field(default=5, ge=1)
    kid_subset_size: int = Field(default=1000, ge=2)
    kid_subsets: int = Field(default=100, ge=1)
    batch_size: int = Field(default=32, ge=1)  # feature extraction
    chunk_size: int = Field(default=512, ge=1)  # tiles per generate() call
    device: str = "auto"  # extractors and generator: auto, cpu, cuda, cuda:1
    max_keep_mb: float = Field(default=4096, gt=0)
    cache_dir: Path | None = None  # reference features reused across runs (refused if made differently)
    grid_images: int = Field(default=8, ge=0)
    progress: bool = True  # progress bars on stderr
    output: Path = Path("eval_out")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.generator is None and self.study != "augment":
            raise ValueError(f"the {self.study} study needs a generator")
        get_study(self.study).check_config(self)  # the study's own rules (e.g. which references it needs)
        if self.references.others and self.study not in ("domain", "scoring"):
            raise ValueError("references.others is used by the domain and scoring studies only")
        return self


# ---------------------------------------------------------------------------------------- generators
def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_generator(spec: GeneratorConfig, device: str = "cpu", limit: int | None = None) -> Any:
    """The `TileGenerator` (or, for ``kind: folder``, the `ImageSet` of its first ``limit`` tiles) a spec describes."""
    if spec.kind == "folder":
        return ImageSet.from_folder(spec.path, mpp=spec.mpp, limit=limit)
    if spec.kind == "pixcell":
        import torch

        from .pixcell import PixCellGenerator

        return PixCellGenerator(
            spec.path,
            vae_path=spec.vae_path,
            encoder=spec.encoder,
            encoder_weights=spec.encoder_weights,
            fov_policy=spec.fov_policy,
            target_px=spec.target_px,
            native_mpp=spec.native_mpp,
            steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            scheduler=spec.scheduler,
            device=device,
            dtype=getattr(torch, spec.dtype),
        )
    from cytosyn.pipeline import CytoSynPipeline  # lazily: the pipeline pulls the whole model stack

    path = Path(spec.path)
    fmt = spec.format
    if fmt == "auto":
        fmt = "release" if path.is_dir() and (path / "SHA256SUMS").is_file() else "checkpoint"
    common = {
        "device": device,
        "dtype": spec.dtype,
        "vae_weights": spec.vae_weights,
        "encoder_weights": spec.encoder_weights,
    }
    if fmt == "release":
        return CytoSynPipeline.from_pretrained(path, **common)
    return CytoSynPipeline.from_checkpoint(path, **common)


# ------------------------------------------------------------------------------------------- running
def run_eval(cfg: EvalConfig) -> Path:
    """Run the configured study for every seed and write the report folder; returns its path."""
    from .features import build_extractors

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, out / RESOLVED_CONFIG_FILE)
    device = _device(cfg.device)
    exts = build_extractors(cfg.extractors)
    gen_spec = cfg.generator
    generator = build_generator(gen_spec, device, limit=cfg.n) if gen_spec is not None else None
    opts = HarnessOptions(
        n_boot=cfg.n_boot,
        prdc_k=cfg.prdc_k,
        kid_subset_size=cfg.kid_subset_size,
        kid_subsets=cfg.kid_subsets,
        batch_size=cfg.batch_size,
        generation_batch_size=getattr(gen_spec, "batch_size", 16),
        chunk_size=cfg.chunk_size,
        generated_codec=cfg.generated_codec,
        device=device,
        max_keep_mb=cfg.max_keep_mb,
        cache_dir=cfg.cache_dir,
        keep_samples=cfg.grid_images,
        progress=cfg.progress,
    )
    ctx = StudyContext(
        cfg=cfg,
        generator=generator,
        extractors=exts,
        options=opts,
        steps=getattr(gen_spec, "steps", None),
        guidance_scale=getattr(gen_spec, "guidance_scale", None),
    )
    results = get_study(cfg.study).run(ctx)
    write_eval_report(out, cfg, results)
    return out


# -------------------------------------------------------------------------------------------- report
def aggregate(results: list[StudyResult]) -> dict[str, dict[str, Any]]:
    """Headline numbers over seeds: mean, std (ddof 1; 0 for one seed) and the per-seed values."""
    heads = [r.headline() for r in results]
    out: dict[str, dict[str, Any]] = {}
    for key in heads[0]:
        vals = np.array([h.get(key, float("nan")) for h in heads], dtype=np.float64)
        out[key] = {
            "mean": float(vals.mean()),
            # identical per-seed values (a seed-free metric) give 0, not a rounding residue such as 1e-16;
            # a NaN among them still gives NaN
            "std": float(vals.std(ddof=1)) if len(vals) > 1 and not np.all(vals == vals[0]) else 0.0,
            "per_seed": vals.tolist(),
        }
    return out


def headline_intervals(result: StudyResult) -> dict[str, Any]:
    """95% bootstrap CIs of the headline numbers that have one (FD per reference, the overfitting gap,
    conditional fidelity, the memorisation fraction), under the headline's keys."""
    m = result.to_dict(strict=False)["metrics"]
    out: dict[str, Any] = {}
    for ref, per_ext in (m.get("comparisons") or {}).items():
        for ext, vals in per_ext.items():
            out[f"fd/{ext}/{ref}"] = vals["fd"]
    for ext, gap in (m.get("overfitting_gap") or {}).items():
        out[f"fd_gap/{ext}"] = gap
    fid = m.get("conditional_fidelity") or {}
    if fid.get("estimate") is not None:
        out[f"conditional_fidelity/{fid['extractor']}"] = fid["estimate"]
    mem = m.get("memorisation")
    if mem:
        out["memorisation/fraction_closer_to_train"] = mem["fraction_closer_to_train"]
    for cell in m.get("cells") or []:
        for ext, ci in cell["fd"].items():
            out[f"fd/{ext}/steps={cell['steps']},g={cell['guidance_scale']}"] = ci
    for group, per in (m.get("separation_auc") or {}).items():  # the scoring study
        for score, ci in per.items():
            out[f"auc/{score}/{group}"] = ci
    for name, c in (m.get("classification") or {}).items():
        if c:
            out[f"balanced_accuracy/{name}"] = c["balanced_accuracy"]
            out[f"macro_f1/{name}"] = c["macro_f1"]
    if m.get("frechet"):  # the scoring study's Fréchet numbers on the same sets
        out |= headline_intervals(replace(result, metrics=m["frechet"]))
    return out


def _provenance_rows(cfg: EvalConfig, results: list[StudyResult]) -> dict[str, Any]:
    """The report's provenance table: what made these numbers (config, generator weights, data, seeds)."""
    d = results[0].to_dict(strict=False)
    gen = d["generator"]
    rows: dict[str, Any] = {
        "study": results[0].study,
        "config hash": config_hash(cfg),
        "resolved config": RESOLVED_CONFIG_FILE,
        "generator": f"{gen.get('name')} ({gen.get('kind', 'cytosyn')})",
        "generator weights sha256": gen.get("weights_sha256") or gen.get("weights") or "—",
        "generator source": gen.get("source"),
        "random weights in the generator": "YES (a test stand-in)" if has_random_weights(gen) else "no",
        "seeds": ", ".join(str(r.settings.get("seed")) for r in results),
    }
    for role, prov in d["references"].items():
        rows[f"reference {role}"] = (
            f"{prov.get('source')}: {prov.get('n_used', prov.get('count'))} tiles, codec {prov.get('codec_label')}, "
            f"dataset {str(prov.get('dataset_hash') or prov.get('keys_sha256') or '?')[:16]}"
        )
    for name, e in d["extractors"].items():
        rows[f"extractor {name}"] = f"{e['encoder']}, weights {e['metadata'].get('weights')}"
    return rows


def write_eval_report(folder: Path, cfg: EvalConfig, results: list[StudyResult]) -> dict[str, Path]:
    """Plots, then metrics.json + report.md + report.html through `write_report` (the study's sections and
    the provenance table included), then the full per-seed results into metrics.json."""
    folder = Path(folder)
    first = results[0]
    agg = aggregate(results)
    headline = {
        k: (v["mean"] if len(results) == 1 else {"mean": v["mean"], "std": v["std"]}) for k, v in agg.items()
    }
    provenance = {
        "config": config_to_dict(cfg),
        "config_hash": config_hash(cfg),
        "resolved_config_file": RESOLVED_CONFIG_FILE,
        "generator": first.generator,
        "references": first.references,
        "extractors": first.extractors,
    }
    plots = render_plots(folder, first)
    paths = write_report(
        folder,
        metrics=headline,
        provenance=provenance,
        title=f"cytosyn evaluation: {first.study} study",
        sections=[study_markdown(results, agg, plots)],
        provenance_rows=_provenance_rows(cfg, results),
        intervals=headline_intervals(first),
    )
    paths.update(plots)
    doc = json.loads((folder / "metrics.json").read_text())
    doc["study"] = first.study
    doc["seeds"] = [r.settings.get("seed") for r in results]
    doc["aggregate"] = agg
    doc["results"] = [r.to_dict() for r in results]
    doc["plots"] = {k: p.name for k, p in plots.items()}
    doc["html"] = paths["html"].name
    atomic_write_text(folder / "metrics.json", json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n")
    return paths


def _set_line(prov: dict[str, Any]) -> str:
    fov = f"{prov.get('fov_um')} µm" if prov.get("fov_um") is not None else "unknown"
    size = prov.get("image_size") or ["?", "?"]
    return (
        f"`{prov.get('source')}` ({prov.get('kind')}): {prov.get('count')} tiles, {size[0]}×{size[1]} px, codec "
        f"`{prov.get('codec_label')}`, mpp {fmt(prov['mpp']) if prov.get('mpp') else '?'}, field of view {fov}"
    )


def study_markdown(results: list[StudyResult], agg: dict[str, dict[str, Any]], plots: dict[str, Path]) -> str:
    r = results[0]
    d = r.to_dict(strict=False)
    out = [f"## {r.study.capitalize()} study", ""]
    gen = d["generator"]
    proto = gen.get("protocol", {})
    out.append(
        f"- generator: `{gen.get('name')}` ({gen.get('kind', 'cytosyn')}), conditioning encoder "
        f"`{proto.get('conditioning_encoder')}`, {proto.get('tile_px')} px at {proto.get('mpp')} mpp"
    )
    if gen.get("random_init"):
        out.append(
            "- **the generator's weights are random** (a test stand-in): its numbers say nothing about a model"
        )
    if "fov" in gen:
        f = gen["fov"]
        out.append(
            f"- field of view: policy `{f['policy']}`: native {f['native_px']} px × {f['native_mpp']} mpp = "
            f"{f['native_fov_um']} µm → compared {f['tile_px']} px × {fmt(f['mpp'])} mpp = {f['fov_um']} µm"
        )
    for role, prov in d["references"].items():
        out.append(f"- {'reference' if role == 'reference' else role + ' reference'} set: {_set_line(prov)}")
    if "source" in d["generated"]:  # one generated set (a sweep has one per cell, described in its table)
        out.append(
            f"- generated: {_set_line(d['generated'])}; seeds {[x.settings.get('seed') for x in results]}"
        )
    comparison = d["generated"].get("codec_comparison") or {}
    for role, c in comparison.items():
        steps = " → ".join(c["lossy_steps"]) or "lossless on both sides"
        out.append(
            f"- codecs vs {role}: reference `{c['reference']}`, generated `{c['generated']}` ({steps})"
        )
    s = d["settings"]
    if "n_boot" in s and d["generated"]:  # studies that compare generated tiles with references
        out.append(
            f"- bootstrap {s['n_boot']} replicates ({int((1 - s['alpha']) * 100)}% percentile CIs over generated tiles), "
            f"PRDC k = {s['prdc_k']}, KID subsets {s['kid_subsets']} × {s['kid_subset_size']}, generated codec "
            f"`{s['generated_codec_settings']['format']}`"
        )
    elif "n_boot" in s:  # studies of the reference tiles themselves (scoring's classify variant)
        out.append(
            f"- bootstrap {s['n_boot']} replicates ({int((1 - s['alpha']) * 100)}% percentile CIs over tiles)"
        )
    out.append("")
    if d["extractors"]:
        out.append("| extractor | encoder | weights | resize | conditioning encoder? |")
        out.append("|---|---|---|---|---|")
        for name, e in d["extractors"].items():
            meta = e["metadata"]
            out.append(
                f"| `{name}` | {e['encoder']} | `{meta.get('weights')}` | `{json.dumps(meta.get('resize'))}` | "
                f"{'yes' if e['is_conditioning_encoder'] else 'no'} |"
            )
        out.append("")
    out.append(get_study(r.study).markdown(results))
    if len(results) > 1:
        out.append("### Over seeds (mean ± std)")
        out.append("")
        out.append("| metric | mean ± std | per seed |")
        out.append("|---|---|---|")
        for k, v in agg.items():
            out.append(
                f"| `{k}` | {fmt(v['mean'])} ± {fmt(v['std'])} | {', '.join(fmt(x) for x in v['per_seed'])} |"
            )
        out.append("")
    for key, path in plots.items():
        out.append(f"![{key}]({path.name})")
        out.append("")
    notes = sorted({w for x in results for w in x.warnings})
    if notes:
        out.append("Warnings:")
        out.extend(f"- {w}" for w in notes)
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- plots
def render_plots(folder: Path, result: StudyResult) -> dict[str, Path]:
    """Every plot of the study into ``folder`` (its own, then the sample grid); returns name → path."""
    folder = Path(folder)
    plots = dict(get_study(result.study).plots(result, folder))
    if result.samples and any(len(v) for v in result.samples.values()):
        plots["samples"] = render_image_grid(
            result.samples,
            folder / "samples.png",
            random_weights=has_random_weights(result.generator),
            title=get_study(result.study).grid_title,
        )
    return plots
