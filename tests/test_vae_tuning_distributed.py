"""``tune-vae`` (mode e2e) on two real gloo processes (torchrun's environment variables): every rank ends
with the same VAE, SiT and discriminator weights (averaged gradients, averaged BatchNorm statistics), and
a run interrupted after one step and resumed on two processes reproduces the uninterrupted one exactly.
Each process runs under a wall-clock limit: a failure fails, never hangs."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker(config_json: str, out: str) -> None:
    from cytosyn.config import build_config
    from cytosyn.training.vae_tuning import TuneVAEConfig, run_vae_tuning

    cfg = build_config(TuneVAEConfig, json.loads(config_json))
    result = run_vae_tuning(cfg)
    state = __import__("torch").load(cfg.run_dir / "checkpoints" / "last.pt", weights_only=False)["tuner"]
    record = {
        "history": result.history,
        "descriptor": result.descriptor,
        "checkpoint": {part: _digest(state[part]) for part in ("vae", "disc")}
        | {"sit": _digest(state["e2e"]["net"]), "ema": _digest(state["e2e"]["ema"])},
    }
    Path(out).write_text(json.dumps(record))


def _run(config: dict, out_dir: Path) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "WORLD_SIZE": str(WORLD),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        out = out_dir / f"rank{rank}.json"
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, json.dumps(config), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a tune-vae process hung:\n" + "\n".join(logs))
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
def test_two_process_e2e_same_weights_and_exact_resume(tmp_path):
    from vae_helpers import packed_crc_tiles, tune_config

    dataset = packed_crc_tiles(tmp_path / "crc")

    def config(run: str, steps: int) -> dict:
        return tune_config(
            dataset,
            tmp_path / run,
            mode="e2e",
            max_steps=steps,
            checkpoint_every=1,
            device="cpu",
            data={"heldout_tiles": 1, "batch_size": 2, "crop": 64, "shuffle_buffer": 8},
            optim={},
            e2e={"sit_preset": "SiT-T/2", "encoder": "vit-tiny16", "encoder_random_init": True},
        )

    (tmp_path / "a_out").mkdir()
    (tmp_path / "b_out").mkdir()
    straight = _run(config("a", 3), tmp_path / "a_out")
    # every rank holds the same weights; their data (and so their losses) differ
    assert straight[0]["checkpoint"] == straight[1]["checkpoint"]
    assert straight[0]["history"][0]["l1"] != straight[1]["history"][0]["l1"]
    assert straight[0]["descriptor"]["weights"] == straight[1]["descriptor"]["weights"]
    _run(config("b", 1), tmp_path / "b_out")
    resumed = _run(config("b", 3), tmp_path / "b_out")
    keys = ("total", "vae_repa", "diffusion", "sit_repa", "disc")
    for rank in range(WORLD):
        # the checkpoint carries rank 0's history: every rank's steps after the resume are compared
        first = 0 if rank == 0 else 1
        assert [[h[k] for k in keys] for h in resumed[rank]["history"][first:]] == [
            [h[k] for k in keys] for h in straight[rank]["history"][first:]
        ]
    assert resumed[0]["checkpoint"] == straight[0]["checkpoint"]
    report = json.loads((tmp_path / "a" / "vae" / "reconstruction_report.json").read_text())
    assert report["before"]["tiles"] == 1  # rank 0 measured the held-out report


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(sys.argv[1], sys.argv[2])
