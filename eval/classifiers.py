"""Downstream classifiers for the augmentation study: a linear probe on frozen features, a small CNN from scratch.

Both are trained on (real + synthetic) tiles and scored on a real test set with balanced accuracy (mean
per-class recall) and macro-F1 (scikit-learn's definitions, every class of the label set counted, 0 for a
class never predicted). Both are pure functions of their inputs and ``seed`` on the CPU.

- `linear_probe`: scikit-learn's multinomial ``LogisticRegression`` (lbfgs, ``class_weight="balanced"``)
  on standardised features of a frozen extractor (e.g. the FID Inception pool features).
- `train_cnn`: a timm architecture (default ``resnet10t``) with random weights, trained with AdamW and a
  class-weighted cross-entropy (inverse class frequency: real + synthetic sets are imbalanced) on tiles
  resized to ``image_size`` (area interpolation), random flips as the only augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from cytosyn.config import StrictModel

__all__ = ["CnnSettings", "linear_probe", "scores", "train_cnn"]


class CnnSettings(StrictModel):
    arch: str = "resnet10t"  # any timm architecture name (random init)
    image_size: int = Field(default=64, ge=16)  # tiles are area-resized to this side
    epochs: int = Field(default=15, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)


def scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Balanced accuracy and macro-F1 over the classes present in ``y_true`` (recall) / all classes (F1)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=sorted(set(y_true.tolist())), average="macro", zero_division=0)
        ),
        "accuracy": float(np.mean(y_true == y_pred)),
        "num_classes": num_classes,
    }


def linear_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int, c: float = 1.0
) -> np.ndarray:
    """Predicted test labels of a standardised multinomial logistic regression with balanced class
    weights (`cytosyn.scoring.metrics.fit_linear_probe`)."""
    from cytosyn.scoring.metrics import fit_linear_probe

    model = fit_linear_probe(x_train, list(y_train), seed, c, balanced=True, max_iter=3000)
    return model.predict(x_test.astype(np.float64))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25


def train_cnn(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    num_classes: int,
    seed: int,
    settings: CnnSettings,
    progress: Any = None,
) -> np.ndarray:
    """Predicted test labels of a randomly initialised timm CNN trained on ``x_train`` (uint8 NHWC)."""
    from cytosyn.compat import import_torchvision

    import_torchvision()
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(settings.arch, pretrained=False, num_classes=num_classes)
    counts = np.bincount(y_train, minlength=num_classes).astype(np.float64)
    weights = torch.tensor(
        np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0), dtype=torch.float32
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    x = _to_tensor(x_train)
    y = torch.from_numpy(y_train.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb = x[idx]
            flips = torch.rand(len(idx), 2, generator=g) < 0.5
            xb = torch.where(flips[:, 0, None, None, None], xb.flip(3), xb)
            xb = torch.where(flips[:, 1, None, None, None], xb.flip(2), xb)
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if progress is not None:
            progress.update(1)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(_to_tensor(x_test[i : i + 256])) for i in range(0, len(x_test), 256)])
    return logits.argmax(1).numpy()


def resize_tiles(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Area (PIL BOX) resize of uint8 tiles to ``size``×``size``."""
    from PIL import Image

    return np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BOX)) for im in images]
    )
