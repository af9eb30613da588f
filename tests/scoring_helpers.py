"""Models and data for the scoring tests: a random-initialised real SiT as a pipeline, an analytic
(Gaussian, exact-velocity) stand-in whose errors are known, and labelled featurized splits written here."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cytosyn.manifest import FeatureEntry, SplitManifest, write_manifest
from cytosyn.models.sit import SiT, SiTConfig
from cytosyn.pipeline import RELEASE_FORMAT, CytoSynPipeline
from cytosyn.shardio import ShardWriter

ENCODER = "test-encoder"


def random_pipeline(
    cond_dim: int | None = 16, seed: int = 0, size: int = 8, channels: int = 4, real_parts: bool = False
) -> CytoSynPipeline:
    """A small SiT with random weights everywhere (adaLN-Zero layers included, so the output depends on
    the condition), wrapped in the real pipeline. ``real_parts``: conditioned on the registry's ViT-Ti/16
    (192-d) and decoding with tiny-f8 at 224 px, both random-initialised, so tiles can be encoded."""
    if real_parts:
        cond_dim, size, channels = 192, 28, 4
    cfg = SiTConfig(
        input_size=size, in_channels=channels, patch_size=2, hidden_size=32, depth=2, num_heads=2,
        cond_dim=cond_dim, cond_dropout=0.0, repa_dim=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = SiT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0.0, 0.1)
            elif "cond_embedder.mlp" in name and p.ndim == 2:
                p.normal_(0.0, 0.5)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state |= {
        "latent_norm.mean": torch.full((channels,), 0.1),
        "latent_norm.std": torch.full((channels,), 2.0),
    }
    config = {
        "format": RELEASE_FORMAT,
        "_class_name": "CytoSynPipeline",
        "name": "scoring-test",
        "sit": cfg.model_dump(mode="json"),
        "latent": {"channels": channels, "size": size, "norm": "fixed"},
        "conditioning": (
            {"encoder": ENCODER, "weights": None, "embed_dim": cond_dim, "member": f"{ENCODER}.npy"}
            if cond_dim
            else {}
        ),
        "vae": {"name": None},
        "tile": {"px": size * 8, "mpp": 0.5},
    }
    if real_parts:
        config["conditioning"] = {
            "encoder": "vit-tiny16", "weights": "random-init:seed=0", "embed_dim": 192, "member": "vit-tiny16.npy",
            "output": "cls",
        }  # fmt: skip
        config["vae"] = {"name": "tiny-f8", "weights": "random-init:seed=0", "downsample": 8}
    return CytoSynPipeline(config, state, device="cpu", dtype="fp32")


class GaussianPipeline:
    """Exact velocities of class-conditional Gaussian data: tile latents ``x ~ N(μ_c, s²·I)`` and the
    condition embedding is ``μ_c`` itself (flattened); the null condition is ``μ = 0``. The optimal
    velocity ``E[ε − x | x_t]`` is known in closed form, so a condition closer to the tile's class mean
    gives a lower denoising error."""

    def __init__(
        self,
        shape: tuple[int, int, int] = (2, 4, 4),
        s: float = 0.5,
        labels: dict[str, np.ndarray] | None = None,
    ):
        self.latent_shape = shape
        # a label-conditioned model (the pipeline API of class-conditional fine-tunes): integer ``cond``
        # holds label indices into ``label_names``; each label's condition is its class mean
        self.label_names = list(labels) if labels else None
        self._label_means = (
            torch.tensor(np.stack(list(labels.values())), dtype=torch.float32) if labels else None
        )
        self.cond_dim = int(np.prod(shape))
        self.s = s
        self.device = torch.device("cpu")
        self.has_null_condition = True
        self.conditioning_encoder = "gaussian-mean"
        self.calls = 0

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, uncond: torch.Tensor
    ) -> torch.Tensor:
        self.calls += x_t.shape[0]
        b = x_t.shape[0]
        if cond is not None and not cond.is_floating_point():
            assert self._label_means is not None, "integer conditions given to a model without labels"
            cond = self._label_means[cond].reshape(b, -1)
        mu = torch.zeros_like(x_t) if cond is None else cond.view(b, *self.latent_shape).clone()
        mu[uncond.bool()] = 0.0
        tt = t.view(-1, 1, 1, 1).double()
        s2 = self.s**2
        var = (1 - tt) ** 2 * s2 + tt**2
        r = x_t.double() - (1 - tt) * mu.double()
        ex = mu.double() + (1 - tt) * s2 / var * r
        ee = tt / var * r
        return (ee - ex).float()


def gaussian_tiles(
    means: np.ndarray, per_class: int, s: float, seed: int = 0
) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c, mu in enumerate(means):
        xs.append(mu[None] + s * rng.standard_normal((per_class, *mu.shape)))
        ys += [c] * per_class
    return np.concatenate(xs).astype(np.float32), ys


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _png(rng: np.random.Generator, px: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_featurized_split(
    folder: Path,
    n: int,
    labels: list[str | None],
    cond_dim: int = 16,
    shape: tuple[int, int, int] = (4, 8, 8),
    per_shard: int = 6,
    seed: int = 0,
    split: str = "test",
    image_px: int = 64,
) -> Path:
    """A split of ``n`` tiles with ``vae.npy`` moments, ``test-encoder.npy`` embeddings, PNG images and
    tile JSON (slide, patient, ``label`` when given); class-dependent embeddings and latents."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(folder, lambda i: f"{split}-{i:06d}.tar", max_samples=per_shard)
    centres = {
        lab: rng.standard_normal(cond_dim) for lab in sorted({str(x) for x in labels if x is not None})
    }
    for i in range(n):
        lab = labels[i % len(labels)]
        emb = (centres.get(str(lab), np.zeros(cond_dim)) + 0.3 * rng.standard_normal(cond_dim)).astype(
            np.float16
        )
        mean = rng.standard_normal(shape) * 2 + 0.1
        moments = np.stack([mean, np.full(shape, -4.0)]).astype(np.float16)
        meta: dict[str, Any] = {
            "slide_id": f"slide{i % 3}",
            "patient_id": f"p{i % 3}",
            "mpp": 0.5,
            "tile_px": image_px,
        }
        if lab is not None:
            meta["label"] = lab
        writer.write(
            {
                "__key__": f"slide{i % 3}__t{i:04d}",
                "png": _png(rng, image_px),
                "json": json.dumps(meta).encode(),
                f"{ENCODER}.npy": _npy(emb),
                "vae.npy": _npy(moments),
            }
        )
    shards = writer.close()
    counts: dict[str, int] = {}
    for i in range(n):
        lab = labels[i % len(labels)]
        if lab is not None:
            counts[lab] = counts.get(lab, 0) + 1
    write_manifest(
        SplitManifest(
            split=split, image_member="png", samples=n, shards=[s.as_dict() for s in shards],
            patients=["p0", "p1", "p2"], slides=["slide0", "slide1", "slide2"], stats={"tiles_per_label": counts},
            features=[
                FeatureEntry(member=f"{ENCODER}.npy", kind="embedding", model_id=ENCODER, details={"shape": [cond_dim]}),
                FeatureEntry(member="vae.npy", kind="vae", model_id="test-vae", details={"shape": [2, *shape]}),
            ],
        ),
        folder,
    )  # fmt: skip
    return folder
