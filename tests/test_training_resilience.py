"""What a cluster run relies on: resume by step, damaged checkpoints, full disks, logs across restarts,
signals and requeue, precision and strategy choices, and steps that never wait for the device."""

from __future__ import annotations

import csv
import errno
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config
from torch.overrides import TorchFunctionMode

from cytosyn.config import ConfigError, build_config, load_config
from cytosyn.training import checkpoints as ckpt_mod
from cytosyn.training.checkpoints import (
    CheckpointWriteError,
    NoIntactCheckpointError,
    find_resume_checkpoint,
    list_checkpoints,
)
from cytosyn.training.config import TrainConfig
from cytosyn.training.module import LatentDiffusionModule
from cytosyn.training.run import build_trainer, run_training
from cytosyn.training.strategies import CPU_DEEPSPEED_ENV, deepspeed_config, resolve_execution


def _cfg(features: dict[str, Path], run_dir: Path, *overrides: str) -> TrainConfig:
    return build_config(TrainConfig, tiny_train_config(features, run_dir), list(overrides))


def _rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))


def _loss_by_step(run_dir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for row in _rows(run_dir):
        if row.get("train/loss"):
            out.setdefault(int(row["step"]), []).append(float(row["train/loss"]))
    return out


# ---- checkpoints: newest intact by step, damaged ones, leftovers, full disks ------------------------


def test_resume_takes_the_newest_intact_checkpoint_by_step_not_by_name(tiny_features, tmp_path):
    run = tmp_path / "run"
    run_training(_cfg(tiny_features, run, "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=4"))
    folder = run / "checkpoints"
    (folder / "last.ckpt").write_bytes((folder / "step-00000004.ckpt").read_bytes())  # an older last.ckpt
    steps = {i.path.name: i.global_step for i in list_checkpoints(run)}
    assert steps == {"last.ckpt": 4, "step-00000004.ckpt": 4, "step-00000008.ckpt": 8}
    assert find_resume_checkpoint(run) == folder / "step-00000008.ckpt"
    result = run_training(
        _cfg(tiny_features, run, "trainer.max_steps=10", "trainer.checkpoint_every_n_steps=4")
    )
    assert result.resumed_from == folder / "step-00000008.ckpt" and result.global_step == 10
    assert result.history[0]["micro_step"] == 9  # continued after step 8, not after step 4


def test_all_damaged_checkpoints_refuse_to_start_unless_restart(tiny_features, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tiny_features, run, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2")
    run_training(cfg)
    damaged = {}
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        damaged[path.name] = path.read_bytes()
    with pytest.raises(NoIntactCheckpointError, match=r"none is intact.*--restart"):
        run_training(cfg)
    for name, data in damaged.items():  # nothing touched
        assert (run / "checkpoints" / name).read_bytes() == data
    result = run_training(cfg, restart=True)
    assert result.resumed_from is None and result.global_step == 4
    aside = next((run / "checkpoints").glob("corrupt-*"))
    assert {p.name for p in aside.iterdir()} == set(damaged)
    assert list((run / "logs").glob("metrics.*.csv"))  # the first history is kept beside the new one


def test_leftovers_of_killed_writes_are_removed(tiny_features, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-00000002.ckpt.tmp-4242").mkdir(parents=True)
    (run / "checkpoints" / ".last.ckpt.tmp-1234").write_bytes(b"half a checkpoint")
    run_training(_cfg(tiny_features, run, "trainer.max_steps=2"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tiny_features, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_training(_cfg(tiny_features, run, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2"))
    before = (run / "checkpoints" / "last.ckpt").read_bytes()

    def full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    with pytest.raises(CheckpointWriteError, match="disk is full"):
        run_training(_cfg(tiny_features, run, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"))
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_a_read_only_checkpoint_folder_is_refused_before_training(tiny_features, tmp_path, monkeypatch):
    real = Path.write_bytes

    def read_only(self, data):
        if ".write-probe-" in self.name:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(CheckpointWriteError, match=r"not writable.*nothing was trained"):
        run_training(_cfg(tiny_features, tmp_path / "run", "trainer.max_steps=2"))
    assert not list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))


def test_config_is_written_only_once_a_start_has_succeeded(tiny_features, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_training(_cfg(tiny_features, run, "trainer.max_steps=2"))
    changed = _cfg(tiny_features, run, "trainer.max_steps=4", "optim.lr=5e-4")

    def broken_load(self, checkpoint):
        raise RuntimeError("checkpoint unreadable")

    monkeypatch.setattr(LatentDiffusionModule, "on_load_checkpoint", broken_load)
    with pytest.raises(RuntimeError, match="unreadable"):
        run_training(changed, force=True)
    assert load_config(TrainConfig, run / "config.yaml").optim.lr == pytest.approx(1e-3)  # untouched
    monkeypatch.undo()
    run_training(changed, force=True)
    assert load_config(TrainConfig, run / "config.yaml").optim.lr == pytest.approx(5e-4)
    assert len(list(run.glob("config.*.yaml"))) == 1  # the replaced one is kept


# ---- logs across restarts ------------------------------------------------------------------------------


def test_metrics_history_is_kept_across_restarts_with_each_step_once(tiny_features, tmp_path):
    run = tmp_path / "run"
    run_training(_cfg(tiny_features, run, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2"))
    # An attempt killed after its last checkpoint logged steps 2 and 3 that the next attempt trains again.
    path = run / "logs" / "metrics.csv"
    rows = _rows(run)
    fake = [dict(rows[-1], step=str(s), **{"train/loss": "123.0"}) for s in (2, 3)]
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerows(fake)
    run_training(_cfg(tiny_features, run, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"))
    losses = _loss_by_step(run)
    assert sorted(losses) == list(range(4)) and all(len(v) == 1 for v in losses.values())
    assert losses[2][0] != 123.0
    straight = tmp_path / "straight"
    run_training(_cfg(tiny_features, straight, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"))
    assert _loss_by_step(straight) == losses


def test_the_wandb_run_id_is_stored_and_resumed(tiny_features, tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    for steps in (2, 4):
        run_training(_cfg(tiny_features, run, f"trainer.max_steps={steps}", "logging.wandb=offline"))
    run_id = (run / "wandb_run_id").read_text().strip()
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs)


# ---- strategies, precision, signals, requeue ----------------------------------------------------------


def test_impossible_combinations_are_refused_before_any_work(tiny_features, tmp_path, monkeypatch):
    def cfg(*overrides):
        return _cfg(tiny_features, tmp_path / "never", *overrides)

    with pytest.raises(ConfigError, match="deepspeed_stage_3 is refused"):
        run_training(cfg("trainer.strategy=deepspeed_stage_3"))
    with pytest.raises(ConfigError, match="DeepSpeed needs CUDA"):
        run_training(cfg("trainer.strategy=deepspeed_stage_2"))
    monkeypatch.setenv(CPU_DEEPSPEED_ENV, "1")
    with pytest.raises(ConfigError, match="16-mixed is refused with DeepSpeed"):
        run_training(cfg("trainer.strategy=deepspeed_stage_2", "trainer.precision=16-mixed"))
    with pytest.raises(ConfigError, match="GPU was asked for"):
        if not torch.cuda.is_available():
            run_training(cfg("trainer.accelerator=gpu"))
        else:
            raise ConfigError("GPU was asked for")
    assert not (tmp_path / "never").exists()


def test_deepspeed_config_carries_clipping_and_autocast(tiny_features, tmp_path, monkeypatch):
    monkeypatch.setenv(CPU_DEEPSPEED_ENV, "1")
    cfg = _cfg(
        tiny_features,
        tmp_path,
        "trainer.strategy=deepspeed_stage_2",
        "trainer.precision=bf16-mixed",
        "optim.grad_clip=0.5",
    )
    config = deepspeed_config(cfg, resolve_execution(cfg))
    assert config["gradient_clipping"] == 0.5  # DeepSpeed clips (Lightning passed 0.0 before)
    assert config["zero_optimization"]["stage"] == 2
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # fp32 weights, bf16 compute
    assert "bf16" not in config and "fp16" not in config  # no cast of the module (or the EMA, or the batch)


def test_one_requeue_mechanism_under_slurm(tiny_features, tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from cytosyn.training.callbacks import Preemption

    for name, value in {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "cytosyn-train",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "gpu001",
    }.items():
        monkeypatch.setenv(name, value)
    cfg = _cfg(tiny_features, tmp_path / "run")
    trainer = build_trainer(cfg, [])
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    preemption = Preemption(tmp_path, max_attempts=3)
    preemption.install(trainer)
    try:
        import signal

        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            assert signal.getsignal(sig) == preemption._handler
        trainer._signal_connector.register_signal_handlers()  # what Lightning calls in fit: now inert
        assert signal.getsignal(signal.SIGTERM) == preemption._handler
    finally:
        preemption.restore()


def test_sigint_checkpoints_at_a_step_boundary_and_resumes_exactly(tiny_features, tmp_path, monkeypatch):
    import signal

    straight = run_training(_cfg(tiny_features, tmp_path / "straight", "trainer.max_steps=5"))
    original = LatentDiffusionModule.training_step

    def ctrl_c_at_step_3(self, batch, batch_idx):
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step, like a Ctrl-C
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LatentDiffusionModule, "training_step", ctrl_c_at_step_3)
    run = tmp_path / "run"
    first = run_training(_cfg(tiny_features, run, "trainer.max_steps=5"))
    assert first.status == "preempted" and first.global_step == 3  # the step in flight was finished
    monkeypatch.undo()
    second = run_training(_cfg(tiny_features, run, "trainer.max_steps=5"))
    assert second.resumed_from is not None and second.status == "finished"
    assert [h["loss"] for h in first.history + second.history] == [h["loss"] for h in straight.history]


@pytest.mark.slow  # fp16 autocast on a CPU is slow (~50 s here)
def test_fp16_unscales_before_clipping_and_lowers_the_scale_after_overflows(tiny_features, tmp_path):
    """fp16 autocast on CPU. A first scale of 2**24 overflows the fp16 gradients: those steps must be
    skipped *and* the scaler updated (halving the scale each time), then training proceeds with
    gradients that were unscaled before the norm was taken and clipped."""
    run = tmp_path / "run"
    cfg = _cfg(
        tiny_features,
        run,
        "trainer.max_steps=10",
        "trainer.precision=16-mixed",
        f"trainer.loss_scale_init={2.0**24}",
        "trainer.max_consecutive_nonfinite=6",
    )
    result = run_training(cfg)
    assert result.status == "finished" and 1 <= result.skipped_steps < 6
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["MixedPrecision"]["scale"] == 2.0**24 / 2**result.skipped_steps
    norms = [float(r["grad_norm/total"]) for r in _rows(run) if r.get("grad_norm/total")]
    applied = [n for n in norms if n != float("inf")]
    assert len(applied) == 10 - result.skipped_steps and max(applied) < 10.0  # unscaled: O(1), not O(scale)


def test_the_sample_grid_vae_is_resolved_before_training_or_the_grid_is_skipped(
    tiny_features, tmp_path, monkeypatch, caplog
):
    calls = []

    def offline_hub(self):
        calls.append(self.micro_step)
        raise RuntimeError("cannot reach the hub (HF_HUB_OFFLINE=1)")

    monkeypatch.setattr(LatentDiffusionModule, "_grid_vae", offline_hub)
    run = tmp_path / "run"
    cfg = _cfg(tiny_features, run, "trainer.max_steps=4", "validation.sample_grid_every_n_steps=2")
    with caplog.at_level(logging.WARNING):
        result = run_training(cfg)
    assert result.status == "finished" and result.global_step == 4
    assert calls == [0]  # once, before the first step
    assert not (run / "samples").exists()
    assert "sample grid switched off" in caplog.text


def test_stored_repa_tokens_above_the_limit_are_flagged(tiny_features, tmp_path, caplog):
    from cytosyn.manifest import read_manifest
    from cytosyn.training.module import split_features

    cfg = _cfg(tiny_features, tmp_path, "repa.stored_tokens_limit_gb=1e-6")
    with caplog.at_level(logging.WARNING):
        split_features(cfg, read_manifest(cfg.data.train), cfg.data.train)
    assert "repa.online_encoder" in caplog.text


# ---- the EMA and the step loop ------------------------------------------------------------------------


def test_the_ema_is_fp32_outside_the_module_tree_and_saved_with_the_checkpoint(tiny_features, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tiny_features, run, "trainer.max_steps=4")
    module = LatentDiffusionModule(cfg, {**_features(cfg)})
    assert not any(name.startswith("ema") for name, _ in module.named_modules())
    assert not any(k.startswith("ema.") for k in module.state_dict())  # nothing for DDP to broadcast
    run_training(cfg)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    ema = {k: v for k, v in state.items() if k.startswith("ema.module.")}
    assert ema and all(v.dtype == torch.float32 for v in ema.values() if v.is_floating_point())
    key = "ema.module.model.final_layer.linear.weight"
    raw = state["net.model.final_layer.linear.weight"]
    assert not torch.equal(state[key], raw) and state[key].abs().sum() > 0  # moved, but averaged


def _features(cfg: TrainConfig) -> dict:
    from cytosyn.manifest import read_manifest
    from cytosyn.training.module import split_features

    return split_features(cfg, read_manifest(cfg.data.train), cfg.data.train)


_SYNCS = {"item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"}


class _SyncCounter(TorchFunctionMode):
    """Counts host-sync calls (``item``, ``float(t)``, ...) made by training or Lightning code."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCS:
            frame = sys._getframe(1)
            while frame and ("/torch/" in frame.f_code.co_filename):
                frame = frame.f_back
            where = frame.f_code.co_filename if frame else ""
            if "/cytosyn/training/" in where or "/lightning/" in where:
                self.calls.append(f"{name} at {Path(where).name}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


def test_steps_between_logging_steps_never_wait_for_the_device(tiny_features, tmp_path):
    """Every value read back from a tensor (loss, gradient norm, skip flag) waits for the GPU to finish
    the step; outside logging steps (every 4th here) there must be none."""
    from lightning.pytorch.callbacks import Callback

    counter = _SyncCounter()
    per_step: dict[int, list[str]] = {}

    class Recorder(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            counter.calls.clear()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            per_step[trainer.global_step - 1] = list(counter.calls)

    import cytosyn.training.run as run_mod

    cfg = _cfg(
        tiny_features,
        tmp_path / "run",
        "trainer.max_steps=12",
        "trainer.log_every_n_steps=4",
        "trainer.checkpoint_every_n_steps=1000",
    )
    original = run_mod.build_trainer

    def with_recorder(cfg, callbacks, *args, **kwargs):
        return original(cfg, [*callbacks, Recorder()], *args, **kwargs)

    run_mod.build_trainer = with_recorder
    try:
        with counter:
            run_training(cfg)
    finally:
        run_mod.build_trainer = original
    assert sorted(per_step) == list(range(12))
    quiet = {step: calls for step, calls in per_step.items() if (step + 1) % 4}
    assert all(not calls for calls in quiet.values()), quiet
    assert any(per_step[step] for step in (3, 7, 11))  # logging steps do read values back
