"""The JPEG study (and the lossless round-trip check): what a codec alone does to a Fréchet distance.

`jpeg_study` measures how much JPEG compression alone moves a Fréchet distance — the flaw of PixCell's
evaluation, which saved reference and generated tiles at PIL's default quality 75 before FID. Each set is
decoded **once**; every batch is re-encoded in memory at each quality and fed to every extractor, giving
one `FeatureStats` per (set, codec, extractor). The result is the full grid FD[reference codec][generated
codec] over {lossless, q95, q90, q75, q50} for every extractor, with the 8×8 blockiness of each set at
each codec. With the same set on both sides (``generated_set=None`` or the same object), the diagonal is
≈ 0 and each off-diagonal cell is the distance created by the codec alone.

`lossless_roundtrip_check` proves that, with no codec applied, the harness hands the extractors exactly
the stored pixels: every batch is compared with an independent decode of the stored bytes.

The study is not an ``EvalConfig`` study (it compares image sets, not a generator): its report section
(`jpeg_markdown`) and heat map (`render_jpeg_heatmap`) are written by
``cytosyn.eval.report.write_report(folder, jpeg_study=...)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..features import _Accumulator, _device, build_extractors
from ..figures import new_figure, save_figure
from ..images import ImageSet, apply_codec, codec_label, codec_settings, parse_codec
from ..metrics import blockiness_8x8
from ..report import fmt, table
from ..stats import PROVENANCE_KEYS, frechet_distance

__all__ = [
    "DEFAULT_QUALITIES",
    "JpegStudyResult",
    "jpeg_heatmap_figure",
    "jpeg_markdown",
    "jpeg_study",
    "lossless_roundtrip_check",
    "render_jpeg_heatmap",
    "study_codecs",
]

DEFAULT_QUALITIES = (95, 90, 75, 50)


def study_codecs(qualities: Sequence[int] = DEFAULT_QUALITIES, subsampling: str = "4:2:0") -> dict[str, Any]:
    """Column names → codec requests: ``{"lossless": "lossless", "q95": {"jpeg": 95, ...}, ...}``."""
    codecs: dict[str, Any] = {"lossless": "lossless"}
    for q in qualities:
        codecs[f"q{int(q)}"] = {"jpeg": int(q), "subsampling": subsampling}
    for spec in codecs.values():
        parse_codec(spec)  # validates
    return codecs


@dataclass
class JpegStudyResult:
    """FD grids per extractor (rows: reference codec, columns: generated codec) and blockiness per codec."""

    codecs: list[str]
    codec_settings: dict[str, dict[str, Any]]
    fd: dict[str, list[list[float]]]  # extractor → grid[ref_codec][gen_codec]
    blockiness: dict[str, dict[str, dict[str, float]]]  # "reference"/"generated" → codec → {median, mean}
    extractors: dict[str, dict[str, Any]]
    stats_metadata: dict[str, dict[str, dict[str, Any]]]  # extractor → codec → metadata (reference side)
    reference: dict[str, Any]
    generated: dict[str, Any]
    same_set: bool
    n_reference: int
    n_generated: int
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def cell(self, extractor: str, ref_codec: str, gen_codec: str) -> float:
        return self.fd[extractor][self.codecs.index(ref_codec)][self.codecs.index(gen_codec)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": "jpeg",
            "codecs": self.codecs,
            "codec_settings": self.codec_settings,
            "fd": self.fd,
            "fd_axes": {"rows": "reference codec", "columns": "generated codec"},
            "blockiness": self.blockiness,
            "extractors": self.extractors,
            "stats_metadata": self.stats_metadata,
            "reference": self.reference,
            "generated": self.generated,
            "same_set": self.same_set,
            "n_reference": self.n_reference,
            "n_generated": self.n_generated,
            "timings_s": self.timings_s,
            "warnings": self.warnings,
        }


def _pass(
    image_set: ImageSet,
    codecs: Mapping[str, Any],
    extractors: Mapping[str, Any],
    device: torch.device,
    batch_size: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]], dict[str, Any], float]:
    """One decode pass: for each codec, stats per extractor (metadata set) and per-image blockiness."""
    accs = {label: _Accumulator(extractors, device, False, 0) for label in codecs}
    blocks: dict[str, list[np.ndarray]] = {label: [] for label in codecs}
    decode_s = 0.0
    batches = image_set.batches(batch_size)
    while True:
        start = time.perf_counter()
        nxt = next(batches, None)
        decode_s += time.perf_counter() - start
        if nxt is None:
            break
        keys, batch, _ = nxt
        for label, codec in codecs.items():
            coded = apply_codec(batch, codec)
            blocks[label].append(np.asarray(blockiness_8x8(coded, per_image=True)))
            accs[label].update(keys, coded)
    provenance = image_set.provenance
    stats: dict[str, dict[str, Any]] = {}
    for label, codec in codecs.items():
        parsed = parse_codec(codec)
        prov = dict(provenance)
        if parsed is not None:
            prov["codec"] = provenance["codec"] | {"applied": parsed}
            prov["codec_label"] = codec_label(prov["codec"])
        stats[label] = dict(accs[label].finish(prov, decode_s))
    block = {}
    for label, parts in blocks.items():
        values = np.concatenate(parts)
        finite = values[np.isfinite(values)]
        block[label] = {
            "median": float(np.median(finite)) if finite.size else float("nan"),
            "mean": float(finite.mean()) if finite.size else float("nan"),
        }
    return stats, block, provenance, decode_s


def jpeg_study(
    reference_set: ImageSet,
    generated_set: ImageSet | None = None,
    qualities: Sequence[int] = DEFAULT_QUALITIES,
    extractors: Mapping[str, Any] | Iterable[Any] = ("fid-inception",),
    *,
    subsampling: str = "4:2:0",
    batch_size: int = 32,
    device: str | torch.device | None = "cpu",
) -> JpegStudyResult:
    """FD for every (reference codec × generated codec) in {lossless, q…} per extractor, + blockiness.

    ``generated_set=None`` (or the reference object itself) compares the reference with itself: one pass,
    and the diagonal is ≈ 0. JPEG re-encoding happens in memory with PIL at each quality and
    ``subsampling`` (4:2:0 = PIL's default); "lossless" means the stored pixels unchanged — if a set is
    *stored* as JPEG, its "lossless" column is that stored JPEG, and its provenance says so. The codec is
    the variable under study, so FDs ignore the ``codec`` metadata key; every other setting must match.
    """
    exts = build_extractors(extractors)
    dev = _device(device)
    for ext in exts.values():
        ext.to(dev)
    codecs = study_codecs(qualities, subsampling)
    same = generated_set is None or generated_set is reference_set
    start = time.perf_counter()
    ref_stats, ref_block, ref_prov, ref_decode = _pass(reference_set, codecs, exts, dev, batch_size)
    ref_s = time.perf_counter() - start
    if same:
        gen_stats, gen_block, gen_prov, gen_s = ref_stats, ref_block, ref_prov, 0.0
    else:
        assert generated_set is not None
        start = time.perf_counter()
        gen_stats, gen_block, gen_prov, _ = _pass(generated_set, codecs, exts, dev, batch_size)
        gen_s = time.perf_counter() - start
    labels = list(codecs)
    ignore = PROVENANCE_KEYS | {"codec"}
    fd: dict[str, list[list[float]]] = {}
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for name in exts:
            fd[name] = [
                [frechet_distance(ref_stats[r][name], gen_stats[g][name], ignore=ignore) for g in labels]
                for r in labels
            ]
    for w in caught:
        msg = str(w.message)
        if msg not in notes:
            notes.append(msg)
    metadata = {name: {label: ref_stats[label][name].metadata for label in labels} for name in exts}
    return JpegStudyResult(
        codecs=labels,
        codec_settings={label: codec_settings(codecs[label]) for label in labels},
        fd=fd,
        blockiness={"reference": ref_block, "generated": gen_block},
        extractors={name: ext.describe() for name, ext in exts.items()},
        stats_metadata=metadata,
        reference=ref_prov,
        generated=gen_prov,
        same_set=same,
        n_reference=int(ref_prov["count"]),
        n_generated=int(gen_prov["count"]),
        timings_s={"reference_pass": ref_s, "reference_decode": ref_decode, "generated_pass": gen_s},
        warnings=notes,
    )


def _independent_decode(data: bytes | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def lossless_roundtrip_check(image_set: ImageSet, batch_size: int = 32) -> dict[str, Any]:
    """Prove that with no codec the harness changes no pixel: compare every batch the extractors would
    receive (``batches`` → uint8 tensor, as `extract_features` builds it) with the stored bytes decoded
    independently, tile by tile. Returns counts and pixel hashes; ``ok`` is True only if every pixel of
    every tile is identical and the keys come in the same order."""
    reference = image_set.raw_items()
    checked = identical = 0
    max_diff = 0
    first_bad: str | None = None
    h_harness, h_direct = hashlib.sha256(), hashlib.sha256()
    for keys, batch, _ in image_set.batches(batch_size):
        tensor = torch.from_numpy(np.ascontiguousarray(apply_codec(batch, "lossless")))
        fed = tensor.numpy()
        for i, key in enumerate(keys):
            raw_key, data, _ = next(reference)
            direct = _independent_decode(data)
            checked += 1
            h_harness.update(fed[i].tobytes())
            h_direct.update(np.ascontiguousarray(direct).tobytes())
            same = raw_key == key and direct.shape == fed[i].shape and np.array_equal(direct, fed[i])
            if same:
                identical += 1
            else:
                if first_bad is None:
                    first_bad = key
                if direct.shape == fed[i].shape:
                    max_diff = max(max_diff, int(np.abs(direct.astype(np.int16) - fed[i]).max()))
                else:
                    max_diff = 255
    leftover = next(reference, None) is not None
    return {
        "ok": checked == identical and checked > 0 and not leftover,
        "checked": checked,
        "identical": identical,
        "max_abs_diff": max_diff,
        "first_mismatch": first_bad,
        "pixels_sha256_harness": h_harness.hexdigest(),
        "pixels_sha256_direct": h_direct.hexdigest(),
        "codec": image_set.provenance["codec_label"],
    }


# ------------------------------------------------------------------------------------------- report
def jpeg_heatmap_figure(study: JpegStudyResult | Mapping[str, Any]) -> Any:
    """One heat map per extractor: FD[reference codec][generated codec], each cell labelled, colour bar."""
    data = study.to_dict() if isinstance(study, JpegStudyResult) else dict(study)
    codecs: list[str] = list(data["codecs"])
    grids: dict[str, list[list[float]]] = data["fd"]
    fig = new_figure(4.2 * len(grids) + 0.4, 3.8)
    for p, (name, grid) in enumerate(grids.items()):
        ax = fig.add_subplot(1, len(grids), p + 1)
        arr = np.asarray(grid, dtype=np.float64)
        im = ax.imshow(arr, cmap="viridis")
        finite = arr[np.isfinite(arr)]
        mid = float(finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(len(codecs)):
            for j in range(len(codecs)):
                ax.text(j, i, fmt(float(arr[i, j])), ha="center", va="center", fontsize=8,
                        color="black" if arr[i, j] > mid else "white")  # fmt: skip
        ax.set_xticks(range(len(codecs)), codecs)
        ax.set_yticks(range(len(codecs)), codecs)
        ax.set_xlabel("generated codec")
        ax.set_ylabel("reference codec")
        ax.set_title(f"FD in {name}", fontsize=10)
        fig.colorbar(im, ax=ax, label="Fréchet distance", shrink=0.8)
    fig.tight_layout()
    return fig


def render_jpeg_heatmap(study: JpegStudyResult | Mapping[str, Any], path: str | Path) -> Path:
    """:func:`jpeg_heatmap_figure` saved as PNG."""
    return save_figure(jpeg_heatmap_figure(study), path)


def _set_line(prov: Mapping[str, Any]) -> str:
    fov = f"{prov.get('fov_um')} µm" if prov.get("fov_um") is not None else "unknown"
    return (
        f"`{prov.get('source')}` ({prov.get('kind')}): {prov.get('count')} tiles, "
        f"{prov.get('image_size', ['?'])[0]}×{prov.get('image_size', ['?', '?'])[1]} px, stored codec "
        f"`{prov.get('stored_codec_label')}` (from {prov.get('codec_source')}), mpp {prov.get('mpp')}, "
        f"field of view {fov}"
    )


def jpeg_markdown(d: Mapping[str, Any], heatmap: str | None) -> str:
    codecs = d["codecs"]
    out = ["## JPEG study", ""]
    out.append(f"- reference: {_set_line(d['reference'])}")
    if d["same_set"]:
        out.append("- generated: the same set (each cell = distance created by the codecs alone)")
    else:
        out.append(f"- generated: {_set_line(d['generated'])}")
    settings = d["codec_settings"]
    q = next((s for s in settings.values() if s.get("reencoded")), None)
    if q:
        out.append(
            f"- re-encoding: PIL {q['version']} (libjpeg {q['libjpeg']}), baseline, subsampling "
            f"{q['subsampling']}, optimize off; `lossless` = stored pixels, unchanged"
        )
    out.append("")
    for name, grid in d["fd"].items():
        meta = d["stats_metadata"][name][codecs[0]]
        out.append(f"### FD in `{name}`")
        out.append("")
        out.append(
            f"weights `{meta.get('weights')}`, layer {meta.get('layer')}, resize `{json.dumps(meta.get('resize'))}`, "
            f"input {meta.get('input_size')} px. Rows: reference codec; columns: generated codec."
        )
        out.append("")
        rows = [[f"**{r}**"] + [fmt(v) for v in grid[i]] for i, r in enumerate(codecs)]
        out.append(table(["ref \\ gen", *codecs], rows))
        out.append("")
    out.append("### Blockiness 8×8 (median per image; 1 ≈ no blocking)")
    out.append("")
    sides = ["reference"] if d["same_set"] else ["reference", "generated"]
    rows = [[s] + [fmt(d["blockiness"][s][c]["median"]) for c in codecs] for s in sides]
    out.append(table(["set", *codecs], rows))
    out.append("")
    if heatmap:
        out.append(f"![JPEG grid]({heatmap})")
        out.append("")
    if d.get("warnings"):
        out.append("Warnings:")
        out.extend(f"- {w}" for w in d["warnings"])
        out.append("")
    return "\n".join(out)
