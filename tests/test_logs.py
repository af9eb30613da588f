"""Logging: one console handler (no doubled Lightning / huggingface_hub lines), a summary line per verb,
``cytosyn --version``."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from cytosyn.cli import main
from cytosyn.logs import setup_logging

EMIT = """
import logging
{setup}
from cytosyn.compat import import_torchvision
import_torchvision()
import lightning.pytorch, huggingface_hub, diffusers  # each adds a console handler of its own
logging.getLogger("lightning.pytorch.utilities.rank_zero").info("LINE-lightning")
logging.getLogger("huggingface_hub.file_download").warning("LINE-hub")
logging.getLogger("diffusers.pipelines.pipeline_utils").warning("LINE-diffusers")
logging.getLogger("cytosyn.train").info("LINE-cytosyn")
"""


def _stderr(setup: str) -> str:
    code = textwrap.dedent(EMIT.format(setup=setup))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


def test_library_lines_are_printed_once_in_one_format():
    # what the CLI did before: a root basicConfig, and Lightning's and the hub's own handlers doubled lines
    before = _stderr("logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')")
    assert before.count("LINE-lightning") == 2 and before.count("LINE-hub") == 2
    after = _stderr("from cytosyn.logs import setup_logging; setup_logging()")
    for tag, logger in [
        ("LINE-lightning", "lightning.pytorch.utilities.rank_zero"),
        ("LINE-hub", "huggingface_hub.file_download"),
        ("LINE-diffusers", "diffusers.pipelines.pipeline_utils"),
        ("LINE-cytosyn", "cytosyn.train"),
    ]:
        lines = [line for line in after.splitlines() if tag in line]
        assert len(lines) == 1, (tag, after)
        assert f" {logger}: {tag}" in lines[0]  # the one format: time level logger: message


def test_records_still_reach_root_capture_and_setup_is_idempotent(caplog):
    setup_logging()
    handler = setup_logging(verbose=True)
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_cytosyn_handler", False)]
    assert ours == [handler] and logging.getLogger().level == logging.DEBUG
    lib = logging.getLogger("somelib.sub")
    extra = logging.StreamHandler(sys.stderr)
    logging.getLogger("somelib").addHandler(extra)
    with caplog.at_level(logging.INFO):
        lib.warning("routed")
    assert extra not in logging.getLogger("somelib").handlers  # the library's console handler is gone
    assert [r.getMessage() for r in caplog.records] == ["routed"]  # and the record still reached the root


def test_every_verb_ends_with_a_summary_line_and_version(tmp_path, capfd):
    code = main(["pack", "--verify", str(tmp_path / "missing")])
    err = capfd.readouterr().err
    assert code == 1
    assert [line for line in err.splitlines() if "cytosyn pack failed in" in line], err
    out = subprocess.run([sys.executable, "-m", "cytosyn.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("cytosyn 0.")
