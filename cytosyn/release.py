"""``cytosyn release``: a training checkpoint → a release folder a stranger can load without our pickles.

Release folder (DESIGN.md "Release folder"): a diffusers pipeline folder (see
:mod:`cytosyn.diffusers_pipeline` for the layout) plus

    config.json         SiT config, latent channels/size/statistics, tile px and mpp, sampler defaults,
                        conditioning encoder id + preprocessing, VAE id + weights hash, training summary,
                        data summary, evaluation metrics (when an eval report is given)
    README.md           the model card: hub metadata (licence, pipeline tag, base model, datasets,
                        model-index), data, training settings, eval table with CIs and provenance,
                        intended use, limitations, components and their licences
    SHA256SUMS          sha256 of every file (``sha256sum -c SHA256SUMS`` checks them too)

The EMA SiT weights (``model.*``, REPA projector dropped) and latent-norm buffers (``latent_norm.*``)
are in ``transformer/diffusion_pytorch_model.safetensors`` (fp32, no pickles).

:meth:`cytosyn.pipeline.CytoSynPipeline.from_pretrained` verifies every hash before reading anything and
builds the model from exactly the ``(config, state)`` pair :meth:`~cytosyn.pipeline.CytoSynPipeline.from_checkpoint`
builds, so a release samples bit for bit like its checkpoint (same seed, same device).

The folder is written under a temporary name next to ``output`` and renamed when complete: a killed
release never leaves a half-written folder under the final name. The content is deterministic (no
timestamps): releasing the same checkpoint twice gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cytosyn.config import StrictModel
from cytosyn.fileio import code_version, sha256_file
from cytosyn.model_files import (
    CONFIG_FILE,
    MODEL_FILE,
    MODEL_INDEX_FILE,
    README_FILE,
    SUMS_FILE,
    PipelineError,
    find_checkpoint,
    load_training_checkpoint,
    parts_from_checkpoint,
    read_sums,
    write_release_files,
)
from cytosyn.pipeline import CytoSynPipeline, resolve_sampler

log = logging.getLogger(__name__)


class ReleaseError(PipelineError):
    """A release that cannot be made; the message says why and how to fix it."""


class ReleaseConfig(StrictModel):
    """Settings of ``cytosyn release`` (``cytosyn release --config release.yaml checkpoint=... output=...``)."""

    # a .ckpt file, a run folder (→ checkpoints/last.ckpt) or a DeepSpeed checkpoint folder
    checkpoint: Path = Path("runs/cytosyn")
    output: Path = Path("release")
    eval_report: Path | None = None  # an eval report folder (metrics.json) or the metrics.json file
    train_split: Path | None = None  # the featurized training split, when the checkpoint's path moved
    weights: Literal["ema", "raw"] = "ema"
    name: str | None = None  # model name (default: the training run folder's name)
    conditional_sampler: str = "cytosyn_default"  # sampler preset stored as the conditional default
    unconditional_sampler: str = "unconditional_default"
    guidance_scale: float | None = None  # replaces the conditional preset's guidance scale
    mpp: float | None = None  # tile mpp when the training data cannot be read (else read from it)
    bundle_vae: bool = False  # save the autoencoder under vae/ (needs its weights: vae_weights)
    vae_weights: Path | None = None  # local weights of the VAE (to bundle it; must match the recorded hash)
    # hub metadata of the model card (README.md's YAML header)
    license: str = "other"  # an SPDX id of the weights' licence, or "other" with license_name
    license_name: str = "unspecified"  # used when license is "other": name it before publishing
    license_link: str | None = None
    base_model: str | None = None  # the hub id this model was fine-tuned from, if any
    datasets: list[str] = []  # hub dataset ids of the training data, if any
    overwrite: bool = False


@dataclass
class ReleaseSummary:
    folder: Path
    checkpoint: Path
    files: dict[str, str] = field(default_factory=dict)  # name → sha256
    data_summary_available: bool = False
    eval_included: bool = False
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"release written to {self.folder} (from {self.checkpoint})"]
        lines += [f"  {digest}  {name}" for name, digest in sorted(self.files.items())]
        lines.append(
            f"  data summary: {'yes' if self.data_summary_available else 'no (training split unreadable)'}"
        )
        lines.append(f"  evaluation table: {'yes' if self.eval_included else 'no eval report given'}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Training data and evaluation summaries
# --------------------------------------------------------------------------------------------------------


def summarize_training_data(split_dir: Path, condition_member: str | None = None) -> dict[str, Any]:
    """Counts per project, tile geometry (from the first sample's JSON) and the conditioning member's
    recorded preprocessing, from a featurized split's manifest. Raises when unreadable."""
    from cytosyn.manifest import read_manifest
    from cytosyn.shardio import iter_shard_samples

    manifest = read_manifest(split_dir)
    stats = manifest.stats if isinstance(manifest.stats, dict) else {}
    summary: dict[str, Any] = {
        "split": manifest.split,
        "path": str(split_dir),
        "samples": manifest.samples,
        "shards": len(manifest.shards),
        "patients": len(manifest.patients),
        "slides": len(manifest.slides),
        "image_member": manifest.image_member,
        "tiles_per_project": stats.get("tiles_per_project", {}),
        "slides_per_project": stats.get("slides_per_project", {}),
        "patients_per_project": stats.get("patients_per_project", {}),
        "tss": len(stats.get("tiles_per_tss", {}) or {}),
        "sampling": {k: v for k, v in (stats.get("sampling") or {}).items() if k != "tss"},
        "manifest_code_version": manifest.code_version,
    }
    if condition_member:
        for feat in manifest.features:
            if feat.member == condition_member:
                details = dict(feat.details)
                summary["conditioning_feature"] = {
                    "member": feat.member,
                    "model_id": feat.model_id,
                    "weights_sha256": feat.weights_sha256,
                    "preprocessing": {
                        k: details.get(k)
                        for k in ("input_size", "mean", "std", "resize", "num_prefix_tokens")
                    },
                }
    first = Path(split_dir) / manifest.shards[0].name if manifest.shards else None
    if first is not None and first.is_file():
        for (key, members), _ in iter_shard_samples(first):
            meta = json.loads(dict(members).get("json", b"{}"))
            summary["tile"] = {
                "px": meta.get("tile_px"),
                "mpp": meta.get("mpp"),
                "codec": meta.get("codec"),
                "resample": meta.get("resample"),
                "from_sample": key,
            }
            break
    return summary


def read_eval_report(path: Path) -> dict[str, Any]:
    """``metrics.json`` of an eval report (the folder or the file) → {title, sha256, metrics, provenance}."""
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise ReleaseError(f"eval report {path}: no metrics.json there (pass the report folder or the file)")
    try:
        doc = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ReleaseError(f"eval report {file} is not valid JSON: {err}") from None
    metrics = doc.get("metrics") if isinstance(doc, dict) else None
    if not isinstance(metrics, dict):
        raise ReleaseError(f"eval report {file} has no 'metrics' mapping")
    return {
        "file": file.name,
        "sha256": sha256_file(file),
        "format": doc.get("format"),
        "title": doc.get("title"),
        "created": doc.get("created"),
        "metrics": metrics,
        "intervals": _eval_intervals(doc),
        "provenance": _eval_provenance(doc),
        "jpeg_study": bool(doc.get("jpeg_study")),
    }


def _eval_intervals(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """metric → {estimate, low, high}: the 95% bootstrap CIs an eval report records (``intervals``)."""
    intervals = doc.get("intervals") or {}
    return {
        k: v for k, v in intervals.items() if isinstance(v, dict) and {"estimate", "low", "high"} <= set(v)
    }


def _eval_provenance(doc: dict[str, Any]) -> dict[str, Any]:
    """What an eval report's numbers were measured on: study, seeds, references, extractors, versions."""
    prov = doc.get("provenance") or {}
    refs = prov.get("references") or {}
    return {
        "study": doc.get("study"),
        "seeds": doc.get("seeds"),
        "config_hash": prov.get("config_hash"),
        "code_version": (doc.get("environment") or {}).get("cytosyn_code_version"),
        "references": {
            role: f"{r.get('source')} ({r.get('n_used', r.get('count'))} tiles, {r.get('codec_label')}, "
            f"{r.get('fov_um')} µm)"
            for role, r in refs.items()
            if isinstance(r, dict)
        },
        "extractors": {
            name: (e.get("metadata") or {}).get("weights")
            for name, e in (prov.get("extractors") or {}).items()
            if isinstance(e, dict)
        },
    }


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, dict):
        if {"estimate", "low", "high"} <= set(value):
            return f"{_fmt(value['estimate'])} [{_fmt(value['low'])}, {_fmt(value['high'])}]"
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


# --------------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------------


def render_model_card(config: dict[str, Any]) -> str:
    """README.md of a release, from its config.json content (data and eval sections when present)."""
    sit = config.get("sit", {})
    cond = config.get("conditioning") or {}
    vae = config.get("vae") or {}
    tile = config.get("tile") or {}
    latent = config.get("latent") or {}
    training = config.get("training") or {}
    train_cfg = training.get("config") or {}
    data = config.get("data")
    evaluation = config.get("evaluation")
    samplers = config.get("sampler") or {}
    name = config.get("name", "cytosyn model")
    lines = [*_hub_metadata(config), ""]
    lines += [
        f"# {name}",
        "",
        f"A cytosyn latent-diffusion model for H&E tiles: a {sit.get('preset') or 'SiT'} denoiser "
        f"({sit.get('depth')} blocks, width {sit.get('hidden_size')}, patch {sit.get('patch_size')}) on "
        f"{latent.get('channels')}×{latent.get('size')}×{latent.get('size')} latents of the "
        f"`{vae.get('name')}` VAE, generating {tile.get('px')}×{tile.get('px')} px tiles at "
        f"{tile.get('mpp') if tile.get('mpp') is not None else 'unknown'} µm/px"
        + (
            f" ({tile['px'] * tile['mpp']:.0f} µm field of view)"
            if tile.get("px") and tile.get("mpp")
            else ""
        )
        + ".",
        "",
    ]
    if cond:
        lines += [
            f"Conditioned on the `{cond.get('output', 'cls')}` embedding ({cond.get('embed_dim')}-d) of the "
            f"`{cond.get('encoder')}` encoder; a learned null embedding gives unconditional samples and "
            "classifier-free guidance.",
            "",
        ]
    lines += [
        "## Usage",
        "",
        "This folder is a diffusers pipeline (`pip install cytosyn`, which brings diffusers):",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", custom_pipeline="path/to/this/folder",',
        "                                         trust_remote_code=True)  # pipeline.py only imports cytosyn",
        "images = pipe(embeddings, seed=0).images                   # PIL tiles, one per embedding row",
        "images = pipe(tiles=reference_uint8_tiles, seed=0).images  # more like these",
        "images = pipe(num_images=16, seed=0).images                # unconditional",
        "```",
        "",
        "or, without remote code, `from cytosyn.diffusers_pipeline import CytoSynDiffusionPipeline` and "
        "`CytoSynDiffusionPipeline.from_pretrained(folder)`; or cytosyn's own API (the same samples, bit for bit):",
        "",
        "```python",
        "from cytosyn.pipeline import CytoSynPipeline",
        "",
        'pipe = CytoSynPipeline.from_pretrained("path/to/this/folder")  # checks SHA256SUMS',
        "tiles = pipe.generate_from_tiles(reference_tiles, seed=0)        # uint8 (N, H, W, 3), more like these",
        "tiles = pipe.generate(embeddings, seed=0)                          # from precomputed embeddings",
        "tiles = pipe.generate(None, num_images=16, seed=0)                 # unconditional",
        'tiles = pipe.generate(embeddings, sampler="fast_heun_30")           # 60 model calls instead of 250',
        "```",
        "",
        "Command line: `cytosyn sample model=<this folder> split=<featurized split> output=<folder>`. "
        + (
            "The autoencoder is bundled in `vae/`."
            if vae.get("bundled")
            else f"The autoencoder `{vae.get('name')}` ships inside cytosyn and loads by name (its sha256 is "
            "checked)."
            if vae.get("shipped_in_package")
            else "The autoencoder is referenced, not bundled: pass its local weights as `vae_weights=` "
            "(its sha256 must match the one below) or a loaded one as `vae=`."
        ),
        "",
        "## Model",
        "",
    ]
    rows = [
        ["denoiser", f"{sit.get('preset')} (depth {sit.get('depth')}, hidden {sit.get('hidden_size')}, "
         f"heads {sit.get('num_heads')}, patch {sit.get('patch_size')}), EMA weights"],
        ["parameters", config.get("weights", {}).get("parameters", "?")],
        ["latents", f"{latent.get('channels')} channels, {latent.get('size')}×{latent.get('size')}, "
         f"normalisation `{latent.get('norm')}` (shift {_fmt(latent.get('shift'))}; scale {_fmt(latent.get('scale'))})"],
        ["VAE", f"`{vae.get('name')}` ({vae.get('hub_id') or 'local'}), weights `{vae.get('weights')}`"],
        ["conditioning", f"`{cond.get('encoder')}` {cond.get('output')} ({cond.get('embed_dim')}-d), "
         f"weights `{cond.get('weights')}`" if cond else "none (unconditional)"],
        ["tile", f"{tile.get('px')} px at {tile.get('mpp')} µm/px (source: {tile.get('source')})"],
        ["time convention", "x_t = (1 − t)·x + t·ε, t = 1 is noise, the model predicts v = ε − x"],
    ]  # fmt: skip
    lines += [*_table(["", ""], rows), ""]
    if cond.get("preprocessing"):
        p = cond["preprocessing"]
        lines += [
            f"Encoder preprocessing: uint8 RGB / 255, resize to {p.get('input_size')} px ({p.get('resize')}), "
            f"normalise with mean {p.get('mean')} and std {p.get('std')}; embeddings rounded to float16 as "
            "the training data stored them.",
            "",
        ]
    lines += ["### Sampler defaults", ""]
    srows = []
    for mode, s in samplers.items():
        srows.append(
            [mode, s.get("method"), s.get("steps"), s.get("t_end"), s.get("guidance_scale"),
             f"[{', '.join(str(v) for v in s.get('guidance_interval', []))}]"]
        )  # fmt: skip
    lines += [*_table(["mode", "method", "steps", "t_end", "guidance", "guidance interval"], srows), ""]

    lines += _components_section(cond, vae)
    lines += ["## Training data", ""]
    if data:
        lines += [
            f"Training split `{data.get('split')}`: {data.get('samples')} tiles from {data.get('slides')} slides "
            f"of {data.get('patients')} patients ({data.get('tss')} tissue source sites), "
            f"stored as `{data.get('image_member')}`"
            + (
                f" ({_fmt((data.get('tile') or {}).get('codec'))})"
                if (data.get("tile") or {}).get("codec")
                else ""
            )
            + ".",
            "",
        ]
        projects = sorted(set(data.get("tiles_per_project", {})) | set(data.get("slides_per_project", {})))
        if projects:
            prow = [
                [p, data.get("slides_per_project", {}).get(p, "?"), data.get("patients_per_project", {}).get(p, "?"),
                 data.get("tiles_per_project", {}).get(p, "?")]
                for p in projects
            ]  # fmt: skip
            lines += [*_table(["project", "slides", "patients", "tiles"], prow), ""]
    else:
        lines += [
            "The training split's manifest was not readable when this release was made, so no data summary is "
            f"included. The training config names `{(train_cfg.get('data') or {}).get('train')}`.",
            "",
        ]

    lines += ["## Training", ""]
    opt = train_cfg.get("optim") or {}
    trn = train_cfg.get("trainer") or {}
    dat = train_cfg.get("data") or {}
    trows = [
        ["optimizer steps", training.get("steps")],
        ["images seen", training.get("images_seen")],
        ["skipped (non-finite) steps", training.get("skipped_steps")],
        ["batch", f"{dat.get('batch_size')} per process × {training.get('world_size')} processes × "
         f"{trn.get('accumulate_grad_batches')} accumulation"],
        ["optimizer", f"AdamW lr {opt.get('lr')}, betas {opt.get('betas')}, weight decay {opt.get('weight_decay')}, "
         f"warm-up {opt.get('warmup_steps')}, grad clip {opt.get('grad_clip')}"],
        ["EMA", f"decay {(train_cfg.get('ema') or {}).get('decay')}"],
        ["condition dropout", (train_cfg.get("model") or {}).get("cond_dropout")],
        ["REPA", f"weight {(train_cfg.get('repa') or {}).get('weight')}, target `{dat.get('repa_target')}`"],
        ["time sampling", (train_cfg.get("diffusion") or {}).get("time_sampling")],
        ["precision", trn.get("precision")],
        ["seed", train_cfg.get("seed")],
        ["training code version", training.get("code_version") or "not recorded in the checkpoint"],
        ["release code version", (config.get("release") or {}).get("code_version")],
    ]  # fmt: skip
    lines += [*_table(["setting", "value"], trows), ""]

    lines += ["## Evaluation", ""]
    if evaluation:
        lines += [
            f"From `{evaluation.get('file')}` (sha256 `{evaluation.get('sha256')}`"
            + (f", {evaluation.get('title')}" if evaluation.get("title") else "")
            + (f", {evaluation.get('created')}" if evaluation.get("created") else "")
            + "). References are held-out-patient tiles unless the report says otherwise.",
            "",
        ]
        intervals = evaluation.get("intervals") or {}
        rows = [
            [f"`{k}`", _fmt(v), _fmt(intervals[k]) if k in intervals else "—"]
            for k, v in evaluation["metrics"].items()
        ]
        lines += _table(["metric", "value", "95% bootstrap CI"], rows)
        lines += [""]
        prov = evaluation.get("provenance") or {}
        if any(prov.values()):
            prow = [["study", prov.get("study")], ["seeds", prov.get("seeds")]]
            prow += [[f"reference {r}", v] for r, v in (prov.get("references") or {}).items()]
            prow += [
                [f"extractor `{n}`", f"weights `{w}`"] for n, w in (prov.get("extractors") or {}).items()
            ]
            prow += [
                ["eval config hash", prov.get("config_hash")],
                ["eval code version", prov.get("code_version")],
            ]
            lines += [
                "Provenance of these numbers:",
                "",
                *_table(["", ""], [[a, _fmt(b)] for a, b in prow]),
                "",
            ]
    else:
        lines += [
            "No evaluation report was given when this release was made (`cytosyn release eval_report=...`).",
            "",
        ]

    lines += [
        "## Intended use",
        "",
        "Research on computational pathology: synthetic H&E tiles for data augmentation studies, "
        "benchmarking generative models, studying what tile encoders capture, and conditional generation "
        '("more like this") from reference tiles at the same magnification. Not for diagnosis, not for '
        "any clinical decision, and not as a substitute for real patient data in validation.",
        "",
        "## Limitations",
        "",
        f"- Trained on the data above only ({_fmt(sorted((data or {}).get('tiles_per_project', {})))} "
        "projects); other organs, stains, scanners or magnifications are out of distribution.",
        f"- Tiles are {tile.get('px')} px at {tile.get('mpp')} µm/px; feed references at the same resolution. "
        "Metrics are sensitive to preprocessing (JPEG vs lossless, resize method): compare models at matched "
        "settings.",
        "- Generated tiles can reproduce training-slide content (slide-level overfitting): check against "
        "training-patient tiles before sharing synthetic data.",
        "- Sampler presets with fewer steps (fast_heun_30, fast_euler_50) are cheaper; check their quality "
        "with the eval harness before relying on them.",
    ]
    if str(vae.get("weights", "")).startswith("random-init") or str(cond.get("weights", "")).startswith(
        "random-init"
    ):
        lines.append(
            "- **This model was trained with randomly initialised encoder/VAE weights: it is a test artifact.**"
        )
    lines += ["", "## Licences", ""]
    lines.append(
        "The weights in this folder follow the licence chosen by whoever released them; they were trained on "
        "data whose own terms apply (e.g. TCGA's data use policy)."
    )
    if cond.get("gated"):
        lines.append(
            f"The conditioning encoder `{cond.get('encoder')}` ({cond.get('hub_id')}) is **gated** under "
            f"{cond.get('licence')}: each user must accept its terms on the hub to embed reference tiles. "
            "Precomputed embeddings can be passed to `generate` directly; a model trained on an open encoder "
            "(e.g. dinov2-vitb14) avoids the gate."
        )
    hub = config.get("hub") or {}
    lines.append(
        f"Weights licence: `{hub.get('license', 'other')}`"
        + (f" ({hub.get('license_name')})" if hub.get("license", "other") == "other" else "")
        + ". The autoencoder and the conditioning encoder keep their own licences (Components above)."
    )
    lines += [
        "",
        "## Files",
        "",
        f"`{MODEL_INDEX_FILE}`, `pipeline.py`, `transformer/`, `scheduler/`"
        + (", `vae/`" if vae.get("bundled") else "")
        + f" (the diffusers pipeline; weights in `{MODEL_FILE}`, safetensors), `{CONFIG_FILE}` (everything "
        f"needed to rebuild the model), `{README_FILE}` (this card), `{SUMS_FILE}` (sha256 of each; "
        f"`sha256sum -c {SUMS_FILE}` checks them, and every loader refuses a folder where any differs).",
        "",
    ]
    return "\n".join(lines)


def _hub_metadata(config: dict[str, Any]) -> list[str]:
    """The model card's YAML header: the fields the hub reads (licence, pipeline tag, base model,
    datasets, tags, model-index with the evaluation numbers)."""
    import yaml

    hub = config.get("hub") or {}
    meta: dict[str, Any] = {
        "library_name": "diffusers",
        "pipeline_tag": "unconditional-image-generation",
        "license": hub.get("license", "other"),
    }
    if meta["license"] == "other":
        meta["license_name"] = hub.get("license_name") or "unspecified"
        if hub.get("license_link"):
            meta["license_link"] = hub["license_link"]
    if hub.get("base_model"):
        meta["base_model"] = hub["base_model"]
    if hub.get("datasets"):
        meta["datasets"] = list(hub["datasets"])
    meta["tags"] = ["cytosyn", "histopathology", "H&E", "latent-diffusion", "SiT", "flow-matching"]
    evaluation = config.get("evaluation") or {}
    numbers = {
        k: float(v)
        for k, v in (evaluation.get("metrics") or {}).items()
        if isinstance(v, (int, float)) and v == v
    }
    if numbers:
        prov = evaluation.get("provenance") or {}
        meta["model-index"] = [
            {
                "name": config.get("name", "cytosyn"),
                "results": [
                    {
                        "task": {"type": "unconditional-image-generation"},
                        "dataset": {
                            "name": f"held-out tiles ({prov.get('study') or 'eval'} study)",
                            "type": "custom",
                        },
                        "metrics": [
                            {"type": k.split("/")[0], "name": k, "value": round(v, 6)}
                            for k, v in numbers.items()
                        ],
                    }
                ],
            }
        ]
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"), "---"]


def _components_section(cond: dict[str, Any], vae: dict[str, Any]) -> list[str]:
    """Autoencoder and conditioning encoder: identity, weights hash, how they travel, licence."""
    bundled = vae.get("bundled")
    rows = [
        [
            "autoencoder",
            f"`{vae.get('name')}`",
            vae.get("hub_id") or "local / registry",
            f"`{(bundled.get('weights') if isinstance(bundled, dict) else None) or vae.get('weights')}`",
            "bundled in `vae/`"
            if bundled
            else "shipped inside cytosyn (name + weights hash)"
            if vae.get("shipped_in_package")
            else "referenced (name + weights hash)",
            vae.get("licence") or "see its source",
        ]
    ]
    if cond:
        rows.append(
            [
                "conditioning encoder",
                f"`{cond.get('encoder')}` ({cond.get('output')}, {cond.get('embed_dim')}-d)",
                cond.get("hub_id") or "local / registry",
                f"`{cond.get('weights')}`",
                "referenced (embed reference tiles with it)" + (", **gated**" if cond.get("gated") else ""),
                cond.get("licence") or "see its source",
            ]
        )
    return [
        "## Components",
        "",
        *_table(["role", "model", "source", "weights", "in this release", "licence"], rows),
        "",
    ]


# --------------------------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------------------------


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists():
        if not output.is_dir():
            raise ReleaseError(f"output {output} exists and is not a folder")
        if any(output.iterdir()) and not overwrite:
            raise ReleaseError(
                f"output folder {output} is not empty; choose another one or pass overwrite=true"
            )


def run_release(
    checkpoint: Path,
    output: Path,
    eval_report: Path | None = None,
    *,
    train_split: Path | None = None,
    weights: str = "ema",
    name: str | None = None,
    conditional_sampler: str = "cytosyn_default",
    unconditional_sampler: str = "unconditional_default",
    guidance_scale: float | None = None,
    mpp: float | None = None,
    bundle_vae: bool = False,
    vae_weights: Path | None = None,
    hub: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ReleaseSummary:
    """Write the release folder of ``checkpoint`` into ``output`` (see the module docstring)."""
    checkpoint, output = Path(checkpoint), Path(output)
    _prepare_output(output, overwrite)
    # Settings are validated before the (possibly large) checkpoint is read.
    conditional = resolve_sampler(conditional_sampler, {}, guidance_scale=guidance_scale)
    unconditional = resolve_sampler(unconditional_sampler, {})
    evaluation = read_eval_report(eval_report) if eval_report is not None else None
    source = find_checkpoint(checkpoint)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    summary = ReleaseSummary(folder=output, checkpoint=source)
    try:
        ckpt, file = load_training_checkpoint(source, scratch=output.parent)
        config, state = parts_from_checkpoint(ckpt, weights=weights)
        ckpt_sha = sha256_file(file) if file.is_file() else None  # a DeepSpeed folder has no single hash
        del ckpt
        train_cfg = config["training"]["config"]
        condition = (train_cfg.get("data") or {}).get("condition")
        split = train_split or (train_cfg.get("data") or {}).get("train")
        data = None
        if split is not None:
            try:
                data = summarize_training_data(Path(split), f"{condition}.npy" if condition else None)
            except Exception as err:  # the data may live on another cluster: the release still works
                summary.notes.append(
                    f"training split {split} unreadable ({type(err).__name__}: {err}): no data summary"
                )
        tile = (data or {}).get("tile") or {}
        downsample = int(config["vae"].get("downsample") or 8)
        px = tile.get("px") or int(config["latent"]["size"]) * downsample
        tile_mpp = mpp if mpp is not None else tile.get("mpp")
        config["tile"] = {
            "px": int(px),
            "mpp": float(tile_mpp) if tile_mpp is not None else None,
            "source": "release setting mpp"
            if mpp is not None
            else ("training split sample JSON" if tile else "unknown"),
            "codec_of_training_tiles": tile.get("codec"),
        }
        if config["tile"]["mpp"] is None:
            summary.notes.append("tile mpp unknown (training data unreadable): pass mpp=... to record it")
        if int(px) != int(config["latent"]["size"]) * downsample:
            summary.notes.append(
                f"training tiles are {px} px but latents decode to {int(config['latent']['size']) * downsample} px"
            )
        if data is not None and data.get("conditioning_feature"):
            pre = data["conditioning_feature"]["preprocessing"]
            if any(v is not None for v in pre.values()):
                config["conditioning"]["preprocessing_recorded_by_featurize"] = pre
        config["name"] = name or config["name"]
        config["sampler"] = {
            "conditional": conditional.model_dump(mode="json"),
            "unconditional": unconditional.model_dump(mode="json"),
        }
        config["weights"]["source"] = weights
        config["weights"]["parameters"] = int(
            sum(v.numel() for k, v in state.items() if k.startswith("model."))
        )
        config["training"]["checkpoint"] = {"file": source.name, "sha256": ckpt_sha}
        config["data"] = data
        config["evaluation"] = evaluation
        config["hub"] = hub or {}
        config["release"] = {"code_version": code_version(), "format": config["format"]}
        vae = None
        if bundle_vae:
            from cytosyn.models.vae import load_vae_as_recorded

            vae = load_vae_as_recorded(config["vae"].get("name"), config["vae"].get("weights"), vae_weights)
        readme = render_model_card(config | {"vae": config["vae"] | ({"bundled": True} if vae else {})})
        write_release_files(partial, config, state, readme, vae=vae)
        # Prove the folder loads (hashes, config, weights) before it gets its final name.
        CytoSynPipeline.from_pretrained(partial, device="cpu")
        if output.exists():
            trash = output.parent / f".{output.name}.old-{os.getpid()}"
            os.replace(output, trash)
            os.replace(partial, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    summary.files = read_sums(output)
    summary.data_summary_available = data is not None
    summary.eval_included = evaluation is not None
    for note in summary.notes:
        log.warning("%s", note)
    return summary


def run_release_config(cfg: ReleaseConfig) -> ReleaseSummary:
    """``run_release`` with the settings of a validated :class:`ReleaseConfig` (what the CLI calls)."""
    settings = cfg.model_dump()
    hub = {k: settings.pop(k) for k in ("license", "license_name", "license_link", "base_model", "datasets")}
    return run_release(**settings, hub=hub)


__all__ = [
    "ReleaseConfig",
    "ReleaseError",
    "ReleaseSummary",
    "read_eval_report",
    "render_model_card",
    "run_release",
    "run_release_config",
    "summarize_training_data",
]
