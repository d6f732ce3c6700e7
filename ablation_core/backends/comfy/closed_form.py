"""Closed-form erasure and fusion in ComfyUI: no training and no UNet pass at all.

The solve needs only the text encoder (to embed the prompts) and the K/V weights as they were loaded, so nothing is
moved to the GPU for it; the result is applied to a clone of the MODEL as ComfyUI weight patches, as every other
patch is. Encoding the prompts is nearly the whole cost, so they move ComfyUI's bar every few prompts (the node's
one plan: prompts, then the solve or, fusing, each layer's), and Cancel is checked inside the text encoder.
"""

from __future__ import annotations

import json

import torch

from ...methods.closed_form.embeddings import CHUNK
from ...methods.closed_form.fusion import fuse_patches, fusion_prompts
from ...methods.closed_form.settings import ClosedFormConfig, resolve_closed_form
from ...methods.progress import Canceller, cancel_checks
from ...methods.robust.rounds import robust_erase_closed_form
from ...methods.run_plan import FUSE_COST, plan_closed_form, prompt_cost
from ...patches.patch import META, AblationPatch
from .flows import PatchStack, apply_patches, on_original_weights
from .flux_view import comfy_view
from .progress import NodeProgress
from .view import cancel_requested, compute_modules


def erase_concepts(model, clip, config: ClosedFormConfig, node_id: str | None = None,
                   base_patch: AblationPatch | PatchStack | None = None) -> tuple[object, object, AblationPatch, str]:
    """(patched MODEL clone, CLIP, patch, a one-line summary of the solve).

    As ``flows.ablate_concept``: on a MODEL that carries our patches (or with ``base_patch``) the solve starts from
    the original weights plus those patches, and the patch holds every change with the original fingerprint."""
    progress = NodeProgress(node_id)  # ComfyUI's bar for the whole node, from its first second
    model, clip, base, prefix = on_original_weights(model, clip, base_patch)
    with torch.inference_mode(False), torch.no_grad():
        view = comfy_view(model, clip, original_weights=True)
        layers = sum(len(layers) for layers in view.closed_form_layers().values())
        plan_closed_form(progress, resolve_closed_form(config, view.family.name), layers, view.default_latent_size,
                         family=view.family.name)
        with cancel_checks(_text_modules(clip), Canceller(cancel_requested)):
            result = robust_erase_closed_form(view, config, on_progress=progress, should_cancel=cancel_requested,
                                              base_patch=base)
    model_out, clip_out = apply_patches(model, clip, [(result.patch, 1.0)])
    stats = result.stats
    summary = prefix + (f"erased {len(result.config.targets)} concept(s) in {result.seconds:.2f}s "
                        f"({result.config.mode}): targets moved {stats['target_moved_fraction']:.0%} onto their "
                        f"anchors, preserved outputs changed {stats['preserved_relative_change']:.1%}")
    progress.finish(summary)
    return model_out, clip_out, result.patch, summary


def fuse(model, clip, patches: list[AblationPatch], weights: list[float],
         node_id: str | None = None) -> AblationPatch:
    """MACE-style fusion of several patches on this base model (see ``methods.closed_form.fusion``)."""
    progress = NodeProgress(node_id)  # ComfyUI's bar for the whole node, from its first second
    with torch.inference_mode(False), torch.no_grad():
        view = comfy_view(model, clip, original_weights=True)
        pairs, preserved = fusion_prompts(view, patches)
        progress.plan("prompts", encoded_prompts(pairs, preserved) * prompt_cost(view.family.name))
        progress.plan("fuse", sum(len(layers) for layers in view.closed_form_layers().values()) * FUSE_COST)
        with cancel_checks(_text_modules(clip), Canceller(cancel_requested)):
            fused = fuse_patches(view, patches, weights, on_progress=progress, should_cancel=cancel_requested)
    progress.finish(describe_merge(fused, len(patches)))
    return fused


def encoded_prompts(pairs: list[tuple[list[str], list[str]]], preserved: list[str]) -> int:
    """About how many prompts a fusion encodes: each pair's two, each preserved one, one probe a chunk."""
    chunks = sum(-(-len(targets) // CHUNK) for targets, _ in pairs) + -(-len(preserved) // CHUNK)
    return sum(2 * len(targets) for targets, _ in pairs) + len(preserved) + chunks


def describe_merge(patch: AblationPatch, count: int) -> str:
    """One line for Merge Ablation Patches: what was merged and how."""
    targets = list(dict.fromkeys(patch.listed("targets")))
    concepts = f"; {len(targets)} target(s): {', '.join(targets[:6])}{' ...' if len(targets) > 6 else ''}" \
        if targets else ""
    if patch.metadata.get(META + "method") == "merge-fusion":
        try:
            info = json.loads(patch.metadata.get(META + "fusion", "{}"))
        except ValueError:
            info = {}
        return (f"fused {count} patches: {info.get('fused_layers', '?')} cross-attention K/V layer(s) solved "
                f"jointly, {info.get('summed_layers', '?')} other layer(s) summed{concepts}")
    return f"weighted sum of {count} patches: {len(patch.deltas)} layer(s){concepts}"


def _text_modules(clip) -> list:
    return compute_modules(getattr(clip, "cond_stage_model", None))
