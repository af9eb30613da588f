"""The FID Inception-v3 network (moved to :mod:`cytosyn.models.inception`, shared with the conditioning
encoder registry; this module keeps the evaluation code's import path)."""

from cytosyn.models.inception import (  # noqa: F401
    FID_DIM,
    FID_INPUT_SIZE,
    KNOWN_FILES,
    RESIZES,
    FIDInception,
    _tf1_bilinear,
    fid_helper_weights,
    load_fid_inception,
    random_fid_inception,
    resize_to,
)

__all__ = [
    "FID_INPUT_SIZE",
    "RESIZES",
    "FIDInception",
    "fid_helper_weights",
    "load_fid_inception",
    "random_fid_inception",
    "resize_to",
]
