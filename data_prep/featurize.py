"""``cytosyn featurize``: add foundation-model embeddings and VAE posterior moments to a packed split.

For every input shard of the split (in order, or this process's ``part`` of them):

1. read the shard once, hashing its bytes (a shard changed since packing is refused);
2. decode the images in batches and run every configured encoder and the VAE (bf16/fp16 autocast on
   a GPU, fp32 on CPU);
3. write an output shard of the same name holding every original member byte for byte plus
   ``<encoder>.npy`` (fp16 CLS), ``<encoder>_patch.npy`` (fp16 patch tokens, when configured),
   ``<encoder>_mean_patch.npy`` and ``vae.npy`` (fp16, shape (2, C, h, w): posterior mean and log-variance;
   (1, C, h, w) for a deterministic autoencoder such as TAEF2: its latents, see :mod:`cytosyn.models.vae`);
4. write a per-shard state (``.featurize/<shard>.json``) with the input and output hashes and the
   shard's latent sums, which makes the run resumable shard by shard.

When every shard of the split has its state, the manifest is written (last, atomically): the input
manifest with the new shards, a feature entry per encoder and for the VAE (ids, weight hashes,
preprocessing, per-channel latent statistics), and a history entry. Then ``decode_check.png`` shows a
few tiles next to their reconstructions from the stored latents.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cytosyn.data_prep.featurize_config import FeaturizeConfig
from PIL import Image
from tqdm import tqdm

from cytosyn.config import config_hash, parse_part, write_resolved_config
from cytosyn.fileio import atomic_write_text, code_version
from cytosyn.formats import IMAGE_EXTENSIONS
from cytosyn.manifest import FeatureEntry, ManifestError, ShardEntry, read_manifest, write_manifest
from cytosyn.shardio import ShardReadError, ShardWriter, iter_shard_samples

log = logging.getLogger(__name__)

STATE_DIR = ".featurize"
DECODE_CHECK_FILE = "decode_check.png"
VAE_MEMBER = "vae.npy"


class FeaturizeError(RuntimeError):
    """A featurize run that cannot go on; the message names the shard, sample or setting at fault."""


def member_name(encoder: str, output: str) -> str:
    """Sample member of an encoder's output: ``h0-mini.npy``, ``h0-mini_patch.npy``, ...

    Characters a webdataset member name cannot carry (dots split keys) become ``_``.
    """
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", encoder)
    return f"{base}.npy" if output == "cls" else f"{base}_{output}.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@dataclass
class _Models:
    encoders: list[Any]  # TileEncoder
    vae: Any | None  # LatentVAE
    device: Any  # torch.device
    autocast_dtype: Any | None  # torch dtype or None (fp32)


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FeaturizeError(f"device {name!r} asked for, but CUDA is not available")
    return device


def load_models(cfg: FeaturizeConfig) -> _Models:
    """Build every encoder and the VAE; errors say which model and how to get its weights."""
    import torch

    from cytosyn.models.encoders import EncoderError, load_encoder
    from cytosyn.models.vae import VAEError, load_vae

    device = _resolve_device(cfg.device)
    try:
        encoders = [
            load_encoder(e.name, e.weights, random_init=e.random_init, seed=e.seed).to(device)
            for e in cfg.encoders
        ]
        vae = None
        if cfg.vae is not None:
            v = cfg.vae
            vae = load_vae(v.name, v.weights, random_init=v.random_init, seed=v.seed).to(device)
    except (EncoderError, VAEError) as err:
        raise FeaturizeError(str(err)) from None
    for enc in encoders:
        if enc.is_random:
            log.warning(
                "encoder %s has RANDOM weights (random_init): features are for testing only", enc.spec.name
            )
    if vae is not None and vae.is_random:
        log.warning("VAE %s has RANDOM weights (random_init): latents are for testing only", vae.spec.name)
    dtype = None
    if device.type == "cuda" and cfg.precision != "fp32":
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return _Models(encoders, vae, device, dtype)


# --------------------------------------------------------------------------------------------------
# One shard
# --------------------------------------------------------------------------------------------------


def _decode_image(members: dict[str, bytes], key: str, shard: str) -> np.ndarray:
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None or "json" not in members:
        raise FeaturizeError(f"{shard}: sample {key!r} lacks an image or json member ({sorted(members)})")
    try:
        with Image.open(io.BytesIO(members[ext])) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:
        raise FeaturizeError(f"{shard}: sample {key!r} has an undecodable {ext} image: {err}") from None


def _run_batch(
    models: _Models, images: np.ndarray, cfg: FeaturizeConfig, where: str
) -> dict[str, np.ndarray]:
    """Every feature member for a batch of uint8 tiles, as fp16 numpy arrays with the batch first."""
    import torch

    batch = torch.from_numpy(images).to(models.device)
    out: dict[str, np.ndarray] = {}
    autocast = (
        torch.autocast(device_type="cuda", dtype=models.autocast_dtype)
        if models.autocast_dtype is not None
        else torch.autocast(device_type="cpu", enabled=False)
    )
    try:
        with torch.no_grad(), autocast:
            for enc, enc_cfg in zip(models.encoders, cfg.encoders):
                for output, value in enc(batch, enc_cfg.outputs).items():
                    out[member_name(enc.spec.name, output)] = value.float().cpu().numpy()
            if models.vae is not None:
                out[VAE_MEMBER] = models.vae.encode_moments(batch).float().cpu().numpy()
    except torch.OutOfMemoryError:
        raise FeaturizeError(
            f"out of GPU memory at batch_size={cfg.batch_size} ({where}); rerun with a smaller batch_size "
            f"(finished shards are kept)"
        ) from None
    for name, value in out.items():
        if not np.isfinite(value).all():
            raise FeaturizeError(
                f"{where}: {name} has non-finite values (NaN/Inf) — check the model weights and precision"
            )
        half = value.astype(np.float16)
        if not np.isfinite(half).all():
            raise FeaturizeError(
                f"{where}: {name} overflows float16 (values up to {np.abs(value).max():.3g})"
            )
        out[name] = half
    return out


class _LatentSums:
    """Per-channel float64 sums of the stored (fp16) posterior means and variances of one shard."""

    def __init__(self) -> None:
        self.count = 0  # latent pixels per channel
        self.sum: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None
        self.var_sum: np.ndarray | None = None  # sum of exp(logvar): the posterior's own variance

    def add(self, moments: np.ndarray) -> None:
        mean = moments[:, 0].astype(np.float64)  # (B, C, h, w)
        # A deterministic autoencoder stores one row (its latents): no posterior variance.
        var = np.exp(moments[:, 1].astype(np.float64)) if moments.shape[1] == 2 else np.zeros_like(mean)
        axes = (0, 2, 3)
        if self.sum is None:
            c = mean.shape[1]
            self.sum, self.sumsq, self.var_sum = np.zeros(c), np.zeros(c), np.zeros(c)
        self.sum += mean.sum(axis=axes)
        self.sumsq += (mean**2).sum(axis=axes)
        self.var_sum += var.sum(axis=axes)
        self.count += mean.shape[0] * mean.shape[2] * mean.shape[3]

    def as_dict(self) -> dict[str, Any]:
        if self.sum is None:
            return {}
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "sumsq": self.sumsq.tolist(),
            "var_sum": self.var_sum.tolist(),
        }


def featurize_shard(
    models: _Models, cfg: FeaturizeConfig, entry: ShardEntry, tile_px: list[int]
) -> dict[str, Any]:
    """Featurize one input shard into the output folder; returns its state (hashes, counts, sums)."""
    src = cfg.input / entry.name
    writer = ShardWriter(cfg.output, lambda _: entry.name, max_samples=entry.count + 1)
    sums = _LatentSums()
    pending: list[tuple[str, list[tuple[str, bytes]]]] = []
    count = 0

    def flush() -> None:
        nonlocal count
        images = []
        for key, members in pending:
            img = _decode_image(dict(members), key, entry.name)
            if tile_px and list(img.shape[:2]) != tile_px:
                raise FeaturizeError(
                    f"{entry.name}: sample {key!r} is {img.shape[1]}×{img.shape[0]} px, the split's tiles {tile_px}"
                )
            tile_px[:] = list(img.shape[:2])
            images.append(img)
        feats = _run_batch(
            models, np.stack(images), cfg, f"{entry.name} samples {count}..{count + len(pending) - 1}"
        )
        if VAE_MEMBER in feats:
            sums.add(feats[VAE_MEMBER])
        for i, (key, members) in enumerate(pending):
            sample: dict[str, Any] = {"__key__": key}
            sample.update(members)
            for name, value in feats.items():
                if name in sample:
                    raise FeaturizeError(f"{entry.name}: sample {key!r} already has a {name} member")
                sample[name] = npy_bytes(value[i])
            writer.write(sample)
        count += len(pending)
        pending.clear()

    reader = None
    try:
        for (key, members), reader in iter_shard_samples(src):  # noqa: B007 - the hash is read after the loop
            pending.append((key, members))
            if len(pending) == cfg.batch_size:
                flush()
        if pending:
            flush()
    except ShardReadError as err:
        writer.abort()
        raise FeaturizeError(str(err)) from None
    except BaseException:
        writer.abort()
        raise
    if reader is None:
        writer.abort()
        raise FeaturizeError(f"{src}: no samples")
    if cfg.verify_input and reader.sha.hexdigest() != entry.sha256:
        writer.abort()
        raise FeaturizeError(
            f"{src} changed since packing: its sha256 differs from the input manifest (refusing it)"
        )
    if count != entry.count:
        writer.abort()
        raise FeaturizeError(f"{src} holds {count} samples, the input manifest says {entry.count}")
    (out,) = writer.close()
    return {
        "input": entry.model_dump(),
        "output": out.as_dict(),
        "latent_sums": sums.as_dict(),
        "tile_px": tile_px,
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class FeaturizeSummary:
    shards_total: int
    done: int
    skipped: int
    samples: int
    seconds: float
    manifest_written: bool

    def report(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        tail = (
            "manifest written"
            if self.manifest_written
            else "manifest not yet written (other parts still running)"
        )
        return (
            f"shards: {self.shards_total} in this part, {self.done} featurized, {self.skipped} already done | "
            f"{self.samples} tiles in {self.seconds:.1f} s ({rate:.1f} tiles/s) | {tail}"
        )


def _state_path(cfg: FeaturizeConfig, name: str) -> Path:
    return cfg.output / STATE_DIR / f"{name}.json"


def _load_state(cfg: FeaturizeConfig, entry: ShardEntry, settings: str) -> dict[str, Any] | None:
    path = _state_path(cfg, entry.name)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    out = cfg.output / entry.name
    if (
        state.get("settings_hash") != settings
        or state.get("input", {}).get("sha256") != entry.sha256
        or not out.is_file()
        or out.stat().st_size != state["output"]["bytes"]
    ):
        return None
    return state


def run_featurize(cfg: FeaturizeConfig) -> FeaturizeSummary:
    """Featurize this part's shards (skipping those already done) and finish the manifest when complete."""
    t0 = time.perf_counter()
    try:
        manifest = read_manifest(cfg.input)
    except ManifestError as err:
        raise FeaturizeError(str(err)) from None
    if cfg.input.resolve() == cfg.output.resolve():
        raise FeaturizeError("output must be another folder than input (input shards are never rewritten)")
    taken = {f.member for f in manifest.features}
    cfg.output.mkdir(parents=True, exist_ok=True)
    (cfg.output / STATE_DIR).mkdir(exist_ok=True)
    write_resolved_config(cfg, cfg.output / "featurize_config.yaml")
    settings = config_hash(cfg.output_settings())
    part, parts = parse_part(cfg.part)
    mine = manifest.shards[part::parts]
    todo = [e for e in mine if _load_state(cfg, e, settings) is None]
    summary = FeaturizeSummary(len(mine), 0, len(mine) - len(todo), 0, 0.0, False)

    models = None
    if todo:
        models = load_models(cfg)
        described = _describe(models)
        clash = {
            member_name(e.spec.name, o) for e, c in zip(models.encoders, cfg.encoders) for o in c.outputs
        } & taken
        if clash:
            raise FeaturizeError(
                f"the input split already carries {sorted(clash)}; featurize from the packed split"
            )
        tile_px: list[int] = []
        bar = tqdm(total=sum(e.count for e in todo), unit="tile", desc="featurize", disable=not cfg.progress)
        for entry in todo:
            state = featurize_shard(models, cfg, entry, tile_px)
            state |= {
                "settings_hash": settings,
                "models": described,
                "device": str(models.device),
                "code_version": code_version(),
            }
            atomic_write_text(_state_path(cfg, entry.name), json.dumps(state, indent=1) + "\n")
            summary.done += 1
            summary.samples += entry.count
            bar.update(entry.count)
        bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.manifest_written = _finish_if_complete(cfg, manifest, settings, models)
    return summary


def _finish_if_complete(cfg: FeaturizeConfig, manifest, settings: str, models: _Models | None) -> bool:
    states = [_load_state(cfg, e, settings) for e in manifest.shards]
    if any(s is None for s in states):
        return False
    models_desc = states[0]["models"]
    differing = [e.name for e, s in zip(manifest.shards, states) if s["models"] != models_desc]
    if differing:
        raise FeaturizeError(
            f"shards {differing[:3]} were featurized with other model weights than {manifest.shards[0].name} "
            f"(weights changed between parts?); delete their outputs under {cfg.output} and rerun"
        )
    features = list(manifest.features)
    for enc_cfg, desc in zip(cfg.encoders, models_desc["encoders"]):
        for output in enc_cfg.outputs:
            dim = desc["embed_dim"]
            shape = [desc["patch_grid"] ** 2, dim] if output == "patch" else [dim]
            features.append(
                FeatureEntry(
                    member=member_name(enc_cfg.name, output),
                    kind="embedding",
                    model_id=enc_cfg.name,
                    weights_sha256=None if desc["random_init"] else desc["weights"].removeprefix("sha256:"),
                    details=desc | {"output": output, "dtype": "float16", "shape": shape},
                )
            )
    if cfg.vae is not None:
        desc = models_desc["vae"]
        stats = _latent_statistics([s["latent_sums"] for s in states])
        tile = states[0]["tile_px"]
        f = desc["downsample"]
        features.append(
            FeatureEntry(
                member=VAE_MEMBER,
                kind="vae",
                model_id=cfg.vae.name,
                weights_sha256=None if desc["random_init"] else desc["weights"].removeprefix("sha256:"),
                details=desc
                | {
                    "dtype": "float16",
                    "shape": [
                        1 if desc["deterministic"] else 2,
                        desc["latent_channels"],
                        tile[0] // f,
                        tile[1] // f,
                    ],
                    "layout": desc["moments_layout"],
                    "latent_stats": stats,
                },
            )
        )
    new = manifest.model_copy(
        update={
            "shards": [ShardEntry(**s["output"]) for s in states],
            "features": features,
            "history": [
                *manifest.history,
                {
                    "verb": "featurize",
                    "settings": cfg.output_settings(),
                    "settings_hash": settings,
                    "input_manifest_shards_sha256": [e.sha256 for e in manifest.shards],
                    "code_version": code_version(),
                },
            ],
        }
    )
    write_manifest(new, cfg.output)
    if cfg.decode_check and cfg.vae is not None:
        write_decode_check(cfg, models.vae if models is not None else None)
    return True


def _describe(models: _Models) -> dict[str, Any]:
    """What the manifest records about the models (recorded per shard, so parts can be checked)."""
    return {
        "encoders": [e.describe() for e in models.encoders],
        "vae": models.vae.describe() if models.vae is not None else None,
    }


def _latent_statistics(sums: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-channel statistics of the split's latents from the shards' float64 sums.

    ``mean_mean``/``mean_std``: of the posterior means; ``std``: of samples z = mean + σ·ε, i.e.
    sqrt(var(mean) + E[σ²]) — what a normaliser of sampled latents should divide by.
    """
    count = sum(s["count"] for s in sums)
    total = np.sum([s["sum"] for s in sums], axis=0)
    total_sq = np.sum([s["sumsq"] for s in sums], axis=0)
    var_sum = np.sum([s["var_sum"] for s in sums], axis=0)
    mean = total / count
    var_of_mean = np.maximum(total_sq / count - mean**2, 0.0)
    return {
        "count_per_channel": int(count),
        "mean": mean.tolist(),
        "mean_std": np.sqrt(var_of_mean).tolist(),
        "std": np.sqrt(var_of_mean + var_sum / count).tolist(),
    }


def write_decode_check(cfg: FeaturizeConfig, vae=None) -> Path:
    """Originals (top row) and their reconstructions from the stored latent means (bottom row)."""
    import torch

    from cytosyn.models.vae import load_vae

    assert cfg.vae is not None
    manifest = read_manifest(cfg.output)
    if vae is None:
        vae = load_vae(cfg.vae.name, cfg.vae.weights, random_init=cfg.vae.random_init, seed=cfg.vae.seed)
    vae = vae.cpu()
    originals, means = [], []
    for (_, members), _ in iter_shard_samples(cfg.output / manifest.shards[0].name):
        m = dict(members)
        originals.append(_decode_image(m, "", manifest.shards[0].name))
        means.append(npy_load(m[VAE_MEMBER])[0])
        if len(originals) == cfg.decode_check:
            break
    recon = vae.decode(torch.from_numpy(np.stack(means)).float())  # fp32 on CPU: a reference view
    recon = ((recon + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    grid = np.concatenate([np.concatenate(originals, axis=1), np.concatenate(list(recon), axis=1)], axis=0)
    path = cfg.output / DECODE_CHECK_FILE
    Image.fromarray(grid).save(path)
    return path
