"""DeepSpeed on CPU processes — for tests only (no GPU in CI), never for real training.

Lightning refuses DeepSpeed on a CPU accelerator, but DeepSpeed itself runs there: this subclass skips
Lightning's CUDA checks, gives DeepSpeed the local rank as its device index and talks over gloo. DeepSpeed's
shared-memory collective op would be JIT-compiled for minutes on first use; it is replaced by a no-op
builder so collectives go through gloo. The strategy is chosen by :func:`cytosyn.training.strategies.build_strategy`
only when ``CYTOSYN_CPU_DEEPSPEED_FOR_TESTS=1`` is set and the accelerator is the CPU.

Everything else — the engine, ZeRO-2 partitioning, torch autocast, clipping, checkpoint folders and their
consolidation — is the real DeepSpeed code path a GPU run takes.
"""

from __future__ import annotations

import argparse
import importlib
import os

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy

from cytosyn.training.strategies import CytosynDeepSpeedStrategy


def disable_shared_memory_comm() -> None:
    """Make DeepSpeed skip building its shared-memory comm op (collectives then use gloo)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # `import deepspeed.comm.torch` would bind the `torch` attribute of deepspeed.comm (the real torch
    # package), so the module is fetched by name.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class CPUDeepSpeedStrategyForTests(CytosynDeepSpeedStrategy):
    def __init__(self, *args, **kwargs):
        disable_shared_memory_comm()
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        # DeepSpeedStrategy.setup_environment raises for a non-CUDA accelerator; skip to DDP's.
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        # As DeepSpeedStrategy.setup_distributed, without the check that devices are cuda:0..N-1.
        disable_shared_memory_comm()
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        params = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),  # the CPU device has no index
            config=self.config,
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer
