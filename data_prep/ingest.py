"""``cytosyn ingest``: tile datasets that are not slides → per-source shards in the tile contract.

Many users start from tiles already cut (NCT-CRC-HE-100K, CRC-VAL-HE-7K, PCam, their own exports): class
folders (``<folder>/<label>/<image>``) or a CSV (``path,label,patient_id,slide_id,site,mpp``). Ingest
writes them exactly like ``cytosyn tile`` writes slides — ``<output>/slides/<source>/*.tar`` plus a
``state.json`` written last, one source per slide id — so ``pack``, ``featurize``, ``train`` and ``eval``
treat them like slide tiles. Each tile's JSON carries the tiler's fields (identity, geometry, mpp, codec)
plus ``label`` and ``source`` (file, sha256, format, size).

The run, in order:

1. **Discover** the files (sorted), read every CSV (missing columns, empty cells and duplicate paths are
   errors naming the line), apply the label table (rows matching no tile are reported; a table matching
   none is an error), settle identities by ``identity.rule`` (a missing identity is refused unless the
   rule derives it; the rule goes into ``identity_source``).
2. **Inspect** each file once: its bytes (sha256) and image header. Files that are not images, or that
   PIL cannot decode, are skipped and counted (or refused, by config); tiles of another size or mpp
   follow ``grid.mismatch``. Before anything is written, the run checks that every tile will be stored
   with one image format (pack needs one per split).
3. **Write** each source: original bytes kept when the codec is acceptable (``codec.keep_original``) and
   the tile needs no change, else decoded, resampled if needed and re-encoded losslessly, with the reason
   recorded; ``state.json`` last. A source already done with the same signature (settings + file hashes +
   identity + labels) is skipped, so a rerun is a no-op and outputs are byte-identical.
4. **Summary**: ``ingest_summary.json`` lists every skipped file with its reason; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from cytosyn.data_prep.codec import EXTENSION, TileEncoder
from cytosyn.data_prep.ingest_config import IngestConfig
from PIL import Image

from cytosyn.config import config_hash, write_resolved_config
from cytosyn.fileio import atomic_write_text, code_version, sha256_file
from cytosyn.formats import SLIDE_STATE_FILE, canonical_json, slide_dir
from cytosyn.shardio import ShardWriter

SUMMARY_FILE = "ingest_summary.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}
CSV_COLUMNS = ("path", "label", "patient_id", "slide_id", "site", "mpp")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_PIL_FORMAT = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


class IngestError(ValueError):
    """Inputs that ``ingest`` refuses; the message names the file, line or setting at fault."""


@dataclass
class TileRecord:
    path: Path
    rel: str  # the path as the input states it (relative to its folder or CSV)
    origin: str  # "folder:<name>" or "csv:<name>"
    label: str | None
    patient_id: str | None = None
    slide_id: str | None = None
    site: str | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    where: str = ""  # for messages: "line 12 of x.csv" or the file path
    # set by inspection
    sha256: str = ""
    format: str = ""
    mode: str = ""
    size: tuple[int, int] = (0, 0)
    identity_source: str = ""
    project: str = ""
    action: str = ""  # "keep" | "reencode"
    reason: str = ""  # why re-encoded
    geometry: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        stem = self.rel.rsplit(".", 1)[0] if "." in Path(self.rel).name else self.rel
        key = _UNSAFE.sub("_", f"{self.origin.split(':', 1)[1]}/{stem}")
        if len(key) > 80:  # keep tar member names short; the hash keeps them unique
            key = key[:60] + "-" + hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
        return key


@dataclass
class IngestSummary:
    output: str
    sources: int = 0
    sources_skipped: int = 0  # already done with the same signature
    tiles: int = 0
    kept_original: int = 0
    reencoded: int = 0
    resampled: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason → files
    labels: dict[str, int] = field(default_factory=dict)
    label_table_unmatched: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def skip(self, reason: str, what: str) -> None:
        self.skipped.setdefault(reason, []).append(what)

    def report(self) -> str:
        lines = [
            f"ingest → {self.output}: {self.tiles} tiles in {self.sources} source(s) "
            f"({self.sources_skipped} already done) | {self.kept_original} original bytes kept, "
            f"{self.reencoded} re-encoded losslessly ({self.resampled} resampled) | {self.seconds:.1f} s"
        ]
        if self.labels:
            lines.append("  labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())))
        for reason, files in sorted(self.skipped.items()):
            shown = ", ".join(files[:5]) + (f", ... ({len(files) - 5} more)" if len(files) > 5 else "")
            lines.append(f"  SKIPPED {len(files)} [{reason}]: {shown}")
        if self.label_table_unmatched:
            lines.append(f"  label table rows matching no tile: {len(self.label_table_unmatched)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


def _discover_folders(cfg: IngestConfig, summary: IngestSummary) -> list[TileRecord]:
    records = []
    for root in cfg.inputs.folders:
        root = Path(root)
        if not root.is_dir():
            raise IngestError(f"input folder {root} does not exist")
        for entry in sorted(root.iterdir()):
            if entry.is_file():
                summary.skip("file outside a class folder", str(entry))
                continue
            for f in sorted(p for p in entry.rglob("*") if p.is_file()):
                rel = f.relative_to(root).as_posix()
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    if cfg.non_images == "refuse":
                        raise IngestError(f"{f} is not an image file (non_images=refuse)")
                    summary.skip("not an image file", str(f))
                    continue
                records.append(TileRecord(f, rel, f"folder:{root.name}", entry.name, where=str(f)))
    return records


def _read_csv(path: Path, cfg: IngestConfig) -> list[TileRecord]:
    if not path.is_file():
        raise IngestError(f"CSV {path} does not exist")
    reader = csv.DictReader(path.read_text().splitlines())
    columns = set(reader.fieldnames or [])
    need = {"path"}
    if cfg.identity.rule == "columns":
        need |= {"patient_id", "slide_id"}
    if cfg.grid.source_mpp is None:
        need.add("mpp")
    missing = sorted(need - columns)
    if missing:
        raise IngestError(
            f"CSV {path} lacks column(s) {missing} (has {sorted(columns)}); expected {', '.join(CSV_COLUMNS)}"
            + ("; or set grid.source_mpp" if "mpp" in missing else "")
            + (
                "; or choose an identity.rule that derives identity"
                if {"patient_id", "slide_id"} & set(missing)
                else ""
            )
        )
    records, seen = [], {}
    for line, row in enumerate(reader, start=2):
        values = {k: (row.get(k) or "").strip() for k in CSV_COLUMNS}
        empty = sorted(k for k in need if not values[k])
        if empty:
            raise IngestError(f"CSV {path} line {line}: empty {empty}")
        rel = values["path"]
        if rel in seen:
            raise IngestError(f"CSV {path} line {line}: path {rel!r} is already on line {seen[rel]}")
        seen[rel] = line
        try:
            mpp = float(values["mpp"]) if values["mpp"] else None
        except ValueError:
            raise IngestError(f"CSV {path} line {line}: mpp {values['mpp']!r} is not a number") from None
        file = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        records.append(
            TileRecord(
                file,
                rel,
                f"csv:{path.stem}",
                values["label"] or None,
                values["patient_id"] or None,
                values["slide_id"] or None,
                values["site"] or None,
                mpp,
                "csv column mpp" if mpp is not None else None,
                where=f"line {line} of {path}",
            )
        )
    return records


def _apply_label_table(cfg: IngestConfig, records: list[TileRecord], summary: IngestSummary) -> str | None:
    """Replace labels from ``inputs.label_table``; returns its sha256 (the table is data)."""
    path = cfg.inputs.label_table
    if path is None:
        return None
    if not Path(path).is_file():
        raise IngestError(f"label table {path} does not exist")
    reader = csv.DictReader(Path(path).read_text().splitlines())
    columns = set(reader.fieldnames or [])
    key_col = "path" if "path" in columns else "key" if "key" in columns else None
    if key_col is None or "label" not in columns:
        raise IngestError(f"label table {path} needs columns (path or key) and label; has {sorted(columns)}")
    table: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        k, label = (row.get(key_col) or "").strip(), (row.get("label") or "").strip()
        if not k or not label:
            raise IngestError(f"label table {path} line {line}: empty {key_col} or label")
        if k in table:
            raise IngestError(f"label table {path} line {line}: {key_col} {k!r} appears twice")
        table[k] = label
    matched = set()
    for r in records:
        k = r.rel if key_col == "path" else r.key
        if k in table:
            r.label = table[k]
            matched.add(k)
    if not matched:
        raise IngestError(
            f"label table {path} matches no tile (by {key_col}; e.g. a tile's {key_col} is "
            f"{(records[0].rel if key_col == 'path' else records[0].key) if records else None!r}, the table's "
            f"first is {next(iter(table), None)!r})"
        )
    summary.label_table_unmatched = sorted(set(table) - matched)
    return sha256_file(Path(path))


def _settle_identity(cfg: IngestConfig, r: TileRecord) -> None:
    ident = cfg.identity
    stem = Path(r.rel).name.rsplit(".", 1)[0]
    if ident.rule == "columns":
        if not (r.slide_id and r.patient_id):
            raise IngestError(
                f"{r.where}: no patient_id/slide_id (class folders carry none). Give them in a CSV, or state how "
                f"to derive them: identity.rule=per_tile (each tile its own patient) or identity.rule=pattern"
            )
        r.identity_source = "table"
    elif ident.rule == "per_tile":
        r.slide_id = r.slide_id or _UNSAFE.sub("_", stem)
        r.patient_id = r.patient_id or r.slide_id
        r.identity_source = "per_tile (stated: one patient per tile)"
    else:
        match = re.search(ident.pattern or "", Path(r.rel).name)
        if match is None or not match.groupdict().get("slide"):
            raise IngestError(f"{r.where}: identity.pattern {ident.pattern!r} does not match the file name")
        r.slide_id = r.slide_id or match.group("slide")
        patient = match.groupdict().get("patient")
        r.patient_id = r.patient_id or patient or r.slide_id
        r.identity_source = "pattern" if patient else "pattern (stated: one patient per slide)"
    r.site = r.site or ident.site
    r.project = ident.project or r.origin.split(":", 1)[1]
    r.slide_id = _UNSAFE.sub("_", r.slide_id or "")


# --------------------------------------------------------------------------------------------------
# Inspection: bytes, header, geometry, codec decision
# --------------------------------------------------------------------------------------------------


def _geometry(cfg: IngestConfig, r: TileRecord) -> dict[str, Any] | str:
    """What to do with the tile's pixels, or a reason to leave it out."""
    g = cfg.grid
    w, h = r.size
    m = r.mpp
    same_mpp = abs(m - g.mpp) / g.mpp <= g.mpp_tolerance
    if (w, h) == (g.tile_px, g.tile_px) and same_mpp:
        return {"resample": "none", "read": (0, 0, w, h), "resize": None}
    what = f"{w}×{h} px at {m:g} µm/px, target {g.tile_px} px at {g.mpp:g} µm/px"
    if g.mismatch in ("refuse", "skip"):
        return f"other size or mpp ({what})"
    if g.mismatch == "stretch":
        method = "box" if w >= g.tile_px and h >= g.tile_px else "bicubic"
        return {"resample": f"stretch-{method}", "read": (0, 0, w, h), "resize": (g.tile_px, g.tile_px)}
    scale = m / g.mpp  # target px per source px
    nw, nh = round(w * scale), round(h * scale)
    if nw < g.tile_px or nh < g.tile_px:
        return f"field of view too small ({what}: {w * m:.0f}×{h * m:.0f} µm < {g.tile_px * g.mpp:.0f} µm)"
    side = g.tile_px / scale  # source px covered by the tile
    x0, y0 = round((w - side) / 2), round((h - side) / 2)
    read = (x0, y0, round(side), round(side))
    resize = None if (read[2], read[3]) == (g.tile_px, g.tile_px) else (g.tile_px, g.tile_px)
    if resize is None:  # same scale: a centre crop when the source is larger, nothing otherwise
        method = "none" if read == (0, 0, w, h) else "crop"
    else:
        method = "box" if scale < 1 else "bicubic"
    return {"resample": method, "read": read, "resize": resize}


def _inspect(cfg: IngestConfig, r: TileRecord, summary: IngestSummary) -> bool:
    """Hash the file, read its header, decide keep/re-encode; False (counted) when it is left out."""
    try:
        data = r.path.read_bytes()
    except OSError as err:
        if cfg.unreadable == "refuse":
            raise IngestError(f"{r.where}: cannot read {r.path}: {err}") from None
        summary.skip("unreadable file", f"{r.path} ({err.strerror or err})")
        return False
    r.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            r.format, r.mode, r.size = img.format or "?", img.mode, img.size
            img.load()  # a truncated or corrupt file fails here, not in training
    except Exception as err:
        if cfg.unreadable == "refuse":
            raise IngestError(f"{r.where}: {r.path} is not a readable image: {err}") from None
        summary.skip("not a readable image", f"{r.path} ({type(err).__name__})")
        return False
    if r.mpp is None:
        if cfg.grid.source_mpp is None:
            raise IngestError(f"{r.where}: no mpp for {r.rel}: add an mpp column or set grid.source_mpp")
        r.mpp, r.mpp_source = cfg.grid.source_mpp, "grid.source_mpp"
    geometry = _geometry(cfg, r)
    if isinstance(geometry, str):
        if cfg.grid.mismatch == "refuse":
            raise IngestError(f"{r.where}: {geometry}; set grid.mismatch (skip, resample or stretch)")
        summary.skip(geometry.split(" (")[0], f"{r.path} ({geometry})")
        return False
    r.geometry = geometry
    fmt = _PIL_FORMAT.get(r.format)
    if fmt in cfg.codec.keep_original and r.mode == "RGB" and geometry["resample"] == "none":
        r.action = "keep"
    else:
        r.action = "reencode"
        r.reason = (
            f"resampled ({geometry['resample']})"
            if geometry["resample"] != "none"
            else f"mode {r.mode} → RGB"
            if r.mode != "RGB"
            else f"{r.format} is not kept as is (codec.keep_original: {cfg.codec.keep_original})"
        )
    return True


def _output_extension(cfg: IngestConfig, r: TileRecord) -> str:
    return EXTENSION[_PIL_FORMAT[r.format]] if r.action == "keep" else EXTENSION[cfg.codec.reencode.format]


# --------------------------------------------------------------------------------------------------
# Writing one source
# --------------------------------------------------------------------------------------------------


def _kept_codec(r: TileRecord, data: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {
        "format": _PIL_FORMAT[r.format],
        "origin": "original bytes, kept byte for byte",
        "lossless": r.format != "JPEG",
        "source_sha256": r.sha256,
    }
    if r.format == "JPEG":
        from PIL import JpegImagePlugin

        with Image.open(io.BytesIO(data)) as img:
            sampling = JpegImagePlugin.get_sampling(img)
        out["subsampling"] = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}.get(sampling, "unknown")
        out["quality"] = None  # not stored in a JPEG file; its quantisation tables are in the bytes
    return out


def _tile_bytes(r: TileRecord, data: bytes, encoder: TileEncoder) -> tuple[bytes, dict[str, Any]]:
    if r.action == "keep":
        return data, _kept_codec(r, data)
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    x, y, w, h = r.geometry["read"]
    region = rgb.crop((x, y, x + w, y + h))
    if r.geometry["resize"] is not None:
        method = Image.BOX if r.geometry["resample"].endswith("box") else Image.BICUBIC
        region = region.resize(r.geometry["resize"], method)
    codec = encoder.settings | {"origin": "re-encoded", "reason": r.reason, "source_format": r.format}
    return encoder.encode(np.asarray(region)), codec


def _source_signature(cfg: IngestConfig, records: list[TileRecord], table_sha: str | None) -> str:
    return config_hash(
        {
            "settings": cfg.output_settings(),
            "label_table": table_sha,
            "tiles": [
                [
                    r.rel,
                    r.origin,
                    r.sha256,
                    r.label,
                    r.patient_id,
                    r.site,
                    r.project,
                    r.mpp,
                    r.identity_source,
                ]
                for r in records
            ],
        }
    )


def _is_done(folder: Path, signature: str) -> bool:
    try:
        state = json.loads((folder / SLIDE_STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return state.get("status") == "done" and state.get("signature") == signature


def _write_source(
    cfg: IngestConfig, sid: str, records: list[TileRecord], signature: str, table: dict | None
) -> dict[str, int]:
    folder = slide_dir(cfg.output, sid)
    if folder.exists():
        shutil.rmtree(folder)  # a previous attempt (crashed, or other inputs): redo it whole
    folder.mkdir(parents=True)
    encoder = TileEncoder(cfg.codec.reencode)
    first = records[0]
    identity = {
        "slide_id": sid,
        "patient_id": first.patient_id,
        "tss": first.site,
        "project": first.project,
        "identity_source": first.identity_source,
    }
    writer = ShardWriter(folder, lambda i: f"{sid}-{i:06d}.tar", max_samples=cfg.max_samples_per_shard)
    counts = Counter(kept=0, reencoded=0, resampled=0)
    g = cfg.grid
    try:
        for r in records:
            data = r.path.read_bytes()
            if hashlib.sha256(data).hexdigest() != r.sha256:
                raise IngestError(f"{r.path} changed while ingest was running")
            image, codec = _tile_bytes(r, data, encoder)
            x, y, w, h = r.geometry["read"]
            meta = identity | {
                "patient_id": r.patient_id,
                "tss": r.site,
                "x": x,
                "y": y,
                "level": 0,
                "downsample": 1.0,
                "level_size": list(r.size),
                "read_size": [w, h],
                "source_mpp": [r.mpp, r.mpp],
                "mpp_source": r.mpp_source,
                "mpp": g.mpp,
                "effective_mpp": [round(w * r.mpp / g.tile_px, 6), round(h * r.mpp / g.tile_px, 6)],
                "tile_px": g.tile_px,
                "resample": r.geometry["resample"],
                "tissue_fraction": None,  # not measured: the dataset's authors chose these tiles
                "codec": codec,
                "label": r.label,
                "source": {
                    "file": r.rel,
                    "input": r.origin,
                    "sha256": r.sha256,
                    "format": r.format,
                    "mode": r.mode,
                    "size": list(r.size),
                },
            }
            ext = EXTENSION[codec["format"]]
            writer.write({"__key__": r.key, ext: image, "json": canonical_json(meta)})
            counts["kept" if r.action == "keep" else "reencoded"] += 1
            counts["resampled"] += r.geometry["resample"] != "none"
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    state = {
        "slide_id": sid,
        "slide_path": ", ".join(sorted({r.origin for r in records})),
        "identity": identity,
        "signature": signature,
        "settings_hash": config_hash(cfg.output_settings()),
        "code_version": code_version(),
        "status": "done",
        "tiles": len(records),
        "shards": [s.as_dict() for s in shards],
        "label_table": table,
        "ingest": dict(counts),
    }
    atomic_write_text(folder / SLIDE_STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
    return counts


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run_ingest(cfg: IngestConfig) -> IngestSummary:
    """Ingest class folders / CSVs into ``cfg.output`` (see the module docstring)."""
    t0 = time.perf_counter()
    summary = IngestSummary(output=str(cfg.output))
    records = _discover_folders(cfg, summary)
    for path in cfg.inputs.csv:
        records += _read_csv(Path(path), cfg)
    if not records:
        raise IngestError(
            "no image files found in the inputs" + (f" ({summary.report()})" if summary.skipped else "")
        )
    table_sha = _apply_label_table(cfg, records, summary)
    for r in records:
        _settle_identity(cfg, r)
    keys = Counter(r.key for r in records)
    clash = sorted(k for k, n in keys.items() if n > 1)
    if clash:
        raise IngestError(f"{len(clash)} tile key(s) collide after sanitising file names, e.g. {clash[0]!r}")
    kept = [r for r in records if _inspect(cfg, r, summary)]
    if not kept:
        raise IngestError(f"no tiles left to write: every file was skipped\n{summary.report()}")
    patients = defaultdict(set)
    by_source: dict[str, list[TileRecord]] = defaultdict(list)
    for r in kept:
        by_source[r.slide_id].append(r)
        patients[r.slide_id].add(r.patient_id)
    for sid, items in by_source.items():
        for attr in ("patient_id", "site", "project"):
            values = sorted({str(getattr(r, attr)) for r in items})
            if len(values) > 1:
                raise IngestError(f"source (slide) {sid!r} has tiles with several {attr}s: {values[:5]}")
    extensions = Counter(_output_extension(cfg, r) for r in kept)
    if len(extensions) > 1:
        raise IngestError(
            f"the tiles would be stored in several formats ({dict(extensions)}), but a split holds one image "
            f"format: set codec.keep_original to the one format to keep (others are re-encoded losslessly as "
            f"{cfg.codec.reencode.format}) or [] to re-encode all"
        )
    cfg.output.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, cfg.output / "ingest_config.yaml")
    table = (
        {"path": str(cfg.inputs.label_table), "sha256": table_sha}
        if cfg.inputs.label_table is not None
        else None
    )
    for sid in sorted(by_source):
        items = sorted(by_source[sid], key=lambda r: r.key)
        signature = _source_signature(cfg, items, table_sha)
        summary.sources += 1
        summary.tiles += len(items)
        for r in items:
            summary.labels[str(r.label)] = summary.labels.get(str(r.label), 0) + 1
        if _is_done(slide_dir(cfg.output, sid), signature):
            summary.sources_skipped += 1
            continue
        counts = _write_source(cfg, sid, items, signature, table)
        summary.kept_original += counts["kept"]
        summary.reencoded += counts["reencoded"]
        summary.resampled += counts["resampled"]
    summary.seconds = round(time.perf_counter() - t0, 3)
    atomic_write_text(
        cfg.output / SUMMARY_FILE,
        json.dumps(
            {
                "tiles": summary.tiles,
                "sources": summary.sources,
                "labels": dict(sorted(summary.labels.items())),
                "skipped": summary.skipped,
                "label_table": table,
                "label_table_unmatched": summary.label_table_unmatched,
                "pillow": PIL.__version__,
                "code_version": code_version(),
            },
            indent=2,
        )
        + "\n",
    )
    return summary
