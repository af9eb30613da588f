"""Making the model stack importable on a CPU-only PyTorch.

torchvision 0.28 is the only release that pairs with torch 2.13, and its compiled ops (``_C.so``) need
CUDA libraries. On a CPU build of torch that library does not load, and ``import torchvision`` then
fails while registering fake (meta) kernels for ops that do not exist (``torchvision::nms``), which in
turn breaks ``timm``, ``lightning`` and diffusers' ``AutoencoderKL``.

:func:`import_torchvision` imports torchvision with ``torch.library.register_fake`` wrapped so that a
fake kernel for a *missing* ``torchvision::`` op is skipped. Where the ops exist (every CUDA build) the
wrapper passes every call through, so it changes nothing there. Only torchvision's C++ ops (nms,
roi_align, decode_jpeg, …) stay unavailable on such a machine; cytosyn decodes images with PIL and uses
none of them. Call it before importing timm, lightning or diffusers models.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


def _op_exists(qualified: str) -> bool:
    import torch

    namespace, _, name = qualified.partition("::")
    try:
        getattr(getattr(torch.ops, namespace), name.split(".")[0])
    except (AttributeError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def _skip_fakes_for_missing_torchvision_ops() -> Iterator[None]:
    import torch.library

    original = torch.library.register_fake

    def register_fake(op, func=None, /, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::") and not _op_exists(op):
            return func if func is not None else (lambda f: f)
        return original(op, func, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        yield
    finally:
        torch.library.register_fake = original


def import_torchvision():
    """Import torchvision (see the module docstring for why this needs care); returns the module."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    with _skip_fakes_for_missing_torchvision_ops():
        import torchvision
    return torchvision


def torchvision_ops_available() -> bool:
    """Whether torchvision's compiled ops loaded (False on a CPU-only torch with the CUDA torchvision)."""
    import_torchvision()
    return _op_exists("torchvision::nms")
