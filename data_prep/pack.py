"""``cytosyn pack``: per-slide tile shards → patient-level train / val / test datasets.

The run, in order (see docs/datasets.md for the user's view):

1. **Inputs.** Read every ``slides/<id>/state.json`` of the tiling folders. Only slides whose state is
   ``done`` are used; failed, unfinished (no state) and unreadable ones are listed in the summary. The
   slide table (if any) overrides the tiles' identity (patient, TSS, project); table rows for slides
   that have no tiles are counted and warned about. Every input shard of a used slide must exist with
   the size its state records (a cheap stat; the sha256 is checked while the shard is read).
2. **Plan (in memory, no tile bytes).** Patient-level split (:mod:`cytosyn.data_prep.splits`), per-split
   quotas, the chosen tile ordinals of every slide and each one's output position after the global
   shuffle — a few integers per tile.
3. **Stream.** Each input shard holding a chosen tile is read once, sequentially, hashing its bytes.
   Chosen samples go, byte for byte, into temporary bucket files, one per output shard, through a
   bounded in-memory buffer (flushed one file at a time). A shard whose sha256 or sample count differs
   from its state.json, a truncated tar, a sample without image or JSON, or a duplicate key stops the
   run before any output shard is written.
4. **Write.** Per output shard: load its bucket (one shard's worth), order the samples by their
   shuffled position and write the shard with :class:`~cytosyn.shardio.ShardWriter` (deterministic tar
   headers, sha256 while written, atomic rename). Every shard holds ``shards.samples_per_shard``
   samples except the last of its split.
5. **Manifests last.** One ``manifest.json`` per split (atomic), then ``pack_summary.json``, the marker
   of a finished dataset.

Modules: this one plans and writes; :mod:`cytosyn.data_prep.pack_inputs` reads the tiling folders (step 1
and the run's signature); :mod:`cytosyn.data_prep.verify` checks a finished dataset (``--verify``).

Rerun: if ``pack_summary.json`` exists with the same signature (settings + every input slide's state
signature and shard sha256 + slide table) the run is a no-op; with another signature it is refused.
A folder left by a crashed run (no summary) is cleaned — manifests first, then this tool's shards — and
packed again. Manifests hold no timestamps, so equal inputs and settings give byte-identical shards and
manifests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import re
import shutil
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import Executor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cytosyn.data_prep.pack_config import PackConfig
from cytosyn.data_prep.pack_inputs import (
    Inputs,
    PackError,
    SlideInput,
    collect_inputs,
    listing,
    pack_signature,
    slide_provenance,
)
from cytosyn.data_prep.splits import (
    SlideRecord,
    SplitError,
    assign_splits,
    choose_tiles,
    plan_quotas,
    shuffle_order,
)
from tqdm import tqdm

from cytosyn.config import write_resolved_config
from cytosyn.fileio import atomic_write_text, code_version, sha256_file
from cytosyn.formats import IMAGE_EXTENSIONS, missing_tile_fields
from cytosyn.manifest import (
    MANIFEST_FILE,
    ShardEntry,
    SplitManifest,
    write_manifest,
)
from cytosyn.shardio import (
    HashingReader,
    Sample,
    ShardReadError,
    ShardWriter,
    iter_shard_samples,
)
from cytosyn.workers import worker_pool

log = logging.getLogger(__name__)

SUMMARY_FILE = "pack_summary.json"
RESOLVED_CONFIG_FILE = "pack_config.yaml"
WORK_DIR = ".pack-work"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _shard_pattern(split: str) -> re.Pattern[str]:
    # the shard, its .partial while written, its .digests and that file's atomic-write temporaries
    return re.compile(rf"^\.?{re.escape(split)}-\d{{6}}\.tar(\.partial|\.digests(\.[^.]+\.tmp)?)?$")


# --------------------------------------------------------------------------------------------------
# Reading tar shards: sequential, hashed, grouped into samples
# --------------------------------------------------------------------------------------------------


def iter_tar_samples(path: Path) -> Iterator[tuple[Sample, HashingReader]]:
    """:func:`cytosyn.shardio.iter_shard_samples`, with its errors as :class:`PackError`."""
    try:
        yield from iter_shard_samples(path)
    except ShardReadError as err:
        raise PackError(str(err)) from None


def _check_sample(path: Path, sample: Sample) -> str:
    """Every sample needs one image member and a json member; returns the image extension."""
    key, members = sample
    exts = [ext for ext, _ in members]
    images = [e for e in exts if e in IMAGE_EXTENSIONS]
    if "json" not in exts:
        raise PackError(f"{path}: sample {key!r} has no .json member (members: {exts})")
    if not images:
        raise PackError(
            f"{path}: sample {key!r} has no image member ({'/'.join(IMAGE_EXTENSIONS)}; members: {exts})"
        )
    if len(images) > 1 or len(set(exts)) != len(exts):
        raise PackError(f"{path}: sample {key!r} has repeated or several image members ({exts})")
    return images[0]


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


@dataclass
class PackSummary:
    output: str
    signature: str
    skipped: bool = False  # the output already held this exact dataset: nothing was done
    slides_found: int = 0
    slides_used: int = 0
    excluded: list[dict[str, str]] = field(default_factory=list)  # failed / unfinished / unreadable slides
    unknown_table_rows: list[str] = field(default_factory=list)  # slide table rows with no tiles
    identity_overrides: list[str] = field(
        default_factory=list
    )  # slides whose table identity differs from the tiles'
    mixed_tss_patients: list[str] = field(default_factory=list)
    splits: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # patients, slides, tiles, shards, available
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report(self) -> str:
        lines = []
        if self.skipped:
            lines.append(f"{self.output}: already packed with the same inputs and settings; nothing to do")
        lines.append(
            f"slides: {self.slides_found} found, {self.slides_used} used, {len(self.excluded)} excluded (not done)"
            + (f" | {self.seconds:.1f} s" if not self.skipped else "")
        )
        for e in self.excluded:
            lines.append(f"  EXCLUDED {e['slide_id']} [{e['status']}]: {e['error']}")
        if self.unknown_table_rows:
            lines.append(
                f"  slide table rows with no tiles: {len(self.unknown_table_rows)}: {listing(self.unknown_table_rows)}"
            )
        if self.identity_overrides:
            lines.append(
                f"  slides whose identity comes from the slide table, not their tiles' JSON: "
                f"{len(self.identity_overrides)}: {listing(self.identity_overrides)}"
            )
        if self.mixed_tss_patients:
            lines.append(
                f"  patients held out with slides from non-held-out TSSs too: {listing(self.mixed_tss_patients)}"
            )
        lines += [f"  WARNING: {w}" for w in self.warnings]
        lines.append(f"{'split':<12}{'patients':>10}{'slides':>8}{'tiles':>12}{'available':>12}{'shards':>8}")
        for name, s in self.splits.items():
            lines.append(
                f"{name:<12}{s['patients']:>10}{s['slides']:>8}{s['tiles']:>12}{s['available']:>12}{s['shards']:>8}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Output folder: no-op, refuse, or clean a crashed run
# --------------------------------------------------------------------------------------------------


def _prepare_output(cfg: PackConfig, signature: str) -> dict[str, Any] | None:
    """Return the previous summary if the same dataset is already there; else make the folder ready."""
    out = Path(cfg.output)
    marker = out / SUMMARY_FILE
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        missing = [name for name in previous.get("splits", {}) if not (out / name / MANIFEST_FILE).is_file()]
        if previous.get("signature") == signature and not missing:
            return previous
        if previous.get("signature") == signature:
            raise PackError(
                f"output {out} was packed with these inputs and settings but has lost the manifest of split(s) "
                f"{missing}; delete the folder and pack again"
            )
        raise PackError(
            f"output {out} already holds a finished dataset packed from other inputs or settings "
            f"(signature {str(previous.get('signature'))[:12]}..., now {signature[:12]}...). "
            "Pack into a new folder, or delete that one first."
        )
    if out.is_dir() and any(out.iterdir()):
        if not (out / RESOLVED_CONFIG_FILE).is_file() and not (out / WORK_DIR).exists():
            raise PackError(
                f"output {out} is not empty and is not a `cytosyn pack` output; choose an empty or new folder"
            )
        log.warning("%s holds an unfinished pack (a crashed run?): removing its manifests and shards", out)
        _clean_unfinished(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _clean_unfinished(out: Path) -> None:
    """Remove what a crashed pack left: every split's manifest first, then its shards, then the buckets."""
    folders = [p for p in sorted(out.iterdir()) if p.is_dir() and p.name != WORK_DIR]
    for folder in folders:  # manifests first: none may ever point at a shard being removed
        (folder / MANIFEST_FILE).unlink(missing_ok=True)
    for folder in folders:
        pattern = _shard_pattern(folder.name)
        for f in folder.iterdir():
            if f.is_file() and pattern.match(f.name):
                f.unlink()
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Temporary buckets (one per output shard)
# --------------------------------------------------------------------------------------------------

_REC_HEAD = struct.Struct("<qHH")  # position, key length, member count
_MEM_HEAD = struct.Struct("<HQ")  # extension length, data length


def _encode_record(position: int, key: str, members: list[tuple[str, bytes]]) -> bytes:
    kb = key.encode("utf-8")
    parts = [_REC_HEAD.pack(position, len(kb), len(members)), kb]
    for ext, data in members:
        eb = ext.encode("utf-8")
        parts += [_MEM_HEAD.pack(len(eb), len(data)), eb, data]
    return b"".join(parts)


def _decode_records(blob: bytes) -> list[tuple[int, str, list[tuple[str, memoryview]]]]:
    view = memoryview(blob)
    out = []
    off = 0
    while off < len(view):
        pos, klen, n = _REC_HEAD.unpack_from(view, off)
        off += _REC_HEAD.size
        key = bytes(view[off : off + klen]).decode("utf-8")
        off += klen
        members = []
        for _ in range(n):
            elen, dlen = _MEM_HEAD.unpack_from(view, off)
            off += _MEM_HEAD.size
            ext = bytes(view[off : off + elen]).decode("utf-8")
            off += elen
            members.append((ext, view[off : off + dlen]))
            off += dlen
        out.append((pos, key, members))
    return out


class _Buckets:
    """Per-output-shard record files behind one bounded buffer; at most one file is open at a time."""

    def __init__(self, root: Path, limit_bytes: int):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.limit = limit_bytes
        self.buffers: dict[tuple[int, int], bytearray] = {}
        self.buffered = 0

    @staticmethod
    def file_name(split_index: int, bucket: int) -> str:
        return f"s{split_index:03d}-{bucket:07d}.bin"

    def path(self, split_index: int, bucket: int) -> Path:
        return self.root / self.file_name(split_index, bucket)

    def add(self, split_index: int, bucket: int, record: bytes) -> None:
        self.buffers.setdefault((split_index, bucket), bytearray()).extend(record)
        self.buffered += len(record)
        if self.buffered >= self.limit:
            self.flush()

    def flush(self) -> None:
        for (s, b), buf in sorted(self.buffers.items()):
            with open(self.path(s, b), "ab") as f:
                f.write(buf)
        self.buffers.clear()
        self.buffered = 0


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class _SplitPlan:
    name: str
    slides: list[SlideInput]
    patients: list[str]
    quota: Any  # QuotaPlan
    ordinals: dict[str, np.ndarray]  # slide → chosen tile ordinals (sorted)
    positions: dict[str, np.ndarray]  # slide → output position of each chosen tile
    samples: int
    budget: int | None
    labels: Counter = field(default_factory=Counter)  # tiles per label (JSON "label"; None = unlabelled)


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _plan_splits(cfg: PackConfig, inputs: Inputs) -> tuple[list[_SplitPlan], list[str]]:
    records = [SlideRecord(s.slide_id, s.patient_id, s.tss, s.project, s.tiles) for s in inputs.slides]
    try:
        assignment = assign_splits(
            records,
            cfg.split.ratios,
            stratify=cfg.split.stratify == "project",
            holdout_tss=cfg.split.holdout_tss,
            holdout_split=cfg.split.holdout_split,
            seed=cfg.seed,
        )
    except SplitError as err:
        raise PackError(str(err)) from None
    by_id = {s.slide_id: s for s in inputs.slides}
    plans = []
    for name in assignment.splits:
        slides = [by_id[sid] for sid in assignment.slides(name)]
        budget = cfg.sampling.tiles_per_split.get(name)
        quota = plan_quotas(
            [SlideRecord(s.slide_id, s.patient_id, s.tss, s.project, s.tiles) for s in slides],
            budget=budget,
            max_tiles_per_slide=cfg.sampling.max_tiles_per_slide,
            tss_weighting=cfg.sampling.tss_weighting,
            slide_weighting=cfg.sampling.slide_weighting,
        )
        ordinals = {
            s.slide_id: choose_tiles(s.slide_id, s.tiles, quota.slide_counts[s.slide_id], cfg.seed)
            for s in slides
        }
        kept = [s.slide_id for s in slides if len(ordinals[s.slide_id])]
        pos = shuffle_order(name, kept, [ordinals[sid] for sid in kept], cfg.seed)
        positions, off = {}, 0
        for sid in kept:
            n = len(ordinals[sid])
            positions[sid] = pos[off : off + n]
            off += n
        plans.append(
            _SplitPlan(name, slides, assignment.patients(name), quota, ordinals, positions, off, budget)
        )
    return plans, assignment.mixed_tss_patients


def run_pack(cfg: PackConfig) -> PackSummary:
    """Pack the tiling folders of ``cfg.inputs.tiles`` into ``cfg.output`` (see the module docstring)."""
    t0 = time.perf_counter()
    inputs = collect_inputs(cfg)
    signature = pack_signature(cfg, inputs)
    out = Path(cfg.output)
    summary = PackSummary(
        output=str(out),
        signature=signature,
        slides_found=inputs.found,
        slides_used=len(inputs.slides),
        excluded=inputs.excluded,
        unknown_table_rows=inputs.unknown_table_rows,
        identity_overrides=inputs.identity_overrides,
    )
    if inputs.unknown_table_rows:
        log.warning(
            "%d slide table row(s) have no tiles: %s",
            len(inputs.unknown_table_rows),
            listing(inputs.unknown_table_rows),
        )
    for e in inputs.excluded:
        log.warning("slide %s excluded (%s): %s", e["slide_id"], e["status"], e["error"])

    previous = _prepare_output(cfg, signature)
    if previous is not None:
        summary.skipped = True
        summary.splits = previous.get("splits", {})
        summary.mixed_tss_patients = previous.get("mixed_tss_patients", [])
        summary.warnings = previous.get("warnings", [])
        return summary

    plans, mixed = _plan_splits(cfg, inputs)
    summary.mixed_tss_patients = mixed
    settings_hashes = sorted({s.settings_hash for s in inputs.slides})
    if len(settings_hashes) > 1:
        summary.warnings.append(
            f"the slides were tiled with {len(settings_hashes)} different tiler settings; check that mpp, tile size "
            "and codec agree"
        )
    for p in plans:
        if p.budget is not None and p.quota.selected < p.budget:
            summary.warnings.append(
                f"split {p.name}: budget {p.budget} tiles but only {p.quota.available} available after caps"
            )

    write_resolved_config(cfg, out / RESOLVED_CONFIG_FILE)
    # Only a folder of our own is ever removed, even when run.work_dir points at a shared scratch space.
    work = (
        out / WORK_DIR
        if cfg.run.work_dir is None
        else Path(cfg.run.work_dir) / f"cytosyn-pack-{signature[:16]}"
    )
    shutil.rmtree(work, ignore_errors=True)
    executor = None
    if cfg.run.workers > 1:
        executor = worker_pool(cfg.run.workers, multiprocessing.get_context("spawn"))
    try:
        image_members = _stream_inputs(cfg, plans, inputs, work, executor)
        shard_lists = _write_shards(cfg, plans, work, executor)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(work, ignore_errors=True)

    settings = cfg.output_settings()
    for p in plans:
        shards = shard_lists[p.name]
        manifest = SplitManifest(
            split=p.name,
            image_member=image_members[p.name],
            samples=p.samples,
            shards=[ShardEntry(**s.as_dict()) for s in shards],
            patients=p.patients,
            slides=sorted(s.slide_id for s in p.slides),
            stats=_split_stats(cfg, p),
            config=settings,
            inputs={
                "pack_signature": signature,
                "tiles": [str(t) for t in cfg.inputs.tiles],
                "slide_table": (
                    {"path": str(cfg.inputs.slide_table), "sha256": inputs.table_sha256}
                    if cfg.inputs.slide_table
                    else None
                ),
                "slides": {
                    s.slide_id: slide_provenance(s) for s in sorted(p.slides, key=lambda s: s.slide_id)
                },
                # Label tables are data: the ones ingest applied to this split's tiles, by content hash.
                "label_tables": [
                    json.loads(t)
                    for t in sorted(
                        {json.dumps(s.label_table, sort_keys=True) for s in p.slides if s.label_table}
                    )
                ],
            },
            code_version=code_version(),
        )
        write_manifest(manifest, out / p.name)
        summary.splits[p.name] = {
            "patients": len(p.patients),
            "slides": len(p.slides),
            "tiles": p.samples,
            "available": p.quota.available,
            "shards": len(shards),
        }
    summary.seconds = round(time.perf_counter() - t0, 3)
    atomic_write_text(
        out / SUMMARY_FILE, json.dumps(summary.as_dict() | {"code_version": code_version()}, indent=2) + "\n"
    )
    return summary


def _split_stats(cfg: PackConfig, p: _SplitPlan) -> dict[str, Any]:
    tiles_project: dict[str, int] = defaultdict(int)
    tiles_tss: dict[str, int] = defaultdict(int)
    slides_project: dict[str, int] = defaultdict(int)
    slides_tss: dict[str, int] = defaultdict(int)
    patients_project: dict[str, set[str]] = defaultdict(set)
    patients_tss: dict[str, set[str]] = defaultdict(set)
    per_slide = {}
    for s in sorted(p.slides, key=lambda s: s.slide_id):
        n = len(p.ordinals[s.slide_id])
        tiles_project[s.project] += n
        tiles_tss[s.tss] += n
        slides_project[s.project] += 1
        slides_tss[s.tss] += 1
        patients_project[s.project].add(s.patient_id)
        patients_tss[s.tss].add(s.patient_id)
        per_slide[s.slide_id] = {
            "patient_id": s.patient_id,
            "tss": s.tss,
            "project": s.project,
            "identity_source": s.identity_source,
            "tiles_available": s.tiles,
            "tiles": n,
        }
    return {
        "patients": len(p.patients),
        "slides": len(p.slides),
        "tiles": p.samples,
        "tiles_per_project": dict(sorted(tiles_project.items())),
        "slides_per_project": dict(sorted(slides_project.items())),
        "patients_per_project": {k: len(v) for k, v in sorted(patients_project.items())},
        "tiles_per_tss": dict(sorted(tiles_tss.items())),
        # Tiles per label (the tiles' JSON "label"); "(none)" counts unlabelled tiles. Empty: no labels.
        "tiles_per_label": (
            {
                str(k) if k is not None else "(none)": v
                for k, v in sorted(p.labels.items(), key=lambda kv: str(kv[0]))
            }
            if any(k is not None for k in p.labels)
            else {}
        ),
        "slides_per_tss": dict(sorted(slides_tss.items())),
        "patients_per_tss": {k: len(v) for k, v in sorted(patients_tss.items())},
        "sampling": {
            "budget": p.budget,
            "max_tiles_per_slide": cfg.sampling.max_tiles_per_slide,
            "tss_weighting": cfg.sampling.tss_weighting,
            "slide_weighting": cfg.sampling.slide_weighting,
            "tiles_in_slides": sum(s.tiles for s in p.slides),
            "available_after_cap": p.quota.available,
            "selected": p.quota.selected,
            "tss": p.quota.tss,  # per TSS: slides, available, weight, target_share, selected, share (realised)
        },
        "samples_per_shard": cfg.shards.samples_per_shard,
        "per_slide": per_slide,
    }


@dataclass
class _ReadItem:
    """One input shard to read, with the chosen tiles it holds (ordinals and output positions)."""

    path: Path
    slide_id: str
    first_ordinal: int  # ordinal of the shard's first tile within its slide
    chosen: np.ndarray  # chosen ordinals in this shard (sorted)
    positions: np.ndarray  # their output positions in the split
    split: str
    split_index: int
    sha256: str
    count: int


@dataclass
class _ReadResult:
    task: int
    shards: int
    image_members: dict[str, str]
    positions: dict[int, np.ndarray]  # split index → positions written
    key_hashes: dict[int, np.ndarray]  # split index → 64-bit hash of each written sample's key
    labels: dict[int, Counter]  # split index → tiles per label


def _map(executor: Executor | None, fn, tasks: list[tuple]) -> Iterator[Any]:
    """Run ``fn(*task)`` for every task: inline in order, or in the pool (results as they finish)."""
    if executor is None:
        for task in tasks:
            yield fn(*task)
        return
    futures = [executor.submit(fn, *task) for task in tasks]
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        for future in futures:
            future.cancel()


def _read_tasks(plans: list[_SplitPlan], inputs: Inputs, workers: int) -> list[list[_ReadItem]]:
    """Every input shard holding a chosen tile, cut into about 4 tasks per worker of similar bytes."""
    split_of = {sid: i for i, p in enumerate(plans) for sid in p.ordinals}
    items: list[_ReadItem] = []
    for s in inputs.slides:
        i = split_of[s.slide_id]
        chosen, pos = plans[i].ordinals[s.slide_id], plans[i].positions.get(s.slide_id)
        if not len(chosen):
            continue
        off = 0
        for sh in s.shards:
            lo, hi = np.searchsorted(chosen, [off, off + int(sh["count"])])
            if hi > lo:
                items.append(
                    _ReadItem(
                        s.folder / sh["name"], s.slide_id, off, chosen[lo:hi], pos[lo:hi], plans[i].name, i,
                        str(sh["sha256"]), int(sh["count"]),
                    )
                )  # fmt: skip
            off += int(sh["count"])
    n_tasks = max(1, min(len(items), 4 * workers if workers > 1 else 1))
    total = sum(it.path.stat().st_size for it in items) or 1
    tasks: list[list[_ReadItem]] = [[] for _ in range(n_tasks)]
    done = 0
    for it in items:  # contiguous runs of similar size: each task reads its files in folder order
        k = min(n_tasks - 1, done * n_tasks // total)
        tasks[k].append(it)
        done += it.path.stat().st_size
    return [t for t in tasks if t]


def _read_task(task: int, items: list[_ReadItem], work: Path, size: int, buffer_bytes: int) -> _ReadResult:
    """Read a task's input shards once each; send chosen samples to the task's own bucket files."""
    buckets = _Buckets(work / f"t{task:05d}", buffer_bytes)
    image_members: dict[str, str] = {}
    positions: dict[int, list[np.ndarray]] = defaultdict(list)
    hashes: dict[int, list[np.ndarray]] = defaultdict(list)
    labels: dict[int, Counter] = defaultdict(Counter)
    for it in items:
        try:
            count, digest, got_h = _read_input_shard(it, size, buckets, image_members, labels[it.split_index])
        except PackError as err:
            # A changed file shows up first as whatever broke in it; name the real cause.
            if sha256_file(it.path) != it.sha256:
                raise PackError(f"{_changed_message(it.path, it.slide_id)} ({err})") from None
            raise
        if digest != it.sha256:
            raise PackError(_changed_message(it.path, it.slide_id))
        if count != it.count:
            raise PackError(f"input shard {it.path} holds {count} samples but its state.json says {it.count}")
        positions[it.split_index].append(it.positions)
        hashes[it.split_index].append(got_h)
    buckets.flush()
    return _ReadResult(
        task,
        len(items),
        image_members,
        {i: np.concatenate(v) for i, v in positions.items()},
        {i: np.concatenate(v) for i, v in hashes.items()},
        dict(labels),
    )


def _read_input_shard(
    it: _ReadItem, size: int, buckets: _Buckets, image_members: dict[str, str], labels: Counter
) -> tuple[int, str, np.ndarray]:
    """Read one input shard; returns (samples in it, its sha256, key hashes of the chosen samples)."""
    j = 0
    count = 0
    reader = None
    key_hashes = np.zeros(len(it.chosen), dtype=np.uint64)
    for (key, members), reader in iter_tar_samples(it.path):  # noqa: B007 (reader is used after the loop)
        ext = _check_sample(it.path, (key, members))
        ordinal = it.first_ordinal + count
        count += 1
        if j < len(it.chosen) and it.chosen[j] == ordinal:
            labels[_check_meta(it.path, key, members, it.slide_id).get("label")] += 1
            if image_members.setdefault(it.split, ext) != ext:
                raise PackError(
                    f"split {it.split} mixes image members: {image_members[it.split]!r} and {ext!r} "
                    f"(sample {key!r} of {it.path}); pack slides tiled with one codec format"
                )
            p = int(it.positions[j])
            key_hashes[j] = key_hash(key)
            buckets.add(it.split_index, p // size, _encode_record(p, key, members))
            j += 1
    if j != len(it.chosen):
        raise PackError(
            f"input shard {it.path} holds {count} samples, fewer than its state.json says ({it.count})"
        )
    digest = reader.sha.hexdigest() if reader is not None else sha256_file(it.path)
    return count, digest, key_hashes


def _changed_message(path: Path, slide_id: str) -> str:
    return (
        f"input shard {path} does not match its state.json (sha256 differs): the file changed after "
        f"tiling; re-tile slide {slide_id}"
    )


def _check_meta(path: Path, key: str, members: list[tuple[str, bytes]], slide_id: str) -> None:
    raw = next(data for ext, data in members if ext == "json")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PackError(f"{path}: sample {key!r} has an unreadable .json member: {err}") from None
    if not isinstance(meta, dict):
        raise PackError(f"{path}: sample {key!r}: its .json member is not an object")
    if meta.get("slide_id") != slide_id:
        raise PackError(
            f"{path}: sample {key!r} says slide_id {meta.get('slide_id')!r}, but lies in slide {slide_id!r}"
        )
    missing = missing_tile_fields(meta)
    if missing:
        raise PackError(f"{path}: sample {key!r}: its .json lacks {missing}")
    if meta.get("label") is not None and not isinstance(meta["label"], str):
        raise PackError(f"{path}: sample {key!r}: label must be a string, got {meta['label']!r}")
    return meta


def _stream_inputs(
    cfg: PackConfig, plans: list[_SplitPlan], inputs: Inputs, work: Path, executor: Executor | None
) -> dict[str, str]:
    """Phase 1: read every input shard holding a chosen tile once, into per-output-shard bucket files."""
    tasks = _read_tasks(plans, inputs, cfg.run.workers)
    size = cfg.shards.samples_per_shard
    key_hashes = [np.zeros(p.samples, dtype=np.uint64) for p in plans]
    filled = [np.zeros(p.samples, dtype=bool) for p in plans]
    image_members: dict[str, str] = {}
    total = sum(len(t) for t in tasks)
    bar = tqdm(total=total, unit="shard", desc="pack: read", disable=not cfg.run.progress, dynamic_ncols=True)
    args = [(k, items, work, size, cfg.run.buffer_mb << 20) for k, items in enumerate(tasks)]
    try:
        for res in _map(executor, _read_task, args):
            for split, ext in res.image_members.items():
                if image_members.setdefault(split, ext) != ext:
                    raise PackError(
                        f"split {split} mixes image members {image_members[split]!r} and {ext!r}; "
                        "pack slides tiled with one codec format"
                    )
            for i, counts in res.labels.items():
                plans[i].labels.update(counts)
            for i, pos in res.positions.items():
                key_hashes[i][pos] = res.key_hashes[i]
                filled[i][pos] = True
            bar.update(res.shards)
    finally:
        bar.close()
    for p, f in zip(plans, filled):
        if not f.all():
            raise RuntimeError(f"internal error: {int((~f).sum())} samples of split {p.name} were not read")
    _check_duplicate_keys(plans, key_hashes, work, size)
    return image_members


def _bucket_files(work: Path, split_index: int, bucket: int) -> list[Path]:
    return sorted(work.glob(f"t*/{_Buckets.file_name(split_index, bucket)}"))


def _check_duplicate_keys(
    plans: list[_SplitPlan], key_hashes: list[np.ndarray], work: Path, size: int
) -> None:
    allh = np.concatenate(key_hashes) if key_hashes else np.zeros(0, dtype=np.uint64)
    if len(allh) < 2:
        return
    sorted_h = np.sort(allh)
    same = np.flatnonzero(sorted_h[1:] == sorted_h[:-1])
    if not len(same):
        return
    # Name the colliding samples (read back from the buckets; an error path only).
    first, twin = (int(g) for g in np.flatnonzero(allh == sorted_h[same[0]])[:2])
    starts = np.cumsum([0] + [p.samples for p in plans])
    found = []
    for g in (first, twin):
        i = int(np.searchsorted(starts, g, side="right") - 1)
        p = g - int(starts[i])
        key = next(
            k
            for f in _bucket_files(work, i, p // size)
            for pos, k, _ in _decode_records(f.read_bytes())
            if pos == p
        )
        slide = next(sid for sid, pos in plans[i].positions.items() if p in set(pos.tolist()))
        found.append(f"{key!r} (slide {slide}, split {plans[i].name})")
    raise PackError(
        f"duplicate sample key: {found[0]} and {found[1]}; every key must be unique in the dataset"
    )


def _write_task(
    folder: Path, split: str, split_index: int, bucket: int, expected: int, work: Path, size: int
):
    """Phase 2, one output shard: gather its bucket files, order by position, write it atomically."""
    records = []
    files = _bucket_files(work, split_index, bucket)
    for f in files:
        records.extend(_decode_records(f.read_bytes()))
    records.sort(key=lambda r: r[0])
    start = bucket * size
    if [r[0] for r in records] != list(range(start, start + expected)):
        raise RuntimeError(
            f"internal error: bucket {bucket} of split {split} holds {len(records)} samples, expected {expected}"
        )
    writer = ShardWriter(folder, lambda _i: shard_name(split, bucket), max_samples=size, sample_digests=True)
    try:
        for _, key, members in records:
            writer.write({"__key__": key, **dict(members)})
        (info,) = writer.close()
    except BaseException:
        writer.abort()
        raise
    for f in files:
        f.unlink()
    return split_index, bucket, info


def _write_shards(
    cfg: PackConfig, plans: list[_SplitPlan], work: Path, executor: Executor | None
) -> dict[str, list[Any]]:
    size = cfg.shards.samples_per_shard
    args = []
    for i, p in enumerate(plans):
        folder = Path(cfg.output) / p.name
        folder.mkdir(parents=True, exist_ok=True)
        for b in range(-(-p.samples // size)):
            args.append((folder, p.name, i, b, min(size, p.samples - b * size), work, size))
    bar = tqdm(
        total=len(args), unit="shard", desc="pack: write", disable=not cfg.run.progress, dynamic_ncols=True
    )
    infos: dict[tuple[int, int], Any] = {}
    try:
        for i, b, info in _map(executor, _write_task, args):
            infos[(i, b)] = info
            bar.update(1)
    finally:
        bar.close()
    return {p.name: [infos[(i, b)] for b in range(-(-p.samples // size))] for i, p in enumerate(plans)}
