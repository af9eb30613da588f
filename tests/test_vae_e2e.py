"""REPA-E stage 1 (``tune-vae`` mode e2e) with a random tiny VAE, SiT-T and a random ViT on the shipped CRC
tiles: the diffusion loss's gradient never reaches the VAE, the REPA loss's does (checked with hooks);
exact resume of VAE, discriminator, SiT (+ BatchNorm, EMA) and the three optimisers; the stage-1 SiT
loads strictly with its latent statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vae_helpers import packed_crc_tiles

from cytosyn.config import build_config
from cytosyn.training.vae_tuning import TuneVAEConfig, VAETuneError, _Tuner, run_vae_tuning


@pytest.fixture(scope="module")
def crc_dataset(tmp_path_factory) -> Path:
    return packed_crc_tiles(tmp_path_factory.mktemp("crc"))


def e2e_cfg(dataset: Path, run_dir: Path, max_steps: int = 3, **e2e) -> TuneVAEConfig:
    return build_config(
        TuneVAEConfig,
        {
            "run_dir": str(run_dir),
            "mode": "e2e",
            "max_steps": max_steps,
            "checkpoint_every": 1,
            "log_every": 1,
            "vae": {"name": "tiny-f8", "random_init": True},
            "data": {
                "train": str(dataset / "train"),
                "heldout": None,
                "batch_size": 2,
                "crop": 64,
                "num_workers": 0,
                "shuffle_buffer": 8,
            },
            "losses": {"lpips_weights": "off", "gan_start": 1, "disc_width": 8, "disc_layers": 2},
            "e2e": {
                "sit_preset": "SiT-T/2",
                "encoder": "vit-tiny16",
                "encoder_random_init": True,
                "ema_decay": 0.5,
                "cond_dropout": 0.5,
            }
            | e2e,
        },
    )


def _first_batch(cfg: TuneVAEConfig) -> dict:
    from cytosyn.data import LoaderConfig, build_loader

    loader = build_loader(
        cfg.data.train, LoaderConfig(batch_size=2, num_workers=0, shuffle_buffer=0, members=["image"])
    )
    return next(iter(loader))


def test_diffusion_gradient_never_reaches_the_vae_and_repa_does(crc_dataset, tmp_path):
    cfg = e2e_cfg(crc_dataset, tmp_path)
    # Only REPA may move the VAE here: every reconstruction term off.
    cfg = cfg.model_copy(update={"losses": cfg.losses.model_copy(update={"l1": 0.0, "kl": 0.0, "gan": 0.0})})
    tuner = _Tuner(cfg, torch.device("cpu"))
    seen: dict[str, list[tuple[str, float]]] = {"vae": [], "sit": []}

    def hook(side: str):
        return lambda g: seen[side].append((tuner.e2e.phase, float(g.abs().sum())))

    for p in tuner.ae.parameters():
        p.register_hook(hook("vae"))
    for p in tuner.e2e.sit.parameters():
        p.register_hook(hook("sit"))
    row = tuner.train_step(_first_batch(cfg))
    assert row["diffusion"] > 0 and row["sit_repa"] != 0
    phases = {phase for phase, _ in seen["vae"]}
    assert phases == {"vae"}, "the VAE received a gradient outside its own (REPA) update"
    assert sum(g for _, g in seen["vae"]) > 0, "the REPA loss must reach the VAE"
    assert {phase for phase, _ in seen["sit"]} == {"sit"}, "the SiT must be frozen during the VAE update"
    assert len(seen["sit"]) == sum(1 for p in tuner.e2e.sit.parameters() if p.requires_grad)

    # Without the REPA term, nothing reaches the VAE at all (the diffusion loss is stopped at the latents).
    cfg0 = cfg.model_copy(update={"e2e": cfg.e2e | {"vae_repa_weight": 0.0}})
    tuner0 = _Tuner(cfg0, torch.device("cpu"))
    grads: list[float] = []
    for p in tuner0.ae.parameters():
        p.register_hook(lambda g: grads.append(float(g.abs().sum())))
    tuner0.train_step(_first_batch(cfg0))
    assert sum(grads) == 0.0
    # sit_update refuses latents that still carry the VAE's graph
    z = tuner0.ae.encode(torch.zeros(2, 3, 64, 64)).z
    with pytest.raises(ValueError, match="detached"):
        tuner0.e2e.sit_update(z, _first_batch(cfg0), 0, tuner0._clip_and_step)


def test_e2e_exact_resume_and_stage1_sit_loads_with_latent_statistics(crc_dataset, tmp_path):
    from cytosyn.diffusion import BatchNormLatentNorm, carry_latent_statistics
    from cytosyn.models import build_sit, load_sit_state_dict

    straight = run_vae_tuning(e2e_cfg(crc_dataset, tmp_path / "a"))
    run_vae_tuning(e2e_cfg(crc_dataset, tmp_path / "b", max_steps=1))
    resumed = run_vae_tuning(e2e_cfg(crc_dataset, tmp_path / "b"))
    keys = ("total", "vae_repa", "diffusion", "sit_repa", "disc")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in straight.history]
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=False)["tuner"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["tuner"]
    for part in ("vae", "disc"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=0)
    for section in ("net", "ema"):
        for key, value in a["e2e"][section].items():
            torch.testing.assert_close(value, b["e2e"][section][key], rtol=0, atol=0, msg=f"{section}.{key}")
    for opt in (a["opt_vae"], a["opt_disc"], a["e2e"]["opt"]):
        assert opt["state"], "every optimiser has stepped"
    for idx, s in a["e2e"]["opt"]["state"].items():
        for name, value in s.items():
            torch.testing.assert_close(value, b["e2e"]["opt"]["state"][idx][name], rtol=0, atol=0)
    # the BatchNorm's running statistics moved away from their initial (0, 1)
    assert not torch.allclose(a["e2e"]["net"]["latent_norm.bn.running_mean"], torch.zeros(4))
    assert straight.descriptor["e2e"]["vae_repa_weight"] == 1.5

    # stage1_sit.pt: REPA-E layout, strict load, latent statistics carried
    state = torch.load(tmp_path / "a" / "stage1_sit.pt", weights_only=False)
    sit = build_sit(state["sit_config"])
    report = load_sit_state_dict(sit, state, strict=True)
    norm = BatchNormLatentNorm(4)
    carry_latent_statistics(norm, report.latent_stats)
    ema_mean = a["e2e"]["ema"]["module.latent_norm.bn.running_mean"]
    torch.testing.assert_close(norm.running_mean, ema_mean)


def test_e2e_refuses_a_sit_checkpoint_of_another_latent_space(crc_dataset, tmp_path):
    from cytosyn.models import build_sit

    other = build_sit("SiT-T/2", input_size=8, in_channels=16, cond_dim=192, repa_dim=192)
    torch.save({"ema": other.state_dict()}, tmp_path / "sit16.pt")
    cfg = e2e_cfg(crc_dataset, tmp_path / "run", sit_init_from=str(tmp_path / "sit16.pt"))
    with pytest.raises(VAETuneError, match="latent channels"):
        _Tuner(cfg, torch.device("cpu"))
    odd = e2e_cfg(crc_dataset, tmp_path / "odd").model_copy(
        update={"data": e2e_cfg(crc_dataset, tmp_path).data.model_copy(update={"crop": 60})}
    )
    with pytest.raises(VAETuneError, match="not divisible"):
        _Tuner(odd, torch.device("cpu"))


def test_bf16_e2e_step_keeps_losses_and_weights_in_fp32(crc_dataset, tmp_path):
    cfg = e2e_cfg(crc_dataset, tmp_path).model_copy(update={"precision": "bf16"})
    tuner = _Tuner(cfg, torch.device("cpu"))
    row = tuner.train_step(_first_batch(cfg))
    assert row["skipped"] == 0.0 and row["sit_skipped"] == 0.0
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    params = [*tuner.ae.parameters(), *tuner.e2e.sit.parameters(), *tuner.disc.parameters()]
    assert {p.dtype for p in params} == {torch.float32}
    assert tuner.e2e.norm.running_var.dtype == torch.float32
