"""Data parallelism for ``cytosyn tune-vae``: one process per GPU (torchrun / SLURM env), gradients averaged.

Why not ``DistributedDataParallel``: a REPA-E step runs the SiT twice with its parameters frozen for the
first pass, and the discriminator both frozen (generator term) and trained; DDP's reducer expects one
forward/backward per module and a fixed set of parameters needing gradients. Averaging gradients
explicitly after each backward (one flattened ``all_reduce`` per optimiser) is what DDP would do, at the
points where this loop steps, with no hooks to fight.

Every rank then holds the same weights (same initialisation from the seed, same averaged gradients, same
skip decisions: a non-finite gradient on one rank is non-finite on all after the reduction). The latent
BatchNorm's running statistics are averaged across ranks after each SiT update (each rank normalises with
its own batch's statistics, as REPA-E's per-GPU BatchNorm does), so the EMA and the checkpoint see one
estimate.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process initialised the group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> DistContext:
        """From torchrun's / SLURM's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); one process
        without it. Joins (or creates) the default process group: NCCL on CUDA, gloo on CPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        owns = False
        if not dist.is_initialized():
            cuda = device != "cpu" and torch.cuda.is_available()
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
            owns = True
        return cls(rank, world, local, owns)

    def device(self, name: str) -> torch.device:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def average_grads(self, params: Iterable[Tensor]) -> None:
        """Average the gradients of ``params`` over ranks (one flattened all-reduce)."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def mean(self, value: Tensor) -> Tensor:
        """The mean of a tensor over ranks (a copy; the input is unchanged)."""
        if not self.enabled:
            return value
        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world_size

    def average_(self, tensors: Iterable[Tensor]) -> None:
        """Replace floating tensors (e.g. BatchNorm running statistics) by their mean over ranks, in place."""
        if not self.enabled:
            return
        for t in tensors:
            if t.is_floating_point():
                dist.all_reduce(t)
                t /= self.world_size

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
