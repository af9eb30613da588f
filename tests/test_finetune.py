"""Few-shot fine-tuning (``cytosyn finetune``), adapter folders and label-conditioned generation.

A module fixture featurizes labelled tiles of the real fixture slide (two classes, four patients; random
vit-tiny16 + tiny-f8), trains a SiT-T/2 base for 6 steps on three patients and releases it; the fourth
patient is the held-out "test" split. Each test then fine-tunes that real release.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_tile_samples
from cytosyn.data_prep.featurize import run_featurize
from cytosyn.data_prep.featurize_config import FeaturizeConfig

from cytosyn.adapters import ADAPTER_FILE, AdapterError, read_adapter_folder
from cytosyn.config import build_config
from cytosyn.manifest import SplitManifest, read_manifest, write_manifest
from cytosyn.models.sit import LabelEmbedder
from cytosyn.pipeline import CytoSynPipeline
from cytosyn.release import run_release
from cytosyn.shardio import ShardWriter, iter_shard_samples
from cytosyn.training.config import TrainConfig
from cytosyn.training.fewshot import FewShotConfig, FewShotError, select_few_shot
from cytosyn.training.finetune import FinetuneConfig, run_finetune
from cytosyn.training.run import run_training

ENCODER = "vit-tiny16"
CLASSES = ("stroma", "tumour")
FAST = {"method": "euler", "steps": 3, "t_end": 0.0, "guidance_scale": 2.0, "guidance_interval": (0.0, 1.0)}


def labelled_split(folder: Path, samples, split: str) -> Path:
    """Samples (key, members) with label / patient / slide set in their JSON, as a split with a manifest."""
    writer = ShardWriter(folder, lambda i: f"{split}-{i:06d}.tar", max_samples=16)
    patients, slides = set(), set()
    for key, members, label, patient in samples:
        meta = json.loads(members["json"]) | {
            "label": label,
            "patient_id": patient,
            "slide_id": f"{patient}-S1",
        }
        patients.add(patient)
        slides.add(meta["slide_id"])
        writer.write({"__key__": key, **members, "json": json.dumps(meta).encode()})
    shards = writer.close()
    write_manifest(
        SplitManifest(
            split=split, image_member="jpg", samples=len(samples), shards=[s.as_dict() for s in shards],
            patients=sorted(patients), slides=sorted(slides),
        ),
        folder,
    )  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory, fixture_slide) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    raw = fixture_tile_samples(root / "tiles", fixture_slide)[:32]
    tagged = [(k, m, CLASSES[i % 2], f"P{i % 4}") for i, (k, m) in enumerate(raw)]
    out = {"root": root}
    for name, part in (
        ("train", [t for t in tagged if t[3] != "P3"]),
        ("test", [t for t in tagged if t[3] == "P3"]),
    ):
        labelled_split(root / "dataset" / name, part, name)
        run_featurize(
            build_config(
                FeaturizeConfig,
                {
                    "input": str(root / "dataset" / name),
                    "output": str(root / "features" / name),
                    "encoders": [{"name": ENCODER, "random_init": True, "outputs": ["cls"]}],
                    "vae": {"name": "tiny-f8", "random_init": True},
                    "decode_check": 0,
                    "progress": False,
                },
            )
        )
        out[name] = root / "features" / name
    cfg = build_config(
        TrainConfig,
        {
            "run_dir": str(root / "base_run"),
            "data": {
                "train": str(out["train"]), "condition": ENCODER, "repa_target": None,
                "batch_size": 8, "num_workers": 0, "shuffle_buffer": 8,
            },
            "model": {"preset": "SiT-T/2"},
            "repa": {"weight": 0.0},
            "optim": {"lr": 1e-3},
            "ema": {"decay": 0.5},
            "trainer": {"max_steps": 6, "accelerator": "cpu", "log_every_n_steps": 1, "checkpoint_every_n_steps": 6},
            "validation": {"every_n_steps": 0},
            "logging": {"wandb": "disabled"},
        },
    )  # fmt: skip
    run_training(cfg)
    out["release"] = root / "release"
    run_release(root / "base_run", out["release"])
    return out


def ft_config(base: dict[str, Path], run_dir: Path, **extra) -> FinetuneConfig:
    data = {
        "base": str(base["release"]),
        "run_dir": str(run_dir),
        "data": {"train": str(base["train"]), "exclude": [str(base["test"])], "batch_size": 4},
        "few_shot": {"shots_per_class": 4, "seed": 0},
        "lora": {"rank": 4, "alpha": 8.0},
        "optim": {"lr": 1e-2},
        "trainer": {"max_steps": 4, "accelerator": "cpu", "log_every_n_steps": 1, "checkpoint_every_n_steps": 2},
    }  # fmt: skip
    for key, value in extra.items():
        if value is None:
            data.pop(key)
        elif isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return build_config(FinetuneConfig, data)


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    result = run_finetune(ft_config(base, run_dir))
    return {"run_dir": run_dir, "result": result}


def test_lora_trains_only_the_adapter_and_leaves_the_base_bit_identical(base, lora_run):
    from cytosyn.pipeline import CytoSynPipeline

    ckpt = torch.load(
        lora_run["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    state = ckpt["state_dict"]
    base_state = CytoSynPipeline.from_pretrained(base["release"], device="cpu").state_dict()
    changed_lora, compared = 0, 0
    for key, value in state.items():
        if not key.startswith("net.model."):
            continue
        name = key[len("net.model.") :]
        if ".lora_" in name:
            changed_lora += int("lora_B" in name and bool(value.abs().sum() > 0))
            continue
        if name.startswith("label_embedder."):
            assert value[: len(CLASSES)].abs().sum() > 0  # the class rows moved from zero
            continue
        plain = name.replace(".base_layer.", ".")
        assert torch.equal(value, base_state[f"model.{plain}"]), name  # bit for bit
        compared += 1
    assert compared > 20 and changed_lora > 0
    grads = [k for k, v in ckpt["optimizer_states"][0]["state"].items()]
    n_trainable = sum(
        1 for k in state if k.startswith("net.model.") and (".lora_" in k or "label_embedder" in k)
    )
    assert len(grads) == n_trainable  # the optimizer holds exactly the adapter's tensors


def test_adapter_folder_load_and_merge_give_the_same_samples(base, lora_run):
    adapter = lora_run["result"].adapter
    config, tensors = read_adapter_folder(adapter)
    assert config["labels"]["names"] == list(CLASSES) and config["labels"]["null_index"] == 2
    assert all(k.startswith(("lora.", "label_embedder.")) for k in tensors)  # only what changed
    base_pipe = CytoSynPipeline.from_pretrained(base["release"], device="cpu")
    assert config["base"]["weights_sha256"] == base_pipe.weights_sha256
    assert config["few_shot"]["per_class"]["stroma"]["used"] == 4
    pipe = CytoSynPipeline.from_pretrained(base["release"], device="cpu")
    pipe.load_adapter(adapter)
    labels = ["tumour", "stroma", "tumour"]
    unmerged = pipe.generate(None, labels=labels, sampler=FAST, seed=3, output="latent")
    assert pipe.merge_adapter() == 4 * 4  # 4 blocks × (qkv, proj, fc1, fc2)
    merged = pipe.generate(None, labels=labels, sampler=FAST, seed=3, output="latent")
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    uncond = base_pipe.generate(None, num_images=3, sampler=FAST, seed=3, output="latent")
    assert (unmerged - uncond).abs().max() > 1e-3  # the adapter changed the model


def test_label_generation_goes_through_the_label_embedding(base, lora_run, monkeypatch):
    pipe = CytoSynPipeline.from_pretrained(base["release"], device="cpu")
    pipe.load_adapter(lora_run["result"].adapter)
    calls = []
    original = LabelEmbedder.forward

    def spy(self, labels, drop):
        calls.append((labels.tolist(), drop.tolist()))
        return original(self, labels, drop)

    monkeypatch.setattr(LabelEmbedder, "forward", spy)
    pipe.generate(None, labels=["stroma", "tumour"], sampler=FAST, seed=0)
    assert calls and all(c[0] == [0, 1, 0, 1] for c in calls)  # CFG: the batch twice
    assert all(c[1] == [False, False, True, True] for c in calls)  # second half: the null label


def test_adapter_bad_inputs_are_refused(base, lora_run, tmp_path):
    adapter = lora_run["result"].adapter
    pipe = CytoSynPipeline.from_pretrained(base["release"], device="cpu")
    pipe.load_adapter(adapter)
    with pytest.raises(AdapterError, match="necrosis"):
        pipe.generate(None, labels=["necrosis"], sampler=FAST)
    other = CytoSynPipeline.from_pretrained(base["release"], device="cpu")
    with torch.no_grad():
        other.model.blocks[0].mlp.fc1.weight.add_(1e-3)  # another base
    other._state_sha = None
    with pytest.raises(AdapterError, match="another base"):
        other.load_adapter(adapter)
    tampered = tmp_path / "adapter"
    tampered.mkdir()
    for f in adapter.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    blob = bytearray((tampered / ADAPTER_FILE).read_bytes())
    blob[-1] ^= 1
    (tampered / ADAPTER_FILE).write_bytes(bytes(blob))
    with pytest.raises(AdapterError, match="altered"):
        CytoSynPipeline.from_pretrained(base["release"], device="cpu").load_adapter(tampered)


@pytest.mark.slow
def test_finetune_resumes_exactly(base, tmp_path):
    straight = run_finetune(ft_config(base, tmp_path / "a"))
    first = run_finetune(ft_config(base, tmp_path / "b", trainer={"max_steps": 2}))
    second = run_finetune(ft_config(base, tmp_path / "b"))
    assert second.train.resumed_from is not None
    losses = [h["loss"] for h in straight.train.history]
    assert [h["loss"] for h in first.train.history + second.train.history] == losses
    _, a = read_adapter_folder(straight.adapter)
    _, b = read_adapter_folder(second.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_start_leaves_no_config_and_a_corrected_rerun_proceeds(base, tmp_path):
    """The fine-tune's config is written once its start succeeded (like training's): a start that fails
    (here: a file where the checkpoint folder must be) leaves none, so a rerun with another config is not
    refused as "started with another config"."""
    from cytosyn.training.checkpoints import CheckpointWriteError
    from cytosyn.training.finetune import FINETUNE_CONFIG_FILE

    run_dir = tmp_path / "ft"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")
    with pytest.raises(CheckpointWriteError):
        run_finetune(ft_config(base, run_dir, optim={"lr": 5e-3}))
    assert not (run_dir / FINETUNE_CONFIG_FILE).exists()
    (run_dir / "checkpoints").unlink()
    result = run_finetune(ft_config(base, run_dir, trainer={"max_steps": 1}))  # lr 1e-2: another config
    assert result.train.status == "finished" and (run_dir / FINETUNE_CONFIG_FILE).is_file()


def test_few_shot_selection_is_seeded_per_class_and_refuses_leaks(base, tmp_path):
    cfg = FewShotConfig(shots_per_class=3, seed=7)
    one = select_few_shot(base["train"], cfg)
    assert one.keys == select_few_shot(base["train"], cfg).keys
    only_stroma = select_few_shot(base["train"], FewShotConfig(shots_per_class=3, seed=7, classes=["stroma"]))
    assert only_stroma.per_class["stroma"]["keys"] == one.per_class["stroma"]["keys"]  # classes independent
    assert one.keys != select_few_shot(base["train"], FewShotConfig(shots_per_class=3, seed=8)).keys
    many = select_few_shot(base["train"], FewShotConfig(shots_per_class=50))
    assert many.per_class["tumour"]["used"] == many.per_class["tumour"]["available"] == 8 and many.warnings
    with pytest.raises(FewShotError, match="fewer"):
        select_few_shot(base["train"], FewShotConfig(shots_per_class=50, too_few="refuse"))
    with pytest.raises(FewShotError, match="excluded"):
        select_few_shot(base["train"], cfg, exclude=[base["train"]])
    with pytest.raises(FewShotError, match="no tiles of class"):
        select_few_shot(base["train"], FewShotConfig(classes=["necrosis"]))


@pytest.mark.slow
def test_labelled_sample_writes_labels_and_provenance(base, lora_run, tmp_path):
    from cytosyn.sample import SampleConfig, run_sample

    out = tmp_path / "synthetic"
    cfg = build_config(
        SampleConfig,
        {
            "model": str(base["release"]), "adapter": str(lora_run["result"].adapter), "mode": "labelled",
            "per_class": 3, "output": str(out), "sampler": {"overrides": FAST}, "device": "cpu",
            "progress": False, "grid_size": 0,
        },
    )  # fmt: skip
    run_sample(cfg)
    manifest = read_manifest(out)
    assert manifest.samples == 6 and manifest.stats["tiles_per_label"] == {"stroma": 3, "tumour": 3}
    labels = []
    for (_, members), _ in iter_shard_samples(out / manifest.shards[0].name):
        meta = json.loads(dict(members)["json"])
        labels.append(meta["label"])
        assert meta["generated"] and meta["adapter"]["few_shot"]["patients"] == ["P0", "P1", "P2"]
    assert labels == ["stroma"] * 3 + ["tumour"] * 3
    assert np.all(np.array(labels) != None)  # noqa: E711


@pytest.mark.slow
def test_full_finetune_on_embeddings_stores_every_weight_and_reloads(base, tmp_path):
    result = run_finetune(
        ft_config(
            base,
            tmp_path / "full",
            conditioning="embedding",
            method="full",
            lora=None,
            trainer={"max_steps": 2},
        )
    )
    config, tensors = read_adapter_folder(result.adapter)
    assert config["kind"] == "full" and config["labels"] is None
    assert all(k.startswith("model.") for k in tensors) and "model.blocks.0.attn.qkv.weight" in tensors
    pipe = CytoSynPipeline.from_pretrained(base["release"], device="cpu")
    before = pipe.model.blocks[0].attn.qkv.weight.clone()
    pipe.load_adapter(result.adapter)
    assert not torch.equal(before, pipe.model.blocks[0].attn.qkv.weight)  # the tuned weights are in
    emb = torch.zeros(2, pipe.cond_dim)
    assert pipe.generate(emb, sampler=FAST, seed=0).shape[0] == 2
    with pytest.raises(Exception, match="not label-conditioned"):
        pipe.generate(None, labels=["stroma"], sampler=FAST)
