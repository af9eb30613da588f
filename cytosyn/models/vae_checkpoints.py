"""Single-file autoencoder checkpoints (original latent-diffusion layout), e.g. REPA-E's E2E-VAE.

REPA-E publishes its tuned VAEs (``e2e-sdvae-400k.pt``) and its training checkpoints (``{"vae": ...,
"model": ..., "ema": ..., ...}``) with the autoencoder in the CompVis latent-diffusion key layout
(``encoder.down.0.block.0.conv1.weight``, ``quant_conv``, ...). diffusers ships the conversion to its
``AutoencoderKL`` layout (``convert_ldm_vae_checkpoint``); this module only finds the autoencoder inside
the file, converts it against the registry entry's architecture, and loads it **strictly**: a key left
over or missing means another architecture, and is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

SINGLE_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors / torch file. Torch files are read with ``weights_only=True``; REPA-E's
    training checkpoints also hold their ``argparse.Namespace`` arguments, allowed as a safe global."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("vae"), dict):
        state = state["vae"]  # a REPA-E training checkpoint: the autoencoder's weights
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a latent-diffusion / Lightning checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def is_ldm_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(".down.0.block." in k for k in state) or any(k.startswith("first_stage_model.") for k in state)


def autoencoder_from_single_file(config: dict[str, Any], path: Path):
    """A diffusers ``AutoencoderKL`` of ``config`` with the weights of the single file ``path`` (latent-
    diffusion or diffusers layout), loaded strictly. Raises ``ValueError`` naming the mismatched keys."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = read_state(path)
    if is_ldm_layout(state):
        state = convert_ldm_vae_checkpoint(state, config)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit this autoencoder: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})"
        )
    vae = AutoencoderKL(**config)
    vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return vae
