"""Tests for cytosyn.data: the training loader over real webdataset shards and a real manifest.

Splits are written by the tests with ShardWriter + write_manifest (16×16 PNG noise images, fp16 features);
sample ``s<i>`` carries index ``i`` in its json and in its features, so every decoded value can be checked
against what was written.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cytosyn.data import LoaderConfig, build_loader
from cytosyn.data.plan import (
    dropped_canonical,
    epoch_plan,
    segments_length,
    sequence_segments,
    window_shuffle,
)
from cytosyn.data.testing import (
    EMBED_DIM,
    VAE_SHAPE,
    sample_embedding,
    sample_pixels,
    sample_vae,
    synthetic_sample,
    write_split,
    write_synthetic_split,
)

UNEVEN = [1, 7, 30, 2]  # 40 samples in deliberately uneven shards


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uneven")
    write_synthetic_split(folder, UNEVEN)
    return folder


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("odd")
    write_synthetic_split(folder, [5, 11, 25])  # 41 samples: 1 left over for 2 ranks
    return folder


def _cfg(**kw) -> LoaderConfig:
    base = dict(batch_size=3, num_workers=0, shuffle_buffer=8, seed=1)
    base.update(kw)
    return LoaderConfig(**base)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def _all_keys(n: int) -> set[str]:
    return {f"s{i:06d}" for i in range(n)}


# ---------------------------------------------------------------------------------------------------
# Planning (pure functions, no shard opened)


@pytest.mark.parametrize("counts", [[1, 7, 30, 2], [40], [3] * 13 + [1], [1] * 9, [100, 1, 1, 57]])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("num_workers", [1, 2, 5])
def test_plan_partitions_the_epoch(counts, world_size, num_workers):
    total = sum(counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for epoch in range(3):
        seen: list[int] = []
        batches = set()
        for rank in range(world_size):
            plan = epoch_plan(counts, 7, epoch, rank, world_size, 4, num_workers)
            batches.add(plan.num_batches)
            rank_positions = 0
            for w, segs in enumerate(plan.worker_segments):
                assert segments_length(segs) == sum(plan.worker_batch_sizes(w))
                rank_positions += segments_length(segs)
                for s in segs:
                    assert 0 <= s.lo < s.hi <= counts[s.shard]
                    seen.extend(range(starts[s.shard] + s.lo, starts[s.shard] + s.hi))
            assert rank_positions == total // world_size == sum(plan.batch_sizes)
        assert len(batches) == 1, "every rank must get the same number of batches"
        assert len(seen) == len(set(seen)), "a sample was planned twice in one epoch"
        dropped = {i for a, b in dropped_canonical(total, world_size, epoch) for i in range(a, b)}
        assert len(dropped) == total % world_size
        assert set(seen) == set(range(total)) - dropped


def test_dropped_remainder_rotates():
    total, world = 41, 3  # 2 dropped per epoch
    per_epoch = [{i for a, b in dropped_canonical(total, world, e) for i in range(a, b)} for e in range(41)]
    assert all(len(d) == 2 for d in per_epoch)
    counts = Counter(i for d in per_epoch for i in d)
    assert set(counts) == set(range(total)) and set(counts.values()) == {2}, (
        "every sample dropped equally often"
    )
    assert dropped_canonical(40, 2, 5) == []


def test_sequence_is_a_shard_permutation():
    counts = [4, 1, 9]
    a = sequence_segments(counts, seed=0, epoch_or_pass=0)
    assert sorted((s.shard, s.lo, s.hi) for s in a) == [(0, 0, 4), (1, 0, 1), (2, 0, 9)]
    orders = {tuple(s.shard for s in sequence_segments(counts, 0, e)) for e in range(20)}
    assert len(orders) > 1, "the shard order must change between epochs"


@pytest.mark.parametrize("window", [2, 10, 100])
def test_window_shuffle_is_a_bounded_buffer(window):
    n = 1000
    order = window_shuffle(n, window, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(n))
    assert (order != np.arange(n)).any()
    # A reader streaming inputs in order and emitting in `order` holds at most `window` samples.
    emitted_upto = 0
    held = set()
    read = 0
    max_held = 0
    for idx in order:
        while idx not in held:
            held.add(read)
            read += 1
        max_held = max(max_held, len(held))
        held.remove(idx)
        emitted_upto += 1
    assert max_held <= window


# ---------------------------------------------------------------------------------------------------
# Exact-once epochs, equal batch counts


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_once_across_two_ranks(uneven, num_workers):
    cfg = _cfg(num_workers=num_workers)
    orders = []
    for epoch in range(2):
        keys: list[str] = []
        per_rank = []
        for rank in range(2):
            loader = build_loader(uneven, cfg, rank=rank, world_size=2)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 7  # 20 samples per rank in batches of 3
            assert [len(b["__key__"]) for b in batches] == [3] * 6 + [2]
            per_rank.append(_keys(batches))
            keys += per_rank[-1]
            assert loader.stats.samples_seen == 20 and loader.stats.skipped_total == 0
        assert len(keys) == len(set(keys)) == 40
        assert set(keys) == _all_keys(40)
        orders.append(per_rank)
    assert orders[0] != orders[1], "a new epoch must visit the samples in another order"


def test_remainder_is_dropped_and_rotates(odd):
    dropped = []
    for epoch in range(3):
        keys = []
        for rank in range(2):
            loader = build_loader(odd, _cfg(batch_size=4), rank=rank, world_size=2)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 5  # 20 per rank
            keys += _keys(batches)
            assert loader.stats.dropped == 1
        assert len(keys) == len(set(keys)) == 40
        (missing,) = _all_keys(41) - set(keys)
        dropped.append(missing)
    assert dropped == ["s000000", "s000001", "s000002"]


def test_epochs_advance_without_set_epoch(uneven):
    loader = build_loader(uneven, _cfg(batch_size=8))
    first, second = _keys(loader), _keys(loader)
    assert sorted(first) == sorted(second) == sorted(_all_keys(40))
    assert first != second
    assert loader.epoch == 2 and loader.stats.passes == 2
    loader.set_epoch(0)
    assert _keys(loader) == first


def test_drop_last(uneven):
    loader = build_loader(uneven, _cfg(batch_size=6, drop_last=True), rank=0, world_size=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and all(len(b["__key__"]) == 6 for b in batches)


def test_too_small_split_is_refused(uneven):
    with pytest.raises(ValueError, match="not one batch"):
        build_loader(uneven, _cfg(batch_size=64, drop_last=True))


# ---------------------------------------------------------------------------------------------------
# Determinism


def test_deterministic_per_seed_and_epoch(uneven):
    def run(seed, epoch, num_workers=0):
        loader = build_loader(uneven, _cfg(seed=seed, num_workers=num_workers), rank=1, world_size=2)
        loader.set_epoch(epoch)
        return _keys(loader)

    a = run(3, 0)
    assert a == run(3, 0) == run(3, 0, num_workers=0)
    assert a != run(3, 1)
    assert a != run(4, 0)
    assert sorted(a) == sorted(run(3, 0, num_workers=2)), "workers change the order, never the set"
    assert run(3, 0, num_workers=2) == run(3, 0, num_workers=2)


# ---------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("num_workers", [0, 2])
def test_decodes_images_features_and_json(uneven, num_workers):
    # prefetch_factor=1 → each worker reuses 3 shared buffers for its 4 batches: values must still match keys
    loader = build_loader(uneven, _cfg(batch_size=5, num_workers=num_workers, prefetch_factor=1))
    batches = list(loader)  # all held at once, as a careless consumer would
    assert len(batches) == 8
    for batch in batches:
        idx = [int(k[1:]) for k in batch["__key__"]]
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (5, 3, 16, 16)
        assert batch["image"].is_contiguous()
        assert batch["h0-mini"].dtype == torch.float16 and batch["h0-mini"].shape == (5, EMBED_DIM)
        assert batch["vae"].dtype == torch.float16 and batch["vae"].shape == (5, *VAE_SHAPE)
        for row, i in enumerate(idx):
            assert np.array_equal(batch["image"][row].permute(1, 2, 0).numpy(), sample_pixels(i))
            assert np.array_equal(batch["h0-mini"][row].numpy(), sample_embedding(i))
            assert np.array_equal(batch["vae"][row].numpy(), sample_vae(i))
            assert batch["json"][row]["index"] == i


def test_float_images_and_member_selection(uneven):
    loader = build_loader(uneven, _cfg(batch_size=4, image_format="float", members=["image"]))
    batch = next(iter(loader))
    assert set(batch) == {"__key__", "image"}
    img = batch["image"]
    assert img.dtype == torch.float32 and img.is_contiguous()
    assert img.min() >= -1.0 and img.max() <= 1.0
    expected = (
        torch.from_numpy(sample_pixels(int(batch["__key__"][0][1:]))).permute(2, 0, 1).float() / 127.5 - 1
    )
    assert torch.allclose(img[0], expected)

    latents = build_loader(uneven, _cfg(batch_size=4, members=["vae.npy", "json"]))
    batch = next(iter(latents))
    assert set(batch) == {"__key__", "json", "vae"}

    with pytest.raises(ValueError, match="unknown member"):
        build_loader(uneven, _cfg(members=["latents"]))


# ---------------------------------------------------------------------------------------------------
# Resume


def _run_with_break(folder, cfg, stop_after, rank=0, world_size=1, load_rank=None, epochs=1):
    """Keys of an uninterrupted run vs. a run stopped after `stop_after` batches and resumed."""
    full_loader = build_loader(folder, cfg, rank=rank, world_size=world_size)
    full = [_keys(full_loader) for _ in range(epochs)]

    first = build_loader(folder, cfg, rank=rank, world_size=world_size)
    it = iter(first)
    head = [next(it) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint round trip
    del it

    second = build_loader(
        folder, cfg, rank=load_rank if load_rank is not None else rank, world_size=world_size
    )
    second.load_state_dict(state)
    rest = [_keys(second) for _ in range(epochs)]
    return full, _keys(head), rest, second


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [1, 3, 4])
def test_resume_continues_exactly(uneven, num_workers, stop_after):
    cfg = _cfg(num_workers=num_workers, batch_size=2)
    full, head, rest, second = _run_with_break(uneven, cfg, stop_after, rank=1, world_size=2, epochs=2)
    assert len(head) == 2 * stop_after
    assert head + rest[0] == full[0], "the resumed epoch must give exactly the remaining samples, in order"
    assert rest[1] == full[1], "the next epoch must be the same as in the uninterrupted run"
    assert second.stats.samples_seen == 40  # two epochs of 20 for this rank, counted across the resume


def test_resume_at_epoch_end(uneven):
    cfg = _cfg(batch_size=10)
    loader = build_loader(uneven, cfg)
    batches = list(iter(loader))
    assert len(batches) == 4
    it = iter(loader)  # epoch 1, stop after its last batch but before the iterator finishes
    for _ in range(4):
        next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 4
    resumed = build_loader(uneven, cfg)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert list(resumed) == []
    assert resumed.epoch == 2


def test_state_of_another_rank(uneven):
    """Lightning checkpoints rank 0's loader state; every rank loads it and continues its own share."""
    cfg = _cfg(num_workers=2, batch_size=2)
    rank0 = build_loader(uneven, cfg, rank=0, world_size=2)
    it = iter(rank0)
    for _ in range(3):
        next(it)
    state = rank0.state_dict()
    full, head, rest, _ = _run_with_break(uneven, cfg, 3, rank=1, world_size=2)
    other = build_loader(uneven, cfg, rank=1, world_size=2)
    other.load_state_dict(state)
    assert _keys(other) == rest[0]
    assert head + rest[0] == full[0]


def test_resume_with_other_topology(uneven):
    cfg = _cfg(batch_size=2)
    two = build_loader(uneven, cfg, rank=0, world_size=2)
    it = iter(two)
    for _ in range(3):
        next(it)
    state = two.state_dict()
    one = build_loader(uneven, cfg, rank=0, world_size=1)
    with pytest.raises(ValueError, match="different settings"):
        one.load_state_dict(state, strict=True)
    one.load_state_dict(state)  # restarts at the next epoch
    assert one.epoch == 1
    keys = _keys(one)
    reference = build_loader(uneven, cfg, rank=0, world_size=1)
    reference.set_epoch(1)
    assert keys == _keys(reference)

    other_seed = build_loader(uneven, _cfg(batch_size=2, seed=99), rank=0, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# Corrupt samples


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """30 samples in shards of 10, 12, 8: one garbage image, one sample without json, one without its
    image, and the last shard truncated in the middle of sample 25's image."""
    folder = tmp_path_factory.mktemp("corrupt")
    samples = [synthetic_sample(i) for i in range(30)]
    samples[3]["png"] = b"\x89PNG\r\n\x1a\nthis is not a png"
    del samples[14]["json"]
    del samples[15]["png"]
    write_split(folder, samples, [10, 12, 8])
    last = folder / "train-000002.tar"
    with tarfile.open(last) as tar:
        member = tar.getmember("s000025.png")
        cut = member.offset_data + member.size // 2
    with open(last, "r+b") as f:
        f.truncate(cut)
    bad = {"s000003": "bad_image", "s000014": "missing_json", "s000015": "missing_image"}
    bad.update({f"s{i:06d}": "truncated_shard" for i in range(25, 30)})
    return folder, bad


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(corrupt, num_workers, caplog):
    folder, bad = corrupt
    keys = []
    skipped: Counter[str] = Counter()
    padded = 0
    with caplog.at_level(logging.WARNING, logger="cytosyn.data"):
        for rank in range(2):
            loader = build_loader(
                folder, _cfg(num_workers=num_workers, batch_size=4), rank=rank, world_size=2
            )
            batches = list(loader)
            assert len(batches) == len(loader) == 4  # 15 per rank, batches of 4: never fewer batches
            assert [len(b["__key__"]) for b in batches] == [4, 4, 4, 3], "short batches are refilled"
            keys += _keys(batches)
            skipped.update(loader.stats.skipped_corrupt)
            padded += loader.stats.padded
    assert skipped == Counter(bad.values())
    assert not set(keys) & set(bad), "a corrupt sample was delivered"
    assert set(keys) == _all_keys(30) - set(bad)
    assert padded == len(bad)
    assert len(keys) - len(set(keys)) == padded  # the only repeats are the counted padding
    messages = " ".join(r.getMessage() for r in caplog.records)
    for key, reason in bad.items():
        if reason != "truncated_shard":
            assert key in messages and reason in messages
    assert "truncated_shard" in messages


def test_resume_on_corrupt_split(corrupt):
    folder, _ = corrupt
    cfg = _cfg(num_workers=2, batch_size=4)
    full, head, rest, second = _run_with_break(folder, cfg, 2, rank=0, world_size=2)
    assert head + rest[0] == full[0]
    reference = build_loader(folder, cfg, rank=0, world_size=2)
    list(reference)
    assert second.stats.skipped_corrupt == reference.stats.skipped_corrupt


def test_hash_verification(tmp_path):
    write_synthetic_split(tmp_path, [6, 6])
    shard = tmp_path / "train-000001.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember("s000006.vae.npy")
        offset = member.offset_data + member.size - 1
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01  # a different fp16 value: still a valid tar and a valid sample
    shard.write_bytes(bytes(data))
    loader = build_loader(tmp_path, _cfg(batch_size=6, verify_hashes=True))
    keys = _keys(loader)
    assert loader.stats.skipped_corrupt == {"hash_mismatch": 6}
    assert len(keys) == 12 and set(keys) == {f"s{i:06d}" for i in range(6)}
    unverified = build_loader(tmp_path, _cfg(batch_size=6))
    assert unverified.stats.skipped_total == 0 and len(set(_keys(unverified))) == 12


def test_missing_shard_file(tmp_path):
    write_synthetic_split(tmp_path, [5, 5])
    (tmp_path / "train-000000.tar").unlink()
    loader = build_loader(tmp_path, _cfg(batch_size=5))
    assert len(list(loader)) == 2
    assert loader.stats.skipped_corrupt == {"unreadable_shard": 5}


# ---------------------------------------------------------------------------------------------------
# Resampled mode


def test_resampled_passes_without_repeats(uneven):
    cfg = _cfg(mode="resampled", num_workers=2, batch_size=5)
    loaders = [build_loader(uneven, cfg, rank=r, world_size=2) for r in range(2)]
    with pytest.raises(TypeError):
        len(loaders[0])
    assert loaders[0].batches_per_pass == 4
    per_pass = []
    streams = [iter(loader) for loader in loaders]
    for _ in range(3):  # 40 samples / (2 ranks × 2 workers) = 10 per worker: 2 batches of 5 per pass
        keys = [k for s in streams for _ in range(4) for k in next(s)["__key__"]]
        assert sorted(keys) == sorted(_all_keys(40)), "each pass visits every sample exactly once"
        per_pass.append(keys)
    assert per_pass[0] != per_pass[1] != per_pass[2]
    assert [loader.stats.passes for loader in loaders] == [3, 3]


def test_resampled_resume(uneven):
    cfg = _cfg(mode="resampled", num_workers=2, batch_size=3)
    ref = iter(build_loader(uneven, cfg))
    full = _keys(next(ref) for _ in range(30))
    first = build_loader(uneven, cfg)
    it = iter(first)
    head = _keys(next(it) for _ in range(17))
    state = first.state_dict()
    second = build_loader(uneven, cfg)
    second.load_state_dict(state)
    it2 = iter(second)
    rest = _keys(next(it2) for _ in range(13))
    assert head + rest == full
    assert second.stats.passes == 2  # 90 samples of a 40-sample split
