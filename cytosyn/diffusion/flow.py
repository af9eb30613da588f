"""Linear flow matching in the project's one time convention, plus latent normalisation.

Convention (DESIGN.md, "Conventions"): for clean data ``x`` and Gaussian noise ``ε``

    x_t = (1 − t)·x + t·ε,      t ∈ [0, 1],  t = 1 is pure noise,
    v   = dx_t/dt = ε − x       (the model's regression target; it does not depend on t).

This is the REPA / REPA-E "linear" path (their ``alpha_t = 1 − t``, ``sigma_t = t``), so their checkpoints
use the same time direction and target. The original SiT code runs time the other way (``t = 1`` is data,
velocity ``x − ε``): see :func:`cytosyn.models.sit.load_sit_state_dict`.

Given a velocity prediction at ``(x_t, t)`` the two endpoints follow in closed form
(:func:`data_from_velocity`, :func:`noise_from_velocity`): ``x = x_t − t·v`` and ``ε = x_t + (1 − t)·v``.

Latent normalisation: the denoiser sees normalised latents ``z = (latent − shift) / scale`` with per-channel
statistics. :class:`FixedLatentNorm` takes them from a manifest; :class:`BatchNormLatentNorm` estimates them
with an affine-free ``BatchNorm2d`` as REPA-E does (batch statistics in training, running statistics in
eval and for :meth:`~BatchNormLatentNorm.denormalize`). Both keep their statistics as buffers, so they are
saved in checkpoints and handled by :class:`cytosyn.training.ema.EMA`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

TimeMode = Literal["uniform", "logit_normal"]


def expand_time(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a per-sample time ``(B,)`` (or a scalar) against a batch ``like`` of shape ``(B, ...)``."""
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"time must be a scalar or of shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """The point on the linear path: ``x_t = (1 − t)·x0 + t·noise`` (``t`` per sample or scalar)."""
    if x0.shape != noise.shape:
        raise ValueError(f"data {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    tt = expand_time(t, x0)
    return (1 - tt) * x0 + tt * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target ``v = noise − x0`` (the time derivative of :func:`interpolate`)."""
    return noise - x0


def data_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """The clean end of the path implied by a velocity: ``x0 = x_t − t·v``."""
    return x_t - expand_time(t, x_t) * v


def noise_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """The noise end of the path implied by a velocity: ``ε = x_t + (1 − t)·v``."""
    return x_t + (1 - expand_time(t, x_t)) * v


def sample_time(
    n: int,
    mode: TimeMode = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``n`` training times in [0, 1].

    ``uniform``: ``t ~ U[0, 1)`` (REPA's default). ``logit_normal``: ``t = sigmoid(u)``, ``u ~ N(mean, std²)``
    (SD3's sampling; ``mean > 0`` puts more weight near the noise end, t = 1). Draws in float32 from
    ``generator`` (or torch's global RNG) on ``device`` (default: the generator's device, else CPU), then
    casts to ``dtype``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    if mode == "uniform":
        t = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    elif mode == "logit_normal":
        if std <= 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        u = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        t = torch.sigmoid(u * std + mean)
    else:
        raise ValueError(f"unknown time sampling mode {mode!r} (expected 'uniform' or 'logit_normal')")
    return t.to(dtype)


def flow_matching_loss(
    model_out: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Velocity-regression MSE, computed in float32.

    Returns ``(loss, per_sample)``: ``per_sample[i]`` is the mean over every non-batch dimension of
    ``(model_out − (noise − x0))²``, and ``loss`` is the mean of ``per_sample`` (times ``weight`` when
    given, a per-sample weight of shape ``(B,)``). The target of the linear path does not depend on ``t``;
    ``t`` is accepted (and shape-checked) so that time-dependent weightings can be passed in by callers
    without changing the signature.
    """
    if model_out.shape != x0.shape or noise.shape != x0.shape:
        raise ValueError(
            f"shapes differ: model_out {tuple(model_out.shape)}, x0 {tuple(x0.shape)}, noise {tuple(noise.shape)}"
        )
    batch = x0.shape[0]
    if t is not None and tuple(t.shape) not in ((batch,), ()):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    target = velocity_target(x0.float(), noise.float())
    per_sample = (model_out.float() - target).square().reshape(batch, -1).mean(dim=1)
    if weight is not None:
        if tuple(weight.shape) != (batch,):
            raise ValueError(f"weight must have shape ({batch},), got {tuple(weight.shape)}")
        return (per_sample * weight.float()).mean(), per_sample
    return per_sample.mean(), per_sample


class LatentNorm(nn.Module):
    """Interface: ``normalize`` maps VAE latents to the denoiser's space, ``denormalize`` maps back."""

    def normalize(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def denormalize(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x)

    @staticmethod
    def _per_channel(stat: Tensor, like: Tensor) -> Tensor:
        # (C,) -> (1, C, 1, ..., 1) for a (B, C, ...) latent
        return stat.to(dtype=like.dtype).reshape(1, -1, *([1] * (like.ndim - 2)))


class FixedLatentNorm(LatentNorm):
    """Per-channel ``z = (x − mean) / std`` with fixed statistics (e.g. from the features manifest).

    ``mean``/``std`` are sequences of one value per latent channel (or a single value for every channel,
    e.g. SD-VAE's classic ``mean=0, std=1/0.18215``). They are persistent buffers, saved with the model.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float] | Tensor | float, std: Sequence[float] | Tensor | float):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
            raise ValueError(f"mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if not bool(torch.all(std_t > 0)) or not bool(torch.all(torch.isfinite(std_t))):
            raise ValueError("every std must be finite and > 0")
        if not bool(torch.all(torch.isfinite(mean_t))):
            raise ValueError("every mean must be finite")
        n = max(mean_t.numel(), std_t.numel())
        self.register_buffer("mean", mean_t.expand(n).clone())
        self.register_buffer("std", std_t.expand(n).clone())

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self._per_channel(self.mean, x)) / self._per_channel(self.std, x)

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self._per_channel(self.std, z) + self._per_channel(self.mean, z)

    def extra_repr(self) -> str:
        return f"channels={self.mean.numel()}"


class BatchNormLatentNorm(LatentNorm):
    """Latent normalisation by an affine-free ``BatchNorm2d`` (REPA-E: eps 1e-4, momentum 0.1).

    - ``train()`` mode: :meth:`normalize` uses the batch's own mean and (biased) variance and updates the
      running statistics (``running = (1 − momentum)·running + momentum·batch``, with the *unbiased*
      batch variance, as ``BatchNorm2d`` does).
    - ``eval()`` mode: :meth:`normalize` uses the running statistics as a fixed shift/scale.
    - :meth:`denormalize` always uses the running statistics: ``x = z·sqrt(running_var + eps) + running_mean``.

    The running statistics are buffers of the inner ``bn`` module, so they are checkpointed and are seen by
    the EMA (see :class:`cytosyn.training.ema.EMA` for whether buffers are copied or averaged). Under DDP each
    rank normalises with its own batch statistics unless the module is converted with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (which works on this module, since ``bn`` is a real
    ``BatchNorm2d``). Computation is in float32 whatever the input dtype; the output has the input's dtype.
    """

    def __init__(self, channels: int, eps: float = 1e-4, momentum: float | None = 0.1):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels must be > 0, got {channels}")
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, affine=False, track_running_stats=True)

    @property
    def channels(self) -> int:
        return self.bn.num_features

    @property
    def running_mean(self) -> Tensor:
        return self.bn.running_mean  # type: ignore[return-value]

    @property
    def running_var(self) -> Tensor:
        return self.bn.running_var  # type: ignore[return-value]

    def normalize(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected latents of shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.bn(x.float()).to(x.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.channels:
            raise ValueError(f"expected latents of shape (B, {self.channels}, H, W), got {tuple(z.shape)}")
        scale = torch.sqrt(self.running_var.float() + self.bn.eps)
        out = z.float() * self._per_channel(scale, z.float()) + self._per_channel(
            self.running_mean, z.float()
        )
        return out.to(z.dtype)

    def shift_scale(self) -> tuple[Tensor, Tensor]:
        """The current fixed ``(shift, scale)`` per channel: what eval-mode :meth:`normalize` divides by."""
        return self.running_mean.clone(), torch.sqrt(self.running_var + self.bn.eps)

    def to_fixed(self) -> FixedLatentNorm:
        """A :class:`FixedLatentNorm` with the current running statistics (e.g. for a release folder)."""
        shift, scale = self.shift_scale()
        return FixedLatentNorm(shift.cpu(), scale.cpu())

    def extra_repr(self) -> str:
        return f"channels={self.channels}, eps={self.bn.eps}, momentum={self.bn.momentum}"


def carry_latent_statistics(
    norm: LatentNorm, stats: dict[str, Tensor], eps: float = 1e-4, where: str = "checkpoint"
) -> str:
    """Put a REPA-E checkpoint's latent BatchNorm statistics (``running_mean``, ``running_var``, optionally
    ``num_batches_tracked``) into ``norm``, so a fine-tune starts with the latent scaling its weights were
    trained with. Returns a one-line description of what was done (for the log and the run's record).

    - :class:`BatchNormLatentNorm`: the running statistics are copied (training then updates them with
      the usual momentum); ``eps`` must equal the norm's own (else eval-mode scales would differ).
    - :class:`FixedLatentNorm`: ``mean = running_mean``, ``std = sqrt(running_var + eps)`` — exactly the
      shift and scale REPA-E's eval-mode BatchNorm applies (``eps`` = REPA-E's 1e-4).
    """
    if "running_mean" not in stats or "running_var" not in stats:
        raise ValueError(f"{where}: latent statistics need running_mean and running_var, got {sorted(stats)}")
    mean = stats["running_mean"].detach().float().reshape(-1)
    var = stats["running_var"].detach().float().reshape(-1)
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all()) and bool((var >= 0).all())):
        raise ValueError(f"{where}: latent statistics are not finite (or a variance is negative)")
    if isinstance(norm, BatchNormLatentNorm):
        if mean.numel() != norm.channels:
            raise ValueError(
                f"{where}: latent statistics for {mean.numel()} channels, the latent norm has {norm.channels}"
            )
        if abs(norm.bn.eps - eps) > 1e-12:
            raise ValueError(
                f"{where}: statistics made with BatchNorm eps {eps}, the latent norm uses {norm.bn.eps}"
            )
        with torch.no_grad():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            if "num_batches_tracked" in stats and norm.bn.num_batches_tracked is not None:
                norm.bn.num_batches_tracked.copy_(stats["num_batches_tracked"].reshape(()))
        return f"batchnorm running statistics of {mean.numel()} channels carried from {where}"
    if isinstance(norm, FixedLatentNorm):
        if mean.numel() != norm.mean.numel():
            raise ValueError(
                f"{where}: latent statistics for {mean.numel()} channels, the latent norm has {norm.mean.numel()}"
            )
        with torch.no_grad():
            norm.mean.copy_(mean)
            norm.std.copy_(torch.sqrt(var + eps))
        return f"fixed latent statistics (mean, sqrt(var + {eps})) of {mean.numel()} channels carried from {where}"
    raise TypeError(f"cannot carry latent statistics into {type(norm).__name__}")


def logit_normal_cdf(t: Tensor | float, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """CDF of the logit-normal distribution of :func:`sample_time` (used by tests and diagnostics)."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    z = (torch.log(t) - torch.log1p(-t) - mean) / (std * math.sqrt(2.0))
    return 0.5 * (1 + torch.erf(z))
