"""The tab's CLIP figures for a patch on the loaded model: the core's ``score_with_clip``, drawing with the loaded
model (A1111's or Forge's).

The patched draws run with the patch attached as forward hooks (as the preview does), so the loaded weights never
change. The CLIP model is a full one (both towers) from a folder the user typed in.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ...errors import AblationError
from ...evaluation.clip import Sampling, clip_prompt_sets, estimate_cost, load_clip, score_with_clip
from ...evaluation.clip.model import HOW_TO_GET
from ...evaluation.clip.report import describe_cost
from ...methods.ablation.adapters import AdapterSet
from ...methods.progress import Canceller, cancel_checks
from ...models.sampling import sample_latents
from ...patches.patch import META, AblationPatch
from .flows import A1111Host, _latent_size

NOT_SET = "Type the folder of a full CLIP model to measure with; " + HOW_TO_GET.replace(
    "and pass --clip PATH", "and type its path")


def measure_with_clip(host: A1111Host, patch: AblationPatch, clip_path: str, per_set: int, seed: int, steps: int,
                      image_size: int, guidance: float = 6.0) -> str:
    """The figures as ``eval --clip`` prints them (the cost first); raises AblationError with what to do."""
    if not clip_path.strip():
        raise AblationError(NOT_SET)
    targets, anchors = patch.listed("targets"), patch.listed("anchors")
    if not targets or not anchors:
        raise AblationError("this patch names no target and anchor to measure")
    kind = patch.metadata.get(META + "kind", "object")
    kind = kind if kind in ("object", "style", "memorization") else "object"
    view = host.view()
    scorer = load_clip(clip_path.strip(), view.device, torch.float32)
    latent_size = _latent_size(image_size, view) or view.default_latent_size
    sampling = Sampling(max(int(steps), 1), guidance, 4, latent_size)
    sets, twins, source = clip_prompt_sets(targets[0], anchors[0], kind, per_set, seed)
    adapters = AdapterSet.of_patch(view, patch)
    canceller = Canceller(host.cancelled)

    def draw(prompts: list[str], noise_seed: int, patched: bool) -> Tensor:
        with torch.no_grad(), cancel_checks(view.cancel_check_modules(), canceller):
            with adapters.attached() if patched else contextlib.nullcontext(), view.uncached_text():
                latents = sample_latents(view, prompts, torch.arange(len(prompts)), sampling.steps,
                                         sampling.guidance, sampling.batch_size, noise_seed, latent_size)
            canceller.check()
            return view.decode(latents).cpu()

    with view.prepared():  # the checkpoint's own weights (no LoRA of the last generation), Forge's too
        evaluation = score_with_clip(draw, scorer, sets, twins, seed)
    evaluation.neighbours_from, evaluation.cost = source, estimate_cost(view, sets, sampling)
    return describe_cost(evaluation.cost, sampling) + "\n" + evaluation.table()
