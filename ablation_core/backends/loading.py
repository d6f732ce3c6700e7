"""``load_model``: any supported model from a name, a folder or a file, as a ``ModelView``.

The one entry point the CLI, the Python API and the harnesses load through: ``toy`` and ``toy-flux`` (the embedded
toy worlds), diffusers folders (SD's ``unet/`` or Flux's ``transformer/``) and single-file checkpoints (SD
checkpoints, Flux transformers). Each family's own loader does the work.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UnsupportedModelError
from ..models.view import ModelView

TOY_FLUX_MODEL = "toy-flux"
TOY_MODELS = ("toy", TOY_FLUX_MODEL)  # the embedded toy worlds, by the names --model takes


def is_flux(spec: str | Path) -> bool:
    """A diffusers folder with a ``transformer/``, or a safetensors file holding a Flux transformer."""
    from ..models.flux.files import is_flux_state

    path = Path(spec)
    if path.is_dir():
        return (path / "transformer").is_dir() and not (path / "unet").is_dir() and _transformer_class(path) in (
            None, "FluxTransformer2DModel")
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return is_flux_state(f.keys())
    except (SafetensorError, OSError, ValueError):
        return False  # the SD loader says what is wrong with the file


def _transformer_class(folder: Path) -> str | None:
    """The ``_class_name`` of a diffusers folder's ``transformer/config.json`` (None when it has none)."""
    try:
        return json.loads((folder / "transformer" / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def load_model(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               prediction_type: str | None = None, flux_text=None, fp8: bool = False) -> ModelView:
    """Load ``toy``, ``toy-flux``, a diffusers folder or a single-file ``.safetensors`` checkpoint. ``flux_text``
    (a ``FluxTextSources``) says where a Flux transformer file's text encoders are; ``fp8`` stores a Flux
    transformer's block weights in fp8 (``models.fp8``)."""
    if str(spec) == TOY_FLUX_MODEL:
        from .flux_loading import load_toy_flux_view

        return load_toy_flux_view(device, dtype, fp8)
    if str(spec) not in TOY_MODELS and is_flux(spec):
        from .flux_loading import load_flux_view

        return load_flux_view(spec, flux_text, device, dtype, fp8)
    if fp8:
        raise UnsupportedModelError("--fp8 stores a Flux transformer's weights in fp8; SD models train in their own "
                                    "dtype (--dtype bf16 or fp16 halves their memory)")
    from .diffusers import load_sd_model

    return load_sd_model(spec, device, dtype, prediction_type)
