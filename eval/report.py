"""Evaluation report folder: ``metrics.json`` (every number + full provenance) and ``report.md`` (tables).

Study-specific sections and figures come from the study modules (`cytosyn.eval.studies`); with a JPEG
study, `write_report` adds its section and heat map (``jpeg_grid.png``, drawn by
`cytosyn.eval.studies.jpeg.render_jpeg_heatmap`). The number formatting here (`fmt`, `fmt_ci`, `table`)
is shared by every study's markdown.
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

from cytosyn.fileio import atomic_write_text

__all__ = ["REPORT_FORMAT", "fmt", "fmt_ci", "table", "write_report"]

REPORT_FORMAT = "cytosyn.eval-report/1"


def fmt(value: float) -> str:
    """A number in 3 significant figures (scientific notation outside [0.01, 1000))."""
    if not math.isfinite(value):
        return "nan"
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def fmt_ci(v: Any) -> str:
    """``estimate [low, high]`` from a CI dict or an (estimate, low, high, ...) tuple; ``—`` for None.
    An FD interval with a bias-corrected value adds it: ``… ; FD∞ x``."""
    if v is None:
        return "—"
    if isinstance(v, dict):
        est, lo, hi, inf = v.get("estimate"), v.get("low"), v.get("high"), v.get("fd_inf")
    else:
        est, lo, hi = v[0], v[1], v[2]
        inf = getattr(v, "fd_inf", None)
    return f"{fmt(est)} [{fmt(lo)}, {fmt(hi)}]" + (f"; FD∞ {fmt(inf)}" if inf is not None else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _metrics_markdown(metrics: Mapping[str, Any]) -> str:
    out = ["## Metrics", ""]
    rows = []
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            text = ", ".join(f"{k} {fmt(v) if isinstance(v, (int, float)) else v}" for k, v in value.items())
        elif isinstance(value, (int, float)):
            text = fmt(float(value))
        else:
            text = str(value)
        rows.append([f"`{name}`", text])
    out.append(table(["metric", "value"], rows))
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
    jpeg_study: Any = None,
    metrics: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    title: str = "cytosyn evaluation report",
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and (with a JPEG study) ``jpeg_grid.png`` into ``folder``.

    ``jpeg_study``: a `JpegStudyResult` or its ``to_dict()``. ``metrics``: any extra named numbers (FD/KID/PRDC results, NamedTuples are fine). ``provenance``:
    anything else to record (configs, checkpoints, image-set provenance). Returns the written paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    study = jpeg_study.to_dict() if hasattr(jpeg_study, "to_dict") else jpeg_study
    heatmap_name = None
    if study is not None:
        from .studies.jpeg import jpeg_markdown, render_jpeg_heatmap  # the studies import this module

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
        md.append(jpeg_markdown(study, heatmap_name))
    paths["report"] = atomic_write_text(folder / "report.md", "\n".join(md))
    return paths
