"""Studies of generative tile models through the `TileGenerator` protocol: overfitting, domain, sweep.

Every study talks to the model only through :class:`cytosyn.generation.TileGenerator` (cytosyn's
pipeline, the PixCell adapter, or a fake in tests) — or takes already generated tiles as an `ImageSet`
(a folder of images). The flow is the same for all three:

1. **reference features**: each reference set (first ``n`` tiles; packed splits are shuffled) is read once
   and fed to every extractor (`cytosyn.eval.features`), keeping the feature matrices; with a cache folder
   the statistics and features are saved, and a cached file made with other settings or another reference
   set is refused (`FeatureStats.load(..., expected_meta=...)`, the metric core's guard);
2. **conditioning**: the held-out (or domain) reference tiles are embedded with the generator's own
   encoder (`generator.embed`), and tile ``i`` is generated from reference ``i``'s embedding;
3. **generated features**: tiles are generated in chunks, optionally re-encoded (``generated_codec``) and
   fed to the same extractors without being written anywhere;
4. **metrics** from the metric core: FD per extractor with a bootstrap CI over generated tiles (the
   same replicates as `frechet_distance_ci`), KID, precision/recall/density/coverage (k = 5),
   conditional fidelity in an encoder *other* than the conditioning one (refused otherwise) with a
   bootstrap CI and an unpaired baseline, and for the overfitting study nearest-neighbour memorisation.

Before anything is generated, the generated side's metadata (encoder, weights, resize, tile size, mpp,
field of view) is checked against every reference with `FeatureStats.check_compatible`, and the codecs
of both sides must be equivalent (every lossless format counts as one; a lossy chain must match step by
step): a mismatch raises `IncompatibleStatsError` instead of spending GPU hours on a comparison that
would be refused.

Results are `StudyResult` objects: JSON-serialisable with `to_dict()`, with full provenance (generator
``describe()``, every image set's provenance, each extractor's ``describe()`` and metadata, codecs,
seeds, counts, timings) and a few sample tiles kept in memory for the report's image grids.
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from .stats import (
    PROVENANCE_KEYS,
    FDInterval,
    FeatureStats,
    IncompatibleStatsError,
    fd_intervals,
    frechet_distance,
)

__all__ = [
    "HarnessOptions",
    "ReferenceFeatures",
    "StudyResult",
    "compare_codecs",
    "domain_study",
    "fd_bootstrap",
    "memorisation",
    "overfitting_study",
    "prepare_reference",
    "sweep_study",
]

#: FDs here ignore the ``codec`` key: codecs are checked first by `compare_codecs` (lossless ≡ lossless).
FD_IGNORE = PROVENANCE_KEYS | {"codec"}
RATIO_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95)


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
        """A flat ``{name: number}`` summary (what the report's top table and seed aggregates use)."""
        out: dict[str, float] = {}
        m = self.to_dict(strict=False)["metrics"]
        if self.study in ("overfitting", "domain"):
            for ref, per_ext in m.get("comparisons", {}).items():
                for ext, vals in per_ext.items():
                    out[f"fd/{ext}/{ref}"] = vals["fd"]["estimate"]
                    out[f"kid/{ext}/{ref}"] = vals["kid"]["mean"]
                    for k in ("precision", "recall", "density", "coverage"):
                        if vals["prdc"] is not None:
                            out[f"{k}/{ext}/{ref}"] = vals["prdc"][k]
            for ext, gap in m.get("overfitting_gap", {}).items():
                out[f"fd_gap/{ext}"] = gap["estimate"]
            fid = m.get("conditional_fidelity")
            if fid and fid.get("estimate") is not None:
                out[f"conditional_fidelity/{fid['extractor']}"] = fid["estimate"]["estimate"]
            mem = m.get("memorisation")
            if mem:
                out["memorisation/fraction_closer_to_train"] = mem["fraction_closer_to_train"]["estimate"]
                out["memorisation/median_ratio"] = mem["ratio_quantiles"]["0.5"]
        elif self.study == "sweep":
            for cell in m.get("cells", []):
                tag = f"steps={cell['steps']},g={cell['guidance_scale']}"
                for ext, vals in cell["fd"].items():
                    out[f"fd/{ext}/{tag}"] = vals["estimate"]
        return out


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


def _encoder_name(ext: Any) -> str:
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


def _generated_provenance(generator: TileGenerator, codec: Any, n: int, px: int) -> dict[str, Any]:
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


def _embed_reference(
    generator: TileGenerator, image_set: ImageSet, batch_size: int
) -> tuple[list[str], torch.Tensor, float]:
    keys: list[str] = []
    parts: list[torch.Tensor] = []
    start = time.perf_counter()
    for bkeys, batch, _ in image_set.batches(batch_size):
        emb = torch.as_tensor(generator.embed(batch)).detach().float().cpu()
        if emb.shape[0] != len(bkeys):
            raise RuntimeError(f"{generator.name}.embed returned {emb.shape[0]} rows for {len(bkeys)} tiles")
        keys.extend(bkeys)
        parts.append(emb)
    return keys, torch.cat(parts), time.perf_counter() - start


def _check_before_generating(
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
    prov = _generated_provenance(generator, opts.generated_codec, n, px)
    acc = _Accumulator(exts, dev, True, opts.max_keep_mb)
    pixels = hashlib.sha256()
    keyhash = hashlib.sha256(
        f"generated|{generator.name}|seed={seed}|steps={steps}|guidance={guidance_scale}\n".encode()
    )
    samples: list[np.ndarray] = []
    gen_s = feat_s = 0.0
    chunk_seeds = []
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
        if len(samples) < opts.keep_samples:
            samples.extend(images[: opts.keep_samples - len(samples)])
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
) -> tuple[dict[str, FDInterval], FDInterval | None]:
    """FD of the generated features against several fixed references, with intervals from shared
    half-sample replicates (`cytosyn.eval.stats.fd_intervals`, the same as `frechet_distance_ci` with the
    same seed); ``gap=(a, b)`` also gives the paired interval of ``FD_a − FD_b`` (e.g. held-out minus
    train). Kept under its old name; it is no longer a bootstrap (see docs/evaluation.md)."""
    return fd_intervals(
        gen_features,
        refs,
        meta=dict(gen_meta),
        alpha=alpha,
        replicates=n_boot,
        seed=seed,
        ignore=FD_IGNORE,
        gap=gap,
    )


def _compare(
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


def _pick_extractor(
    exts: Mapping[str, Any], requested: str | None, conditioning: str | None, purpose: str
) -> str | None:
    if requested is not None:
        if requested not in exts:
            raise ValueError(f"{purpose} extractor {requested!r} is not among the extractors {sorted(exts)}")
        if conditioning is not None and _encoder_name(exts[requested]) == conditioning:
            raise ValueError(
                f"{purpose} must be measured in an encoder other than the conditioning one ({conditioning!r}): "
                f"in its own space the score measures how well the model reproduces its input embedding, not the "
                f"image; pick another extractor"
            )
        return requested
    for name, ext in exts.items():
        if _encoder_name(ext) != conditioning:
            return name
    return None


def _fidelity(
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


def _nn_dist(a: np.ndarray, b: np.ndarray, exclude_self: bool = False, block: int = 1024) -> np.ndarray:
    """Euclidean distance from each row of ``a`` to its nearest row of ``b`` (float64, in row blocks)."""
    center = b.mean(0)
    x = torch.from_numpy(np.asarray(a, np.float64) - center)
    y = torch.from_numpy(np.asarray(b, np.float64) - center)
    y_sq = (y * y).sum(1)
    out = np.empty(x.shape[0])
    for s in range(0, x.shape[0], block):
        xb = x[s : s + block]
        d = ((xb * xb).sum(1)[:, None] + y_sq[None, :] - 2 * xb @ y.T).clamp_min_(0)
        if exclude_self:
            rows = torch.arange(xb.shape[0])
            d[rows, rows + s] = float("inf")
        out[s : s + block] = d.min(1).values.sqrt().numpy()
    return out


def memorisation(
    gen_features: np.ndarray,
    train_features: np.ndarray,
    heldout_features: np.ndarray,
    *,
    equalise: bool = True,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Nearest-neighbour memorisation: is each generated tile nearer to a training tile than to a held-out one?

    For generated tile g: ``d_train`` = distance to its nearest training tile, ``d_heldout`` = to its
    nearest held-out tile (Euclidean, in one feature space). Reported: the ratio ``d_train / d_heldout``
    (quantiles and a histogram on [0, 2]), the fraction with ``d_train < d_heldout`` (bootstrap CI over
    generated tiles), the fraction of near-exact training copies (``d_train`` below 1e-3 × the median
    held-out → train nearest distance), and a baseline: the same fraction for held-out tiles themselves
    (each held-out tile's nearest training tile vs its nearest *other* held-out tile) — what a model
    drawing new tiles like the held-out patients' would score. Nearest distances shrink with the number
    of candidates, so with ``equalise`` both candidate sets are subsampled (seeded) to the same size.
    """
    g = np.asarray(gen_features, np.float64)
    t = np.asarray(train_features, np.float64)
    h = np.asarray(heldout_features, np.float64)
    rng = np.random.default_rng(seed)
    if equalise and len(t) != len(h):
        m = min(len(t), len(h))
        t = t[np.sort(rng.choice(len(t), m, replace=False))] if len(t) > m else t
        h = h[np.sort(rng.choice(len(h), m, replace=False))] if len(h) > m else h
    d_t = _nn_dist(g, t)
    d_h = _nn_dist(g, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d_h > 0, d_t / np.where(d_h > 0, d_h, 1), np.where(d_t > 0, np.inf, 1.0))
    closer = (d_t < d_h).astype(np.float64)
    frac = (
        bootstrap_ci(np.mean, closer, n_boot=n_boot, alpha=alpha, seed=seed)
        if len(closer) >= 2
        else BootstrapCI(float(closer.mean()), float("nan"), float("nan"))
    )
    # baseline: held-out tiles vs train (one fewer train candidate, to match the n−1 other held-out tiles)
    t_base = t[rng.permutation(len(t))[: max(len(h) - 1, 1)]] if equalise and len(t) >= len(h) else t
    base_t = _nn_dist(h, t_base)
    base_h = _nn_dist(h, h, exclude_self=True) if len(h) > 1 else np.full(len(h), np.inf)
    scale = float(np.median(base_t)) if len(base_t) else 0.0
    finite = np.clip(ratio[np.isfinite(ratio)], 0, 2)
    hist, edges = np.histogram(finite, bins=20, range=(0.0, 2.0))
    return {
        "n_generated": len(g),
        "n_train_candidates": len(t),
        "n_heldout_candidates": len(h),
        "equalised": bool(equalise),
        "fraction_closer_to_train": frac,
        "ratio_quantiles": {str(q): float(np.quantile(ratio, q, method="nearest")) for q in RATIO_QUANTILES},
        "ratio_histogram": {
            "edges": edges.tolist(),
            "counts": hist.tolist(),
            "above_2": int((ratio > 2).sum()),
        },
        "near_copy_fraction": float((d_t <= 1e-3 * scale).mean()) if scale > 0 else float((d_t == 0).mean()),
        "near_copy_threshold": 1e-3 * scale,
        "heldout_baseline_fraction": float((base_t < base_h).mean()),
        "median_d_train": float(np.median(d_t)),
        "median_d_heldout": float(np.median(d_h)),
    }


# ---------------------------------------------------------------------------------------------- studies
def _options(options: HarnessOptions | None, overrides: Mapping[str, Any]) -> HarnessOptions:
    return replace(options or HarnessOptions(), **overrides)


def _as_reference(
    obj: ImageSet | ReferenceFeatures, exts: Mapping[str, Any], role: str, n: int | None, opts: HarnessOptions
) -> ReferenceFeatures:
    if isinstance(obj, ReferenceFeatures):
        missing = set(exts) - set(obj.stats)
        if missing:
            raise ValueError(f"reference {obj.role!r} lacks features for {sorted(missing)}")
        return obj
    return prepare_reference(obj, exts, role=role, n=n, options=opts)


def _describe_generator(generator: Any) -> dict[str, Any]:
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


def _extractor_info(
    exts: Mapping[str, Any], stats: Mapping[str, FeatureStats], conditioning: str | None
) -> dict[str, Any]:
    return {
        name: {
            "describe": ext.describe(),
            "metadata": stats[name].metadata,
            "encoder": _encoder_name(ext),
            "is_conditioning_encoder": _encoder_name(ext) == conditioning,
        }
        for name, ext in exts.items()
    }


def _generate_or_read(
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
    prov = _generated_provenance(generator, opts.generated_codec, cond_ref.n, int(generator.tile_px))
    codecs = _check_before_generating(exts, prov, refs)
    assert cond_ref.image_set is not None
    keys, emb, embed_s = _embed_reference(generator, cond_ref.image_set, opts.batch_size)
    timings["embed_s"] = embed_s
    gen = generate_features(
        generator, emb, keys, exts, steps=steps, guidance_scale=guidance_scale, seed=seed, options=opts
    )
    timings.update(gen.timings)
    gen.provenance["codec_comparison"] = codecs
    return gen


def _settings(opts: HarnessOptions, **extra: Any) -> dict[str, Any]:
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items()}
    d["generated_codec_settings"] = codec_settings(opts.generated_codec)
    return d | extra


def overfitting_study(
    generator: TileGenerator | ImageSet,
    train_set: ImageSet | ReferenceFeatures,
    heldout_set: ImageSet | ReferenceFeatures,
    extractors: Mapping[str, Any] | Iterable[Any],
    n: int | None = None,
    *,
    fidelity_extractor: str | None = None,
    memorisation_extractor: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    options: HarnessOptions | None = None,
    **overrides: Any,
) -> StudyResult:
    """Slide-level overfitting: generate from held-out patients' embeddings, compare with held-out and training tiles.

    ``n`` tiles are read from each set (first ``n``), and tile i is generated from held-out tile i's
    embedding. Per extractor: FD (bootstrap CI) against held-out and against training tiles and their gap
    ``FD_heldout − FD_train`` (paired bootstrap; > 0 means the generated tiles sit closer to the training
    patients'), KID and PRDC (k = 5) against each. Conditional fidelity in ``fidelity_extractor`` (default:
    the first extractor whose encoder is not the conditioning one; naming the conditioning encoder is an
    error). `memorisation` in ``memorisation_extractor``'s space (default: the fidelity extractor).
    ``generator`` may also be an `ImageSet` of already generated tiles.
    """
    opts = _options(options, overrides)
    exts = build_extractors(extractors)
    conditioning = None if isinstance(generator, ImageSet) else generator.conditioning_encoder
    fid_name = _pick_extractor(exts, fidelity_extractor, conditioning, "conditional fidelity")
    mem_name = memorisation_extractor or fid_name or next(iter(exts))
    if mem_name not in exts:
        raise ValueError(f"memorisation extractor {mem_name!r} is not among the extractors {sorted(exts)}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    held = _as_reference(heldout_set, exts, "heldout", n, opts)
    train = _as_reference(train_set, exts, "train", n, opts)
    timings["reference_s"] = time.perf_counter() - t0
    refs = {"heldout": held, "train": train}
    gen = _generate_or_read(
        generator,
        held,
        exts,
        refs,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        opts=opts,
        timings=timings,
    )
    notes: list[str] = []
    if held.n != train.n:
        notes.append(
            f"held-out ({held.n}) and training ({train.n}) references differ in size: FD is biased by 1/n, so the "
            "gap mixes sample size with overfitting; use equal sizes"
        )
    t0 = time.perf_counter()
    comparisons, gaps = _compare(gen, refs, opts, seed, notes, gap=("heldout", "train"))
    fid = _fidelity(gen, held, fid_name, conditioning, opts, seed)
    mem = memorisation(
        gen.features[mem_name],
        train.features[mem_name],
        held.features[mem_name],
        equalise=opts.equalise_nn,
        n_boot=opts.n_boot,
        alpha=opts.alpha,
        seed=seed,
    ) | {"extractor": mem_name}
    timings["metrics_s"] = time.perf_counter() - t0
    if all(_encoder_name(e) == conditioning for e in exts.values()):
        notes.append(f"every extractor is the conditioning encoder ({conditioning}); add another one")
    return StudyResult(
        study="overfitting",
        generator=_describe_generator(generator),
        settings=_settings(
            opts,
            n=n,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            fidelity_extractor=fid_name,
            memorisation_extractor=mem_name,
        ),
        references={r: ref.provenance | {"cache": ref.cache, "n_used": ref.n} for r, ref in refs.items()},
        generated=gen.provenance,
        extractors=_extractor_info(exts, held.stats, conditioning),
        metrics={
            "comparisons": comparisons,
            "overfitting_gap": gaps,
            "overfitting_gap_note": "FD_heldout − FD_train per extractor, paired bootstrap over generated tiles; "
            "> 0: the generated tiles are closer to the training patients' tiles than to new patients'",
            "conditional_fidelity": fid,
            "memorisation": mem,
        },
        warnings=notes,
        timings_s=timings,
        samples=_samples(held, gen),
    )


def _samples(ref: ReferenceFeatures, gen: GeneratedFeatures) -> dict[str, np.ndarray]:
    out = {}
    if ref.samples is not None:
        out["reference"] = ref.samples
    if gen.samples is not None:
        out["generated"] = gen.samples
    return out


def domain_study(
    generator: TileGenerator | ImageSet,
    reference_set: ImageSet | ReferenceFeatures,
    extractors: Mapping[str, Any] | Iterable[Any],
    n: int | None = None,
    *,
    other_sets: Mapping[str, ImageSet | ReferenceFeatures] | None = None,
    fidelity_extractor: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    options: HarnessOptions | None = None,
    **overrides: Any,
) -> StudyResult:
    """Any tiles as the reference (e.g. IBD biopsies): generate from their embeddings and compare with them.

    Same metrics as the overfitting study against ``reference_set`` (FD with CI, KID, PRDC, conditional
    fidelity). ``other_sets`` (name → set, e.g. the oncology held-out split) are also compared with the
    generated tiles, and the FD between the reference and each other set (real vs real) is reported as
    the size of the domain shift.
    """
    opts = _options(options, overrides)
    exts = build_extractors(extractors)
    conditioning = None if isinstance(generator, ImageSet) else generator.conditioning_encoder
    fid_name = _pick_extractor(exts, fidelity_extractor, conditioning, "conditional fidelity")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ref = _as_reference(reference_set, exts, "reference", n, opts)
    refs = {"reference": ref}
    for name, other in (other_sets or {}).items():
        if name == "reference":
            raise ValueError("'reference' is reserved for the domain's own reference set")
        refs[name] = _as_reference(other, exts, name, n, opts)
    timings["reference_s"] = time.perf_counter() - t0
    gen = _generate_or_read(
        generator,
        ref,
        exts,
        refs,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        opts=opts,
        timings=timings,
    )
    notes: list[str] = []
    t0 = time.perf_counter()
    comparisons, _ = _compare(gen, refs, opts, seed, notes)
    shift = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for other in refs:
            if other == "reference":
                continue
            shift[other] = {
                name: frechet_distance(ref.stats[name], refs[other].stats[name], ignore=FD_IGNORE)
                for name in exts
            }
    fid = _fidelity(gen, ref, fid_name, conditioning, opts, seed)
    timings["metrics_s"] = time.perf_counter() - t0
    return StudyResult(
        study="domain",
        generator=_describe_generator(generator),
        settings=_settings(
            opts, n=n, seed=seed, steps=steps, guidance_scale=guidance_scale, fidelity_extractor=fid_name
        ),
        references={r: x.provenance | {"cache": x.cache, "n_used": x.n} for r, x in refs.items()},
        generated=gen.provenance,
        extractors=_extractor_info(exts, ref.stats, conditioning),
        metrics={
            "comparisons": comparisons,
            "domain_shift_fd": shift,
            "domain_shift_note": "FD between the real reference tiles and each other real set (no generation)",
            "conditional_fidelity": fid,
        },
        warnings=notes,
        timings_s=timings,
        samples=_samples(ref, gen),
    )


def sweep_study(
    generator: TileGenerator | Callable[..., TileGenerator],
    reference_set: ImageSet | ReferenceFeatures,
    extractors: Mapping[str, Any] | Iterable[Any],
    n: int | None = None,
    *,
    steps: Sequence[int] = (10, 20, 50),
    guidance: Sequence[float] = (1.0, 1.5, 2.0),
    fidelity_extractor: str | None = None,
    seed: int = 0,
    options: HarnessOptions | None = None,
    **overrides: Any,
) -> StudyResult:
    """FD (and KID, conditional fidelity, time per image) over a grid of sampling steps × guidance scales.

    ``generator`` is a `TileGenerator` (``steps``/``guidance_scale`` passed to ``generate``) or a factory
    ``f(steps=…, guidance_scale=…) → TileGenerator`` called per cell. Every cell generates from the same
    reference embeddings with the same seed, so differences come from the sampler settings alone.
    """
    opts = _options(options, overrides)
    exts = build_extractors(extractors)
    if not steps or not guidance:
        raise ValueError("sweep_study needs at least one steps value and one guidance value")
    is_factory = not isinstance(generator, TileGenerator)
    first = generator(steps=steps[0], guidance_scale=guidance[0]) if is_factory else generator
    conditioning = first.conditioning_encoder
    fid_name = _pick_extractor(exts, fidelity_extractor, conditioning, "conditional fidelity")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ref = _as_reference(reference_set, exts, "reference", n, opts)
    timings["reference_s"] = time.perf_counter() - t0
    prov = _generated_provenance(first, opts.generated_codec, ref.n, int(first.tile_px))
    codecs = _check_before_generating(exts, prov, {"reference": ref})
    assert ref.image_set is not None
    keys, emb, timings["embed_s"] = _embed_reference(first, ref.image_set, opts.batch_size)
    cells = []
    notes: list[str] = []
    samples = {"reference": ref.samples} if ref.samples is not None else {}
    for s in steps:
        for g in guidance:
            gen_model = (
                generator(steps=s, guidance_scale=g)
                if is_factory and (s, g) != (steps[0], guidance[0])
                else first
            )
            if gen_model.conditioning_encoder != conditioning:
                raise ValueError("every generator of a sweep must use the same conditioning encoder")
            gen = generate_features(
                gen_model, emb, keys, exts, steps=s, guidance_scale=g, seed=seed, options=opts
            )
            comparisons, _ = _compare(gen, {"reference": ref}, opts, seed, notes)
            fid = _fidelity(gen, ref, fid_name, conditioning, opts, seed)
            cells.append(
                {
                    "steps": int(s),
                    "guidance_scale": float(g),
                    "fd": {name: c["fd"] for name, c in comparisons["reference"].items()},
                    "kid": {name: c["kid"] for name, c in comparisons["reference"].items()},
                    "prdc": {name: c["prdc"] for name, c in comparisons["reference"].items()},
                    "conditional_fidelity": fid,
                    "generate_s_per_image": gen.timings["generate_s_per_image"],
                    "generated": gen.provenance,
                }
            )
            if gen.samples is not None:
                samples[f"steps={s}, g={g}"] = gen.samples
    return StudyResult(
        study="sweep",
        generator=_describe_generator(first) | {"factory": is_factory},
        settings=_settings(
            opts, n=n, seed=seed, steps=list(steps), guidance=list(guidance), fidelity_extractor=fid_name
        ),
        references={"reference": ref.provenance | {"cache": ref.cache, "n_used": ref.n}},
        generated={
            "cells": len(cells),
            "per_cell": "see metrics.cells[*].generated",
            "codec_comparison": codecs,
        },
        extractors=_extractor_info(exts, ref.stats, conditioning),
        metrics={"cells": cells, "steps": list(steps), "guidance": list(guidance)},
        warnings=notes,
        timings_s=timings,
        samples=samples,
    )
