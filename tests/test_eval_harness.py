"""The evaluation harness: the PixCell adapter, the overfitting / domain / sweep studies and ``run_eval``.

Real tiles (the bundled Aperio slide, lossless PNG) split into a "training patient" and a "held-out
patient"; random-initialised models of the real architectures (a ViT-Ti/16 extractor, a tiny PixArt +
16-channel VAE folder with PixCell-256's structure); and fake generators that return exact copies of
training or held-out tiles, whose scores are known in advance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_tile, write_split
from cytosyn.eval.features import build_extractors
from cytosyn.eval.harness import HarnessOptions, prepare_reference
from cytosyn.eval.images import ImageSet
from cytosyn.eval.metrics import IncompatibleStatsError, frechet_distance_ci
from cytosyn.eval.pixcell import PixCellError, PixCellGenerator, apply_fov_policy, make_tiny_pixcell_folder
from cytosyn.eval.run import EvalConfig, render_plots, run_eval
from cytosyn.eval.studies import STUDIES, memorisation, overfitting_study, sweep_study
from headless import open_in_browser
from PIL import Image

from cytosyn.config import ConfigError, build_config
from cytosyn.formats import slide_dir
from cytosyn.generation import TileGenerator
from cytosyn.shardio import iter_shard_samples

N = 10  # tiles per patient
TINY = {"name": "vit-tiny16", "random_init": True}  # a registry encoder, random-initialised (192-d)
FAST = HarnessOptions(n_boot=4, kid_subset_size=N, kid_subsets=4, batch_size=16, keep_samples=4)


class PixelStats:
    """A 24-d test extractor (colour mean and std on a 2×2 grid): the studies' logic without a network's cost."""

    name, dim = "pixel-stats", 24

    def to(self, device):
        return self

    def features(self, images):
        x = images.float().reshape(images.shape[0], 2, images.shape[1] // 2, 2, images.shape[2] // 2, 3)
        return torch.cat([x.mean((2, 4)).flatten(1), x.std((2, 4)).flatten(1)], 1) / 255

    def settings(self, tile_hw):
        return {
            "encoder": "pixel-stats",
            "weights": "none",
            "layer": "2x2 mean+std",
            "resize": {"method": "none"},
        }

    def describe(self):
        return {"name": self.name, "dim": self.dim}


@pytest.fixture(scope="module")
def data(tmp_path_factory, fixture_slide) -> dict:
    """Two packed splits of real 224-px PNG tiles: patient A (train) and patient B (held out)."""
    root = tmp_path_factory.mktemp("harness")
    run_tile([fixture_slide], root / "tiles", run={"overview": False})
    shards = sorted(slide_dir(root / "tiles", "cmu_small_region").glob("*.tar"))
    samples = [(key, dict(members)) for s in shards for (key, members), _ in iter_shard_samples(s)]
    assert len(samples) >= 2 * N
    train = write_split(root / "train", [(f"patA__{k.split('__')[1]}", m) for k, m in samples[:N]], "train")
    held = write_split(
        root / "heldout", [(f"patB__{k.split('__')[1]}", m) for k, m in samples[N : 2 * N]], "test"
    )
    exts = {"pixel-stats": PixelStats()}
    train_set, held_set = ImageSet.from_split(train), ImageSet.from_split(held)
    return {
        "root": root,
        "train": train,
        "heldout": held,
        "exts": exts,
        "train_ref": prepare_reference(train_set, exts, role="train", options=FAST),
        "held_ref": prepare_reference(held_set, exts, role="heldout", options=FAST),
        "train_tiles": np.stack([t.image for t in train_set]),
        "held_tiles": np.stack([t.image for t in held_set]),
    }


@pytest.fixture(scope="module")
def tiny_pixcell(tmp_path_factory) -> Path:
    return make_tiny_pixcell_folder(tmp_path_factory.mktemp("pixcell") / "tiny-pixcell-256")


class BankGenerator:
    """A fake `TileGenerator` returning tiles of a fixed bank in order (ignores the embeddings' values)."""

    def __init__(self, bank, name, conditioning_encoder="fake-pixels", mpp=0.5, noise_per_step=0.0):
        self.bank, self.name, self.conditioning_encoder = bank, name, conditioning_encoder
        self.tile_px, self.mpp, self.noise = bank.shape[1], mpp, noise_per_step
        self.calls = 0

    def embed(self, images):
        return torch.from_numpy(np.asarray(images)[:, ::32, ::32].reshape(len(images), -1).astype(np.float32))

    def generate(
        self, embeddings, *, num_images=None, steps=None, guidance_scale=None, seed=0, batch_size=16
    ):
        self.calls += 1
        out = self.bank[np.arange(len(embeddings)) % len(self.bank)].copy()
        if self.noise:  # worse with fewer steps: a stand-in for a sampler's discretisation error
            rng = np.random.default_rng(seed)
            out = np.clip(out + rng.normal(0, self.noise / (steps or 1), out.shape), 0, 255).astype(np.uint8)
        return out

    def describe(self):
        return {"kind": "fake", "name": self.name}


# -------------------------------------------------------------------------------------------- PixCell
def test_pixcell_adapter_end_to_end(tiny_pixcell, data):
    gen = PixCellGenerator(tiny_pixcell, steps=2)
    assert isinstance(gen, TileGenerator)
    assert (gen.name, gen.tile_px, gen.mpp, gen.conditioning_encoder) == (
        "pixcell-256-random-init",
        224,
        0.5,
        "dinov2-vits14",
    )
    refs = data["held_tiles"][:2]
    emb = gen.embed(refs)
    assert emb.shape == (2, 384) and emb.dtype == torch.float32
    out = gen.generate(emb, seed=1, batch_size=2)
    assert out.shape == (2, 224, 224, 3) and out.dtype == np.uint8 and out.std() > 0
    one = gen.generate(emb[:1], seed=1)
    assert np.array_equal(one, gen.generate(emb[:1], seed=1))  # deterministic per seed
    assert not np.array_equal(one, gen.generate(emb[:1], seed=2))
    assert np.abs(one.astype(int) - out[:1]).max() <= 2  # the noise is per image: batch size barely matters
    assert gen.generate(None, num_images=1).shape == (
        1,
        224,
        224,
        3,
    )  # unconditional (learned null embedding)

    # the FOV policy: center_crop is exactly the central 224 px of the native 256-px tile, no resampling
    native_gen = PixCellGenerator(tiny_pixcell, steps=2, fov_policy="none")
    native = native_gen.generate(emb[:1], seed=1)
    assert native.shape == (1, 256, 256, 3) and native_gen.mpp == 0.5
    assert np.array_equal(native[:, 16:240, 16:240], one)
    resampled = apply_fov_policy(native, "resample", 224)
    assert resampled.shape == (1, 224, 224, 3)
    desc = gen.describe()
    assert desc["fov"]["policy"] == "center_crop" and desc["fov"]["resampling"] == "none"
    assert desc["fov"]["crop_box_xyxy"] == [16, 16, 240, 240] and desc["fov"]["fov_um"] == 112.0
    assert (
        desc["random_init"]
        and desc["vae"]["scaling_factor"] == 1.5305
        and desc["vae"]["shift_factor"] == 0.0609
    )
    assert len(desc["uncond_embedding"]["source"]) == 2  # the transformer buffer and the file, checked equal
    json.dumps(desc)
    res = PixCellGenerator(tiny_pixcell, steps=2, fov_policy="resample")
    assert res.tile_px == 224 and abs(res.mpp - 0.5 * 256 / 224) < 1e-12
    assert res.describe()["fov"]["fov_um"] == 128.0


def test_pixcell_folder_errors(tiny_pixcell, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_pixcell, bad)
    cfg = json.loads((bad / "transformer" / "config.json").read_text())
    (bad / "transformer" / "config.json").write_text(json.dumps(cfg | {"caption_num_tokens": 16}))
    with pytest.raises(PixCellError, match="multi-token"):
        PixCellGenerator(bad)
    (bad / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PixCellError, match="fov_policy"):
        PixCellGenerator(bad, fov_policy="stretch")
    with pytest.raises(PixCellError, match="no VAE"):
        PixCellGenerator(bad, vae_path=tmp_path / "nowhere")
    from safetensors.torch import save_file

    save_file({"uncond_embedding": torch.zeros(1, 384)}, str(bad / "uncond_embedding.safetensors"))
    with pytest.raises(PixCellError, match="differ"):
        PixCellGenerator(bad)


# ---------------------------------------------------------------------------------------- overfitting
def test_overfitting_study_detects_memorisation(data):
    exts, train, held = data["exts"], data["train_ref"], data["held_ref"]
    copier = overfitting_study(
        BankGenerator(data["train_tiles"], "copies-train"), train, held, exts, options=FAST
    )
    m = copier.metrics
    fd_train = m["comparisons"]["train"]["pixel-stats"]["fd"].estimate
    fd_held = m["comparisons"]["heldout"]["pixel-stats"]["fd"].estimate
    assert fd_train < 1e-6 * fd_held and fd_held > 0
    assert m["overfitting_gap"]["pixel-stats"].estimate > 0
    assert m["memorisation"]["fraction_closer_to_train"].estimate == 1.0
    assert m["memorisation"]["near_copy_fraction"] == 1.0
    # the FD interval is the metric core's frechet_distance_ci (same replicates)
    gen_feats = exts["pixel-stats"].features(torch.from_numpy(data["train_tiles"])).numpy()
    core = frechet_distance_ci(gen_feats, held.stats["pixel-stats"], n_boot=FAST.n_boot, seed=0, gen_metadata={
        k: v for k, v in held.stats["pixel-stats"].metadata.items()})  # fmt: skip
    ours = m["comparisons"]["heldout"]["pixel-stats"]["fd"]
    assert np.allclose(ours[:4], core[:4], rtol=1e-4)  # estimate, low, high, se

    honest = overfitting_study(
        BankGenerator(data["held_tiles"], "copies-heldout"), train, held, exts, options=FAST
    )
    h = honest.metrics
    assert (
        h["comparisons"]["heldout"]["pixel-stats"]["fd"].estimate
        < 1e-6 * h["comparisons"]["train"]["pixel-stats"]["fd"].estimate
    )
    assert h["overfitting_gap"]["pixel-stats"].estimate < 0
    assert h["memorisation"]["fraction_closer_to_train"].estimate == 0.0
    # tile i was "generated" from held-out tile i and is that very tile: fidelity 1 in an independent encoder
    assert h["conditional_fidelity"]["extractor"] == "pixel-stats"
    assert h["conditional_fidelity"]["estimate"].estimate == pytest.approx(1.0)
    assert h["conditional_fidelity"]["unpaired_baseline"] < 1.0
    # the figures: labelled axes, CIs as error bars, held-out next to train
    from cytosyn.eval.studies.overfitting import memorisation_figure, overfitting_figure

    ax = overfitting_figure(copier).axes[0]
    assert ax.get_ylabel() == "Fréchet distance to generated tiles" and ax.get_xlabel() == "reference tiles"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["held-out patients", "training patients"]
    from matplotlib.container import BarContainer, ErrorbarContainer

    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)  # the 95% CI whiskers
    heights = [b.get_height() for b in bars]
    assert heights[0] == pytest.approx(fd_held) and heights[1] == pytest.approx(fd_train, abs=1e-9)
    hist = memorisation_figure(copier).axes[0]
    assert "nearest training" in hist.get_xlabel() and hist.get_ylabel() == "generated tiles"
    for result in (copier, honest):
        text = json.dumps(result.to_dict(), allow_nan=False)  # strict JSON
        assert "pixel-stats" in text and result.generated["count"] == N
        assert result.settings["prdc_k"] == 5 and result.references["heldout"]["codec_label"] == "png"


def test_memorisation_baseline_and_equalising():
    rng = np.random.default_rng(0)
    train, held = rng.normal(size=(40, 8)), rng.normal(size=(20, 8))
    mem = memorisation(rng.normal(size=(20, 8)), train, held, n_boot=10)
    assert mem["n_train_candidates"] == mem["n_heldout_candidates"] == 20
    assert 0.2 < mem["fraction_closer_to_train"].estimate < 0.8
    assert 0.2 < mem["heldout_baseline_fraction"] < 0.8


def test_conditional_fidelity_refuses_the_conditioning_encoder(data):
    gen = BankGenerator(data["held_tiles"], "conditioned-on-vit", conditioning_encoder="vit-tiny16")
    held = ImageSet.from_split(data["heldout"])
    with pytest.raises(ValueError, match="other than the conditioning one"):
        overfitting_study(gen, held, held, build_extractors([TINY]), fidelity_extractor="vit-tiny16")
    gen.conditioning_encoder = "pixel-stats"
    with pytest.raises(ValueError, match="other than the conditioning one"):
        overfitting_study(
            gen, data["train_ref"], data["held_ref"], data["exts"], fidelity_extractor="pixel-stats"
        )
    assert gen.calls == 0


def test_guards_refuse_before_generating(data):
    exts, held = data["exts"], data["held_ref"]
    wrong_fov = BankGenerator(data["held_tiles"], "128um", mpp=0.5 * 256 / 224)
    with pytest.raises(IncompatibleStatsError, match="mpp"):
        overfitting_study(wrong_fov, data["train_ref"], held, exts, options=FAST)
    assert wrong_fov.calls == 0
    # a reference stored as JPEG q90 compares with generated tiles only through the same codec
    jpeg_ref = ImageSet.from_arrays(
        data["held_tiles"],
        codec={"format": "jpeg", "quality": 90, "subsampling": "4:2:0"},
        mpp=0.5,
        name="jpeg",
    )
    ref = prepare_reference(jpeg_ref, exts, role="jpeg", options=FAST)
    gen = BankGenerator(data["held_tiles"], "lossless")
    with pytest.raises(IncompatibleStatsError, match="codecs differ"):
        sweep_study(gen, ref, exts, steps=[1], guidance=[1.0], options=FAST)
    assert gen.calls == 0
    ok = sweep_study(gen, ref, exts, steps=[1], guidance=[1.0], options=FAST, generated_codec={"jpeg": 90})
    assert ok.metrics["cells"][0]["generated"]["codec_label"] == "raw+jpeg-q90-4:2:0"


def test_reference_cache_is_reused_and_guarded(data, tmp_path):
    opts = HarnessOptions(**{**FAST.__dict__, "cache_dir": tmp_path})
    tiny = build_extractors([TINY])
    first = prepare_reference(ImageSet.from_split(data["heldout"]), tiny, role="heldout", options=opts)
    again = prepare_reference(ImageSet.from_split(data["heldout"]), tiny, role="heldout", options=opts)
    assert first.cache["vit-tiny16"].startswith("saved") and again.cache["vit-tiny16"].startswith("loaded")
    assert (
        np.array_equal(first.features["vit-tiny16"], again.features["vit-tiny16"])
        and again.keys == first.keys
    )
    other = build_extractors([TINY | {"seed": 1}])  # other weights, same name
    with pytest.raises(IncompatibleStatsError, match="weights"):
        prepare_reference(ImageSet.from_split(data["heldout"]), other, role="heldout", options=opts)
    with pytest.raises(IncompatibleStatsError, match="dataset_hash"):  # another reference set
        prepare_reference(ImageSet.from_split(data["train"]), tiny, role="heldout", options=opts)


# ---------------------------------------------------------------------------------------------- sweep
def test_sweep_study_fd_vs_steps(data, tmp_path):
    gen = BankGenerator(data["held_tiles"], "noisy", noise_per_step=60.0)
    result = sweep_study(gen, data["held_ref"], data["exts"], steps=[1, 8], guidance=[1.0, 2.0], options=FAST)
    cells = {
        (c["steps"], c["guidance_scale"]): c["fd"]["pixel-stats"].estimate for c in result.metrics["cells"]
    }
    assert len(cells) == 4 and cells[(8, 1.0)] < cells[(1, 1.0)]
    plots = render_plots(tmp_path, result)
    assert set(plots) == {"fd_vs_steps", "samples"}
    with Image.open(plots["fd_vs_steps"]) as im:
        assert im.size[0] > 300 and im.size[1] > 200 and np.asarray(im.convert("L")).std() > 5
    from cytosyn.eval.studies.sweep import fd_vs_steps_figure

    ax = fd_vs_steps_figure(result).axes[0]
    assert ax.get_xlabel() == "sampling steps" and ax.get_ylabel() == "FD in pixel-stats"
    assert len(ax.containers) == 2  # one errorbar line per guidance scale
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["guidance 1", "guidance 2"]
    json.dumps(result.to_dict(), allow_nan=False)


# -------------------------------------------------------------------------------------------- run_eval
def _cfg(tmp_path: Path, data: dict, **over) -> EvalConfig:
    base = {
        "study": "overfitting",
        "references": {"heldout": str(data["heldout"]), "train": str(data["train"])},
        "extractors": [TINY],
        "n": 6,
        "n_boot": 2,
        "kid_subset_size": 6,
        "kid_subsets": 2,
        "grid_images": 3,
        "device": "cpu",
        "output": str(tmp_path / "report"),
    }
    return build_config(EvalConfig, base | over)


def test_run_eval_pixcell_overfitting_report(data, tiny_pixcell, tmp_path):
    cache = tmp_path / "cache"
    gen = {"kind": "pixcell", "path": str(tiny_pixcell), "steps": 2, "batch_size": 3}
    cfg = _cfg(tmp_path, data, generator=gen, cache_dir=str(cache))
    out = run_eval(cfg)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["format"] == "cytosyn.eval-report/1" and doc["study"] == "overfitting"
    res = doc["results"][0]
    assert res["generator"]["fov"]["policy"] == "center_crop" and res["generator"]["random_init"] is True
    assert res["generated"]["count"] == 6 and res["generated"]["fov_um"] == 112.0
    assert res["metrics"]["conditional_fidelity"]["extractor"] == "vit-tiny16"  # not the conditioning encoder
    assert res["extractors"]["vit-tiny16"]["is_conditioning_encoder"] is False
    assert "fd/vit-tiny16/heldout" in doc["metrics"] and "fd_gap/vit-tiny16" in doc["metrics"]
    ci = doc["intervals"]["fd/vit-tiny16/heldout"]
    # a percentile bootstrap of a biased statistic need not contain the point estimate: only order is checked
    assert ci["low"] <= ci["high"] and ci["estimate"] == doc["metrics"]["fd/vit-tiny16/heldout"]
    assert "95% bootstrap CI" in (out / "report.md").read_text()
    for name in ("report.md", "eval_config.yaml", "overfitting_fd.png", "memorisation.png", "samples.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "Overfitting study" in md and "Memorisation" in md and "center_crop" in md and "random" in md
    assert {p.name for p in cache.iterdir()} >= {"heldout__vit-tiny16.npz", "train__vit-tiny16.npz"}
    # the cache refuses reference statistics made with other settings (the metric core's guard)
    other = _cfg(tmp_path, data, generator=gen, cache_dir=str(cache), extractors=[TINY | {"seed": 7}])
    with pytest.raises(IncompatibleStatsError, match="weights"):
        run_eval(other)


def test_run_eval_folder_domain_study(data, tmp_path):
    gen_dir = tmp_path / "generated"
    gen_dir.mkdir()
    keys = [t.key for t in ImageSet.from_split(data["heldout"], limit=6)]
    for key, tile in zip(keys, data["held_tiles"]):
        Image.fromarray(tile).save(gen_dir / f"{key}.png")
    cfg = _cfg(
        tmp_path,
        data,
        study="domain",
        generator={"kind": "folder", "path": str(gen_dir), "mpp": 0.5},
        references={"reference": str(data["heldout"]), "others": {"oncology": str(data["train"])}},
        seeds=[0, 1],
    )
    out = run_eval(cfg)
    doc = json.loads((out / "metrics.json").read_text())
    res = doc["results"][0]["metrics"]
    assert res["conditional_fidelity"]["estimate"]["estimate"] == pytest.approx(1.0)  # paired by file name
    assert res["comparisons"]["reference"]["vit-tiny16"]["fd"]["estimate"] < 1e-6
    assert res["domain_shift_fd"]["oncology"]["vit-tiny16"] > 0
    assert doc["seeds"] == [0, 1] and doc["aggregate"]["fd/vit-tiny16/oncology"]["std"] == 0.0
    assert "Over seeds" in (out / "report.md").read_text()
    # one HTML report per run: figures inline, provenance table, metrics with CIs, in a real browser
    html = (out / "report.html").read_text()
    assert doc["html"] == "report.html" and 'src="data:image/png;base64,' in html
    assert not re.search(r"""(src|href)=["']https?:|url\(https?:""", html)  # nothing fetched from a network
    seen = open_in_browser(out / "report.html", tmp_path / "screenshot.png")
    assert seen["title"] == "cytosyn evaluation: domain study"
    assert seen["images"] and all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    assert all(url.startswith(("file:", "data:")) for url in seen["requests"])  # readable offline
    for text in ("Provenance", "FD [95% CI]", "config hash", "Domain study"):
        assert text in seen["text"], text
    with Image.open(tmp_path / "screenshot.png") as shot:
        assert shot.size[0] >= 1000 and shot.size[1] > 1000
        assert np.asarray(shot.convert("L")).std() > 10  # not a blank page


def test_html_report_marks_a_missing_figure_instead_of_a_broken_image(tmp_path):
    from cytosyn.eval.report import write_html

    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    write_html(
        tmp_path, "# t\n\n![ok](ok.png)\n\n![gone](gone.png)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", "t"
    )
    html = (tmp_path / "report.html").read_text()
    assert (
        html.count("data:image/png;base64,") == 1 and "figure missing: gone.png" in html and "<table>" in html
    )


def test_eval_config_is_validated(data, tmp_path):
    with pytest.raises(ConfigError, match=r"references\.train"):
        _cfg(
            tmp_path, data, generator={"kind": "folder", "path": ".", "mpp": 0.5}, references={"heldout": "x"}
        )
    with pytest.raises(ConfigError, match="cannot be swept"):
        _cfg(tmp_path, data, study="sweep", generator={"kind": "folder", "path": ".", "mpp": 0.5})
    with pytest.raises(ConfigError, match="fov_policy"):
        _cfg(tmp_path, data, generator={"kind": "pixcell", "path": ".", "fov_policy": "stretch"})
    with pytest.raises(ConfigError, match="mpp"):
        _cfg(tmp_path, data, generator={"kind": "folder", "path": "."})


def test_every_config_study_is_registered_and_old_imports_still_work():
    from typing import get_args

    import cytosyn.eval.harness as harness

    assert set(get_args(EvalConfig.model_fields["study"].annotation)) == set(STUDIES)
    for name, study in STUDIES.items():
        assert study.name == name and all(callable(f) for f in (study.run, study.headline, study.markdown))
    assert harness.overfitting_study is overfitting_study  # moved to cytosyn.eval.studies, still importable
    with pytest.raises(AttributeError):
        harness.no_such_study  # noqa: B018


def test_aggregate_over_seeds_std():
    """Seed-free metrics (identical per seed) get std 0, not a rounding residue (numpy gives 1.4e-16 for
    three seeds of 0.7); a NaN seed stays NaN."""
    from types import SimpleNamespace

    from cytosyn.eval.run import aggregate

    def result(values):
        return SimpleNamespace(headline=lambda: values)

    seeds = [result({"a": 0.7, "b": float(i), "c": float("nan") if i == 2 else 1.0}) for i in range(3)]
    agg = aggregate(seeds)
    assert agg["a"]["std"] == 0.0 and agg["b"]["std"] == 1.0 and np.isnan(agg["c"]["std"])
