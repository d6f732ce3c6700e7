"""Patch files: loading that turns every kind of damage into one clear ``PatchError`` (saving: ``AblationPatch.save``).

A patch file comes from strangers on the internet, so loading trusts nothing: the header length is checked against
the file before safetensors reads it, every tensor's name, dtype, shape and values are checked, and LoRA pairs must
fit together. What passes here can be applied to a model without surprises; what does not is refused with a
message that says what is wrong with the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from torch import Tensor

from ..errors import PatchError
from .patch import AblationPatch, LayerDelta

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PARTS = ("diff", "lora_up.weight", "lora_down.weight", "alpha")


def save_patch(patch: AblationPatch, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write atomically: the file appears complete or not at all (the same as ``patch.save``)."""
    return patch.save(path, dtype)


def load_patch(path: str | Path) -> AblationPatch:
    """Read a patch (or any LoRA/diff file in kohya layout) with clear errors for corrupt or foreign files."""
    path = Path(path)
    if not path.exists():
        raise PatchError(f"patch file {path} does not exist")
    if path.is_dir():
        raise PatchError(f"{path} is a folder; give the patch's .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise PatchError(f"{path.name}: patches are .safetensors files; for an official concept-ablation delta.bin "
                         "use `python -m ablation_core convert --delta-bin FILE --model BASE --out PATCH`")
    _check_header_length(path)
    metadata, tensors = _read(path)
    deltas: dict[str, LayerDelta] = {}
    for name, tensor in tensors.items():
        key, _, part = name.partition(".")
        if not key or part not in PARTS:
            raise PatchError(f"{path.name}: unsupported tensor '{name}' (this tool reads <layer>.diff and LoRA "
                             "<layer>.lora_up.weight / .lora_down.weight / .alpha)")
        _check_values(path, name, tensor)
        delta = deltas.setdefault(key, LayerDelta())
        if part == "diff":
            delta.diff = tensor
        elif part == "lora_up.weight":
            delta.up = tensor
        elif part == "lora_down.weight":
            delta.down = tensor
        else:
            if tensor.numel() != 1:
                raise PatchError(f"{path.name}: '{name}' should be a single number but has shape "
                                 f"{tuple(tensor.shape)}; the file is damaged")
            delta.alpha = float(tensor.reshape(()).item())
    if not deltas:
        raise PatchError(f"{path.name} holds no tensors")
    for key, delta in deltas.items():
        _check_layer(path, key, delta)
    return AblationPatch(deltas, metadata)


def _check_header_length(path: Path) -> None:
    """The first 8 bytes give the header's length; check it fits the file before anything allocates it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise PatchError(f"{path.name} cannot be read: {err.strerror or err}") from err
    if len(head) < 8:
        raise PatchError(f"{path.name} is {size} bytes long, too short to be a .safetensors file (truncated?)")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES or length > size - 8:
        raise PatchError(f"{path.name} is not a readable .safetensors file: its header claims {length:,} bytes but "
                         f"the file has {size:,} (truncated or corrupt)")


def _read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # the file is untrusted: any failure to parse it means it is damaged
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise PatchError(f"{path.name} is not a readable .safetensors file (corrupt or truncated?): {reason}") from err
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise PatchError(f"{path.name}: the metadata is not text; the file is damaged")
    return metadata, tensors


def _check_values(path: Path, name: str, tensor: Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise PatchError(f"{path.name}: tensor '{name}' has dtype {str(tensor.dtype).replace('torch.', '')}; patch "
                         "tensors are floating point (float16, bfloat16 or float32)")
    if tensor.numel() == 0:
        raise PatchError(f"{path.name}: tensor '{name}' is empty; the file is damaged")
    if not torch.isfinite(tensor).all():
        raise PatchError(f"{path.name}: tensor '{name}' contains NaN or Inf; the file is damaged")


def _check_layer(path: Path, key: str, delta: LayerDelta) -> None:
    """A full diff is a 2-D (linear, embedding) or 4-D (conv) weight; a LoRA pair has matching ranks."""
    where = f"{path.name}: layer '{key}'"
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
