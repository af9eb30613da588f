"""Exponential moving average of a model's parameters and buffers.

``EMA(model)`` keeps a frozen deep copy (``ema.module``, in eval mode) and, after each optimiser step,
``ema.update(model)`` moves it towards the live model:

    ema_p ← decay·ema_p + (1 − decay)·p          for every parameter that requires grad,
    ema_p ← p                                    for frozen parameters (exact copy: no float drift),

and for buffers (e.g. the running statistics of :class:`cytosyn.diffusion.BatchNormLatentNorm`):

- ``buffers="copy"`` (default): every buffer is copied from the live model. The latent statistics are a
  running estimate of a stationary quantity (the data's per-channel mean/variance), already smoothed by
  BatchNorm's momentum; copying gives the EMA model the best current estimate. Averaging them a second
  time at decay 0.9999 would keep them near their initial values (mean 0, variance 1) for ~10⁴ steps,
  so an early EMA checkpoint would sample with the wrong latent scale.
- ``buffers="average"``: floating-point buffers are averaged with the same decay as the parameters
  (what REPA-E's reference code does); integer buffers (``num_batches_tracked``) are always copied.

Warm-up (optional, ``warmup=True``): the decay used at update ``n`` (0-based) is
``min(decay, (1 + n) / (10 + n))``, so the average forgets the random initialisation quickly.

The copy is a submodule: ``ema.state_dict()`` holds ``module.*`` (the averaged weights, loadable into a
bare model with :meth:`EMA.module_state_dict`) and ``num_updates``; ``load_state_dict`` restores both.
If the EMA is attached to a LightningModule, exclude ``ema`` from the optimiser's parameters. The average
is kept in the live model's dtypes (keep master weights in fp32 and use autocast for bf16).

In training (:mod:`cytosyn.training.module`) the EMA is deliberately *not* a submodule of the
LightningModule: DDP would broadcast its buffers every step and DeepSpeed would cast (bf16) and shard it.
It lives on global rank 0 only, in fp32, and travels in the checkpoint next to the model's state.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

BufferMode = Literal["copy", "average"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA(nn.Module):
    """EMA of ``model`` (see the module docstring for the exact update rule and the buffer policy)."""

    num_updates: Tensor

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmup: bool = False,
        buffers: BufferMode = "copy",
    ):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if buffers not in ("copy", "average"):
            raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.buffer_mode: BufferMode = buffers
        self.module = copy.deepcopy(unwrap_model(model))
        self.module.eval()
        self.module.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._bound: tuple[nn.Module, tuple] | None = None

    def train(self, mode: bool = True) -> EMA:
        # The averaged copy stays in eval mode (BatchNorm must not update its statistics from its own use).
        super().train(mode)
        self.module.eval()
        return self

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    def _pairs(self, model: nn.Module, kind: str) -> Iterator[tuple[str, Tensor, Tensor]]:
        src = dict(getattr(model, kind)())
        dst = dict(getattr(self.module, kind)())
        if src.keys() != dst.keys():
            missing = sorted(set(dst) - set(src))[:5]
            extra = sorted(set(src) - set(dst))[:5]
            raise ValueError(f"EMA and model {kind} differ (missing {missing}, extra {extra})")
        for name, ema_t in dst.items():
            yield name, ema_t, src[name]

    def _plan(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]]:
        """(averaged EMA tensors, their live sources, (EMA, live) pairs copied as they are) for ``model``.

        Built once per live model and reused: the update is then two foreach kernels, not a walk over
        ~700 named tensors per step. The live tensors are the model's own Parameter/buffer objects, so an
        optimiser or DeepSpeed rewriting ``.data`` in place is seen without rebuilding.
        """
        if self._bound is not None and self._bound[0] is model:
            return self._bound[1]
        avg_ema: list[Tensor] = []
        avg_src: list[Tensor] = []
        copies: list[tuple[Tensor, Tensor]] = []
        for _, ema_p, p in self._pairs(model, "named_parameters"):
            if p.requires_grad:
                avg_ema.append(ema_p)
                avg_src.append(p)
            else:
                copies.append((ema_p, p))
        for _, ema_b, b in self._pairs(model, "named_buffers"):
            if self.buffer_mode == "average" and ema_b.is_floating_point():
                avg_ema.append(ema_b)
                avg_src.append(b)
            else:
                copies.append((ema_b, b))
        self._bound = (model, (avg_ema, avg_src, copies))
        return avg_ema, avg_src, copies

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> float:
        """One EMA step towards ``model`` (wrappers are unwrapped); returns the decay used.

        ``ema ← lerp(ema, live, 1 − decay)`` for every averaged tensor in one foreach call (fp32 EMA from
        fp32 live weights: the live values are cast only if the dtypes differ).
        """
        model = unwrap_model(model)
        d = self.current_decay() if decay is None else float(decay)
        avg_ema, avg_src, copies = self._plan(model)
        for ema_t, t in copies:
            ema_t.copy_(t)
        if avg_ema:
            src = [
                s.detach() if s.dtype == e.dtype and s.device == e.device else s.detach().to(e)
                for e, s in zip(avg_ema, avg_src)
            ]
            torch._foreach_lerp_(avg_ema, src, 1.0 - d)
        self.num_updates += 1
        return d

    def _apply(self, fn, recurse=True):  # .to()/.cuda() replace tensors: forget the cached plan
        self._bound = None
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Restart the average at ``model``'s current parameters and buffers."""
        model = unwrap_model(model)
        for kind in ("named_parameters", "named_buffers"):
            for _, ema_t, t in self._pairs(model, kind):
                ema_t.copy_(t)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the EMA values."""
        model = unwrap_model(model)
        for kind in ("named_parameters", "named_buffers"):
            for _, ema_t, t in self._pairs(model, kind):
                t.copy_(ema_t)

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into ``model`` (e.g. for validation), restoring them after."""
        inner = unwrap_model(model)
        backup = {k: v.detach().clone() for k, v in inner.state_dict().items()}
        self.copy_to(inner)
        try:
            yield model
        finally:
            inner.load_state_dict(backup)

    def module_state_dict(self) -> dict[str, Tensor]:
        """The averaged weights as a plain state dict of the wrapped model (no ``module.`` prefix)."""
        return self.module.state_dict()

    def extra_repr(self) -> str:
        return f"decay={self.decay}, warmup={self.warmup}, buffers={self.buffer_mode!r}"
