"""REPA: representation alignment of the denoiser's hidden tokens with a frozen encoder's patch tokens.

The tokens after SiT block ``repa_depth`` (8 by default) go through :class:`REPAProjector`, an MLP
``hidden → 2048 → 2048 → encoder_dim`` with SiLU between the layers (REPA's shape, and the same parameter
layout: a ``Sequential`` whose Linear layers sit at indices 0, 2 and 4), and :func:`repa_loss` pulls them
towards the encoder's patch tokens by negative cosine similarity.

Token grids: SiT at 224 px with f8 latents and patch 2 has 14×14 tokens, a ViT/14 encoder at 224 px has
16×16. :func:`align_tokens` resizes the encoder's token map to the SiT grid (see its docstring for why
exact area weighting is the default).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AlignMode = Literal["area", "bilinear", "adaptive_avg"]


class REPAProjector(nn.Sequential):
    """``Linear(hidden, proj) → SiLU → Linear(proj, proj) → SiLU → Linear(proj, out)`` applied per token.

    Parameter names match REPA's projector (``0.weight``, ``2.weight``, ``4.weight`` and biases), so in a
    SiT the keys are ``projectors.0.{0,2,4}.{weight,bias}``.
    """

    def __init__(self, hidden_size: int, out_dim: int, projector_dim: int = 2048):
        super().__init__(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, out_dim),
        )

    @staticmethod
    def num_parameters(hidden_size: int, out_dim: int, projector_dim: int = 2048) -> int:
        return (
            hidden_size * projector_dim
            + projector_dim
            + projector_dim * projector_dim
            + projector_dim
            + projector_dim * out_dim
            + out_dim
        )


def repa_loss(
    projected: Tensor, target_tokens: Tensor, reduction: Literal["mean", "none"] = "mean"
) -> Tensor:
    """Negative cosine similarity between projected SiT tokens and encoder tokens, both ``(B, T, D)``.

    ``mean`` (default): the mean over tokens and batch of ``−cos(projected, target)`` (a scalar in [−1, 1]);
    ``none``: one value per sample (mean over its tokens), shape ``(B,)``. The normalisation and the dot
    product run in float32 with autocast disabled, whatever the input dtype: REPA reported fp16 NaNs after
    70–160k steps otherwise. Gradients flow into ``projected``; ``target_tokens`` should come from a frozen
    encoder under ``no_grad``.
    """
    if projected.shape != target_tokens.shape:
        raise ValueError(
            f"projected tokens {tuple(projected.shape)} and target tokens {tuple(target_tokens.shape)} differ; "
            "align the encoder grid first (align_tokens)"
        )
    with torch.autocast(device_type=projected.device.type, enabled=False):
        p = F.normalize(projected.float(), dim=-1)
        q = F.normalize(target_tokens.float(), dim=-1)
        per_token = -(p * q).sum(dim=-1)  # (B, T)
        if reduction == "none":
            return per_token.mean(dim=-1)
        if reduction == "mean":
            return per_token.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


def _as_grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    h, w = grid
    return int(h), int(w)


def area_weights(n_in: int, n_out: int, device=None, dtype=torch.float32) -> Tensor:
    """``(n_out, n_in)`` matrix of exact overlap weights between two tilings of the same interval.

    Input cell ``j`` covers ``[j/n_in, (j+1)/n_in)`` and output cell ``i`` covers ``[i/n_out, (i+1)/n_out)``;
    ``W[i, j]`` is the length of their intersection divided by the output cell's length, so every row sums to
    1 and an output value is the exact average of the piecewise-constant input over its cell.
    """
    # Work in units of 1/(n_in·n_out) so every boundary is an integer: exact.
    i = torch.arange(n_out, dtype=torch.float64)
    j = torch.arange(n_in, dtype=torch.float64)
    out_lo, out_hi = (i * n_in)[:, None], ((i + 1) * n_in)[:, None]
    in_lo, in_hi = (j * n_out)[None, :], ((j + 1) * n_out)[None, :]
    overlap = (torch.minimum(out_hi, in_hi) - torch.maximum(out_lo, in_lo)).clamp_min(0)
    return (overlap / n_in).to(device=device, dtype=dtype)


def align_tokens(
    target_tokens: Tensor,
    grid: int | tuple[int, int],
    source_grid: int | tuple[int, int] | None = None,
    mode: AlignMode = "area",
) -> Tensor:
    """Resize an encoder's patch-token map ``(B, Hs·Ws, D)`` to the SiT token grid, giving ``(B, H·W, D)``.

    Tokens are in row-major order (as ViTs and SiT both flatten them); prefix tokens (CLS, registers) must
    be removed first. ``source_grid`` defaults to the square root of the token count.

    Modes:

    - ``area`` (default): each SiT token is the exact area-weighted mean of the encoder tokens whose image
      regions overlap its own. Both grids tile the same 224 px field of view (SiT token = 16 px, ViT/14
      token = 14 px), so this is the linear map that treats every token as the feature of its square of
      pixels: it preserves the mean of the map, keeps a feature boundary that falls on a shared pixel
      boundary sharp (e.g. at 112 px), never extrapolates, and is separable (two small matrix products,
      cheap and deterministic on every device). It also works for upsampling (piecewise constant).
    - ``bilinear``: ``F.interpolate(..., mode="bilinear", antialias=True, align_corners=False)``, a
      triangle filter widened by the scale factor; similar for 16→14 but blurs one extra token's worth.
    - ``adaptive_avg``: ``F.adaptive_avg_pool2d``; unweighted means over overlapping integer windows (for
      16→14 mostly 2×2 windows), so tokens that barely overlap count as much as those fully inside.

    The computation runs in float32 and returns the input dtype.
    """
    if target_tokens.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, T, D), got {tuple(target_tokens.shape)}")
    b, n, d = target_tokens.shape
    h_out, w_out = _as_grid(grid)
    if source_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{n} tokens do not form a square grid; pass source_grid (drop CLS/register tokens)"
            )
        h_in, w_in = side, side
    else:
        h_in, w_in = _as_grid(source_grid)
        if h_in * w_in != n:
            raise ValueError(f"source grid {h_in}×{w_in} does not match {n} tokens")
    if (h_in, w_in) == (h_out, w_out):
        return target_tokens
    dtype = target_tokens.dtype
    with torch.autocast(device_type=target_tokens.device.type, enabled=False):
        x = target_tokens.float().reshape(b, h_in, w_in, d)
        if mode == "area":
            wh = area_weights(h_in, h_out, device=x.device)
            ww = area_weights(w_in, w_out, device=x.device)
            y = torch.einsum("ih,bhwd->biwd", wh, x)
            y = torch.einsum("jw,biwd->bijd", ww, y)
            return y.reshape(b, h_out * w_out, d).to(dtype)
        x = x.permute(0, 3, 1, 2)
        if mode == "bilinear":
            y = F.interpolate(x, size=(h_out, w_out), mode="bilinear", align_corners=False, antialias=True)
        elif mode == "adaptive_avg":
            y = F.adaptive_avg_pool2d(x, (h_out, w_out))
        else:
            raise ValueError(f"unknown alignment mode {mode!r}")
        return y.permute(0, 2, 3, 1).reshape(b, h_out * w_out, d).to(dtype)
