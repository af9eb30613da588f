"""Autoencoders for latent diffusion: one registry, one interface, two implementations.

Every latent space cytosyn can train in is a registry entry (:data:`VAE_REGISTRY`) that says how to
encode (posterior moments, or deterministic latents), how to decode, its latent channels, downsampling
factor, published scaling/shift and where its weights come from; the loaded model
(:class:`LatentVAE`) carries the hash of the weights it was built from, and featurize records it next to
the latents it wrote.

- ``kind="diffusers-kl"``: diffusers ``AutoencoderKL`` (SD-VAE, SD3.5-VAE, a VAE tuned by cytosyn,
  the random ``tiny-f8`` of tests). Encodes to a Gaussian posterior.
- ``kind="taesd"``: the Tiny AutoEncoder family (:mod:`cytosyn.models.taesd`), here TAEF2 — pretrained,
  MIT-licensed, shipped inside the package (``cytosyn/assets/taef2/``), so it works offline. Encodes to
  deterministic latents.

What ``vae.npy`` holds (featurize writes ``LatentVAE.encode_moments``; fp16):

- a KL autoencoder: shape ``(2, C, h, w)``: posterior mean and log-variance;
- a deterministic autoencoder: shape ``(1, C, h, w)``: the latents themselves. There is no posterior to
  sample, so training's ``diffusion.sample_posterior`` has nothing to draw and uses the latents (see
  :func:`latents_from_moments`); the split's latent statistics then have ``std == mean_std``. Storing a
  made-up log-variance instead would double the storage for a constant.

cytosyn normalises latents with statistics measured on the training split, so the published scale and
shift are recorded for reference (and for PixCell-style models that use them), not applied.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cytosyn.compat import import_torchvision
from cytosyn.models.encoders import load_as_recorded, sha256_state_dict


class VAEError(RuntimeError):
    """A VAE that cannot be built or loaded, or that does not match the latents; the message says how to fix it."""


AutoencoderKind = Literal["diffusers-kl", "taesd"]

_SD_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


@dataclass(frozen=True)
class VAESpec:
    """A registry entry. ``config``: diffusers ``AutoencoderKL`` arguments (kind ``diffusers-kl``) or
    ``latent_channels`` / ``downsample`` / ``global_norm`` (kind ``taesd``)."""

    name: str
    config: dict[str, Any]
    kind: AutoencoderKind = "diffusers-kl"
    hub_id: str | None = None
    subfolder: str | None = None
    bundled: str | None = None  # weights shipped in the package (path under cytosyn/assets)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    licence: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    @property
    def downsample(self) -> int:
        if self.kind == "taesd":
            return int(self.config["downsample"])
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def deterministic(self) -> bool:
        """True when encoding gives latents, not a posterior (``vae.npy`` then has one row, not two)."""
        return self.kind == "taesd"

    @property
    def moments_rows(self) -> int:
        return 1 if self.deterministic else 2


VAE_REGISTRY: dict[str, VAESpec] = {
    spec.name: spec
    for spec in [
        VAESpec(
            "sd-vae-ft-ema",
            _SD_CONFIG,
            hub_id="stabilityai/sd-vae-ft-ema",
            scaling_factor=0.18215,
            licence="MIT",
        ),
        VAESpec(
            "sd-vae-ft-mse",
            _SD_CONFIG,
            hub_id="stabilityai/sd-vae-ft-mse",
            scaling_factor=0.18215,
            licence="MIT",
        ),
        VAESpec(
            "sd3.5-vae",
            _SD_CONFIG
            | {
                "latent_channels": 16,
                "use_quant_conv": False,
                "use_post_quant_conv": False,
                "scaling_factor": 1.5305,
                "shift_factor": 0.0609,
                "sample_size": 1024,
            },
            hub_id="stabilityai/stable-diffusion-3.5-large",
            subfolder="vae",
            scaling_factor=1.5305,
            shift_factor=0.0609,
            licence="Stability AI Community License (gated)",
            notes="PixCell's VAE (16 channels)",
        ),
        VAESpec(
            "taef2",
            {"latent_channels": 32, "downsample": 8, "global_norm": True},
            kind="taesd",
            bundled="taef2/taef2.safetensors",
            licence="MIT (cytosyn/assets/taef2/LICENSE)",
            notes="Tiny AutoEncoder for FLUX.2 (madebyollin/taesd), 2×1.34M parameters, fp16 weights shipped "
            "in the package: the pretrained autoencoder that works offline (deterministic latents)",
        ),
        VAESpec(
            "tiny-f8",
            {
                "in_channels": 3,
                "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4,
                "block_out_channels": [8, 16, 16, 16],
                "layers_per_block": 1,
                "latent_channels": 4,
                "norm_num_groups": 4,
                "sample_size": 224,
            },
            notes="a small f8/4-channel AutoencoderKL with the SD-VAE geometry, for tests (always random)",
        ),
    ]
}


class LatentVAE(nn.Module):
    """The one interface of every registry entry: uint8 (or [−1, 1] float) tiles in, latents out, and back.

    - :meth:`encode_moments` → what featurize stores in ``vae.npy``: ``(B, 2, C, h, w)`` (mean, log-variance)
      for a KL autoencoder, ``(B, 1, C, h, w)`` (latents) for a deterministic one;
    - :meth:`encode_latents` → ``(B, C, h, w)``: the posterior mean, or the latents;
    - :meth:`decode`: raw (unnormalised) latents → images in [−1, 1].
    """

    def __init__(self, spec: VAESpec, weights_id: str):
        super().__init__()
        self.spec = spec
        self.weights_id = weights_id  # "sha256:<hex>" of the state dict, or "random-init:seed=<n>"

    @property
    def is_random(self) -> bool:
        return self.weights_id.startswith("random-init")

    @property
    def latent_channels(self) -> int:
        return self.spec.latent_channels

    @property
    def downsample(self) -> int:
        return self.spec.downsample

    @property
    def deterministic(self) -> bool:
        return self.spec.deterministic

    @staticmethod
    def to_model_range(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or (B, 3, H, W) → float (B, 3, H, W) in [-1, 1]."""
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()

    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        x = self.to_model_range(images)
        f = self.downsample
        if x.shape[-1] % f or x.shape[-2] % f:
            raise VAEError(
                f"VAE {self.spec.name!r} needs image sides divisible by {f}, got {tuple(x.shape[-2:])}"
            )
        return x

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_moments(images)[:, 0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What manifests, checkpoints and releases record about the autoencoder."""
        rows = self.spec.moments_rows
        return {
            "name": self.spec.name,
            "kind": self.spec.kind,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "deterministic": self.deterministic,
            "moments_layout": "axis 0: deterministic latents"
            if rows == 1
            else "axis 0: posterior mean, log-variance",
            "published_scaling_factor": self.spec.scaling_factor,
            "published_shift_factor": self.spec.shift_factor,
            "weights": self.weights_id,
            "random_init": self.is_random,
            "input_range": "[-1, 1] from uint8/127.5-1"
            if self.spec.kind == "diffusers-kl"
            else "[0, 1] (uint8/255) inside the module; the interface takes uint8 or [-1, 1]",
        }


class DiffusersVAE(LatentVAE):
    """A diffusers ``AutoencoderKL``: encodes to a Gaussian posterior."""

    def __init__(self, spec: VAESpec, vae: nn.Module, weights_id: str):
        super().__init__(spec, weights_id)
        self.vae = vae.eval().requires_grad_(False)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior (mean, log-variance) stacked on a new axis 1: (B, 2, C, h, w)."""
        posterior = self.vae.encode(self._checked(images)).latent_dist
        return torch.stack([posterior.mean, posterior.logvar], dim=1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents → images as float in [-1, 1]."""
        return self.vae.decode(latents).sample.clamp(-1, 1)


class TinyVAE(LatentVAE):
    """A TAESD-family autoencoder (:class:`cytosyn.models.taesd.TinyAutoencoder`): deterministic latents.

    The network works on [0, 1] images; this wrapper converts from and to cytosyn's [−1, 1] convention.
    Weights are kept in float32 for computing (the released fp16 values are exact in fp32).
    """

    def __init__(self, spec: VAESpec, model: nn.Module, weights_id: str):
        super().__init__(spec, weights_id)
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Latents on a new axis 1: (B, 1, C, h, w)."""
        x01 = (self._checked(images) + 1.0) / 2.0
        return self.model.encode(x01)[:, None]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.model.decode(latents) * 2.0 - 1.0).clamp(-1, 1)


def get_vae_spec(name: str) -> VAESpec:
    if name not in VAE_REGISTRY:
        raise VAEError(
            f"unknown VAE {name!r}; known: {', '.join(sorted(VAE_REGISTRY))} (or a local diffusers folder)"
        )
    return VAE_REGISTRY[name]


def bundled_weights(spec: VAESpec) -> Path:
    """The weights file shipped inside the package for ``spec``."""
    if spec.bundled is None:
        raise VAEError(f"VAE {spec.name!r} ships no weights with cytosyn")
    path = Path(str(resources.files("cytosyn") / "assets" / spec.bundled))
    if not path.is_file():
        raise VAEError(f"VAE {spec.name!r}: the bundled weights {path} are missing (broken install?)")
    return path


def _read_tiny_state(spec: VAESpec, path: Path) -> dict[str, torch.Tensor]:
    """``encoder.*`` / ``decoder.*`` tensors from a safetensors file, or a folder holding one or the
    released ``<name>_encoder.pth`` + ``<name>_decoder.pth`` pair."""
    from safetensors.torch import load_file

    if path.is_dir():
        single = sorted(path.glob("*.safetensors"))
        pair = [path / f"{spec.name}_{part}.pth" for part in ("encoder", "decoder")]
        if all(p.is_file() for p in pair):
            state: dict[str, torch.Tensor] = {}
            for part, file in zip(("encoder", "decoder"), pair):
                loaded = torch.load(file, map_location="cpu", weights_only=True)
                state |= {f"{part}.{k}": v for k, v in loaded.items()}
            return state
        if len(single) == 1:
            return load_file(str(single[0]))
        raise VAEError(
            f"VAE {spec.name!r}: folder {path} holds neither one .safetensors file nor "
            f"{pair[0].name} + {pair[1].name}"
        )
    if not path.is_file():
        raise VAEError(f"VAE {spec.name!r}: weights path {path} does not exist")
    if path.suffix != ".safetensors":
        raise VAEError(f"VAE {spec.name!r}: expected a .safetensors file or a folder, got {path}")
    return load_file(str(path))


def _load_tiny(spec: VAESpec, weights: str | Path | None, random_init: bool, seed: int) -> TinyVAE:
    from cytosyn.models.taesd import TinyAutoencoder

    cfg = spec.config
    torch.manual_seed(seed)
    model = TinyAutoencoder(int(cfg["latent_channels"]), bool(cfg.get("global_norm", False)))
    if random_init:
        return TinyVAE(spec, model, f"random-init:seed={seed}")
    path = Path(weights) if weights is not None else bundled_weights(spec)
    state = _read_tiny_state(spec, path)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise VAEError(f"VAE {spec.name!r}: weights {path} do not fit its architecture: {err}") from None
    return TinyVAE(spec, model, f"sha256:{sha256_state_dict(state)}")


def _load_diffusers(spec: VAESpec, weights: str | Path | None, random_init: bool, seed: int) -> DiffusersVAE:
    import_torchvision()
    from diffusers import AutoencoderKL

    name = spec.name
    if random_init:
        torch.manual_seed(seed)
        return DiffusersVAE(spec, AutoencoderKL(**spec.config), f"random-init:seed={seed}")
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise VAEError(
                f"VAE weights path {path} does not exist (expected a diffusers folder with config.json)"
            )
        from cytosyn.models.vae_checkpoints import SINGLE_FILE_SUFFIXES, autoencoder_from_single_file

        try:
            if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:  # e.g. REPA-E's E2E-VAE .pt
                return _wrap_single_file(spec, autoencoder_from_single_file(spec.config, path))
            vae = AutoencoderKL.from_pretrained(
                str(path),
                subfolder=spec.subfolder
                if (path / (spec.subfolder or "")).is_dir() and spec.subfolder
                else None,
            )
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
            raise VAEError(
                f"VAE {name!r}: cannot load a diffusers AutoencoderKL from {path}: {err}"
            ) from None
    else:
        if spec.hub_id is None:
            raise VAEError(f"VAE {name!r} has no hub weights; use random_init (tests) or a local folder")
        try:
            vae = AutoencoderKL.from_pretrained(spec.hub_id, subfolder=spec.subfolder)
        except Exception as err:
            raise VAEError(
                f"VAE {name!r}: could not load {spec.hub_id} from the hub ({type(err).__name__}: {err}). Offline or "
                f"gated? Download the diffusers folder and pass its path as the VAE weights."
            ) from None
    if vae.config.latent_channels != spec.latent_channels:
        raise VAEError(
            f"VAE {name!r}: the loaded weights have {vae.config.latent_channels} latent channels, the registry "
            f"entry {spec.latent_channels}"
        )
    return DiffusersVAE(spec, vae, f"sha256:{sha256_state_dict(vae.state_dict())}")


def _wrap_single_file(spec: VAESpec, vae: nn.Module) -> DiffusersVAE:
    return DiffusersVAE(spec, vae, f"sha256:{sha256_state_dict(vae.state_dict())}")


def load_vae(
    name: str, weights: str | Path | None = None, *, random_init: bool = False, seed: int = 0
) -> LatentVAE:
    """A VAE by registry name: from ``weights`` (a local file or folder), the package's bundled weights
    (``taef2``), the hub, or — only if asked — random initialisation."""
    spec = get_vae_spec(name)
    if random_init and weights is not None:
        raise VAEError(f"VAE {name!r}: random_init and weights are exclusive")
    tuned = _tuned_descriptor(weights, name)
    if spec.kind == "taesd":
        vae: LatentVAE = _load_tiny(spec, weights, random_init, seed)
    else:
        vae = _load_diffusers(spec, weights, random_init, seed)
    if tuned is not None and tuned["weights"] != vae.weights_id:
        raise VAEError(
            f"tuned VAE {weights}: its weights hash to {vae.weights_id}, its descriptor says {tuned['weights']}"
        )
    return vae


def _tuned_descriptor(weights: str | Path | None, name: str) -> dict[str, Any] | None:
    """A VAE tuned by cytosyn (a folder with ``tuned_vae.json``): verified against its SHA256SUMS and its
    base entry before anything is loaded (see :mod:`cytosyn.models.tuned_vae`)."""
    from cytosyn.models.tuned_vae import TunedVAEError, is_tuned_folder, verify_tuned_folder

    if not is_tuned_folder(weights):
        return None
    try:
        return verify_tuned_folder(weights, base=name)  # type: ignore[arg-type]
    except TunedVAEError as err:
        raise VAEError(str(err)) from None


def load_vae_as_recorded(name: str, recorded: str | None, weights: str | Path | None = None) -> LatentVAE:
    """The VAE a manifest, checkpoint or release recorded (see :func:`cytosyn.models.encoders.load_as_recorded`)."""
    hint = "pass the weights of the VAE that made the latents"
    return load_as_recorded(load_vae, "VAE", name, recorded, weights, VAEError, hint)


def latents_from_moments(moments: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """``vae.npy`` rows (B, R, C, h, w) → latents (B, C, h, w).

    Two rows (mean, log-variance): ``mean + σ·eps`` when ``eps`` is given, else the mean. One row
    (a deterministic autoencoder): the latents, whatever ``eps`` is — there is no posterior to sample.
    """
    if moments.ndim != 5 or moments.shape[1] not in (1, 2):
        raise VAEError(
            f"vae.npy batch must be (B, 2, C, h, w) moments or (B, 1, C, h, w) latents, got {tuple(moments.shape)}"
        )
    mean = moments[:, 0]
    if moments.shape[1] == 1 or eps is None:
        return mean
    return mean + torch.exp(0.5 * moments[:, 1]) * eps


def check_vae_matches(vae: LatentVAE, recorded: Mapping[str, Any], where: str) -> None:
    """Refuse an autoencoder that is not the one the latents were made with, naming both.

    ``recorded``: the latents' side (``name``/``model_id``, ``weights``, and when known
    ``latent_channels``, ``downsample``). Weights are compared only when both sides have a hash.
    """
    name = recorded.get("name") or recorded.get("model_id")
    theirs = f"{name} ({recorded.get('weights')})"
    mine = f"{vae.spec.name} ({vae.weights_id})"
    problems = []
    if name is not None and name != vae.spec.name:
        problems.append("another registry entry")
    for key in ("latent_channels", "downsample"):
        if recorded.get(key) is not None and int(recorded[key]) != getattr(vae, key):
            problems.append(f"{key} {getattr(vae, key)} vs {recorded[key]}")
    if recorded.get("weights") and recorded["weights"] != vae.weights_id:
        problems.append("other weights")
    if problems:
        raise VAEError(
            f"{where}: the autoencoder {mine} does not match the one the latents were made with, {theirs}: "
            f"{'; '.join(problems)}. Decode with the autoencoder that featurized the data."
        )
