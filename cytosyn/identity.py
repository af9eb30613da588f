"""Who a slide belongs to: patient, tissue source site (TSS), project/cohort.

Splits are made by patient, so identity is decided once, here, and recorded in every tile. TCGA
barcodes carry it (``TCGA-XX-YYYY-...``: patient = first 12 characters, TSS = characters 6-7); other
slides need a user table with ``slide_id, patient_id, site, cohort`` (``project`` is accepted for
``cohort``). A slide that is neither gets ``identity_source = "slide_id"`` (each slide its own patient),
which ``pack`` refuses unless told otherwise, because a patient with two such slides would leak.
"""

from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass
from pathlib import Path

_TCGA = re.compile(r"^(TCGA-([A-Z0-9]{2})-[A-Z0-9]{4})", re.IGNORECASE)


@dataclass(frozen=True)
class SlideIdentity:
    slide_id: str
    patient_id: str
    tss: str
    project: str
    identity_source: str  # "table", "tcga_barcode" or "slide_id"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class TableRow:
    patient_id: str | None
    site: str | None
    project: str | None


class SlideTableError(ValueError):
    """A slide table that cannot be trusted (missing columns, duplicate slides)."""


def parse_tcga_barcode(slide_id: str) -> tuple[str, str] | None:
    """Return (patient_id, tss) of a TCGA slide id, or None if it is not a TCGA barcode."""
    match = _TCGA.match(slide_id)
    if match is None:
        return None
    return match.group(1).upper(), match.group(2).upper()


def read_slide_table(path: str | Path) -> dict[str, TableRow]:
    """Read a CSV/TSV slide table keyed by ``slide_id``; duplicate slide ids are an error."""
    path = Path(path)
    if not path.is_file():
        raise SlideTableError(f"slide table {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often write a BOM
    dialect = csv.excel_tab if path.suffix.lower() in {".tsv", ".tab"} else csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    columns = set(reader.fieldnames or [])
    if "slide_id" not in columns:
        raise SlideTableError(f"slide table {path} has no 'slide_id' column (columns: {sorted(columns)})")
    rows: dict[str, TableRow] = {}
    for line_no, raw in enumerate(reader, start=2):
        slide_id = (raw.get("slide_id") or "").strip()
        if not slide_id:
            raise SlideTableError(f"slide table {path} line {line_no}: empty slide_id")
        if slide_id in rows:
            raise SlideTableError(f"slide table {path} line {line_no}: duplicate slide_id {slide_id!r}")
        project = (raw.get("cohort") or raw.get("project") or "").strip() or None
        rows[slide_id] = TableRow(
            patient_id=(raw.get("patient_id") or "").strip() or None,
            site=(raw.get("site") or raw.get("tss") or "").strip() or None,
            project=project,
        )
    return rows


def resolve_identity(
    slide_id: str,
    table: dict[str, TableRow] | None = None,
    folder_project: str | None = None,
) -> SlideIdentity:
    """Combine the table (wins), the TCGA barcode and the slide's folder into one identity."""
    row = (table or {}).get(slide_id)
    tcga = parse_tcga_barcode(slide_id)
    patient = row.patient_id if row and row.patient_id else (tcga[0] if tcga else None)
    tss = row.site if row and row.site else (tcga[1] if tcga else "unknown")
    project = row.project if row and row.project else (folder_project or "unknown")
    if row and row.patient_id:
        source = "table"
    elif tcga:
        source = "tcga_barcode"
    else:
        source = "slide_id"
    return SlideIdentity(
        slide_id=slide_id,
        patient_id=patient or slide_id,
        tss=tss,
        project=project,
        identity_source=source,
    )
