"""REPA-E stage 1 (``cytosyn tune-vae`` with ``mode: e2e``): not implemented yet."""

from __future__ import annotations

from cytosyn.config import StrictModel


class E2EConfig(StrictModel):
    pass


class E2EPart:  # pragma: no cover - placeholder until the end-to-end stage lands
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("mode: e2e is not implemented yet")
