"""PixCell through the same door as cytosyn's own model: a `TileGenerator` over a local diffusers folder.

PixCell-256 (Yellapragada et al. 2025, arXiv 2506.05127) is a PixArt-XL/2 DiT conditioned, by
cross-attention, on one UNI2-h embedding (1×1536) of a 256-px tile at ~0.5 mpp, denoising 16-channel
SD3.5-VAE latents (discrete 1000-step DDPM, ε-prediction with learned variance). It is published as a
diffusers folder (``transformer/`` + ``scheduler/`` + ``model_index.json``) used with a custom pipeline;
the SD3.5 VAE is loaded separately. `PixCellGenerator` rebuilds that sampling path with plain diffusers
parts, so no remote code runs:

- **transformer**: ``transformer/config.json`` + weights into diffusers' ``PixArtTransformer2DModel``.
  PixCell's own class (``PixCellTransformer2DModel``) is the same network for one conditioning token
  (``caption_num_tokens = 1``: its ``caption_projection`` has the same ``linear_1``/``linear_2`` layers
  and no positional embedding of the condition); it adds a ``caption_projection.uncond_embedding``
  buffer, the learned unconditional UNI embedding that classifier-free guidance needs. Multi-token
  conditioning (PixCell-1024, 16 tokens with sin-cos positions) is refused.
- **unconditional embedding**: that buffer, or ``uncond_embedding.safetensors`` / ``.npy`` at the
  folder root (both checked equal when both exist).
- **scheduler**: ``scheduler/scheduler_config.json`` turned into a ``DPMSolverMultistepScheduler``
  (default, 20 steps, multistep order 2 — PixCell's published default) or ``DDPMScheduler`` /
  ``DDIMScheduler``. The learned-variance half of the output is split off here: diffusers' DPM-Solver
  slices ``model_output[:, :3]`` for learned variance, which is wrong for 16 latent channels.
- **VAE**: ``vae_path`` (the ``vae`` folder of stabilityai/stable-diffusion-3.5-large), else
  ``<folder>/vae``. Latents are decoded as ``vae.decode(z / 1.5305 + 0.0609)`` (the VAE config's
  ``scaling_factor`` / ``shift_factor``).
- **conditioning**: ``embed()`` runs the registry's ``uni2-h`` encoder (exact architecture; local
  weights via ``encoder_weights``) on the reference tiles and returns the CLS token.

**Field of view.** PixCell-256 draws 256 px at ~0.5 mpp = 128 µm; cytosyn tiles are 224 px at 0.5 mpp =
112 µm. ``fov_policy`` decides what the harness sees: ``"center_crop"`` (default) keeps the central
224 px — 112 µm at the same 0.5 mpp, no resampling; ``"resample"`` area-averages 256 → 224 px (PIL
``BOX``) — all 128 µm at 0.571 mpp, to compare with references tiled at that mpp; ``"none"`` keeps
256 px at 0.5 mpp. The policy, crop box / resize method, resulting mpp and field of view are in
``describe()`` and in ``mpp``/``tile_px``, which the metric core's guard compares with the reference's.

`make_tiny_pixcell_folder` writes a **randomly initialised**, tiny folder with the same structure for
tests and the demo (a 2-layer PixArt transformer, a small 16-channel AutoencoderKL in ``vae/`` standing in
for SD3.5's, a small stand-in conditioning encoder named in ``conditioning.json``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cytosyn.compat import import_torchvision
from cytosyn.fileio import atomic_write_text

__all__ = [
    "FOV_POLICIES",
    "PIXCELL_NATIVE_MPP",
    "SD35_SCALING_FACTOR",
    "SD35_SHIFT_FACTOR",
    "PixCellError",
    "PixCellGenerator",
    "apply_fov_policy",
    "make_tiny_pixcell_folder",
]

FOV_POLICIES = ("center_crop", "resample", "none")
#: PixCell's tiles: 20× scans, ~0.5 µm per pixel (the paper's PanCan-30M patches).
PIXCELL_NATIVE_MPP = 0.5
SD35_SCALING_FACTOR = 1.5305
SD35_SHIFT_FACTOR = 0.0609
_UNCOND_KEY = "caption_projection.uncond_embedding"
_TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "PixCellTransformer2DModel")
_SCHEDULERS = ("dpm-solver", "ddpm", "ddim")


class PixCellError(ValueError):
    """A PixCell folder that cannot be loaded, or a request the adapter cannot honour."""


# ------------------------------------------------------------------------------------------ helpers
def _image_seed(seed: int, index: int) -> int:
    """The 63-bit seed of image ``index`` of a call with ``seed`` (stable across machines and batch sizes)."""
    digest = hashlib.blake2b(f"cytosyn.pixcell:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PixCellError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PixCellError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise PixCellError(f"{path} must hold a JSON object")
    return data


def _load_state(folder: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A diffusers model folder's weights: single or sharded safetensors, or a ``.bin`` state dict."""
    from safetensors.torch import load_file

    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    binary = folder / "diffusion_pytorch_model.bin"
    if single.is_file():
        return load_file(str(single)), [single.name]
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(folder / name)))
        return state, files
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True), [binary.name]
    raise PixCellError(
        f"no transformer weights (diffusion_pytorch_model.safetensors[.index.json]/.bin) in {folder}"
    )


def _state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    from cytosyn.models.encoders import sha256_state_dict

    return sha256_state_dict(dict(state))


def _to(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a diffusers model; cast only when asked for another dtype (a same-dtype cast makes diffusers warn)."""
    model = model.to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def apply_fov_policy(tiles: np.ndarray, policy: str, target_px: int) -> np.ndarray:
    """uint8 ``(N, S, S, 3)`` native tiles → what the harness compares (see the module docstring)."""
    if policy not in FOV_POLICIES:
        raise PixCellError(f"fov_policy must be one of {FOV_POLICIES}, got {policy!r}")
    size = tiles.shape[1]
    if policy == "none" or size == target_px:
        return tiles
    if target_px > size:
        raise PixCellError(f"cannot make {target_px}-px tiles from {size}-px ones with fov_policy {policy!r}")
    if policy == "center_crop":
        off = (size - target_px) // 2
        return np.ascontiguousarray(tiles[:, off : off + target_px, off : off + target_px])
    out = np.empty((tiles.shape[0], target_px, target_px, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        out[i] = np.asarray(Image.fromarray(tile).resize((target_px, target_px), Image.Resampling.BOX))
    return out


# ---------------------------------------------------------------------------------------- generator
class PixCellGenerator:
    """`cytosyn.generation.TileGenerator` over a local PixCell diffusers folder (see the module docstring).

    ``folder``: the PixCell-256 diffusers folder (``model_index.json``, ``transformer/``, ``scheduler/``).
    ``vae_path``: the SD3.5 ``vae`` folder (default ``<folder>/vae``). ``encoder``/``encoder_weights``:
    the conditioning encoder (default ``uni2-h``, or what a tiny folder's ``conditioning.json`` names) and
    its local weights. ``fov_policy``/``target_px``: see `apply_fov_policy`. ``steps``/``guidance_scale``:
    defaults for `generate` (20 DPM-Solver steps, guidance 1.5). ``dtype``: the transformer's and VAE's
    compute dtype (float32 by default; float16/bfloat16 on a GPU like PixCell's autocast sampling).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        vae_path: str | Path | None = None,
        encoder: str | None = None,
        encoder_weights: str | Path | None = None,
        fov_policy: str = "center_crop",
        target_px: int = 224,
        native_mpp: float = PIXCELL_NATIVE_MPP,
        steps: int = 20,
        guidance_scale: float = 1.5,
        scheduler: str = "dpm-solver",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        embed_batch_size: int = 32,
    ) -> None:
        import_torchvision()
        if fov_policy not in FOV_POLICIES:
            raise PixCellError(f"fov_policy must be one of {FOV_POLICIES}, got {fov_policy!r}")
        if scheduler not in _SCHEDULERS:
            raise PixCellError(f"scheduler must be one of {_SCHEDULERS}, got {scheduler!r}")
        if steps < 1:
            raise PixCellError(f"steps must be >= 1, got {steps}")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise PixCellError(f"PixCell folder {self.folder} does not exist")
        self.device = torch.device(device)
        self.dtype = dtype
        self.fov_policy = fov_policy
        self.native_mpp = float(native_mpp)
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.scheduler_kind = scheduler
        self.embed_batch_size = int(embed_batch_size)
        self.model_index = _read_json(self.folder / "model_index.json")
        self.random_init = bool(self.model_index.get("cytosyn_random_init", False))
        self._load_transformer()
        self._load_uncond()
        self._load_scheduler()
        self._load_vae(vae_path)
        self._setup_encoder(encoder, encoder_weights)
        self.native_px = int(self.transformer.config.sample_size) * self.vae_downsample
        self.tile_px = self.native_px if fov_policy == "none" else int(target_px)
        if self.tile_px > self.native_px:
            raise PixCellError(f"target_px {target_px} exceeds PixCell's native {self.native_px} px")
        if fov_policy == "resample":
            self.mpp = self.native_mpp * self.native_px / self.tile_px
        else:
            self.mpp = self.native_mpp
        self.name = f"pixcell-{self.native_px}" + ("-random-init" if self.random_init else "")

    # ---------------------------------------------------------------- loading
    def _load_transformer(self) -> None:
        from diffusers import PixArtTransformer2DModel

        tdir = self.folder / "transformer"
        config = _read_json(tdir / "config.json")
        cls = config.get("_class_name", "PixArtTransformer2DModel")
        if cls not in _TRANSFORMER_CLASSES:
            raise PixCellError(f"{tdir}: transformer class {cls!r} is not one of {_TRANSFORMER_CLASSES}")
        tokens = int(config.get("caption_num_tokens", 1))
        if tokens != 1:
            raise PixCellError(
                f"{tdir}: caption_num_tokens={tokens}: multi-token UNI conditioning (PixCell-1024) adds "
                "sin-cos positions to the conditions, which diffusers' PixArtTransformer2DModel lacks; only "
                "PixCell-256 (one token) is supported"
            )
        accepted = set(inspect.signature(PixArtTransformer2DModel.__init__).parameters) - {"self"}
        kwargs = {k: v for k, v in config.items() if k in accepted}
        self.transformer_ignored_config = sorted(
            k for k in config if k not in accepted and not k.startswith("_")
        )
        if not kwargs.get("caption_channels"):
            raise PixCellError(f"{tdir}: caption_channels is not set; PixCell conditions on UNI embeddings")
        model = PixArtTransformer2DModel(**kwargs)
        state, files = _load_state(tdir)
        self._uncond_from_weights = state.pop(_UNCOND_KEY, None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PixCellError(
                f"{tdir}: weights do not fit PixArtTransformer2DModel({kwargs}): missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]}"
            )
        self.transformer = _to(model, self.device, self.dtype)
        self.transformer_class = cls
        self.transformer_config = {k: v for k, v in config.items() if not k.startswith("_")}
        self.transformer_files = files
        self.transformer_sha256 = _state_sha256(state)
        self.caption_channels = int(kwargs["caption_channels"])
        self.latent_channels = int(kwargs.get("in_channels", 4))
        out = int(kwargs.get("out_channels") or self.latent_channels)
        if out not in (self.latent_channels, 2 * self.latent_channels):
            raise PixCellError(f"{tdir}: out_channels {out} is neither in_channels nor twice it")
        self.learned_variance = out == 2 * self.latent_channels

    def _load_uncond(self) -> None:
        from safetensors.torch import load_file

        candidates: list[tuple[str, torch.Tensor]] = []
        if self._uncond_from_weights is not None:
            candidates.append((f"transformer weights ({_UNCOND_KEY})", self._uncond_from_weights))
        st, npy = self.folder / "uncond_embedding.safetensors", self.folder / "uncond_embedding.npy"
        if st.is_file():
            tensors = load_file(str(st))
            if len(tensors) != 1:
                raise PixCellError(f"{st} must hold exactly one tensor, found {sorted(tensors)}")
            candidates.append((st.name, next(iter(tensors.values()))))
        elif npy.is_file():
            candidates.append((npy.name, torch.from_numpy(np.load(npy))))
        if not candidates:
            raise PixCellError(
                f"{self.folder}: no unconditional UNI embedding (neither {_UNCOND_KEY} in the transformer "
                "weights nor uncond_embedding.safetensors/.npy); classifier-free guidance needs it"
            )
        source, uncond = candidates[0]
        uncond = uncond.float().reshape(-1, uncond.shape[-1])
        for other_source, other in candidates[1:]:
            if not torch.equal(other.float().reshape(uncond.shape), uncond):
                raise PixCellError(
                    f"{self.folder}: the unconditional embeddings in {source} and {other_source} differ"
                )
        if uncond.shape != (1, self.caption_channels):
            raise PixCellError(
                f"unconditional embedding has shape {tuple(uncond.shape)}, expected (1, {self.caption_channels})"
            )
        self.uncond = uncond
        self.uncond_source = [s for s, _ in candidates]
        self.uncond_sha256 = hashlib.sha256(uncond.numpy().astype("<f4").tobytes()).hexdigest()

    def _load_scheduler(self) -> None:
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

        path = self.folder / "scheduler" / "scheduler_config.json"
        self.scheduler_source = _read_json(path)
        cls = {"dpm-solver": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler, "ddim": DDIMScheduler}[
            self.scheduler_kind
        ]
        config = {k: v for k, v in self.scheduler_source.items() if not k.startswith("_")}
        if self.scheduler_kind == "dpm-solver":
            config["variance_type"] = None  # the learned-variance half is split off before the solver
        elif self.scheduler_kind == "ddpm":
            config["variance_type"] = "learned_range" if self.learned_variance else "fixed_small"
        scheduler = cls.from_config(config)
        if scheduler.config.prediction_type != "epsilon":
            raise PixCellError(
                f"{path}: prediction_type {scheduler.config.prediction_type!r}; PixCell predicts epsilon"
            )
        self._scheduler_config = dict(scheduler.config)
        self._scheduler_cls = cls

    def _load_vae(self, vae_path: str | Path | None) -> None:
        from diffusers import AutoencoderKL

        path = Path(vae_path) if vae_path is not None else self.folder / "vae"
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise PixCellError(
                f"no VAE at {path}: PixCell decodes with the SD3.5 VAE, loaded separately — pass vae_path=<the "
                "'vae' folder of stabilityai/stable-diffusion-3.5-large> (downloaded beforehand; gated licence)"
            )
        vae = AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=False)
        if vae.config.latent_channels != self.latent_channels:
            raise PixCellError(
                f"VAE at {path} has {vae.config.latent_channels} latent channels; the transformer expects "
                f"{self.latent_channels} (the SD3.5 VAE has 16)"
            )
        self.vae = _to(vae, self.device, self.dtype)
        self.vae_path = path
        self.vae_downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)
        self.scaling_factor = float(scale)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.vae_sha256 = _state_sha256(vae.state_dict())

    def _setup_encoder(self, encoder: str | None, weights: str | Path | None) -> None:
        from cytosyn.models.encoders import get_spec

        cond_file = self.folder / "conditioning.json"
        cond = _read_json(cond_file) if cond_file.is_file() else {}
        name = encoder or cond.get("encoder") or "uni2-h"
        random = bool(cond.get("random_init")) and weights is None and name == cond.get("encoder")
        if random and not self.random_init:
            raise PixCellError(
                f"{cond_file} asks for a random encoder but the folder is not a random-init test folder"
            )
        spec = get_spec(name)
        if spec.embed_dim != self.caption_channels:
            raise PixCellError(
                f"encoder {name!r} gives {spec.embed_dim}-d embeddings; the transformer was trained on "
                f"{self.caption_channels}-d ones (UNI2-h: 1536)"
            )
        self.conditioning_encoder = name
        self._encoder_args = (name, weights, random, int(cond.get("seed", 0)))
        self._encoder = None

    @property
    def encoder(self) -> Any:
        """The conditioning encoder, loaded on first use (UNI2-h is 681M parameters)."""
        if self._encoder is None:
            from cytosyn.models.encoders import load_encoder

            name, weights, random, seed = self._encoder_args
            enc = load_encoder(name, random_init=True, seed=seed) if random else load_encoder(name, weights)
            self._encoder = enc.to(self.device).eval()
        return self._encoder

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> PixCellGenerator:
        return cls(folder, **kwargs)

    # ---------------------------------------------------------------- TileGenerator
    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        """CLS embeddings ``(N, 1536)`` of uint8 reference tiles ``(N, H, W, 3)`` with the conditioning encoder.

        Tiles that are not the encoder's input size (224) are resized by it (bicubic, antialiased); PixCell
        computed its training embeddings from 256-px crops with torchvision ``Resize(224)`` (bilinear,
        antialiased). A 224-px reference tile is fed as is, so it conditions on 112 µm, not 128 µm.
        """
        arr = np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise PixCellError(f"images must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
        out = []
        for s in range(0, arr.shape[0], self.embed_batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(arr[s : s + self.embed_batch_size])).to(self.device)
            out.append(self.encoder(batch, outputs=("cls",))["cls"].float().cpu())
        return torch.cat(out) if out else torch.zeros((0, self.caption_channels))

    def _check_embeddings(self, embeddings: Any) -> torch.Tensor:
        emb = torch.as_tensor(embeddings).detach().float().cpu()
        if emb.ndim == 3 and emb.shape[1] == 1:
            emb = emb[:, 0]
        if emb.ndim != 2 or emb.shape[1] != self.caption_channels:
            raise PixCellError(
                f"embeddings must be (N, {self.caption_channels}) or (N, 1, {self.caption_channels}), "
                f"got {tuple(emb.shape)}"
            )
        if not torch.isfinite(emb).all():
            raise PixCellError("embeddings contain NaN or inf")
        return emb

    @torch.no_grad()
    def generate(
        self,
        embeddings: torch.Tensor | np.ndarray | None,
        *,
        num_images: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        batch_size: int = 16,
    ) -> np.ndarray:
        """uint8 tiles ``(N, tile_px, tile_px, 3)`` (after the FOV policy), one per embedding row.

        ``embeddings=None`` samples ``num_images`` tiles from the unconditional embedding (no guidance).
        Image i starts from noise drawn by its own CPU generator seeded with ``(seed, i)``, so its noise
        does not depend on the batch size or the device (the pixels may still differ by a rounding step
        between batch sizes: batched kernels round differently); DPM-Solver and DDIM are deterministic
        after that, DDPM's per-step noise is drawn per batch (seeded with ``(seed, first index)``).
        The same call with the same seed and batch size returns the same pixels.
        """
        steps = self.steps if steps is None else int(steps)
        guidance = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if steps < 1:
            raise PixCellError(f"steps must be >= 1, got {steps}")
        if batch_size < 1:
            raise PixCellError(f"batch_size must be >= 1, got {batch_size}")
        if embeddings is None:
            if num_images is None or num_images < 0:
                raise PixCellError("unconditional generation needs num_images >= 0")
            cond = self.uncond.expand(num_images, -1)
            guidance = 1.0
        else:
            cond = self._check_embeddings(embeddings)
            if num_images is not None and num_images != cond.shape[0]:
                raise PixCellError(f"num_images={num_images} but {cond.shape[0]} embeddings were given")
        n = cond.shape[0]
        out = np.empty((n, self.tile_px, self.tile_px, 3), dtype=np.uint8)
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            native = self._sample_batch(cond[s:e], range(s, e), steps, guidance, seed)
            out[s:e] = apply_fov_policy(native, self.fov_policy, self.tile_px)
        return out

    def _sample_batch(
        self, cond: torch.Tensor, indices: range, steps: int, guidance: float, seed: int
    ) -> np.ndarray:
        dev, dt = self.device, self.dtype
        size = int(self.transformer.config.sample_size)
        noise = torch.stack(
            [
                torch.randn(
                    (self.latent_channels, size, size),
                    generator=torch.Generator().manual_seed(_image_seed(seed, i)),
                )
                for i in indices
            ]
        )
        scheduler = self._scheduler_cls.from_config(self._scheduler_config)
        scheduler.set_timesteps(steps, device=dev)
        latents = noise.to(dev) * scheduler.init_noise_sigma
        step_gen = torch.Generator().manual_seed(_image_seed(seed, -1 - indices.start))
        do_cfg = guidance != 1.0
        hidden = cond[:, None, :].to(dev, dt)
        if do_cfg:
            hidden = torch.cat([self.uncond.to(dev, dt).expand(cond.shape[0], 1, -1), hidden])
        c = self.latent_channels
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if do_cfg else latents
            x = scheduler.scale_model_input(x, t)
            tt = t.expand(x.shape[0]) if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=dev)
            out = self.transformer(
                x.to(dt),
                encoder_hidden_states=hidden,
                timestep=tt,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0].float()
            eps, rest = out[:, :c], out[:, c:]
            if do_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
                rest = rest.chunk(2)[1] if rest.shape[1] else rest
            model_out = (
                torch.cat([eps, rest], 1) if self.scheduler_kind == "ddpm" and self.learned_variance else eps
            )
            kwargs = {"generator": step_gen} if self.scheduler_kind == "ddpm" else {}
            latents = scheduler.step(model_out, t, latents, return_dict=False, **kwargs)[0]
        z = latents / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z.to(dt)).sample.float()
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """Provenance: folder, weights hashes, scheduler, VAE scale/shift, encoder, FOV policy, defaults."""
        name, weights, random, seed = self._encoder_args
        fov: dict[str, Any] = {
            "policy": self.fov_policy,
            "native_px": self.native_px,
            "native_mpp": self.native_mpp,
            "native_fov_um": round(self.native_px * self.native_mpp, 3),
            "tile_px": self.tile_px,
            "mpp": self.mpp,
            "fov_um": round(self.tile_px * self.mpp, 3),
        }
        if self.fov_policy == "center_crop" and self.tile_px != self.native_px:
            off = (self.native_px - self.tile_px) // 2
            fov["crop_box_xyxy"] = [off, off, off + self.tile_px, off + self.tile_px]
            fov["resampling"] = "none"
        elif self.fov_policy == "resample" and self.tile_px != self.native_px:
            fov["resampling"] = f"PIL BOX (area average) {self.native_px}→{self.tile_px}, uint8"
        return {
            "kind": "pixcell",
            "name": self.name,
            "random_init": self.random_init,
            "folder": str(self.folder),
            "model_index": self.model_index,
            "transformer": {
                "class_in_folder": self.transformer_class,
                "loaded_as": "diffusers.PixArtTransformer2DModel",
                "config": self.transformer_config,
                "ignored_config_keys": self.transformer_ignored_config,
                "files": self.transformer_files,
                "sha256": self.transformer_sha256,
                "learned_variance": self.learned_variance,
                "dtype": str(self.dtype).replace("torch.", ""),
            },
            "uncond_embedding": {"source": self.uncond_source, "sha256": self.uncond_sha256},
            "scheduler": {
                "kind": self.scheduler_kind,
                "class": self._scheduler_cls.__name__,
                "config": {k: v for k, v in self._scheduler_config.items() if not k.startswith("_")},
                "folder_config_class": self.scheduler_source.get("_class_name"),
            },
            "vae": {
                "path": str(self.vae_path),
                "sha256": self.vae_sha256,
                "latent_channels": self.latent_channels,
                "downsample": self.vae_downsample,
                "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor,
                "decode": "vae.decode(z / scaling_factor + shift_factor); (x/2 + 0.5).clamp(0, 1)·255, rounded",
            },
            "conditioning": {
                "encoder": name,
                "weights": str(weights)
                if weights is not None
                else (f"random-init:seed={seed}" if random else "hub"),
                "output": "cls",
                "tokens": 1,
                "cfg": "eps_u + g·(eps_c − eps_u) with the learned unconditional embedding; off when g = 1",
            },
            "sampling": {
                "steps": self.steps,
                "guidance_scale": self.guidance_scale,
                "noise": "per-image CPU generator seeded with blake2b('cytosyn.pixcell:{seed}:{i}')",
            },
            "fov": fov,
            "tile_px": self.tile_px,
            "mpp": self.mpp,
            "device": str(self.device),
        }


# --------------------------------------------------------------------------------------- tiny folder
def make_tiny_pixcell_folder(
    path: str | Path,
    *,
    encoder: str = "dinov2-vits14",
    seed: int = 0,
    sample_px: int = 256,
    num_layers: int = 2,
) -> Path:
    """Write a tiny, **randomly initialised** folder with PixCell-256's structure (tests and the demo).

    ``model_index.json`` (``cytosyn_random_init: true``), ``transformer/`` (a 2-layer
    ``PixArtTransformer2DModel`` config with PixCell's keys — ``caption_channels`` = the stand-in
    encoder's width, ``caption_num_tokens`` 1, 16 → 32 channels for learned variance — and weights holding
    the ``caption_projection.uncond_embedding`` buffer as PixCell's do), ``scheduler/`` (DPM-Solver
    multistep, PixArt's settings), ``vae/`` (a small 16-channel f8 AutoencoderKL with SD3.5's scale and
    shift, standing in for the separately loaded SD3.5 VAE), ``uncond_embedding.safetensors``,
    ``conditioning.json`` (the stand-in encoder, random-init) and a README saying all of this is random.
    """
    import_torchvision()
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from safetensors.torch import save_file

    from cytosyn.models.encoders import get_spec

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    dim = get_spec(encoder).embed_dim
    torch.manual_seed(seed)
    tconfig = {
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 16,
        "out_channels": 32,
        "num_layers": num_layers,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "cross_attention_dim": 32,
        "attention_bias": True,
        "sample_size": sample_px // 8,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "upcast_attention": False,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": None,
        "use_additional_conditions": False,
        "caption_channels": dim,
        "attention_type": "default",
    }
    transformer = PixArtTransformer2DModel(**tconfig)
    uncond = torch.randn(1, dim) / dim**0.5
    state = {k: v.contiguous() for k, v in transformer.state_dict().items()}
    state[_UNCOND_KEY] = uncond.clone()
    tdir = folder / "transformer"
    tdir.mkdir(exist_ok=True)
    save_file(state, str(tdir / "diffusion_pytorch_model.safetensors"))
    import diffusers

    _write_json(
        tdir / "config.json",
        {"_class_name": "PixCellTransformer2DModel", "_diffusers_version": diffusers.__version__}
        | tconfig
        | {"caption_num_tokens": 1},
    )
    save_file({"uncond_embedding": uncond.clone()}, str(folder / "uncond_embedding.safetensors"))
    DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", solver_order=2
    ).save_config(str(folder / "scheduler"))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=sample_px,
        scaling_factor=SD35_SCALING_FACTOR,
        shift_factor=SD35_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.save_pretrained(str(folder / "vae"))
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "PixCellPipeline",
            "_diffusers_version": diffusers.__version__,
            "transformer": ["diffusers", "PixCellTransformer2DModel"],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "vae": ["diffusers", "AutoencoderKL"],
            "cytosyn_random_init": True,
            "cytosyn_note": "RANDOM WEIGHTS: a tiny stand-in with PixCell-256's folder structure, for tests "
            "and the demo. It is not PixCell and its images are noise.",
        },
    )
    _write_json(
        folder / "conditioning.json",
        {"encoder": encoder, "random_init": True, "seed": seed, "stands_in_for": "uni2-h"},
    )
    atomic_write_text(
        folder / "README.md",
        "# RANDOM WEIGHTS — not PixCell\n\n"
        "Written by `cytosyn.eval.pixcell.make_tiny_pixcell_folder` for tests and the demo. Same structure as\n"
        "the PixCell-256 diffusers folder (transformer/, scheduler/, model_index.json, the unconditional\n"
        f"UNI embedding), but a {num_layers}-layer PixArt transformer, a tiny 16-channel VAE in vae/ (PixCell loads\n"
        f"SD3.5's separately) and a random `{encoder}` standing in for UNI2-h. Every weight is random (seed {seed}).\n",
    )
    return folder


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(dict(data), indent=2, sort_keys=False) + "\n")
