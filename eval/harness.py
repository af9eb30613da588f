"""Shared orchestration of the studies in `cytosyn.eval.studies`: references, generation, metrics, results.

Every study talks to the model only through :class:`cytosyn.generation.TileGenerator` (cytosyn's
pipeline, the PixCell adapter, or a fake in tests) — or takes already generated tiles as an `ImageSet`
(a folder of images). This module holds the steps every study shares; each study (one module per study
under ``cytosyn/eval/studies/``) composes them:

1. **reference features** (`prepare_reference`, `as_reference`): each reference set (first ``n`` tiles;
   packed splits are shuffled) is read once and fed to every extractor (`cytosyn.eval.features`), keeping
   the feature matrices; with a cache folder the statistics and features are saved, and a cached file
   made with other settings or another reference set is refused (`FeatureStats.load(...,
   expected_meta=...)`, the metric core's guard);
2. **conditioning** (`embed_reference`): the held-out (or domain) reference tiles are embedded with the
   generator's own encoder (`generator.embed`), and tile ``i`` is generated from reference ``i``'s
   embedding;
3. **generated features** (`generate_or_read`, `generate_features`): tiles are generated in chunks,
   optionally re-encoded (``generated_codec``) and fed to the same extractors without being written
   anywhere;
4. **metrics** (`compare_sets`, `fidelity`, `fd_bootstrap`) from the metric core: FD per extractor with a
   bootstrap CI over generated tiles (the same replicates as `frechet_distance_ci`), KID,
   precision/recall/density/coverage (k = 5), conditional fidelity in an encoder *other* than the
   conditioning one (refused otherwise) with a bootstrap CI and an unpaired baseline.

Before anything is generated, the generated side's metadata (encoder, weights, resize, tile size, mpp,
field of view) is checked against every reference with `FeatureStats.check_compatible`, and the codecs
of both sides must be equivalent (every lossless format counts as one; a lossy chain must match step by
step): a mismatch raises `IncompatibleStatsError` instead of spending GPU hours on a comparison that
would be refused.

Results are `StudyResult` objects: JSON-serialisable with `to_dict()`, with full provenance (generator
``describe()``, every image set's provenance, each extractor's ``describe()`` and metadata, codecs,
seeds, counts, timings) and a few sample tiles kept in memory for the report's image grids.

The study functions that used to live here (`overfitting_study`, `domain_study`, `sweep_study`,
`memorisation`) moved to `cytosyn.eval.studies`; importing them from here still works.
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cytosyn.generation import TileGenerator

from .features import _Accumulator, _device, build_extractors, stats_metadata
from .images import ImageSet, apply_codec, codec_label, codec_settings, parse_codec
from .metrics import (
    BootstrapCI,
    bootstrap_ci,
    conditional_fidelity,
    cosine_similarity_pairs,
    kid,
    prdc,
)
from .stats import PROVENANCE_KEYS, FeatureStats, IncompatibleStatsError, frechet_distance

__all__ = [
    "FD_IGNORE",
    "GeneratedFeatures",
    "HarnessOptions",
    "ReferenceFeatures",
    "StudyResult",
    "as_reference",
    "compare_codecs",
    "compare_sets",
    "describe_generator",
    "embed_reference",
    "extractor_info",
    "fd_bootstrap",
    "fidelity",
    "generate_features",
    "generate_or_read",
    "grid_samples",
    "pick_extractor",
    "prepare_reference",
    "resolve_options",
    "study_settings",
]

#: FDs here ignore the ``codec`` key: codecs are checked first by `compare_codecs` (lossless ≡ lossless).
FD_IGNORE = PROVENANCE_KEYS | {"codec"}


@dataclass(frozen=True)
class HarnessOptions:
    """Settings shared by every study (all recorded in the result)."""

    n_boot: int = 200  # bootstrap replicates for FD / fidelity / memorisation CIs
    alpha: float = 0.05
    prdc_k: int = 5
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    batch_size: int = 32  # feature-extraction batch
    generation_batch_size: int = 16  # passed to generator.generate
    chunk_size: int = 512  # tiles generated per generate() call
    generated_codec: str | Mapping[str, Any] = "lossless"
    device: str | None = "cpu"  # extractors' device (None: cuda when available)
    max_keep_mb: float = 4096
    cache_dir: str | Path | None = None
    keep_samples: int = 8  # tiles kept for the report's image grids
    equalise_nn: bool = True  # memorisation: same number of train and held-out candidates
    progress: bool = True  # tqdm bars on stderr (reference features, embedding, generation)


# ------------------------------------------------------------------------------------------ results
@dataclass
class StudyResult:
    """One study's numbers and provenance. ``samples`` (uint8 tiles for image grids) is not serialised."""

    study: str
    generator: dict[str, Any]
    settings: dict[str, Any]
    references: dict[str, dict[str, Any]]
    generated: dict[str, Any]
    extractors: dict[str, dict[str, Any]]
    metrics: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self, strict: bool = True) -> dict[str, Any]:
        """Plain data; with ``strict`` non-finite numbers become ``None`` (NaN) or ``"inf"``/``"-inf"``."""
        return _plain(
            {
                "study": self.study,
                "generator": self.generator,
                "settings": self.settings,
                "references": self.references,
                "generated": self.generated,
                "extractors": self.extractors,
                "metrics": self.metrics,
                "warnings": self.warnings,
                "timings_s": self.timings_s,
            },
            strict,
        )

    def headline(self) -> dict[str, float]:
        """A flat ``{name: number}`` summary (what the report's top table and seed aggregates use).

        Each study defines its own (`cytosyn.eval.studies.<study>.headline`)."""
        from .studies import get_study  # the studies import this module

        return get_study(self.study).headline(self)


def _plain(obj: Any, strict: bool = True) -> Any:
    """NamedTuples → dicts, numpy → Python, tuples → lists, Paths → str; ``strict``: no NaN/inf (recursively)."""
    if hasattr(obj, "_asdict"):
        return _plain(obj._asdict(), strict)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, strict) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist(), strict)
    if isinstance(obj, np.generic):
        return _plain(obj.item(), strict)
    if isinstance(obj, Path):
        return str(obj)
    if strict and isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


# --------------------------------------------------------------------------------------- references
@dataclass
class ReferenceFeatures:
    """A reference set's features for every extractor (statistics + matrices) and its provenance."""

    role: str
    stats: dict[str, FeatureStats]
    features: dict[str, np.ndarray]
    keys: list[str]
    provenance: dict[str, Any]
    extractors: dict[str, dict[str, Any]]
    image_set: ImageSet | None = None
    cache: dict[str, str] = field(default_factory=dict)  # extractor → "loaded <path>" / "saved <path>"
    samples: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.keys)


def _limited(image_set: ImageSet, n: int | None) -> ImageSet:
    """A view of the set's first ``n`` tiles (the set itself when ``n`` is None or already its limit)."""
    if n is None or (image_set.limit is not None and image_set.limit <= n):
        return image_set
    view = copy.copy(image_set)
    view.limit = int(n)
    view._provenance = None
    return view


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _cache_paths(cache_dir: Path, role: str, name: str) -> tuple[Path, Path]:
    base = cache_dir / f"{_safe(role)}__{_safe(name)}"
    return base.with_suffix(".npz"), Path(f"{base}.features.npy")


def prepare_reference(
    image_set: ImageSet,
    extractors: Mapping[str, Any] | Iterable[Any],
    *,
    role: str,
    n: int | None = None,
    options: HarnessOptions | None = None,
) -> ReferenceFeatures:
    """Features of a reference set (its first ``n`` tiles) for every extractor, in one pass.

    With ``options.cache_dir``, ``<role>__<extractor>.npz`` (FeatureStats) and ``.features.npy`` are
    reused when present — loaded with ``expected_meta`` = the metadata this run would produce (extractor
    settings, codec, tile size, mpp, field of view *and* the set's dataset hash and count), so a file made
    with other settings or another reference set raises `IncompatibleStatsError` — and written otherwise.
    """
    opts = options or HarnessOptions()
    exts = build_extractors(extractors)
    dev = _device(opts.device)
    image_set = _limited(image_set, n)
    stats: dict[str, FeatureStats] = {}
    feats: dict[str, np.ndarray] = {}
    cache: dict[str, str] = {}
    todo = dict(exts)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir is not None else None
    if cache_dir is not None:
        # a decode-only pass (cheap next to any extractor) gives the metadata a cached file must have
        prov = image_set.provenance
        w, h = prov["image_size"]
        for name, ext in exts.items():
            npz, npy = _cache_paths(cache_dir, role, name)
            if not npz.is_file():
                continue
            expected = stats_metadata(ext.settings((h, w)), prov)
            loaded = FeatureStats.load(npz, expected_meta=expected)
            if not npy.is_file():
                raise IncompatibleStatsError(
                    f"{npz} has no feature matrix beside it ({npy.name}); delete it to recompute"
                )
            matrix = np.load(npy)
            tol = 1e-5 * (1.0 + float(np.abs(loaded.mean).max()))
            if matrix.shape != (loaded.n, loaded.dim) or not np.allclose(
                matrix.mean(0, dtype=np.float64), loaded.mean, atol=tol
            ):
                raise IncompatibleStatsError(
                    f"{npy} does not match the statistics in {npz}; delete both to recompute"
                )
            stats[name], feats[name] = loaded, matrix
            cache[name] = f"loaded {npz}"
            todo.pop(name)
    keys: list[str] = []
    samples: list[np.ndarray] = []
    if todo:
        for ext in todo.values():
            ext.to(dev)
        acc = _Accumulator(todo, dev, True, opts.max_keep_mb)
        decode_s = 0.0
        batches = image_set.batches(opts.batch_size)
        bar = tqdm(total=image_set.limit, unit="tile", desc=f"features {role}", disable=not opts.progress)
        while True:
            start = time.perf_counter()
            nxt = next(batches, None)
            decode_s += time.perf_counter() - start
            if nxt is None:
                break
            bkeys, batch, _ = nxt
            if len(samples) < opts.keep_samples:
                samples.extend(batch[: opts.keep_samples - len(samples)])
            acc.update(bkeys, batch)
            bar.update(len(bkeys))
        bar.close()
        result = acc.finish(image_set.provenance, decode_s)
        keys = result.keys
        for name in todo:
            stats[name], feats[name] = result[name], result.features[name]
            if cache_dir is not None:
                npz, npy = _cache_paths(cache_dir, role, name)
                result[name].save(npz)
                np.save(npy, result.features[name])
                cache[name] = f"saved {npz}"
    else:  # everything came from the cache: one more decode-only pass for keys and grid samples
        for tile in image_set:
            keys.append(tile.key)
            if len(samples) < opts.keep_samples:
                samples.append(tile.image)
    return ReferenceFeatures(
        role=role,
        stats={name: stats[name] for name in exts},
        features={name: feats[name] for name in exts},
        keys=keys,
        provenance=image_set.provenance,
        extractors={name: ext.describe() for name, ext in exts.items()},
        image_set=image_set,
        cache=cache,
        samples=np.stack(samples) if samples else None,
    )


# ------------------------------------------------------------------------------------------- codecs
def _lossy_steps(codec: Mapping[str, Any]) -> tuple[str, ...]:
    stored = {k: v for k, v in codec.items() if k != "applied"}
    steps = () if stored.get("lossless") else (codec_label(stored),)
    applied = codec.get("applied")
    if applied:
        steps += _lossy_steps(applied)
    return steps


def compare_codecs(reference: Mapping[str, Any], generated: Mapping[str, Any]) -> dict[str, Any]:
    """Check that two image sets' codecs are equivalent (provenance dicts); raise `IncompatibleStatsError`.

    Every lossless format (PNG, lossless WebP, never-encoded arrays) is one class; lossy steps (stored
    JPEG, in-memory re-encoding) must match in order: a reference stored as JPEG q90 compares with
    generated tiles re-encoded at JPEG q90 (``generated_codec={"jpeg": 90}``), never with lossless ones.
    """
    ref_steps, gen_steps = _lossy_steps(reference["codec"]), _lossy_steps(generated["codec"])
    if ref_steps != gen_steps:
        hint = (
            f"set generated_codec to {{'jpeg': <quality>}} matching the reference ({', '.join(ref_steps)})"
            if ref_steps
            else "compare lossless with lossless (generated_codec: lossless)"
        )
        raise IncompatibleStatsError(
            f"codecs differ: reference {reference['codec_label']!r} "
            f"({' → '.join(ref_steps) or 'lossless'}) vs generated {generated['codec_label']!r} "
            f"({' → '.join(gen_steps) or 'lossless'}); {hint}"
        )
    return {
        "reference": reference["codec_label"],
        "generated": generated["codec_label"],
        "lossy_steps": list(ref_steps),
        "equivalent": True,
    }


# ----------------------------------------------------------------------------------------- generation
@dataclass
class GeneratedFeatures:
    stats: dict[str, FeatureStats]
    features: dict[str, np.ndarray]
    keys: list[str]  # the reference key each tile was conditioned on (or the folder's keys)
    provenance: dict[str, Any]
    samples: np.ndarray | None
    timings: dict[str, float]


def encoder_name(ext: Any) -> str:
    enc = getattr(ext, "encoder", None)
    spec = getattr(enc, "spec", None)
    if spec is not None:
        return str(spec.name)
    return str(ext.settings((224, 224)).get("encoder", ext.name))


def _chunk_seed(seed: int, chunk: int) -> int:
    """Chunk 0 uses ``seed`` itself (so a one-chunk run equals ``generator.generate(..., seed=seed)``)."""
    if chunk == 0:
        return int(seed)
    return int(
        np.random.SeedSequence([int(seed) & (2**63 - 1), chunk]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


def generated_provenance(generator: TileGenerator, codec: Any, n: int, px: int) -> dict[str, Any]:
    stored = {"format": "raw", "lossless": True}
    parsed = parse_codec(codec)
    full = dict(stored) | ({"applied": parsed} if parsed else {})
    mpp = float(generator.mpp)
    return {
        "name": f"generated:{generator.name}",
        "kind": "generated",
        "source": str(generator.name),
        "count": n,
        "limit": None,
        "tile_px": px,
        "image_size": [px, px],
        "stored_mode": "RGB",
        "stored_codec": stored,
        "stored_codec_label": "raw",
        "codec_source": "generator (in memory, never written)",
        "applied_codec": codec_settings(codec) if parsed else None,
        "codec": full,
        "codec_label": codec_label(full),
        "mpp": mpp,
        "mpp_source": "generator",
        "effective_mpp": None,
        "fov_um": round(mpp * px, 3),
    }


def embed_reference(
    generator: TileGenerator, image_set: ImageSet, batch_size: int, progress: bool = True
) -> tuple[list[str], torch.Tensor, float]:
    keys: list[str] = []
    parts: list[torch.Tensor] = []
    start = time.perf_counter()
    bar = tqdm(total=image_set.limit, unit="tile", desc="embed references", disable=not progress)
    for bkeys, batch, _ in image_set.batches(batch_size):
        emb = torch.as_tensor(generator.embed(batch)).detach().float().cpu()
        if emb.shape[0] != len(bkeys):
            raise RuntimeError(f"{generator.name}.embed returned {emb.shape[0]} rows for {len(bkeys)} tiles")
        keys.extend(bkeys)
        parts.append(emb)
        bar.update(len(bkeys))
    bar.close()
    return keys, torch.cat(parts), time.perf_counter() - start


def check_before_generating(
    exts: Mapping[str, Any], prov: Mapping[str, Any], refs: Mapping[str, ReferenceFeatures]
) -> dict[str, dict[str, Any]]:
    """The generated side's metadata vs every reference, before generating anything (fail fast)."""
    codecs = {}
    for role, ref in refs.items():
        codecs[role] = compare_codecs(ref.provenance, prov)
        px = prov["tile_px"]
        for name, ext in exts.items():
            meta = stats_metadata(ext.settings((px, px)), {**prov, "keys_sha256": "", "count": 0})
            try:
                ref.stats[name].check_compatible(meta, ignore=FD_IGNORE)
            except IncompatibleStatsError as err:
                raise IncompatibleStatsError(
                    f"generated tiles ({px} px, mpp {prov['mpp']}, {prov['fov_um']} µm) cannot be compared with the "
                    f"{role} reference in {name!r}: {err}"
                ) from None
    return codecs


def generate_features(
    generator: TileGenerator,
    embeddings: torch.Tensor,
    cond_keys: Sequence[str],
    exts: Mapping[str, Any],
    *,
    steps: int | None,
    guidance_scale: float | None,
    seed: int,
    options: HarnessOptions,
) -> GeneratedFeatures:
    """Generate one tile per embedding (in chunks), re-encode if asked, and feed every extractor."""
    opts = options
    dev = _device(opts.device)
    n = embeddings.shape[0]
    px = int(generator.tile_px)
    prov = generated_provenance(generator, opts.generated_codec, n, px)
    acc = _Accumulator(exts, dev, True, opts.max_keep_mb)
    pixels = hashlib.sha256()
    keyhash = hashlib.sha256(
        f"generated|{generator.name}|seed={seed}|steps={steps}|guidance={guidance_scale}\n".encode()
    )
    samples: list[np.ndarray] = []
    gen_s = feat_s = 0.0
    chunk_seeds = []
    bar = tqdm(total=n, unit="tile", desc=f"generate (seed {seed})", disable=not opts.progress)
    for c, s in enumerate(range(0, n, opts.chunk_size)):
        e = min(s + opts.chunk_size, n)
        cseed = _chunk_seed(seed, c)
        chunk_seeds.append(cseed)
        t0 = time.perf_counter()
        images = generator.generate(
            embeddings[s:e],
            steps=steps,
            guidance_scale=guidance_scale,
            seed=cseed,
            batch_size=opts.generation_batch_size,
        )
        gen_s += time.perf_counter() - t0
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape != (e - s, px, px, 3):
            raise RuntimeError(
                f"{generator.name}.generate returned {images.dtype} {images.shape}; expected uint8 ({e - s}, {px}, {px}, 3)"
            )
        images = apply_codec(images, opts.generated_codec)
        t0 = time.perf_counter()
        for b in range(0, e - s, opts.batch_size):
            batch = images[b : b + opts.batch_size]
            bkeys = list(cond_keys[s + b : s + b + len(batch)])
            acc.update(bkeys, batch)
            pixels.update(np.ascontiguousarray(batch).tobytes())
            for k in bkeys:
                keyhash.update(k.encode() + b"\n")
        feat_s += time.perf_counter() - t0
        bar.update(e - s)
        if len(samples) < opts.keep_samples:
            samples.extend(images[: opts.keep_samples - len(samples)])
    bar.close()
    prov |= {
        "keys_sha256": keyhash.hexdigest(),
        "pixels_sha256": pixels.hexdigest(),
        "conditioned_on": "reference keys in order (tile i ← reference i)",
        "seed": seed,
        "chunk_seeds": chunk_seeds[:16] + (["…"] if len(chunk_seeds) > 16 else []),
        "seed_derivation": "chunk 0: seed; chunk j > 0: SeedSequence([seed, j]).generate_state(1)[0] >> 1",
        "chunk_size": opts.chunk_size,
        "generation_batch_size": opts.generation_batch_size,
        "steps": steps,
        "guidance_scale": guidance_scale,
    }
    result = acc.finish(prov, 0.0)
    return GeneratedFeatures(
        stats=dict(result),
        features=result.features,
        keys=list(cond_keys[:n]),
        provenance=prov,
        samples=np.stack(samples) if samples else None,
        timings={"generate_s": gen_s, "features_s": feat_s, "generate_s_per_image": gen_s / max(n, 1)},
    )


def _folder_features(
    image_set: ImageSet, exts: Mapping[str, Any], options: HarnessOptions
) -> GeneratedFeatures:
    """Already generated tiles (a folder): features like a reference (no cache: the set is the variable)."""
    ref = prepare_reference(image_set, exts, role="generated", options=replace(options, cache_dir=None))
    prov = dict(ref.provenance) | {"conditioned_on": "matched by key when the names equal reference keys"}
    return GeneratedFeatures(ref.stats, ref.features, ref.keys, prov, ref.samples, {})


# -------------------------------------------------------------------------------------------- metrics
def fd_bootstrap(
    gen_features: np.ndarray,
    gen_meta: Mapping[str, Any],
    refs: Mapping[str, FeatureStats],
    *,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    gap: tuple[str, str] | None = None,
) -> tuple[dict[str, BootstrapCI], BootstrapCI | None]:
    """FD of the generated features against several fixed references, from shared bootstrap replicates.

    Each replicate resamples the generated rows with replacement exactly as `frechet_distance_ci`
    does (same seed → same rows, so each interval equals the core's), and the replicate's statistics
    (and covariance square root) are reused for every reference. ``gap=(a, b)`` also returns the CI of
    ``FD_a − FD_b`` from the *same* replicates (a paired bootstrap: e.g. held-out minus train).
    """
    gen = np.asarray(gen_features, dtype=np.float64)
    meta = dict(gen_meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = FeatureStats.from_features(gen, meta)
        points = {r: frechet_distance(full, s, ignore=FD_IGNORE) for r, s in refs.items()}
        n = gen.shape[0]
        rng = np.random.default_rng(seed)
        reps = {r: np.empty(n_boot) for r in refs}
        for b in range(n_boot):
            idx = rng.integers(0, n, size=n)
            rep = FeatureStats.from_features(gen[idx], meta)
            for r, s in refs.items():
                reps[r][b] = frechet_distance(rep, s, ignore=FD_IGNORE)
    q = [alpha / 2, 1 - alpha / 2]
    cis = {r: BootstrapCI(points[r], *map(float, np.quantile(reps[r], q))) for r in refs}
    gap_ci = None
    if gap is not None:
        a, b = gap
        diff = reps[a] - reps[b]
        gap_ci = BootstrapCI(points[a] - points[b], *map(float, np.quantile(diff, q)))
    return cis, gap_ci


def compare_sets(
    gen: GeneratedFeatures,
    refs: Mapping[str, ReferenceFeatures],
    opts: HarnessOptions,
    seed: int,
    notes: list[str],
    gap: tuple[str, str] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    comparisons: dict[str, dict[str, Any]] = {r: {} for r in refs}
    gaps: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for name, gstats in gen.stats.items():
            for ref in refs.values():
                gstats.check_compatible(ref.stats[name], ignore=FD_IGNORE)  # the metric core's guard
            cis, gap_ci = fd_bootstrap(
                gen.features[name],
                gstats.metadata,
                {r: ref.stats[name] for r, ref in refs.items()},
                n_boot=opts.n_boot,
                alpha=opts.alpha,
                seed=seed,
                gap=gap,
            )
            if gap_ci is not None:
                gaps[name] = gap_ci
            for r, ref in refs.items():
                g, x = gen.features[name], ref.features[name]
                k = kid(g, x, subsets=opts.kid_subsets, subset_size=opts.kid_subset_size, seed=seed)
                p = prdc(x, g, k=opts.prdc_k) if min(len(g), len(x)) > opts.prdc_k else None
                if p is None:
                    notes.append(
                        f"PRDC skipped for {name}/{r}: needs more than k={opts.prdc_k} tiles per set"
                    )
                comparisons[r][name] = {
                    "fd": cis[r],
                    "kid": k,
                    "prdc": p,
                    "n_generated": len(g),
                    "n_reference": len(x),
                }
    for w in caught:
        msg = str(w.message)
        if msg not in notes:
            notes.append(msg)
    return comparisons, gaps


def pick_extractor(
    exts: Mapping[str, Any], requested: str | None, conditioning: str | None, purpose: str
) -> str | None:
    if requested is not None:
        if requested not in exts:
            raise ValueError(f"{purpose} extractor {requested!r} is not among the extractors {sorted(exts)}")
        if conditioning is not None and encoder_name(exts[requested]) == conditioning:
            raise ValueError(
                f"{purpose} must be measured in an encoder other than the conditioning one ({conditioning!r}): "
                f"in its own space the score measures how well the model reproduces its input embedding, not the "
                f"image; pick another extractor"
            )
        return requested
    for name, ext in exts.items():
        if encoder_name(ext) != conditioning:
            return name
    return None


def fidelity(
    gen: GeneratedFeatures,
    ref: ReferenceFeatures,
    name: str | None,
    conditioning: str | None,
    opts: HarnessOptions,
    seed: int,
) -> dict[str, Any]:
    if name is None:
        return {
            "extractor": None,
            "estimate": None,
            "note": f"no extractor other than the conditioning encoder ({conditioning}); conditional fidelity not computed",
        }
    pos = {k: i for i, k in enumerate(ref.keys)}
    pairs = [(pos[k], j) for j, k in enumerate(gen.keys) if k in pos]
    if len(pairs) < 2:
        return {
            "extractor": name,
            "estimate": None,
            "note": "generated tiles are not paired with reference tiles",
        }
    ri = np.array([p[0] for p in pairs])
    gi = np.array([p[1] for p in pairs])
    r, g = ref.features[name][ri].astype(np.float64), gen.features[name][gi].astype(np.float64)
    ci = bootstrap_ci(conditional_fidelity, r, g, n_boot=opts.n_boot, alpha=opts.alpha, seed=seed)
    baseline = float(cosine_similarity_pairs(r, np.roll(g, 1, axis=0)).mean())
    return {
        "extractor": name,
        "encoder": name,
        "conditioning_encoder": conditioning,
        "estimate": ci,
        "unpaired_baseline": baseline,
        "unpaired_baseline_note": "mean cosine of reference i with the tile generated from reference i+1 (chance level)",
        "n_pairs": len(pairs),
    }


# ---------------------------------------------------------------------------------------------- studies
def resolve_options(options: HarnessOptions | None, overrides: Mapping[str, Any]) -> HarnessOptions:
    return replace(options or HarnessOptions(), **overrides)


def as_reference(
    obj: ImageSet | ReferenceFeatures, exts: Mapping[str, Any], role: str, n: int | None, opts: HarnessOptions
) -> ReferenceFeatures:
    if isinstance(obj, ReferenceFeatures):
        missing = set(exts) - set(obj.stats)
        if missing:
            raise ValueError(f"reference {obj.role!r} lacks features for {sorted(missing)}")
        return obj
    return prepare_reference(obj, exts, role=role, n=n, options=opts)


def describe_generator(generator: Any) -> dict[str, Any]:
    if isinstance(generator, ImageSet):
        return {"kind": "folder", "name": generator.name, "source": str(generator.source)}
    return dict(generator.describe()) | {
        "protocol": {
            "name": generator.name,
            "conditioning_encoder": generator.conditioning_encoder,
            "tile_px": generator.tile_px,
            "mpp": generator.mpp,
        }
    }


def extractor_info(
    exts: Mapping[str, Any], stats: Mapping[str, FeatureStats], conditioning: str | None
) -> dict[str, Any]:
    return {
        name: {
            "describe": ext.describe(),
            "metadata": stats[name].metadata,
            "encoder": encoder_name(ext),
            "is_conditioning_encoder": encoder_name(ext) == conditioning,
        }
        for name, ext in exts.items()
    }


def generate_or_read(
    generator: TileGenerator | ImageSet,
    cond_ref: ReferenceFeatures,
    exts: Mapping[str, Any],
    refs: Mapping[str, ReferenceFeatures],
    *,
    steps: int | None,
    guidance_scale: float | None,
    seed: int,
    opts: HarnessOptions,
    timings: dict[str, float],
) -> GeneratedFeatures:
    if isinstance(generator, ImageSet):
        gen = _folder_features(generator, exts, opts)
        gen.provenance["codec_comparison"] = {
            r: compare_codecs(x.provenance, gen.provenance) for r, x in refs.items()
        }
        return gen
    prov = generated_provenance(generator, opts.generated_codec, cond_ref.n, int(generator.tile_px))
    codecs = check_before_generating(exts, prov, refs)
    assert cond_ref.image_set is not None
    keys, emb, embed_s = embed_reference(generator, cond_ref.image_set, opts.batch_size, opts.progress)
    timings["embed_s"] = embed_s
    gen = generate_features(
        generator, emb, keys, exts, steps=steps, guidance_scale=guidance_scale, seed=seed, options=opts
    )
    timings.update(gen.timings)
    gen.provenance["codec_comparison"] = codecs
    return gen


def study_settings(opts: HarnessOptions, **extra: Any) -> dict[str, Any]:
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items()}
    d["generated_codec_settings"] = codec_settings(opts.generated_codec)
    return d | extra


def grid_samples(ref: ReferenceFeatures, gen: GeneratedFeatures) -> dict[str, np.ndarray]:
    out = {}
    if ref.samples is not None:
        out["reference"] = ref.samples
    if gen.samples is not None:
        out["generated"] = gen.samples
    return out


_MOVED_TO_STUDIES = ("overfitting_study", "domain_study", "sweep_study", "memorisation")


def __getattr__(name: str) -> Any:
    """The study functions moved to `cytosyn.eval.studies`; old imports from the harness keep working."""
    if name in _MOVED_TO_STUDIES:
        from . import studies

        return getattr(studies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
