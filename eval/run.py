"""``cytosyn eval``: one config → one report folder (metrics.json, report.md, plots, resolved config).

`EvalConfig` names the study (``overfitting``, ``domain`` or ``sweep``), the generator — cytosyn's own
release folder or training checkpoint, a PixCell diffusers folder, or a folder of already generated
tiles — the reference splits, the extractors, the number of tiles, the seeds and the output folder.
`run_eval` builds the generator, reads every reference set once (reusing cached statistics only when
they were made with exactly these settings), runs the study once per seed, and writes the report through
`cytosyn.eval.report.write_report` plus the study's own sections and plots (drawn with PIL: FD vs steps,
overfitting bars, the memorisation histogram, reference vs generated image grids).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field, model_validator

from cytosyn.config import StrictModel, config_hash, config_to_dict, write_resolved_config
from cytosyn.fileio import atomic_write_text

from .harness import (
    HarnessOptions,
    StudyResult,
    domain_study,
    overfitting_study,
    prepare_reference,
    sweep_study,
)
from .images import ImageSet
from .report import _colour, _fmt, _font, _jsonable, write_report

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
    others: dict[str, Path] = {}  # domain study: other real sets to compare with (name → path)
    mpp: float | None = Field(default=None, gt=0)  # for image folders without tile JSON


class SweepConfig(StrictModel):
    steps: list[int] = Field(default=[10, 20, 50], min_length=1)
    guidance: list[float] = Field(default=[1.0, 1.5, 2.0], min_length=1)


class EvalConfig(StrictModel):
    study: Literal["overfitting", "domain", "sweep"] = "overfitting"
    generator: GeneratorConfig
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
    output: Path = Path("eval_out")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        refs = self.references
        if self.study == "overfitting" and (refs.heldout is None or refs.train is None):
            raise ValueError("the overfitting study needs references.heldout and references.train")
        if self.study in ("domain", "sweep") and refs.reference is None and refs.heldout is None:
            raise ValueError(f"the {self.study} study needs references.reference (or references.heldout)")
        if self.study == "sweep" and self.generator.kind == "folder":
            raise ValueError("a sweep generates at each setting: generator.kind 'folder' cannot be swept")
        if refs.others and self.study != "domain":
            raise ValueError("references.others is used by the domain study only")
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
def _open(path: Path, mpp: float | None, limit: int) -> ImageSet:
    return ImageSet.open(path, limit=limit, mpp=mpp)


def run_eval(cfg: EvalConfig) -> Path:
    """Run the configured study for every seed and write the report folder; returns its path."""
    from .features import build_extractors

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, out / RESOLVED_CONFIG_FILE)
    device = _device(cfg.device)
    exts = build_extractors(cfg.extractors)
    gen_spec = cfg.generator
    generator = build_generator(gen_spec, device, limit=cfg.n)
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
    )
    refs_cfg = cfg.references
    steps = getattr(gen_spec, "steps", None)
    guidance = getattr(gen_spec, "guidance_scale", None)
    results: list[StudyResult] = []
    if cfg.study == "overfitting":
        assert refs_cfg.heldout is not None and refs_cfg.train is not None
        held = prepare_reference(
            _open(refs_cfg.heldout, refs_cfg.mpp, cfg.n), exts, role="heldout", options=opts
        )
        train = prepare_reference(
            _open(refs_cfg.train, refs_cfg.mpp, cfg.n), exts, role="train", options=opts
        )
        for seed in cfg.seeds:
            results.append(
                overfitting_study(
                    generator, train, held, exts, cfg.n,
                    fidelity_extractor=cfg.fidelity_extractor,
                    memorisation_extractor=cfg.memorisation_extractor,
                    steps=steps, guidance_scale=guidance, seed=seed, options=opts,
                )
            )  # fmt: skip
    else:
        ref_path = refs_cfg.reference or refs_cfg.heldout
        assert ref_path is not None
        ref = prepare_reference(_open(ref_path, refs_cfg.mpp, cfg.n), exts, role="reference", options=opts)
        if cfg.study == "domain":
            others = {
                name: prepare_reference(_open(p, refs_cfg.mpp, cfg.n), exts, role=name, options=opts)
                for name, p in refs_cfg.others.items()
            }
            for seed in cfg.seeds:
                results.append(
                    domain_study(
                        generator, ref, exts, cfg.n, other_sets=others,
                        fidelity_extractor=cfg.fidelity_extractor,
                        steps=steps, guidance_scale=guidance, seed=seed, options=opts,
                    )
                )  # fmt: skip
        else:
            for seed in cfg.seeds:
                results.append(
                    sweep_study(
                        generator, ref, exts, cfg.n, steps=cfg.sweep.steps, guidance=cfg.sweep.guidance,
                        fidelity_extractor=cfg.fidelity_extractor, seed=seed, options=opts,
                    )
                )  # fmt: skip
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
            "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            "per_seed": vals.tolist(),
        }
    return out


def write_eval_report(folder: Path, cfg: EvalConfig, results: list[StudyResult]) -> dict[str, Path]:
    """metrics.json + report.md through `write_report`, then the study's sections, plots and full results."""
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
    paths = write_report(
        folder, metrics=headline, provenance=provenance, title=f"cytosyn evaluation: {first.study} study"
    )
    plots = render_plots(folder, first)
    paths.update(plots)
    doc = json.loads((folder / "metrics.json").read_text())
    doc["study"] = first.study
    doc["seeds"] = [r.settings.get("seed") for r in results]
    doc["aggregate"] = agg
    doc["results"] = [r.to_dict() for r in results]
    doc["plots"] = {k: p.name for k, p in plots.items()}
    atomic_write_text(folder / "metrics.json", json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n")
    md = (folder / "report.md").read_text()
    md += "\n" + study_markdown(results, agg, plots) + "\n"
    paths["report"] = atomic_write_text(folder / "report.md", md)
    return paths


def _ci(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, dict):
        est, lo, hi = v.get("estimate"), v.get("low"), v.get("high")
    else:
        est, lo, hi = v
    return f"{_fmt(est)} [{_fmt(lo)}, {_fmt(hi)}]"


def _set_line(prov: dict[str, Any]) -> str:
    fov = f"{prov.get('fov_um')} µm" if prov.get("fov_um") is not None else "unknown"
    size = prov.get("image_size") or ["?", "?"]
    return (
        f"`{prov.get('source')}` ({prov.get('kind')}): {prov.get('count')} tiles, {size[0]}×{size[1]} px, codec "
        f"`{prov.get('codec_label')}`, mpp {_fmt(prov['mpp']) if prov.get('mpp') else '?'}, field of view {fov}"
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
            f"{f['native_fov_um']} µm → compared {f['tile_px']} px × {_fmt(f['mpp'])} mpp = {f['fov_um']} µm"
        )
    for role, prov in d["references"].items():
        out.append(f"- {'reference' if role == 'reference' else role + ' reference'} set: {_set_line(prov)}")
    if r.study != "sweep":
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
    out.append(
        f"- bootstrap {s['n_boot']} replicates ({int((1 - s['alpha']) * 100)}% percentile CIs over generated tiles), "
        f"PRDC k = {s['prdc_k']}, KID subsets {s['kid_subsets']} × {s['kid_subset_size']}, generated codec "
        f"`{s['generated_codec_settings']['format']}`"
    )
    out.append("")
    out.append("| extractor | encoder | weights | resize | conditioning encoder? |")
    out.append("|---|---|---|---|---|")
    for name, e in d["extractors"].items():
        meta = e["metadata"]
        out.append(
            f"| `{name}` | {e['encoder']} | `{meta.get('weights')}` | `{json.dumps(meta.get('resize'))}` | "
            f"{'yes' if e['is_conditioning_encoder'] else 'no'} |"
        )
    out.append("")
    m = d["metrics"]
    if r.study in ("overfitting", "domain"):
        roles = list(m["comparisons"])
        out.append("### Distances (seed " + str(s["seed"]) + ")")
        out.append("")
        header = ["extractor", "metric", *roles]
        if r.study == "overfitting":
            header.append("gap (held-out − train)")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for name in d["extractors"]:
            rows = {
                "FD [95% CI]": [_ci(m["comparisons"][x][name]["fd"]) for x in roles],
                "KID ×10³": [_fmt(1e3 * m["comparisons"][x][name]["kid"]["mean"]) for x in roles],
            }
            for k in ("precision", "recall", "density", "coverage"):
                rows[k] = [
                    _fmt(m["comparisons"][x][name]["prdc"][k]) if m["comparisons"][x][name]["prdc"] else "—"
                    for x in roles
                ]
            for metric, vals in rows.items():
                extra = []
                if r.study == "overfitting":
                    extra = [_ci(m["overfitting_gap"].get(name)) if metric.startswith("FD") else ""]
                out.append("| " + " | ".join([f"`{name}`", metric, *vals, *extra]) + " |")
        out.append("")
        fid = m["conditional_fidelity"]
        if fid.get("estimate") is not None:
            out.append(
                f"Conditional fidelity in `{fid['extractor']}` (conditioning encoder `{fid['conditioning_encoder']}`): "
                f"{_ci(fid['estimate'])} over {fid['n_pairs']} pairs; unpaired baseline {_fmt(fid['unpaired_baseline'])}."
            )
        else:
            out.append(f"Conditional fidelity: not computed ({fid.get('note')}).")
        out.append("")
        if r.study == "overfitting":
            mem = m["memorisation"]
            q = mem["ratio_quantiles"]
            out.append(f"### Memorisation (nearest neighbours in `{mem['extractor']}`)")
            out.append("")
            out.append(
                f"Fraction of generated tiles nearer to a training tile than to any held-out tile: "
                f"{_ci(mem['fraction_closer_to_train'])} (held-out tiles themselves: "
                f"{_fmt(mem['heldout_baseline_fraction'])}); near-exact training copies: "
                f"{_fmt(mem['near_copy_fraction'])}. Ratio d_train / d_heldout: median {_fmt(q['0.5'])}, 5% "
                f"{_fmt(q['0.05'])}, 95% {_fmt(q['0.95'])} ({mem['n_train_candidates']} training and "
                f"{mem['n_heldout_candidates']} held-out candidates)."
            )
            out.append("")
        if r.study == "domain" and m.get("domain_shift_fd"):
            out.append("Domain shift (FD between real sets): " + "; ".join(
                f"reference vs {o}: " + ", ".join(f"`{k}` {_fmt(v)}" for k, v in per.items())
                for o, per in m["domain_shift_fd"].items()
            ) + ".")  # fmt: skip
            out.append("")
    else:
        out.append("### FD vs sampling steps and guidance (seed " + str(s["seed"]) + ")")
        out.append("")
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
                        _fmt(c["guidance_scale"]),
                        *[_ci(c["fd"][n]) for n in names],
                        _ci(fid["estimate"]) if fid.get("estimate") else "—",
                        _fmt(c["generate_s_per_image"]),
                    ]
                )
                + " |"
            )
        out.append("")
    if len(results) > 1:
        out.append("### Over seeds (mean ± std)")
        out.append("")
        out.append("| metric | mean ± std | per seed |")
        out.append("|---|---|---|")
        for k, v in agg.items():
            out.append(
                f"| `{k}` | {_fmt(v['mean'])} ± {_fmt(v['std'])} | {', '.join(_fmt(x) for x in v['per_seed'])} |"
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
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _nice_range(values: list[float], include_zero: bool = True) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if include_zero:
        lo = min(0.0, lo)
    else:
        pad = 0.08 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 1.0
        lo, hi = lo - pad, hi + pad
    return lo, hi if hi > lo else lo + 1.0


def _axes(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], lo: float, hi: float) -> None:
    x0, y0, x1, y1 = box
    font = _font(11)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = y1 - (y1 - y0) * i / 4
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.line([(x0 + 1, y), (x1, y)], fill=(230, 230, 230))
        draw.text((x0 - 48, y - 6), _fmt(v), fill="black", font=font)


def render_fd_vs_steps(result: StudyResult, path: Path, panel: tuple[int, int] = (420, 300)) -> Path:
    """One panel per extractor: FD (with CI whiskers) against steps, one line per guidance scale."""
    m = result.to_dict(strict=False)["metrics"]
    steps, guidance = m["steps"], m["guidance"]
    names = list(result.extractors)
    pw, ph = panel
    img = Image.new("RGB", (pw * len(names), ph + 40), "white")
    draw = ImageDraw.Draw(img)
    for p, name in enumerate(names):
        cells = {(c["steps"], c["guidance_scale"]): c["fd"][name] for c in m["cells"]}
        vals = [v for c in cells.values() for v in (c["low"], c["estimate"], c["high"])]
        lo, hi = _nice_range(vals, include_zero=False)
        ox = p * pw
        box = (ox + 60, 40, ox + pw - 20, ph - 30)
        draw.text((ox + 60, 8), f"FD in {name} vs sampling steps", fill="black", font=_font(14))
        _axes(draw, box, lo, hi)
        y1 = box[3]

        def xy(i: int, v: float, box=box, lo=lo, hi=hi) -> tuple[float, float]:
            bx0, by0, bx1, by1 = box
            x = bx0 + (bx1 - bx0) * (i + 0.5) / len(steps)
            return x, by1 - (by1 - by0) * (v - lo) / (hi - lo)

        for i, s in enumerate(steps):
            x, _ = xy(i, lo)
            draw.text((x - 8, y1 + 6), str(s), fill="black", font=_font(11))
        for gi, g in enumerate(guidance):
            colour = _PALETTE[gi % len(_PALETTE)]
            pts = []
            for i, s in enumerate(steps):
                c = cells[(s, float(g))]
                x, y = xy(i, c["estimate"])
                _, ylo = xy(i, c["low"])
                _, yhi = xy(i, c["high"])
                draw.line([(x, ylo), (x, yhi)], fill=colour, width=1)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
                pts.append((x, y))
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            draw.text((ox + 60 + 90 * gi, 24), f"guidance {_fmt(g)}", fill=colour, font=_font(11))
        draw.text((ox + pw // 2 - 20, ph + 2), "steps", fill="black", font=_font(12))
    img.save(path, format="PNG")
    return path


def render_overfitting_bars(result: StudyResult, path: Path, panel: tuple[int, int] = (300, 300)) -> Path:
    """Per extractor: FD against held-out vs against training tiles (CI whiskers), with the gap."""
    m = result.to_dict(strict=False)["metrics"]
    names = list(result.extractors)
    pw, ph = panel
    img = Image.new("RGB", (pw * len(names), ph + 30), "white")
    draw = ImageDraw.Draw(img)
    for p, name in enumerate(names):
        held = m["comparisons"]["heldout"][name]["fd"]
        train = m["comparisons"]["train"][name]["fd"]
        lo, hi = _nice_range([held["high"], train["high"], held["estimate"], train["estimate"]])
        ox = p * pw
        box = (ox + 60, 40, ox + pw - 20, ph - 30)
        draw.text((ox + 60, 8), f"FD in {name}", fill="black", font=_font(14))
        _axes(draw, box, lo, hi)
        x0, y0, x1, y1 = box
        for i, (label, fd, colour) in enumerate(
            [("held-out", held, _PALETTE[0]), ("train", train, _PALETTE[1])]
        ):
            bx = x0 + (x1 - x0) * (0.15 + 0.45 * i)
            bw = (x1 - x0) * 0.3

            def y(v: float, y0=y0, y1=y1, lo=lo, hi=hi) -> float:
                return y1 - (y1 - y0) * (v - lo) / (hi - lo)

            draw.rectangle([bx, y(fd["estimate"]), bx + bw, y1], fill=colour)
            cx = bx + bw / 2
            draw.line([(cx, y(fd["low"])), (cx, y(fd["high"]))], fill="black", width=2)
            draw.text((bx, y1 + 6), label, fill="black", font=_font(11))
        gap = m["overfitting_gap"].get(name)
        if gap:
            draw.text((ox + 60, 24), f"gap {_ci(gap)}", fill=(90, 90, 90), font=_font(11))
    img.save(path, format="PNG")
    return path


def render_memorisation(result: StudyResult, path: Path, size: tuple[int, int] = (460, 300)) -> Path:
    """Histogram of d_train / d_heldout per generated tile (< 1: nearer to a training tile)."""
    mem = result.to_dict(strict=False)["metrics"]["memorisation"]
    hist = mem["ratio_histogram"]
    counts, edges = hist["counts"], hist["edges"]
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text(
        (60, 8),
        f"nearest train / nearest held-out distance ({mem['extractor']})",
        fill="black",
        font=_font(13),
    )
    box = (60, 40, w - 20, h - 40)
    top = max(counts) if counts and max(counts) > 0 else 1
    _axes(draw, box, 0.0, float(top))
    x0, y0, x1, y1 = box
    nb = len(counts)
    for i, c in enumerate(counts):
        bx = x0 + (x1 - x0) * i / nb
        colour = _colour(i / max(nb - 1, 1))
        draw.rectangle([bx + 1, y1 - (y1 - y0) * c / top, bx + (x1 - x0) / nb - 1, y1], fill=colour)
    xone = x0 + (x1 - x0) * (1.0 - edges[0]) / (edges[-1] - edges[0])
    draw.line([(xone, y0), (xone, y1)], fill=(214, 39, 40), width=2)
    for v in (0.0, 0.5, 1.0, 1.5, 2.0):
        x = x0 + (x1 - x0) * v / 2.0
        draw.text((x - 8, y1 + 6), _fmt(v), fill="black", font=_font(11))
    draw.text(
        (60, h - 18),
        f"closer to train: {_ci(mem['fraction_closer_to_train'])} (held-out baseline {_fmt(mem['heldout_baseline_fraction'])})",
        fill="black",
        font=_font(11),
    )
    img.save(path, format="PNG")
    return path


def render_image_grid(rows: dict[str, np.ndarray], path: Path, cell: int = 112, max_cols: int = 8) -> Path:
    """Rows of tiles (label → uint8 N×H×W×3), e.g. references above the tiles generated from them."""
    rows = {k: v for k, v in rows.items() if v is not None and len(v)}
    cols = min(max_cols, max(len(v) for v in rows.values()))
    label_w, pad = 150, 4
    img = Image.new("RGB", (label_w + cols * (cell + pad), len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    for r, (label, tiles) in enumerate(rows.items()):
        y = pad + r * (cell + pad)
        draw.text((6, y + cell // 2 - 8), label, fill="black", font=_font(12))
        for c, tile in enumerate(tiles[:cols]):
            thumb = Image.fromarray(np.asarray(tile)).resize((cell, cell), Image.Resampling.BOX)
            img.paste(thumb, (label_w + c * (cell + pad), y))
    img.save(path, format="PNG")
    return path


def render_plots(folder: Path, result: StudyResult) -> dict[str, Path]:
    """Every plot of the study into ``folder``; returns name → path."""
    folder = Path(folder)
    plots: dict[str, Path] = {}
    if result.study == "sweep":
        plots["fd_vs_steps"] = render_fd_vs_steps(result, folder / "fd_vs_steps.png")
    if result.study == "overfitting":
        plots["overfitting_fd"] = render_overfitting_bars(result, folder / "overfitting_fd.png")
        plots["memorisation"] = render_memorisation(result, folder / "memorisation.png")
    if result.samples and any(len(v) for v in result.samples.values()):
        plots["samples"] = render_image_grid(result.samples, folder / "samples.png")
    return plots
