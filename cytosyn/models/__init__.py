"""Models: the SiT denoiser and the REPA projector, loss and token alignment."""

from cytosyn.models.repa import REPAProjector, align_tokens, area_weights, repa_loss
from cytosyn.models.sit import (
    SIT_PRESETS,
    LoadReport,
    SiT,
    SiTConfig,
    attention,
    build_sit,
    load_sit_state_dict,
    sincos_pos_embed_2d,
    sit_flops,
    timestep_features,
    xformers_usable,
)

__all__ = [
    "SIT_PRESETS",
    "LoadReport",
    "REPAProjector",
    "SiT",
    "SiTConfig",
    "align_tokens",
    "area_weights",
    "attention",
    "build_sit",
    "load_sit_state_dict",
    "repa_loss",
    "sincos_pos_embed_2d",
    "sit_flops",
    "timestep_features",
    "xformers_usable",
]
