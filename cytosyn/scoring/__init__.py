"""Generative scoring: what a trained model can and cannot explain, tile by tile (CytoDiffusion's idea).

- :mod:`~cytosyn.scoring.engine`: per-condition denoising errors with one shared noise draw per tile and
  time, K fixed times, a central mask, batched over conditions × times, NFE counted;
- :mod:`~cytosyn.scoring.decide`: the fitted per-time weighting, class pruning (paired t-test), the
  predicted class and the anomaly scores;
- :mod:`~cytosyn.scoring.conditions`: own embedding, null condition, class prototypes (or labels);
- :mod:`~cytosyn.scoring.score`: a fixed plan applied to batches of tiles, in memory;
- :mod:`~cytosyn.scoring.run`: ``cytosyn score`` (files, resume per shard, table, summary, figures);
- :mod:`~cytosyn.scoring.metrics`: accuracy / balanced accuracy / macro-F1 and ROC AUC with CIs, and
  the linear-probe baseline.

See docs/scoring.md ("Scoring new tissue").
"""

from .conditions import Prototypes, build_conditions, class_prototypes
from .data import TileBatch, TileSource, encode_batch, open_source
from .decide import (
    ANOMALY_SCORES,
    ClassPruner,
    TimeWeights,
    anomaly_scores,
    class_errors,
    classify,
    fit_time_weights,
    margin_zeta,
    pruning_rounds,
    slide_aggregates,
    weighted_errors,
)
from .engine import (
    Condition,
    EngineSettings,
    ScoringError,
    TileErrors,
    TimeGrid,
    denoising_errors,
    error_maps,
    interleaved_order,
    tile_noise,
    tile_seed,
)
from .score import PruningSettings, ScoringPlan, TileScores, calibrate, decide, score_batch

__all__ = [
    "ANOMALY_SCORES",
    "ClassPruner",
    "Condition",
    "EngineSettings",
    "Prototypes",
    "PruningSettings",
    "ScoringError",
    "ScoringPlan",
    "TileBatch",
    "TileErrors",
    "TileScores",
    "TileSource",
    "TimeGrid",
    "TimeWeights",
    "anomaly_scores",
    "build_conditions",
    "calibrate",
    "class_errors",
    "class_prototypes",
    "classify",
    "decide",
    "denoising_errors",
    "encode_batch",
    "error_maps",
    "fit_time_weights",
    "interleaved_order",
    "margin_zeta",
    "open_source",
    "pruning_rounds",
    "score_batch",
    "slide_aggregates",
    "tile_noise",
    "tile_seed",
    "weighted_errors",
]
