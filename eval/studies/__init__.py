"""The studies ``cytosyn eval`` runs, one module per study, and their registry.

Each module under ``cytosyn/eval/studies/`` holds one study: its Python entry point
(``<name>_study(...) -> StudyResult``) and a `Study` record (``STUDY``) with the hooks ``cytosyn eval``
uses (run from a config, headline numbers, report section, plots, config checks). `STUDIES` maps
``EvalConfig.study`` names to those records. The JPEG study compares image sets rather than a generator
and is reported through ``write_report(jpeg_study=...)``; it has no ``STUDY`` record.
"""

from __future__ import annotations

from .augment import STUDY as _AUGMENT
from .augment import AugmentConfig, augment_study, check_protocol
from .base import Study, StudyContext
from .domain import STUDY as _DOMAIN
from .domain import domain_study
from .jpeg import DEFAULT_QUALITIES, JpegStudyResult, jpeg_study, lossless_roundtrip_check, study_codecs
from .overfitting import STUDY as _OVERFITTING
from .overfitting import memorisation, overfitting_study
from .scoring import STUDY as _SCORING
from .scoring import ScoringStudyConfig, scoring_study
from .sweep import STUDY as _SWEEP
from .sweep import SweepConfig, sweep_study

__all__ = [
    "DEFAULT_QUALITIES",
    "STUDIES",
    "AugmentConfig",
    "JpegStudyResult",
    "ScoringStudyConfig",
    "Study",
    "StudyContext",
    "SweepConfig",
    "augment_study",
    "check_protocol",
    "domain_study",
    "get_study",
    "jpeg_study",
    "lossless_roundtrip_check",
    "memorisation",
    "overfitting_study",
    "scoring_study",
    "study_codecs",
    "sweep_study",
]

#: ``EvalConfig.study`` name → the study's hooks (the config's ``study`` Literal lists the same names).
STUDIES: dict[str, Study] = {s.name: s for s in (_OVERFITTING, _DOMAIN, _SWEEP, _AUGMENT, _SCORING)}


def get_study(name: str) -> Study:
    """The registered study called ``name``; a clear error listing the known ones otherwise."""
    try:
        return STUDIES[name]
    except KeyError:
        raise ValueError(f"unknown study {name!r}; known: {sorted(STUDIES)}") from None
