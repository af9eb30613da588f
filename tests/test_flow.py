"""Flow matching: interpolant, velocity target, time sampling, loss and latent normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from cytosyn.diffusion import (
    BatchNormLatentNorm,
    FixedLatentNorm,
    data_from_velocity,
    flow_matching_loss,
    interpolate,
    noise_from_velocity,
    sample_time,
    velocity_target,
)
from cytosyn.diffusion.flow import logit_normal_cdf


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_interpolant_and_target_closed_forms():
    g = _gen()
    x0 = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    xt = interpolate(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(xt[i], (1 - ti) * x0[i] + ti * eps[i], rtol=0, atol=1e-15)
    torch.testing.assert_close(xt[0], x0[0], rtol=0, atol=0)  # t = 0 is data
    torch.testing.assert_close(xt[4], eps[4], rtol=0, atol=0)  # t = 1 is noise
    v = velocity_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    # v is the time derivative of x_t (finite difference on the linear path is exact up to rounding)
    h = 1e-3
    torch.testing.assert_close((interpolate(x0, eps, t * 0 + 0.3 + h) - interpolate(x0, eps, 0.3)) / h, v)
    # endpoints recovered from the exact velocity
    torch.testing.assert_close(data_from_velocity(xt, v, t), x0)
    torch.testing.assert_close(noise_from_velocity(xt, v, t), eps)
    with pytest.raises(ValueError):
        interpolate(x0, eps, torch.rand(3))


def test_uniform_time_covers_unit_interval():
    t = sample_time(200_000, "uniform", generator=_gen(1))
    assert t.dtype == torch.float32 and t.shape == (200_000,)
    assert float(t.min()) >= 0.0 and float(t.max()) < 1.0
    hist = torch.histc(t, bins=20, min=0.0, max=1.0)
    assert float(hist.min()) > 0.9 * 10_000 and float(hist.max()) < 1.1 * 10_000
    assert stats.kstest(t.double().numpy(), "uniform").pvalue > 1e-3
    # the generator makes it reproducible
    torch.testing.assert_close(sample_time(10, generator=_gen(3)), sample_time(10, generator=_gen(3)))


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_time_matches_distribution(mean, std):
    t = sample_time(50_000, "logit_normal", mean=mean, std=std, generator=_gen(2)).double()
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(float(logit.mean()) - mean) < 0.02
    assert abs(float(logit.std()) - std) < 0.02
    result = stats.kstest(t.numpy(), lambda x: logit_normal_cdf(torch.from_numpy(x), mean, std).numpy())
    assert result.pvalue > 1e-3
    # and it is not the uniform distribution
    assert stats.kstest(t.numpy(), "uniform").pvalue < 1e-6


def test_sample_time_rejects_unknown_mode():
    with pytest.raises(ValueError):
        sample_time(4, "cosine")  # type: ignore[arg-type]


def test_flow_matching_loss_per_sample_and_mean():
    g = _gen(4)
    x0, eps, out = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    t = torch.rand(3, generator=g)
    loss, per = flow_matching_loss(out, x0, eps, t)
    want = torch.stack([((out[i] - (eps[i] - x0[i])) ** 2).mean() for i in range(3)])
    torch.testing.assert_close(per, want)
    torch.testing.assert_close(loss, want.mean())
    # the exact target has zero loss; bf16 inputs are computed in fp32
    loss0, _ = flow_matching_loss(eps - x0, x0, eps, t)
    assert float(loss0) == 0.0
    lb, _ = flow_matching_loss(out.bfloat16(), x0.bfloat16(), eps.bfloat16(), t)
    assert lb.dtype == torch.float32
    w = torch.tensor([1.0, 0.0, 2.0])
    lw, _ = flow_matching_loss(out, x0, eps, t, weight=w)
    torch.testing.assert_close(lw, (want * w).mean())


def test_fixed_latent_norm_round_trip():
    norm = FixedLatentNorm([0.5, -1.0, 0.0, 2.0], [2.0, 0.5, 1.0, 4.0])
    x = torch.randn(2, 4, 3, 3, generator=_gen(5))
    z = norm.normalize(x)
    torch.testing.assert_close(z[:, 1], (x[:, 1] + 1.0) / 0.5)
    torch.testing.assert_close(norm.denormalize(z), x)
    assert set(norm.state_dict()) == {"mean", "std"}
    scalar = FixedLatentNorm(0.0, 1 / 0.18215)
    torch.testing.assert_close(scalar.normalize(x), x * 0.18215)
    with pytest.raises(ValueError):
        FixedLatentNorm([0.0, 0.0], [1.0, 0.0])


def test_batchnorm_latent_norm_stats_and_round_trip():
    norm = BatchNormLatentNorm(4, eps=1e-4, momentum=1.0)
    x = torch.randn(8, 4, 5, 5, generator=_gen(6)) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1) + 3.0
    norm.train()
    z = norm.normalize(x)
    # training: normalised by the batch's own (biased) statistics
    bmean = x.mean(dim=(0, 2, 3))
    bvar_biased = x.var(dim=(0, 2, 3), unbiased=False)
    want = (x - bmean.view(1, 4, 1, 1)) / torch.sqrt(bvar_biased.view(1, 4, 1, 1) + 1e-4)
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-5)
    # momentum 1: the running statistics are exactly the batch's (unbiased variance, as BatchNorm2d)
    torch.testing.assert_close(norm.running_mean, bmean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.running_var, x.var(dim=(0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)
    # they are buffers (so EMA and checkpoints see them)
    names = {n for n, _ in norm.named_buffers()}
    assert {"bn.running_mean", "bn.running_var"} <= names
    assert not list(norm.parameters())
    # eval: a fixed affine map, and denormalize inverts normalize
    norm.eval()
    y = torch.randn(3, 4, 5, 5, generator=_gen(7)) * 5
    torch.testing.assert_close(norm.denormalize(norm.normalize(y)), y, rtol=1e-5, atol=1e-5)
    shift, scale = norm.shift_scale()
    torch.testing.assert_close(norm.normalize(y), (y - shift.view(1, 4, 1, 1)) / scale.view(1, 4, 1, 1))
    fixed = norm.to_fixed()
    torch.testing.assert_close(fixed.normalize(y), norm.normalize(y))


def test_batchnorm_latent_norm_default_momentum_moves_slowly():
    norm = BatchNormLatentNorm(4)
    x = torch.full((4, 4, 2, 2), 10.0) + torch.randn(4, 4, 2, 2, generator=_gen(8))
    norm.normalize(x)
    torch.testing.assert_close(norm.running_mean, 0.1 * x.mean(dim=(0, 2, 3)))
    assert math.isclose(norm.bn.eps, 1e-4) and math.isclose(norm.bn.momentum, 0.1)
