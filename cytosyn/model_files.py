"""The files a cytosyn model lives in: training checkpoints and release folders, read into one
``(config, state)`` pair, and checked.

- training checkpoints (a Lightning ``.ckpt`` file, a run folder, or a DeepSpeed checkpoint folder,
  consolidated when DeepSpeed is importable) → :func:`parts_from_checkpoint` → ``(config, state)``: the
  SiT's EMA weights and everything needed to use them (architecture, latent normalisation, VAE,
  conditioning encoder, sampler defaults);
- release folders: the files :func:`write_release_files` writes beside a diffusers pipeline folder, and
  :func:`verify_release`, which checks every file against ``SHA256SUMS`` before anything is read.

:class:`cytosyn.pipeline.CytoSynPipeline` builds its model from that pair, whichever way it came in; this
module only reads, converts and checks files (no model is built here).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cytosyn.fileio import sha256_file
from cytosyn.models.sit import SiTConfig
from cytosyn.sampling.samplers import sampler_preset

log = logging.getLogger(__name__)

RELEASE_FORMAT = "cytosyn.release/2"  # a diffusers pipeline folder (see cytosyn.diffusers_pipeline)
READABLE_FORMATS = (
    "cytosyn.release/1",
    RELEASE_FORMAT,
)  # /1: model.safetensors at the top, no diffusers files
MODEL_FILE = "transformer/diffusion_pytorch_model.safetensors"
LEGACY_MODEL_FILE = "model.safetensors"  # format /1
CONFIG_FILE = "config.json"
README_FILE = "README.md"
SUMS_FILE = "SHA256SUMS"
MODEL_INDEX_FILE = "model_index.json"
LEGACY_RELEASE_FILES = (LEGACY_MODEL_FILE, CONFIG_FILE, README_FILE)


class PipelineError(ValueError):
    """A pipeline that cannot be built or a request it cannot serve; the message says how to fix it."""


class ReleaseIntegrityError(PipelineError):
    """A release folder whose files are missing, altered or not listed in SHA256SUMS."""


# --------------------------------------------------------------------------------------------------------
# Checkpoints → (config, state)
# --------------------------------------------------------------------------------------------------------


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint folder (Lightning writes ``<name>.ckpt/`` holding ``checkpoint/*.pt``)."""
    path = Path(path)
    return path.is_dir() and (
        (path / "latest").is_file()
        or (path / "checkpoint").is_dir()
        or any(path.glob("*/mp_rank_*_model_states.pt"))
    )


def consolidate_deepspeed(folder: Path, output_file: Path) -> Path:
    """Turn a DeepSpeed (ZeRO) checkpoint folder into one Lightning-style checkpoint file.

    Uses Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``, which gathers the fp32 weights from
    the partitioned optimizer states and keeps the client state (our ``cytosyn`` section and the EMA).
    Tested with ZeRO-2 on two CPU processes (tests/test_deepspeed.py).
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise PipelineError(
            f"{folder} is a DeepSpeed checkpoint folder; consolidating it needs DeepSpeed, which is not "
            f"installed here (pip install 'cytosyn[deepspeed]'). Alternatively run the zero_to_fp32.py "
            f"script DeepSpeed saved next to the checkpoint and pass the resulting file."
        ) from None
    from cytosyn.compat import import_torchvision

    import_torchvision()
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    output_file.parent.mkdir(parents=True, exist_ok=True)
    convert_zero_checkpoint_to_fp32_state_dict(str(folder), str(output_file))
    return output_file


def find_checkpoint(path: Path) -> Path:
    """``path`` itself (a ``.ckpt`` file or DeepSpeed folder), or the newest checkpoint of a run folder."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"checkpoint {path} does not exist")
    if path.is_file() or is_deepspeed_checkpoint(path):
        return path
    for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.exists():
            return candidate
    steps = sorted((path / "checkpoints").glob("step-*.ckpt"), reverse=True)
    if steps:
        return steps[0]
    raise PipelineError(
        f"{path} is a folder without checkpoints (expected a .ckpt file, a run folder with "
        f"checkpoints/last.ckpt, or a DeepSpeed checkpoint folder)"
    )


def load_training_checkpoint(path: Path, scratch: Path | None = None) -> tuple[dict[str, Any], Path]:
    """Load a cytosyn training checkpoint (our own pickles: ``weights_only=False``) → (checkpoint, path).

    A DeepSpeed folder is consolidated first into a temporary file (under ``scratch`` when given), which
    is deleted once loaded; the returned path is then the folder.
    """
    import tempfile

    path = find_checkpoint(path)
    if path.is_dir():
        if scratch is not None:
            Path(scratch).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="cytosyn-zero-", dir=scratch) as tmp:
            file = consolidate_deepspeed(path, Path(tmp) / "consolidated.ckpt")
            return _load_checkpoint_file(file), path
    return _load_checkpoint_file(path), path


def _load_checkpoint_file(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise PipelineError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "cytosyn" not in ckpt:
        raise PipelineError(
            f"{path} is not a cytosyn training checkpoint (no 'state_dict' / 'cytosyn' section)"
        )
    # DeepSpeed runs keep the fp32 EMA in their client state (it is not part of the engine's module):
    # fold it back to where DDP checkpoints have it, so both read the same way.
    ema = ckpt.pop("ema_state_dict", None)
    if ema is not None:
        ckpt["state_dict"].update({f"ema.{k}": v for k, v in ema.items()})
    return ckpt


def _condition_output(condition: str, encoder: str) -> str:
    """Which encoder output a conditioning member holds (``h0-mini`` → cls, ``h0-mini_mean_patch`` → ...)."""
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", encoder)
    if condition == base:
        return "cls"
    if condition.startswith(base + "_"):
        return condition[len(base) + 1 :]
    return "cls"


def conditioning_info(
    encoder: str | None, weights: str | None, width: int | None, condition: str
) -> dict[str, Any]:
    """What a release records about its conditioning encoder: id, weights, width, preprocessing, licence."""
    if encoder is None:
        return {}
    info: dict[str, Any] = {
        "encoder": encoder,
        "weights": weights,
        "embed_dim": width,
        "member": f"{condition}.npy",
        "output": _condition_output(condition, encoder),
        "storage_dtype": "float16 (embeddings are rounded to fp16 as featurize stores them)",
    }
    try:
        from cytosyn.models.encoders import get_spec

        spec = get_spec(encoder)
        info["preprocessing"] = {
            "input_size": spec.input_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "resize": f"{spec.interpolation}, antialias, only when the tile is not {spec.input_size} px",
            "input_range": "uint8 RGB / 255, then (x - mean) / std",
        }
        info |= {
            "timm_arch": spec.timm_arch,
            "hub_id": spec.hub_id,
            "gated": spec.gated,
            "licence": spec.licence,
        }
    except Exception as err:  # unknown to this version's registry: record what we know
        info["preprocessing"] = None
        info["registry_note"] = f"not in this cytosyn's encoder registry ({err})"
    return info


def sit_config_from_training(train_cfg: Mapping[str, Any], features: Mapping[str, Any]) -> dict[str, Any]:
    """The SiT architecture a training run built (as LatentDiffusionModule does), without the REPA projector
    (training-only) and with inference settings (no condition dropout, no activation checkpointing)."""
    model = train_cfg.get("model", {})
    args = {
        "input_size": features["latent_size"],
        "in_channels": features["latent_channels"],
        "cond_dim": features["cond_dim"],
    } | dict(model.get("overrides") or {})
    args |= {"cond_dropout": 0.0, "repa_dim": None, "grad_checkpointing": False}
    cfg = SiTConfig.from_preset(model.get("preset", "SiT-XL/2"), **args)
    return cfg.model_dump(mode="json")


def parts_from_checkpoint(
    ckpt: Mapping[str, Any], weights: str = "ema"
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, state)`` of a release from a loaded training checkpoint.

    ``state`` holds ``model.*`` (the SiT, REPA projector dropped) and ``latent_norm.*`` (the normalisation
    buffers), from the EMA copy (``weights="ema"``, what a release uses) or the live weights (``"raw"``).
    ``config`` is the part of ``config.json`` that the model needs (sit, latent, conditioning, vae,
    sampler, training); :mod:`cytosyn.release` adds the data summary and tile geometry.
    """
    meta = ckpt["cytosyn"]
    train_cfg = meta["config"]
    features = meta["features"]
    src = ckpt["state_dict"]
    prefix = {"ema": "ema.module.", "raw": "net."}.get(weights)
    if prefix is None:
        raise PipelineError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if not any(k.startswith(prefix) for k in src):
        raise PipelineError(f"the checkpoint has no {weights} weights (no '{prefix}*' keys)")
    state: dict[str, Tensor] = {}
    for key, value in src.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        name = name.replace("._orig_mod.", ".").replace("_orig_mod.", "")  # torch.compile wrappers
        if name.startswith("model.projectors."):
            continue  # the REPA projector only serves training
        if not (name.startswith("model.") or name.startswith("latent_norm.")):
            continue
        state[name] = value.detach().to("cpu").contiguous().clone()
    norm_kind = train_cfg.get("diffusion", {}).get("latent_norm", "fixed")
    channels = int(features["latent_channels"])
    latent: dict[str, Any] = {
        "channels": channels,
        "size": int(features["latent_size"]),
        "norm": norm_kind,
        "split_mean": features.get("latent_mean"),
        "split_std": features.get("latent_std"),
        "posterior_sampled": bool(train_cfg.get("diffusion", {}).get("sample_posterior", True)),
    }
    if norm_kind == "batchnorm":
        latent["eps"] = 1e-4
        mean = state["latent_norm.bn.running_mean"].float()
        scale = torch.sqrt(state["latent_norm.bn.running_var"].float() + latent["eps"])
    else:
        mean, scale = state["latent_norm.mean"].float(), state["latent_norm.std"].float()
    latent["shift"] = [float(v) for v in mean]
    latent["scale"] = [float(v) for v in scale]
    latent["rule"] = "denoiser space z = (vae_latent - shift) / scale; decode vae_latent = z * scale + shift"
    condition = train_cfg.get("data", {}).get("condition", features.get("cond_model"))
    vae = features.get("vae") or {}
    vae_info = _vae_info(vae.get("model_id"), vae.get("weights"))
    if vae_info.get("latent_channels") is not None and int(vae_info["latent_channels"]) != channels:
        raise PipelineError(
            f"autoencoder/latent mismatch: the checkpoint's model works on {channels}-channel latents, but the "
            f"autoencoder it records, {vae.get('model_id')} ({vae.get('weights')}), makes "
            f"{vae_info['latent_channels']}-channel latents"
        )
    config: dict[str, Any] = {
        "format": RELEASE_FORMAT,
        "_class_name": "CytoSynPipeline",
        "name": Path(str(train_cfg.get("run_dir", "cytosyn"))).name or "cytosyn",
        "sit": sit_config_from_training(train_cfg, features),
        "latent": latent,
        "conditioning": conditioning_info(
            features.get("cond_model"), features.get("cond_weights"), features.get("cond_dim"), condition
        ),
        "vae": vae_info,
        "sampler": {
            "conditional": sampler_preset("cytosyn_default").model_dump(mode="json"),
            "unconditional": sampler_preset("unconditional_default").model_dump(mode="json"),
        },
        "training": {
            "steps": int(ckpt.get("global_step", 0)),
            "images_seen": meta.get("images_seen"),
            "micro_steps": meta.get("micro_step"),
            "skipped_steps": meta.get("skipped_steps"),
            "world_size": meta.get("world_size"),
            "checkpoint_format": meta.get("format"),
            "identity_hash": meta.get("identity_hash"),
            "code_version": meta.get("code_version"),  # None for checkpoints that do not record it
            "config": train_cfg,
        },
        "weights": {"file": MODEL_FILE, "source": weights, "dtype": "float32", "dropped": ["REPA projector"]},
    }
    return config, state


def _vae_info(name: str | None, weights: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {"name": name, "weights": weights}
    try:
        from cytosyn.models.vae import get_vae_spec

        spec = get_vae_spec(name or "")
        info |= {
            "kind": spec.kind,
            "hub_id": spec.hub_id,
            "subfolder": spec.subfolder,
            "shipped_in_package": spec.bundled,  # weights inside cytosyn (not a release vae/ folder)
            "downsample": spec.downsample,
            "latent_channels": spec.latent_channels,
            "deterministic": spec.deterministic,
            "licence": spec.licence,
            "decode": "diffusers AutoencoderKL.decode of raw (unscaled) latents, clamped to [-1, 1]"
            if spec.kind == "diffusers-kl"
            else "TAESD-family decoder (3·tanh(z/3) soft clamp inside) of raw latents, [0, 1] → [-1, 1], clamped",
        }
    except Exception as err:
        info["registry_note"] = f"not in this cytosyn's VAE registry ({err})"
    return info


# --------------------------------------------------------------------------------------------------------
# Release folders: writing and verifying
# --------------------------------------------------------------------------------------------------------


def write_release_files(
    folder: Path,
    config: Mapping[str, Any],
    state: Mapping[str, Tensor],
    readme: str,
    vae: Any = None,
) -> Path:
    """Write a release folder (the diffusers layout of :mod:`cytosyn.diffusers_pipeline`, ``SHA256SUMS``
    last). ``vae``: a ``LatentVAE`` to bundle under ``vae/`` (default: referenced by name and hash)."""
    from cytosyn.diffusers_pipeline import write_diffusers_layout

    return write_diffusers_layout(Path(folder), config, state, readme, vae=vae)


def read_sums(folder: Path) -> dict[str, str]:
    path = Path(folder) / SUMS_FILE
    if not path.is_file():
        raise ReleaseIntegrityError(
            f"{folder} has no {SUMS_FILE}: not a complete cytosyn release folder (a release is written by "
            f"`cytosyn release`; it lists the sha256 of every file)"
        )
    sums: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line.strip())
        if match is None:
            raise ReleaseIntegrityError(f"{path}, line {number}: not '<sha256>  <file>': {line!r}")
        name = match.group(2)
        parts = name.split("/")
        if "\\" in name or name.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ReleaseIntegrityError(
                f"{path}, line {number}: file names must be relative paths inside the folder, got {name!r}"
            )
        sums[name] = match.group(1)
    return sums


def required_files(sums: Mapping[str, str]) -> list[str]:
    """The files a release must list: the diffusers layout (format /2) or the legacy trio (format /1)."""
    if MODEL_INDEX_FILE in sums or LEGACY_MODEL_FILE not in sums:
        from cytosyn.diffusers_pipeline import layout_files

        return layout_files(bundle_vae="vae/config.json" in sums)
    return list(LEGACY_RELEASE_FILES)


def verify_release(folder: str | Path) -> dict[str, str]:
    """Check every file of a release folder against ``SHA256SUMS``; returns ``{file: sha256}``.

    Refuses (:class:`ReleaseIntegrityError`) a folder without ``SHA256SUMS``, a listed file that is
    missing or whose hash differs, and a required file (:func:`required_files`) that is not listed.
    Files present but not listed are ignored (with a warning): they are not part of the release.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleaseIntegrityError(f"release folder {folder} does not exist")
    sums = read_sums(folder)
    unlisted = [n for n in required_files(sums) if n not in sums]
    if unlisted:
        raise ReleaseIntegrityError(
            f"{folder}/{SUMS_FILE} does not list {', '.join(unlisted)}: incomplete release"
        )
    missing = [n for n in sums if not (folder / n).is_file()]
    if missing:
        raise ReleaseIntegrityError(
            f"release {folder} is missing {', '.join(missing)} (listed in {SUMS_FILE}); download the folder again"
        )
    altered = [n for n, digest in sums.items() if sha256_file(folder / n) != digest]
    if altered:
        raise ReleaseIntegrityError(
            f"release {folder}: {', '.join(altered)} does not match its sha256 in {SUMS_FILE} (altered or "
            f"corrupted download); refusing to load it"
        )
    extra = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() not in sums and p.name != SUMS_FILE
    )
    if extra:
        log.warning("release %s: files not listed in %s are ignored: %s", folder, SUMS_FILE, ", ".join(extra))
    return sums
