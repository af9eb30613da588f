"""``cytosyn tune-vae`` (mode finetune) on the real CRC tiles shipped with cytosyn: held-out PSNR improves,
exact resume of the VAE, discriminator and both optimisers, export as a hashed folder that featurize loads
and that refuses tampering or another autoencoder; LPIPS only from local weights or an explicit ``off``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from vae_helpers import packed_crc_tiles, tune_config

from cytosyn.config import ConfigError, build_config
from cytosyn.training.vae_tuning import TuneVAEConfig, VAETuneError, run_vae_tuning


@pytest.fixture(scope="module")
def crc_dataset(tmp_path_factory) -> Path:
    return packed_crc_tiles(tmp_path_factory.mktemp("crc"))


def tune_cfg(dataset: Path, run_dir: Path, **sections) -> TuneVAEConfig:
    return build_config(TuneVAEConfig, tune_config(dataset, run_dir, **sections))


def test_finetune_improves_heldout_psnr_on_real_tiles(crc_dataset, tmp_path):
    cfg = tune_cfg(crc_dataset, tmp_path / "run", max_steps=15, losses={"gan_start": 1000})
    result = run_vae_tuning(cfg)
    report = result.report
    assert report["before"]["tiles"] == report["after"]["tiles"] == 2
    assert report["psnr_gain_db"] > 2.0, report  # a random tiny VAE learns colour and layout quickly
    assert report["after"]["ssim"] > report["before"]["ssim"]
    assert result.skipped == 0 and len(result.history) == 15
    assert all(h["kl"] > 0 for h in result.history)  # a KL autoencoder: the KL term is computed
    exported = json.loads((result.export / "reconstruction_report.json").read_text())
    assert exported["psnr_gain_db"] == pytest.approx(report["psnr_gain_db"])
    desc = json.loads((result.export / "tuned_vae.json").read_text())
    assert desc["losses"]["lpips_weight"] == 0.0 and desc["losses"]["lpips"].startswith("off")
    # the held-out tiles and their reconstructions before/after, as PNG folders for an rFID by `cytosyn eval`;
    # they are the reconstructions the report measured (PSNR from the 8-bit files within rounding)
    from PIL import Image

    recon = tmp_path / "run" / "reconstructions"
    tiles = {k: np.stack([np.asarray(Image.open(f), dtype=np.float64) for f in sorted((recon / k).glob("*.png"))])
             for k in ("original", "base", "tuned")}  # fmt: skip
    assert {v.shape[0] for v in tiles.values()} == {2} and "reconstructions" in report["rfid"]
    for name, key in (("base", "before"), ("tuned", "after")):
        mse = ((tiles[name] - tiles["original"]) / 255).reshape(2, -1).__pow__(2).mean(axis=1)
        assert np.mean(10 * np.log10(1 / mse)) == pytest.approx(report[key]["psnr_db"], abs=0.1)


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)


def test_exact_resume_of_vae_discriminator_and_optimisers(crc_dataset, tmp_path):
    """4 steps in one go == 2 steps, stop, then resume to 4 (GAN and discriminator active from step 1)."""
    straight = run_vae_tuning(tune_cfg(crc_dataset, tmp_path / "a", data={"heldout": None}))
    run_vae_tuning(tune_cfg(crc_dataset, tmp_path / "b", max_steps=2, data={"heldout": None}))
    resumed = run_vae_tuning(tune_cfg(crc_dataset, tmp_path / "b", data={"heldout": None}))
    assert [h["total"] for h in resumed.history] == [h["total"] for h in straight.history]
    assert [h["disc"] for h in resumed.history] == [h["disc"] for h in straight.history]
    assert straight.history[-1]["gan"] != 0 and straight.history[-1]["disc"] != 0
    a, b = _state(tmp_path / "a")["tuner"], _state(tmp_path / "b")["tuner"]
    for part in ("vae", "disc"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=0, msg=f"{part}.{key}")
    for opt in ("opt_vae", "opt_disc"):
        for idx, s in a[opt]["state"].items():
            for name, value in s.items():
                torch.testing.assert_close(value, b[opt]["state"][idx][name], rtol=0, atol=0)
    assert straight.descriptor["weights"] == resumed.descriptor["weights"]
    logged = [json.loads(r) for r in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0.0, 1.0, 2.0, 3.0]  # once each, across the resume
    # another setting in the same run folder is refused
    with pytest.raises(VAETuneError, match="other settings"):
        run_vae_tuning(tune_cfg(crc_dataset, tmp_path / "b", optim={"lr": 1e-4}, data={"heldout": None}))


def test_export_loads_as_autoencoder_featurizes_and_refuses_tampering(crc_dataset, tmp_path):
    from cytosyn.data_prep.featurize import run_featurize
    from cytosyn.data_prep.featurize_config import FeaturizeConfig

    from cytosyn.manifest import read_manifest
    from cytosyn.models.vae import VAEError, check_vae_matches, load_vae, load_vae_as_recorded

    cfg = tune_cfg(
        crc_dataset,
        tmp_path / "run",
        max_steps=2,
        vae={"name": "taef2", "random_init": False},
        data={"heldout_tiles": 1},
    )
    result = run_vae_tuning(cfg)
    folder = result.export
    assert {p.name for p in folder.iterdir()} == {
        "taef2.safetensors",
        "tuned_vae.json",
        "reconstruction_report.json",
        "SHA256SUMS",
    }
    desc = result.descriptor
    assert desc["base"] == "taef2" and desc["base_weights"] != desc["weights"]
    tuned = load_vae("taef2", folder)
    assert tuned.weights_id == desc["weights"]

    # featurize takes the folder as the autoencoder and records the tuned weights
    fcfg = build_config(
        FeaturizeConfig,
        {
            "input": str(crc_dataset / "val"),
            "output": str(tmp_path / "features"),
            "encoders": [{"name": "vit-tiny16", "random_init": True}],
            "vae": {"name": "taef2", "weights": str(folder)},
            "batch_size": 4,
            "device": "cpu",
            "decode_check": 0,
            "progress": False,
        },
    )
    run_featurize(fcfg)
    entry = next(f for f in read_manifest(tmp_path / "features").features if f.member == "vae.npy")
    assert entry.details["weights"] == desc["weights"]
    recorded = {"name": entry.model_id, "weights": entry.details["weights"]}
    # what a release does with its recorded VAE: the tuned folder passes, the base TAEF2 is refused
    assert load_vae_as_recorded("taef2", desc["weights"], folder).weights_id == desc["weights"]
    with pytest.raises(VAEError, match="other weights"):
        check_vae_matches(load_vae("taef2"), recorded, "release")

    with pytest.raises(VAEError, match="tunes the 'taef2' autoencoder"):
        load_vae("tiny-f8", folder)
    (folder / "reconstruction_report.json").write_text("{}")  # tampered
    with pytest.raises(VAEError, match="changed"):
        load_vae("taef2", folder)


def test_lpips_needs_local_weights_or_explicit_off(crc_dataset, tmp_path):
    from cytosyn.compat import import_torchvision
    from cytosyn.models.lpips import LPIPSLoss, LPIPSWeightsError

    with pytest.raises(ConfigError, match="lpips_weights"):
        tune_cfg(crc_dataset, tmp_path, losses={"lpips_weights": None})
    with pytest.raises(LPIPSWeightsError, match="do not exist"):
        LPIPSLoss(tmp_path / "missing.pth", "alex")
    import_torchvision()
    import torchvision

    torch.manual_seed(0)
    alex = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), alex)  # stands for the ImageNet weights
    with pytest.raises(LPIPSWeightsError, match="do not fit"):
        LPIPSLoss(alex, "vgg")
    loss = LPIPSLoss(alex, "alex")
    assert loss.record["net"] == "alex" and len(loss.record["backbone_sha256"]) == 64
    sd = torch.load(alex, weights_only=True)
    torch.testing.assert_close(
        loss.model.net.slice2._modules["3"].weight, sd["features.3.weight"]
    )  # really loaded
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).requires_grad_()
    d = loss(x, y)
    d.sum().backward()
    assert d.shape == (2,) and bool((d > 0).all()) and y.grad is not None
    assert float(loss(x, x).abs().max()) == 0.0
    assert not any(p.requires_grad for p in loss.parameters())

    # a run with LPIPS records which weights it used
    cfg = tune_cfg(
        crc_dataset,
        tmp_path / "run",
        max_steps=1,
        losses={"lpips_weights": str(alex), "lpips_net": "alex"},
        data={"heldout": None},
    )
    result = run_vae_tuning(cfg)
    assert result.history[0]["lpips"] > 0
    assert result.descriptor["losses"]["lpips"]["backbone_sha256"] == loss.record["backbone_sha256"]
    assert result.descriptor["losses"]["lpips_weight"] == 1.0


def test_split_without_images_is_refused(crc_dataset, tmp_path):
    from cytosyn.data.testing import synthetic_sample, write_split

    samples = [{k: v for k, v in synthetic_sample(i).items() if k != "png"} for i in range(8)]
    write_split(tmp_path / "noimg", samples, [8])
    cfg = tune_cfg(crc_dataset, tmp_path / "run", data={"train": str(tmp_path / "noimg"), "heldout": None})
    with pytest.raises(VAETuneError, match="missing_image"):
        run_vae_tuning(cfg)


def test_example_config_validates_once_lpips_is_decided(tmp_path):
    from cytosyn.config import load_config

    path = Path(__file__).resolve().parent.parent / "configs" / "vae_tune.yaml"
    with pytest.raises(ConfigError, match="lpips_weights"):
        load_config(TuneVAEConfig, path)
    cfg = load_config(TuneVAEConfig, path, ["losses.lpips_weights=off"])
    assert cfg == TuneVAEConfig(losses={"lpips_weights": "off"})  # the example states the defaults


def test_cli_tune_vae_runs_and_reports(crc_dataset, tmp_path, capsys):
    from cytosyn.cli import main

    rc = main(
        [
            "tune-vae",
            "--data",
            str(crc_dataset / "train"),
            "--run-dir",
            str(tmp_path / "run"),
            "max_steps=1",
            "vae.name=tiny-f8",
            "vae.random_init=true",
            "data.heldout=null",
            "data.crop=32",
            "data.batch_size=2",
            "data.num_workers=0",
            "losses.lpips_weights=off",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "vae.name=tiny-f8" in out and (tmp_path / "run" / "vae" / "SHA256SUMS").is_file()
    rc = main(
        [
            "tune-vae",
            "--data",
            str(tmp_path / "nowhere"),
            "--run-dir",
            str(tmp_path / "r2"),
            "losses.lpips_weights=off",
            "vae.name=tiny-f8",
            "vae.random_init=true",
            "data.heldout=null",
        ]
    )
    assert rc == 1 and "nowhere" in capsys.readouterr().err


def test_non_finite_loss_skips_the_update_and_counts_it(crc_dataset, tmp_path, monkeypatch):
    import cytosyn.training.vae_losses as losses
    from cytosyn.training.vae_tuning import _Tuner

    original = losses.autoencoder_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the second step's VAE loss is NaN
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(losses, "autoencoder_losses", poisoned)
    cfg = tune_cfg(crc_dataset, tmp_path / "run", data={"heldout": None}, losses={"gan_start": 100})
    tuner = _Tuner(cfg, torch.device("cpu"))
    from cytosyn.data import LoaderConfig, build_loader

    loader = build_loader(cfg.data.train, LoaderConfig(batch_size=2, num_workers=0, members=["image"]))
    batches = iter(loader)
    tuner.train_step(next(batches))
    before = {k: v.clone() for k, v in tuner.ae.net.state_dict().items()}
    row = tuner.train_step(next(batches))
    assert row["skipped"] == 1.0 and tuner.skipped == 1
    for key, value in tuner.ae.net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # nothing moved
    assert tuner.train_step(next(batches))["skipped"] == 0.0 and tuner.skipped_in_a_row == 0


@pytest.mark.slow
def test_tuned_vae_round_trip_featurize_train_release_sample(crc_dataset, tmp_path):
    """export → featurize → train → release → sample with the tuned VAE; the release names its hash and
    refuses the untuned VAE."""
    from conftest import tiny_train_config
    from cytosyn.data_prep.featurize import run_featurize
    from cytosyn.data_prep.featurize_config import FeaturizeConfig

    from cytosyn.pipeline import CytoSynPipeline
    from cytosyn.release import run_release
    from cytosyn.training.config import TrainConfig
    from cytosyn.training.run import run_training

    tuned = run_vae_tuning(tune_cfg(crc_dataset, tmp_path / "tune", max_steps=3, data={"heldout": None}))
    folder, weights = tuned.export, tuned.descriptor["weights"]
    run_featurize(
        build_config(
            FeaturizeConfig,
            {
                "input": str(crc_dataset / "train"),
                "output": str(tmp_path / "features"),
                "encoders": [{"name": "vit-tiny16", "random_init": True, "outputs": ["cls", "patch"]}],
                "vae": {"name": "tiny-f8", "weights": str(folder)},
                "batch_size": 8,
                "device": "cpu",
                "decode_check": 0,
                "progress": False,
            },
        )
    )
    features = tmp_path / "features"
    train = tiny_train_config({"train": features, "val": features}, tmp_path / "run")
    train["trainer"] |= {"max_steps": 3, "checkpoint_every_n_steps": 3}
    train["validation"] = {"every_n_steps": 0}
    train["logging"] = {"wandb": "disabled"}
    run_training(build_config(TrainConfig, train))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    release = tmp_path / "release"
    run_release(ckpt, release, bundle_vae=True, vae_weights=folder)
    config = json.loads((release / "config.json").read_text())
    assert config["vae"]["weights"] == weights and config["vae"]["name"] == "tiny-f8"
    pipe = CytoSynPipeline.from_pretrained(release, device="cpu")
    fast = {"method": "euler", "steps": 2, "guidance_scale": 1.0}
    tiles = pipe.generate(None, num_images=2, sampler=fast, seed=0)
    assert tiles.shape == (2, 224, 224, 3) and tiles.dtype == np.uint8
    # a referenced release decodes only with the tuned VAE: the base (untuned) one is refused
    referenced = tmp_path / "referenced"
    run_release(ckpt, referenced)
    base = tmp_path / "base_vae"
    from cytosyn.models.vae import load_vae

    load_vae("tiny-f8", random_init=True).vae.save_pretrained(str(base))
    from cytosyn.pipeline import PipelineError

    with pytest.raises(PipelineError, match="differ from the recorded ones") as refused:
        CytoSynPipeline.from_pretrained(referenced, device="cpu", vae_weights=base).generate(
            None, num_images=1, sampler=fast, seed=0
        )
    assert weights in str(refused.value)  # the error names the VAE the release decodes with
    ok = CytoSynPipeline.from_pretrained(referenced, device="cpu", vae_weights=folder)
    assert np.array_equal(ok.generate(None, num_images=2, sampler=fast, seed=0), tiles)


def test_reconstruction_folders_give_an_rfid_through_cytosyn_eval(crc_dataset, tmp_path):
    """The documented rFID path: tune-vae's reconstruction folders as a ``folder`` generator (paired with
    the originals by file name) in the ``domain`` study of ``cytosyn eval``."""
    from cytosyn.eval.run import EvalConfig, run_eval

    run_vae_tuning(tune_cfg(crc_dataset, tmp_path / "run", max_steps=2, data={"heldout_tiles": 6}))
    recon = tmp_path / "run" / "reconstructions"
    cfg = build_config(EvalConfig, {
        "study": "domain",
        "generator": {"kind": "folder", "path": str(recon / "tuned"), "mpp": 0.5},
        "references": {"reference": str(recon / "original"), "mpp": 0.5},
        "extractors": [{"name": "vit-tiny16", "random_init": True}],
        "n": 6, "n_boot": 4, "kid_subset_size": 3, "kid_subsets": 2, "device": "cpu", "progress": False,
        "output": str(tmp_path / "rfid"),
    })  # fmt: skip
    doc = json.loads((run_eval(cfg) / "metrics.json").read_text())
    fd = {k: v for k, v in doc["aggregate"].items() if k.startswith("fd/")}
    assert fd and all(np.isfinite(v["mean"]) and v["mean"] > 0 for v in fd.values()), doc["aggregate"]
