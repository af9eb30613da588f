"""One typed configuration system for every verb.

Every verb's configuration is a pydantic model that refuses unknown keys. It is loaded from a YAML file,
then patched with dotted overrides (``grid.mpp=0.25``), and validated as a whole before any work starts:
an unknown key or a wrong type is a :class:`ConfigError` naming the dotted key. The fully resolved config
is written next to the outputs, and its hash identifies the settings that produced them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cytosyn.fileio import atomic_write_text

M = TypeVar("M", bound=BaseModel)
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value (so ``1`` is an int, ``[1,2]`` a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {err}") from err
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "2e-4" (no dot) as a string; every user means a number
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each dotted override applied (creating sections as needed)."""
    tree = json.loads(json.dumps(tree))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def _format_validation_error(err: ValidationError, schema_name: str) -> str:
    lines = [f"invalid {schema_name} configuration:"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = item.get("input")
            shown = repr(got) if not isinstance(got, dict) else "{...}"
            lines.append(f"  {key}: {item['msg']} (got {shown[:80]})")
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def build_config(schema: type[M], data: dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> M:
    """Validate plain data (plus overrides) against ``schema``; errors name every bad key."""
    tree = apply_overrides(data or {}, overrides)
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, schema.__name__)) from None


def load_config(schema: type[M], path: str | Path | None = None, overrides: Sequence[str] = ()) -> M:
    """Load ``path`` (optional), apply dotted ``overrides`` and validate the whole against ``schema``."""
    data = load_yaml(path) if path is not None else {}
    return build_config(schema, data, overrides)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every dotted key whose value differs between two config trees."""
    fa, fb = flatten(a), flatten(b)
    return [
        f"{k}: {fa.get(k)!r} → {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)
    ]


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain JSON-compatible data (paths become strings)."""
    return cfg.model_dump(mode="json")


def config_hash(cfg: BaseModel | dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a config (or section): equal settings give equal hashes."""
    data = config_to_dict(cfg) if isinstance(cfg, BaseModel) else cfg
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_resolved_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (atomically), so a run can be repeated from it."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write_text(Path(path), text)


def guard_output_settings(folder: Path, path: Path, settings: dict[str, Any], digest: str, what: str) -> None:
    """Record ``settings`` (and their hash) in the file ``path`` on first use of the output ``folder``;
    later, refuse other settings.

    A resumable verb calls this before writing into an output folder, so outputs made with different
    settings never mix: the error names the differing keys (``what``: "samples", "scores", ...)."""
    path = Path(path)
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("hash") != digest:
            diffs = config_differences(old.get("settings", {}), settings)
            raise ConfigError(
                f"output {folder} holds {what} made with other settings "
                f"({'; '.join(diffs) or 'model or data changed'}); use another output folder or delete it"
            )
        return
    atomic_write_text(path, json.dumps({"hash": digest, "settings": settings}, indent=1) + "\n")


def parse_part(text: str) -> tuple[int, int]:
    """``"i/N"`` → (i, N) with 0 ≤ i < N: this process's share of the work (``--part``, SLURM arrays)."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ValueError(f"part must look like i/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"part {text!r}: need 0 ≤ i < N")
    return i, n
