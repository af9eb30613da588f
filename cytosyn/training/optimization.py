"""The optimizer step: clipping, the non-finite-step guard and gradient norms, without per-step host syncs.

One protocol for every precision and strategy, called from the LightningModule's
``on_before_optimizer_step`` hook — the point where gradients are final (reduced across ranks and, under
fp16, already unscaled) and the update comes next:

- **DDP / single process, bf16 or fp32**: the global gradient norm is computed on the device
  (``get_total_norm``), gradients are clipped with it, and ``found_inf = norm is not finite`` is handed to
  torch's fused AdamW, which then skips the whole update on the device. Nothing waits for the GPU.
- **fp16** (GradScaler): the scaler unscales *before* the norm and the clipping (Lightning does it for
  unfused optimizers; for the fused one this hook does), the scaler's own inf check skips the step, and
  ``scaler.update()`` runs after every step — skipped ones included, so the scale comes down after an
  overflow instead of overflowing forever.
- **DeepSpeed**: clipping and the guard are DeepSpeed's (``gradient_clipping`` in its config; the engine
  skips a step whose norm is not finite); the norm is read from the engine after the step.
- An optimizer without the fused kernel falls back to a host check (gradients dropped before its step).

A skipped step still counts as a step (the learning-rate schedule and the EMA advance; the EMA then sees
the unchanged weights): deciding otherwise would need the host to wait for the GPU every step. Skips are
counted on the device; :meth:`StepGuard.summary` turns the counters into numbers at logging steps, where
``max_consecutive_nonfinite`` is enforced (so a run of bad steps is stopped at the next logging step).

Per-module-group gradient norms (logged at logging steps only) are computed from the full gradients, or,
under ZeRO-2, from each rank's partition of them and one all-reduce of a vector of squared norms.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


def module_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by top-level child name (``blocks``, ``x_embedder``, ...)."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.split(".")[0], []).append(p)
    return groups


def _norm_of(tensors: list[Tensor], device: torch.device) -> Tensor:
    if not tensors:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).float())


def group_norms(groups: dict[str, list[nn.Parameter]], device: torch.device) -> Tensor:
    """Gradient norm of each group (device tensor, order of ``groups``)."""
    return torch.stack(
        [_norm_of([p.grad for p in ps if p.grad is not None], device) for ps in groups.values()]
    )


def zero2_group_norms(groups: dict[str, list[nn.Parameter]], device: torch.device) -> Tensor:
    """Group gradient norms under ZeRO-1/2, between backward and the engine's step.

    Each rank holds the reduced gradient of its partition only (``_hp_mapping`` fragments): sum the squares
    of the local fragments per group, all-reduce that vector once, take square roots.
    """
    squares = []
    for params in groups.values():
        total = torch.zeros((), device=device)
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue  # no part of this parameter lives on this rank
            fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1).float()
            address = mapping.lp_fragment_address
            if fragment.numel() == p.numel() and address.numel != p.numel():
                fragment = fragment.narrow(0, address.start, address.numel)
            total = total + fragment.square().sum()
        squares.append(total)
    vector = torch.stack(squares)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    return vector.sqrt()


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step reads ``optimizer.found_inf`` and skips itself (torch's fused Adam/AdamW)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups
    )


class StepGuard:
    """Clipping, the skip decision and the skip counters of a run (see the module docstring)."""

    def __init__(
        self, params: Iterable[nn.Parameter], max_norm: float, device: torch.device, skipped: int = 0
    ):
        self.params = [p for p in params if p.requires_grad]
        self.max_norm = float(max_norm)
        self.device = device
        self.skipped = torch.tensor(float(skipped), device=device)  # skipped steps in the whole run
        self.streak = torch.zeros((), device=device)  # current run of consecutive skipped steps
        self.worst_streak = torch.zeros((), device=device)  # longest run since the last summary
        self.norm: Tensor | None = None  # global gradient norm of the last step (before clipping)
        self.found: Tensor | None = None  # 1.0 if the last step was skipped

    def before_step(self, optimizer: torch.optim.Optimizer, scaler=None) -> None:
        """Norm, clipping and the device-side skip flag; call right before the optimizer's update."""
        if scaler is not None and supports_found_inf(optimizer):
            scaler.unscale_(optimizer)  # Lightning unscales only unfused optimizers before this hook
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = (
            torch.nn.utils.get_total_norm(grads, foreach=True)
            if grads
            else torch.zeros((), device=self.device)
        )
        if self.max_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_norm, norm, foreach=True)
        found = (~torch.isfinite(norm)).float()
        if scaler is None:
            if supports_found_inf(optimizer):
                optimizer.found_inf = found  # the fused kernel skips the update on the device
            elif not math.isfinite(float(norm)):  # fallback: one host sync per step
                optimizer.zero_grad(set_to_none=True)  # parameters without gradients are not updated
        self.norm, self.found = norm.detach(), found

    @staticmethod
    def after_step(optimizer: torch.optim.Optimizer) -> None:
        optimizer.__dict__.pop("found_inf", None)

    def record(self, norm: Tensor | float | None = None) -> None:
        """Update the counters with the last step (``norm``: DeepSpeed's, read from the engine)."""
        if norm is not None:
            value = float(norm)  # DeepSpeed has already synchronised to decide its skip
            self.norm = torch.tensor(value, device=self.device)
            self.found = torch.tensor(0.0 if math.isfinite(value) else 1.0, device=self.device)
        if self.found is None:
            return
        self.skipped = self.skipped + self.found
        self.streak = (self.streak + self.found) * self.found
        self.worst_streak = torch.maximum(self.worst_streak, self.streak)

    def summary_tensor(self) -> Tensor:
        """[skipped, longest streak since the last summary, last norm] — read with the step's other logs."""
        norm = self.norm if self.norm is not None else torch.full((), float("nan"), device=self.device)
        out = torch.stack([self.skipped, self.worst_streak, norm.float().to(self.device)])
        self.worst_streak = self.streak.clone()
        return out
