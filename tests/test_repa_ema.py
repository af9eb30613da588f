"""REPA projector, loss and token alignment; EMA of parameters and buffers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cytosyn.diffusion import BatchNormLatentNorm
from cytosyn.models import REPAProjector, align_tokens, area_weights, repa_loss
from cytosyn.training.ema import EMA

# ---- REPA projector and loss ------------------------------------------------------------------------------


def test_projector_layout_matches_repa_names():
    proj = REPAProjector(32, 12, projector_dim=64)
    assert [k for k in proj.state_dict()] == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    ]
    assert isinstance(proj[1], nn.SiLU) and isinstance(proj[3], nn.SiLU)
    assert proj(torch.randn(2, 5, 32)).shape == (2, 5, 12)
    assert sum(p.numel() for p in proj.parameters()) == REPAProjector.num_parameters(32, 12, 64)


def naive_repa_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    total, count = 0.0, 0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            cos = torch.dot(a[i, j], b[i, j]) / (a[i, j].norm() * b[i, j].norm())
            total += -float(cos)
            count += 1
    return torch.tensor(total / count, dtype=torch.float64)


def test_repa_loss_equals_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, 16, generator=g)
    b = torch.randn(3, 7, 16, generator=g)
    loss = repa_loss(a, b)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss.double(), naive_repa_loss(a, b), rtol=1e-5, atol=1e-6)
    per = repa_loss(a, b, reduction="none")
    assert per.shape == (3,)
    torch.testing.assert_close(per.mean(), loss)
    torch.testing.assert_close(repa_loss(a, a * 3.0), torch.tensor(-1.0))
    torch.testing.assert_close(repa_loss(a, -a), torch.tensor(1.0))
    with pytest.raises(ValueError, match="align"):
        repa_loss(a, b[:, :5])


def test_repa_loss_is_fp32_under_bf16_autocast_and_has_grad():
    g = torch.Generator().manual_seed(1)
    proj = REPAProjector(16, 8, projector_dim=32)
    h = torch.randn(2, 5, 16, generator=g)
    target = torch.randn(2, 5, 8, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = proj(h)
        assert projected.dtype == torch.bfloat16
        loss = repa_loss(projected, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), naive_repa_loss(projected.detach().float(), target.float()))
    loss.backward()
    assert proj[0].weight.grad is not None and torch.isfinite(proj[0].weight.grad).all()


# ---- token alignment --------------------------------------------------------------------------------------


def _grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    return tokens.reshape(tokens.shape[0], side, side, -1)


def test_area_weights_exact_overlaps():
    w = area_weights(16, 14, dtype=torch.float64)
    assert w.shape == (14, 16)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(14, dtype=torch.float64))
    # SiT token 0 covers pixels [0, 16): 14 px of encoder token 0 and 2 px of token 1
    torch.testing.assert_close(w[0, :3], torch.tensor([14 / 16, 2 / 16, 0.0], dtype=torch.float64))
    # every encoder token contributes 14/16 of a SiT token in total (the map's mean is preserved)
    torch.testing.assert_close(w.sum(dim=0), torch.full((16,), 14 / 16, dtype=torch.float64))


def test_align_tokens_halves_pattern_stays_sharp():
    # Channel 0: left half (encoder columns 0-7, pixels 0-111) = 0, right half = 1.
    # Channel 1: top half = 0, bottom half = 1. Pixel 112 is a boundary of both grids.
    cols = torch.arange(16).view(1, 16).expand(16, 16)
    rows = torch.arange(16).view(16, 1).expand(16, 16)
    enc = torch.stack([(cols >= 8).float(), (rows >= 8).float()], dim=-1).reshape(1, 256, 2)
    out = _grid(align_tokens(enc, 14), 14)
    assert out.shape == (1, 14, 14, 2)
    scols = torch.arange(14).view(1, 14).expand(14, 14)
    srows = torch.arange(14).view(14, 1).expand(14, 14)
    torch.testing.assert_close(out[0, ..., 0], (scols >= 7).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, ..., 1], (srows >= 7).float(), rtol=0, atol=1e-6)


def test_align_tokens_area_equals_pixel_level_average():
    # Paint every encoder token over its 14x14 pixels of the 224 px tile, then average each SiT token's
    # 16x16 pixels: that is the definition of the area mode.
    g = torch.Generator().manual_seed(2)
    enc = torch.randn(2, 256, 3, generator=g, dtype=torch.float64)
    pix = _grid(enc, 16).permute(0, 3, 1, 2).repeat_interleave(14, dim=2).repeat_interleave(14, dim=3)
    want = F.avg_pool2d(pix, 16).permute(0, 2, 3, 1).reshape(2, 196, 3)
    torch.testing.assert_close(align_tokens(enc, 14).double(), want, rtol=1e-6, atol=1e-6)
    # dtype preserved, constants preserved in every mode, identity when the grids agree
    assert align_tokens(enc.bfloat16(), 14).dtype == torch.bfloat16
    const = torch.full((1, 256, 4), 2.5)
    for mode in ("area", "bilinear", "adaptive_avg"):
        torch.testing.assert_close(align_tokens(const, (14, 14), mode=mode), torch.full((1, 196, 4), 2.5))
    assert align_tokens(enc, 16) is enc
    with pytest.raises(ValueError, match="square"):
        align_tokens(torch.randn(1, 257, 3), 14)  # a CLS token left in


def test_align_tokens_non_square_and_upsampling():
    enc = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)  # 2x3 grid, row-major
    up = align_tokens(enc, (4, 6), source_grid=(2, 3)).reshape(4, 6)
    want = torch.tensor([[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2, dtype=torch.float32)
    torch.testing.assert_close(up, want)


# ---- EMA --------------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.norm = BatchNormLatentNorm(2, momentum=0.5)

    def forward(self, x):
        return self.lin(x)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _step(model: Tiny, seed: int) -> None:
    """Change parameters and buffers like a training step would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lin.weight.add_(torch.randn(2, 3, generator=g))
        model.lin.bias.add_(torch.randn(2, generator=g))
    model.norm.train()
    model.norm.normalize(torch.randn(4, 2, 3, 3, generator=g) * 2 + 1)


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_ema_update_formula_parameters_and_buffers(buffers):
    torch.manual_seed(0)
    model = Tiny()
    ema = EMA(model, decay=0.9, buffers=buffers)
    expected = _snapshot(model)
    for step in range(3):
        _step(model, seed=step)
        used = ema.update(model)
        assert used == 0.9
        live = _snapshot(model)
        for name in ("lin.weight", "lin.bias"):
            expected[name] = 0.9 * expected[name] + 0.1 * live[name]
        expected["frozen"] = live["frozen"]
        for name in ("norm.bn.running_mean", "norm.bn.running_var"):
            if buffers == "average":
                expected[name] = 0.9 * expected[name] + 0.1 * live[name]
            else:
                expected[name] = live[name]
        expected["norm.bn.num_batches_tracked"] = live["norm.bn.num_batches_tracked"]  # integers: copied
        got = ema.module_state_dict()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert int(ema.num_updates) == 3
    assert int(ema.module.norm.bn.num_batches_tracked) == 3


def test_ema_warmup_decay_and_frozen_copy():
    model = Tiny()
    ema = EMA(model, decay=0.9999, warmup=True)
    assert ema.current_decay() == pytest.approx(1 / 10)
    ema.update(model)
    assert ema.current_decay() == pytest.approx(2 / 11)
    assert EMA(model, decay=0.5, warmup=True).current_decay() == pytest.approx(0.1)
    ema.num_updates.fill_(5000)
    assert ema.current_decay() == pytest.approx(5001 / 5010)
    ema.num_updates.fill_(100_000)
    assert ema.current_decay() == 0.9999
    with torch.no_grad():
        model.frozen.mul_(3)
    ema.update(model, decay=0.99)
    assert torch.equal(ema.module.frozen, model.frozen)  # frozen parameters copied exactly


def test_ema_state_dict_copy_to_and_swap():
    torch.manual_seed(1)
    model = Tiny()
    ema = EMA(model, decay=0.5)
    _step(model, 1)
    ema.update(model)
    _step(model, 2)
    ema.update(model)
    state = ema.state_dict()
    assert "num_updates" in state and "module.lin.weight" in state and "module.norm.bn.running_var" in state

    other = EMA(Tiny(), decay=0.5)
    other.load_state_dict(state)
    assert int(other.num_updates) == 2
    for k, v in ema.module_state_dict().items():
        assert torch.equal(other.module_state_dict()[k], v), k

    live = _snapshot(model)
    with ema.average_parameters(model):
        torch.testing.assert_close(model.lin.weight, ema.module.lin.weight)
    for k, v in _snapshot(model).items():
        assert torch.equal(v, live[k]), k  # restored

    target = Tiny()
    ema.copy_to(target)
    for k, v in ema.module_state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k

    ema.train()
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_unwraps_compiled_style_wrappers():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    model = Tiny()
    ema = EMA(Wrapper(model), decay=0.0)
    _step(model, 3)
    ema.update(Wrapper(model))
    torch.testing.assert_close(ema.module.lin.weight, model.lin.weight)
    with pytest.raises(ValueError, match="differ"):
        ema.update(nn.Linear(3, 2))
