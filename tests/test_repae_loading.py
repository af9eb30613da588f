"""REPA-E checkpoints load faithfully: the reference layout (key names and shapes recorded from REPA-E's own
SiT, random weights here) loads in strict mode, only the label embedder is left out, and the latent
BatchNorm statistics become cytosyn's latent normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cytosyn.diffusion import BatchNormLatentNorm, FixedLatentNorm, carry_latent_statistics
from cytosyn.models import build_sit, load_sit_state_dict
from cytosyn.models.sit import REPAE_BN_EPS

LAYOUT = json.loads((Path(__file__).parent / "fixtures" / "repae_sit_layout.json").read_text())


def reference_state(name: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the exact key/shape layout of REPA-E's SiT (BatchNorm statistics included)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in LAYOUT[name]["keys"].items():
        if key == "bn.num_batches_tracked":
            state[key] = torch.tensor(12345, dtype=torch.long)
        elif key == "bn.running_var":
            state[key] = torch.rand(shape, generator=g) * 3 + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


def tiny_ours(**overrides):
    args = LAYOUT["tiny"]["args"]
    return build_sit(
        {},
        **{
            "input_size": args["input_size"],
            "in_channels": args["in_channels"],
            "patch_size": args["patch_size"],
            "hidden_size": args["hidden_size"],
            "depth": args["depth"],
            "num_heads": args["num_heads"],
            "mlp_ratio": args["mlp_ratio"],
            "cond_dim": 12,
            "repa_depth": args["encoder_depth"],
            "repa_dim": args["z_dims"][0],
            "repa_hidden": args["projector_dim"],
        }
        | overrides,
    )


def test_repae_checkpoint_loads_strict_and_carries_batchnorm_statistics():
    ref = reference_state()
    # REPA-E's training checkpoint: model, EMA, VAE, discriminator and three optimisers.
    ckpt = {
        "model": {k: v + 1 for k, v in ref.items()},
        "ema": ref,
        "vae": {"encoder.conv_in.weight": torch.zeros(1)},
        "discriminator": {},
        "opt": {},
        "opt_vae": {},
        "opt_disc": {},
        "args": None,
        "steps": 400000,
    }
    model = tiny_ours()
    report = load_sit_state_dict(model, ckpt, strict=True)
    assert report.unused == ["y_embedder.embedding_table.weight"]
    assert sorted(report.new) == sorted(k for k in model.state_dict() if k.startswith("cond_embedder."))
    assert not report.mismatched and not report.adapted and not report.recomputed
    sit_keys = [k for k in ref if not k.startswith(("bn.", "y_embedder."))]
    assert sorted(report.loaded) == sorted(sit_keys)
    own = model.state_dict()
    for key in sit_keys:  # the EMA weights, not the raw model's (+1)
        torch.testing.assert_close(own[key], ref[key], rtol=0, atol=0, msg=key)
    assert set(report.latent_stats) == {"running_mean", "running_var", "num_batches_tracked"}
    assert "latent statistics" in report.summary()

    # BatchNorm latent norm: eval-mode normalisation equals REPA-E's BatchNorm (eps 1e-4) on its statistics.
    x = torch.randn(3, 4, 8, 8) * 2 + 1
    expected = F.batch_norm(
        x, ref["bn.running_mean"], ref["bn.running_var"], training=False, eps=REPAE_BN_EPS
    )
    bn = BatchNormLatentNorm(4)
    carry_latent_statistics(bn, report.latent_stats, REPAE_BN_EPS)
    bn.eval()
    torch.testing.assert_close(bn.normalize(x), expected)
    torch.testing.assert_close(bn.denormalize(expected), x, rtol=1e-5, atol=1e-5)
    assert int(bn.bn.num_batches_tracked) == 12345
    # Fixed latent norm (the default of a fine-tune): the same shift and scale.
    fixed = FixedLatentNorm(torch.zeros(4), torch.ones(4))
    note = carry_latent_statistics(fixed, report.latent_stats, REPAE_BN_EPS)
    torch.testing.assert_close(fixed.normalize(x), expected)
    assert "4 channels" in note


def test_strict_refuses_anything_but_the_expected_differences():
    ref = reference_state()
    with pytest.raises(ValueError, match="does not match"):  # an unexpected extra key
        load_sit_state_dict(tiny_ours(), ref | {"blocks.0.extra.weight": torch.zeros(2)}, strict=True)
    broken = dict(ref)
    del broken["bn.running_var"]  # half of the latent statistics
    with pytest.raises(ValueError, match="does not match"):
        load_sit_state_dict(tiny_ours(), broken, strict=True)
    # latent statistics of another channel count (a VAE that does not match the SiT): not carried
    other = dict(ref) | {"bn.running_mean": torch.zeros(16), "bn.running_var": torch.ones(16)}
    with pytest.raises(ValueError, match="does not match"):
        load_sit_state_dict(tiny_ours(), other, strict=True)
    # a missing SiT weight is refused too
    missing = {k: v for k, v in ref.items() if k != "blocks.1.mlp.fc1.weight"}
    with pytest.raises(ValueError, match="does not match"):
        load_sit_state_dict(tiny_ours(), missing, strict=True)
    # non-strict: reported, never silent
    report = load_sit_state_dict(tiny_ours(), other)
    assert "bn.running_mean" in report.unused and "running_mean" not in report.latent_stats


def test_carry_refuses_mismatched_channels_and_bad_values():
    stats = {"running_mean": torch.zeros(4), "running_var": torch.ones(4)}
    with pytest.raises(ValueError, match="the latent norm has 8"):
        carry_latent_statistics(BatchNormLatentNorm(8), stats)
    with pytest.raises(ValueError, match="not finite"):
        carry_latent_statistics(
            BatchNormLatentNorm(4), stats | {"running_var": torch.full((4,), float("nan"))}
        )
    with pytest.raises(ValueError, match="eps"):
        carry_latent_statistics(BatchNormLatentNorm(4, eps=1e-5), stats, eps=1e-4)


def test_sit_xl2_matches_repae_reference_layout():
    """Our SiT-XL/2 (32×32 latents, 256 px) has every tensor of REPA-E's SiT-XL/2 with the same shape,
    except the label embedder (we condition on embeddings) and the latent BatchNorm (kept beside the SiT)."""
    ref = LAYOUT["SiT-XL/2"]["keys"]
    with torch.device("meta"):
        ours = build_sit("SiT-XL/2", input_size=32, repa_dim=768)
    own = {k: list(v.shape) for k, v in ours.state_dict().items()}
    expected_apart = {k for k in ref if k.startswith(("y_embedder.", "bn."))}
    assert {k for k in ref if k not in own} == expected_apart
    assert {k for k in own if k not in ref} == {k for k in own if k.startswith("cond_embedder.")}
    assert {k: v for k, v in ref.items() if k in own} == {k: own[k] for k in ref if k in own}


def test_training_init_from_repae_checkpoint_uses_its_latent_statistics(tmp_path):
    """`model.init_from` with a REPA-E checkpoint: the module's latent norm holds the checkpoint's statistics
    (default), or the split's (init_latent_stats: split)."""
    from cytosyn.training.config import TrainConfig
    from cytosyn.training.module import LatentDiffusionModule

    ref = reference_state()
    path = tmp_path / "repae.pt"
    torch.save({"ema": ref, "model": ref}, path)
    args = LAYOUT["tiny"]["args"]
    features = {
        "latent_size": args["input_size"],
        "latent_channels": 4,
        "cond_dim": 12,
        "repa_dim": args["z_dims"][0],
        "latent_mean": [0.0] * 4,
        "latent_std": [1.0] * 4,
    }
    overrides = {
        "patch_size": 2,
        "hidden_size": args["hidden_size"],
        "depth": args["depth"],
        "num_heads": args["num_heads"],
        "repa_depth": args["encoder_depth"],
        "repa_hidden": args["projector_dim"],
    }
    base = {
        "data": {"train": str(tmp_path)},
        "run_dir": str(tmp_path / "run"),
        "model": {"preset": "SiT-T/2", "overrides": overrides, "init_from": str(path)},
    }
    module = LatentDiffusionModule(TrainConfig.model_validate(base), features)
    norm = module.net["latent_norm"]
    torch.testing.assert_close(norm.mean, ref["bn.running_mean"])
    torch.testing.assert_close(norm.std, torch.sqrt(ref["bn.running_var"] + REPAE_BN_EPS))
    assert "carried" in module.latent_stats_origin
    base["model"]["init_latent_stats"] = "split"
    module = LatentDiffusionModule(TrainConfig.model_validate(base), features)
    torch.testing.assert_close(module.net["latent_norm"].std, torch.ones(4))


def test_repae_e2e_vae_checkpoint_loads_as_an_autoencoder_entry(tmp_path):
    """REPA-E's VAE checkpoints (latent-diffusion key layout, recorded from its f8d4 autoencoder; random
    fp16 weights here) load strictly as the sd-vae entry, alone or inside a REPA-E training checkpoint."""
    import argparse

    from cytosyn.models.vae import VAEError, load_vae

    layout = json.loads((Path(__file__).parent / "fixtures" / "repae_vae_f8d4_layout.json").read_text())
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in layout["keys"].items()}
    e2e = tmp_path / "e2e-sdvae-400k.pt"
    torch.save(state, e2e)
    vae = load_vae("sd-vae-ft-ema", e2e)
    net = vae.vae
    torch.testing.assert_close(net.encoder.conv_in.weight, state["encoder.conv_in.weight"].float())
    torch.testing.assert_close(net.quant_conv.weight, state["quant_conv.weight"].float())
    q = state["encoder.mid.attn_1.q.weight"].float()
    torch.testing.assert_close(net.encoder.mid_block.attentions[0].to_q.weight, q.reshape(q.shape[0], -1))
    moments = vae.encode_moments(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert moments.shape == (1, 2, 4, 4, 4) and bool(torch.isfinite(moments).all())

    # the same autoencoder inside a REPA-E training checkpoint (with its argparse arguments)
    full = tmp_path / "0400000.pt"
    torch.save({"vae": state, "model": {}, "ema": {}, "args": argparse.Namespace(vae="f8d4")}, full)
    assert load_vae("sd-vae-ft-ema", full).weights_id == vae.weights_id
    # another architecture is refused, naming the keys
    broken = tmp_path / "broken.pt"
    torch.save({k: v for k, v in state.items() if k != "decoder.conv_out.weight"}, broken)
    with pytest.raises(VAEError, match="missing"):
        load_vae("sd-vae-ft-ema", broken)
