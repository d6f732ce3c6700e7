"""The Ablation Report node's CLIP figures: the core's ``score_with_clip``, drawing with ComfyUI's MODEL, CLIP and VAE.

The patched draws run on clones carrying the patch as ComfyUI weight patches (as the report's grid does), never on
the loaded weights. The CLIP model is a full one (both towers) from a folder the user set: ComfyUI's ``clip_vision``
files hold an image tower only, and the figures compare images with text.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...evaluation.clip import Sampling, clip_prompt_sets, estimate_cost, load_clip, score_with_clip
from ...evaluation.clip.model import HOW_TO_GET
from ...evaluation.clip.report import describe_cost
from ...methods.progress import Canceller, Progress, cancel_checks
from ...methods.run_plan import DECODE_COST, unet_pass
from ...models.sampling import sample_latents
from ...patches.patch import META
from .flows import PatchStack, apply_patches, render_report, stack_entries
from .flux_view import comfy_view
from .progress import NodeProgress
from .view import cancel_requested, compute_modules, ensure_loaded

NOT_SET = ("CLIP figures (clip_accuracy, clip_score, neighbour KID): set clip_model to a full CLIP model folder; "
           + HOW_TO_GET.replace("and pass --clip PATH", "and give its path"))


CLIP_PHASE = "CLIP figures"


def ablation_report(model, clip, vae, value, strength: float, prompts: list[str], seed: int, steps: int,
                    guidance: float, samples: int, image_size: int, clip_model: str, per_set: int, neighbours: str,
                    node_id: str | None = None) -> tuple[Tensor, str]:
    """The Ablation Report node's work under one bar: the before/after grid, then (with a CLIP folder) the figures,
    both planned before the first image is drawn."""
    progress = NodeProgress(node_id)
    units = clip_figures_units(model, clip, value, clip_model, per_set, neighbours, seed, steps, guidance,
                               image_size)
    image = render_report(model, clip, vae, value, strength, prompts, seed, steps, guidance, samples, image_size,
                          progress=progress, then=((CLIP_PHASE, units),) if units else ())
    figures = clip_figures(model, clip, vae, value, strength, clip_model, per_set, neighbours, seed, steps, guidance,
                           image_size, progress)
    progress.finish()
    return image, figures


def _prompt_sets(value, per_set: int, neighbours: str, seed: int):
    patch = stack_entries(value)[0][0] if isinstance(value, PatchStack) else value
    target, anchor = patch.listed("targets")[0], patch.listed("anchors")[0]
    kind = patch.metadata.get(META + "kind", "object")
    kind = kind if kind in ("object", "style", "memorization") else "object"
    listed = [line.strip() for line in neighbours.splitlines() if line.strip()]
    return clip_prompt_sets(target, anchor, kind, per_set, seed, listed or None)


def clip_figures_units(model, clip, value, clip_model: str, per_set: int, neighbours: str, seed: int, steps: int,
                       guidance: float, image_size: int) -> float:
    """The figures' cost in 512 px UNet passes (images drawn and decoded), 0 without a CLIP folder."""
    if not clip_model.strip():
        return 0.0
    sampling = _sampling(steps, guidance, image_size)
    cost = _cost(model, clip, _prompt_sets(value, per_set, neighbours, seed)[0], sampling)
    return (cost["unet_evaluations"] + cost["vae_decodes"] * DECODE_COST) * unet_pass(sampling.latent_size)


def _sampling(steps: int, guidance: float, image_size: int) -> Sampling:
    return Sampling(steps, guidance, 4, max(image_size // 8, 1))


def _cost(model, clip, sets, sampling: Sampling) -> dict[str, int]:
    return estimate_cost(comfy_view(model, clip, latent_size=sampling.latent_size), sets, sampling)


def clip_figures(model, clip, vae, value, strength: float, clip_model: str, per_set: int, neighbours: str,
                 seed: int, steps: int, guidance: float, image_size: int, progress: NodeProgress | None = None) -> str:
    """The figures as the table ``eval --clip`` prints (with the cost first), or how to get them when no CLIP model
    is set. ``progress``: the node's bar, with the ``CLIP_PHASE`` planned."""
    if not clip_model.strip():
        return NOT_SET
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    scorer = load_clip(clip_model.strip(), device, torch.float16 if device.type == "cuda" else torch.float32)
    sets, twins, source = _prompt_sets(value, per_set, neighbours, seed)
    sampling = _sampling(steps, guidance, image_size)
    latent_size = sampling.latent_size
    cost = _cost(model, clip, sets, sampling)
    images_total, drawn = cost["images"], [0]
    patched = apply_patches(model, clip, stack_entries(value, strength))

    def draw(prompts: list[str], noise_seed: int, after: bool) -> Tensor:
        patcher, text = patched if after else (model, clip)
        with torch.inference_mode(False), torch.no_grad():
            ensure_loaded(patcher)
            view = comfy_view(patcher, text, latent_size=latent_size)
            vae_modules = compute_modules(getattr(vae, "first_stage_model", None))
            with cancel_checks(view.cancel_check_modules() + vae_modules, Canceller(cancel_requested)):
                latents = sample_latents(view, prompts, torch.arange(len(prompts)), steps, guidance,
                                         sampling.batch_size, noise_seed, latent_size,
                                         on_progress=lambda done, total: report(drawn[0] + done))
                images = view.decode_with(vae, latents).cpu()
        drawn[0] += len(prompts)
        report(drawn[0])
        return images

    def report(done: float) -> None:
        cancel_requested()
        if progress is not None:
            progress(Progress(CLIP_PHASE, min(int(done), images_total), images_total))

    evaluation = score_with_clip(draw, scorer, sets, twins, seed)
    evaluation.neighbours_from = source
    evaluation.cost = cost
    return describe_cost(evaluation.cost, sampling) + "\n" + evaluation.table()
