"""Evaluation report folder: ``metrics.json`` (every number + full provenance), ``report.md`` (tables) and
``report.html`` (the same report with its figures inlined: one self-contained file, readable offline).

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

from cytosyn.fileio import atomic_write_text, code_version

__all__ = ["HTML_FILE", "REPORT_FORMAT", "fmt", "fmt_ci", "table", "write_html", "write_report"]

HTML_FILE = "report.html"
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f2f5; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; font-size: 0.92em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
.missing { color: #b00; font-weight: bold; }
"""

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


def write_html(folder: str | Path, markdown_text: str, title: str) -> Path:
    """``report.html`` from the report's markdown (python-markdown, tables extension), every PNG it links
    inlined as a data URI, so the one file reads offline and can be mailed or archived alone. A figure
    that is missing is replaced by a visible red note (never a broken image)."""
    import base64
    import html
    import re

    import markdown

    folder = Path(folder)
    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code", "sane_lists"])

    def inline(match: re.Match[str]) -> str:
        alt, src = match.group(1), match.group(2)
        file = folder / src
        if src.startswith("data:") or not (file.is_file() and file.resolve().parent == folder.resolve()):
            return f'<p class="missing">figure missing: {html.escape(src)}</p>'
        data = base64.b64encode(file.read_bytes()).decode("ascii")
        return f'<img alt="{alt}" title="{html.escape(src)}" src="data:image/png;base64,{data}">'

    body = re.sub(r'<img alt="([^"]*)" src="([^"]+)"\s*/?>', inline, body)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
    return atomic_write_text(folder / HTML_FILE, page)


def provenance_markdown(rows: Mapping[str, Any]) -> str:
    """A "Provenance" table (what made these numbers: code, config, weights, data), one row per item."""
    out = ["## Provenance", ""]
    out.append(
        table(["item", "value"], [[k, f"`{v}`" if v not in (None, "") else "—"] for k, v in rows.items()])
    )
    out.append("")
    return "\n".join(out)


def _metrics_markdown(metrics: Mapping[str, Any], intervals: Mapping[str, Any] | None = None) -> str:
    out = ["## Metrics", ""]
    rows = []
    intervals = intervals or {}
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            text = ", ".join(f"{k} {fmt(v) if isinstance(v, (int, float)) else v}" for k, v in value.items())
        elif isinstance(value, (int, float)):
            text = fmt(float(value))
        else:
            text = str(value)
        rows.append([f"`{name}`", text] + ([fmt_ci(intervals.get(name))] if intervals else []))
    out.append(table(["metric", "value", *(["95% bootstrap CI (first seed)"] if intervals else [])], rows))
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
    sections: list[str] | None = None,
    provenance_rows: Mapping[str, Any] | None = None,
    intervals: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and (with a JPEG study) ``jpeg_grid.png`` into ``folder``.

    ``jpeg_study``: a `JpegStudyResult` or its ``to_dict()``. ``metrics``: any extra named numbers (FD/KID/PRDC results, NamedTuples are fine). ``provenance``:
    anything else to record (configs, checkpoints, image-set provenance). ``sections``: more markdown
    (a study's own sections and figures), placed before the provenance table; ``provenance_rows``: more
    rows for that table; ``intervals``: metric name → CI (``{estimate, low, high}``), a column of the
    metrics table and ``intervals`` in metrics.json. Also writes ``report.html`` (figures inlined).
    Returns the written paths.
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
        "environment": {
            "python": platform.python_version(),
            "pillow": PIL.__version__,
            "cytosyn_code_version": code_version(),
        },
        "metrics": metrics or {},
        "intervals": intervals or {},
        "jpeg_study": study,
        "provenance": provenance or {},
        "heatmap": {"file": heatmap_name, "renderer": "matplotlib"} if heatmap_name else None,
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
        md.append(_metrics_markdown(metrics, intervals))
    if study is not None:
        md.append(jpeg_markdown(study, heatmap_name))
    md.extend(sections or [])
    md.append(
        provenance_markdown(
            {"created": doc["created"], "cytosyn code version": doc["environment"]["cytosyn_code_version"]}
            | dict(provenance_rows or {})
            | {f"environment: {k}": v for k, v in doc["environment"].items() if k != "cytosyn_code_version"}
        )
    )
    paths["report"] = atomic_write_text(folder / "report.md", "\n".join(md))
    paths["html"] = write_html(folder, "\n".join(md), title)
    return paths
