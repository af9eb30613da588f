"""Samplers against a velocity field known in closed form.

Data x ~ N(μ, diag σ²) and the linear path x_t = (1 − t)·x + t·ε. Per dimension x_t is Gaussian with mean
m_t = (1 − t)·μ and variance s_t² = (1 − t)²·σ² + t², and Cov(ε, x_t) = t, Cov(x, x_t) = (1 − t)·σ², so

    E[ε − x | x_t] = −μ + a(t)·(x_t − m_t),      a(t) = (t − (1 − t)·σ²) / s_t²,

a linear field. Since a(t) = d log s_t / dt, the flow keeps z = (x_t − m_t)/s_t constant: the exact ODE
solution from noise ε at t = 1 is x_t = m_t + s_t·ε, so x_0 = μ + σ·ε.

Run as a script (``python tests/test_samplers.py``) to print the convergence table of docs/sampling.md.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from cytosyn.config import ConfigError, build_config
from cytosyn.sampling import (
    SAMPLER_PRESETS,
    SamplerConfig,
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

F64 = torch.float64
MU = torch.tensor([1.5, -0.7, 0.3, 2.0], dtype=F64)
SIGMA = torch.tensor([0.5, 1.3, 0.3, 2.0], dtype=F64)
N_SAMPLES = 20_000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small tensor ops: one thread is faster than several, and steadier on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class GaussianVelocity:
    """The exact velocity of N(μ, diag σ²) data; with a condition c, the data mean is μ + c.

    Rows whose ``uncond_mask`` is True (or all rows when ``cond`` is None) use the unconditional mean μ.
    With ``record=True`` every call's inputs and output are kept in ``calls``.
    """

    def __init__(self, mu: torch.Tensor = MU, sigma: torch.Tensor = SIGMA, record: bool = False):
        self.mu, self.sigma, self.record = mu, sigma, record
        self.calls: list[dict] = []

    def __call__(self, x_t, t, cond, uncond_mask):
        assert t.shape == (x_t.shape[0],) and uncond_mask.shape == (x_t.shape[0],)
        assert uncond_mask.dtype == torch.bool and t.dtype == x_t.dtype
        tt = t.to(F64)[:, None]
        mean = self.mu.expand(x_t.shape[0], -1)
        if cond is not None:
            mean = mean + torch.where(uncond_mask[:, None], torch.zeros_like(cond), cond)
        var = (1 - tt) ** 2 * self.sigma**2 + tt**2
        a = (tt - (1 - tt) * self.sigma**2) / var
        v = (-mean + a * (x_t.to(F64) - (1 - tt) * mean)).to(x_t.dtype)
        if self.record:
            self.calls.append(
                {"x": x_t.clone(), "t": t.clone(), "cond": cond, "mask": uncond_mask.clone(), "v": v.clone()}
            )
        return v


def noise(n: int, seed: int, dim: int = 4) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def em_discrete_moments(cfg: SamplerConfig, mu=MU, sigma=SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and std of the Euler–Maruyama output for the Gaussian field, from N(0, 1) noise.

    Written independently of the sampler: the scheme is affine in x with Gaussian increments, so
    x_{k+1} = A_k·x_k + B_k + C_k·z_k, with drift x + (2 − t)·u and C_k² = 2·t_k·|h_k| (0 on the last step).
    """
    grid = time_grid(cfg).tolist()
    mean, var = torch.zeros_like(mu), torch.ones_like(mu)
    for k in range(len(grid) - 1):
        t, h = grid[k], grid[k + 1] - grid[k]
        a = (t - (1 - t) * sigma**2) / ((1 - t) ** 2 * sigma**2 + t**2)
        gain = 1 + h * (1 + (2 - t) * a)
        mean = gain * mean - h * (2 - t) * mu * (1 + a * (1 - t))
        var = gain**2 * var + (0.0 if k == len(grid) - 2 else 2 * t * -h)
    return mean, var.sqrt()


def assert_moments(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, bias: float = 0.0) -> None:
    """Sample mean/std within 4.5 standard errors (plus an allowance for discretisation bias)."""
    n = x.shape[0]
    se_mean, se_std = std / math.sqrt(n), std / math.sqrt(2 * n)
    dm, ds = (x.mean(0) - mean).abs(), (x.std(0) - std).abs()
    assert torch.all(dm <= 4.5 * se_mean + bias * std), (x.mean(0), mean)
    assert torch.all(ds <= 4.5 * se_std + bias * std), (x.std(0), std)


# ------------------------------------------------------------------------------------------ distribution


@pytest.mark.parametrize(
    ("method", "steps"), [("euler", 500), ("heun", 40), ("euler_maruyama", 400)], ids=lambda v: str(v)
)
def test_sampler_maps_noise_to_the_data_gaussian(method, steps):
    cfg = SamplerConfig(method=method, steps=steps, t_end=0.0)
    x = sample(GaussianVelocity(), noise(N_SAMPLES, 0), None, cfg, generator=torch.Generator().manual_seed(1))
    assert x.dtype == F64 and x.shape == (N_SAMPLES, 4)
    # measured discretisation bias of these settings: ≤ 0.25% of σ (docs/sampling.md)
    assert_moments(x, MU, SIGMA, bias=0.005)


def test_default_sde_matches_the_scheme_and_the_data():
    cfg = unconditional_default()
    x = sample(GaussianVelocity(), noise(N_SAMPLES, 2), None, cfg, generator=torch.Generator().manual_seed(3))
    mean, std = em_discrete_moments(cfg)
    assert_moments(x, mean, std)  # the sampler is the documented scheme (noise-free last step included)
    # the scheme itself: mean exact; std biased only by stopping the noise at t_end = 0.04 (σ = 0.3: −2.8%)
    assert torch.allclose(mean, MU, atol=1e-12)
    assert torch.all((std / SIGMA - 1).abs() < 0.03)
    assert_moments(x, MU, SIGMA, bias=0.03)


# ------------------------------------------------------------------------------------------- convergence


CONVERGENCE_STEPS = [8, 16, 32, 64, 128]


def endpoint_errors(method: str, steps_list=CONVERGENCE_STEPS) -> list[float]:
    eps = noise(64, 5)
    exact = MU + SIGMA * eps
    errors = []
    for steps in steps_list:
        x = sample(GaussianVelocity(), eps, None, SamplerConfig(method=method, steps=steps, t_end=0.0))
        errors.append((x - exact).abs().max().item())
    return errors


def loglog_slope(steps_list, errors) -> float:
    return float(np.polyfit(np.log(steps_list), np.log(errors), 1)[0])


@pytest.mark.parametrize(("method", "low", "high"), [("euler", -1.15, -0.85), ("heun", -2.2, -1.8)])
def test_ode_convergence_order(method, low, high):
    errors = endpoint_errors(method)
    assert all(e2 < e1 for e1, e2 in itertools.pairwise(errors)), errors
    slope = loglog_slope(CONVERGENCE_STEPS, errors)
    assert low <= slope <= high, (slope, errors)


# ---------------------------------------------------------------------------------------------- guidance


def euler_by_hand(model, eps, cond, steps):
    """A plain float64 Euler loop on the conditional model, written independently of the sampler."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=F64).tolist()
    x = eps.clone()
    mask = torch.zeros(eps.shape[0], dtype=torch.bool)
    for t0, t1 in itertools.pairwise(grid):
        x = x + (t1 - t0) * model(x, torch.full((eps.shape[0],), t0, dtype=F64), cond, mask)
    return x


@pytest.mark.parametrize("method", ["euler", "heun", "euler_maruyama"])
def test_guidance_scale_one_is_the_conditional_model(method):
    eps, cond = noise(32, 6), noise(32, 7)
    cfg = SamplerConfig(method=method, steps=20, guidance_scale=1.0, guidance_interval=(0.0, 1.0))
    model = GaussianVelocity(record=True)
    x, stats = sample(model, eps, cond, cfg, generator=torch.Generator().manual_seed(0), return_stats=True)
    assert stats.guided_nfe == 0 and stats.nfe == cfg.steps * cfg.evals_per_step == len(model.calls)
    for call in model.calls:  # never an unconditional row, never a doubled batch
        assert call["x"].shape[0] == 32 and not call["mask"].any() and call["cond"] is cond
    if method == "euler":
        assert torch.allclose(x, euler_by_hand(GaussianVelocity(), eps, cond, 20), rtol=0, atol=1e-12)


def test_guided_velocity_formula_on_all_channels():
    cu, cc, s = -2.0, 1.0, 2.5

    def model(x_t, t, cond, uncond_mask):
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        return torch.where(uncond_mask.view(shape), torch.full_like(x_t, cu), torch.full_like(x_t, cc))

    eps = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    cfg = SamplerConfig(method="euler", steps=1, guidance_scale=s, guidance_interval=(0.0, 1.0))
    x = sample(model, eps, torch.zeros(3, 8, dtype=F64), cfg)
    # one Euler step of h = −1 with v = v_u + s·(v_c − v_u) on every channel
    assert torch.equal(x, eps - (cu + s * (cc - cu)))


@pytest.mark.parametrize(
    ("method", "steps", "interval"),
    [("euler_maruyama", 250, (0.0, 0.75)), ("heun", 10, (0.2, 0.6)), ("euler", 16, (0.5, 0.5))],
)
def test_guidance_interval_is_respected(method, steps, interval):
    b = 4
    eps, cond = noise(b, 8), noise(b, 9)
    cfg = SamplerConfig(method=method, steps=steps, guidance_scale=2.5, guidance_interval=interval)
    model = GaussianVelocity(record=True)
    _, stats = sample(model, eps, cond, cfg, generator=torch.Generator().manual_seed(0), return_stats=True)
    low, high = interval
    guided_times = []
    for call in model.calls:
        t = call["t"][0].item()
        assert torch.all(call["t"] == call["t"][0])
        if low <= t <= high:
            guided_times.append(t)
            assert call["x"].shape[0] == 2 * b  # one call, batch doubled
            assert torch.equal(call["x"][:b], call["x"][b:])
            assert torch.equal(call["mask"], torch.tensor([False] * b + [True] * b))
            assert torch.equal(call["cond"][:b], cond)
        else:  # outside the interval: conditional only, the unconditional branch is not evaluated
            assert call["x"].shape[0] == b and not call["mask"].any()
    assert len(model.calls) == stats.nfe == steps * cfg.evals_per_step
    assert stats.guided_nfe == len(guided_times) > 0
    grid = time_grid(cfg).tolist()
    expected = [t for t in grid[:-1] if low <= t <= high] if method != "heun" else None
    if expected is not None:
        assert guided_times == expected


def test_unconditional_sampling_uses_the_null_condition_and_no_guidance():
    model = GaussianVelocity(record=True)
    cfg = SamplerConfig(method="heun", steps=5, guidance_scale=2.5)  # the scale cannot apply without cond
    _, stats = sample(model, noise(6, 10), None, cfg, return_stats=True)
    assert stats.nfe == 10 and stats.guided_nfe == 0
    for call in model.calls:
        assert call["cond"] is None and call["mask"].shape == (6,) and call["mask"].all()


# ------------------------------------------------------------------------------- conditional Gaussian


def test_cfg_moves_the_mean_as_predicted():
    """With a common σ the guided field v_u + s·(v_c − v_u) is exactly the field of N(μ + s·c, σ²)."""
    b = 8
    cond = noise(b, 11)
    zero = torch.zeros(b, 4, dtype=F64)  # the output at ε = 0 is the mean of the (affine) ODE map
    means = {}
    for s in [0.0, 0.5, 1.0, 2.5, 4.0]:
        cfg = SamplerConfig(method="heun", steps=200, guidance_scale=s, guidance_interval=(0.0, 1.0))
        means[s] = sample(GaussianVelocity(), zero, cond, cfg)
        assert torch.allclose(means[s], MU + s * cond, atol=1e-4), s
    scales = sorted(means)
    for s1, s2 in itertools.pairwise(scales):  # monotone along the condition's direction
        assert torch.all((means[s2] - means[s1]) * cond > 0)
    # s = 0 is the unconditional model exactly
    uncond = sample(GaussianVelocity(), zero, None, SamplerConfig(method="heun", steps=200))
    assert torch.equal(means[0.0], uncond)
    # and the spread is untouched: std stays σ
    eps = noise(N_SAMPLES, 12)
    cfg = SamplerConfig(method="heun", steps=40, guidance_scale=2.5, guidance_interval=(0.0, 1.0))
    c = torch.tensor([0.5, -1.0, 0.2, 0.0], dtype=F64)
    x = sample(GaussianVelocity(), eps, c.expand(N_SAMPLES, -1), cfg)
    assert_moments(x, MU + 2.5 * c, SIGMA, bias=0.002)


def test_cfg_with_a_guidance_interval_matches_the_closed_form():
    """Guidance on [0, 0.75] only: conditional flow from 1 to 0.75 (mean 0.25·μ_c), then the guided field.

    With y = x − (1 − t)·μ_g the guided flow is dy/dt = a(t)·y, so y(0) = y(0.75)·σ/s_0.75 and
    E[x_0] = μ_g + 0.25·(μ_c − μ_g)·σ/s_0.75, s_0.75² = 0.0625·σ² + 0.5625.
    """
    b, s = 8, 2.5
    cond = noise(b, 13)
    mu_c, mu_g = MU + cond, MU + s * cond
    s075 = torch.sqrt(0.0625 * SIGMA**2 + 0.5625)
    expected = mu_g + 0.25 * (mu_c - mu_g) * SIGMA / s075
    errors = []
    for steps in (200, 400):  # 0.75 is a grid point; Euler switches fields exactly there
        cfg = SamplerConfig(method="euler", steps=steps, guidance_scale=s, guidance_interval=(0.0, 0.75))
        x = sample(GaussianVelocity(), torch.zeros(b, 4, dtype=F64), cond, cfg)
        errors.append((x - expected).abs().max().item())
    assert errors[1] < 4e-3 and 0.4 < errors[1] / errors[0] < 0.6, errors  # first order, to the closed form
    assert not torch.allclose(x, mu_g, atol=0.05)  # the interval made a difference


# -------------------------------------------------------------------------------- determinism, time grid


def test_determinism_per_seed():
    eps, cond = noise(16, 14), noise(16, 15)
    cfg = cytosyn_default()

    def run(seed, config=cfg):
        return sample(GaussianVelocity(), eps, cond, config, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1), atol=1e-3)
    heun = fast_heun_30()
    assert torch.equal(run(0, heun), run(1, heun))  # the ODE uses no randomness
    assert torch.equal(eps, noise(16, 14))  # the input is not modified


def test_model_receives_the_float64_grid_and_the_last_sde_step_is_the_mean():
    cfg = SamplerConfig(method="euler_maruyama", steps=250, t_end=0.04)
    grid = time_grid(cfg)
    assert grid.dtype == F64 and len(grid) == 251
    assert grid[0].item() == 1.0 and grid[-2].item() == 0.04 and grid[-1].item() == 0.0
    assert torch.equal(grid[:-1], torch.linspace(1.0, 0.04, 250, dtype=F64))  # REPA's grid, then 0

    for dtype in (torch.float32, F64):
        model = GaussianVelocity(record=True)
        eps = noise(4, 16).to(dtype)
        x = sample(model, eps, None, cfg, generator=torch.Generator().manual_seed(0))
        assert x.dtype == dtype
        received = torch.stack([c["t"][0] for c in model.calls])
        assert received.dtype == dtype and torch.equal(received, grid[:-1].to(dtype))
    # float32 linspace differs from the float64 grid cast to float32: the test can tell them apart
    assert not torch.equal(received.float(), torch.linspace(1.0, 0.04, 250, dtype=torch.float32))

    # last step: x_0 = x + h·drift with h = −t_end and no noise term
    last = model.calls[-1]
    t = 0.04
    expected = last["x"] + (0.0 - t) * (last["x"] + (2.0 - t) * last["v"])
    assert torch.allclose(x, expected, rtol=0, atol=1e-12)


def test_shifted_grid():
    for t_end, method in [(0.0, "heun"), (0.04, "euler_maruyama")]:
        for shift in (0.3, 3.0):
            cfg = SamplerConfig(method=method, steps=20, time_grid="shifted", shift=shift, t_end=t_end)
            grid = time_grid(cfg)
            assert len(grid) == 21 and grid[0] == 1.0 and grid[-1] == 0.0
            assert torch.all(grid[1:] < grid[:-1])
            fine = grid if t_end == 0.0 else grid[:-1]
            assert fine[-1].item() == t_end
            u = torch.linspace(
                1.0, fine[-1].item() / (shift - (shift - 1) * fine[-1].item()), 21 - (t_end > 0)
            )
            assert torch.allclose(fine, shift_time(u.to(F64), shift), atol=1e-15)
            above_half = int((fine > 0.5).sum())
            assert above_half > 11 if shift > 1 else above_half < 9  # steps pile up near 1 or near 0
    uniform = SamplerConfig(method="euler", steps=10)
    assert torch.equal(time_grid(uniform), torch.linspace(1, 0, 11, dtype=F64))


def test_score_and_drift_from_velocity():
    """score = −(x_t + (1 − t)·u)/t agrees with the Gaussian's analytic score −(x_t − m_t)/s_t²."""
    model = GaussianVelocity()
    x_t = noise(5, 17)
    for t in (0.04, 0.3, 0.9):
        v = model(x_t, torch.full((5,), t, dtype=F64), None, torch.ones(5, dtype=torch.bool))
        analytic = -(x_t - (1 - t) * MU) / ((1 - t) ** 2 * SIGMA**2 + t**2)
        assert torch.allclose(score_from_velocity(x_t, v, t), analytic, atol=1e-12)
        assert torch.allclose(sde_drift(x_t, v, t), v - 0.5 * (2 * t) * analytic, atol=1e-12)
    with pytest.raises(ValueError):
        score_from_velocity(x_t, x_t, 0.0)


# ------------------------------------------------------------------------------------ config and presets


def test_nfe_counts():
    eps = noise(2, 18)
    for cfg, nfe in [
        (SamplerConfig(method="euler", steps=7), 7),
        (SamplerConfig(method="heun", steps=7), 14),
        (SamplerConfig(method="euler_maruyama", steps=7), 7),
    ]:
        _, stats = sample(GaussianVelocity(), eps, None, cfg, return_stats=True)
        assert stats.nfe == nfe and stats.batch_passes == nfe and len(stats.times) == nfe
    assert torch.is_tensor(sample(GaussianVelocity(), eps, None, SamplerConfig(method="euler", steps=2)))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"guidance_scale": -0.5}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_interval": [-0.1, 0.5]}, "guidance_interval"),
        ({"guidance_interval": [0.2, 1.5]}, "guidance_interval"),
        ({"guidance_interval": [0.8, 0.2]}, "guidance_interval"),
        ({"steps": 0}, "steps"),
        ({"steps": 1, "t_end": 0.04}, "steps"),
        ({"shift": 0.0}, "shift"),
        ({"t_end": 1.0}, "t_end"),
        ({"method": "dpm"}, "method"),
        ({"sde_diffusion": "sigma"}, "sde_diffusion"),
        ({"gudiance_scale": 2.0}, "gudiance_scale"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_error(override, key):
    with pytest.raises(ConfigError, match=key):
        build_config(SamplerConfig, override)


def test_defaults_and_presets():
    assert SamplerConfig().t_end == 0.04 and SamplerConfig(method="heun").t_end == 0.0
    assert SamplerConfig(method="euler", t_end=None).t_end == 0.0
    d = cytosyn_default()
    assert (d.method, d.steps, d.t_end, d.guidance_scale, d.guidance_interval) == (
        "euler_maruyama",
        250,
        0.04,
        2.5,
        (0.0, 0.75),
    )
    assert unconditional_default().guidance_scale == 1.0
    assert (fast_heun_30().method, fast_heun_30().steps) == ("heun", 30)
    assert (fast_euler_50().method, fast_euler_50().steps) == ("euler", 50)
    for name, make in SAMPLER_PRESETS.items():  # round trip through plain (YAML-like) data
        cfg = make()
        assert build_config(SamplerConfig, cfg.model_dump(mode="json")) == cfg == sampler_preset(name)
    assert sampler_preset("fast_heun_30", steps=20, guidance_scale=1.0).steps == 20
    with pytest.raises(ValueError, match="unknown sampler preset"):
        sampler_preset("nope")
    with pytest.raises(ValueError, match="batch"):
        sample(GaussianVelocity(), noise(3, 0), noise(2, 0), fast_euler_50())


# ------------------------------------------------------------------------------------------------ table


def convergence_table() -> str:
    """Endpoint error vs steps (the docs/sampling.md table)."""
    euler, heun = endpoint_errors("euler"), endpoint_errors("heun")
    lines = [
        "| steps | Euler max error | Heun max error | EM std bias, t_end=0 | EM std bias, t_end=0.04 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for steps, e, h in zip(CONVERGENCE_STEPS, euler, heun):
        bias = []
        for t_end in (0.0, 0.04):
            _, std = em_discrete_moments(SamplerConfig(method="euler_maruyama", steps=steps, t_end=t_end))
            bias.append(float((std / SIGMA - 1).abs().max()))
        lines.append(f"| {steps} | {e:.2e} | {h:.2e} | {bias[0]:.2e} | {bias[1]:.2e} |")
    lines.append(
        f"| slope | {loglog_slope(CONVERGENCE_STEPS, euler):.2f} | {loglog_slope(CONVERGENCE_STEPS, heun):.2f} | | |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(convergence_table())
