"""The config system (strict validation, dotted overrides, resolved config) and the CLI's contract."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from cytosyn.data_prep.tile_config import TileConfig

from cytosyn.cli import EXIT_ERROR, EXIT_OK, EXIT_OUTPUT, EXIT_PARTIAL, main
from cytosyn.config import ConfigError, apply_overrides, build_config, config_hash, load_config


def test_overrides_are_parsed_as_yaml_and_nested():
    tree = apply_overrides(
        {"grid": {"mpp": 0.5}}, ["grid.mpp=0.25", "slides.input=[a, b]", "run.overview=false"]
    )
    assert tree == {"grid": {"mpp": 0.25}, "slides": {"input": ["a", "b"]}, "run": {"overview": False}}
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        apply_overrides({}, ["grid.mpp"])


def test_unknown_key_and_wrong_type_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"grid\.mmp: unknown key"):
        build_config(TileConfig, {}, ["grid.mmp=0.5"])
    with pytest.raises(ConfigError, match=r"grid\.tile_px: .*integer"):
        build_config(TileConfig, {}, ["grid.tile_px=big"])
    with pytest.raises(ConfigError, match=r"run\.part"):
        build_config(TileConfig, {}, ["run.part=3/2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("codec:\n  format: jpeg2000\n")
    with pytest.raises(ConfigError, match=r"codec\.format"):
        load_config(TileConfig, bad)


def test_config_hash_tracks_content():
    a = build_config(TileConfig, {}, ["grid.mpp=0.5"])
    b = build_config(TileConfig, {}, [])
    c = build_config(TileConfig, {}, ["grid.mpp=0.25"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_cli_tile_writes_resolved_config_and_exit_codes(tmp_path, fixture_slide):
    cfg_file = tmp_path / "tile.yaml"
    cfg_file.write_text(yaml.safe_dump({"codec": {"format": "png"}, "run": {"progress": False}}))
    out = tmp_path / "out"
    assert (
        main(
            [
                "tile",
                "--config",
                str(cfg_file),
                "--input",
                str(fixture_slide),
                "--output",
                str(out),
                "grid.tile_px=112",
            ]
        )
        == EXIT_OK
    )
    resolved = load_config(TileConfig, out / "tile_config.yaml")
    assert resolved.grid.tile_px == 112 and resolved.codec.format == "png"
    assert resolved.slides.input == [fixture_slide]
    # A bad key is refused before any work.
    assert (
        main(["tile", "--input", str(fixture_slide), "--output", str(tmp_path / "o2"), "grid.nope=1"])
        == EXIT_ERROR
    )
    assert not (tmp_path / "o2").exists()
    # Some slides failing is a distinct exit code; an unusable output folder another.
    (tmp_path / "junk.svs").write_text("junk")
    assert (
        main(
            [
                "tile",
                "--input",
                str(tmp_path / "junk.svs"),
                "--output",
                str(tmp_path / "o3"),
                "run.progress=false",
            ]
        )
        == EXIT_PARTIAL
    )
    (tmp_path / "file").write_text("x")
    assert (
        main(["tile", "--input", str(fixture_slide), "--output", str(tmp_path / "file" / "o")]) == EXIT_OUTPUT
    )


def test_console_script_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "cytosyn.cli", "tile", "--help"], capture_output=True, text=True, check=True
    )
    assert "--part" in out.stdout and "KEY=VALUE" in out.stdout


def test_example_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    cfg = load_config(TileConfig, root / "tile.yaml")
    assert cfg == TileConfig(output=Path("tiles"))  # the commented example states the defaults


def test_exponent_floats_without_a_dot_are_numbers():
    tree = apply_overrides({}, ["optim.lr=2e-4", "a.b=1E3", "a.c=abc"])
    assert tree["optim"]["lr"] == pytest.approx(2e-4) and tree["a"]["b"] == 1000.0 and tree["a"]["c"] == "abc"


def test_training_presets_validate():
    from pathlib import Path

    from cytosyn.training.config import TrainConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    for name in ("train_tiny.yaml", "train_demo.yaml", "train_sit_b2.yaml", "train_sit_xl2.yaml"):
        cfg = load_config(TrainConfig, root / name)
        if cfg.optim.global_batch:
            assert cfg.optim.global_batch == cfg.images_per_step
    xl = load_config(TrainConfig, root / "train_sit_xl2.yaml")
    assert (xl.model.preset, xl.optim.lr, xl.ema.decay, xl.repa.weight, xl.images_per_step) == (
        "SiT-XL/2",
        1e-4,
        0.9999,
        0.5,
        256,
    )


def test_featurize_example_config_validates():
    from pathlib import Path

    from cytosyn.data_prep.featurize_config import FeaturizeConfig

    cfg = load_config(FeaturizeConfig, Path(__file__).resolve().parent.parent / "configs" / "featurize.yaml")
    assert cfg.encoders[0].outputs == ["cls", "patch"] and cfg.vae.name == "sd-vae-ft-ema"


def test_ingest_preset_is_valid_once_inputs_are_given():
    from pathlib import Path

    from cytosyn.data_prep.ingest_config import IngestConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    with pytest.raises(ConfigError, match="at least one class folder"):
        load_config(IngestConfig, root / "ingest.yaml")
    cfg = load_config(IngestConfig, root / "ingest.yaml", ["inputs.folders=[x]"])
    assert (cfg.grid.tile_px, cfg.grid.mismatch, cfg.codec.reencode.format) == (224, "refuse", "png")
    with pytest.raises(ConfigError, match=r"grid\.mismach"):
        load_config(IngestConfig, root / "ingest.yaml", ["inputs.folders=[x]", "grid.mismach=skip"])
