"""Per-condition denoising errors: the measurement every generative score is built from.

For a tile with clean (normalised) latent ``x``, a condition ``c`` and a time ``t`` the engine computes

    x_t = (1 − t)·x + t·ε,     e(c, t) = mean over the mask of ‖v̂(x_t, t, c) − (ε − x)‖²,

the flow-matching (velocity) loss the model was trained on, per tile, condition and time. What makes the
numbers comparable across conditions (CytoDiffusion's protocol, RECIPE.md):

- **one noise draw per tile and time, shared by every condition**: ``ε`` for tile ``key`` and grid time
  ``k`` comes from a generator seeded by ``(seed, key)`` (:func:`tile_noise`), so two conditions of a
  tile differ only by the condition, and a tile's numbers do not depend on its position, the batch size
  or which other tiles share a batch;
- **K fixed times** (:class:`TimeGrid`), the same for every tile, visited in an interleaved order so that
  any prefix of the visit order covers the whole range (what early class pruning sees first);
- an optional **central mask** (a square of ``mask_fraction`` of the latent side): edges of a tile
  carry less context;
- the noise-prediction error of CytoDiffusion equals ``(1 − t)²`` times the velocity error at each t, a
  per-t constant that the fitted per-t weighting (:mod:`cytosyn.scoring.decide`) absorbs.

Rows — (tile, condition, time) triples — are batched through :meth:`CytoSynPipeline.velocity` (bf16
autocast on GPU, the pipeline's precision everywhere), and every row is one network evaluation (NFE).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Condition",
    "EngineSettings",
    "ScoringError",
    "TileErrors",
    "TimeGrid",
    "denoising_errors",
    "error_maps",
    "interleaved_order",
    "tile_noise",
    "tile_seed",
]


class ScoringError(ValueError):
    """A scoring request that cannot be served; raised before any work starts where possible."""


# --------------------------------------------------------------------------------------------------------
# Times, noise, conditions
# --------------------------------------------------------------------------------------------------------


def interleaved_order(k: int) -> list[int]:
    """A visit order of ``0..k-1`` whose every prefix is spread over the range (bit-reversal order).

    ``interleaved_order(5) == [0, 4, 2, 1, 3]``: the two ends, then the middle, then the quarter points.
    """
    if k < 1:
        raise ScoringError(f"K must be >= 1, got {k}")
    bits = max(1, (k - 1).bit_length())
    order = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits)]
    return [i for i in order if i < k]


@dataclass(frozen=True)
class TimeGrid:
    """K fixed times in (0, 1] (sorted ascending; noise index k belongs to ``values[k]``) and the order
    in which they are visited."""

    values: tuple[float, ...]
    order: tuple[int, ...]

    @classmethod
    def build(
        cls,
        k: int | None = None,
        t_min: float = 0.05,
        t_max: float = 0.95,
        values: Sequence[float] | None = None,
        order: Literal["interleaved", "ascending"] = "interleaved",
    ) -> TimeGrid:
        """``values`` as given, or ``k`` evenly spaced times from ``t_min`` to ``t_max`` (inclusive)."""
        if values is None:
            if k is None or k < 1:
                raise ScoringError(f"K (the number of times) must be >= 1, got {k}")
            if not 0.0 < t_min <= t_max <= 1.0:
                raise ScoringError(
                    f"times must satisfy 0 < t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}"
                )
            vals = np.linspace(t_min, t_max, k) if k > 1 else np.array([t_min])
        else:
            vals = np.asarray(list(values), dtype=np.float64)
            if k is not None and k != len(vals):
                raise ScoringError(f"K={k} but {len(vals)} time values were given")
        if len(vals) < 1:
            raise ScoringError("at least one time value is needed")
        if not np.all(np.isfinite(vals)) or np.any(vals <= 0.0) or np.any(vals > 1.0):
            bad = [float(v) for v in vals if not (0.0 < v <= 1.0)]
            raise ScoringError(f"time values must lie in (0, 1] (t = 0 is the clean tile), got {bad}")
        vals = np.sort(vals)
        if len(np.unique(vals)) != len(vals):
            raise ScoringError("time values must be distinct")
        seq = interleaved_order(len(vals)) if order == "interleaved" else list(range(len(vals)))
        return cls(tuple(float(v) for v in vals), tuple(seq))

    def __len__(self) -> int:
        return len(self.values)

    def describe(self) -> dict[str, Any]:
        return {"values": list(self.values), "visit_order": list(self.order), "k": len(self.values)}


def tile_seed(seed: int, key: str) -> int:
    """The 63-bit seed of tile ``key``'s noise in a scoring run with ``seed`` (stable across machines)."""
    digest = hashlib.blake2b(f"cytosyn.score:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def tile_noise(seed: int, key: str, k: int, shape: Sequence[int]) -> Tensor:
    """``(k, *shape)`` float32 standard normal noise of tile ``key``: row ``i`` is the draw for grid time
    ``i`` (ascending times), shared by every condition. Drawn on the CPU, so any device gets the same."""
    g = torch.Generator().manual_seed(tile_seed(seed, key))
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for _ in range(k)])


ConditionKind = Literal["own", "null", "embedding", "label"]


@dataclass
class Condition:
    """One condition to score a tile under.

    - ``own``: the tile's own conditioning embedding (given per tile);
    - ``null``: the model's learned null condition (what unconditional sampling uses);
    - ``embedding``: a fixed embedding shared by all tiles (e.g. a class prototype: the mean embedding of
      one label in a labelled reference split);
    - ``label``: a class label of a class-conditional fine-tune (served by the pipeline when it has label
      conditioning; see :func:`_check_conditions`).

    ``is_class``: the condition stands for a class (prototype or label) and takes part in generative
    classification, class pruning and the margin anomaly score.
    """

    name: str
    kind: ConditionKind
    vector: np.ndarray | None = None
    label: str | None = None
    is_class: bool = False

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "is_class": self.is_class}
        if self.label is not None:
            out["label"] = self.label
        if self.vector is not None:
            v = np.ascontiguousarray(self.vector, dtype=np.float32)
            out["vector_sha256"] = hashlib.sha256(v.tobytes()).hexdigest()
            out["vector_norm"] = float(np.linalg.norm(v))
        return out


# --------------------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------------------


@dataclass
class EngineSettings:
    """How errors are measured. ``batch_size`` counts rows (tile × condition × time) per forward."""

    grid: TimeGrid
    seed: int = 0
    mask_fraction: float = 1.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_fraction <= 1.0:
            raise ScoringError(f"mask_fraction must be in (0, 1], got {self.mask_fraction}")
        if self.batch_size < 1:
            raise ScoringError(f"batch_size must be >= 1, got {self.batch_size}")

    def describe(self) -> dict[str, Any]:
        return {
            "times": self.grid.describe(),
            "noise_seed": self.seed,
            "noise": "one draw per tile and time from blake2b('cytosyn.score:{seed}:{key}'), shared by all conditions",
            "mask_fraction": self.mask_fraction,
            "error": "mean squared velocity error (v̂ − (ε − x))² over channels and the central mask",
        }


@dataclass
class TileErrors:
    """Raw errors of a batch of tiles: ``errors[n, m, k]`` for tile n, condition m, grid time k (NaN where
    a pruned class was not evaluated); ``nfe[n]`` network evaluations spent on tile n; ``dropped_at[n, m]``
    how many times had been evaluated when class m was pruned for tile n (−1: never pruned) and
    ``drop_p[n, m]`` the p-value that dropped it."""

    errors: np.ndarray
    nfe: np.ndarray
    dropped_at: np.ndarray
    drop_p: np.ndarray
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------------------


def central_mask(height: int, width: int, fraction: float) -> Tensor:
    """A ``(height, width)`` float mask: 1 in the central square of ``fraction`` of each side, else 0."""
    mh, mw = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - mh) // 2, (width - mw) // 2
    mask = torch.zeros(height, width)
    mask[top : top + mh, left : left + mw] = 1.0
    return mask


def _check_conditions(pipe: Any, conditions: Sequence[Condition], own: Tensor | None) -> None:
    if not conditions:
        raise ScoringError("no conditions to score under")
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ScoringError(f"condition names must be unique, got {names}")
    width = pipe.cond_dim
    for c in conditions:
        if c.kind == "null":
            if width is not None and not pipe.has_null_condition:
                raise ScoringError("the null condition was asked for, but this model has no null embedding")
        elif c.kind == "own":
            if width is None:
                raise ScoringError("the model is unconditional: it has no 'own embedding' condition")
            if own is None:
                raise ScoringError("condition 'own' needs each tile's own embedding")
        elif c.kind == "embedding":
            if width is None:
                raise ScoringError(f"the model is unconditional: condition {c.name!r} cannot be used")
            vec = np.asarray(c.vector)
            if c.vector is None or vec.ndim != 1 or vec.shape[0] != width:
                shape = None if c.vector is None else tuple(vec.shape)
                raise ScoringError(
                    f"condition {c.name!r}: embedding of shape {shape}, but the model is conditioned on "
                    f"{pipe.conditioning_encoder!r} embeddings of width {width}"
                )
            if not np.all(np.isfinite(vec)):
                raise ScoringError(f"condition {c.name!r}: embedding contains NaN or infinite values")
        elif c.kind == "label":
            known = getattr(pipe, "label_names", None)
            if not known:
                raise ScoringError(
                    f"condition {c.name!r} is a class label, but this model has no label conditioning (it is "
                    f"not a class-conditional fine-tune); use class prototypes (classes: prototypes) instead"
                )
            if c.label not in known:
                raise ScoringError(f"label {c.label!r} is not one of the model's labels {list(known)}")
        else:
            raise ScoringError(f"unknown condition kind {c.kind!r}")
    if own is not None and width is not None and (own.ndim != 2 or own.shape[1] != width):
        raise ScoringError(
            f"own embeddings have shape {tuple(own.shape)}, the model expects (N, {width}) "
            f"({pipe.conditioning_encoder!r})"
        )


def _condition_rows(
    pipe: Any, conditions: Sequence[Condition], own: Tensor | None, tiles: Tensor, conds: Tensor
) -> tuple[Tensor | None, Tensor]:
    """The ``cond`` input and ``uncond_mask`` of rows (tile index, condition index).

    Embedding rows (own, null, prototypes) get a float ``(R, cond_dim)`` matrix; label rows (all rows of
    the call must then be label rows) get the labels' integer indices, as the pipeline's velocity takes
    them for a label-conditioned model."""
    device = pipe.device
    width = pipe.cond_dim
    n = tiles.shape[0]
    kinds = {conditions[m].kind for m in conds.unique().tolist()}
    if "label" in kinds:
        assert kinds == {"label"}, "label rows are evaluated apart from embedding rows"
        names = list(pipe.label_names)
        idx = torch.tensor([names.index(str(conditions[m].label)) for m in conds.tolist()], dtype=torch.long)
        return idx.to(device), torch.zeros(n, dtype=torch.bool, device=device)
    uncond = torch.zeros(n, dtype=torch.bool)
    if width is None:
        return None, torch.ones(n, dtype=torch.bool, device=device)
    cond = torch.zeros(n, width, dtype=torch.float32)
    for m, c in enumerate(conditions):
        sel = conds == m
        if not bool(sel.any()):
            continue
        if c.kind == "own":
            assert own is not None
            cond[sel] = own[tiles[sel]].float()
        elif c.kind == "null":
            uncond[sel] = True
        elif c.kind == "embedding":
            cond[sel] = torch.as_tensor(np.asarray(c.vector, dtype=np.float32))
    return cond.to(device), uncond.to(device)


def _velocity_rows(
    pipe: Any,
    x_t: Tensor,
    t: Tensor,
    conditions: Sequence[Condition],
    own: Tensor | None,
    ti: Tensor,
    ci: Tensor,
) -> Tensor:
    """Velocities of a chunk of rows: label rows and embedding rows go through separate calls (a
    label-conditioned pipeline takes one kind of condition per call) and are put back in row order."""
    is_label = torch.tensor([conditions[m].kind == "label" for m in ci.tolist()], dtype=torch.bool)
    out = torch.empty_like(x_t, dtype=torch.float32)
    for sel in (~is_label, is_label):
        if not bool(sel.any()):
            continue
        rows = torch.nonzero(sel).flatten()
        cond, uncond = _condition_rows(pipe, conditions, own, ti[rows], ci[rows])
        rd = rows.to(x_t.device)
        out[rd] = pipe.velocity(x_t[rd], t[rd], cond, uncond).float()
    return out


Rows = tuple[Tensor, Tensor, Tensor]  # tile index, condition index, grid time index (each (R,) long)


def _evaluate_rows(
    pipe: Any,
    latents: Tensor,
    noise: Tensor,
    own: Tensor | None,
    conditions: Sequence[Condition],
    rows: Rows,
    settings: EngineSettings,
    mask: Tensor,
    maps: bool = False,
) -> Tensor:
    """Errors of each row (``(R,)`` float64), or per-pixel maps ``(R, H, W)`` (channel mean, no mask)."""
    tiles, conds, ks = rows
    grid = torch.tensor(settings.grid.values, dtype=torch.float64)
    out: list[Tensor] = []
    device = pipe.device
    mask_d = mask.to(device)
    mask_sum = float(mask.sum())
    for start in range(0, tiles.shape[0], settings.batch_size):
        sl = slice(start, start + settings.batch_size)
        ti, ci, ki = tiles[sl], conds[sl], ks[sl]
        x0 = latents[ti].to(device)
        eps = noise[ti, ki].to(device)
        t32 = grid[ki].to(torch.float32).to(device)
        tt = t32.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps
        v = _velocity_rows(pipe, x_t, t32, conditions, own, ti, ci)
        sq = (v - (eps - x0)).square().mean(dim=1)  # (r, H, W): mean over channels
        if maps:
            out.append(sq.cpu())
        else:
            out.append(((sq * mask_d).sum(dim=(1, 2)) / mask_sum).double().cpu())
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(out)


def _prepare(
    pipe: Any, latents: Tensor | np.ndarray, keys: Sequence[str], own: Any
) -> tuple[Tensor, Tensor | None]:
    lat = torch.as_tensor(np.asarray(latents) if not isinstance(latents, Tensor) else latents).float().cpu()
    shape = tuple(pipe.latent_shape)
    if lat.ndim != 4 or tuple(lat.shape[1:]) != shape:
        raise ScoringError(
            f"latents must have shape (N, {', '.join(map(str, shape))}), got {tuple(lat.shape)}"
        )
    if len(keys) != lat.shape[0]:
        raise ScoringError(f"{len(keys)} keys for {lat.shape[0]} latents")
    if not bool(torch.isfinite(lat).all()):
        raise ScoringError("latents contain NaN or infinite values")
    own_t = None
    if own is not None:
        own_t = torch.as_tensor(np.asarray(own) if not isinstance(own, Tensor) else own).float().cpu()
        if own_t.shape[0] != lat.shape[0]:
            raise ScoringError(f"{own_t.shape[0]} own embeddings for {lat.shape[0]} tiles")
    return lat, own_t


@torch.no_grad()
def denoising_errors(
    pipe: Any,
    latents: Tensor | np.ndarray,
    keys: Sequence[str],
    conditions: Sequence[Condition],
    settings: EngineSettings,
    *,
    own: Tensor | np.ndarray | None = None,
    pruner: Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
    rounds: Sequence[int] | None = None,
) -> TileErrors:
    """Errors of ``N`` tiles (normalised latents ``(N, C, H, W)``, their ``keys`` and optionally their
    ``own`` embeddings) under every condition at every grid time.

    With a ``pruner`` (see :class:`cytosyn.scoring.decide.ClassPruner`), times are visited in rounds of
    ``rounds`` sizes (of the grid's visit order) and after each round the pruner gets each tile's errors
    ``(M, K)`` (NaN where not evaluated), its active mask and the number of times evaluated so far, and
    returns the new active mask and p-values; pruned class conditions are not evaluated any more.
    Non-class conditions are always evaluated at every time.
    """
    import time

    t0 = time.perf_counter()
    lat, own_t = _prepare(pipe, latents, keys, own)
    _check_conditions(pipe, conditions, own_t)
    n, m_count, k_count = lat.shape[0], len(conditions), len(settings.grid)
    noise = (
        torch.stack([tile_noise(settings.seed, key, k_count, lat.shape[1:]) for key in keys]) if n else None
    )
    errors = np.full((n, m_count, k_count), np.nan, dtype=np.float64)
    nfe = np.zeros(n, dtype=np.int64)
    dropped = np.full((n, m_count), -1, dtype=np.int64)
    drop_p = np.full((n, m_count), np.nan, dtype=np.float64)
    active = np.ones((n, m_count), dtype=bool)
    if n == 0:
        return TileErrors(errors, nfe, dropped, drop_p)
    order = list(settings.grid.order)
    sizes = list(rounds) if (pruner is not None and rounds) else [k_count]
    mask = central_mask(lat.shape[2], lat.shape[3], settings.mask_fraction)
    done = 0
    for size in sizes:
        ks_round = order[done : done + size]
        if not ks_round:
            break
        done += len(ks_round)
        idx = [(i, m, k) for i in range(n) for m in range(m_count) if active[i, m] for k in ks_round]
        rows = tuple(torch.tensor([r[j] for r in idx], dtype=torch.long) for j in range(3))
        vals = _evaluate_rows(pipe, lat, noise, own_t, conditions, rows, settings, mask).numpy()  # type: ignore[arg-type]
        for (i, m, k), v in zip(idx, vals):
            errors[i, m, k] = v
            nfe[i] += 1
        if pruner is not None and done < k_count:
            for i in range(n):
                new_active, pvals = pruner(errors[i], active[i].copy(), done)
                newly = active[i] & ~new_active
                dropped[i, newly] = done
                drop_p[i, newly] = pvals[newly]
                active[i] = new_active
    return TileErrors(errors, nfe, dropped, drop_p, seconds=time.perf_counter() - t0)


@torch.no_grad()
def error_maps(
    pipe: Any,
    latents: Tensor | np.ndarray,
    keys: Sequence[str],
    conditions: Sequence[Condition],
    settings: EngineSettings,
    weights: np.ndarray,
    *,
    own: Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """Per-pixel error maps ``(N, M, H, W)`` (latent resolution, channel mean, no mask): the weighted mean
    over all grid times of each condition's squared velocity error, with the same shared noise as
    :func:`denoising_errors`. ``weights`` ``(K,)`` are the per-time weights (ascending times)."""
    lat, own_t = _prepare(pipe, latents, keys, own)
    _check_conditions(pipe, conditions, own_t)
    n, m_count, k_count = lat.shape[0], len(conditions), len(settings.grid)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k_count,):
        raise ScoringError(f"weights must have shape ({k_count},), got {w.shape}")
    noise = torch.stack([tile_noise(settings.seed, key, k_count, lat.shape[1:]) for key in keys])
    idx = [(i, m, k) for i in range(n) for m in range(m_count) for k in range(k_count)]
    rows = tuple(torch.tensor([r[j] for r in idx], dtype=torch.long) for j in range(3))
    mask = central_mask(lat.shape[2], lat.shape[3], 1.0)
    vals = _evaluate_rows(pipe, lat, noise, own_t, conditions, rows, settings, mask, maps=True)  # type: ignore[arg-type]
    maps = vals.double().numpy().reshape(n, m_count, k_count, lat.shape[2], lat.shape[3])
    return np.einsum("nmkhw,k->nmhw", maps, w) / k_count
