"""The embedded toy world: a tiny SD-architecture text-to-image model, its data and its concept classifier.

Ablation quality cannot be judged on random weights and no real SD weights can be downloaded here, so the package
ships a model that has learnt a few dozen concepts (objects, instances, artist styles) and a classifier that tells
them apart. Imports are lazy so that ``python -m ablation_core.toy concepts`` stays instant.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_toy_model": "model", "sample_images": "model", "encode_prompts": "model", "toy_world_info": "model",
    "WEIGHTS_DIR": "model", "load_toy_classifier": "classifier", "classify": "classifier",
    "recognise_prompts": "classifier", "concept_shown": "classifier", "Prediction": "classifier",
    "CONCEPTS": "concepts", "CONCEPTS_BY_NAME": "concepts", "SUGGESTED_PAIRS": "concepts", "axis_of": "concepts",
    "ToyLabel": "data", "caption": "data", "make_batch": "data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
