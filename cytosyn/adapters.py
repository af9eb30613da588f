"""Adapters: what a few-shot fine-tune changed in a base model, stored, verified and applied on its own.

A fine-tune (``cytosyn finetune``, :mod:`cytosyn.training.finetune`) changes a base model in one of two ways:

- **LoRA** (default): low-rank adapters on the SiT's attention and MLP linears (``attn.qkv``, ``attn.proj``,
  ``mlp.fc1``, ``mlp.fc2`` by default), injected with peft (:func:`inject_lora`); the base weights stay
  frozen and bit for bit unchanged;
- **full**: every SiT weight is trained.

Either may add a **class-label embedding** (:class:`cytosyn.models.sit.LabelEmbedder`): one learned vector
per class, added to the adaLN conditioning, plus a null label for classifier-free guidance.

Label API (what generative scoring and sampling rely on): ``label_names`` is the sorted list of class
names the fine-tune saw; the label **index** of a name is its position in that list; the **null label** is
index ``len(label_names)``. :func:`label_indices` maps names (or indices) to indices and refuses a name
the adapter does not know.

Adapter folder (``adapter_release`` writes it; nothing is a pickle)::

    adapter.safetensors   only the changed tensors: ``lora.<module>.lora_A.weight`` / ``lora_B.weight``
                          (LoRA), ``label_embedder.table.weight`` (labels), ``model.<name>`` (full)
    adapter_config.json   kind, LoRA settings, label names, conditioning, the base model's weights sha256
                          (its content hash, the same for a checkpoint and its release), few-shot selection
    README.md             the adapter card
    SHA256SUMS            sha256 of the three files

Loading (:func:`apply_adapter`, or ``CytoSynPipeline.load_adapter``) verifies every hash, refuses a base
whose weights hash differs from the recorded one, injects the LoRA layers and loads the tensors.
:func:`merge_lora` folds the LoRA products into the base linears (``W + (α/r)·B·A``) and removes the
adapter layers, giving a plain SiT (same samples up to float rounding).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from cytosyn.config import StrictModel
from cytosyn.fileio import atomic_write_bytes, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "cytosyn.adapter/1"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_README = "README.md"
SUMS_FILE = "SHA256SUMS"
ADAPTER_FILES = (ADAPTER_FILE, ADAPTER_CONFIG_FILE, ADAPTER_README)
ADAPTER_NAME = "default"  # peft's adapter name inside the model (one adapter at a time)

DEFAULT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


class AdapterError(ValueError):
    """An adapter that cannot be made, read or applied; the message says why."""


class LoraSettings(StrictModel):
    """LoRA on the SiT (peft ``LoraConfig``): rank, scaling ``alpha / rank``, dropout, target modules.

    ``target_modules`` are name suffixes matched on module boundaries (``"attn.qkv"`` matches
    ``blocks.3.attn.qkv``), as peft matches them; every SiT block has each of the defaults.
    """

    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)


# --------------------------------------------------------------------------------------------- LoRA
def _peft():
    """peft, imported after torchvision's guard (peft imports transformers, which imports torchvision)."""
    from cytosyn.compat import import_torchvision

    import_torchvision()
    import peft

    return peft


def _peft_config(settings: LoraSettings):
    LoraConfig = _peft().LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )


def inject_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap the target linears of ``model`` with peft LoRA layers (in place); returns the wrapped names.

    The LoRA ``B`` matrices start at zero (peft's default), so the model's output is unchanged until it is
    trained. Raises :class:`AdapterError` when no module matches ``target_modules``.
    """
    inject_adapter_in_model = _peft().inject_adapter_in_model
    names = [n for n, _ in model.named_modules()]
    wanted = [n for n in names if any(n == t or n.endswith("." + t) for t in settings.target_modules)]
    if not wanted:
        raise AdapterError(
            f"no module of the model matches target_modules {settings.target_modules} "
            f"(examples of names: {names[1:6]})"
        )
    inject_adapter_in_model(_peft_config(settings), model, adapter_name=ADAPTER_NAME)
    return wanted


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of every peft adapter layer in ``model``."""
    _peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA tensors of ``model`` (peft's keys, adapter name removed: ``blocks.0.attn.qkv.lora_A.weight``)."""
    get_peft_model_state_dict = _peft().get_peft_model_state_dict
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load LoRA tensors (keys as :func:`lora_state_dict` gives them) into an injected ``model``; every
    adapter tensor must be given and no other."""
    set_peft_model_state_dict = _peft().set_peft_model_state_dict
    expected = set(lora_state_dict(model))
    given = set(state)
    if expected != given:
        missing, extra = sorted(expected - given)[:4], sorted(given - expected)[:4]
        raise AdapterError(f"LoRA tensors do not fit the model (missing {missing}, unexpected {extra})")
    result = set_peft_model_state_dict(model, dict(state))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise AdapterError(f"peft did not load LoRA tensors: {unexpected[:4]}")


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA layer into its base linear and put the plain linear back; returns how many.

    Uses peft's own ``merge()`` (``W ← W + scaling·B·A``) on each layer, then replaces the wrapper with its
    base layer, so the model is a plain SiT again (its state dict has the base model's keys).
    """
    layers = lora_layers(model)
    for name, layer in layers.items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return len(layers)


def mark_trainable(model: nn.Module, method: Literal["lora", "full"]) -> list[str]:
    """Freeze what a fine-tune must not change; returns the names of the trainable parameters.

    ``lora``: only the LoRA matrices and the label embedder train; ``full``: every parameter but the fixed
    ``pos_embed`` buffer and the REPA projector (not used in fine-tuning).
    """
    trainable = []
    for name, p in model.named_parameters():
        if method == "lora":
            on = ".lora_" in name or name.startswith("label_embedder.")
        else:
            on = not name.startswith("projectors.")
        p.requires_grad_(on)
        if on:
            trainable.append(name)
    return trainable


# ----------------------------------------------------------------------------------------- labels
def label_indices(labels: Sequence[str | int], label_names: Sequence[str]) -> list[int]:
    """Class indices for ``labels`` (names, or indices already), in the adapter's order; unknown → error."""
    index = {name: i for i, name in enumerate(label_names)}
    out: list[int] = []
    for lab in labels:
        if isinstance(lab, (int,)) and not isinstance(lab, bool):
            if not 0 <= lab < len(label_names):
                raise AdapterError(f"label index {lab} is out of range [0, {len(label_names)})")
            out.append(int(lab))
        elif str(lab) in index:
            out.append(index[str(lab)])
        else:
            raise AdapterError(
                f"label {lab!r} is not one the adapter was trained on; it knows {list(label_names)}"
            )
    return out


# ---------------------------------------------------------------------------------- adapter state
def adapter_tensors(model: nn.Module, method: Literal["lora", "full"]) -> dict[str, Tensor]:
    """What an adapter release stores from a fine-tuned SiT: LoRA tensors (``lora.*``) and the label
    embedding (``label_embedder.*``), or every SiT tensor (``model.*``) for a full fine-tune."""
    out: dict[str, Tensor] = {}
    if method == "lora":
        out |= {f"lora.{k}": v for k, v in lora_state_dict(model).items()}
        label = getattr(model, "label_embedder", None)
        if label is not None:
            out |= {f"label_embedder.{k}": v.detach().cpu().clone() for k, v in label.state_dict().items()}
    else:
        out |= {
            f"model.{k}": v.detach().cpu().clone()
            for k, v in model.state_dict().items()
            if not k.startswith("projectors.")
        }
    return out


def apply_adapter_tensors(model: nn.Module, config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    """Apply an adapter (config + tensors) to a base SiT in place: label embedder, LoRA layers, weights."""
    labels = config.get("labels") or None
    if labels is not None:
        model.add_label_embedder(len(labels["names"]))
    kind = config.get("kind")
    if kind == "lora":
        inject_lora(model, LoraSettings.model_validate(config["lora"]))
        load_lora_state_dict(
            model, {k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")}
        )
        label_state = {
            k[len("label_embedder.") :]: v for k, v in tensors.items() if k.startswith("label_embedder.")
        }
        if labels is not None:
            model.label_embedder.load_state_dict(label_state, strict=True)
        elif label_state:
            raise AdapterError("the adapter holds a label embedding but its config lists no labels")
        other = [k for k in tensors if not k.startswith(("lora.", "label_embedder."))]
    elif kind == "full":
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise AdapterError(f"the full fine-tune's weights do not fit the base model: {err}") from None
        other = [k for k in tensors if not k.startswith("model.")]
    else:
        raise AdapterError(f"unknown adapter kind {kind!r} (expected 'lora' or 'full')")
    if other:
        raise AdapterError(f"unexpected tensors in the adapter: {other[:4]}")


# --------------------------------------------------------------------------------- adapter folders
def _card(config: Mapping[str, Any]) -> str:
    base = config.get("base") or {}
    labels = (config.get("labels") or {}).get("names")
    shots = config.get("few_shot") or {}
    lines = [
        "---",
        "library_name: cytosyn",
        "tags: [histopathology, H&E, latent-diffusion, adapter, few-shot]",
        "---",
        "",
        f"# {config.get('name', 'cytosyn adapter')}",
        "",
        f"A cytosyn **{config.get('kind')}** adapter for the base model `{base.get('name')}` (weights sha256 "
        f"`{base.get('weights_sha256')}`). It stores only what the fine-tune changed; load it on top of that "
        "exact base (any other base is refused):",
        "",
        "```python",
        "from cytosyn.pipeline import CytoSynPipeline",
        "",
        'pipe = CytoSynPipeline.from_pretrained("path/to/base/release")',
        'pipe.load_adapter("path/to/this/folder")',
    ]
    if labels:
        lines.append(f'tiles = pipe.generate(None, labels=["{labels[0]}"] * 8, seed=0)')
    lines += ["```", "", "## Fine-tune", ""]
    rows = [
        ("conditioning", config.get("conditioning")),
        ("kind", config.get("kind")),
        ("LoRA", json.dumps(config.get("lora")) if config.get("lora") else "—"),
        ("labels", ", ".join(f"{i}: {n}" for i, n in enumerate(labels or [])) or "—"),
        ("null label index", (config.get("labels") or {}).get("null_index", "—")),
        ("shots per class", shots.get("shots_per_class")),
        ("tiles used", shots.get("tiles")),
        ("steps", (config.get("training") or {}).get("steps")),
        ("weights", (config.get("training") or {}).get("weights")),
    ]
    lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    per_class = shots.get("per_class") or {}
    if per_class:
        lines += ["", "| class | available | used |", "|---|---|---|"]
        lines += [f"| {c} | {v.get('available')} | {v.get('used')} |" for c, v in per_class.items()]
    lines += [
        "",
        "## Intended use",
        "",
        "Research only: synthetic tiles for augmentation studies measured on real, patient-held-out test "
        "sets (`cytosyn eval` study `augment`). Not for diagnosis.",
        "",
    ]
    return "\n".join(lines)


def write_adapter_folder(folder: Path, config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Path:
    """Write an adapter folder (safetensors, config, card, then SHA256SUMS last)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"adapter config format must be {ADAPTER_FORMAT!r}")
    blob = save(
        {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}, metadata={"format": "pt"}
    )
    atomic_write_bytes(folder / ADAPTER_FILE, blob)
    atomic_write_text(folder / ADAPTER_CONFIG_FILE, json.dumps(config, indent=2, allow_nan=False) + "\n")
    atomic_write_text(folder / ADAPTER_README, _card(config))
    lines = [f"{sha256_file(folder / name)}  {name}" for name in sorted(ADAPTER_FILES)]
    atomic_write_text(folder / SUMS_FILE, "\n".join(lines) + "\n")
    return folder


def is_adapter_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG_FILE).is_file()


def read_adapter_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, tensors)`` of an adapter folder, after checking every file against ``SHA256SUMS``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    sums_path = folder / SUMS_FILE
    if not sums_path.is_file():
        raise AdapterError(f"{folder} has no {SUMS_FILE}: not a complete cytosyn adapter folder")
    sums: dict[str, str] = {}
    for line in sums_path.read_text().splitlines():
        match = re.fullmatch(r"([0-9a-f]{64}) [ *]([^/\\]+)", line.strip())
        if line.strip() and match is None:
            raise AdapterError(f"{sums_path}: malformed line {line!r}")
        if match:
            sums[match.group(2)] = match.group(1)
    for name in ADAPTER_FILES:
        if name not in sums:
            raise AdapterError(f"{sums_path} does not list {name}: incomplete adapter")
        if not (folder / name).is_file():
            raise AdapterError(f"adapter {folder} is missing {name}")
        if sha256_file(folder / name) != sums[name]:
            raise AdapterError(f"adapter {folder}: {name} does not match its sha256 (altered); refusing it")
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    if config.get("format") != ADAPTER_FORMAT:
        raise AdapterError(
            f"{folder}: format {config.get('format')!r}, this cytosyn reads {ADAPTER_FORMAT!r}"
        )
    return config, load_file(str(folder / ADAPTER_FILE))


def check_base(config: Mapping[str, Any], base_weights_sha256: str, where: str = "adapter") -> None:
    """Refuse to apply an adapter to any base but the one it was trained on (weights content hash)."""
    want = (config.get("base") or {}).get("weights_sha256")
    if not want:
        raise AdapterError(f"{where} records no base weights sha256; cannot check which model it belongs to")
    if want != base_weights_sha256:
        raise AdapterError(
            f"{where} was trained on base weights {want[:16]}…, but this model's weights are "
            f"{base_weights_sha256[:16]}… ({(config.get('base') or {}).get('name')} expected): refusing to "
            "apply it to another base"
        )


# ------------------------------------------------------------------------------ pipeline hooks
def load_adapter_into_pipeline(pipe: Any, folder: Path) -> dict[str, Any]:
    """``CytoSynPipeline.load_adapter``: verify, check the base, apply; returns the adapter's config."""
    if pipe.adapter is not None:
        raise AdapterError(f"an adapter is already loaded ({pipe.adapter.get('name')}); load the base again")
    config, tensors = read_adapter_folder(folder)
    check_base(config, pipe.weights_sha256, where=f"adapter {folder}")
    model = pipe.model
    apply_adapter_tensors(model, config, tensors)
    model.to(pipe.device).eval().requires_grad_(False)
    pipe.config["sit"] = model.cfg.model_dump(mode="json")
    pipe.adapter = {
        "name": config.get("name"),
        "source": str(folder),
        "kind": config.get("kind"),
        "labels": config.get("labels"),
        "conditioning": config.get("conditioning"),
        "sha256": sha256_file(Path(folder) / ADAPTER_FILE),
        "base_weights_sha256": config["base"]["weights_sha256"],
        "few_shot": config.get("few_shot"),
        "merged": False,
    }
    pipe._state_sha = None  # the weights now include the adapter
    log.info("adapter %s (%s) applied to %s", config.get("name"), config.get("kind"), pipe.name)
    return config


def merge_pipeline_adapter(pipe: Any) -> int:
    """``CytoSynPipeline.merge_adapter``: fold LoRA into the base linears (labels stay as they are)."""
    if pipe.adapter is None:
        raise AdapterError("no adapter is loaded")
    merged = merge_lora(pipe.model) if pipe.adapter.get("kind") == "lora" else 0
    pipe.adapter["merged"] = True
    if pipe.adapter.get("labels"):
        pipe.config["labels"] = pipe.adapter["labels"]  # a merged model saves as a labelled release
    pipe._state_sha = None
    return merged


__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_FILE",
    "ADAPTER_FORMAT",
    "DEFAULT_TARGETS",
    "AdapterError",
    "LoraSettings",
    "adapter_tensors",
    "apply_adapter_tensors",
    "check_base",
    "inject_lora",
    "is_adapter_folder",
    "label_indices",
    "load_adapter_into_pipeline",
    "load_lora_state_dict",
    "lora_layers",
    "lora_state_dict",
    "mark_trainable",
    "merge_lora",
    "merge_pipeline_adapter",
    "read_adapter_folder",
    "write_adapter_folder",
]
