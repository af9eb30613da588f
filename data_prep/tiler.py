"""``cytosyn tile``: whole-slide images → per-slide webdataset shards.

Per slide, the work is in two steps that run in worker processes:

1. **plan** — open the slide, settle its mpp and identity, detect tissue on an overview, lay the tile
   grid and keep the tiles with enough tissue (optionally capped). Cheap; returns tile coordinates.
2. **bands** — the kept tiles, in row-major order, are cut into bands of ``shards.tiles_per_task``;
   each band is read in tile-aligned strips (one OpenSlide read per run of neighbouring tiles), resized,
   encoded and written to its own shards. Bands of one large slide run in parallel.

Bands write under ``<slide>/.incomplete/``; when all bands of a slide are done the main process moves
the shards into place and writes ``state.json`` last. A slide is "done" only through that file, so a
killed run leaves nothing half-written under a final name, and a rerun redoes exactly the slides whose
state is missing, failed, or made with other settings or another input file. The band split depends on
the config only, never on the worker count, so outputs are byte-identical however the run is spread.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import shutil
import time
import traceback
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cytosyn.data_prep.codec import TileEncoder
from cytosyn.data_prep.grid import (
    LevelPlan,
    choose_level,
    effective_mpp,
    grid_positions,
    level0_corner,
    plan_level,
    sample_indices,
)
from cytosyn.data_prep.slide import (
    background_rgb,
    open_slide,
    read_mpp_overrides,
    read_rgb,
    resolve_resolution,
)
from cytosyn.data_prep.tile_config import TileConfig
from cytosyn.data_prep.tissue import box_fractions, detect_tissue
from PIL import Image
from tqdm import tqdm

from cytosyn.config import config_hash, parse_part, write_resolved_config
from cytosyn.fileio import atomic_write_text, code_version, file_fingerprint
from cytosyn.formats import (
    INCOMPLETE_DIR,
    OVERVIEW_FILE,
    SLIDE_STATE_FILE,
    canonical_json,
    slide_dir,
    tile_key,
)
from cytosyn.identity import SlideIdentity, TableRow, read_slide_table, resolve_identity
from cytosyn.shardio import ShardWriter

log = logging.getLogger(__name__)

# Errors that mean the output location itself is broken: stop the whole run instead of failing slide
# after slide.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_OVERVIEW_BAND_BYTES = 64 << 20


class OutputError(RuntimeError):
    """The output folder cannot be written (full disk, read-only, permissions): the run stops."""


# --------------------------------------------------------------------------------------------------
# Slide discovery
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideSource:
    path: Path
    slide_id: str
    folder_project: str | None


def discover_slides(inputs: Iterable[Path], extensions: Iterable[str]) -> list[SlideSource]:
    """Expand files, folders and ``.txt`` lists into slides, sorted by slide id; ids must be unique."""
    exts = {e.lower() for e in extensions}
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths.extend(p for p in sorted(item.rglob("*")) if p.is_file() and p.suffix.lower() in exts)
        elif item.suffix.lower() == ".txt" and item.is_file():
            lines = [ln.strip() for ln in item.read_text().splitlines()]
            paths.extend(Path(ln) for ln in lines if ln and not ln.startswith("#"))
        elif item.exists():
            paths.append(item)
        else:
            raise FileNotFoundError(f"slide input {item} does not exist")
    seen: dict[str, Path] = {}
    sources = []
    for p in paths:
        slide_id = p.stem
        if slide_id in seen:
            raise ValueError(f"two slides share the id {slide_id!r}: {seen[slide_id]} and {p}")
        seen[slide_id] = p
        sources.append(SlideSource(p, slide_id, p.parent.name or None))
    return sorted(sources, key=lambda s: s.slide_id)


# --------------------------------------------------------------------------------------------------
# Work items exchanged with worker processes
# --------------------------------------------------------------------------------------------------


@dataclass
class SlideJob:
    source: SlideSource
    identity: SlideIdentity
    mpp_override: tuple[float, float] | None
    signature: str  # settings + input identity; equal signature + done state ⇒ skip


@dataclass
class SlidePlan:
    job: SlideJob
    level_plan: LevelPlan
    source_mpp: tuple[float, float]
    mpp_source: str
    background: tuple[int, int, int]
    level_xy: np.ndarray  # (N, 2) kept tile corners in level pixels, row-major
    fractions: np.ndarray  # (N,) tissue fraction of each kept tile
    level_image: np.ndarray | None  # the whole tile level, when small enough to keep (see _read_overview)
    stats: dict[str, Any]
    seconds: float


@dataclass
class BandTask:
    plan: SlidePlan
    band: int
    start: int
    stop: int


@dataclass
class BandResult:
    slide_id: str
    band: int
    shards: list[dict[str, Any]]
    tiles: int
    seconds: float


@dataclass
class Failure:
    slide_id: str
    error_type: str
    error: str
    detail: str = ""
    output_broken: bool = False


@dataclass
class TilingSummary:
    slides_total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    tiles: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tiles_per_s": round(self.tiles_per_s, 2)}

    def report(self) -> str:
        """The end-of-run summary a person reads."""
        lines = [
            f"slides: {self.slides_total} total, {self.done} done, {self.skipped} skipped (already done), "
            f"{self.failed} failed | tiles written: {self.tiles} in {self.seconds:.1f} s "
            f"({self.tiles_per_s:.1f} tiles/s)"
        ]
        lines += [f"  FAILED {f['slide_id']}: {f['error_type']}: {f['error']}" for f in self.failures]
        return "\n".join(lines)


def _failure(slide_id: str, err: BaseException) -> Failure:
    broken = isinstance(err, OutputError) or (
        isinstance(err, OSError) and err.errno in _OUTPUT_ERRNOS and not isinstance(err, FileNotFoundError)
    )
    return Failure(
        slide_id=slide_id,
        error_type=type(err).__name__,
        error=str(err) or type(err).__name__,
        detail="".join(traceback.format_exception(type(err), err, err.__traceback__)[-3:]),
        output_broken=broken,
    )


# --------------------------------------------------------------------------------------------------
# Step 1: plan a slide
# --------------------------------------------------------------------------------------------------


def _thumbnail_overview(slide, out_size: tuple[int, int]) -> np.ndarray | None:
    """The scanner's own thumbnail resized to ``out_size``, if it has one of the slide's shape."""
    thumb = slide.associated_images.get("thumbnail") if slide.associated_images else None
    if thumb is None:
        return None
    (tw, th), (w0, h0) = thumb.size, slide.dimensions
    if tw < out_size[0] or abs(tw / th - w0 / h0) > 0.01 * (w0 / h0):
        return None
    rgb = Image.new("RGB", thumb.size, (255, 255, 255))
    rgb.paste(thumb, mask=thumb.getchannel("A") if thumb.mode == "RGBA" else None)
    return np.asarray(rgb.resize(out_size, Image.Resampling.BOX))


def _read_overview(
    slide, mask_ds: tuple[float, float], background, tile_level: int, keep_bytes: int, use_thumbnail: bool
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """An RGB overview of the whole slide at ``mask_ds`` level-0 px per pixel, in bounded memory.

    Returns (overview, whole tile level or None, where the overview came from). A slide without a
    pyramid level coarse enough (≥ 1/4 of the mask's downsample) would need a full decode for its
    overview; its scanner thumbnail is used instead when it has one. When the overview has to be read
    at the tiles' own level and that level fits in ``keep_bytes``, the level is read once and
    returned, so tiles are cut from memory instead of being decoded a second time.
    """
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, round(w0 / mask_ds[0])), max(1, round(h0 / mask_ds[1]))
    if use_thumbnail and slide.level_downsamples[-1] * 4 < min(mask_ds):
        thumb = _thumbnail_overview(slide, (out_w, out_h))
        if thumb is not None:
            return thumb, None, "thumbnail"
    level = choose_level(slide.level_downsamples, min(mask_ds))
    ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    if level == tile_level and lw * lh * 3 <= keep_bytes:
        whole = read_rgb(slide, (0, 0), level, (lw, lh), background)
        overview = np.asarray(Image.fromarray(whole).resize((out_w, out_h), Image.Resampling.BOX))
        return overview, whole, f"level {level}"
    rows_per_level_px = lh / out_h
    band_rows = max(1, int(_OVERVIEW_BAND_BYTES / (4 * lw * max(rows_per_level_px, 1.0))))
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for r0 in range(0, out_h, band_rows):
        r1 = min(out_h, r0 + band_rows)
        y0 = int(np.floor(r0 * rows_per_level_px))
        y1 = min(lh, max(y0 + 1, int(np.ceil(r1 * rows_per_level_px))))
        strip = read_rgb(slide, (0, round(y0 * ds)), level, (lw, y1 - y0), background)
        out[r0:r1] = np.asarray(Image.fromarray(strip).resize((out_w, r1 - r0), Image.Resampling.BOX))
    return out, None, f"level {level}"


def plan_slide(job: SlideJob, cfg: TileConfig) -> SlidePlan:
    """Open the slide, detect tissue and choose the tiles to cut (no tile is read yet)."""
    t0 = time.perf_counter()
    source = job.source
    slide = open_slide(source.path)
    try:
        props = dict(slide.properties)
        res = resolve_resolution(source.slide_id, props, job.mpp_override)
        source_mpp = (res.mpp_x, res.mpp_y)
        level_plan = plan_level(slide.level_downsamples, source_mpp, cfg.grid)
        if level_plan.upsampled:
            log.warning("%s: target mpp finer than the scan; tiles are upsampled", source.slide_id)
        background = background_rgb(props)
        mask_ds = (cfg.tissue.mask_mpp / source_mpp[0], cfg.tissue.mask_mpp / source_mpp[1])
        overview, level_image, overview_source = _read_overview(
            slide,
            mask_ds,
            background,
            level_plan.level,
            cfg.run.keep_level_mb << 20,
            cfg.tissue.use_thumbnail,
        )
        mask, threshold = detect_tissue(overview, cfg.tissue)
        level_dims = slide.level_dimensions[level_plan.level]
    finally:
        slide.close()

    level_xy = grid_positions(level_dims, level_plan)
    xy0 = level0_corner(level_xy, level_plan.downsample)
    rw, rh = level_plan.read_size
    boxes = (
        np.stack(
            [
                xy0[:, 0] / mask_ds[0],
                xy0[:, 1] / mask_ds[1],
                (xy0[:, 0] + rw) / mask_ds[0],
                (xy0[:, 1] + rh) / mask_ds[1],
            ],
            axis=1,
        )
        if len(xy0)
        else np.zeros((0, 4))
    )
    fractions = box_fractions(mask, boxes) if len(boxes) else np.zeros(0)
    keep = np.flatnonzero(fractions >= cfg.grid.min_tissue_fraction)
    with_tissue = len(keep)
    keep = keep[sample_indices(len(keep), cfg.grid.max_tiles_per_slide, cfg.grid.seed, source.slide_id)]
    stats = {
        "grid_tiles": len(level_xy),
        "tiles_with_tissue": with_tissue,
        "tiles_kept": len(keep),
        "tissue_fraction_of_slide": round(float(mask.mean()), 6),
        "saturation_threshold": round(threshold, 6),
        "overview_source": overview_source,
    }
    plan = SlidePlan(
        job=job,
        level_plan=level_plan,
        source_mpp=source_mpp,
        mpp_source=res.source,
        background=background,
        level_xy=level_xy[keep],
        fractions=fractions[keep].astype(np.float32),
        level_image=level_image if len(keep) else None,
        stats=stats,
        seconds=0.0,
    )
    if cfg.run.overview:
        folder = slide_dir(cfg.output, source.slide_id) / INCOMPLETE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        _write_overview(
            folder / OVERVIEW_FILE, overview, mask, xy0[keep], (rw, rh), mask_ds, source.slide_id, cfg
        )
    plan.seconds = time.perf_counter() - t0
    return plan


def _write_overview(
    path: Path, overview, mask, xy0, read_size, mask_ds, slide_id: str, cfg: TileConfig
) -> None:
    """The overview with tissue tinted and every kept tile outlined, for a person to check (matplotlib,
    imported only here: see data_prep/overview.py)."""
    from cytosyn.data_prep.overview import write_overview

    write_overview(
        path, overview, mask, xy0, read_size, mask_ds, slide_id=slide_id, um_per_px=cfg.tissue.mask_mpp,
        tile_px=cfg.grid.tile_px, tile_mpp=cfg.grid.mpp,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Step 2: cut, encode and write one band of tiles
# --------------------------------------------------------------------------------------------------


def _strip_runs(level_xy: np.ndarray, plan: LevelPlan, strip_px: int) -> list[tuple[int, int]]:
    """Split row-major tiles into runs [i, j) that one region read can cover (same row, close, ≤ strip_px)."""
    runs = []
    n = len(level_xy)
    i = 0
    sw, sx = plan.level_size[0], plan.level_stride[0]
    while i < n:
        j = i + 1
        while (
            j < n
            and level_xy[j, 1] == level_xy[i, 1]
            and level_xy[j, 0] - level_xy[j - 1, 0] <= 2 * sx
            and level_xy[j, 0] + sw - level_xy[i, 0] <= strip_px
        ):
            j += 1
        runs.append((i, j))
        i = j
    return runs


def _resize(tile: np.ndarray, tile_px: int, resample: str) -> np.ndarray:
    if resample == "none":
        return np.ascontiguousarray(tile)
    method = Image.Resampling.BOX if resample == "box" else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(tile).resize((tile_px, tile_px), method))


def tile_band(task: BandTask, cfg: TileConfig) -> BandResult:
    """Read, encode and write tiles [start, stop) of a planned slide into the band's shards."""
    t0 = time.perf_counter()
    plan = task.plan
    job = plan.job
    lp = plan.level_plan
    encoder = TileEncoder(cfg.codec)
    identity = job.identity.as_dict()
    eff = effective_mpp(lp, plan.source_mpp, cfg.grid.tile_px)
    common = identity | {
        "level": lp.level,
        "downsample": lp.downsample,
        "level_size": list(lp.level_size),
        "read_size": list(lp.read_size),
        "source_mpp": list(plan.source_mpp),
        "mpp_source": plan.mpp_source,
        "mpp": cfg.grid.mpp,
        "effective_mpp": [round(eff[0], 6), round(eff[1], 6)],
        "tile_px": cfg.grid.tile_px,
        "resample": lp.resample,
        "codec": encoder.settings,
    }
    level_xy = plan.level_xy[task.start : task.stop]
    fractions = plan.fractions[task.start : task.stop]
    xy0 = level0_corner(level_xy, lp.downsample)
    folder = slide_dir(cfg.output, job.source.slide_id) / INCOMPLETE_DIR
    sid = job.source.slide_id
    writer = ShardWriter(
        folder,
        lambda i: f"{sid}-b{task.band:04d}-{i:03d}.tar",
        max_samples=cfg.shards.max_samples,
        max_bytes=cfg.shards.max_bytes,
    )
    slide = open_slide(job.source.path) if plan.level_image is None else None
    sw, sh = lp.level_size
    try:
        for i, j in _strip_runs(level_xy, lp, cfg.run.strip_px):
            lx0, ly = int(level_xy[i, 0]), int(level_xy[i, 1])
            width = int(level_xy[j - 1, 0]) + sw - lx0
            if slide is None:
                strip = plan.level_image[ly : ly + sh, lx0 : lx0 + width]
            else:
                strip = read_rgb(
                    slide, (int(xy0[i, 0]), int(xy0[i, 1])), lp.level, (width, sh), plan.background
                )
            for k in range(i, j):
                off = int(level_xy[k, 0]) - lx0
                tile = _resize(strip[:, off : off + sw], cfg.grid.tile_px, lp.resample)
                x, y = int(xy0[k, 0]), int(xy0[k, 1])
                meta = common | {"x": x, "y": y, "tissue_fraction": round(float(fractions[k]), 4)}
                writer.write(
                    {
                        "__key__": tile_key(sid, x, y),
                        encoder.extension: encoder.encode(tile),
                        "json": canonical_json(meta),
                    }
                )
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if slide is not None:
            slide.close()
    return BandResult(sid, task.band, [s.as_dict() for s in shards], len(level_xy), time.perf_counter() - t0)


# Worker entry points: exceptions come back as values so one bad slide never kills the pool.
def _plan_entry(job: SlideJob, cfg: TileConfig) -> SlidePlan | Failure:
    try:
        return plan_slide(job, cfg)
    except Exception as err:
        return _failure(job.source.slide_id, err)


def _band_entry(task: BandTask, cfg: TileConfig) -> BandResult | Failure:
    try:
        return tile_band(task, cfg)
    except Exception as err:
        return _failure(task.plan.job.source.slide_id, err)


# --------------------------------------------------------------------------------------------------
# Per-slide state
# --------------------------------------------------------------------------------------------------


def _slide_signature(cfg: TileConfig, source: SlideSource, identity, override) -> str:
    return config_hash(
        {
            "settings": cfg.output_settings(),
            "fingerprint": file_fingerprint(source.path),
            "identity": identity.as_dict(),
            "mpp_override": list(override) if override else None,
        }
    )


def _is_done(folder: Path, signature: str) -> bool:
    state_path = folder / SLIDE_STATE_FILE
    if not state_path.is_file():
        return False
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if state.get("status") != "done" or state.get("signature") != signature:
        return False
    return all(
        (folder / s["name"]).is_file() and (folder / s["name"]).stat().st_size == s["bytes"]
        for s in state.get("shards", [])
    )


def _reset_slide_folder(folder: Path) -> None:
    """Remove everything a previous (partial, failed or outdated) attempt left for this slide."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    atomic_write_text(folder / SLIDE_STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _finalize_slide(cfg: TileConfig, plan: SlidePlan, bands: list[BandResult]) -> int:
    """Move a slide's band shards into place and write its state last. Returns tiles written."""
    job = plan.job
    folder = slide_dir(cfg.output, job.source.slide_id)
    incomplete = folder / INCOMPLETE_DIR
    shards = [s for b in sorted(bands, key=lambda b: b.band) for s in b.shards]
    for s in shards:
        os.replace(incomplete / s["name"], folder / s["name"])
    if (incomplete / OVERVIEW_FILE).exists():
        os.replace(incomplete / OVERVIEW_FILE, folder / OVERVIEW_FILE)
    shutil.rmtree(incomplete, ignore_errors=True)
    tiles = sum(b.tiles for b in bands)
    _write_state(
        folder,
        _state_common(cfg, job)
        | {
            "status": "done",
            "tiles": tiles,
            "shards": shards,
            "source_mpp": list(plan.source_mpp),
            "mpp_source": plan.mpp_source,
            "level_plan": asdict(plan.level_plan),
            "stats": plan.stats,
            "timing": {
                "plan_seconds": round(plan.seconds, 3),
                "tile_seconds": round(sum(b.seconds for b in bands), 3),
            },
        },
    )
    return tiles


def _state_common(cfg: TileConfig, job: SlideJob) -> dict[str, Any]:
    return {
        "slide_id": job.source.slide_id,
        "slide_path": str(job.source.path),
        "identity": job.identity.as_dict(),
        "signature": job.signature,
        "settings_hash": config_hash(cfg.output_settings()),
        "code_version": code_version(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _record_failure(cfg: TileConfig, job: SlideJob, failure: Failure, extra: dict | None = None) -> None:
    """Write a failed state (with the error) and drop partial work; keep the overview if there is one."""
    folder = slide_dir(cfg.output, job.source.slide_id)
    incomplete = folder / INCOMPLETE_DIR
    if (incomplete / OVERVIEW_FILE).exists():
        os.replace(incomplete / OVERVIEW_FILE, folder / OVERVIEW_FILE)
    shutil.rmtree(incomplete, ignore_errors=True)
    state = _state_common(cfg, job) | {
        "status": "failed",
        "error_type": failure.error_type,
        "error": failure.error,
        "detail": failure.detail,
    }
    _write_state(folder, state | (extra or {}))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


class _InlineExecutor(Executor):
    """Runs each task at submit time in this process (workers=1: no pickling, easy to profile)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:
            future.set_exception(err)
        return future


def _check_output_writable(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write to the output folder {output}: {err}") from None


def prepare_jobs(cfg: TileConfig) -> list[SlideJob]:
    """Discover this part's slides and settle their identity, override and signature."""
    sources = discover_slides(cfg.slides.input, cfg.slides.extensions)
    part, parts = parse_part(cfg.run.part)
    sources = sources[part::parts]
    table: dict[str, TableRow] | None = (
        read_slide_table(cfg.slides.slide_table) if cfg.slides.slide_table else None
    )
    overrides = read_mpp_overrides(cfg.slides.mpp_overrides) if cfg.slides.mpp_overrides else {}
    jobs = []
    for src in sources:
        folder_project = src.folder_project if cfg.slides.project_from_folder else None
        identity = resolve_identity(src.slide_id, table, folder_project)
        override = overrides.get(src.slide_id)
        try:
            signature = _slide_signature(cfg, src, identity, override)
        except OSError as err:
            signature = f"unreadable:{err}"
        jobs.append(SlideJob(src, identity, override, signature))
    return jobs


def run_tiling(cfg: TileConfig) -> TilingSummary:
    """Tile every slide of this part that is not already done with the same settings and input."""
    t_start = time.perf_counter()
    _check_output_writable(cfg.output)
    write_resolved_config(cfg, cfg.output / "tile_config.yaml")
    jobs = prepare_jobs(cfg)
    summary = TilingSummary(slides_total=len(jobs))
    todo = []
    for job in jobs:
        if _is_done(slide_dir(cfg.output, job.source.slide_id), job.signature):
            summary.skipped += 1
        else:
            todo.append(job)

    workers = cfg.run.workers
    executor: Executor
    if workers == 1:
        executor = _InlineExecutor()
    else:
        # forkserver: workers fork from a clean server that imported the tiler once (fast start,
        # and no inherited OpenSlide handles or threads from this process).
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["cytosyn.data_prep.tiler"])
        executor = ProcessPoolExecutor(workers, mp_context=context)
    bar = tqdm(total=len(todo), unit="slide", desc="tile", disable=not cfg.run.progress, dynamic_ncols=True)
    pending = deque(todo)
    bands: deque[BandTask] = deque()
    in_flight: dict[Future, tuple[str, Any]] = {}
    open_slides: dict[str, tuple[SlidePlan, list[BandResult], int]] = {}
    failed_slides: set[str] = set()
    max_in_flight = 2 * workers

    def fail(job: SlideJob, failure: Failure, extra: dict | None = None) -> None:
        if failure.output_broken:
            raise OutputError(f"cannot write output for slide {failure.slide_id}: {failure.error}")
        failed_slides.add(job.source.slide_id)
        _record_failure(cfg, job, failure, extra)
        summary.failed += 1
        summary.failures.append(
            {"slide_id": job.source.slide_id, "error_type": failure.error_type, "error": failure.error}
        )
        log.error("slide %s failed: %s: %s", job.source.slide_id, failure.error_type, failure.error)
        bar.update(1)

    try:
        while pending or bands or in_flight:
            while len(in_flight) < max_in_flight and (bands or pending):
                if bands:  # finish open slides before starting new ones: bounded memory
                    task = bands.popleft()
                    if task.plan.job.source.slide_id in failed_slides:
                        continue
                    in_flight[executor.submit(_band_entry, task, cfg)] = ("band", task)
                elif len(open_slides) < max_in_flight:
                    job = pending.popleft()
                    _reset_slide_folder(slide_dir(cfg.output, job.source.slide_id))
                    in_flight[executor.submit(_plan_entry, job, cfg)] = ("plan", job)
                else:
                    break
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in done:
                kind, item = in_flight.pop(future)
                result = future.result()
                job = item if kind == "plan" else item.plan.job
                sid = job.source.slide_id
                if isinstance(result, Failure):
                    if sid not in failed_slides:
                        open_slides.pop(sid, None)
                        fail(job, result)
                    continue
                if sid in failed_slides:
                    continue
                if kind == "plan":
                    n = len(result.level_xy)
                    step = cfg.shards.tiles_per_task
                    tasks = [
                        BandTask(result, b, s, min(n, s + step)) for b, s in enumerate(range(0, n, step))
                    ]
                    if not tasks:
                        fail(
                            job,
                            Failure(sid, "NoTissue", _no_tissue_message(cfg, result)),
                            {"stats": result.stats},
                        )
                        continue
                    open_slides[sid] = (result, [], len(tasks))
                    bands.extend(tasks)
                else:
                    plan, results, total = open_slides[sid]
                    results.append(result)
                    if len(results) == total:
                        del open_slides[sid]
                        summary.tiles += _finalize_slide(cfg, plan, results)
                        summary.done += 1
                        bar.update(1)
                        elapsed = time.perf_counter() - t_start
                        bar.set_postfix(tiles=summary.tiles, tiles_per_s=f"{summary.tiles / elapsed:.0f}")
    except OSError as err:
        if err.errno in _OUTPUT_ERRNOS:
            raise OutputError(f"cannot write to the output folder {cfg.output}: {err}") from None
        raise
    finally:
        bar.close()
        executor.shutdown(wait=True, cancel_futures=True)

    summary.seconds = time.perf_counter() - t_start
    part, parts = parse_part(cfg.run.part)
    atomic_write_text(
        cfg.output / f"tiling_summary.part{part}of{parts}.json",
        json.dumps(summary.as_dict() | {"code_version": code_version()}, indent=2) + "\n",
    )
    return summary


def _no_tissue_message(cfg: TileConfig, plan: SlidePlan) -> str:
    return (
        f"no tissue: 0 of {plan.stats['grid_tiles']} grid tiles reach "
        f"grid.min_tissue_fraction={cfg.grid.min_tissue_fraction}"
    )
