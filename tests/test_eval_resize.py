"""FID resizing (issue 13): bicubic never leaves the pixel range (PIL's bicubic clamps; torch's does not)."""

from __future__ import annotations

import torch
from cytosyn.eval.inception import resize_to


def test_bicubic_antialias_stays_in_the_pixel_range():
    x = torch.zeros(1, 3, 224, 224)
    x[..., ::7, :] = 255.0  # sharp stripes: bicubic's negative lobes overshoot both ways
    x[..., 100:, 100:] = 255.0
    for size in (299, 160):
        out = resize_to(x, size, "bicubic-antialias")
        assert out.min() >= 0.0 and out.max() <= 255.0
        raw = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
        assert raw.min() < 0.0 or raw.max() > 255.0  # the test image does make bicubic overshoot
    for method in ("tf1-bilinear", "bilinear", "bilinear-antialias"):  # convex weights: only rounding
        out = resize_to(x, 299, method)
        assert out.min() >= -1e-3 and out.max() <= 255.0 + 1e-3
