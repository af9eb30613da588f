"""The inference pipeline, release folders and ``cytosyn sample``, on a real tiny checkpoint.

A module fixture tiles the real fixture slide, featurizes 24 tiles (random vit-tiny16 + tiny-f8), and
trains SiT-T/2 for 6 steps: every test then works on a genuine training checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_tile_samples, write_split
from cytosyn.data_prep.featurize import run_featurize
from cytosyn.data_prep.featurize_config import FeaturizeConfig

from cytosyn.config import ConfigError, build_config
from cytosyn.generation import TileGenerator
from cytosyn.manifest import read_manifest
from cytosyn.pipeline import CytoSynPipeline, PipelineError, ReleaseIntegrityError, parts_from_checkpoint
from cytosyn.release import ReleaseConfig, run_release, run_release_config
from cytosyn.sample import SampleConfig, run_sample
from cytosyn.shardio import iter_shard_samples
from cytosyn.training.config import TrainConfig
from cytosyn.training.run import run_training

ENCODER = "vit-tiny16"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
LAYOUT = sorted(
    [
        "README.md",
        "SHA256SUMS",
        "config.json",
        "model_index.json",
        "pipeline.py",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        WEIGHTS,
    ]
)
FAST = {
    "method": "euler_maruyama",
    "steps": 4,
    "t_end": 0.04,
    "guidance_scale": 2.5,
    "guidance_interval": (0.0, 0.75),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fixture_slide) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    samples = fixture_tile_samples(root / "tiles", fixture_slide)[:24]
    write_split(root / "dataset" / "train", samples, "train", per_shard=8)
    run_featurize(
        build_config(
            FeaturizeConfig,
            {
                "input": str(root / "dataset" / "train"),
                "output": str(root / "features" / "train"),
                "encoders": [{"name": ENCODER, "random_init": True, "outputs": ["cls"]}],
                "vae": {"name": "tiny-f8", "random_init": True},
                "decode_check": 0,
                "progress": False,
            },
        )
    )
    cfg = build_config(
        TrainConfig,
        {
            "run_dir": str(root / "run"),
            "data": {
                "train": str(root / "features" / "train"),
                "condition": ENCODER,
                "repa_target": None,
                "batch_size": 8,
                "num_workers": 0,
                "shuffle_buffer": 8,
            },
            "model": {"preset": "SiT-T/2"},
            "repa": {"weight": 0.0},
            "optim": {"lr": 1e-3},
            "ema": {"decay": 0.5},
            "trainer": {
                "max_steps": 6,
                "accelerator": "cpu",
                "log_every_n_steps": 1,
                "checkpoint_every_n_steps": 6,
            },
            "validation": {"every_n_steps": 0},
            "logging": {"wandb": "disabled"},
        },
    )
    run_training(cfg)
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    report = root / "eval"
    report.mkdir()
    (report / "metrics.json").write_text(
        json.dumps(
            {
                "format": "cytosyn.eval-report/1",
                "title": "tiny eval",
                "metrics": {"fid_inception": 123.4, "fd_uni2-h": {"estimate": 5.0, "low": 4.5, "high": 5.5}},
                "intervals": {"fid_inception": {"estimate": 123.4, "low": 120.0, "high": 126.0}},
            }
        )
    )
    release = root / "release"
    run_release(ckpt, release, eval_report=report)
    return {"root": root, "ckpt": ckpt, "release": release, "split": root / "features" / "train"}


@pytest.fixture(scope="module")
def pipe(trained) -> CytoSynPipeline:
    return CytoSynPipeline.from_checkpoint(trained["ckpt"], device="cpu")


def _embeddings(trained, n: int) -> np.ndarray:
    manifest = read_manifest(trained["split"])
    out = []
    for (_, members), _ in iter_shard_samples(trained["split"] / manifest.shards[0].name):
        out.append(np.load(__import__("io").BytesIO(dict(members)[f"{ENCODER}.npy"])).astype(np.float32))
        if len(out) == n:
            break
    return np.stack(out)


# ---- release round trip ----------------------------------------------------------------------------------


def test_release_folder_contents(trained):
    folder = trained["release"]
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == LAYOUT
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.blocks.") for k in keys)
    assert {"latent_norm.mean", "latent_norm.std"} <= set(keys)
    assert not any("projectors" in k for k in keys)
    config = json.loads((folder / "config.json").read_text())
    assert config["sit"]["depth"] == 4 and config["sit"]["cond_dim"] == 192
    assert (
        config["conditioning"]["encoder"] == ENCODER
        and config["conditioning"]["preprocessing"]["input_size"] == 224
    )
    assert config["vae"]["name"] == "tiny-f8" and config["vae"]["weights"] == "random-init:seed=0"
    assert config["tile"] == {**config["tile"], "px": 224, "mpp": 0.5}
    assert config["training"]["steps"] == 6 and config["training"]["images_seen"] == 48
    assert config["data"]["samples"] == 24 and config["data"]["slides"] == 1
    assert config["sampler"]["conditional"]["steps"] == 250
    assert config["evaluation"]["metrics"]["fid_inception"] == 123.4
    card = (folder / "README.md").read_text()
    for text in (
        "## Training data",
        "## Evaluation",
        "fid_inception",
        "5 [4.5, 5.5]",
        "## Intended use",
        "## Limitations",
    ):
        assert text in card, text
    # hub metadata: the YAML header the hub reads
    import yaml

    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "other" and meta["license_name"] == "unspecified"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "unconditional-image-generation"
    results = meta["model-index"][0]["results"][0]
    assert {m["name"]: m["value"] for m in results["metrics"]} == {"fid_inception": 123.4}
    assert "| `fid_inception` | 123.4 | 123.4 [120, 126] |" in card  # the CI column
    for text in (
        "## Components",
        "| autoencoder | `tiny-f8`",
        "| conditioning encoder | `vit-tiny16`",
        "DiffusionPipeline",
    ):
        assert text in card, text
    sums = (folder / "SHA256SUMS").read_text().split("\n")
    assert [line.split("  ")[1] for line in sums if line] == [n for n in LAYOUT if n != "SHA256SUMS"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "CytoSynDiffusionPipeline" and index["vae"] == [None, None]
    assert index["transformer"] == ["cytosyn.diffusers_pipeline", "SiTTransformer"]
    tcfg = json.loads((folder / "transformer" / "config.json").read_text())
    assert tcfg["vae"]["name"] == "tiny-f8" and tcfg["weights_sha256"] == config["weights"]["sha256_content"]


def test_release_samples_equal_checkpoint_samples_bitwise(trained, pipe):
    released = CytoSynPipeline.from_pretrained(trained["release"], device="cpu")
    assert isinstance(released, TileGenerator) and isinstance(pipe, TileGenerator)
    assert released.name == pipe.name and released.weights_sha256 == pipe.weights_sha256
    emb = _embeddings(trained, 3)
    a = pipe.generate(emb, sampler=FAST, seed=7, batch_size=3)
    b = released.generate(emb, sampler=FAST, seed=7, batch_size=3)
    assert a.dtype == np.uint8 and a.shape == (3, 224, 224, 3)
    assert np.array_equal(a, b)
    for sampler in (FAST, "fast_heun_30"):
        la = pipe.generate(emb, sampler=sampler, steps=4, seed=7, output="latent")
        lb = released.generate(emb, sampler=sampler, steps=4, seed=7, output="latent")
        assert torch.equal(la, lb)


def test_save_pretrained_round_trip(trained, pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    again = CytoSynPipeline.from_pretrained(tmp_path / "copy", device="cpu")
    assert again.weights_sha256 == pipe.weights_sha256
    emb = _embeddings(trained, 1)
    assert torch.equal(
        again.generate(emb, sampler="fast_euler_50", steps=3, output="latent"),
        pipe.generate(emb, sampler="fast_euler_50", steps=3, output="latent"),
    )


def test_release_is_deterministic_and_refuses_a_non_empty_output(trained, tmp_path):
    second = tmp_path / "again"
    run_release(trained["ckpt"], second, eval_report=trained["root"] / "eval")
    for name in LAYOUT:
        assert (second / name).read_bytes() == (trained["release"] / name).read_bytes(), name
    with pytest.raises(PipelineError, match="not empty"):
        run_release(trained["ckpt"], second)
    summary = run_release_config(
        build_config(
            ReleaseConfig, {"checkpoint": str(trained["ckpt"]), "output": str(second), "overwrite": True}
        )
    )
    assert summary.files.keys() == set(LAYOUT) - {"SHA256SUMS"}
    assert not summary.eval_included and "No evaluation report" in (second / "README.md").read_text()


@pytest.mark.parametrize(
    "tamper", ["flip_weights_byte", "delete_config", "edit_config", "delete_sums", "edit_readme"]
)
def test_tampered_release_is_refused(trained, tmp_path, tamper):
    folder = tmp_path / "release"
    shutil.copytree(trained["release"], folder)
    if tamper == "flip_weights_byte":
        data = bytearray((folder / WEIGHTS).read_bytes())
        data[len(data) // 2] ^= 0x01
        (folder / WEIGHTS).write_bytes(bytes(data))
        match = r"diffusion_pytorch_model\.safetensors does not match its sha256"
    elif tamper == "delete_config":
        (folder / "config.json").unlink()
        match = r"missing config\.json"
    elif tamper == "edit_config":
        config = json.loads((folder / "config.json").read_text())
        config["sampler"]["conditional"]["steps"] = 10
        (folder / "config.json").write_text(json.dumps(config))
        match = r"config\.json does not match"
    elif tamper == "delete_sums":
        (folder / "SHA256SUMS").unlink()
        match = "no SHA256SUMS"
    else:
        (folder / "README.md").write_text("edited")
        match = r"README\.md does not match"
    with pytest.raises(ReleaseIntegrityError, match=match):
        CytoSynPipeline.from_pretrained(folder, device="cpu")


# ---- the release as a diffusers pipeline ---------------------------------------------------------------


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_diffusers_loads_the_release_and_samples_bitwise_like_cytosyn(trained):
    from diffusers import DiffusionPipeline

    from cytosyn.diffusers_pipeline import CytoSynDiffusionPipeline

    folder = trained["release"]
    ours = CytoSynPipeline.from_pretrained(folder, device="cpu")
    direct = CytoSynDiffusionPipeline.from_pretrained(folder)  # no remote code: the class comes from cytosyn
    remote = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    assert type(remote).__name__ == "CytoSynDiffusionPipeline" and remote.vae is None  # referenced VAE
    emb = _embeddings(trained, 3)
    expected = ours.generate(emb, sampler=FAST, seed=7, batch_size=2)
    for pipe in (direct, remote):
        assert pipe.core.weights_sha256 == ours.weights_sha256
        got = pipe(emb, sampler=FAST, seed=7, batch_size=2, output_type="uint8").images
        assert np.array_equal(got, expected)
    pil = direct(emb, sampler=FAST, seed=7, batch_size=2).images
    assert pil[2].size == (224, 224) and np.array_equal(np.asarray(pil[2]), expected[2])
    floats = direct(emb, sampler=FAST, seed=7, batch_size=2, output_type="np").images
    assert floats.dtype == np.float32 and np.allclose(floats * 255, expected, atol=1e-3)
    uncond = ours.generate(None, num_images=2, sampler="fast_euler_50", steps=3, seed=1)
    assert np.array_equal(
        direct(
            num_images=2, sampler="fast_euler_50", num_inference_steps=3, seed=1, output_type="uint8"
        ).images,
        uncond,
    )
    assert direct.scheduler.sampler_config(True).steps == 250  # the release's defaults travel with it
    direct.scheduler.set_timesteps(4)
    assert direct.scheduler.timesteps[0] == 1.0 and direct.scheduler.timesteps[-1] == 0.0


def test_bundled_autoencoder_round_trip(trained, pipe, tmp_path):
    from diffusers import AutoencoderKL, DiffusionPipeline

    folder = pipe.save_pretrained(tmp_path / "bundled", bundle_vae=True)
    files = _files(folder)
    assert {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"} <= set(files)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    config = json.loads((folder / "config.json").read_text())
    assert config["vae"]["bundled"]["weights"].startswith("sha256:")
    assert config["vae"]["bundled"]["built_from"] == "random-init:seed=0"
    ours = CytoSynPipeline.from_pretrained(folder, device="cpu")
    remote = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    assert isinstance(remote.vae, AutoencoderKL)
    emb = _embeddings(trained, 2)
    expected = ours.generate(emb, sampler=FAST, seed=3)
    assert np.array_equal(remote(emb, sampler=FAST, seed=3, output_type="uint8").images, expected)
    assert np.array_equal(
        pipe.generate(emb, sampler=FAST, seed=3), expected
    )  # the referenced one decodes alike
    # a bundled VAE whose weights were altered (and re-hashed into SHA256SUMS) is still refused: its hash is recorded
    other = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(PipelineError, match="latents come from"):
        _ = remote.__class__(transformer=remote.transformer, scheduler=remote.scheduler, vae=other).core


def test_diffusers_save_pretrained_and_push_to_hub_write_the_release_layout(trained, tmp_path, monkeypatch):
    import huggingface_hub

    from cytosyn.diffusers_pipeline import CytoSynDiffusionPipeline

    src = trained["release"]
    d = CytoSynDiffusionPipeline.from_pretrained(src)
    d.save_pretrained(tmp_path / "saved")
    assert _files(tmp_path / "saved") == LAYOUT
    assert (tmp_path / "saved" / "README.md").read_text() == (src / "README.md").read_text()
    for name in ("transformer/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (tmp_path / "saved" / name).read_bytes() == (src / name).read_bytes(), name
    again = CytoSynPipeline.from_pretrained(tmp_path / "saved", device="cpu")
    assert again.weights_sha256 == d.core.weights_sha256
    uploads: list[dict] = []

    def fake_upload(**kwargs):
        folder = Path(kwargs["folder_path"])
        uploads.append(
            {"repo": kwargs["repo_id"], "files": _files(folder), "card": (folder / "README.md").read_text()}
        )

    monkeypatch.setattr(
        huggingface_hub, "create_repo", lambda repo_id, **kw: type("R", (), {"repo_id": repo_id})()
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload)
    d.push_to_hub("someone/cytosyn-tiny")
    assert uploads[0]["repo"] == "someone/cytosyn-tiny" and uploads[0]["files"] == LAYOUT
    assert uploads[0]["card"] == (src / "README.md").read_text()


def test_diffusers_path_keeps_the_hash_checks(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from cytosyn.diffusers_pipeline import CytoSynDiffusionPipeline

    folder = tmp_path / "release"
    shutil.copytree(trained["release"], folder)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ReleaseIntegrityError, match="does not match its sha256"):
        CytoSynDiffusionPipeline.from_pretrained(folder)
    # without SHA256SUMS (e.g. a copy of the transformer folder alone) the recorded content hash still guards it
    shutil.copytree(trained["release"] / "transformer", tmp_path / "alone")
    state = load_file(str(tmp_path / "alone" / "diffusion_pytorch_model.safetensors"))
    state["latent_norm.mean"] = state["latent_norm.mean"] + 1
    save_file(state, str(tmp_path / "alone" / "diffusion_pytorch_model.safetensors"))
    from cytosyn.diffusers_pipeline import SiTTransformer

    with pytest.raises(ReleaseIntegrityError, match="hash to"):
        SiTTransformer.from_pretrained(tmp_path / "alone")


# ---- generation --------------------------------------------------------------------------------------------


def test_determinism_per_seed_and_independence_from_batch_size(trained, pipe):
    emb = _embeddings(trained, 5)
    for sampler in (FAST, {**FAST, "method": "heun", "t_end": 0.0, "steps": 2}):
        one = pipe.generate(emb, sampler=sampler, seed=3, batch_size=5, output="latent")
        again = pipe.generate(emb, sampler=sampler, seed=3, batch_size=5, output="latent")
        assert torch.equal(one, again)
        other_batches = pipe.generate(emb, sampler=sampler, seed=3, batch_size=2, output="latent")
        torch.testing.assert_close(other_batches, one, rtol=1e-5, atol=1e-5)
        pieces = torch.cat(
            [
                pipe.generate(emb[:3], sampler=sampler, seed=3, batch_size=3, output="latent"),
                pipe.generate(
                    emb[3:], sampler=sampler, seed=3, batch_size=3, index_offset=3, output="latent"
                ),
            ]
        )
        torch.testing.assert_close(pieces, one, rtol=1e-5, atol=1e-5)
        other_seed = pipe.generate(emb, sampler=sampler, seed=4, batch_size=5, output="latent")
        assert (other_seed - one).abs().mean() > 0.1


def test_unconditional_sampling_uses_the_null_embedding(pipe, monkeypatch):
    calls = []
    forward = pipe.model.forward

    def spy(x_t, t, cond=None, uncond_mask=None, **kwargs):
        calls.append((cond, None if uncond_mask is None else uncond_mask.clone(), x_t.shape[0]))
        return forward(x_t, t, cond, uncond_mask=uncond_mask, **kwargs)

    monkeypatch.setattr(pipe.model, "forward", spy)
    images = pipe.generate(None, num_images=2, sampler=FAST, guidance_scale=4.0, seed=0)
    assert images.shape == (2, 224, 224, 3)
    assert len(calls) == 4  # no guided (doubled) calls whatever the guidance scale
    for cond, mask, batch in calls:
        assert cond is None and batch == 2 and mask is not None and bool(mask.all())
    # The null embedding passed explicitly as a condition gives the same latents.
    monkeypatch.undo()
    null = pipe.null_embedding().expand(2, -1)
    uncond = pipe.generate(
        None, num_images=2, sampler={**FAST, "guidance_scale": 1.0}, seed=0, output="latent"
    )
    as_cond = pipe.generate(null, sampler={**FAST, "guidance_scale": 1.0}, seed=0, output="latent")
    assert torch.equal(uncond, as_cond)


def test_conditional_guidance_doubles_the_batch_inside_the_interval(trained, pipe, monkeypatch):
    masks = []
    forward = pipe.model.forward

    def spy(x_t, t, cond=None, uncond_mask=None, **kwargs):
        masks.append((float(t[0]), uncond_mask.clone()))
        return forward(x_t, t, cond, uncond_mask=uncond_mask, **kwargs)

    monkeypatch.setattr(pipe.model, "forward", spy)
    pipe.generate(_embeddings(trained, 2), sampler=FAST, seed=0)
    for t, mask in masks:
        if t <= 0.75:
            assert mask.tolist() == [False, False, True, True]
        else:
            assert mask.tolist() == [False, False]


def test_bad_requests_are_clear_errors(trained, pipe):
    with pytest.raises(PipelineError, match=r"'vit-tiny16' embeddings of width 192"):
        pipe.generate(np.zeros((2, 768), np.float32))
    with pytest.raises(ConfigError, match="guidance_scale"):
        pipe.generate(_embeddings(trained, 1), guidance_scale=-1.0)
    with pytest.raises(ConfigError, match="steps"):
        pipe.generate(_embeddings(trained, 1), sampler="fast_heun_30", steps=0)
    with pytest.raises(ConfigError, match="unknown sampler preset"):
        pipe.generate(None, num_images=1, sampler="fastest")
    with pytest.raises(PipelineError, match="num_images"):
        pipe.generate(None)
    with pytest.raises(PipelineError, match="NaN"):
        pipe.generate(np.full((1, 192), np.nan, np.float32))


def test_generate_from_tiles_embeds_with_the_conditioning_encoder(trained, pipe):
    tiles = pipe.generate(_embeddings(trained, 2), sampler=FAST, seed=1)
    emb = pipe.embed(tiles)
    assert emb.shape == (2, 192) and emb.dtype == torch.float32
    assert torch.equal(emb, emb.half().float())  # rounded to fp16 like the stored training embeddings
    more = pipe.generate_from_tiles(tiles, sampler=FAST, seed=5)
    assert torch.equal(torch.from_numpy(more), torch.from_numpy(pipe.generate(emb, sampler=FAST, seed=5)))
    assert pipe.describe()["conditioning"]["encoder"] == ENCODER


def test_checkpoint_sources(trained, tmp_path):
    by_run_folder = CytoSynPipeline.from_checkpoint(trained["root"] / "run", device="cpu")
    assert by_run_folder.source.endswith("last.ckpt")
    zero = tmp_path / "last.ckpt"  # the shape of a DeepSpeed checkpoint folder
    (zero / "checkpoint").mkdir(parents=True)
    (zero / "latest").write_text("checkpoint")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(PipelineError, match="needs DeepSpeed"):
            CytoSynPipeline.from_checkpoint(zero, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="without checkpoints"):
        CytoSynPipeline.from_checkpoint(tmp_path / "empty")
    not_ours = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, not_ours)
    with pytest.raises(PipelineError, match="not a cytosyn training checkpoint"):
        CytoSynPipeline.from_checkpoint(not_ours)


def test_checkpoint_parts_use_the_ema_weights(trained):
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    _, state = parts_from_checkpoint(ckpt)
    _, raw_state = parts_from_checkpoint(ckpt, weights="raw")
    key = "model.final_layer.linear.weight"
    assert torch.equal(state[key], ckpt["state_dict"]["ema.module." + key])
    assert not torch.equal(state[key], raw_state[key])


# ---- cytosyn sample ----------------------------------------------------------------------------------------


def _sample_cfg(trained, output: Path, **extra) -> SampleConfig:
    data = {
        "model": str(trained["release"]),
        "output": str(output),
        "split": str(trained["split"]),
        "max_references": 10,
        "samples_per_shard": 4,
        "batch_size": 3,
        "sampler": {"preset": "cytosyn_default", "steps": 3},
        "codec": {"format": "png", "png_compress_level": 1},
        "grid_size": 6,
        "progress": False,
        "device": "cpu",
    } | extra
    return build_config(SampleConfig, data)


def test_sample_conditioned_on_a_split_writes_a_valid_dataset_and_resumes(trained, tmp_path):
    out = tmp_path / "samples"
    summary = run_sample(_sample_cfg(trained, out))
    assert summary.done == 3 and summary.skipped == 0 and summary.manifest_written
    manifest = read_manifest(out)
    assert manifest.samples == 10 and [s.count for s in manifest.shards] == [4, 4, 2]
    assert manifest.image_member == "png" and manifest.stats["mode"] == "conditional"
    refs = [
        key
        for (key, _), _ in iter_shard_samples(
            trained["split"] / read_manifest(trained["split"]).shards[0].name
        )
    ]
    refs += [
        key
        for (key, _), _ in iter_shard_samples(
            trained["split"] / read_manifest(trained["split"]).shards[1].name
        )
    ]
    seen = []
    for entry in manifest.shards:
        import hashlib

        assert hashlib.sha256((out / entry.name).read_bytes()).hexdigest() == entry.sha256
        for (key, members), _ in iter_shard_samples(out / entry.name):
            m = dict(members)
            meta = json.loads(m["json"])
            assert "." not in key and set(m) == {"png", "json"}
            assert (
                meta["reference_key"] == meta["reference"]["key"] and key == f"{meta['reference_key']}__gen"
            )
            assert meta["reference"]["split"] == "train" and meta["sampler"]["steps"] == 3
            assert meta["codec"]["format"] == "png" and meta["tile_px"] == 224 and meta["mpp"] == 0.5
            seen.append(meta["reference_key"])
    assert seen == refs[:10]
    assert (out / "grid.png").is_file() and (out / "config.yaml").is_file()

    # Kill simulation: the last shard, its state and the manifest are gone; a partial file is left.
    before = {e.name: e.sha256 for e in manifest.shards}
    last = manifest.shards[-1].name
    (out / last).unlink()
    (out / ".sample" / f"{last}.json").unlink()
    (out / "manifest.json").unlink()
    (out / f".{last}.partial").write_bytes(b"torn")
    mtimes = {n: (out / n).stat().st_mtime_ns for n in before if n != last}
    again = run_sample(_sample_cfg(trained, out, batch_size=2))  # another batch size: same bytes
    assert again.done == 1 and again.skipped == 2 and again.manifest_written
    assert {e.name: e.sha256 for e in read_manifest(out).shards} == before
    assert {n: (out / n).stat().st_mtime_ns for n in mtimes} == mtimes
    assert not (out / f".{last}.partial").exists()

    with pytest.raises(ConfigError, match="other settings"):
        run_sample(_sample_cfg(trained, out, seed=1))


def test_sample_parts_and_unconditional_mode(trained, tmp_path):
    out = tmp_path / "uncond"
    base = {"mode": "unconditional", "num_images": 5, "samples_per_shard": 2, "model": str(trained["ckpt"])}
    first = run_sample(_sample_cfg(trained, out, part="0/2", **base))
    assert first.done == 2 and not first.manifest_written  # shards 0 and 2; shard 1 belongs to part 1/2
    second = run_sample(_sample_cfg(trained, out, part="1/2", **base))
    assert second.done == 1 and second.manifest_written
    manifest = read_manifest(out)
    assert manifest.samples == 5 and (out / "grid.png").is_file()
    metas = [
        json.loads(dict(m)["json"]) for e in manifest.shards for (_, m), _ in iter_shard_samples(out / e.name)
    ]
    assert [m["index"] for m in metas] == [0, 1, 2, 3, 4]
    assert all(m["reference_key"] is None and m["mode"] == "unconditional" for m in metas)


def test_sample_config_is_validated_before_work(trained, tmp_path):
    with pytest.raises(ConfigError, match="split"):
        build_config(SampleConfig, {"model": str(trained["release"])})
    with pytest.raises(ConfigError, match="guidance_scale"):
        _sample_cfg(trained, tmp_path / "x", sampler={"guidance_scale": -2})
    with pytest.raises(ConfigError, match="unknown sampler preset"):
        _sample_cfg(trained, tmp_path / "x", sampler={"preset": "nope"})
    with pytest.raises(ConfigError, match="part"):
        _sample_cfg(trained, tmp_path / "x", part="2/2")
