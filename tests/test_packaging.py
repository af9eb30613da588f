"""The installed package contains every module: a non-editable install must work, not only `pip install -e`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_fresh_interpreter_imports_the_whole_stack():
    code = (
        "import cytosyn.training.run, cytosyn.data_prep.featurize, cytosyn.eval.metrics, cytosyn.sampling, "
        "cytosyn.models.encoders, cytosyn.models.vae; import timm, lightning, diffusers; "
        "from diffusers import AutoencoderKL; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
