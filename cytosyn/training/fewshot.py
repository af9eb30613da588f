"""Few-shot selection: N labelled tiles per class from a featurized split, seeded, recorded, written as a split.

`select_few_shot` reads every tile's JSON of a labelled split (manifest order; each shard checked against
its sha256), groups the tiles by ``label`` and draws ``shots_per_class`` of each class with a generator
seeded by ``(seed, class name)`` — so adding a class, or another class having more tiles, never changes
which tiles a class gets. A class with fewer tiles than asked is used whole with a warning, or refused
(``too_few: refuse``). Tiles whose patient or slide appears in an ``exclude`` split (e.g. the test split)
are refused: a few-shot set must never share a patient with the tiles it will be measured on.

`write_few_shot_split` copies the chosen samples byte for byte (image, JSON, embeddings, latents) into a
small split folder with its own manifest, which the ordinary training loader then streams (exact resume
included). The manifest records the selection (keys per class, counts, seed, source manifest sha256).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from cytosyn.config import StrictModel, config_hash
from cytosyn.fileio import code_version, sha256_file
from cytosyn.manifest import SplitManifest, read_manifest, write_manifest
from cytosyn.shardio import ShardWriter, iter_shard_samples

log = logging.getLogger(__name__)

FEW_SHOT_SPLIT = "few_shot"


class FewShotError(ValueError):
    """A few-shot request the data cannot satisfy (missing labels, too few tiles, leaking patients)."""


class FewShotConfig(StrictModel):
    shots_per_class: int | None = Field(default=16, ge=1)  # None: every labelled tile
    seed: int = 0
    classes: list[str] | None = None  # None: every label found in the split
    too_few: Literal["warn", "refuse"] = "warn"  # a class with fewer tiles than shots_per_class
    label_field: str = "label"  # the tile JSON field holding the class


@dataclass
class FewShotSelection:
    label_names: list[str]  # sorted class names: label index = position (the adapter's label API)
    per_class: dict[str, dict[str, Any]]  # class → available, used, keys
    keys: list[str]  # every chosen key, in the source split's order
    patients: list[str]
    slides: list[str]
    source: dict[str, Any]
    settings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label_names": self.label_names,
            "per_class": self.per_class,
            "tiles": len(self.keys),
            "shots_per_class": self.settings.get("shots_per_class"),
            "seed": self.settings.get("seed"),
            "patients": self.patients,
            "slides": self.slides,
            "source": self.source,
            "warnings": self.warnings,
        }

    @property
    def selection_hash(self) -> str:
        return config_hash({"keys": self.keys, "source": self.source, "settings": self.settings})


def class_seed(seed: int, name: str) -> int:
    from cytosyn.training.randomness import sample_seed

    return sample_seed("few-shot", seed, name)


def _read_split(split: Path, manifest: SplitManifest, label_field: str) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for entry in manifest.shards:
        path = split / entry.name
        reader = None
        for (key, members), reader in iter_shard_samples(path):  # noqa: B007 (reader kept for the hash)
            blob = dict(members).get("json")
            if blob is None:
                raise FewShotError(f"{path}: sample {key!r} has no JSON member (no label)")
            out.append((key, json.loads(blob)))
        if reader is not None and reader.sha.hexdigest() != entry.sha256:
            raise FewShotError(f"{path} does not match its sha256 in the manifest (changed since written)")
    return out


def excluded_identities(splits: list[Path]) -> tuple[set[str], set[str]]:
    """Patients and slides of the splits a few-shot set must not touch (from their manifests)."""
    patients: set[str] = set()
    slides: set[str] = set()
    for split in splits:
        m = read_manifest(split)
        patients |= set(m.patients)
        slides |= set(m.slides)
    return patients, slides


def select_few_shot(split: Path, cfg: FewShotConfig, exclude: list[Path] | None = None) -> FewShotSelection:
    """Choose the few-shot tiles of ``split`` (see the module docstring); nothing is written."""
    split = Path(split)
    manifest = read_manifest(split)
    tiles = _read_split(split, manifest, cfg.label_field)
    unlabelled = [k for k, meta in tiles if meta.get(cfg.label_field) in (None, "")]
    if unlabelled:
        raise FewShotError(
            f"split {split}: {len(unlabelled)} of {len(tiles)} tiles have no {cfg.label_field!r} in their JSON "
            f"(first: {unlabelled[0]!r}); few-shot fine-tuning needs a labelled split (cytosyn ingest)"
        )
    by_class: dict[str, list[int]] = {}
    for i, (_, meta) in enumerate(tiles):
        by_class.setdefault(str(meta[cfg.label_field]), []).append(i)
    names = sorted(cfg.classes) if cfg.classes else sorted(by_class)
    missing = [c for c in names if c not in by_class]
    if missing:
        raise FewShotError(f"split {split} has no tiles of class {missing} (it has {sorted(by_class)})")
    ex_patients, ex_slides = excluded_identities(list(exclude or []))
    warnings: list[str] = []
    chosen: list[int] = []
    per_class: dict[str, dict[str, Any]] = {}
    for name in names:
        idx = sorted(by_class[name], key=lambda i: tiles[i][0])
        want = cfg.shots_per_class or len(idx)
        if len(idx) < want:
            msg = f"class {name!r} has {len(idx)} tiles, fewer than the {want} shots asked"
            if cfg.too_few == "refuse":
                raise FewShotError(msg + " (few_shot.too_few: refuse)")
            warnings.append(msg + ": using all of them")
            log.warning("%s: using all of them", msg)
        order = np.random.default_rng(class_seed(cfg.seed, name)).permutation(len(idx))
        take = sorted(idx[j] for j in order[: min(want, len(idx))])
        per_class[name] = {"available": len(idx), "used": len(take), "keys": [tiles[i][0] for i in take]}
        chosen += take
    chosen.sort()
    leaks = [
        tiles[i][0]
        for i in chosen
        if tiles[i][1].get("patient_id") in ex_patients or tiles[i][1].get("slide_id") in ex_slides
    ]
    if leaks:
        raise FewShotError(
            f"{len(leaks)} chosen tiles share a patient or slide with an excluded (test) split (first: "
            f"{leaks[0]!r}); the few-shot set must come from other patients"
        )
    return FewShotSelection(
        label_names=names,
        per_class=per_class,
        keys=[tiles[i][0] for i in chosen],
        patients=sorted({str(tiles[i][1].get("patient_id")) for i in chosen}),
        slides=sorted({str(tiles[i][1].get("slide_id")) for i in chosen}),
        source={
            "path": str(split),
            "split": manifest.split,
            "manifest_sha256": sha256_file(split / "manifest.json"),
        },
        settings=cfg.model_dump(mode="json"),
        warnings=warnings,
    )


def write_few_shot_split(split: Path, selection: FewShotSelection, output: Path) -> Path:
    """Copy the chosen samples (bytes unchanged) into ``output`` as a split with its manifest.

    A folder already holding this exact selection is kept as is (resume); another selection is refused.
    """
    split, output = Path(split), Path(output)
    if (output / "manifest.json").is_file():
        old = read_manifest(output)
        if old.config.get("selection_hash") == selection.selection_hash:
            return output
        raise FewShotError(
            f"{output} holds another few-shot selection (other data, classes, shots or seed); use another run "
            "folder or delete it"
        )
    manifest = read_manifest(split)
    wanted = set(selection.keys)
    writer = ShardWriter(output, lambda i: f"{FEW_SHOT_SPLIT}-{i:06d}.tar", max_samples=max(1, len(wanted)))
    labels: dict[str, int] = {}
    try:
        for entry in manifest.shards:
            for (key, members), _ in iter_shard_samples(split / entry.name):
                if key not in wanted:
                    continue
                meta = json.loads(dict(members)["json"])
                name = str(meta[selection.settings["label_field"]])
                labels[name] = labels.get(name, 0) + 1
                writer.write({"__key__": key, **dict(members)})
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    write_manifest(
        SplitManifest(
            split=FEW_SHOT_SPLIT,
            image_member=manifest.image_member,
            samples=sum(s.count for s in shards),
            shards=[s.as_dict() for s in shards],
            patients=selection.patients,
            slides=selection.slides,
            stats={"tiles_per_label": dict(sorted(labels.items())), "few_shot": selection.to_dict()},
            features=manifest.features,
            config={"selection_hash": selection.selection_hash, "few_shot": selection.settings},
            inputs={"source": selection.source},
            code_version=code_version(),
        ),
        output,
    )
    return output


__all__ = [
    "FEW_SHOT_SPLIT",
    "FewShotConfig",
    "FewShotError",
    "FewShotSelection",
    "select_few_shot",
    "write_few_shot_split",
]
