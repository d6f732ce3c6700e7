"""Closed-form erasure and fusion in ComfyUI: seconds, no training, and no UNet pass at all.

The solve needs only the text encoder (to embed the prompts) and the K/V weights as they were loaded, so nothing is
moved to the GPU for it; the result is applied to a clone of the MODEL as ComfyUI weight patches, as every other
patch is.
"""

from __future__ import annotations

import torch

from ...methods.closed_form.fusion import fuse_patches
from ...methods.closed_form.settings import ClosedFormConfig
from ...methods.closed_form.solve import erase_closed_form
from ...patches.patch import AblationPatch
from .flows import apply_patches
from .view import ComfyModelView, cancel_requested


def erase_concepts(model, clip, config: ClosedFormConfig) -> tuple[object, object, AblationPatch, str]:
    """(patched MODEL clone, CLIP, patch, a one-line summary of the solve)."""
    with torch.inference_mode(False), torch.no_grad():
        view = ComfyModelView(model, clip, original_weights=True)
        result = erase_closed_form(view, config, should_cancel=cancel_requested)
    model_out, clip_out = apply_patches(model, clip, [(result.patch, 1.0)])
    stats = result.stats
    summary = (f"erased {len(result.config.targets)} concept(s) in {result.seconds:.2f}s ({result.config.mode}): "
               f"targets moved {stats['target_moved_fraction']:.0%} onto their anchors, preserved outputs changed "
               f"{stats['preserved_relative_change']:.1%}")
    return model_out, clip_out, result.patch, summary


def fuse(model, clip, patches: list[AblationPatch], weights: list[float]) -> AblationPatch:
    """MACE-style fusion of several patches on this base model (see ``methods.closed_form.fusion``)."""
    with torch.inference_mode(False), torch.no_grad():
        view = ComfyModelView(model, clip, original_weights=True)
        return fuse_patches(view, patches, weights, should_cancel=cancel_requested)
