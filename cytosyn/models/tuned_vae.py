"""A VAE tuned by cytosyn (``cytosyn tune-vae``), as a folder any stage can load by its base registry name.

Folder layout (written by :func:`export_tuned_vae`, read by :func:`cytosyn.models.vae.load_vae` when the
weights path is such a folder):

- the weights in the base entry's own format, so the ordinary loader reads them: a diffusers
  ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) for a KL
  autoencoder, one ``<name>.safetensors`` (``encoder.*`` / ``decoder.*``) for a TAESD-family one;
- ``tuned_vae.json``: the base entry, the state-dict hash the loaded model must have (``weights``, the
  same ``sha256:`` id featurize, training and releases record), the base weights it started from, the
  tuning mode, steps, losses (and which LPIPS weights were used, or ``lpips: off``);
- ``reconstruction_report.json``: PSNR / SSIM on held-out tiles before and after tuning;
- ``SHA256SUMS``: every other file's sha256. A file changed after export (or a missing one) is refused.

Use it like any autoencoder: ``vae.name: <base entry>`` + ``vae.weights: <folder>`` in featurize; the
manifest then records the tuned weights' hash, and training, sampling and releases refuse another VAE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cytosyn.fileio import sha256_file

DESCRIPTOR = "tuned_vae.json"
REPORT = "reconstruction_report.json"
SUMS = "SHA256SUMS"
FORMAT = "cytosyn-tuned-vae/1"


class TunedVAEError(RuntimeError):
    """A tuned-VAE folder that is incomplete, altered, or for another autoencoder."""


def is_tuned_folder(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / DESCRIPTOR).is_file()


def write_sums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / SUMS).write_text("\n".join(lines) + "\n")


def verify_tuned_folder(folder: str | Path, base: str | None = None) -> dict[str, Any]:
    """Check every file against ``SHA256SUMS`` and (if given) that the folder tunes registry entry ``base``;
    return the descriptor. Raises :class:`TunedVAEError` naming what is wrong."""
    folder = Path(folder)
    sums = folder / SUMS
    if not sums.is_file():
        raise TunedVAEError(f"tuned VAE {folder}: {SUMS} is missing (re-export the VAE)")
    listed: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            listed[name.strip()] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != SUMS}
    problems = [f"{n} missing" for n in sorted(set(listed) - present)]
    problems += [f"{n} not listed" for n in sorted(present - set(listed))]
    problems += [
        f"{n} changed" for n in sorted(set(listed) & present) if sha256_file(folder / n) != listed[n]
    ]
    if problems:
        raise TunedVAEError(
            f"tuned VAE {folder} does not match its {SUMS}: {', '.join(problems)}. "
            f"Use the folder exactly as `cytosyn tune-vae` exported it."
        )
    desc = json.loads((folder / DESCRIPTOR).read_text())
    if desc.get("format") != FORMAT:
        raise TunedVAEError(f"tuned VAE {folder}: unknown format {desc.get('format')!r} (expected {FORMAT})")
    if base is not None and desc.get("base") != base:
        raise TunedVAEError(
            f"tuned VAE {folder} tunes the {desc.get('base')!r} autoencoder, not {base!r}: "
            f"load it with vae.name: {desc.get('base')}"
        )
    return desc


def export_tuned_vae(
    vae: Any, folder: str | Path, descriptor: dict[str, Any], report: dict[str, Any]
) -> dict[str, Any]:
    """Write ``vae`` (a :class:`cytosyn.models.vae.LatentVAE` whose module holds the tuned weights) as a
    tuned-VAE folder; returns the descriptor written (with its ``weights`` hash). Written under a
    temporary name and renamed, so a crash leaves no half-written folder under ``folder``."""
    import shutil

    from safetensors.torch import save_file

    from cytosyn.models.encoders import sha256_state_dict

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".incomplete")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    spec = vae.spec
    if spec.kind == "taesd":
        state = {k: v.detach().float().contiguous().cpu() for k, v in vae.model.state_dict().items()}
        save_file(state, str(tmp / f"{spec.name}.safetensors"))
    else:
        vae.vae.save_pretrained(str(tmp), safe_serialization=True)
        state = vae.vae.state_dict()
    desc = {
        "format": FORMAT,
        "base": spec.name,
        "kind": spec.kind,
        "latent_channels": spec.latent_channels,
        "downsample": spec.downsample,
        "weights": f"sha256:{sha256_state_dict(state)}",
    } | descriptor
    (tmp / DESCRIPTOR).write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")
    (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_sums(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return desc
