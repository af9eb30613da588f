"""The conditions a tile is scored under: its own embedding, the null condition, and class conditions.

Class conditions come from one of two places:

- **prototypes** (:func:`class_prototypes`): the mean conditioning embedding of each label in a labelled
  reference split, so any conditional model can classify without being trained on labels;
- **labels** of a class-conditional fine-tune: when the pipeline exposes ``label_names`` (label
  conditioning), each label is a condition of kind ``label`` and the engine passes it to the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import TileSource, encode_batch
from .engine import Condition, ScoringError

__all__ = ["Prototypes", "build_conditions", "class_prototypes"]


@dataclass
class Prototypes:
    labels: list[str]
    vectors: np.ndarray  # (C, D) float32, row per label
    counts: dict[str, int]  # tiles per label used
    source: str
    skipped_unlabelled: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "labels": self.labels,
            "tiles_per_label": self.counts,
            "unlabelled_tiles_skipped": self.skipped_unlabelled,
            "rule": "mean of the reference tiles' conditioning embeddings (fp16 as stored), per label",
        }


def class_prototypes(
    source: TileSource,
    pipe: Any,
    min_tiles: int,
    labels: Sequence[str] | None = None,
    progress: Any = None,
) -> Prototypes:
    """Mean conditioning embedding per label of a labelled ``source``.

    Refused before any scoring: an unlabelled source, a requested label absent from it, and a label with
    fewer than ``min_tiles`` tiles (the message lists every count). Unlabelled tiles of a partly labelled
    source are skipped and counted.
    """
    if pipe.cond_dim is None:
        raise ScoringError("class prototypes need a conditional model; this one is unconditional")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    unlabelled = 0
    for unit in source.units:
        batch = unit.read(False)
        if not any(lab is not None for lab in batch.labels):
            unlabelled += len(batch)
            continue
        keep = [
            i for i, lab in enumerate(batch.labels) if lab is not None and (labels is None or lab in labels)
        ]
        unlabelled += sum(lab is None for lab in batch.labels)
        if not keep:
            continue
        batch = encode_batch(pipe, batch, need_own=True)
        assert batch.own is not None
        for i in keep:
            lab = batch.labels[i]
            assert lab is not None
            vec = batch.own[i].astype(np.float64)
            sums[lab] = sums.get(lab, 0.0) + vec
            counts[lab] = counts.get(lab, 0) + 1
        if progress is not None:
            progress.update(len(batch))
    if not counts:
        raise ScoringError(
            f"{source.path} has no labelled tiles (no 'label' in the tile JSON, no class subfolders): class "
            f"conditions and generative classification need a labelled split"
        )
    wanted = list(labels) if labels is not None else sorted(counts)
    missing = [lab for lab in wanted if lab not in counts]
    if missing:
        raise ScoringError(f"labels {missing} have no tiles in {source.path} (it has: {sorted(counts)})")
    few = {lab: counts[lab] for lab in wanted if counts[lab] < min_tiles}
    if few:
        raise ScoringError(
            f"labels with fewer than {min_tiles} tiles in {source.path}: {few} (all counts: "
            f"{dict(sorted(counts.items()))}); add tiles, lower classes.min_tiles, or list the labels to use "
            f"(classes.labels=[...])"
        )
    vectors = np.stack([(sums[lab] / counts[lab]).astype(np.float32) for lab in wanted])
    return Prototypes(wanted, vectors, {lab: counts[lab] for lab in wanted}, str(source.path), unlabelled)


def build_conditions(
    pipe: Any,
    own: bool,
    null: bool,
    prototypes: Prototypes | None = None,
    labels: Sequence[str] | None = None,
) -> list[Condition]:
    """The ordered condition list: ``own``, ``null``, then one class condition per prototype or label."""
    conds: list[Condition] = []
    if own:
        conds.append(Condition("own", "own"))
    if null:
        conds.append(Condition("null", "null"))
    if prototypes is not None:
        conds += [
            Condition(f"class:{lab}", "embedding", vector=vec, label=lab, is_class=True)
            for lab, vec in zip(prototypes.labels, prototypes.vectors)
        ]
    elif labels:
        known = getattr(pipe, "label_names", None)
        if not known:
            raise ScoringError(
                "classes from labels need a class-conditional fine-tune (a pipeline with label conditioning); "
                "this model has none: use classes.source=prototypes with a labelled reference split"
            )
        conds += [Condition(f"class:{lab}", "label", label=lab, is_class=True) for lab in labels]
    if not conds:
        raise ScoringError("no conditions selected: enable own, null, or class conditions")
    return conds
