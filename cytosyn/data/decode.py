"""Turning a raw sample's members into arrays, and batches of them into tensors."""

from __future__ import annotations

import ast
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cytosyn.data.tario import Failure, RawSample

MISSING_IMAGE = "missing_image"
MISSING_JSON = "missing_json"
MISSING_MEMBER = "missing_member"
BAD_IMAGE = "bad_image"
BAD_JSON = "bad_json"
BAD_MEMBER = "bad_member"
SHAPE_MISMATCH = "shape_mismatch"


@dataclass(frozen=True)
class DecodeSpec:
    image_member: str  # "jpg", "png" or "webp" (the extension in the shard)
    image: bool  # decode the image
    json: bool  # parse the json
    arrays: tuple[str, ...]  # .npy members to decode, e.g. ("h0-mini.npy", "vae.npy")
    label: bool = False  # the JSON's "label" → batch["label"] (strings) and batch["label_id"]
    label_vocab: tuple[str, ...] = ()  # label_id = index in this tuple (-1: no label or not in it)

    @property
    def read_members(self) -> set[str]:
        out = set(self.arrays)
        if self.image:
            out.add(self.image_member)
        if self.json or self.label:
            out.add("json")
        return out


def decode_image(blob: bytes) -> np.ndarray:
    """PIL decode to an H×W×3 uint8 array."""
    with Image.open(io.BytesIO(blob)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def decode_image_planes(blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL decode to the R, G and B planes (H×W uint8 each): split by PIL, which is cheaper than
    transposing an H×W×3 array; :func:`collate` writes them straight into the B×3×H×W batch."""
    with Image.open(io.BytesIO(blob)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        r, g, b = (np.asarray(band) for band in im.split())
        return r, g, b


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def load_npy(blob: bytes) -> np.ndarray:
    """``np.load`` for ``.npy`` bytes, without pickles, with parsed headers cached.

    ``np.load`` parses every header with ``ast.literal_eval`` (~40 µs); features of a split all share
    one header, so this costs a dict lookup and ``np.frombuffer`` (a read-only view of ``blob``).
    """
    if blob[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy file")
    major = blob[6]
    if major == 1:
        start = 10
        length = int.from_bytes(blob[8:10], "little")
    elif major in (2, 3):
        start = 12
        length = int.from_bytes(blob[8:12], "little")
    else:
        raise ValueError(f".npy format version {major} is not supported")
    header = blob[start : start + length]
    spec = _npy_headers.get(header)
    if spec is None:
        meta = ast.literal_eval(header.decode("latin1" if major < 3 else "utf-8"))
        if not isinstance(meta, dict) or set(meta) != {"descr", "fortran_order", "shape"}:
            raise ValueError(f"bad .npy header {header[:80]!r}")
        dtype = np.lib.format.descr_to_dtype(meta["descr"])
        if dtype.hasobject:
            raise ValueError(".npy with Python objects refused")
        shape = tuple(int(n) for n in meta["shape"])
        spec = (dtype, shape, bool(meta["fortran_order"]))
        if len(_npy_headers) < 256:
            _npy_headers[header] = spec
    dtype, shape, fortran = spec
    count = math.prod(shape)
    offset = start + length
    if len(blob) - offset != count * dtype.itemsize:
        raise ValueError(f".npy holds {len(blob) - offset} data bytes, header says {count * dtype.itemsize}")
    arr = np.frombuffer(blob, dtype=dtype, count=count, offset=offset)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def decode_sample(raw: RawSample, spec: DecodeSpec) -> dict[str, Any] | Failure:
    """Decode one sample; a missing or undecodable member gives a :class:`Failure` (never raises)."""
    present = raw.present
    if spec.image_member not in present:
        return Failure(MISSING_IMAGE, raw.shard, raw.key)
    if "json" not in present:
        return Failure(MISSING_JSON, raw.shard, raw.key)
    out: dict[str, Any] = {"__key__": raw.key}
    for name in spec.arrays:
        if name not in present:
            return Failure(MISSING_MEMBER, raw.shard, raw.key, name)
    if spec.json or spec.label:
        try:
            meta = json.loads(raw.data["json"])
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as err:
            return Failure(BAD_JSON, raw.shard, raw.key, str(err)[:200])
        if spec.json:
            out["json"] = meta
        if spec.label:
            out["label"] = meta.get("label")
    for name in spec.arrays:
        try:
            arr = load_npy(raw.data[name])
        except Exception as err:  # garbage raises many kinds of errors
            return Failure(BAD_MEMBER, raw.shard, raw.key, f"{name}: {err}"[:200])
        out[name] = arr
    if spec.image:
        try:
            out["image"] = decode_image_planes(raw.data[spec.image_member])
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            return Failure(BAD_IMAGE, raw.shard, raw.key, str(err)[:200])
    return out


def shape_signature(sample: dict[str, Any], spec: DecodeSpec) -> tuple:
    sig = [(n, sample[n].shape, sample[n].dtype.str) for n in spec.arrays]
    if spec.image:
        sig.append(("image", sample["image"][0].shape, "u1"))
    return tuple(sig)


def array_key(member: str) -> str:
    """Batch key of a ``.npy`` member: ``"h0-mini.npy"`` → ``"h0-mini"``."""
    return member[: -len(".npy")] if member.endswith(".npy") else member


Allocator = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]


def private_alloc(_key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def collate(
    samples: list[dict[str, Any]], spec: DecodeSpec, image_format: str, alloc: Allocator = private_alloc
) -> dict[str, Any]:
    """Stack decoded samples (all with the same shapes) into a batch of tensors from ``alloc``."""
    batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples]}
    if spec.json:
        batch["json"] = [s["json"] for s in samples]
    if spec.label:
        index = {name: i for i, name in enumerate(spec.label_vocab)}
        batch["label"] = [s["label"] for s in samples]
        batch["label_id"] = torch.tensor([index.get(s["label"], -1) for s in samples], dtype=torch.long)
    n = len(samples)
    for name in spec.arrays:
        first = samples[0][name]
        out = alloc(name, (n, *first.shape), torch.from_numpy(np.empty(0, first.dtype)).dtype)
        np.stack([s[name] for s in samples], out=out.numpy())
        batch[array_key(name)] = out
    if spec.image:
        shape = (n, 3, *samples[0]["image"][0].shape)  # B×3×H×W
        planes = (
            alloc("image", shape, torch.uint8)
            if image_format == "uint8"
            else torch.empty(shape, dtype=torch.uint8)
        )
        dest = planes.numpy()
        for i, s in enumerate(samples):
            for c in range(3):
                dest[i, c] = s["image"][c]
        if image_format == "float":
            out = alloc("image", shape, torch.float32)
            torch.div(planes, 127.5, out=out).sub_(1.0)
        else:
            out = planes
        batch["image"] = out
    return batch
