"""Patch files: loading that turns every kind of damage into one clear ``PatchError`` (saving: ``AblationPatch.save``).

A patch file comes from strangers on the internet, so loading trusts nothing. The header is read and checked here
before safetensors sees the file (its length against the file, its JSON, every tensor's dtype, shape and place in
the data), so each kind of damage gets a sentence of its own rather than a parser's message; then every tensor's
name and values are checked, and LoRA pairs must fit together. What passes can be applied to a model without
surprises; what does not is refused with a message that says what is wrong with the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

from ..errors import PatchError, quoted
from .patch import AblationPatch, LayerDelta

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # safetensors' names, bytes per element
ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}
PARTS = ("diff", "lora_up.weight", "lora_down.weight", "alpha")


def save_patch(patch: AblationPatch, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write atomically: the file appears complete or not at all (the same as ``patch.save``)."""
    return patch.save(path, dtype)


def load_patch(path: str | Path) -> AblationPatch:
    """Read a patch (or any LoRA/diff file in kohya layout) with clear errors for corrupt or foreign files."""
    path = Path(path)
    if not os.path.exists(path):  # False for a name too long, where Path.exists() raises
        raise PatchError(f"patch file {path} does not exist")
    if path.is_dir():
        raise PatchError(f"{path} is a folder; give the patch's .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise PatchError(f"{path.name}: patches are .safetensors files; for an official concept-ablation delta.bin "
                         "use `python -m ablation_core convert --delta-bin FILE --model BASE --out PATCH`")
    metadata, names = _read_header(path)
    deltas: dict[str, LayerDelta] = {}
    for name, tensor in _read_tensors(path, names).items():
        key, _, part = name.partition(".")
        if not key or part not in PARTS:
            raise PatchError(f"{path.name}: unsupported tensor {quoted(name)} (this tool reads <layer>.diff and LoRA "
                             "<layer>.lora_up.weight / .lora_down.weight / .alpha)")
        if not torch.isfinite(tensor).all():
            raise PatchError(f"{path.name}: tensor {quoted(name)} contains NaN or Inf; the file is damaged")
        delta = deltas.setdefault(key, LayerDelta())
        if part == "diff":
            delta.diff = tensor
        elif part == "lora_up.weight":
            delta.up = tensor
        elif part == "lora_down.weight":
            delta.down = tensor
        else:
            if tensor.numel() != 1:
                raise PatchError(f"{path.name}: {quoted(name)} should be a single number but has shape "
                                 f"{tuple(tensor.shape)}; the file is damaged")
            delta.alpha = float(tensor.reshape(()).item())
    if not deltas:
        raise PatchError(f"{path.name} holds no tensors")
    for key, delta in deltas.items():
        _check_layer(path, key, delta)
    return AblationPatch(deltas, metadata)


class _DuplicateName(ValueError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """JSON objects whose names repeat are refused: which of the two would count is up to the reader."""
    found: dict[str, object] = {}
    for name, value in pairs:
        if name in found:
            raise _DuplicateName(name)
        found[name] = value
    return found


def _read_header(path: Path) -> tuple[dict[str, str], list[str]]:
    """Check the header as safetensors does, each kind of damage with its own message; returns the metadata and the
    tensor names. The 8-byte length is checked against the file before anything of that length is read."""
    name, size = path.name, path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PatchError(f"{name} is {size} bytes long, too short to be a .safetensors file (truncated?)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise PatchError(f"{name} is not a readable .safetensors file: its header claims {length:,} bytes but "
                                 f"the file has {size:,} (truncated or corrupt)")
            raw = f.read(length)
    except OSError as err:
        raise PatchError(f"{name} cannot be read: {err.strerror or 'input/output error'}") from err
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as err:
        raise PatchError(f"{name}: the header is not UTF-8 text; the file is damaged") from err
    except _DuplicateName as err:
        raise PatchError(f"{name}: the header names {quoted(err.name)} twice; the file is damaged") from err
    except (ValueError, RecursionError) as err:  # RecursionError: JSON nested thousands deep
        raise PatchError(f"{name}: the header is not valid JSON; the file is damaged or truncated") from err
    if not isinstance(header, dict):
        raise PatchError(f"{name}: the header is not a JSON object; the file is damaged or not a .safetensors file")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PatchError(f"{name}: the metadata is not text; the file is damaged")
    data_size = size - 8 - length
    spans = sorted(_data_span(path, tensor, entry, data_size) + (tensor,) for tensor, entry in header.items())
    position = 0
    for begin, end, tensor in spans:  # the tensors' data must tile the rest of the file, as safetensors requires
        if begin != position:
            raise PatchError(f"{name}: the data of tensor {quoted(tensor)} overlaps another tensor's or leaves a gap; "
                             "the file is damaged")
        position = end
    if position != data_size:
        raise PatchError(f"{name} has {data_size - position:,} bytes after its last tensor; the file is damaged")
    return metadata, list(header)


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _data_span(path: Path, tensor: str, entry: object, data_size: int) -> tuple[int, int]:
    """Where one tensor's data lies, after checking its header entry: a float dtype, a shape and offsets that agree."""
    where = f"{path.name}: tensor {quoted(tensor)}"
    if not isinstance(entry, dict) or not ENTRY_FIELDS <= entry.keys():
        raise PatchError(f"{where} has a malformed header entry; the file is damaged")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise PatchError(f"{where} has dtype {quoted(str(dtype))}; patch tensors are floating point (F16, BF16, F32 "
                         "or F64)")
    if not _int_list(shape) or any(d < 0 for d in shape):
        raise PatchError(f"{where} has an invalid shape in the header; the file is damaged")
    if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise PatchError(f"{where} has invalid data offsets in the header; the file is damaged")
    if offsets[1] > data_size:
        raise PatchError(f"{where} reaches past the end of the file; the file is truncated or damaged")
    numel = math.prod(shape)
    if numel == 0:
        raise PatchError(f"{where} is empty; the file is damaged")
    if offsets[1] - offsets[0] != numel * FLOAT_DTYPES[dtype]:
        values = f"{numel:,} values" if numel < 2**63 else "an impossible number of values"
        raise PatchError(f"{where}: its header gives {offsets[1] - offsets[0]:,} bytes of data to a {dtype} tensor of "
                         f"{values}; the file is damaged")
    return offsets[0], offsets[1]


def _read_tensors(path: Path, names: list[str]) -> dict[str, Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
    except Exception as err:  # the header passed the checks above, so the file changed or the disk failed
        log.debug("safetensors could not read %s: %s", path, err)
        raise PatchError(f"{path.name} could not be read as a .safetensors file; it is damaged or changed while "
                         "being read") from err


def _check_layer(path: Path, key: str, delta: LayerDelta) -> None:
    """A full diff is a 2-D (linear, embedding) or 4-D (conv) weight; a LoRA pair has matching ranks."""
    where = f"{path.name}: layer {quoted(key)}"
    if delta.diff is not None:
        if delta.up is not None or delta.down is not None:
            raise PatchError(f"{where} has both a diff and a LoRA pair; the file is damaged")
        if delta.diff.ndim not in (2, 4):
            raise PatchError(f"{where} has a diff of shape {tuple(delta.diff.shape)}; weights are 2-D or 4-D")
        return
    if delta.up is None or delta.down is None:
        raise PatchError(f"{where} has only half of its LoRA pair; the file is incomplete")
    up, down = delta.up, delta.down
    if up.ndim not in (2, 4) or down.ndim not in (2, 4):
        raise PatchError(f"{where}: LoRA up {tuple(up.shape)} and down {tuple(down.shape)} must be 2-D or 4-D")
    if up.shape[1] != down.shape[0] or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise PatchError(f"{where}: LoRA up {tuple(up.shape)} and down {tuple(down.shape)} do not fit together "
                         "(their ranks differ); the file is damaged")
