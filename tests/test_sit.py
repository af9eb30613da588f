"""SiT denoiser: presets, shapes, adaLN-Zero init, conditioning, attention, FLOPs, checkpoint loading."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cytosyn.config import ConfigError, build_config
from cytosyn.models import (
    SiT,
    SiTConfig,
    attention,
    build_sit,
    load_sit_state_dict,
    sincos_pos_embed_2d,
    sit_flops,
    timestep_features,
)
from cytosyn.models.repa import REPAProjector
from cytosyn.models.sit import Attention

PRESETS = ["SiT-T/2", "SiT-S/2", "SiT-B/2", "SiT-L/2", "SiT-XL/2"]
DIT_XL2_PARAMS = 675_129_632  # DiT-XL/2 as published (256 px, 1000 classes + null, learn_sigma, pos_embed)


def tiny(**kw) -> SiT:
    torch.manual_seed(0)
    args = {"input_size": 8, "cond_dim": 16, "repa_dim": 12, **kw}
    return build_sit("SiT-T/2", **args)


def perturb(model: SiT, scale: float = 0.05, seed: int = 1) -> SiT:
    """Give the zero-initialised layers some weight so outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def inputs(model: SiT, batch: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    cond = torch.randn(batch, c.cond_dim, generator=g) if c.cond_dim else None
    return x, t, cond


# ---- config ----------------------------------------------------------------------------------------------


def test_presets_fill_architecture_and_explicit_keys_win():
    cfg = SiTConfig.from_preset("SiT-B/2")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 768, 12, 2)
    assert SiTConfig().depth == 28 and SiTConfig().hidden_size == 1152  # defaults are XL/2
    cfg = build_config(SiTConfig, {"preset": "SiT-L/2"}, ["depth=10", "cond_dim=1536"])
    assert (cfg.depth, cfg.hidden_size, cfg.cond_dim) == (10, 1024, 1536)
    with pytest.raises(ConfigError, match="unknown key"):
        build_config(SiTConfig, {"preset": "SiT-S/2", "hidden": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config(SiTConfig, {"preset": "SiT-XXL/2"})
    with pytest.raises(ConfigError, match="repa_depth"):
        build_config(SiTConfig, {"preset": "SiT-S/2", "repa_depth": 13})
    with pytest.raises(ConfigError, match="divisible"):
        build_config(SiTConfig, {"hidden_size": 100, "num_heads": 16})
    assert SiTConfig.from_preset("SiT-XL/2").num_tokens == 196  # 224 px, f8, patch 2 -> 14x14


# ---- shapes, parameter counts, FLOPs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_forward_shapes_every_preset_on_meta(name):
    with torch.device("meta"):
        model = build_sit(name, input_size=8)
        x = torch.empty(2, 4, 8, 8)
        v, z = model(x, torch.empty(2), torch.empty(2, 768), return_repa=True)
    assert v.shape == (2, 4, 8, 8)
    assert z.shape == (2, 16, 768)


def test_tiny_forward_shapes_real():
    model = tiny()
    x, t, cond = inputs(model)
    v, z = model(x, t, cond, return_repa=True)
    assert v.shape == x.shape and z.shape == (3, 16, 12)
    assert model(x, 0.5, cond).shape == x.shape  # scalar time
    # another grid: the fixed positional embedding is recomputed
    assert model(torch.randn(2, 4, 12, 6), torch.rand(2), cond[:2]).shape == (2, 4, 12, 6)
    with pytest.raises(ValueError, match="no REPA projector"):
        tiny(repa_dim=None)(x, t, cond, return_repa=True)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 7, 8), t[:1], cond[:1])


def test_xl2_parameter_count_matches_published_dit():
    with torch.device("meta"):
        # The exact DiT-XL/2 architecture: 256 px (32x32 latent), learn_sigma; its label table
        # (1001 x 1152) and pos_embed parameter (256 x 1152) are added to our count.
        dit_like = build_sit("SiT-XL/2", input_size=32, learn_sigma=True, repa_dim=None, cond_dim=None)
        ours = build_sit("SiT-XL/2", repa_dim=None)  # 224 px, H0-mini conditioning, no REPA
        with_repa = build_sit("SiT-XL/2")  # + REPA projector to 768
    assert dit_like.num_parameters() + 1001 * 1152 + 256 * 1152 == DIT_XL2_PARAMS
    n = ours.num_parameters()
    assert abs(n - 675e6) / 675e6 < 0.005, n
    # CytoSyn reports 683M for SiT-XL/2 including the REPA projector
    assert abs(with_repa.num_parameters() - 683e6) / 683e6 < 0.005
    assert with_repa.num_parameters() - n == REPAProjector.num_parameters(1152, 768, 2048)


def test_flops_match_published_dit_figure():
    # DiT-XL/2 at 256 px: 118.6 "Gflops" as counted by fvcore (multiply-adds)
    cfg = SiTConfig.from_preset("SiT-XL/2", input_size=32, learn_sigma=True, cond_dim=None, repa_dim=None)
    macs = sit_flops(cfg)["total"] / 2
    assert abs(macs - 118.6e9) / 118.6e9 < 0.005
    # at 224 px fewer tokens, cheaper; REPA projector adds its matmuls
    model_cfg = SiTConfig.from_preset("SiT-XL/2")
    with_repa = sit_flops(model_cfg)
    assert with_repa["total"] < 2 * macs
    assert sit_flops(model_cfg, include_repa=False)["total"] == with_repa["total"] - with_repa["repa"]
    assert tiny().flops_per_image() == sit_flops(tiny().cfg)["total"]


# ---- adaLN-Zero ------------------------------------------------------------------------------------------


def test_output_is_exactly_zero_at_init_and_moves_after_one_step():
    model = tiny()
    x, t, cond = inputs(model)
    v = model(x, t, cond)
    assert torch.count_nonzero(v) == 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    target = torch.randn_like(x)
    loss = F.mse_loss(model(x, t, cond), target)
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert model(x, t, cond).abs().min() > 0


# ---- conditioning ----------------------------------------------------------------------------------------


def test_cond_dropout_rate_and_determinism():
    model = tiny()
    model.train()
    n = 200_000
    drop = model.cond_drop_mask(n, "cpu", generator=torch.Generator().manual_seed(3))
    rate = drop.float().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    again = model.cond_drop_mask(n, "cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(drop, again)
    forced = model.cond_drop_mask(4, "cpu", uncond_mask=torch.tensor([True, False, True, False]))
    assert forced[0] and forced[2]
    model.eval()
    assert not model.cond_drop_mask(1000, "cpu").any()
    assert model.cond_drop_mask(2, "cpu", uncond_mask=torch.tensor([True, False])).tolist() == [True, False]


def test_null_embedding_used_when_uncond_mask_set():
    model = perturb(tiny()).eval()
    x, t, cond = inputs(model)
    other = torch.randn_like(cond)
    all_null = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        a = model(x, t, cond, uncond_mask=all_null)
        b = model(x, t, other, uncond_mask=all_null)
        c = model(x, t, None)
        manual = model(x, t, model.cond_embedder.null_embedding.detach().expand(3, -1).clone())
        d = model(x, t, cond)
        e = model(x, t, cond, uncond_mask=torch.tensor([False, True, False]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    torch.testing.assert_close(a, manual)
    assert not torch.allclose(a, d)
    torch.testing.assert_close(e[0], d[0])
    torch.testing.assert_close(e[1], a[1])
    # in training with dropout 1 the condition is always replaced
    model_always = perturb(tiny(cond_dropout=1.0)).train()
    with torch.no_grad():
        torch.testing.assert_close(model_always(x, t, cond), model_always(x, t, other), rtol=0, atol=0)


def test_condition_changes_output():
    model = perturb(tiny()).eval()
    x, t, cond = inputs(model)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, cond), model(x, t, cond + 1))
        assert not torch.allclose(model(x, t, cond), model(x, 1 - t, cond))


# ---- embeddings -------------------------------------------------------------------------------------------


def _mae_style_pos_embed(dim: int, grid: int) -> np.ndarray:
    """Independent numpy version of the published 2-D sin-cos table (MAE/DiT)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ww, hh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, ww), one_d(dim // 2, hh)], axis=1)


def test_pos_embed_matches_published_layout_and_is_a_buffer():
    emb = sincos_pos_embed_2d(64, 5)
    np.testing.assert_allclose(emb.numpy(), _mae_style_pos_embed(64, 5), rtol=0, atol=1e-6)
    model = tiny()
    assert "pos_embed" in model.state_dict()
    assert "pos_embed" not in dict(model.named_parameters())
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(96, 4))


def test_timestep_features_closed_form():
    t = torch.tensor([0.0, 0.3, 1.0])
    f = timestep_features(t, 8)
    freqs = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    want = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(f, want)
    # time_scale multiplies t before the features
    m1, m2 = tiny(), tiny(time_scale=1000.0)
    torch.testing.assert_close(m2.t_embedder(t), m1.t_embedder(t * 1000.0))


# ---- attention --------------------------------------------------------------------------------------------


def naive_attention(q, k, v):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def test_sdpa_equals_naive_softmax_attention():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "sdpa"), naive_attention(q, k, v))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_module_equals_naive(qk_norm):
    torch.manual_seed(5)
    attn = Attention(32, 4, qk_norm=qk_norm).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    qkv = attn.qkv(x).reshape(2, 7, 3, 4, 8)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, N, d)
    if qk_norm:
        q, k = F.layer_norm(q, (8,)), F.layer_norm(k, (8,))
    want = attn.proj(naive_attention(q, k, v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x), want)


def test_xformers_backend_falls_back_to_sdpa():
    model = perturb(tiny()).eval()
    x, t, cond = inputs(model)
    with torch.no_grad():
        want = model(x, t, cond)
        for backend in ("auto", "xformers"):
            model.set_attention_backend(backend)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = model(x, t, cond)
            torch.testing.assert_close(got, want)


# ---- REPA tokens, checkpointing, learn_sigma ----------------------------------------------------------------


def test_repa_tokens_come_from_block_repa_depth():
    model = perturb(tiny()).eval()
    x, t, cond = inputs(model)
    seen = {}
    handle = model.blocks[model.cfg.repa_depth - 1].register_forward_hook(
        lambda mod, args, out: seen.setdefault("h", out)
    )
    with torch.no_grad():
        v, z = model(x, t, cond, return_repa=True)
        v2 = model(x, t, cond)
    handle.remove()
    torch.testing.assert_close(z, model.projectors[0](seen["h"]))
    torch.testing.assert_close(v, v2)


def test_grad_checkpointing_same_values_and_grads():
    a = perturb(tiny(cond_dropout=0.0))
    b = perturb(tiny(cond_dropout=0.0, grad_checkpointing=True))
    x, t, cond = inputs(a)
    out_a, za = a(x, t, cond, return_repa=True)
    out_b, zb = b(x, t, cond, return_repa=True)
    torch.testing.assert_close(out_a, out_b)
    (out_a.square().mean() + za.mean()).backward()
    (out_b.square().mean() + zb.mean()).backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_bf16_autocast_training_step():
    from cytosyn.diffusion import flow_matching_loss, interpolate
    from cytosyn.models import align_tokens, repa_loss

    model = tiny().train()
    x0, t, cond = inputs(model, batch=4)
    eps = torch.randn_like(x0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, z = model(interpolate(x0, eps, t), t, cond, return_repa=True)
        loss, _ = flow_matching_loss(v, x0, eps, t)
        proj = repa_loss(z, align_tokens(torch.randn(4, 36, 12), model.cfg.grid_size))
    assert v.dtype == torch.bfloat16 and loss.dtype == proj.dtype == torch.float32
    (loss + 0.5 * proj).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.cond_embedder.null_embedding.grad is not None  # used in every step (DDP-safe)


def test_learn_sigma_returns_velocity_channels():
    model = tiny(learn_sigma=True)
    assert model.final_layer.linear.out_features == 2 * 2 * 8
    x, t, cond = inputs(model)
    assert model(x, t, cond).shape == x.shape


# ---- checkpoint loading -------------------------------------------------------------------------------------


def test_load_state_dict_round_trip_own_model():
    src = perturb(tiny())
    dst = tiny()
    report = load_sit_state_dict(dst, src.state_dict(), strict=True)
    assert not report.unused and not report.new and not report.mismatched and not report.recomputed
    assert set(report.loaded) == set(src.state_dict())
    x, t, cond = inputs(src)
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(x, t, cond), src(x, t, cond), rtol=0, atol=0)


def test_load_sit_style_checkpoint_reports_label_embedder():
    # A public SiT/REPA-style state dict: class-label table instead of our condition embedder, learned
    # sigma channels, a 16x16 token grid (256 px), wrapped by DDP, inside a {"model", "ema"} checkpoint.
    pub = perturb(tiny(input_size=16, learn_sigma=True, cond_dim=None))
    sd = {f"module.{k}": v for k, v in pub.state_dict().items()}
    sd["module.y_embedder.embedding_table.weight"] = torch.randn(1001, 96)
    ckpt = {"ema": sd, "model": {}, "opt": {}, "args": None}

    ours = tiny()  # 8x8 latent (4x4 tokens), conditioned on a 16-d embedding, no sigma
    report = load_sit_state_dict(ours, ckpt, strict=True)
    assert report.unused == ["y_embedder.embedding_table.weight"]
    assert sorted(report.new) == sorted(k for k in ours.state_dict() if k.startswith("cond_embedder."))
    assert report.recomputed == ["pos_embed"]
    assert sorted(report.adapted) == ["final_layer.linear.bias", "final_layer.linear.weight"]
    assert "blocks.0.attn.qkv.weight" in report.loaded and "projectors.0.4.weight" in report.loaded
    assert "unused" in report.summary()
    torch.testing.assert_close(ours.blocks[3].mlp.fc2.weight, pub.blocks[3].mlp.fc2.weight)
    torch.testing.assert_close(ours.pos_embed[0], sincos_pos_embed_2d(96, 4))  # kept for our grid
    # the sliced final layer reproduces the public model's velocity channels
    pub.eval(), ours.eval()
    tokens, c = torch.randn(2, 64, 96), torch.randn(2, 96)  # compare the final layers directly
    with torch.no_grad():
        full = pub.unpatchify(pub.final_layer(tokens, c), 8, 8)
        sliced = ours.unpatchify(ours.final_layer(tokens, c), 8, 8)
    torch.testing.assert_close(sliced, full[:, :4])

    # a real mismatch (another REPA encoder width) is reported, and fatal only when strict
    other = tiny(repa_dim=24)
    report = load_sit_state_dict(other, pub.state_dict())
    assert {k for k, _, _ in report.mismatched} == {"projectors.0.4.weight", "projectors.0.4.bias"}
    with pytest.raises(ValueError, match="does not match"):
        load_sit_state_dict(tiny(repa_dim=24), pub.state_dict(), strict=True)
