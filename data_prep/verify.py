"""``cytosyn pack --verify``: check a packed dataset after the fact, reading every shard in full.

What it checks (each failure is a *violation*; the report lists them all rather than stopping at the
first): the pack finished (``pack_summary.json``), every split listed there has its manifest, every
shard's sha256, size and sample count match its manifest entry, every sample has its image and a JSON
whose slide belongs to the split, keys are unique within a split, and no patient or slide is in two
splits — by the manifests' lists and by the tiles' own JSON. Also counts patients / slides / tiles per
split, per project and per TSS (the table ``cytosyn pack --verify`` prints).

Kept apart from :mod:`cytosyn.data_prep.pack` (which writes datasets) because it only reads them: it is
what a user runs on a dataset copied from elsewhere, and what the tests run after every pack.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cytosyn.data_prep.pack import SUMMARY_FILE, iter_tar_samples, key_hash
from cytosyn.data_prep.pack_inputs import LIST_SHOWN, PackError
from tqdm import tqdm

from cytosyn.fileio import sha256_file
from cytosyn.manifest import MANIFEST_FILE, ManifestError, SplitManifest, read_manifest
from cytosyn.shardio import read_sample_digests, sample_digest

__all__ = ["VerifyReport", "verify_dataset"]


@dataclass
class VerifyReport:
    dataset: str
    violations: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # patients, slides, tiles, shards
    by_project: dict[str, dict[str, list[int]]] = field(
        default_factory=dict
    )  # project → split → [patients, slides, tiles]
    by_tss: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def raise_for_violations(self) -> None:
        if self.violations:
            raise PackError(
                f"dataset {self.dataset} failed verification:\n"
                + "\n".join(f"  {v}" for v in self.violations)
            )

    def report(self) -> str:
        names = list(self.splits)
        head = "OK" if self.ok else f"FAILED ({len(self.violations)} violation(s))"
        lines = [f"dataset {self.dataset}: {head}"]
        lines += [f"  VIOLATION: {v}" for v in self.violations]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines.append("")
        lines.append(f"{'split':<14}{'patients':>10}{'slides':>8}{'tiles':>12}{'shards':>8}")
        for name, s in self.splits.items():
            lines.append(f"{name:<14}{s['patients']:>10}{s['slides']:>8}{s['tiles']:>12}{s['shards']:>8}")
        for title, table in (("project", self.by_project), ("TSS", self.by_tss)):
            lines.append("")
            lines.append(f"per {title}: patients / slides / tiles")
            width = max([len(title), *(len(k) for k in table)]) + 2
            cells = (
                {
                    n: max(
                        len(n), *(len("/".join(map(str, row.get(n, [0, 0, 0])))) for row in table.values())
                    )
                    + 2
                    for n in names
                }
                if table
                else {}
            )
            lines.append(f"{title:<{width}}" + "".join(f"{n:>{cells[n]}}" for n in names))
            for key, row in table.items():
                lines.append(
                    f"{key:<{width}}"
                    + "".join(f"{'/'.join(map(str, row.get(n, [0, 0, 0]))):>{cells[n]}}" for n in names)
                )
        return "\n".join(lines)


def verify_dataset(dataset_dir: str | Path, *, progress: bool = True) -> VerifyReport:
    """Check a packed dataset: disjoint patients and slides, every shard's sha256 and count, stats.

    Every shard is read in full: its sha256 and size must match the manifest, its samples (counted in
    the tar) must match the manifest's count, each sample must have the image member and a JSON whose
    slide is one of the split's slides, and keys must be unique in the split. Patients must not be in
    two splits, by the manifests' lists and by the tiles' own JSON.
    """
    root = Path(dataset_dir)
    rep = VerifyReport(dataset=str(root))
    split_dirs = sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).is_file()) if root.is_dir() else []
    try:  # list splits in the order pack made them (train, val, test, ...) when it says so
        order = list(json.loads((root / SUMMARY_FILE).read_text()).get("splits", {}))
    except (OSError, ValueError, AttributeError):
        order = []
    split_dirs.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    if not (root / SUMMARY_FILE).is_file():
        rep.violations.append(
            f"no {SUMMARY_FILE} under {root}: the pack did not finish (killed before its manifests and summary "
            "were all written?); run the same pack command again"
        )
    present = {d.name for d in split_dirs}
    for name in order:
        if name not in present:
            rep.violations.append(
                f"split {name}: manifest missing ({root / name / MANIFEST_FILE}), though {SUMMARY_FILE} lists it"
            )
    if not split_dirs:
        rep.violations.append(f"no split manifest ({MANIFEST_FILE}) under {root}")
        return rep

    manifests: dict[str, SplitManifest] = {}
    for d in split_dirs:
        try:
            manifests[d.name] = read_manifest(d)
        except (ManifestError, ValueError) as err:
            rep.violations.append(f"split {d.name}: {err}")
    for name, m in manifests.items():
        if m.split != name:
            rep.violations.append(f"folder {name}/ holds the manifest of split {m.split!r}")

    total_shards = sum(len(m.shards) for m in manifests.values())
    bar = tqdm(total=total_shards, unit="shard", desc="verify", disable=not progress, dynamic_ncols=True)
    json_patients: dict[str, set[str]] = {}
    slide_tiles: dict[str, dict[str, int]] = {}
    try:
        for name, m in manifests.items():
            json_patients[name], slide_tiles[name] = _verify_split(root / name, m, rep, bar)
    finally:
        bar.close()

    _check_disjoint(rep, {n: set(m.patients) for n, m in manifests.items()}, "patient", "manifest")
    _check_disjoint(rep, {n: set(m.slides) for n, m in manifests.items()}, "slide", "manifest")
    _check_disjoint(rep, json_patients, "patient", "tile JSON")

    for name, m in manifests.items():
        per_slide = m.stats.get("per_slide", {}) if isinstance(m.stats, dict) else {}
        tiles = slide_tiles[name]
        patients: set[str] = set()
        for sid in m.slides:
            info = per_slide.get(sid, {})
            proj, tss, pat = info.get("project", "?"), info.get("tss", "?"), info.get("patient_id", "?")
            patients.add(pat)
            n = tiles.get(sid, 0)
            for table, k in ((rep.by_project, proj), (rep.by_tss, tss)):
                cell = table.setdefault(k, {}).setdefault(name, [set(), 0, 0])
                cell[0].add(pat)
                cell[1] += 1
                cell[2] += n
            if info and "tiles" in info and info["tiles"] != n:
                rep.violations.append(
                    f"split {name}: slide {sid} has {n} tiles in the shards, manifest stats say {info['tiles']}"
                )
        rep.splits[name] = {
            "patients": len(m.patients),
            "slides": len(m.slides),
            "tiles": sum(tiles.values()),
            "shards": len(m.shards),
        }
    for table in (rep.by_project, rep.by_tss):
        for k in list(table):
            table[k] = {n: [len(c[0]), c[1], c[2]] for n, c in table[k].items()}
        sorted_items = sorted(table.items())
        table.clear()
        table.update(sorted_items)
    return rep


def _verify_split(folder: Path, m: SplitManifest, rep: VerifyReport, bar) -> tuple[set[str], dict[str, int]]:
    name = m.split
    slides = set(m.slides)
    patients: set[str] = set()
    tiles: dict[str, int] = defaultdict(int)
    keys: list[int] = []
    listed = {s.name for s in m.shards}
    for f in sorted(folder.glob("*.tar")):
        if f.name not in listed:
            rep.warnings.append(f"split {name}: {f.name} is not listed in the manifest (ignored by loaders)")
    counts = [s.count for s in m.shards]
    size = (m.config.get("shards") or {}).get("samples_per_shard") or (counts[0] if counts else 0)
    if any(c != size for c in counts[:-1]) or (counts and not 0 < counts[-1] <= size):
        rep.violations.append(
            f"split {name}: shards are not fixed-count ({size} each but the last; counts {counts[:5]}...{counts[-1:]})"
        )
    for entry in m.shards:
        path = folder / entry.name
        bar.update(1)
        if not path.is_file():
            rep.violations.append(f"split {name}: shard {entry.name} is missing")
            continue
        if path.stat().st_size != entry.bytes:
            rep.violations.append(
                f"split {name}: shard {entry.name} has {path.stat().st_size} bytes, manifest says {entry.bytes}"
            )
        count = 0
        reader = None
        digests = None
        if entry.digests is not None:
            digests = read_sample_digests(folder / entry.digests, entry.digests_sha256)
            if digests is None:
                rep.violations.append(
                    f"split {name}: {entry.digests} is missing or does not match the manifest"
                )
        damaged = 0
        try:
            for (key, members), reader in iter_tar_samples(path):  # noqa: B007
                if digests is not None and (
                    count >= len(digests) or sample_digest(key, members) != digests[count]
                ):
                    damaged += 1
                count += 1
                keys.append(key_hash(key))
                exts = [e for e, _ in members]
                if m.image_member not in exts or "json" not in exts:
                    rep.violations.append(
                        f"split {name}: {entry.name}: sample {key!r} lacks {m.image_member} or json ({exts})"
                    )
                    continue
                try:
                    meta = json.loads(next(d for e, d in members if e == "json"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    rep.violations.append(f"split {name}: {entry.name}: sample {key!r} has unreadable JSON")
                    continue
                sid = meta.get("slide_id")
                if sid not in slides:
                    rep.violations.append(
                        f"split {name}: {entry.name}: sample {key!r} is from slide {sid!r}, not in the manifest"
                    )
                tiles[str(sid)] += 1
                if meta.get("patient_id") is not None:
                    patients.add(str(meta["patient_id"]))
        except PackError as err:
            rep.violations.append(f"split {name}: {err}")
            continue
        digest = reader.sha.hexdigest() if reader is not None else sha256_file(path)
        if digest != entry.sha256:
            rep.violations.append(
                f"split {name}: shard {entry.name} sha256 {digest[:16]}... != manifest {entry.sha256[:16]}..."
            )
        if count != entry.count:
            rep.violations.append(
                f"split {name}: shard {entry.name} holds {count} samples, manifest says {entry.count}"
            )
        if damaged:
            rep.violations.append(
                f"split {name}: {damaged} sample(s) of {entry.name} differ from their digests"
            )
    if keys:
        arr = np.sort(np.asarray(keys, dtype=np.uint64))
        n_dup = int((arr[1:] == arr[:-1]).sum())
        if n_dup:
            rep.violations.append(f"split {name}: {n_dup} duplicate sample key(s)")
    return patients, dict(tiles)


def _check_disjoint(rep: VerifyReport, sets: dict[str, set[str]], what: str, source: str) -> None:
    owner: dict[str, list[str]] = defaultdict(list)
    for split, items in sets.items():
        for item in items:
            owner[item].append(split)
    leaks = sorted((k, v) for k, v in owner.items() if len(v) > 1)
    if leaks:
        shown = "; ".join(f"{k} in {sorted(v)}" for k, v in leaks[:LIST_SHOWN])
        more = f" ... ({len(leaks) - LIST_SHOWN} more)" if len(leaks) > LIST_SHOWN else ""
        rep.violations.append(f"{len(leaks)} {what}(s) in two splits ({source}): {shown}{more}")
