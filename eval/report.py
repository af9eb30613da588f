"""Evaluation report folder: ``metrics.json`` (every number + full provenance), ``report.md`` (tables) and,
for a JPEG study, a heat map of each extractor's FD grid (``jpeg_grid.png``).

matplotlib is not a dependency of cytosyn (and is not installed in the project's environment), so the
heat map is drawn with PIL: one panel per extractor, cells coloured on a viridis-like scale normalised
per panel (FD units differ between encoders), each cell labelled with its value.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFont

from cytosyn.fileio import atomic_write_text

from .studies import JpegStudyResult

__all__ = ["REPORT_FORMAT", "render_jpeg_heatmap", "write_report"]

REPORT_FORMAT = "cytosyn.eval-report/1"

# viridis at 9 stops (matplotlib's colour map, sampled), interpolated linearly.
_VIRIDIS = np.array(
    [
        [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
        [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
    ],
    dtype=np.float64,
)  # fmt: skip


def _colour(t: float) -> tuple[int, int, int]:
    if not math.isfinite(t):
        return (200, 200, 200)
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    c = _VIRIDIS[i] + (_VIRIDIS[i + 1] - _VIRIDIS[i]) * (t - i)
    return (round(c[0]), round(c[1]), round(c[2]))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "nan"
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def render_jpeg_heatmap(study: JpegStudyResult | Mapping[str, Any], path: str | Path, cell: int = 78) -> Path:
    """Draw one heat-map panel per extractor (rows: reference codec, columns: generated codec) to PNG."""
    data = study.to_dict() if isinstance(study, JpegStudyResult) else dict(study)
    codecs: list[str] = list(data["codecs"])
    grids: dict[str, list[list[float]]] = data["fd"]
    k = len(codecs)
    title_f, label_f, value_f = _font(16), _font(13), _font(12)
    margin_l, margin_t, gap = 92, 64, 40
    panel_w = margin_l + k * cell + 20
    width = max(1, len(grids)) * panel_w + gap
    height = margin_t + k * cell + 70
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for p, (name, grid) in enumerate(grids.items()):
        arr = np.asarray(grid, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        span = hi - lo if hi > lo else 1.0
        x0 = p * panel_w + gap // 2
        draw.text((x0, 8), f"FD in {name}", fill="black", font=title_f)
        draw.text((x0, 30), f"scale {_fmt(lo)} … {_fmt(hi)}", fill=(90, 90, 90), font=label_f)
        draw.text((x0 + margin_l, margin_t - 18), "generated codec ->", fill="black", font=label_f)
        for j, c in enumerate(codecs):
            draw.text((x0 + margin_l + j * cell + 8, height - 62), c, fill="black", font=label_f)
        draw.text((x0, height - 40), "rows: reference codec", fill="black", font=label_f)
        for i, r in enumerate(codecs):
            y = margin_t + i * cell
            draw.text((x0 + 8, y + cell // 2 - 8), r, fill="black", font=label_f)
            for j in range(k):
                v = float(arr[i, j])
                t = (v - lo) / span
                colour = _colour(t)
                x = x0 + margin_l + j * cell
                draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colour)
                luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
                draw.text(
                    (x + 6, y + cell // 2 - 8),
                    _fmt(v),
                    fill="black" if luminance > 140 else "white",
                    font=value_f,
                )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _set_line(prov: Mapping[str, Any]) -> str:
    fov = f"{prov.get('fov_um')} µm" if prov.get("fov_um") is not None else "unknown"
    return (
        f"`{prov.get('source')}` ({prov.get('kind')}): {prov.get('count')} tiles, "
        f"{prov.get('image_size', ['?'])[0]}×{prov.get('image_size', ['?', '?'])[1]} px, stored codec "
        f"`{prov.get('stored_codec_label')}` (from {prov.get('codec_source')}), mpp {prov.get('mpp')}, "
        f"field of view {fov}"
    )


def _jpeg_markdown(d: Mapping[str, Any], heatmap: str | None) -> str:
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
        rows = [[f"**{r}**"] + [_fmt(v) for v in grid[i]] for i, r in enumerate(codecs)]
        out.append(_table(["ref \\ gen", *codecs], rows))
        out.append("")
    out.append("### Blockiness 8×8 (median per image; 1 ≈ no blocking)")
    out.append("")
    sides = ["reference"] if d["same_set"] else ["reference", "generated"]
    rows = [[s] + [_fmt(d["blockiness"][s][c]["median"]) for c in codecs] for s in sides]
    out.append(_table(["set", *codecs], rows))
    out.append("")
    if heatmap:
        out.append(f"![JPEG grid]({heatmap})")
        out.append("")
    if d.get("warnings"):
        out.append("Warnings:")
        out.extend(f"- {w}" for w in d["warnings"])
        out.append("")
    return "\n".join(out)


def _metrics_markdown(metrics: Mapping[str, Any]) -> str:
    out = ["## Metrics", ""]
    rows = []
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            text = ", ".join(f"{k} {_fmt(v) if isinstance(v, (int, float)) else v}" for k, v in value.items())
        elif isinstance(value, (int, float)):
            text = _fmt(float(value))
        else:
            text = str(value)
        rows.append([f"`{name}`", text])
    out.append(_table(["metric", "value"], rows))
    out.append("")
    return "\n".join(out)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    if hasattr(obj, "_asdict"):
        return _jsonable(obj._asdict())
    return obj


def write_report(
    folder: str | Path,
    *,
    jpeg_study: JpegStudyResult | Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    title: str = "cytosyn evaluation report",
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and (with a JPEG study) ``jpeg_grid.png`` into ``folder``.

    ``metrics``: any extra named numbers (FD/KID/PRDC results, NamedTuples are fine). ``provenance``:
    anything else to record (configs, checkpoints, image-set provenance). Returns the written paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    study = jpeg_study.to_dict() if isinstance(jpeg_study, JpegStudyResult) else jpeg_study
    heatmap_name = None
    if study is not None:
        paths["heatmap"] = render_jpeg_heatmap(study, folder / "jpeg_grid.png")
        heatmap_name = paths["heatmap"].name
    doc = {
        "format": REPORT_FORMAT,
        "title": title,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "pillow": PIL.__version__},
        "metrics": metrics or {},
        "jpeg_study": study,
        "provenance": provenance or {},
        "heatmap": {"file": heatmap_name, "renderer": "PIL (matplotlib not installed)"}
        if heatmap_name
        else None,
    }
    try:
        import torch

        doc["environment"]["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    text = json.dumps(_jsonable(doc), indent=2, sort_keys=False, allow_nan=False) + "\n"
    paths["metrics"] = atomic_write_text(folder / "metrics.json", text)
    md = [f"# {title}", "", f"Created {doc['created']}. All numbers and full provenance: `metrics.json`.", ""]
    if metrics:
        md.append(_metrics_markdown(metrics))
    if study is not None:
        md.append(_jpeg_markdown(study, heatmap_name))
    paths["report"] = atomic_write_text(folder / "report.md", "\n".join(md))
    return paths
