"""Closed-form erasure and fusion in ComfyUI: no training and no UNet pass at all.

The solve needs only the text encoder (to embed the prompts) and the K/V weights as they were loaded, so nothing is
moved to the GPU for it; the result is applied to a clone of the MODEL as ComfyUI weight patches, as every other
patch is. Encoding the prompts is the whole cost (seconds on a GPU, a minute or more for long lists on a CPU), so it
drives ComfyUI's progress bar and the node's status line, and Cancel is checked inside the text encoder.
"""

from __future__ import annotations

import json
import time

import torch

from ...methods.closed_form.fusion import fuse_patches
from ...methods.closed_form.settings import ClosedFormConfig
from ...methods.progress import Canceller, Progress, cancel_checks
from ...methods.robust.rounds import robust_erase_closed_form
from ...patches.patch import META, AblationPatch
from .flows import NodeProgress, PatchStack, apply_patches, on_original_weights
from .flux_view import comfy_view
from .view import cancel_requested, compute_modules


class SolveProgress:
    """ComfyUI's progress bar over the prompts being encoded, and the same steps (with an ETA) as websocket events
    for the web extension's status line; ``finish`` sends the summary."""

    def __init__(self, node_id: str | None):
        import comfy.utils

        self.node_id, self.bar = node_id, comfy.utils.ProgressBar(1)
        self.run: tuple[str, int, float, int] | None = None  # phase, total, when and at which step it was first seen
        self.last_step = 0

    def __call__(self, progress: Progress) -> None:
        now = time.perf_counter()
        if self.run is None or self.run[:2] != (progress.phase, progress.total) or progress.step <= self.last_step:
            self.run = (progress.phase, progress.total, now, progress.step)  # a new phase, or the next patch's prompts
        self.last_step = progress.step
        _, _, started, first = self.run
        eta = None
        if progress.step > first and now > started:
            eta = (now - started) / (progress.step - first) * (progress.total - progress.step)
        if progress.phase == "prompts":
            self.bar.update_absolute(progress.step, progress.total)
        NodeProgress._send({"node": self.node_id, "phase": progress.phase, "step": progress.step,
                            "total": progress.total, "loss": None, "eta": eta})

    def finish(self, summary: str) -> None:
        NodeProgress._send({"node": self.node_id, "phase": "done", "cached": False, "losses": [], "summary": summary})


def erase_concepts(model, clip, config: ClosedFormConfig, node_id: str | None = None,
                   base_patch: AblationPatch | PatchStack | None = None) -> tuple[object, object, AblationPatch, str]:
    """(patched MODEL clone, CLIP, patch, a one-line summary of the solve).

    As ``flows.ablate_concept``: on a MODEL that carries our patches (or with ``base_patch``) the solve starts from
    the original weights plus those patches, and the patch holds every change with the original fingerprint."""
    progress = SolveProgress(node_id)
    model, clip, base, prefix = on_original_weights(model, clip, base_patch)
    with torch.inference_mode(False), torch.no_grad():
        view = comfy_view(model, clip, original_weights=True)
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
    progress = SolveProgress(node_id)
    with torch.inference_mode(False), torch.no_grad():
        view = comfy_view(model, clip, original_weights=True)
        with cancel_checks(_text_modules(clip), Canceller(cancel_requested)):
            fused = fuse_patches(view, patches, weights, on_progress=progress, should_cancel=cancel_requested)
    progress.finish(describe_merge(fused, len(patches)))
    return fused


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
