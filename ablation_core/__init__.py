"""Concept Ablation: remove a concept from a Stable Diffusion model and keep the change as a small patch.

The public API, for scripts, the nodes and the CLI alike::

    from ablation_core import load_model, make_config, ablate, load_patch, apply_patch

    view = load_model("sd15.safetensors", device="cuda")        # or a diffusers folder, or "toy"
    result = ablate(view, make_config("Grumpy Cat", "cat"))     # settings left open suit the model
    result.patch.compressed().save("grumpy.safetensors")
    with apply_patch(view, load_patch("grumpy.safetensors")):   # weights restored exactly on exit
        ...

The package is laid out as the data flows: ``models`` (loading, families, keys, the ``ModelView``) ->
``methods`` (prompts, the trained ablation) -> ``patches`` (the file format, apply, merge, import) ->
``evaluation`` (metrics, the toy world's evaluation, benchmarks); ``backends`` adapt a program's model objects
(diffusers, ComfyUI), ``toy`` is the embedded toy world and ``cli`` the command line. Names are imported lazily, so
``import ablation_core`` is cheap and pulls in diffusers only when ``load_model`` is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # models
    "load_model": "backends.loading",
    "ModelView": "models.view",
    "Conditioning": "models.view",
    "GROUPS": "models.layers",
    "GROUP_HELP": "models.layers",
    # methods
    "ablate": "methods.ablation.loop",
    "AblationResult": "methods.ablation.loop",
    "AblationConfig": "methods.ablation.settings",
    "make_config": "methods.ablation.settings",
    "resolve_config": "methods.ablation.settings",
    "PRESET_NAMES": "methods.ablation.settings",
    "PRESET_HELP": "methods.ablation.settings",
    "KINDS": "methods.prompts",
    "Progress": "methods.progress",
    # patches
    "AblationPatch": "patches.patch",
    "LayerDelta": "patches.patch",
    "describe_patch": "patches.patch",
    "load_patch": "patches.storage",
    "save_patch": "patches.storage",
    "apply_patch": "patches.apply",
    "check_fingerprint": "patches.apply",
    "merge_weighted": "patches.merge",
    # evaluation
    "evaluate_toy": "evaluation.toy_eval",
    "prediction_gaps": "evaluation.model_metrics",
    # errors
    "AblationError": "errors",
    "AblationCancelled": "errors",
    "OutOfMemoryError": "errors",
    "PatchError": "errors",
    "PatchMismatchError": "errors",
    "PromptError": "errors",
    "TrainingDivergedError": "errors",
    "UnsupportedModelError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for editors and type checkers; at run time the names above load on first use
    from .backends.loading import load_model
    from .errors import (
        AblationCancelled,
        AblationError,
        OutOfMemoryError,
        PatchError,
        PatchMismatchError,
        PromptError,
        TrainingDivergedError,
        UnsupportedModelError,
    )
    from .evaluation.model_metrics import prediction_gaps
    from .evaluation.toy_eval import evaluate_toy
    from .methods.ablation.loop import AblationResult, ablate
    from .methods.ablation.settings import PRESET_HELP, PRESET_NAMES, AblationConfig, make_config, resolve_config
    from .methods.progress import Progress
    from .methods.prompts import KINDS
    from .models.layers import GROUP_HELP, GROUPS
    from .models.view import Conditioning, ModelView
    from .patches.apply import apply_patch, check_fingerprint
    from .patches.merge import merge_weighted
    from .patches.patch import AblationPatch, LayerDelta, describe_patch
    from .patches.storage import load_patch, save_patch
