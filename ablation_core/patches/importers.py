"""Patches from other tools' outputs: the official concept-ablation ``delta.bin`` and any fine-tuned checkpoint.

``delta.bin`` (from the reference diffusers ``train.py``) holds the *fine-tuned weights* of the trained layers, not
their change; the patch is their difference from the base model. It is a torch pickle, read with
``weights_only=True`` so it cannot run code.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..errors import PatchError
from ..models.layers import kohya_key
from ..models.view import ModelView
from .patch import META, AblationPatch


def _patch_key(name: str, layers: dict) -> str | None:
    """A weight name in diffusers or LDM layout (``...attn2.to_k.weight``) -> its patch key, if the model has it."""
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    for prefix in ("model.diffusion_model.", "diffusion_model.", "unet.", ""):
        if module.startswith(prefix):
            key = kohya_key("lora_unet_", module[len(prefix):])
            if key in layers:
                return key
    return None


def read_delta_bin(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a concept-ablation ``delta.bin``. Read with ``weights_only=True``: a pickle that would run code
    (or build any object but tensors and containers) is refused before anything in it runs."""
    path = Path(path)
    if not path.is_file():
        raise PatchError(f"{path} does not exist or is not a file; give the delta.bin that the official "
                         "concept-ablation train.py wrote")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # a torch zip archive, or a raw pickle
        raise PatchError(f"{path.name} is not a PyTorch file; give the delta.bin that the official concept-ablation "
                         "train.py wrote")
    try:
        with warnings.catch_warnings():  # torch's own advice ("file an issue", "weights_only=False") is not for users
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PatchError(f"{path.name} was refused: it holds objects other than tensors (a pickle that could run "
                         "code is never loaded). Only tensor-only delta.bin files are accepted") from err
    except Exception as err:  # not a torch file at all: text, truncated zip, another format
        raise PatchError(f"{path.name} is not a PyTorch delta.bin (unreadable as a tensor file: "
                         f"{type(err).__name__}); give the delta.bin that concept-ablation's train.py wrote") from err
    if isinstance(payload, dict) and "unet" in payload and isinstance(payload["unet"], dict):
        payload = payload["unet"]
    elif isinstance(payload, dict) and "state_dict" in payload:
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, Tensor) for v in payload.values()):
        raise PatchError(f"{path.name} does not hold a dictionary of tensors in the concept-ablation layout")
    return payload


def patch_from_finetuned(view: ModelView, finetuned: dict[str, Tensor], source: str) -> AblationPatch:
    """The difference between fine-tuned weights and the model's own, for every weight the model recognises."""
    layers = view.all_layers()
    deltas, originals, unknown = {}, {}, []
    for name, weight in finetuned.items():
        key = _patch_key(name, layers)
        if key is None:
            unknown.append(name)
            continue
        original = layers[key].weight.detach().float().cpu()
        if original.shape != weight.shape:
            raise PatchError(f"'{name}' has shape {tuple(weight.shape)} but this model's weight is "
                             f"{tuple(original.shape)}: the file was trained on another base model")
        canonical = layers[key].key
        deltas[canonical] = weight.float() - original
        originals[canonical] = layers[key].weight
    if not deltas:
        raise PatchError(f"no weight in {source} matches this {view.family.title} model (e.g. {unknown[:2]})")
    metadata = {META + "method": "imported", META + "source": source, META + "base_family": view.family.name,
                "ss_network_module": "networks.lora"}
    return AblationPatch.from_deltas(deltas, metadata, original_weights=originals)
