"""A cytosyn release is also a diffusers pipeline folder: load it with ``DiffusionPipeline.from_pretrained``.

Release layout (format ``cytosyn.release/2``; every file listed in ``SHA256SUMS``)::

    model_index.json                         diffusers: the pipeline class and its components
    pipeline.py                              one import: the pipeline class of the installed cytosyn
    transformer/config.json                  SiTTransformer (a diffusers ModelMixin): SiT architecture,
    transformer/diffusion_pytorch_model.safetensors   latent normalisation, conditioning encoder id,
                                             autoencoder id + weights hash, tile geometry, weights sha256
    scheduler/scheduler_config.json          CytoSynSamplerScheduler: the sampler defaults per mode
    vae/config.json + diffusion_pytorch_model.safetensors   only when the autoencoder is bundled
    config.json                              the whole release config (training, data, evaluation, ...)
    README.md                                the model card (hub metadata in its YAML header)
    SHA256SUMS                               sha256 of every file above (``sha256sum -c SHA256SUMS``)

Three ways in, one set of weights, the same samples bit for bit for a seed (tested):

- ``CytoSynPipeline.from_pretrained(folder)`` (cytosyn's own API, a ``TileGenerator``);
- ``CytoSynDiffusionPipeline.from_pretrained(folder)`` (diffusers' loader, no remote code: the class is
  imported from cytosyn);
- ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)``
  (the folder's ``pipeline.py`` imports the class from the installed cytosyn; it holds no model code).

The autoencoder is either **bundled** (a diffusers ``AutoencoderKL`` saved under ``vae/``, its weights
hash recorded) or **referenced** (``model_index.json`` lists ``vae`` as ``[null, null]``; the transformer
config records the registry name and the weights hash, and the VAE is loaded through
:func:`cytosyn.models.vae.load_vae_as_recorded` — local weights via ``vae_weights=``, a random test VAE
rebuilt from its seed, any registry entry, AutoencoderKL or not — or passed as ``vae=``). Either way a
VAE whose weights differ from the recorded hash is refused.

Hash checks: the transformer refuses weights whose content sha256 differs from the one in its config
(also after diffusers' own save/load), and when the folder has ``SHA256SUMS`` every file is checked
before anything is read, on every path. The scheduler component carries the sampler settings; sampling
itself runs through :func:`cytosyn.sampling.sample` (Euler / Heun / Euler–Maruyama in float64 with a
guidance interval), so swapping in another diffusers scheduler is not supported.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cytosyn.compat import import_torchvision

import_torchvision()

# diffusers resolves a component's load method by looking these names up in the component's module:
# ModelMixin and SchedulerMixin must be importable from here.
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: E402
from diffusers import __version__ as DIFFUSERS_VERSION  # noqa: E402
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput  # noqa: E402

from cytosyn.fileio import atomic_write_bytes, atomic_write_text, sha256_file  # noqa: E402
from cytosyn.models.sit import SiT, SiTConfig  # noqa: E402

__all__ = [
    "PIPELINE_FILE",
    "ConfigMixin",
    "CytoSynDiffusionPipeline",
    "CytoSynSamplerScheduler",
    "ModelMixin",
    "SchedulerMixin",
    "SiTTransformer",
    "layout_files",
    "write_diffusers_layout",
]

MODULE = __name__  # what model_index.json names as the components' library
TRANSFORMER_DIR, SCHEDULER_DIR, VAE_DIR = "transformer", "scheduler", "vae"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PIPELINE_FILE = "pipeline.py"
MODEL_INDEX = "model_index.json"
SUMS_FILE = "SHA256SUMS"
PIPELINE_SOURCE = f'''"""The pipeline of this cytosyn release, from the installed cytosyn (pip install cytosyn).

Loaded by ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)``;
it holds no model code: ``import {MODULE}`` is all it does.
"""

from {MODULE} import CytoSynDiffusionPipeline

__all__ = ["CytoSynDiffusionPipeline"]
'''


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"


def _release_root(path: str | os.PathLike, subfolder: str | None) -> Path | None:
    """The release folder a component is loaded from (the one holding SHA256SUMS), or None."""
    p = Path(path)
    root = p if subfolder else p.parent
    return root if p.is_dir() and (root / SUMS_FILE).is_file() else None


def realign_(module: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter and buffer a fresh, allocator-aligned copy (in place).

    Weights read from safetensors can be views into one buffer at 8-byte offsets; CPU kernels take other
    code paths (another summation order) on differently aligned data. Every loading path calls this so
    the same weights give the same samples bit for bit (see ``CytoSynPipeline.__init__``)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return module


# --------------------------------------------------------------------------------------------- components
class SiTTransformer(ModelMixin, ConfigMixin):
    """The denoiser as a diffusers model: ``model`` (the SiT) and ``latent_norm`` (its latent statistics).

    Its state dict has exactly the release's keys (``model.*``, ``latent_norm.*``). The config records
    what the weights cannot be used without: the SiT architecture, the latent normalisation, the
    conditioning encoder (id, weights, width, preprocessing), the autoencoder whose latents it denoises
    (registry name + weights hash) and the tile geometry; ``weights_sha256`` is checked on every load.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        sit: dict[str, Any],
        latent: dict[str, Any],
        conditioning: dict[str, Any] | None = None,
        vae: dict[str, Any] | None = None,
        tile: dict[str, Any] | None = None,
        name: str = "cytosyn",
        weights_sha256: str | None = None,
    ):
        super().__init__()
        from cytosyn.pipeline import build_latent_norm

        self.model = SiT(SiTConfig.model_validate(sit))
        self.latent_norm = build_latent_norm(latent)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> SiTTransformer:
        """diffusers' loader, plus: the release's SHA256SUMS (when the folder has one) checked first, and the
        weights' content hash compared with ``config.weights_sha256``."""
        from cytosyn.pipeline import ReleaseIntegrityError, verify_release

        root = _release_root(pretrained_model_name_or_path, kwargs.get("subfolder"))
        if root is not None:
            verify_release(root)
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        realign_(model)
        expected = model.config.weights_sha256
        if expected:
            actual = model.content_sha256()
            if actual != expected:
                raise ReleaseIntegrityError(
                    f"{pretrained_model_name_or_path}: transformer weights hash to {actual}, its config records "
                    f"{expected}; refusing altered weights"
                )
        return model.eval().requires_grad_(False)

    def content_sha256(self) -> str:
        """Content hash of the weights (keys + tensor bytes), as ``CytoSynPipeline.weights_sha256``."""
        from cytosyn.models.encoders import sha256_state_dict

        return sha256_state_dict({k: v.detach().cpu() for k, v in self.state_dict().items()})

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, uncond_mask: Tensor | None = None):
        """The SiT's velocity prediction (the latent normalisation is applied by the pipeline)."""
        return self.model(x_t, t, cond, uncond_mask=uncond_mask)


class CytoSynSamplerScheduler(SchedulerMixin, ConfigMixin):
    """The sampler defaults of a release (``conditional`` and ``unconditional`` SamplerConfig fields).

    A settings carrier: the integration itself is :func:`cytosyn.sampling.sample` (the time convention
    x_t = (1 − t)·x + t·ε, t = 1 noise, velocity v = ε − x, float64 time steps). ``set_timesteps`` gives
    the time grid a mode would use, for inspection.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self, conditional: dict[str, Any] | None = None, unconditional: dict[str, Any] | None = None
    ):
        self.sampler_config(True)
        self.sampler_config(False)  # validated now: a bad setting is refused at load time
        self.timesteps: Tensor | None = None

    def sampler_config(self, conditional: bool = True):
        """The validated :class:`~cytosyn.sampling.SamplerConfig` of a mode."""
        from cytosyn.pipeline import resolve_sampler
        from cytosyn.sampling.samplers import sampler_preset

        stored = self.config.conditional if conditional else self.config.unconditional
        preset = "cytosyn_default" if conditional else "unconditional_default"
        return resolve_sampler(stored, sampler_preset(preset).model_dump())

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        conditional: bool = True,
    ) -> None:
        from cytosyn.pipeline import resolve_sampler
        from cytosyn.sampling.samplers import time_grid

        cfg = resolve_sampler(self.sampler_config(conditional), {}, steps=num_inference_steps)
        self.timesteps = time_grid(cfg, device)


# --------------------------------------------------------------------------------------------- the pipeline
class CytoSynDiffusionPipeline(DiffusionPipeline):
    """A cytosyn release as a diffusers pipeline; ``__call__`` samples exactly as ``CytoSynPipeline.generate``.

    ``pipe(embeddings)`` → one tile per embedding row; ``pipe(num_images=8)`` → unconditional tiles;
    ``pipe(tiles=reference_uint8_tiles)`` → "more like these" (embedded with the conditioning encoder).
    ``output_type``: ``"pil"`` (default), ``"np"`` (float in [0, 1], diffusers' convention), ``"uint8"``
    or ``"latent"``. ``pipe.core`` is the :class:`~cytosyn.pipeline.CytoSynPipeline` (a TileGenerator
    sharing these modules), for cytosyn's evaluation harness.
    """

    _optional_components = ["vae"]
    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: SiTTransformer, scheduler: CytoSynSamplerScheduler, vae: Any = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self._core = None
        self.vae_weights: str | Path | None = None  # local weights of a referenced autoencoder
        self.encoder_weights: str | Path | None = None  # local weights of the conditioning encoder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """diffusers' loader; ``vae_weights`` / ``encoder_weights`` (local paths) are kept for the core."""
        vae_weights = kwargs.pop("vae_weights", None)
        encoder_weights = kwargs.pop("encoder_weights", None)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.vae_weights, pipe.encoder_weights = vae_weights, encoder_weights
        return pipe

    def _source_folder(self) -> Path | None:
        """The local release folder this pipeline was loaded from (diffusers records it), if any."""
        src = getattr(self.config, "_name_or_path", None)
        return Path(src) if src and Path(src).is_dir() and (Path(src) / "config.json").is_file() else None

    def release_config(self) -> dict[str, Any]:
        """The release config: the source folder's config.json (training, data, evaluation, ...) when loaded
        from one, with the inference part rebuilt from the components' configs."""
        from cytosyn.pipeline import RELEASE_FORMAT

        source = self._source_folder()
        full = json.loads((source / "config.json").read_text()) if source is not None else {}
        t = self.transformer.config
        return full | {
            "format": RELEASE_FORMAT,
            "_class_name": "CytoSynPipeline",
            "name": t.name,
            "sit": dict(t.sit),
            "latent": dict(t.latent),
            "conditioning": dict(t.conditioning or {}),
            "vae": dict(t.vae or {}),
            "tile": dict(t.tile or {}),
            "sampler": {
                "conditional": self.scheduler.sampler_config(True).model_dump(mode="json"),
                "unconditional": self.scheduler.sampler_config(False).model_dump(mode="json"),
            },
        }

    @property
    def core(self):
        """The cytosyn pipeline over these modules (rebuilt when the pipeline moved to another device)."""
        from cytosyn.pipeline import CytoSynPipeline

        if self._core is None or self._core.device != self.transformer.device:
            vae = None
            if self.vae is not None:
                vae = wrap_vae(self.vae, self.transformer.config.vae or {})
            self._core = CytoSynPipeline(
                self.release_config(),
                None,
                modules=(self.transformer.model, self.transformer.latent_norm),
                device=self.transformer.device,
                vae=vae,
                vae_weights=self.vae_weights,
                encoder_weights=self.encoder_weights,
                model_card=(source / "README.md").read_text()
                if (source := self._source_folder()) and (source / "README.md").is_file()
                else None,
                source=str(getattr(self.config, "_name_or_path", "") or "diffusers"),
            )
        return self._core

    @torch.no_grad()
    def __call__(
        self,
        embeddings: Tensor | np.ndarray | None = None,
        *,
        tiles: np.ndarray | Tensor | None = None,
        num_images: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: Any = None,
        seed: int = 0,
        batch_size: int = 16,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: Any = None,
    ):
        if output_type not in ("pil", "np", "uint8", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'uint8' or 'latent', got {output_type!r}")
        core = self.core
        if tiles is not None:
            if embeddings is not None:
                raise ValueError("pass embeddings or tiles, not both")
            embeddings = core.embed(tiles)
        out = core.generate(
            embeddings,
            num_images=num_images,
            steps=num_inference_steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            seed=seed,
            batch_size=batch_size,
            output="latent" if output_type == "latent" else "uint8",
            progress=progress,
        )
        if output_type == "pil":
            from PIL import Image

            images: Any = [Image.fromarray(im) for im in out]
        elif output_type == "np":
            images = np.asarray(out, dtype=np.float32) / 255.0
        else:
            images = out
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write a full cytosyn release (this layout + config.json, model card, SHA256SUMS), not only
        diffusers' files: the folder loads with every entry point and keeps its hash checks."""
        self.core.save_pretrained(save_directory, bundle_vae=self.vae is not None)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Upload the release folder as written by :meth:`save_pretrained` (its model card included:
        diffusers' default would replace README.md, which SHA256SUMS lists)."""
        import huggingface_hub

        repo = huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return huggingface_hub.upload_folder(
                repo_id=getattr(repo, "repo_id", repo_id),
                folder_path=tmp,
                token=token,
                commit_message=commit_message or "Upload cytosyn release",
                create_pr=create_pr,
            )


def wrap_vae(vae: Any, recorded: Mapping[str, Any]) -> Any:
    """A VAE component (a diffusers ``AutoencoderKL`` or a cytosyn ``LatentVAE``) as a ``LatentVAE``,
    refused when its weights differ from the recorded hash (the bundled one, else the recorded one)."""
    from cytosyn.models.encoders import sha256_state_dict
    from cytosyn.models.vae import LatentVAE, get_vae_spec
    from cytosyn.pipeline import PipelineError

    if not isinstance(vae, LatentVAE):
        vae = LatentVAE(
            get_vae_spec(recorded.get("name") or ""), vae, f"sha256:{sha256_state_dict(vae.state_dict())}"
        )
    expected = (recorded.get("bundled") or {}).get("weights") or recorded.get("weights")
    if expected and not str(expected).startswith("random-init") and vae.weights_id != expected:
        raise PipelineError(
            f"the autoencoder given has weights {vae.weights_id}; this model's latents come from {expected}"
        )
    return vae


# -------------------------------------------------------------------------------------------------- writing
def layout_files(bundle_vae: bool) -> list[str]:
    """The files a release of format cytosyn.release/2 must list in SHA256SUMS."""
    files = [
        MODEL_INDEX,
        PIPELINE_FILE,
        f"{TRANSFORMER_DIR}/config.json",
        f"{TRANSFORMER_DIR}/{WEIGHTS_NAME}",
        f"{SCHEDULER_DIR}/scheduler_config.json",
        "config.json",
        "README.md",
    ]
    if bundle_vae:
        files += [f"{VAE_DIR}/config.json", f"{VAE_DIR}/{WEIGHTS_NAME}"]
    return files


def write_diffusers_layout(
    folder: Path,
    config: Mapping[str, Any],
    state: Mapping[str, Tensor],
    readme: str,
    vae: Any = None,
) -> Path:
    """Write a release folder (see the module docstring), ``SHA256SUMS`` last. Deterministic: the same
    inputs give byte-identical files. ``vae``: a ``LatentVAE`` whose ``AutoencoderKL`` is bundled."""
    from safetensors.torch import save

    from cytosyn.models.encoders import sha256_state_dict

    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}
    weights_sha = sha256_state_dict(tensors)
    vae_info = dict(config.get("vae") or {})
    vae_state: dict[str, Tensor] = {}
    if vae is not None:
        vae_state = {k: v.detach().to("cpu").contiguous() for k, v in sorted(vae.vae.state_dict().items())}
        vae_info["bundled"] = {
            "folder": VAE_DIR,
            "class": type(vae.vae).__name__,
            "weights": f"sha256:{sha256_state_dict(vae_state)}",
            "built_from": vae.weights_id,
        }
    transformer_cfg = {
        "_class_name": SiTTransformer.__name__,
        "_diffusers_version": DIFFUSERS_VERSION,
        "sit": config["sit"],
        "latent": config["latent"],
        "conditioning": config.get("conditioning") or {},
        "vae": vae_info,
        "tile": config.get("tile") or {},
        "name": config.get("name", "cytosyn"),
        "weights_sha256": weights_sha,
    }
    sampler = config.get("sampler") or {}
    scheduler_cfg = {
        "_class_name": CytoSynSamplerScheduler.__name__,
        "_diffusers_version": DIFFUSERS_VERSION,
        "conditional": sampler.get("conditional"),
        "unconditional": sampler.get("unconditional"),
    }
    index = {
        "_class_name": CytoSynDiffusionPipeline.__name__,
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": [MODULE, CytoSynSamplerScheduler.__name__],
        "transformer": [MODULE, SiTTransformer.__name__],
        "vae": ["diffusers", type(vae.vae).__name__] if vae is not None else [None, None],
    }
    release_cfg = dict(config) | {"vae": vae_info}
    release_cfg["weights"] = dict(release_cfg.get("weights") or {}) | {
        "file": f"{TRANSFORMER_DIR}/{WEIGHTS_NAME}",
        "sha256_content": weights_sha,
    }
    (folder / TRANSFORMER_DIR).mkdir(parents=True, exist_ok=True)
    (folder / SCHEDULER_DIR).mkdir(parents=True, exist_ok=True)
    # One metadata entry only: safetensors writes metadata from a hash map, in no fixed order.
    atomic_write_bytes(folder / TRANSFORMER_DIR / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / TRANSFORMER_DIR / "config.json", _json_text(transformer_cfg))
    atomic_write_text(folder / SCHEDULER_DIR / "scheduler_config.json", _json_text(scheduler_cfg))
    if vae is not None:
        (folder / VAE_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / VAE_DIR / WEIGHTS_NAME, save(vae_state, metadata={"format": "pt"}))
        vae_cfg = {k: v for k, v in dict(vae.vae.config).items() if not k.startswith("_")}
        vae_cfg = {"_class_name": type(vae.vae).__name__, "_diffusers_version": DIFFUSERS_VERSION} | vae_cfg
        atomic_write_text(folder / VAE_DIR / "config.json", _json_text(vae_cfg))
    atomic_write_text(folder / MODEL_INDEX, _json_text(index))
    atomic_write_text(folder / PIPELINE_FILE, PIPELINE_SOURCE)
    atomic_write_text(folder / "config.json", _json_text(release_cfg))
    atomic_write_text(folder / "README.md", readme)
    lines = [f"{sha256_file(folder / name)}  {name}" for name in sorted(layout_files(vae is not None))]
    atomic_write_text(folder / SUMS_FILE, "\n".join(lines) + "\n")
    return folder
