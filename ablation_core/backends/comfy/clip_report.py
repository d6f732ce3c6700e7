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
from ...methods.progress import Canceller, cancel_checks
from ...models.sampling import sample_latents
from ...patches.patch import META
from .flows import PatchStack, apply_patches, stack_entries
from .flux_view import comfy_view
from .view import cancel_requested, compute_modules, ensure_loaded

NOT_SET = ("CLIP figures (clip_accuracy, clip_score, neighbour KID): set clip_model to a full CLIP model folder; "
           + HOW_TO_GET.replace("and pass --clip PATH", "and give its path"))


def clip_figures(model, clip, vae, value, strength: float, clip_model: str, per_set: int, neighbours: str,
                 seed: int, steps: int, guidance: float, image_size: int) -> str:
    """The figures as the table ``eval --clip`` prints (with the cost first), or how to get them when no CLIP model
    is set."""
    if not clip_model.strip():
        return NOT_SET
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    scorer = load_clip(clip_model.strip(), device, torch.float16 if device.type == "cuda" else torch.float32)
    patch = stack_entries(value)[0][0] if isinstance(value, PatchStack) else value
    target, anchor = patch.listed("targets")[0], patch.listed("anchors")[0]
    kind = patch.metadata.get(META + "kind", "object")
    kind = kind if kind in ("object", "style", "memorization") else "object"
    listed = [line.strip() for line in neighbours.splitlines() if line.strip()]
    sets, twins, source = clip_prompt_sets(target, anchor, kind, per_set, seed, listed or None)
    latent_size = max(image_size // 8, 1)
    patched = apply_patches(model, clip, stack_entries(value, strength))
    sampling = Sampling(steps, guidance, 4, latent_size)

    def draw(prompts: list[str], noise_seed: int, after: bool) -> Tensor:
        patcher, text = patched if after else (model, clip)
        with torch.inference_mode(False), torch.no_grad():
            ensure_loaded(patcher)
            view = comfy_view(patcher, text, latent_size=latent_size)
            vae_modules = compute_modules(getattr(vae, "first_stage_model", None))
            with cancel_checks(view.cancel_check_modules() + vae_modules, Canceller(cancel_requested)):
                latents = sample_latents(view, prompts, torch.arange(len(prompts)), steps, guidance,
                                         sampling.batch_size, noise_seed, latent_size,
                                         on_progress=lambda done, total: cancel_requested())
                return view.decode_with(vae, latents).cpu()

    evaluation = score_with_clip(draw, scorer, sets, twins, seed)
    evaluation.neighbours_from = source
    evaluation.cost = estimate_cost(comfy_view(model, clip, latent_size=latent_size), sets, sampling)
    return describe_cost(evaluation.cost, sampling) + "\n" + evaluation.table()
