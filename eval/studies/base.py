"""What a study module gives `cytosyn eval`: one `Study` record, registered in `cytosyn.eval.studies.STUDIES`.

A study is a Python function (``<name>_study(generator, references..., extractors, ...) -> StudyResult``,
usable on its own) plus the four small hooks below that let ``cytosyn eval`` run it from an `EvalConfig`
and report it. The shared steps (reference features, generation, FD/KID/PRDC, fidelity) come from
`cytosyn.eval.harness`; the shared report parts (provenance header, seed aggregates, image grid, HTML)
come from `cytosyn.eval.run` / `cytosyn.eval.report`. A study module adds only what is its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..harness import HarnessOptions, ReferenceFeatures, StudyResult, prepare_reference
from ..images import ImageSet

if TYPE_CHECKING:  # run.py imports the studies; the config type is needed for annotations only
    from ..run import EvalConfig

__all__ = ["Study", "StudyContext"]


@dataclass
class StudyContext:
    """Everything a study's `Study.run` hook receives, already built from the config by `run_eval`."""

    cfg: EvalConfig
    generator: Any  # a TileGenerator, or an ImageSet of already generated tiles (generator.kind: folder)
    extractors: dict[str, Any]  # name → built extractor (one pass feeds all of them)
    options: HarnessOptions
    steps: int | None  # the generator config's sampling steps (None: the model's defaults)
    guidance_scale: float | None

    def reference(self, path: Path, role: str) -> ReferenceFeatures:
        """Features of a reference set on disk (its first ``cfg.n`` tiles), through the shared cache."""
        image_set = ImageSet.open(path, limit=self.cfg.n, mpp=self.cfg.references.mpp)
        return prepare_reference(image_set, self.extractors, role=role, options=self.options)


def _no_check(cfg: EvalConfig) -> None:
    return None


@dataclass(frozen=True)
class Study:
    """One study's hooks. ``name`` is the value of ``EvalConfig.study``.

    - ``run(ctx)`` → one `StudyResult` per seed in ``ctx.cfg.seeds`` (read references once, outside the
      seed loop);
    - ``headline(result)`` → flat ``{metric/extractor/reference: number}`` (the report's top table and
      the mean ± std over seeds);
    - ``markdown(results)`` → the study's own report sections (tables with CIs), after the shared header;
    - ``plots(result, folder)`` → its figures, ``{name: path}`` (the sample grid is drawn for every study);
    - ``check_config(cfg)`` → raise ``ValueError`` for settings this study cannot use (run while the
      config is validated, before any work).
    """

    name: str
    run: Callable[[StudyContext], list[StudyResult]]
    headline: Callable[[StudyResult], dict[str, float]]
    markdown: Callable[[list[StudyResult]], str]
    plots: Callable[[StudyResult, Path], dict[str, Path]]
    check_config: Callable[[EvalConfig], None] = _no_check
    grid_title: str | None = None  # the sample grid's title (None: references above their generated tiles)
