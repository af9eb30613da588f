"""The inputs of ``cytosyn pack``: which slides of the tiling folders it may use, and who they belong to.

Reads every ``slides/<id>/state.json`` under the configured tiling folders: slides whose state is
``done`` are used, failed / unfinished / unreadable ones are listed (never silently dropped); the slide
table (if any) overrides the identity the tiler recorded (patient, TSS, project), and its rows for slides
without tiles are counted; a slide without a known patient is refused unless
``inputs.allow_slide_patients`` says each slide is its own patient (two slides of one patient would leak
across splits). Every input shard must exist with the size its state records. The result, with the pack's
settings, makes the signature that decides whether a rerun is a no-op.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cytosyn.data_prep.pack_config import PackConfig

from cytosyn.config import ConfigError, config_hash
from cytosyn.fileio import sha256_file
from cytosyn.formats import SLIDE_STATE_FILE, SLIDES_DIR
from cytosyn.identity import TableRow, read_slide_table

LIST_SHOWN = 10  # items named in a message before "... (N more)"


class PackError(ValueError):
    """Inputs or an output folder that ``pack`` refuses; the message says what is wrong and where."""


def listing(items: list[str], n: int = LIST_SHOWN) -> str:
    """The first ``n`` items, comma-separated, then how many more (messages stay readable at 10,000 slides)."""
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


@dataclass
class SlideInput:
    slide_id: str
    folder: Path
    patient_id: str
    tss: str
    project: str
    identity_source: str
    tiles: int
    shards: list[dict[str, Any]]  # from state.json: name, count, bytes, sha256
    signature: str
    settings_hash: str
    tile_identity: dict[str, Any]  # the identity recorded by the tiler (and in every tile's JSON)
    label_table: dict[str, Any] | None = None  # {path, sha256} of the label table ingest applied


@dataclass
class Inputs:
    slides: list[SlideInput]
    excluded: list[dict[str, str]]  # slide_id, folder, status, error
    unknown_table_rows: list[str]
    identity_overrides: list[str]
    table_sha256: str | None
    found: int


_IDENTITY_KEYS = ("patient_id", "tss", "project", "identity_source")


def _apply_table(identity: dict[str, Any], row: TableRow | None) -> dict[str, str]:
    out = {k: str(identity[k]) for k in _IDENTITY_KEYS}
    if row is not None:
        if row.patient_id:
            out["patient_id"] = row.patient_id
            out["identity_source"] = "table"
        if row.site:
            out["tss"] = row.site
        if row.project:
            out["project"] = row.project
    return out


def collect_inputs(cfg: PackConfig) -> Inputs:
    """Read every slide state of the tiling folders and settle each usable slide's identity."""
    if not cfg.inputs.tiles:
        raise ConfigError("no input: set inputs.tiles to one or more `cytosyn tile` output folders")
    table: dict[str, TableRow] = {}
    table_sha = None
    if cfg.inputs.slide_table is not None:
        table = read_slide_table(cfg.inputs.slide_table)
        table_sha = sha256_file(cfg.inputs.slide_table)

    seen: dict[str, Path] = {}
    usable: list[SlideInput] = []
    excluded: list[dict[str, str]] = []
    for tiles_dir in cfg.inputs.tiles:
        root = Path(tiles_dir) / SLIDES_DIR
        if not root.is_dir():
            raise PackError(
                f"input {tiles_dir} has no {SLIDES_DIR}/ folder: is it a `cytosyn tile` output folder?"
            )
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            sid = folder.name
            if sid in seen:
                raise PackError(f"slide {sid!r} is in two input folders: {seen[sid]} and {folder}")
            seen[sid] = folder
            state_path = folder / SLIDE_STATE_FILE
            if not state_path.is_file():
                excluded.append(
                    {
                        "slide_id": sid,
                        "folder": str(folder),
                        "status": "unfinished",
                        "error": "no state.json (tiling never finished)",
                    }
                )
                continue
            try:
                state = json.loads(state_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                excluded.append(
                    {
                        "slide_id": sid,
                        "folder": str(folder),
                        "status": "unreadable",
                        "error": f"state.json: {err}",
                    }
                )
                continue
            status = str(state.get("status"))
            if status != "done":
                error = f"{state.get('error_type', '')}: {state.get('error', '')}".strip(": ")
                excluded.append({"slide_id": sid, "folder": str(folder), "status": status, "error": error})
                continue
            slide = _usable_slide(sid, folder, state, table.get(sid))
            if slide.tiles == 0:
                excluded.append(
                    {"slide_id": sid, "folder": str(folder), "status": "empty", "error": "done, but no tiles"}
                )
                continue
            usable.append(slide)

    unknown = sorted(set(table) - set(seen))
    overrides = sorted(
        s.slide_id
        for s in usable
        if any(str(s.tile_identity.get(k)) != getattr(s, k) for k in _IDENTITY_KEYS if k != "identity_source")
    )
    unpatiented = sorted(s.slide_id for s in usable if s.identity_source == "slide_id")
    if unpatiented and not cfg.inputs.allow_slide_patients:
        raise PackError(
            f"{len(unpatiented)} slide(s) have no known patient (identity_source 'slide_id': not a TCGA barcode "
            f"and no patient_id in a slide table): {listing(unpatiented)}. Two slides of one patient would leak "
            "across splits. Give their patient_id in inputs.slide_table, or set inputs.allow_slide_patients=true "
            "to treat each slide as its own patient."
        )
    if cfg.inputs.require_all_done and excluded:
        raise PackError(
            f"{len(excluded)} slide(s) are not done and inputs.require_all_done is set: "
            + listing([f"{e['slide_id']} ({e['status']})" for e in excluded])
        )
    return Inputs(usable, excluded, unknown, overrides, table_sha, len(seen))


def _usable_slide(sid: str, folder: Path, state: dict[str, Any], row: TableRow | None) -> SlideInput:
    where = folder / SLIDE_STATE_FILE
    if state.get("slide_id", sid) != sid:
        raise PackError(f"{where} is for slide {state.get('slide_id')!r}, but lies in the folder of {sid!r}")
    identity = state.get("identity")
    if not isinstance(identity, dict) or any(k not in identity for k in _IDENTITY_KEYS):
        raise PackError(f"{where} has no complete identity ({', '.join(_IDENTITY_KEYS)})")
    shards = state.get("shards")
    if not isinstance(shards, list) or not shards:
        raise PackError(f"{where} is done but lists no shards")
    for s in shards:
        if not isinstance(s, dict) or any(k not in s for k in ("name", "count", "bytes", "sha256")):
            raise PackError(f"{where}: a shard entry lacks name/count/bytes/sha256: {s!r}")
        path = folder / s["name"]
        if not path.is_file():
            raise PackError(f"input shard {path} is missing (listed in {where}); re-tile slide {sid}")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise PackError(
                f"input shard {path} has {size} bytes but {where} says {s['bytes']}: truncated or replaced "
                f"after tiling; re-tile slide {sid}"
            )
    tiles = sum(int(s["count"]) for s in shards)
    if "tiles" in state and int(state["tiles"]) != tiles:
        raise PackError(f"{where}: tiles={state['tiles']} but its shards hold {tiles}")
    ident = _apply_table(identity, row)
    return SlideInput(
        slide_id=sid,
        folder=folder,
        patient_id=ident["patient_id"],
        tss=ident["tss"],
        project=ident["project"],
        identity_source=ident["identity_source"],
        tiles=tiles,
        shards=shards,
        signature=str(state.get("signature", "")),
        settings_hash=str(state.get("settings_hash", "")),
        tile_identity=identity,
        label_table=state.get("label_table"),
    )


def slide_provenance(s: SlideInput) -> dict[str, Any]:
    return {
        "signature": s.signature,
        "settings_hash": s.settings_hash,
        "shards": [
            {"name": sh["name"], "count": int(sh["count"]), "sha256": sh["sha256"]} for sh in s.shards
        ],
    }


def pack_signature(cfg: PackConfig, inputs: Inputs) -> str:
    """Identity of a pack: settings, every input slide (state signature, shard hashes, identity), the table."""
    return config_hash(
        {
            "settings": cfg.output_settings(),
            "slides": {
                s.slide_id: slide_provenance(s)
                | {"identity": [s.patient_id, s.tss, s.project, s.identity_source]}
                for s in inputs.slides
            },
            "excluded": sorted((e["slide_id"], e["status"]) for e in inputs.excluded),
            "slide_table_sha256": inputs.table_sha256,
        }
    )
