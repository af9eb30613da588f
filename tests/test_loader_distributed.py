"""A real two-process run of the loader under torch.distributed (gloo, CPU).

Each process builds the loader for its rank over a split with deliberately uneven shards (1, 7, 30, 2
samples) plus a truncated shard, iterates two epochs with two DataLoader workers and all-reduces a
tensor at every step, as DDP does. If the ranks got different numbers of batches the collective would
block, so each process runs under a gloo timeout and the test under a wall-clock limit: a failure
fails, never hangs. The processes then exchange every key they saw; the test checks equal batch
counts, union = the readable samples and no duplicates within an epoch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest

WORLD = 2
EPOCHS = 2
CLEAN = [1, 7, 30, 2]  # samples 0 … 39
TRUNCATED = 6  # shard 4: samples 40 … 45, cut inside sample 43's image
KEPT = 43


def _write(folder: Path) -> None:
    from cytosyn.data.testing import synthetic_sample, write_split

    total = sum(CLEAN) + TRUNCATED
    write_split(folder, [synthetic_sample(i) for i in range(total)], [*CLEAN, TRUNCATED])
    last = folder / "train-000004.tar"
    with tarfile.open(last) as tar:
        member = tar.getmember(f"s{KEPT:06d}.png")
        cut = member.offset_data + 7
    with open(last, "r+b") as f:
        f.truncate(cut)


def _worker(rank: int, port: int, folder: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from cytosyn.data import LoaderConfig, build_loader

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=20),
    )
    loader = build_loader(folder, LoaderConfig(batch_size=4, num_workers=2, shuffle_buffer=16), rank, WORLD)
    result = {"len": len(loader), "epochs": []}
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        keys, steps = [], 0
        for batch in loader:
            token = torch.ones(1)
            dist.all_reduce(token)  # blocks (then times out) if the other rank has no batch left
            assert token.item() == WORLD
            keys += batch["__key__"]
            steps += 1
        gathered: list = [None] * WORLD
        dist.all_gather_object(gathered, {"steps": steps, "keys": keys})
        result["epochs"].append(gathered)
    stats: list = [None] * WORLD
    dist.all_gather_object(stats, loader.stats.as_dict())
    result["stats"] = stats
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run(tmp_path):
    _write(tmp_path / "split")
    out = tmp_path / "result.json"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), str(tmp_path / "split"), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=90)
            logs.append(stdout)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("distributed loader run hung (ranks disagree on the number of batches?)")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"rank failed:\n{log[-4000:]}"

    result = json.loads(out.read_text())
    expected = {f"s{i:06d}" for i in range(KEPT)}  # 43 readable: 46 minus the 3 cut off
    for gathered in result["epochs"]:
        steps = [g["steps"] for g in gathered]
        assert steps == [result["len"]] * WORLD  # 46 // 2 = 23 per rank → 6 batches of 4 (last 3)
        keys = [k for g in gathered for k in g["keys"]]
        readable = [k for k in keys if k in expected]
        assert set(readable) == expected, "every readable sample must be visited in each epoch"
        assert len(readable) - len(set(readable)) == len(keys) - len(expected), "only padding may repeat"
    assert result["len"] == 6
    truncated = sum(st["skipped_corrupt"].get("truncated_shard", 0) for st in result["stats"])
    assert truncated == EPOCHS * (sum(CLEAN) + TRUNCATED - KEPT)
    assert sum(st["padded"] for st in result["stats"]) == truncated


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
