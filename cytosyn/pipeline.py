"""The public inference pipeline: a trained cytosyn model as a :class:`~cytosyn.generation.TileGenerator`.

:class:`CytoSynPipeline` holds everything needed to turn a conditioning embedding (or nothing) into H&E
tiles: the SiT denoiser (EMA weights), the latent normalisation, the VAE, the sampler defaults and the
identity of the conditioning encoder (loaded on demand for :meth:`~CytoSynPipeline.embed` /
:meth:`~CytoSynPipeline.generate_from_tiles`).

Two ways in, one model inside:

- :meth:`CytoSynPipeline.from_checkpoint`: a training checkpoint (Lightning ``.ckpt`` file, a run folder,
  or a DeepSpeed checkpoint folder, consolidated when DeepSpeed is importable);
- :meth:`CytoSynPipeline.from_pretrained`: a release folder (a diffusers pipeline folder plus
  ``config.json``, ``README.md`` and ``SHA256SUMS``, see :mod:`cytosyn.diffusers_pipeline` and
  :mod:`cytosyn.release`), every file checked against ``SHA256SUMS`` before anything is read. The same
  folder loads with diffusers' ``DiffusionPipeline.from_pretrained`` and samples identically.

Both build the model from the same ``(config, state)`` pair (:func:`parts_from_checkpoint` makes it from a
checkpoint; a release stores exactly that pair), so a release samples bit for bit like its checkpoint.
Reading and checking those files (checkpoints, DeepSpeed consolidation, ``SHA256SUMS``) is
:mod:`cytosyn.model_files`'s job; this module builds and runs the model.

Determinism: the starting noise of image ``i`` and, for the SDE sampler, every noise draw of its
trajectory come from its own CPU generator seeded with ``(seed, i)``. The batch size, the device split
and which other images share a batch do not change which numbers an image gets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cytosyn.config import ConfigError, build_config
from cytosyn.diffusion.flow import BatchNormLatentNorm, FixedLatentNorm, LatentNorm
from cytosyn.model_files import (
    CONFIG_FILE,
    LEGACY_MODEL_FILE,
    MODEL_FILE,
    READABLE_FORMATS,
    README_FILE,
    RELEASE_FORMAT,
    SUMS_FILE,
    PipelineError,
    ReleaseIntegrityError,
    load_training_checkpoint,
    parts_from_checkpoint,
    required_files,
    verify_release,
    write_release_files,
)
from cytosyn.models.sit import SiT, SiTConfig
from cytosyn.sampling.samplers import SamplerConfig, sample, sampler_preset

log = logging.getLogger(__name__)

DEFAULT_MPP = 0.5  # DESIGN.md's default tile (224 px at 0.5 mpp); used only when a release does not know


# --------------------------------------------------------------------------------------------------------
# Seeds and per-image noise
# --------------------------------------------------------------------------------------------------------


def image_seed(seed: int, index: int) -> int:
    """The 63-bit seed of image ``index`` of a generation run with ``seed`` (stable across machines)."""
    digest = hashlib.blake2b(f"cytosyn.sample:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------------------
# Building blocks shared by checkpoints and releases
# --------------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {str(device)!r} asked for, but CUDA is not available")
    return dev


def resolve_sampler(
    sampler: str | SamplerConfig | Mapping[str, Any] | None,
    default: Mapping[str, Any],
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> SamplerConfig:
    """A validated :class:`SamplerConfig`: ``sampler`` (preset name, config, or mapping of fields; None →
    ``default``) with ``steps`` / ``guidance_scale`` replaced when given. Invalid settings raise
    :class:`~cytosyn.config.ConfigError` naming the key."""
    if sampler is None:
        base: dict[str, Any] = dict(default)
    elif isinstance(sampler, str):
        try:
            base = sampler_preset(sampler).model_dump()
        except ValueError as err:
            raise ConfigError(str(err)) from None
    elif isinstance(sampler, SamplerConfig):
        base = sampler.model_dump()
    else:
        base = dict(sampler)
    if steps is not None:
        base["steps"] = steps
    if guidance_scale is not None:
        base["guidance_scale"] = guidance_scale
    return build_config(SamplerConfig, base)


def build_latent_norm(latent: Mapping[str, Any]) -> LatentNorm:
    """The latent normalisation module a release config describes (its buffers come from the weights)."""
    kind = latent.get("norm", "fixed")
    channels = int(latent["channels"])
    if kind == "fixed":
        return FixedLatentNorm(torch.zeros(channels), torch.ones(channels))
    if kind == "batchnorm":
        return BatchNormLatentNorm(channels, eps=float(latent.get("eps", 1e-4)))
    raise PipelineError(f"unknown latent normalisation {kind!r} (expected 'fixed' or 'batchnorm')")


def _sha256_state(state: Mapping[str, Tensor]) -> str:
    from cytosyn.models.encoders import sha256_state_dict

    return sha256_state_dict(dict(state))


# --------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------


class CytoSynPipeline:
    """A trained cytosyn model as a :class:`~cytosyn.generation.TileGenerator`.

    Attributes: ``model`` (SiT, eval mode, fp32 weights), ``latent_norm``, ``config`` (the release's
    config.json content), ``device``, ``dtype`` ("auto": bf16 autocast on CUDA, fp32 on CPU; "fp32";
    "bf16"). The VAE and the conditioning encoder are loaded on first use (``vae_weights`` /
    ``encoder_weights``: local paths; random-initialised models of the tests are rebuilt from their seed).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        state: Mapping[str, Tensor] | None,
        *,
        modules: tuple[SiT, LatentNorm] | None = None,
        device: str | torch.device | None = "auto",
        dtype: str = "auto",
        vae: Any | None = None,
        vae_weights: str | Path | None = None,
        encoder: Any | None = None,
        encoder_weights: str | Path | None = None,
        model_card: str | None = None,
        source: str | None = None,
    ):
        if config.get("format") not in READABLE_FORMATS:
            raise PipelineError(f"config format {config.get('format')!r} is not one of {READABLE_FORMATS}")
        if dtype not in ("auto", "fp32", "bf16"):
            raise PipelineError(f"dtype must be 'auto', 'fp32' or 'bf16', got {dtype!r}")
        self.config: dict[str, Any] = json.loads(json.dumps(config))
        self.device = resolve_device(device)
        self.dtype = dtype
        self.source = source
        self.model_card = model_card
        if modules is not None:  # adopt built modules (the diffusers components), weights realigned in place
            from cytosyn.diffusers_pipeline import realign_

            model, norm = modules
            realign_(model)
            realign_(norm)
        elif state is None:
            raise PipelineError("give the weights (state) or the built modules")
        else:
            model, norm = self._build(state)
        self.model: SiT = model.eval().requires_grad_(False).to(self.device)
        self.latent_norm: LatentNorm = norm.eval().requires_grad_(False).to(self.device)
        self._state_sha: str | None = None
        self._vae = vae
        self._vae_weights = vae_weights
        self._encoder = encoder
        self._encoder_weights = encoder_weights
        self.adapter: dict[str, Any] | None = None  # what load_adapter applied (see cytosyn.adapters)

    def _build(self, state: Mapping[str, Tensor]) -> tuple[SiT, LatentNorm]:
        """The SiT and latent normalisation of ``config`` with ``state``'s weights (fresh copies)."""
        sit_cfg = SiTConfig.model_validate(self.config["sit"])
        with torch.device("meta"):
            model = SiT(sit_cfg)
        norm = build_latent_norm(self.config["latent"])
        # Fresh, allocator-aligned copies: safetensors hands out views into one buffer at 8-byte offsets, and
        # CPU kernels take other code paths (another summation order) on differently aligned data, which
        # would break the bitwise equality of a release with its checkpoint.
        state = {
            k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state.items()
        }
        model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        norm_state = {k[len("latent_norm.") :]: v for k, v in state.items() if k.startswith("latent_norm.")}
        other = [k for k in state if not k.startswith(("model.", "latent_norm."))]
        if other:
            raise PipelineError(f"unexpected weights (neither model.* nor latent_norm.*): {other[:5]}")
        try:
            model.load_state_dict(model_state, strict=True, assign=True)
            norm.load_state_dict(norm_state, strict=True)
        except RuntimeError as err:
            raise PipelineError(f"the weights do not fit the architecture in config.json: {err}") from None
        return model, norm

    # ---- constructors ------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        vae_weights: str | Path | None = None,
        device: str | torch.device | None = "auto",
        *,
        dtype: str = "auto",
        encoder_weights: str | Path | None = None,
        weights: str = "ema",
    ) -> CytoSynPipeline:
        """From a training checkpoint (``.ckpt``, run folder, or DeepSpeed folder), with its EMA weights."""
        ckpt, file = load_training_checkpoint(Path(path))
        config, state = parts_from_checkpoint(ckpt, weights=weights)
        del ckpt
        return cls(
            config,
            state,
            device=device,
            dtype=dtype,
            vae_weights=vae_weights,
            encoder_weights=encoder_weights,
            source=str(file),
        )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: str | torch.device | None = "auto",
        dtype: str = "auto",
        vae_weights: str | Path | None = None,
        encoder_weights: str | Path | None = None,
    ) -> CytoSynPipeline:
        """From a release folder; every file is verified against ``SHA256SUMS`` before it is read."""
        from safetensors.torch import load_file

        folder = Path(folder)
        verify_release(folder)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except json.JSONDecodeError as err:
            raise PipelineError(f"{folder / CONFIG_FILE} is not valid JSON: {err}") from None
        if config.get("format") not in READABLE_FORMATS:
            raise PipelineError(
                f"{folder / CONFIG_FILE} has format {config.get('format')!r}; this cytosyn reads {READABLE_FORMATS}"
            )
        weights_file = (config.get("weights") or {}).get("file") or LEGACY_MODEL_FILE
        state = load_file(str(folder / weights_file))
        bundled = (config.get("vae") or {}).get("bundled")
        if bundled and vae_weights is None:
            vae_weights = folder / bundled["folder"]
        return cls(
            config,
            state,
            device=device,
            dtype=dtype,
            vae_weights=vae_weights,
            encoder_weights=encoder_weights,
            model_card=(folder / README_FILE).read_text(),
            source=str(folder),
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The release weights: ``model.*`` and ``latent_norm.*`` (on the CPU)."""
        out = {f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        out |= {f"latent_norm.{k}": v.detach().cpu() for k, v in self.latent_norm.state_dict().items()}
        return out

    def save_pretrained(
        self, folder: str | Path, model_card: str | None = None, *, bundle_vae: bool = False
    ) -> Path:
        """Write this pipeline as a release folder (the diffusers layout, config.json, README.md, SHA256SUMS);
        ``bundle_vae`` saves the autoencoder under ``vae/`` (a diffusers AutoencoderKL) instead of referencing it."""
        if self.adapter is not None and not self.adapter.get("merged"):
            raise PipelineError("an unmerged adapter is loaded: call merge_adapter() before save_pretrained")
        card = model_card or self.model_card
        if card is None:
            from cytosyn.release import render_model_card

            card = render_model_card(self.config)
        config = dict(self.config)
        if not bundle_vae:
            config["vae"] = {k: v for k, v in (config.get("vae") or {}).items() if k != "bundled"}
        vae = self.vae if bundle_vae else None
        if vae is not None and vae.spec.kind != "diffusers-kl":
            raise PipelineError(
                f"bundle_vae: only a diffusers AutoencoderKL can be bundled under vae/; {vae.spec.name} "
                f"({vae.spec.kind}) ships with cytosyn and is referenced by name instead"
            )
        return write_release_files(Path(folder), config, self.state_dict(), card, vae=vae)

    # ---- adapters (few-shot fine-tunes, see cytosyn.adapters) ------------------------------------------

    def load_adapter(self, folder: str | Path) -> dict[str, Any]:
        """Apply an adapter folder (LoRA and/or class labels) to this base model; refuses another base."""
        from cytosyn.adapters import load_adapter_into_pipeline

        return load_adapter_into_pipeline(self, Path(folder))

    def merge_adapter(self) -> int:
        """Fold the loaded LoRA layers into the base weights (a plain SiT again); returns how many."""
        from cytosyn.adapters import merge_pipeline_adapter

        return merge_pipeline_adapter(self)

    @property
    def label_names(self) -> list[str] | None:
        """Class names of a label-conditioned model, in index order (index len(names) is the null label)."""
        labels = (self.adapter or {}).get("labels") or self.config.get("labels")
        return list(labels["names"]) if labels else None

    # ---- identity ------------------------------------------------------------------------------------

    @property
    def weights_sha256(self) -> str:
        """Content hash of the weights (format independent: the same for a checkpoint and its release)."""
        if self._state_sha is None:
            self._state_sha = _sha256_state(self.state_dict())
        return self._state_sha

    @property
    def name(self) -> str:
        return f"cytosyn:{self.config.get('name', 'model')}@{self.weights_sha256[:12]}"

    @property
    def conditioning_encoder(self) -> str | None:
        return (self.config.get("conditioning") or {}).get("encoder")

    @property
    def cond_dim(self) -> int | None:
        return self.model.cfg.cond_dim

    @property
    def tile_px(self) -> int:
        tile = self.config.get("tile") or {}
        if tile.get("px"):
            return int(tile["px"])
        return int(self.config["latent"]["size"]) * int(self.config.get("vae", {}).get("downsample") or 8)

    @property
    def mpp(self) -> float:
        mpp = (self.config.get("tile") or {}).get("mpp")
        return float(mpp) if mpp is not None else DEFAULT_MPP

    def describe(self) -> dict[str, Any]:
        tile = self.config.get("tile") or {}
        return {
            "name": self.name,
            "kind": "cytosyn",
            "source": self.source,
            "weights_sha256": self.weights_sha256,
            "sit": {k: self.config["sit"].get(k) for k in ("preset", "depth", "hidden_size", "patch_size")},
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "conditioning": self.config.get("conditioning"),
            "vae": self.config.get("vae"),
            "sampler_defaults": self.config.get("sampler"),
            "tile_px": self.tile_px,
            "mpp": self.mpp,
            "mpp_source": tile.get("source")
            if tile.get("mpp") is not None
            else f"default {DEFAULT_MPP} (unknown)",
            "device": str(self.device),
            "precision": self._precision_name(),
            "training": {k: (self.config.get("training") or {}).get(k) for k in ("steps", "images_seen")},
        }

    # ---- components loaded on demand -----------------------------------------------------------------

    @property
    def vae(self):
        """The VAE (``cytosyn.models.vae.LatentVAE``), loaded on first use and checked against config.json."""
        if self._vae is None:
            from cytosyn.models.vae import VAEError, load_vae_as_recorded

            info = self.config.get("vae") or {}
            bundled = info.get("bundled")
            try:
                if bundled and self._vae_weights is not None:  # the copy in the release's vae/ folder
                    vae = load_vae_as_recorded(info.get("name"), bundled["weights"], self._vae_weights)
                else:
                    vae = load_vae_as_recorded(info.get("name"), info.get("weights"), self._vae_weights)
            except VAEError as err:
                raise PipelineError(f"cannot load the model's VAE: {err}") from None
            self._vae = vae.to(self.device)
            self._vae_checked = False
        if not getattr(self, "_vae_checked", False):
            self._check_vae(self._vae)
        return self._vae

    def _check_vae(self, vae) -> None:
        """Refuse an autoencoder that is not the one the model's latents came from (naming both)."""
        from cytosyn.models.vae import VAEError, check_vae_matches

        info = dict(self.config.get("vae") or {})
        bundled = info.pop("bundled", None)
        if bundled and getattr(vae, "weights_id", None) == bundled.get("weights"):
            # the release's vae/ copy, hashed when bundled from info["weights"]
            info["weights"] = bundled["weights"]
        info.setdefault("latent_channels", self.config["latent"]["channels"])
        if int(info["latent_channels"]) != int(self.config["latent"]["channels"]):
            raise PipelineError(
                f"config.json: the VAE {info.get('name')} has {info['latent_channels']} latent channels but the "
                f"model was trained on {self.config['latent']['channels']}"
            )
        try:
            check_vae_matches(vae, info, "pipeline")
        except VAEError as err:
            raise PipelineError(str(err)) from None
        self._vae_checked = True

    @property
    def encoder(self):
        """The conditioning encoder (``cytosyn.models.encoders.TileEncoder``), loaded on first use."""
        if self._encoder is None:
            from cytosyn.models.encoders import EncoderError, load_encoder_as_recorded

            info = self.config.get("conditioning") or {}
            name = info.get("encoder")
            if name is None:
                raise PipelineError("this model is unconditional: it has no conditioning encoder")
            try:
                enc = load_encoder_as_recorded(name, info.get("weights"), self._encoder_weights)
            except EncoderError as err:
                raise PipelineError(f"cannot load the conditioning encoder: {err}") from None
            self._encoder = enc.to(self.device)
        return self._encoder

    # ---- inference -----------------------------------------------------------------------------------

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.dtype == "fp32":
            return None
        if self.dtype == "bf16" or self.device.type == "cuda":
            return torch.bfloat16
        return None

    def _precision_name(self) -> str:
        dt = self._autocast_dtype()
        return "fp32" if dt is None else "bf16 autocast (fp32 weights)"

    def _autocast(self):
        dt = self._autocast_dtype()
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dt)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Tensor | None, uncond_mask: Tensor) -> Tensor:
        """The velocity function the samplers call (see :class:`cytosyn.sampling.VelocityFn`).

        An integer ``cond`` holds class labels (label-conditioned models): the embedding condition is then
        the null one and the label embedding carries the class (the null label where ``uncond_mask``)."""
        with self._autocast():
            if cond is not None and not cond.is_floating_point():
                v = self.model(x_t, t, None, uncond_mask=uncond_mask, labels=cond)
            else:
                v = self.model(x_t, t, cond, uncond_mask=uncond_mask)
        return v.float()

    def check_embeddings(self, embeddings: Tensor | np.ndarray) -> Tensor:
        """``(N, cond_dim)`` float32 embeddings on the pipeline's device, or a clear error."""
        width = self.cond_dim
        enc = self.conditioning_encoder
        if width is None:
            raise PipelineError("this model is unconditional: pass embeddings=None and num_images")
        emb = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, Tensor) else embeddings)
        if emb.ndim == 1:
            emb = emb[None]
        if emb.ndim != 2 or emb.shape[1] != width:
            raise PipelineError(
                f"embeddings have shape {tuple(emb.shape)}, but this model is conditioned on {enc!r} embeddings "
                f"of width {width} (shape (N, {width})): embed the reference tiles with {enc!r} "
                f"(pipeline.embed / generate_from_tiles) or use a model trained on your encoder"
            )
        if not emb.is_floating_point():
            raise PipelineError(f"embeddings must be floating point, got {emb.dtype}")
        if not bool(torch.isfinite(emb).all()):
            raise PipelineError("embeddings contain NaN or infinite values")
        return emb.to(self.device, torch.float32)

    @torch.no_grad()
    def sample_latents(
        self,
        embeddings: Tensor | None,
        indices: Sequence[int],
        cfg: SamplerConfig,
        seed: int,
    ) -> Tensor:
        """Normalised latents (float32) for one batch: row ``r`` is image ``indices[r]`` of the run."""
        shape = (self.model.cfg.in_channels, self.model.cfg.input_size, self.model.cfg.input_size)
        gens = [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)
        if cfg.method == "euler_maruyama":
            return sample(self.velocity, noise, embeddings, cfg, generator=gens)
        return sample(self.velocity, noise, embeddings, cfg)  # type: ignore[return-value]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> np.ndarray:
        """Normalised latents → uint8 tiles ``(N, H, W, 3)`` (VAE in fp32)."""
        raw = self.latent_norm.denormalize(latents.float().to(self.device))
        images = self.vae.decode(raw)
        u8 = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return u8.permute(0, 2, 3, 1).cpu().numpy()

    def resolve_sampler(
        self,
        sampler: str | SamplerConfig | Mapping[str, Any] | None,
        conditional: bool,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> SamplerConfig:
        """The sampler a call will use: ``sampler`` or the model's default for the mode, with overrides."""
        defaults = self.config.get("sampler") or {}
        key = "conditional" if conditional else "unconditional"
        default = (
            defaults.get(key)
            or sampler_preset("cytosyn_default" if conditional else "unconditional_default").model_dump()
        )
        return resolve_sampler(sampler, default, steps=steps, guidance_scale=guidance_scale)

    def generate(
        self,
        embeddings: Tensor | np.ndarray | None,
        *,
        num_images: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | SamplerConfig | Mapping[str, Any] | None = None,
        seed: int = 0,
        batch_size: int = 16,
        index_offset: int = 0,
        output: str = "uint8",
        progress: Any = None,
        labels: Sequence[str | int] | None = None,
    ) -> np.ndarray | Tensor:
        """Generate tiles: uint8 ``(N, tile_px, tile_px, 3)``.

        - ``embeddings`` ``(N, cond_dim)``: one tile per row (a single row with ``num_images=k`` gives k
          variations of it); None: ``num_images`` unconditional tiles (null condition, no guidance).
        - ``sampler``: a preset name (``"fast_heun_30"``), a :class:`SamplerConfig` or a mapping; None: the
          model's default for the mode (config.json ``sampler``). ``steps`` / ``guidance_scale`` replace
          those fields (validated: a negative scale is an error naming ``guidance_scale``).
        - Image ``i`` (0-based, plus ``index_offset``) draws all its noise from a generator seeded by
          ``(seed, index_offset + i)``: results do not depend on ``batch_size``, and a run split in pieces
          (``index_offset``) gives the same images as one call.
        - ``output="latent"`` returns the normalised latents (float32 tensor) instead of decoding.
        - ``progress``: an object with ``update(n)`` (e.g. a tqdm bar), called after each batch.
        - ``labels``: class names (or indices) of a label-conditioned model (an adapter with labels), one
          tile per label, ``embeddings`` None; a single label with ``num_images=k`` gives k tiles of it.
          Unknown names are refused (see :func:`cytosyn.adapters.label_indices`).
        """
        if batch_size < 1:
            raise PipelineError(f"batch_size must be >= 1, got {batch_size}")
        if output not in ("uint8", "latent"):
            raise PipelineError(f"output must be 'uint8' or 'latent', got {output!r}")
        if labels is not None:
            cond_l = self._label_tensor(labels, embeddings, num_images)
            return self._generate_batches(
                cond_l, cond_l.shape[0], steps, guidance_scale, sampler, seed, batch_size, index_offset,
                output, progress,
            )  # fmt: skip
        if embeddings is None:
            if num_images is None or num_images < 1:
                raise PipelineError("unconditional generation needs num_images >= 1 (embeddings is None)")
            cond: Tensor | None = None
            n = int(num_images)
        else:
            cond = self.check_embeddings(embeddings)
            if num_images is not None and num_images != cond.shape[0]:
                if cond.shape[0] != 1:
                    raise PipelineError(
                        f"num_images={num_images} but {cond.shape[0]} embeddings were given (one image per row; "
                        f"pass a single row to get several variations of it)"
                    )
                cond = cond.expand(int(num_images), -1)
            n = cond.shape[0]
        return self._generate_batches(
            cond, n, steps, guidance_scale, sampler, seed, batch_size, index_offset, output, progress
        )

    def _label_tensor(self, labels: Sequence[str | int], embeddings: Any, num_images: int | None) -> Tensor:
        from cytosyn.adapters import label_indices

        names = self.label_names
        if names is None or self.model.label_embedder is None:
            raise PipelineError(
                "labels given, but this model is not label-conditioned (load a labelled adapter)"
            )
        if embeddings is not None:
            raise PipelineError("pass either embeddings or labels, not both")
        if isinstance(labels, (str, int)):
            labels = [labels]
        idx = label_indices(list(labels), names)
        if not idx:
            raise PipelineError("labels is empty")
        if num_images is not None and num_images != len(idx):
            if len(idx) != 1:
                raise PipelineError(
                    f"num_images={num_images} but {len(idx)} labels were given (one tile per label)"
                )
            idx = idx * int(num_images)
        return torch.tensor(idx, dtype=torch.long, device=self.device)

    def _generate_batches(
        self,
        cond: Tensor | None,
        n: int,
        steps: int | None,
        guidance_scale: float | None,
        sampler: Any,
        seed: int,
        batch_size: int,
        index_offset: int,
        output: str,
        progress: Any,
    ) -> np.ndarray | Tensor:
        cfg = self.resolve_sampler(sampler, cond is not None, steps=steps, guidance_scale=guidance_scale)
        outs: list[Any] = []
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            rows = list(range(index_offset + start, index_offset + stop))
            latents = self.sample_latents(None if cond is None else cond[start:stop], rows, cfg, seed)
            outs.append(latents.cpu() if output == "latent" else self.decode(latents))
            if progress is not None:
                progress.update(stop - start)
        if output == "latent":
            return torch.cat(outs)
        return np.concatenate(outs)

    @torch.no_grad()
    def embed(self, images: np.ndarray | Tensor, batch_size: int = 64) -> Tensor:
        """Conditioning embeddings of uint8 tiles ``(N, H, W, 3)`` with the model's encoder, rounded to fp16
        as the training data was stored; float32 on the CPU, ``(N, cond_dim)``."""
        enc = self.encoder
        output = (self.config.get("conditioning") or {}).get("output", "cls")
        if output not in ("cls", "mean_patch"):
            raise PipelineError(f"conditioning output {output!r} is not a vector; cannot embed for it")
        arr = uint8_tiles(images)
        outs = []
        for start in range(0, arr.shape[0], batch_size):
            batch = arr[start : start + batch_size].to(self.device)
            with self._autocast():
                value = enc(batch, (output,))[output]
            outs.append(value.float().half().float().cpu())
        emb = torch.cat(outs)
        if self.cond_dim is not None and emb.shape[1] != self.cond_dim:
            raise PipelineError(
                f"encoder {enc.spec.name!r} gives width {emb.shape[1]}, the model expects {self.cond_dim}"
            )
        return emb

    def generate_from_tiles(self, reference_tiles: np.ndarray | Tensor, **kwargs: Any) -> np.ndarray | Tensor:
        """More like this: embed ``reference_tiles`` with the conditioning encoder, then :meth:`generate`."""
        return self.generate(self.embed(reference_tiles), **kwargs)

    # ---- scoring support (cytosyn.scoring measures denoising errors through these) -------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the normalised latents the denoiser works on."""
        c = self.model.cfg
        return (c.in_channels, c.input_size, c.input_size)

    @property
    def has_null_condition(self) -> bool:
        """Whether the model has a learned null condition (every conditional SiT has one)."""
        return self.model.cond_embedder is not None

    @torch.no_grad()
    def encode_latents(self, images: np.ndarray | Tensor, batch_size: int = 16) -> Tensor:
        """uint8 tiles ``(N, H, W, 3)`` → normalised latents ``(N, C, h, w)`` float32 on the CPU: the VAE's
        posterior mean, rounded to fp16 as featurize stores it, then normalised as in training."""
        arr = uint8_tiles(images)
        outs = []
        for start in range(0, arr.shape[0], batch_size):
            moments = self.vae.encode_moments(arr[start : start + batch_size].to(self.device))
            mean = moments[:, 0].float().half().float()
            outs.append(self.latent_norm.normalize(mean).float().cpu())
        latents = torch.cat(outs)
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise PipelineError(
                f"the VAE gives latents of shape {tuple(latents.shape[1:])}, the model expects {self.latent_shape}: "
                f"tiles of {arr.shape[1]}×{arr.shape[2]} px instead of {self.tile_px} px?"
            )
        return latents

    def null_embedding(self) -> Tensor:
        """The learned null condition (what unconditional sampling and CFG's second branch use)."""
        if self.model.cond_embedder is None:
            raise PipelineError("this model has no condition embedder")
        return self.model.cond_embedder.null_embedding.detach().float().cpu().clone()

    def __repr__(self) -> str:
        return (
            f"CytoSynPipeline({self.name}, {self.config['sit'].get('preset')}, "
            f"encoder={self.conditioning_encoder}, tile={self.tile_px}px@{self.mpp}mpp, device={self.device})"
        )


def uint8_tiles(images: np.ndarray | Tensor) -> Tensor:
    """``(N, H, W, 3)`` uint8 tiles as a tensor (one tile ``(H, W, 3)`` gets a batch axis), or a clear error."""
    arr = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.dtype != torch.uint8:
        raise PipelineError(f"expected uint8 tiles (N, H, W, 3), got {tuple(arr.shape)} {arr.dtype}")
    return arr


def is_release_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / SUMS_FILE).is_file()


def load_pipeline(path: str | Path, **kwargs: Any) -> CytoSynPipeline:
    """A release folder (verified) or a training checkpoint, whichever ``path`` is."""
    if is_release_folder(path):
        return CytoSynPipeline.from_pretrained(path, **kwargs)
    vae_weights = kwargs.pop("vae_weights", None)
    device = kwargs.pop("device", "auto")
    return CytoSynPipeline.from_checkpoint(path, vae_weights, device, **kwargs)


__all__ = [
    "CONFIG_FILE",
    "LEGACY_MODEL_FILE",
    "MODEL_FILE",
    "READABLE_FORMATS",
    "README_FILE",
    "RELEASE_FORMAT",
    "SUMS_FILE",
    "CytoSynPipeline",
    "PipelineError",
    "ReleaseIntegrityError",
    "image_seed",
    "is_release_folder",
    "load_pipeline",
    "load_training_checkpoint",
    "parts_from_checkpoint",
    "required_files",
    "verify_release",
    "write_release_files",
]
