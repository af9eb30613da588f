"""``cytosyn status`` on a tiles / features / synthetic folder: the parts of a data stage, aggregated.

What is read (nothing is written): ``launch/array.json`` (the parts and their slides or shards, written by
``cytosyn launch <stage>``), each stage's own record of finished work (``slides/<id>/state.json`` for
tile, ``.featurize/<shard>.json`` for featurize, ``.sample/<shard>.json`` for sample) and the per-part
records of :mod:`cytosyn.parts` (running / done / failed / interrupted, with errors and timings). A
folder tiled or featurized without the launcher (no ``array.json``) is summarised from what is there.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cytosyn.formats import SLIDE_STATE_FILE, SLIDES_DIR
from cytosyn.parts import PARTS_DIR, read_part_records

ARRAY_FILE = "array.json"
_STAGE_DIRS = {"featurize": ".featurize", "sample": ".sample"}
_SHOWN = 8


def folder_stage(folder: Path) -> str | None:
    """Which data stage made ``folder`` (None: not a data-stage folder, e.g. a training run)."""
    folder = Path(folder)
    try:
        return str(json.loads((folder / "launch" / ARRAY_FILE).read_text())["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if (folder / SLIDES_DIR).is_dir() or (folder / "tile_config.yaml").is_file():
        return "tile"
    for stage, sub in _STAGE_DIRS.items():
        if (folder / sub).is_dir():
            return stage
    for stage in ("tile", "featurize", "sample"):  # only part records so far (e.g. failed at once)
        if any((folder / PARTS_DIR).glob(f"{stage}-part*-of*.json")):
            return stage
    return None


@dataclass
class PartStatus:
    part: int
    items: int = 0
    done: int = 0
    failed: int = 0
    state: str = "not started"  # done | failed | running | interrupted | not started | partial
    error: str = ""
    seconds: float | None = None
    host: str = ""
    updated_at: float | None = None


@dataclass
class ArrayStatus:
    folder: Path
    stage: str
    item: str  # "slide" | "shard"
    parts: int | None
    items_total: int | None
    done: int = 0
    failed_items: dict[str, str] = field(default_factory=dict)  # item → "ErrorType: message"
    units: int = 0  # tiles / samples / images written by the done items
    unit: str = "tiles"
    part_status: list[PartStatus] = field(default_factory=list)
    started_at: float | None = None
    updated_at: float | None = None
    job_ids: list[str] = field(default_factory=list)

    @property
    def remaining(self) -> int | None:
        if self.items_total is None:
            return None
        return self.items_total - self.done - len(self.failed_items)

    def counts(self) -> Counter:
        return Counter(p.state for p in self.part_status)

    def report(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        head = f"{self.stage} {self.folder}"
        if self.parts is not None:
            head += f": {self.parts} part(s)"
        if self.job_ids:
            head += f", SLURM job(s) {', '.join(self.job_ids[-3:])}"
        lines = [head]
        total = f" of {self.items_total}" if self.items_total is not None else ""
        lines.append(f"  done        {self.done}{total} {self.item}s ({self.units:,} {self.unit})")
        reasons = Counter(v.split(":")[0] for v in self.failed_items.values())
        by = ", ".join(f"{k} {n}" for k, n in reasons.most_common())
        lines.append(f"  failed      {len(self.failed_items)} {self.item}s" + (f" ({by})" if by else ""))
        for item, why in list(self.failed_items.items())[:_SHOWN]:
            lines.append(f"    {item}: {why}")
        if len(self.failed_items) > _SHOWN:
            lines.append(f"    ... {len(self.failed_items) - _SHOWN} more")
        if self.remaining is not None:
            lines.append(f"  remaining   {self.remaining} {self.item}s")
        if self.part_status:
            counts = self.counts()
            order = ("done", "running", "partial", "interrupted", "failed", "not started")
            lines.append("  parts       " + ", ".join(f"{counts[s]} {s}" for s in order if counts[s]))
            for p in self.part_status:
                if p.state == "failed":
                    lines.append(f"    part {p.part} FAILED: {p.error}")
                elif p.state in ("interrupted", "running") and p.updated_at is not None:
                    ago = now - p.updated_at
                    stale = " (no update for a while: killed?)" if p.state == "running" and ago > 3600 else ""
                    lines.append(
                        f"    part {p.part} {p.state} on {p.host}, last update {ago:.0f} s ago{stale}"
                    )
        lines.append("  throughput  " + self._throughput(now))
        return "\n".join(lines)

    def _throughput(self, now: float) -> str:
        if self.started_at is None or self.updated_at is None or self.units == 0:
            return "not measured yet"
        wall = max(self.updated_at - self.started_at, 1e-9)
        text = f"{self.units / wall:,.1f} {self.unit}/s over {wall:,.0f} s (all parts together)"
        done_items = self.done + len(self.failed_items)
        if self.remaining and done_items:
            eta = self.remaining * wall / done_items
            text += f"; ~{eta / 60:,.0f} min for the remaining {self.item}s at this rate"
        return text


# -------------------------------------------------------------------------------- per-stage item states


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _item_state(folder: Path, stage: str, item: str) -> tuple[str, str, int]:
    """(done | failed | todo, error, units) of one slide or shard."""
    if stage == "tile":
        state = _json(folder / SLIDES_DIR / item / SLIDE_STATE_FILE)
        if state is None:
            return "todo", "", 0
        if state.get("status") == "done":
            return "done", "", int(state.get("tiles", 0))
        return "failed", f"{state.get('error_type', '?')}: {state.get('error', '')}", 0
    state = _json(folder / _STAGE_DIRS[stage] / f"{item}.json")
    if state is None or (stage == "sample" and state.get("status") != "done"):
        return "todo", "", 0
    count = (state.get("output") if stage == "featurize" else state.get("shard")) or {}
    return "done", "", int(count.get("count") or 0)


def _discovered_items(folder: Path, stage: str) -> list[str]:
    """Items present in a folder made without the launcher (remaining ones cannot be known)."""
    if stage == "tile":
        root = folder / SLIDES_DIR
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    sub = folder / _STAGE_DIRS[stage]
    return sorted(p.name[: -len(".json")] for p in sub.glob("*.tar.json")) if sub.is_dir() else []


def array_status(folder: Path) -> ArrayStatus:
    """Aggregate a data stage's parts in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    stage = folder_stage(folder)
    if stage is None:
        raise FileNotFoundError(f"{folder} is not a tile, featurize or sample output folder")
    array = _json(folder / "launch" / ARRAY_FILE) or {}
    parts_items: list[list[str]] | None = array.get("items")
    records = read_part_records(folder, stage)
    parts = array.get("parts")
    if parts is None and records:
        parts = max(n for _, n in records)
    unit = {"tile": "tiles", "featurize": "samples", "sample": "images"}[stage]
    item = "slide" if stage == "tile" else "shard"
    items = [i for chunk in parts_items for i in chunk] if parts_items else _discovered_items(folder, stage)
    status = ArrayStatus(
        folder,
        stage,
        item,
        parts,
        len(items) if parts_items else None,
        unit=unit,
        job_ids=array.get("job_ids", []),
    )
    states = {}
    for name in items:
        state, error, units = _item_state(folder, stage, name)
        states[name] = state
        if state == "done":
            status.done += 1
            status.units += units
        elif state == "failed":
            status.failed_items[name] = error
    starts = [r["started_at"] for r in records.values() if isinstance(r.get("started_at"), (int, float))]
    ends = [r["updated_at"] for r in records.values() if isinstance(r.get("updated_at"), (int, float))]
    status.started_at = min(starts) if starts else None
    status.updated_at = max(ends) if ends else None
    if parts:
        for i in range(parts):
            mine = parts_items[i] if parts_items and i < len(parts_items) else []
            rec = records.get((i, parts), {})
            p = PartStatus(i, len(mine), sum(states.get(x) == "done" for x in mine))
            p.failed = sum(states.get(x) == "failed" for x in mine)
            p.host, p.seconds, p.updated_at = rec.get("host", ""), rec.get("seconds"), rec.get("updated_at")
            recorded = rec.get("status")
            if recorded == "failed":
                p.state, p.error = "failed", f"{rec.get('error_type', '?')}: {rec.get('error', '')}"
            elif recorded in ("running", "interrupted"):
                p.state = recorded
            elif mine and p.done + p.failed == len(mine):
                p.state = "done"
            elif recorded == "done":
                p.state = "done" if not mine else "partial"
            elif p.done:
                p.state = "partial"
            status.part_status.append(p)
    return status


def status_text(folder: Path) -> str:
    return array_status(folder).report()
