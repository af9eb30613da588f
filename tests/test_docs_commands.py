"""Every fenced shell command in README.md and docs/ is checked against the code, or says why it is not.

Three levels, from cheap to real:

1. every ``cytosyn ...`` line parses with the real argument parser (a renamed flag or verb fails here);
2. its ``--config`` file and dotted overrides build the verb's validated config (a renamed key, a wrong
   type, a preset that no longer exists fails here) — the verb itself is replaced by a stub, so nothing
   needs the data the example names;
3. the commands that run offline in seconds (``RUN``) are executed for real in a scratch folder.

Lines that are not cytosyn commands must match a ``SKIP`` rule with the reason they are not run; a new
docs command that matches nothing fails the test until it is classified here.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cytosyn.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# (regex on the command line) → why it is not run here
SKIP = {
    r"^make (demo|test)\b": "the README's own commands: CI runs both (.ci/run)",
    r"^python3 -m venv ": "creates a virtual environment: what `make install` does in CI",
    r"^pip install ": "installs packages: what `make install` does in CI",
    r"^(for |done; wait$|CUDA_VISIBLE_DEVICES=)": "a GPU fan-out loop: needs GPUs and real data (its cytosyn command is checked)",
    r"^nohup bash ": "runs a rendered launch script on a cluster node",
}
# cytosyn command lines that run for real (offline, seconds) in a scratch folder prepared by ``_sandbox``
RUN = [
    "cytosyn tile --config configs/tile.yaml grid.mpp=0.25 codec.format=png --input slides.txt --output tiles",
]

# verb → (module, function) replaced by a stub that stops once the config is built and validated
RUNNERS = {
    "tile": ("cytosyn.data_prep.tiler", "run_tiling"),
    "pack": ("cytosyn.data_prep.pack", "run_pack"),
    "featurize": ("cytosyn.data_prep.featurize", "run_featurize"),
    "train": ("cytosyn.training.run", "run_training"),
    "sample": ("cytosyn.sample", "run_sample"),
    "release": ("cytosyn.release", "run_release_config"),
    "eval": ("cytosyn.eval.run", "run_eval"),
    "score": ("cytosyn.scoring.run", "run_score"),
    "tune-vae": ("cytosyn.training.vae_tuning", "run_vae_tuning"),
}


def shell_commands() -> list[tuple[str, str]]:
    """(file, command line) for every line of every ```bash/sh/shell/console block (continuations joined)."""
    out = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append((doc.relative_to(ROOT).as_posix(), line))
    return out


def _cytosyn_part(line: str) -> str | None:
    """The ``cytosyn ...`` command in a line (after an env prefix), without a trailing comment or ``&``."""
    line = re.split(r"\s#\s", line)[0]
    match = re.search(r"(?:^|\s)(cytosyn\s.*)$", line)
    return match.group(1).rstrip(" &;").strip() if match else None


COMMANDS = shell_commands()


def test_docs_have_shell_commands_and_each_is_classified():
    assert len(COMMANDS) > 20
    unknown = [
        (f, line)
        for f, line in COMMANDS
        if _cytosyn_part(line) is None and not any(re.search(rule, line) for rule in SKIP)
    ]
    assert not unknown, f"classify these docs commands in tests/test_docs_commands.py: {unknown}"


class _Validated(Exception):
    pass


@pytest.mark.parametrize(
    "doc,line",
    [(f, x) for f, x in COMMANDS if _cytosyn_part(x)],
    ids=lambda v: v[:60] if isinstance(v, str) else v,
)
def test_cytosyn_command_parses_and_its_config_validates(doc, line, monkeypatch, tmp_path):
    import importlib

    cmd = _cytosyn_part(line)
    argv = shlex.split(cmd.replace("$i", "0").replace("$(seq 0 7)", "0"))[1:]
    args = build_parser().parse_args(argv)  # SystemExit (exit 2) on an unknown verb or flag
    if args.verb not in RUNNERS or getattr(args, "verify", None) is not None:
        return  # launch / status / pack --verify: parsing is what can be checked without a cluster or data
    if args.config is not None and not (ROOT / args.config).is_file():
        return  # a config file the reader writes (feat.yaml): its keys are not in the docs line
    module, name = RUNNERS[args.verb]
    seen = {}

    def stub(cfg, *a, **k):
        seen["cfg"] = cfg
        raise _Validated

    monkeypatch.setattr(importlib.import_module(module), name, stub)
    # the verbs' part records would be written under the docs' relative output folders, inside the repo
    monkeypatch.setattr("cytosyn.cli.part_record", _no_part_record)
    monkeypatch.chdir(ROOT)  # config paths in the docs are relative to the repository
    with pytest.raises(_Validated):
        code = main(argv)
        pytest.fail(f"{doc}: `{cmd}` exited {code} before its verb ran (see the captured error)")
    assert seen["cfg"] is not None


@contextlib.contextmanager
def _no_part_record(*_args, **_kwargs):
    yield types.SimpleNamespace(update=lambda **_: None)


def _sandbox(folder: Path) -> None:
    """The inputs the runnable examples name: configs/, and slides.txt listing a 0.25 µm/px slide (the
    example tiles at grid.mpp=0.25; the bundled real slide is a 0.5 µm/px scan)."""
    from cytosyn.data_prep.synthetic import write_synthetic_slide

    shutil.copytree(ROOT / "configs", folder / "configs")
    slide = write_synthetic_slide(folder / "TCGA-AA-0001-01Z.tiff", width=4096, height=4096, mpp=0.25)
    (folder / "slides.txt").write_text(f"{slide}\n")


@pytest.mark.parametrize("cmd", RUN)
def test_runnable_docs_commands_run(cmd, tmp_path):
    assert any(_cytosyn_part(line) == cmd for _, line in COMMANDS), f"{cmd!r} is no longer in the docs"
    _sandbox(tmp_path)
    exe = [sys.executable, "-m", "cytosyn.cli", *shlex.split(cmd)[1:]]
    out = subprocess.run(exe, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done in" in out.stderr  # the verb's summary line
    assert any((tmp_path / "tiles").rglob("*.tar")) and any((tmp_path / "tiles").rglob("overview.png"))
