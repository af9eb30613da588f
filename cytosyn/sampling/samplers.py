"""Samplers over a velocity model: Euler and Heun ODE, Euler–Maruyama SDE, classifier-free guidance.

Convention (DESIGN.md): ``x_t = (1 − t)·x + t·ε`` with ``t ∈ [0, 1]`` (t = 1 is pure noise) and the
model predicts the velocity ``v = ε − x``. Its optimum is ``u(x_t, t) = E[ε − x | x_t]``, and the
probability-flow ODE ``dx_t/dt = u(x_t, t)`` carries the noise distribution at t = 1 to the data
distribution at t = 0. Every sampler integrates t from 1 down to 0.

The sampler never sees the network: it calls a *velocity function*
``velocity_fn(x_t, t, cond, uncond_mask) -> v`` (see :class:`VelocityFn`) where ``t`` is a ``(B,)``
tensor and ``uncond_mask`` a ``(B,)`` bool tensor that is True for the rows that must use the null
(unconditional) condition. Classifier-free guidance doubles the batch in one call: the first half with
``uncond_mask = False``, the second half with the same ``cond`` and ``uncond_mask = True``.

Score from velocity (used by the SDE)
-------------------------------------
Write ``ε̂ = E[ε | x_t]`` and ``x̂ = E[x | x_t]``. Taking the conditional expectation of the path gives
``x_t = (1 − t)·x̂ + t·ε̂``, and of the target ``u = ε̂ − x̂``. Eliminate ``x̂ = (x_t − t·ε̂)/(1 − t)``::

    u = ε̂ − (x_t − t·ε̂)/(1 − t) = (ε̂ − x_t)/(1 − t)      ⇒      ε̂ = x_t + (1 − t)·u.

Given x, ``x_t ~ N((1 − t)·x, t²·I)``, so Tweedie's formula gives the score of the marginal
``∇ log p_t(x_t) = −E[ε | x_t]/t``. Hence::

    score(x_t, t) = −(x_t + (1 − t)·u(x_t, t)) / t.

Reverse-time SDE
----------------
For any diffusion ``w(t) = g(t)² ≥ 0`` the forward-time SDE ``dx = [u + ½·w·score] dt + g dW`` has the
same marginals p_t as the ODE (its Fokker–Planck equation reduces to the continuity equation of u), and
its time reversal, run from t = 1 down to 0, is::

    dx = [u − ½·w(t)·score] dt + g(t) dW̄          (dt < 0)

With REPA's choice ``w(t) = 2t`` the 1/t of the score cancels and the drift is regular down to t = 0::

    drift(x_t, t) = u − t·score = u + x_t + (1 − t)·u = x_t + (2 − t)·u.

Euler–Maruyama on the grid ``t_0 = 1 > t_1 > … > t_n`` with ``h_k = t_{k+1} − t_k < 0``::

    x_{k+1} = x_k + drift(x_k, t_k)·h_k + sqrt(w(t_k)·|h_k|)·z_k,      z_k ~ N(0, I)

and the last step (into t = 0) is the *mean* step, the same update without the noise term. With the
REPA grid (``linspace(1, t_end, steps)`` then 0) that is ``steps − 1`` stochastic steps and one mean
step from ``t_end`` (0.04) to 0: ``steps`` model evaluations in all.

Classifier-free guidance
------------------------
``v = v_u + s·(v_c − v_u)``, on every latent channel, only at the evaluations whose time lies in
``[low, high]`` (closed interval). Outside the interval, and whenever ``s == 1`` (where the formula is
the conditional velocity), the unconditional branch is not evaluated at all. Unconditional sampling
(``cond=None``) calls the model with ``uncond_mask`` all True (the null condition) and never guides.

Time stepping is done in float64: the grid and the step sizes are float64, and the state is carried in
float64; the model receives ``x_t`` and ``t`` cast to the noise's dtype, and its output is cast back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import Field, field_validator, model_validator

from cytosyn.config import StrictModel

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

Method = Literal["euler", "heun", "euler_maruyama"]

# Default end of the fine grid per method: REPA's SDE stops its stochastic steps at t = 0.04 and takes
# one mean step to 0; the ODE solvers integrate all the way to 0.
DEFAULT_T_END: dict[str, float] = {"euler": 0.0, "heun": 0.0, "euler_maruyama": 0.04}


class VelocityFn(Protocol):
    """A velocity model as the samplers see it.

    ``x_t``: (B, ...) noisy input; ``t``: (B,) times in [0, 1] (same dtype and device as ``x_t``);
    ``cond``: the condition batch (e.g. (B, 768) embeddings) or None; ``uncond_mask``: (B,) bool, True
    where the model must use its null condition instead of ``cond``. Returns v = ε − x, shaped as ``x_t``.
    """

    def __call__(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, uncond_mask: torch.Tensor
    ) -> torch.Tensor: ...


class SamplerConfig(StrictModel):
    """How to integrate from noise (t = 1) to data (t = 0). See docs/sampling.md.

    ``steps`` is the number of integration intervals from 1 to 0, including the final step into 0:
    Euler and Euler–Maruyama evaluate the model ``steps`` times, Heun ``2·steps`` times (times two
    batch rows where guidance is on).
    """

    method: Method = "euler_maruyama"
    steps: int = Field(default=250, ge=1)
    time_grid: Literal["uniform", "shifted"] = "uniform"
    # Shifted grid t = shift·u / (1 + (shift − 1)·u) over a uniform u: shift > 1 puts more steps near
    # t = 1 (noise), shift < 1 near t = 0 (data); shift = 1 is the uniform grid.
    shift: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    # End of the fine grid; the last step goes from t_end to 0. Left out (or null), it defaults by method:
    # 0.04 for euler_maruyama (REPA), 0 for the ODE solvers.
    t_end: float = Field(default=0.04, ge=0.0, lt=1.0)
    # v = v_u + s·(v_c − v_u): 1 = the conditional model (no guidance), 0 = the unconditional model
    guidance_scale: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guide only where low <= t <= high
    sde_diffusion: Literal["2t"] = "2t"  # w(t) = g(t)² = 2t, REPA's choice

    @model_validator(mode="before")
    @classmethod
    def _default_t_end(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("t_end") is None:
            method = data.get("method", "euler_maruyama")
            data = {**data, "t_end": DEFAULT_T_END.get(method, 0.0)}
        return data

    @field_validator("guidance_interval")
    @classmethod
    def _check_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (0.0 <= low <= 1.0 and 0.0 <= high <= 1.0):
            raise ValueError(f"guidance interval {value} must lie within [0, 1]")
        if low > high:
            raise ValueError(f"guidance interval {value}: low must be <= high")
        return value

    @model_validator(mode="after")
    def _check_steps(self) -> SamplerConfig:
        if self.t_end > 0.0 and self.steps < 2:
            raise ValueError(
                f"steps must be >= 2 when t_end > 0 (one step down to t_end={self.t_end}, then the final "
                f"step to 0), got steps={self.steps}"
            )
        return self

    @property
    def evals_per_step(self) -> int:
        return 2 if self.method == "heun" else 1


@dataclass
class SamplerStats:
    """What a :func:`sample` call cost.

    ``nfe``: calls to the velocity function (network forward passes); ``guided_nfe``: how many of those
    calls carried the doubled CFG batch (so ``nfe + guided_nfe`` is the cost in single-batch passes);
    ``times``: the float64 time of every call, in order.
    """

    nfe: int = 0
    guided_nfe: int = 0
    times: list[float] = field(default_factory=list)

    @property
    def batch_passes(self) -> int:
        return self.nfe + self.guided_nfe


# ----------------------------------------------------------------------------------------------- presets


def cytosyn_default(guidance_scale: float = 2.5) -> SamplerConfig:
    """CytoSyn's conditional default: 250 Euler–Maruyama steps (REPA grid to 0.04 + mean step),
    CFG 2.5 on t ∈ [0, 0.75]."""
    return SamplerConfig(
        method="euler_maruyama",
        steps=250,
        t_end=0.04,
        guidance_scale=guidance_scale,
        guidance_interval=(0.0, 0.75),
    )


def unconditional_default() -> SamplerConfig:
    """CytoSyn's unconditional default: the same SDE, guidance 1.0 (pass ``cond=None``)."""
    return cytosyn_default(guidance_scale=1.0)


def fast_heun_30(guidance_scale: float = 2.5) -> SamplerConfig:
    """Heun ODE, 30 uniform steps to t = 0 (60 model evaluations), CFG on t ∈ [0, 0.75]."""
    return SamplerConfig(
        method="heun", steps=30, t_end=0.0, guidance_scale=guidance_scale, guidance_interval=(0.0, 0.75)
    )


def fast_euler_50(guidance_scale: float = 2.5) -> SamplerConfig:
    """Euler ODE, 50 uniform steps to t = 0 (50 model evaluations), CFG on t ∈ [0, 0.75]."""
    return SamplerConfig(
        method="euler", steps=50, t_end=0.0, guidance_scale=guidance_scale, guidance_interval=(0.0, 0.75)
    )


SAMPLER_PRESETS: dict[str, Callable[..., SamplerConfig]] = {
    "cytosyn_default": cytosyn_default,
    "unconditional_default": unconditional_default,
    "fast_heun_30": fast_heun_30,
    "fast_euler_50": fast_euler_50,
}


def sampler_preset(name: str, **overrides: Any) -> SamplerConfig:
    """A named preset with some fields replaced (validated): ``sampler_preset("fast_heun_30", steps=20)``."""
    if name not in SAMPLER_PRESETS:
        raise ValueError(f"unknown sampler preset {name!r}; known: {sorted(SAMPLER_PRESETS)}")
    base = SAMPLER_PRESETS[name]()
    return SamplerConfig.model_validate({**base.model_dump(), **overrides})


# ------------------------------------------------------------------------------------------------ math


def shift_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The shifted time ``shift·u / (1 + (shift − 1)·u)``: a monotone map of [0, 1] onto itself."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def _unshift_time(t: float, shift: float) -> float:
    return t / (shift - (shift - 1.0) * t)


def time_grid(cfg: SamplerConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The float64 times ``1 = t_0 > t_1 > … > t_steps = 0`` the sampler steps through.

    With ``t_end = 0``: ``steps + 1`` points from 1 to 0. With ``t_end > 0``: ``steps`` points from 1 to
    ``t_end`` (REPA's ``linspace(1, t_end, steps)``), then 0. A shifted grid applies :func:`shift_time`
    to a uniform grid whose end is chosen so the shifted grid still ends exactly at ``t_end``.
    """
    n_fine = cfg.steps + 1 if cfg.t_end == 0.0 else cfg.steps
    if cfg.time_grid == "uniform" or cfg.shift == 1.0:
        fine = torch.linspace(1.0, cfg.t_end, n_fine, dtype=torch.float64)
    else:
        u = torch.linspace(1.0, _unshift_time(cfg.t_end, cfg.shift), n_fine, dtype=torch.float64)
        fine = shift_time(u, cfg.shift)
        fine[0], fine[-1] = 1.0, cfg.t_end  # exact endpoints despite rounding
    grid = fine if cfg.t_end == 0.0 else torch.cat([fine, torch.zeros(1, dtype=torch.float64)])
    return grid.to(device) if device is not None else grid


def score_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """``∇ log p_t(x_t) = −(x_t + (1 − t)·v)/t`` for the linear path (t > 0; see the module docstring)."""
    if t <= 0.0:
        raise ValueError("the score is undefined at t = 0 in this parametrisation")
    return -(x_t + (1.0 - t) * v) / t


def sde_drift(x_t: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """Reverse-SDE drift ``v − ½·w(t)·score`` for ``w(t) = 2t``, which simplifies to ``x_t + (2 − t)·v``."""
    return x_t + (2.0 - t) * v


def _diffusion(t: float) -> float:
    """w(t) = g(t)² of the "2t" diffusion."""
    return 2.0 * t


# --------------------------------------------------------------------------------------------- sampling


class _Guided:
    """Evaluates the (optionally guided) velocity at one time and counts the calls."""

    def __init__(
        self,
        velocity_fn: VelocityFn,
        cond: torch.Tensor | None,
        cfg: SamplerConfig,
        model_dtype: torch.dtype,
        batch: int,
        device: torch.device,
        stats: SamplerStats,
    ) -> None:
        self.fn = velocity_fn
        self.cond = cond
        self.model_dtype = model_dtype
        self.stats = stats
        self.scale = cfg.guidance_scale
        self.low, self.high = cfg.guidance_interval
        self.guide_ever = cond is not None and cfg.guidance_scale != 1.0
        self.mask_single = torch.full((batch,), cond is None, dtype=torch.bool, device=device)
        if self.guide_ever:
            self.mask_double = torch.cat([self.mask_single, ~self.mask_single])
            self.cond_double = torch.cat([cond, cond])

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        b = x.shape[0]
        x_in = x.to(self.model_dtype)
        guide = self.guide_ever and self.low <= t <= self.high
        self.stats.nfe += 1
        self.stats.times.append(t)
        if not guide:
            t_in = torch.full((b,), t, dtype=torch.float64, device=x.device).to(self.model_dtype)
            return self.fn(x_in, t_in, self.cond, self.mask_single).to(torch.float64)
        self.stats.guided_nfe += 1
        t_in = torch.full((2 * b,), t, dtype=torch.float64, device=x.device).to(self.model_dtype)
        out = self.fn(torch.cat([x_in, x_in]), t_in, self.cond_double, self.mask_double).to(torch.float64)
        v_c, v_u = out[:b], out[b:]
        return v_u + self.scale * (v_c - v_u)


@torch.no_grad()
def _randn(
    shape: torch.Size, generator: torch.Generator | Sequence[torch.Generator] | None, device
) -> torch.Tensor:
    """float64 standard normal noise; with one generator per batch row, row ``i`` comes from generator ``i``
    (drawn on that generator's device), so an image's trajectory does not depend on its batch-mates."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(shape[1:], generator=g, dtype=torch.float64, device=g.device) for g in generator]
        return torch.stack(rows).to(device)
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=device)


def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: torch.Tensor | None,
    cfg: SamplerConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    *,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SamplerStats]:
    """Integrate from ``noise`` (the sample at t = 1) to t = 0 and return x_0 in the noise's dtype.

    ``cond``: the condition batch (first dimension B) or None for unconditional sampling (null condition,
    no guidance whatever ``cfg.guidance_scale`` says). ``generator`` drives the SDE noise (it must live on
    the noise's device); the ODE solvers use no randomness. With ``return_stats`` the result is
    ``(x0, SamplerStats)``, which holds the number of function evaluations.
    """
    if noise.ndim < 1 or noise.shape[0] == 0:
        raise ValueError(f"noise must be a non-empty batch, got shape {tuple(noise.shape)}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be floating point, got {noise.dtype}")
    batch = noise.shape[0]
    if cond is not None and cond.shape[0] != batch:
        raise ValueError(f"cond has batch {cond.shape[0]} but noise has batch {batch}")
    stats = SamplerStats()
    velocity = _Guided(velocity_fn, cond, cfg, noise.dtype, batch, noise.device, stats)
    grid = time_grid(cfg).tolist()  # python floats are float64
    x = noise.to(torch.float64)
    n = len(grid) - 1
    for k in range(n):
        t_cur, t_next = grid[k], grid[k + 1]
        h = t_next - t_cur  # float64, negative
        if cfg.method == "euler":
            x = x + h * velocity(x, t_cur)
        elif cfg.method == "heun":
            v_cur = velocity(x, t_cur)
            x_pred = x + h * v_cur
            v_next = velocity(x_pred, t_next)
            x = x + (0.5 * h) * (v_cur + v_next)
        else:  # euler_maruyama
            v_cur = velocity(x, t_cur)
            x_mean = x + h * sde_drift(x, v_cur, t_cur)
            if k == n - 1:  # final mean step into t = 0
                x = x_mean
            else:
                z = _randn(x.shape, generator, x.device)
                x = x_mean + ((_diffusion(t_cur) * -h) ** 0.5) * z
    out = x.to(noise.dtype)
    return (out, stats) if return_stats else out
