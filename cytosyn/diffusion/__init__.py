"""Flow-matching diffusion on latents: the linear interpolant, its velocity target, time sampling, the
training loss and latent normalisation.

One time convention everywhere (DESIGN.md): ``x_t = (1 − t)·x + t·ε`` with ``t ∈ [0, 1]``, ``t = 1`` is
pure noise, and the model predicts the velocity ``v = ε − x``.
"""

from cytosyn.diffusion.flow import (
    BatchNormLatentNorm,
    FixedLatentNorm,
    LatentNorm,
    carry_latent_statistics,
    data_from_velocity,
    expand_time,
    flow_matching_loss,
    interpolate,
    noise_from_velocity,
    sample_time,
    velocity_target,
)

__all__ = [
    "BatchNormLatentNorm",
    "FixedLatentNorm",
    "LatentNorm",
    "carry_latent_statistics",
    "data_from_velocity",
    "expand_time",
    "flow_matching_loss",
    "interpolate",
    "noise_from_velocity",
    "sample_time",
    "velocity_target",
]
