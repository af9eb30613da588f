"""Per-sample training randomness: a pure function of (seed, micro-batch, sample key), drawn on the device.

Every random number of a training step — the time t, the noise, the posterior ε, the null-condition
draw — must depend only on the run seed, the micro-batch index and the sample's key. Then a resumed run
draws exactly what the uninterrupted one did, and 1 process × batch 8 draws exactly what 2 processes ×
batch 4 draw for the same samples (tested in tests/test_training.py).

The first design built one ``torch.Generator`` per sample on the host: ~42 ms of CPU per step at batch
256 plus a host→device copy of the noise, for every step. Here the host only computes one 64-bit key per
sample (blake2b of the sample key, xor a blake2b of ``"seed:micro_step"``; ~0.5 µs per sample) and copies
those B integers; every number is then a counter-based hash of (sample key, index), computed by ~50
vectorised integer and float ops on whatever device trains, for all of a step's draws at once (no
generator state, nothing else crosses the bus). On a CPU the arithmetic itself is slower than torch's
own generator (benchmarks/train_step.py measures both); on a GPU it is a few dozen kernel launches.

The hash is written by hand because torch has no vectorised per-row-seeded generator: each 32-bit word is
``h(h(counter + b) ^ a)``, where ``(a, b)`` are the two halves of the sample key, ``counter`` = stream·2²⁶ +
index, and ``h`` is C. Wellons's "lowbias32" integer mixer (a bijection of 32-bit words with very low
avalanche bias). Uniforms take the top 24 bits; normals come in Box–Muller pairs. Integer arithmetic is
exact, so a key gives the same bits on CPU and GPU (the normals then differ only by the last ulp of
``log``/``cos``); :func:`reference_words` is a pure-Python copy the tests compare against.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_K1, _K2 = 0x7FEB352D, 0x846CA68B  # lowbias32 multipliers
STREAM_BITS = 26  # indices per stream: 2**26 = 67 M numbers per sample and stream
STREAM_TIME, STREAM_DROP, STREAM_NOISE, STREAM_POSTERIOR = 0, 1, 2, 3


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SampleKeys(NamedTuple):
    keys: Tensor  # (B,) int64 on the CPU: one 64-bit key per sample
    fingerprint: int  # a 63-bit hash of the whole micro-batch (resume checks in tests)


def sample_keys(seed: int, micro_step: int, keys: Sequence[str]) -> SampleKeys:
    """The per-sample 64-bit keys of one micro-batch: the only host-side work of the draws."""
    digests = b"".join(hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys)
    salt = sample_seed(seed, micro_step)
    salt -= (1 << 64) if salt >> 63 else 0
    per_sample = torch.frombuffer(bytearray(digests), dtype=torch.int64) ^ salt
    fingerprint = int.from_bytes(hashlib.blake2b(digests, digest_size=8).digest(), "little") >> 1
    return SampleKeys(per_sample, fingerprint)


def _as_int32(x: int) -> int:
    return x - (1 << 32) if x & 0x80000000 else x


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int32 words (``>>`` on int32 is arithmetic)."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    """lowbias32 on int32 tensors (multiplication wraps modulo 2**32, as on every torch backend)."""
    x = x ^ _srl(x, 16)
    x = x * _as_int32(_K1)
    x = x ^ _srl(x, 15)
    x = x * _as_int32(_K2)
    return x ^ _srl(x, 16)


def _lanes(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(low, high) 32-bit halves of int64 keys, as int32 columns (B, 1)."""
    low = (keys & _MASK32).to(torch.int32)
    high = ((keys >> 32) & _MASK32).to(torch.int32)
    return low.unsqueeze(1), high.unsqueeze(1)


def keyed_words(keys: Tensor, stream: int, n: int) -> Tensor:
    """``n`` pseudo-random 32-bit words per key (int32, shape (B, n), on ``keys.device``)."""
    if not 0 <= stream < 1 << (31 - STREAM_BITS) or not 0 < n <= 1 << STREAM_BITS:
        raise ValueError(f"stream {stream} / count {n} out of range")
    a, b = _lanes(keys)
    counter = torch.arange(n, device=keys.device, dtype=torch.int32) + (stream << STREAM_BITS)
    return _mix(_mix(counter.unsqueeze(0) + b) ^ a)


def reference_words(key: int, stream: int, n: int) -> list[int]:
    """Pure-Python :func:`keyed_words` for one key (unsigned words): the definition the tests check."""

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * _K1) & _MASK32
        x ^= x >> 15
        x = (x * _K2) & _MASK32
        return x ^ (x >> 16)

    a, b = key & _MASK32, (key >> 32) & _MASK32
    return [mix(mix(((stream << STREAM_BITS) + i + b) & _MASK32) ^ a) for i in range(n)]


def _unit(words: Tensor, open_zero: bool = False) -> Tensor:
    """Top 24 bits → float32 in [0, 1) (or (0, 1] with ``open_zero``), exactly representable."""
    top = _srl(words, 8).to(torch.float32)
    return (top + 1.0 if open_zero else top) * (2.0**-24)


def keyed_uniform(keys: Tensor, stream: int, n: int) -> Tensor:
    """Uniform [0, 1) float32, shape (B, n)."""
    return _unit(keyed_words(keys, stream, n))


def keyed_normal(keys: Tensor, stream: int, n: int) -> Tensor:
    """Standard normal float32, shape (B, n): Box–Muller on word pairs (2j, 2j+1)."""
    words = keyed_words(keys, stream, 2 * math.ceil(n / 2)).view(keys.shape[0], -1, 2)
    radius = torch.sqrt(-2.0 * torch.log(_unit(words[..., 0], open_zero=True)))
    angle = (2.0 * math.pi) * _unit(words[..., 1])
    pairs = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    return pairs.view(keys.shape[0], -1)[:, :n]


def _box_muller(words: Tensor) -> Tensor:
    """Standard normals from word pairs along the last dimension (even length): (..., 2k) → (..., 2k)."""
    pairs = words.reshape(*words.shape[:-1], -1, 2)
    radius = torch.sqrt(-2.0 * torch.log(_unit(pairs[..., 0], open_zero=True)))
    angle = (2.0 * math.pi) * _unit(pairs[..., 1])
    return torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1).reshape(words.shape)


def training_draws(
    keys: Tensor,
    shape: Sequence[int],
    time_mode: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    drop_probability: float = 0.0,
    posterior: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """One micro-batch's draws on ``keys.device``: (t (B,), noise (B, *shape), ε or None, null-condition mask).

    ``time_mode`` is ``uniform`` (t ~ U[0, 1)) or ``logit_normal`` (t = sigmoid(mean + std·z)), as in
    :func:`cytosyn.diffusion.sample_time`. All draws come from one block of words per sample: words 0–1
    for t, word 2 for the null-condition draw, then the noise and the posterior ε (fixed offsets, so
    turning ``posterior`` off does not change the noise).
    """
    batch, numel = keys.shape[0], math.prod(shape)
    even = numel + numel % 2
    words = keyed_words(keys, 0, 4 + (2 if posterior else 1) * even)
    if time_mode == "uniform":
        t = _unit(words[:, 0])
    elif time_mode == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * _box_muller(words[:, 0:2])[:, 0])
    else:
        raise ValueError(f"unknown time sampling {time_mode!r} (expected uniform or logit_normal)")
    drop = _unit(words[:, 2]) < drop_probability
    normals = _box_muller(words[:, 4:])
    noise = normals[:, :numel].reshape(batch, *shape)
    eps = normals[:, even : even + numel].reshape(batch, *shape) if posterior else None
    return t, noise, eps, drop
