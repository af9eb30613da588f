"""Sampling: ODE/SDE samplers over a velocity model with classifier-free guidance (see docs/sampling.md)."""

from cytosyn.sampling.samplers import (
    SAMPLER_PRESETS,
    SamplerConfig,
    SamplerStats,
    VelocityFn,
    cytosyn_default,
    fast_euler_50,
    fast_heun_30,
    sample,
    sampler_preset,
    score_from_velocity,
    sde_drift,
    shift_time,
    time_grid,
    unconditional_default,
)

__all__ = [
    "SAMPLER_PRESETS",
    "SamplerConfig",
    "SamplerStats",
    "VelocityFn",
    "cytosyn_default",
    "fast_euler_50",
    "fast_heun_30",
    "sample",
    "sampler_preset",
    "score_from_velocity",
    "sde_drift",
    "shift_time",
    "time_grid",
    "unconditional_default",
]
