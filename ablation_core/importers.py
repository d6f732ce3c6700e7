"""Patches from other tools' outputs: the official concept-ablation ``delta.bin`` and any fine-tuned checkpoint.

``delta.bin`` (from the reference diffusers ``train.py``) holds the *fine-tuned weights* of the trained layers, not
their change; the patch is their difference from the base model. It is a torch pickle, read with
``weights_only=True`` so it cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .backends.base import ModelView
from .errors import PatchError
from .layers import kohya_key
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
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad or unsafe pickles
        raise PatchError(f"{path.name} could not be read as a concept-ablation delta.bin ({err}); only tensors "
                         "are accepted from pickles") from err
    if isinstance(payload, dict) and "unet" in payload and isinstance(payload["unet"], dict):
        payload = payload["unet"]
    elif isinstance(payload, dict) and "state_dict" in payload:
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
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
