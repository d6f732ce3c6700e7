"""What the nodes call: ablate in ComfyUI, apply/stack patches as ComfyUI weight patches, save, render reports.

Progress goes to one ComfyUI bar per node over the node's whole plan and, as websocket events, to the web
extension's loss chart and status line (``progress``); Cancel is ComfyUI's own
interrupt, checked between steps and inside the forward of the UNet, the text encoder (and the VAE for reports), so
it stops a CPU run within about a second wherever it is.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...errors import AblationError
from ...evaluation.images import grid, save_image, to_pil
from ...methods.ablation.settings import MEMORY_OPTIONS, AblationConfig, resolve_for_view
from ...methods.progress import Canceller, Progress, cancel_checks
from ...methods.robust.rounds import robust_ablate
from ...methods.run_plan import (
    DECODE_COST,
    SVD_UNIT_WORK,
    plan_compress,
    plan_trained,
    plan_write,
    prompt_cost,
    unet_pass,
)
from ...models.sampling import sample_latents, unguided
from ...models.view import Conditioning
from ...patches.apply import check_fingerprint, resolve
from ...patches.cache import PatchCache, cache_key
from ...patches.merge import merge_weighted
from ...patches.patch import META, AblationPatch
from . import chain
from .flux_view import comfy_view, is_comfy_flux
from .progress import PROGRESS_EVENT, NodeProgress  # noqa: F401  (PROGRESS_EVENT: the package's name for it)
from .view import cancel_requested, compute_modules, ensure_loaded, make_trainable

log = logging.getLogger(__name__)


# Flows the nodes call ----------------------------------------------------------------------------------------

@dataclass
class PatchStack:
    """Patches kept separate, each with its strength (what Stack Ablation Patches outputs)."""

    entries: list[tuple[AblationPatch, float]] = field(default_factory=list)


def stack_entries(value: AblationPatch | PatchStack | None, strength: float = 1.0) -> list[tuple[AblationPatch, float]]:
    if value is None:
        return []
    if isinstance(value, PatchStack):
        return [(patch, s * strength) for patch, s in value.entries]
    return [(value, strength)]


def as_single_patch(value: AblationPatch | PatchStack) -> AblationPatch:
    """One patch: a stack becomes the weighted sum of its entries."""
    if isinstance(value, AblationPatch):
        return value
    entries = stack_entries(value)
    if len(entries) == 1 and entries[0][1] == 1.0:
        return entries[0][0]
    return merge_weighted([p for p, _ in entries], [s for _, s in entries])


def ablate_concept(model, clip, config: AblationConfig, node_id: str | None = None,
                   cache_dir: str | Path | None = None,
                   base_patch: AblationPatch | PatchStack | None = None) -> tuple[object, object, AblationPatch, str]:
    """Train in ComfyUI and return (patched MODEL clone, CLIP (a patched clone for the embedding group), patch,
    a one-line summary for the node: how much of the target the held-out check found erased, or a warning).

    When the MODEL already carries our patches (``chain``), or ``base_patch`` is given, the run trains on the
    original weights with those patches as its base: the patch holds every change, with the original fingerprint."""
    progress = NodeProgress(node_id)  # ComfyUI's bar for the whole node, from its first second
    model, clip, base, prefix = on_original_weights(model, clip, base_patch)
    with torch.inference_mode(False), torch.enable_grad():
        trainer = model.clone()
        make_trainable(trainer)
        view = comfy_view(trainer, clip, latent_size=config.latent_size)
        config = resolve_for_view(config, view)
        cache = PatchCache(cache_dir) if cache_dir else None
        settings = {k: v for k, v in config.describe().items() if k not in MEMORY_OPTIONS}  # same patch either way
        settings.update({"base_patch": chain.digest(base)} if base is not None else {})
        key = cache_key(view, str(config.group), settings) if cache else None
        patch = cache.get(key) if cache else None
        if patch is None:
            plan_trained(progress, config, config.latent_size or view.default_latent_size, view.family.name)
            if cache:
                plan_write(progress, 4 * sum(layer.weight.numel() for layer in view.layers(config.group)) / 2**20)
            started = time.perf_counter()
            result = robust_ablate(view, config, on_progress=progress, should_cancel=cancel_requested,
                                   base_patch=base)
            patch = result.patch
            log.info("concept ablation finished in %.1fs", time.perf_counter() - started)
            if cache:
                progress(Progress("write", 0, 1))
                cache.put(key, patch)
                progress(Progress("write", 1, 1))
            summary = prefix + summarize(patch, cached=False)
            losses, cached = result.losses, False
        else:
            log.info("concept ablation: reusing the cached patch for these settings (%s)", key)
            summary = prefix + summarize(patch, cached=True)
            losses, cached = stored_loss_curve(patch), True
    model_out, clip_out = apply_patches(model, clip, [(patch, 1.0)])
    progress.finish(summary, losses, cached)
    return model_out, clip_out, patch, summary


def on_original_weights(model, clip, base_patch: AblationPatch | PatchStack | None):
    """(MODEL and CLIP without our earlier patches, those patches as one base patch or None, the summary prefix)."""
    entries = chain.carried(model, clip)
    base = chain.base_patch(entries, stack_entries(base_patch))
    if entries:
        log.info("the MODEL carries %d earlier ablation patch(es) (%s): building on the original weights with them "
                 "as the base patch", len(entries), ", ".join(base.listed("targets")))
        model, clip = chain.without(model, clip, entries)
    return model, clip, base, chain.describe(entries, base)


def stored_loss_curve(patch: AblationPatch) -> list[float]:
    """The loss curve saved in the patch (first and last loss for patches from before it was saved)."""
    try:
        curve = json.loads(patch.metadata.get(META + "loss_curve", "null"))
        if isinstance(curve, list) and all(isinstance(v, (int, float)) for v in curve):
            return [float(v) for v in curve]
        metrics = json.loads(patch.metadata.get(META + "metrics", "{}"))
        return [float(metrics[k]) for k in ("loss_first", "loss_last") if k in metrics]
    except (ValueError, TypeError):
        return []


def summarize(patch: AblationPatch, cached: bool) -> str:
    """"erased 97% ..." from the held-out check in the metadata, or the warning when the run barely changed anything."""
    from ...methods.ablation.check import STILL_TARGET, WEAK_EFFECT, check_summary

    prefix = "reused cached result; " if cached else ""
    try:
        check = json.loads(patch.metadata.get(META + "check", "null"))
        erased = float(check["erased_fraction"])
    except (ValueError, TypeError, KeyError):
        return prefix + "done"
    if erased < WEAK_EFFECT:
        return (prefix + f"WARNING: the run barely changed the model (target moved {max(erased, 0):.0%} toward the "
                "anchor on held-out prompts): try more steps, the paper preset, or check the target's spelling")
    if float(check.get("images_still_target", 0.0)) > STILL_TARGET:
        return (prefix + f"WARNING: the target is not erased everywhere ({check_summary(check)} on held-out "
                "prompts): try more steps, the paper preset, or check the target's spelling")
    return prefix + f"{check_summary(check)} on {check.get('held_out_prompts', '?')} held-out prompts"


def apply_patches(model, clip, entries: list[tuple[AblationPatch, float]]) -> tuple[object, object]:
    """Clones of MODEL and CLIP with the patches added as ComfyUI weight patches (``(delta,)`` = "diff"); the MODEL
    records them (``chain``), after the ones it already carried, so a later erasure can build on them."""
    view = comfy_view(model, clip, original_weights=True)
    outputs = {"model": model.clone(), "clip": clip}
    carried = chain.carried(model, clip)
    for patch, strength in entries:
        resolved = resolve(patch, view)
        check_fingerprint(patch, view)
        by_owner: dict[str, dict[str, tuple[Tensor]]] = {"model": {}, "clip": {}}
        for key, (_, dense) in resolved.items():
            owner, state_key = view.state_key(key)
            by_owner[owner][state_key] = (dense,)
        if by_owner["clip"]:
            if clip is None:
                raise AblationError("this patch changes the text encoder: connect the CLIP too")
            if outputs["clip"] is clip:
                outputs["clip"] = clip.clone()
        for owner, patches in by_owner.items():
            if patches:
                outputs[owner].add_patches(patches, strength)
        added = tuple((owner, k, v[0]) for owner, patches in by_owner.items() for k, v in patches.items())
        carried.append(chain.CarriedPatch(patch, strength, added))
    chain.record(outputs["model"], carried)
    return outputs["model"], outputs["clip"]


def fingerprint_matches(model, clip, patch: AblationPatch) -> bool:
    return check_fingerprint(patch, comfy_view(model, clip, original_weights=True))


def render_report(model, clip, vae, value: AblationPatch | PatchStack, strength: float, prompts: list[str],
                  seed: int, steps: int, guidance: float, samples: int, image_size: int,
                  node_id: str | None = None, progress: NodeProgress | None = None,
                  then: tuple[tuple[str, float], ...] = ()) -> Tensor:
    """Before/after images for each prompt, sampled from the same noise; a grid as an IMAGE tensor [1, H, W, 3].
    With ``progress`` (the node's bar) the phases ``then`` (name, cost) are planned after the grid's and the bar is
    left for the caller to finish."""
    own_bar = progress is None
    progress = progress or NodeProgress(node_id)
    latent_size = max(image_size // 8, 1)
    prompt_index = torch.arange(len(prompts)).repeat_interleave(samples)
    draw = len(prompt_index) * max(steps, 1) * (1 if unguided(guidance) else 2) * unet_pass(latent_size)
    cost = prompt_cost("flux" if is_comfy_flux(model.model) else "sd1")  # T5-XXL costs about 9x CLIP-L
    for name in ("before", "after"):  # each: the prompts, then the images with their decoding
        progress.plan(f"{name} prompts", len(prompts) * cost)
        progress.plan(name, draw + len(prompt_index) * DECODE_COST * unet_pass(latent_size))
    for name, units in then:
        progress.plan(name, units)
    patched, patched_clip = apply_patches(model, clip, stack_entries(value, strength))
    images = {}
    with torch.inference_mode(False), torch.no_grad():
        for name, (patcher, text) in {"before": (model, clip), "after": (patched, patched_clip)}.items():
            ensure_loaded(patcher)
            view = comfy_view(patcher, text, latent_size=latent_size)
            vae_modules = compute_modules(getattr(vae, "first_stage_model", None))
            with cancel_checks(view.cancel_check_modules() + vae_modules, Canceller(cancel_requested)):
                cond = Conditioning.cat([view.encode([p]) for p in _reporting(prompts, progress, f"{name} prompts")])
                latents = sample_latents(view, prompts, prompt_index, steps, guidance, len(prompt_index), seed,
                                         latent_size, _sampler_steps(progress, name, steps), cond)
                images[name] = view.decode_with(vae, latents).cpu()
                progress(Progress(name, 1, 1))
    rows = []
    for p in range(len(prompts)):
        cells = slice(p * samples, (p + 1) * samples)
        rows.append([*images["before"][cells], *images["after"][cells]])
    columns = [f"before #{i + 1}" for i in range(samples)] + [f"after #{i + 1}" for i in range(samples)]
    picture = grid(rows, prompts, columns, cell=max(64, min(image_size, 256)))
    if own_bar:
        progress.finish()
    return torch.from_numpy(np.array(picture)).float().div(255).unsqueeze(0)


def _sampler_steps(progress: NodeProgress, phase: str, steps: int):
    """``sample_latents``' callback: a cancel check and a report per solver step (images done, in steps)."""
    def on_step(done: float, total: int) -> None:
        cancel_requested()
        progress(Progress(phase, int(round(done * steps)), total * steps + 1))  # the decoding is the last step

    return on_step


def _reporting(items: list, progress: NodeProgress, phase: str):
    """``items`` one by one, reporting (phase, done, total) before each and after the last."""
    for index, item in enumerate(items):
        progress(Progress(phase, index, len(items)))
        yield item
    progress(Progress(phase, len(items), len(items)))


def save_patch(value: AblationPatch | PatchStack, path: str | Path, energy: float | None,
               node_id: str | None = None) -> Path:
    """Save Ablation Patch: one patch (a stack summed), compressed to low rank when ``energy`` is given (an SVD per
    layer: seconds for an SD1 K/V patch on a CPU), then written; ComfyUI's bar follows both."""
    progress = NodeProgress(node_id)
    single = as_single_patch(value)
    work = single.svd_work()
    if energy is not None:
        plan_compress(progress, work / SVD_UNIT_WORK)
    plan_write(progress, 2 * single.numel() / 2**20)  # 16-bit numbers
    if energy is not None:
        progress(Progress("compress", 0, work))
        single = single.compressed(energy, on_layer=progress.step("compress"))
    progress(Progress("write", 0, 1))
    written = single.save(path)
    progress.finish(f"saved {written.name}")
    return written


def report_prompts(value: AblationPatch | PatchStack, extra: str) -> list[str]:
    """Target and anchor prompts from the patch metadata, then the user's surrounding prompts (one per line)."""
    prompts: list[str] = []
    for patch, _ in stack_entries(value):
        for name in ("targets", "anchors"):
            prompts += patch.listed(name)
    prompts += [line.strip() for line in extra.splitlines() if line.strip()]
    return list(dict.fromkeys(prompts)) or ["a photo"]


def describe_text(value: AblationPatch | PatchStack) -> str:
    """The metadata of a patch (or each patch of a stack) as readable lines."""
    blocks = []
    for patch, strength in stack_entries(value):
        lines = [f"strength {strength:g}, {len(patch.deltas)} layers, "
                 f"{'low rank ' + str(patch.max_rank) if patch.is_low_rank else 'full rank'}"]
        for key in sorted(patch.metadata):
            if patch.metadata[key] != "" and (key.startswith(META) or key in ("modelspec.title",
                                                                               "ss_base_model_version")):
                lines.append(f"{key.removeprefix(META)}: {patch.metadata[key]}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def save_preview(images: Tensor, path: str | Path) -> Path:
    """The first image of a ComfyUI IMAGE batch ([B, H, W, 3] in [0, 1]) as a PNG."""
    return save_image(to_pil(images[0].movedim(-1, 0)), path)
