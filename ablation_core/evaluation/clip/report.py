"""A CLIP evaluation of a patch on any model that can decode images: the paper's figures, before and after.

Every prompt set is sampled from the unpatched and the patched model with the same noise (one seed per set, as the
toy world's evaluation does), decoded, and read by CLIP; the neighbours are sampled a third time, unpatched, with
other noise, for KID's noise floor (what KID says when nothing changed but the seed). Only CLIP features are kept.
The figures are described in ``metrics``; the JSON has the toy report's shape (target, anchor, the headline figures,
then one entry per prompt set).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ...methods.progress import Progress, ProgressFn, no_progress
from ...methods.prompts import Kind
from ...models.sampling import sample_latents, unguided
from ...models.view import ModelView
from ...patches.apply import apply_patch
from ...patches.patch import AblationPatch
from ..toy_eval import EVAL_SEED_OFFSET, PromptSet
from . import metrics
from .model import ClipScorer
from .prompts import clip_prompt_sets

FLOOR_SEED_OFFSET = 1_000  # the noise floor's second draw of the neighbours: other seeds, same prompts


@dataclass(frozen=True)
class Sampling:
    steps: int = 25
    guidance: float = 6.0
    batch_size: int = 4
    latent_size: int | None = None


@dataclass
class ClipSetResult:
    name: str
    concept: str
    samples: int
    clip_score_before: float
    clip_score_after: float
    clip_score_before_spread: float
    clip_score_after_spread: float
    kid: float | None = None
    kid_spread: float | None = None
    kid_floor: float | None = None
    kid_floor_spread: float | None = None


@dataclass
class ClipEvaluation:
    target: str
    anchor: str
    clip: str
    neighbours_from: str
    sets: list[ClipSetResult]
    summary: dict[str, float] = field(default_factory=dict)
    cost: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict:
        """Plain JSON: a figure that cannot be computed (a spread of too few images) is null, never NaN."""
        return _no_nan({"target": self.target, "anchor": self.anchor, "clip": self.clip,
                        "neighbours_from": self.neighbours_from, **self.summary, "cost": self.cost,
                        "sets": [asdict(s) for s in self.sets]})

    def to_json(self) -> str:
        return json.dumps(self.as_json(), indent=2)

    def table(self) -> str:
        s = self.summary
        lines = [f"CLIP evaluation of '{self.target}' -> '{self.anchor}' with {self.clip} (same noise before and "
                 "after; +- is the spread)", "",
                 "clip_accuracy: target images CLIP calls the target rather than the anchor",
                 f"  before {_pct(s['clip_accuracy_before'], s['clip_accuracy_before_spread'])}"
                 f"   after {_pct(s['clip_accuracy_after'], s['clip_accuracy_after_spread'])}"
                 f"   ({self.sets[0].samples} images)", "",
                 "clip_score: 100 x cosine(image, its prompt)",
                 f"  {'prompt set':<32}{'before':>18}{'after':>18}{'samples':>9}"]
        for r in self.sets:
            lines.append(f"  {r.name[:31]:<32}{_num(r.clip_score_before, r.clip_score_before_spread, 2):>18}"
                         f"{_num(r.clip_score_after, r.clip_score_after_spread, 2):>18}{r.samples:>9}")
        if "neighbour_kid" in s:
            lines += ["", f"neighbour_kid: KID in CLIP image features, before vs after (floor: before vs before, other "
                          f"noise); neighbours: {self.neighbours_from}",
                      f"  {'prompt set':<32}{'kid':>22}{'floor':>22}",
                      f"  {'all neighbours':<32}{_num(s['neighbour_kid'], s['neighbour_kid_spread'], 5):>22}"
                      f"{_num(s['neighbour_kid_floor'], s['neighbour_kid_floor_spread'], 5):>22}"]
            for r in self.sets:
                if r.kid is not None:
                    lines.append(f"  {r.name[:31]:<32}{_num(r.kid, r.kid_spread, 5):>22}"
                                 f"{_num(r.kid_floor, r.kid_floor_spread, 5):>22}")
        return "\n".join(lines)


def _no_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _pct(value: float, spread: float) -> str:
    return f"{value:.1%} +- {spread:.1%}"


def _num(value: float | None, spread: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f} +- {spread:.{digits}f}" if spread is not None and not math.isnan(spread) \
        else f"{value:.{digits}f}"


def estimate_cost(view: ModelView, sets: list[PromptSet], sampling: Sampling) -> dict[str, int]:
    """What the evaluation will cost: images drawn, UNet evaluations (one per latent per solver step, two with
    classifier-free guidance), VAE decodes, CLIP image and text passes."""
    neighbours = sum(len(s.prompts) for s in sets if s.name.startswith("surrounding"))
    own = sum(len(s.prompts) for s in sets) - neighbours
    images = 2 * own + 3 * neighbours
    rows = 1 if (view.guidance_input or unguided(sampling.guidance)) else 2
    texts = len({p for s in sets for p in s.prompts})
    return {"images": images, "unet_evaluations": images * sampling.steps * rows, "vae_decodes": images,
            "clip_image_passes": images, "clip_text_passes": texts}


def describe_cost(cost: dict[str, int], sampling: Sampling) -> str:
    guided = cost["unet_evaluations"] == 2 * cost["images"] * sampling.steps
    return (f"cost: {cost['images']:,} images x {sampling.steps} solver steps"
            f"{' x 2 (guidance)' if guided else ''} = {cost['unet_evaluations']:,} UNet "
            f"evaluations, {cost['vae_decodes']:,} VAE decodes, {cost['clip_image_passes']:,} CLIP image passes and "
            f"{cost['clip_text_passes']:,} CLIP text passes")


DrawFn = Callable[[list[str], int, bool], Tensor]
"""``draw(prompts, noise_seed, patched)``: one image per prompt, [B, 3, H, W] in [0, 1], from noise drawn with that
seed, by the model with (``patched``) or without the patch. Same seed, same noise, patched or not."""


def view_drawer(view: ModelView, patch: AblationPatch, strength: float, sampling: Sampling) -> DrawFn:
    """Drawing from a model view, the patch applied in place for the patched draws (restored exactly after)."""

    @torch.no_grad()
    def draw(prompts: list[str], seed: int, patched: bool) -> Tensor:
        with apply_patch(view, patch, strength) if patched else contextlib.nullcontext():
            latents = sample_latents(view, prompts, torch.arange(len(prompts)), sampling.steps, sampling.guidance,
                                     sampling.batch_size, seed, sampling.latent_size)
        return torch.cat([view.decode(latents[s:s + sampling.batch_size].to(view.device)).cpu()
                          for s in range(0, len(latents), sampling.batch_size)])

    return draw


def evaluate_clip(view: ModelView, patch: AblationPatch, scorer: ClipScorer, target: str, anchor: str,
                  kind: Kind = "object", per_set: int = 16, seed: int = 0, strength: float = 1.0,
                  neighbours: list[str] | None = None, sampling: Sampling | None = None,
                  on_progress: ProgressFn | None = None) -> ClipEvaluation:
    """Sample every prompt set before and after the patch (same noise), and the neighbours once more unpatched
    (other noise); score with CLIP. ``on_progress`` gets ("evaluate", draws done, draws total)."""
    sampling = sampling or Sampling()
    sets, anchor_twins, neighbours_from = clip_prompt_sets(target, anchor, kind, per_set, seed, neighbours)
    evaluation = score_with_clip(view_drawer(view, patch, strength, sampling), scorer, sets, anchor_twins, seed,
                                 on_progress)
    evaluation.neighbours_from, evaluation.cost = neighbours_from, estimate_cost(view, sets, sampling)
    return evaluation


def score_with_clip(draw: DrawFn, scorer: ClipScorer, sets: list[PromptSet], anchor_twins: list[str], seed: int = 0,
                    on_progress: ProgressFn | None = None) -> ClipEvaluation:
    """The figures for any way of drawing images (a model view here; ComfyUI's or A1111's samplers elsewhere):
    ``sets`` are ``clip_prompt_sets``'s (target first, then anchor, then "surrounding: X" sets)."""
    report = on_progress or no_progress
    draws = sum(3 if s.name.startswith("surrounding") else 2 for s in sets)
    done = 0
    report(Progress("evaluate", done, draws))
    features: dict[str, dict[str, Tensor]] = {}
    for index, prompt_set in enumerate(sets):
        noise_seed = seed + EVAL_SEED_OFFSET + index
        found = {when: scorer.image_features(draw(prompt_set.prompts, noise_seed, when == "after"))
                 for when in ("before", "after")}
        done += 2
        if prompt_set.name.startswith("surrounding"):
            found["floor"] = scorer.image_features(draw(prompt_set.prompts, noise_seed + FLOOR_SEED_OFFSET, False))
            done += 1
        report(Progress("evaluate", done, draws))
        features[prompt_set.name] = found
    texts = sorted({p for s in sets for p in s.prompts})
    text_of = dict(zip(texts, scorer.text_features(texts)))
    results = [_set_result(s, features[s.name], text_of, seed) for s in sets]
    summary = _summary(sets, features, text_of, anchor_twins, results, seed)
    return ClipEvaluation(sets[0].concept, sets[1].concept, scorer.name, "", results, summary)


def _stack(text_of: dict[str, Tensor], prompts: list[str]) -> Tensor:
    return torch.stack([text_of[p] for p in prompts])


def _set_result(prompt_set: PromptSet, found: dict[str, Tensor], text_of: dict[str, Tensor],
                seed: int) -> ClipSetResult:
    texts = _stack(text_of, prompt_set.prompts)
    before = metrics.mean_and_spread(metrics.clip_scores(found["before"], texts))
    after = metrics.mean_and_spread(metrics.clip_scores(found["after"], texts))
    result = ClipSetResult(prompt_set.name, prompt_set.concept, len(prompt_set.prompts), before[0], after[0],
                           before[1], after[1])
    if "floor" in found and len(prompt_set.prompts) >= 2:
        result.kid, result.kid_spread = metrics.kid_with_spread(found["before"], found["after"], seed=seed)
        result.kid_floor, result.kid_floor_spread = metrics.kid_with_spread(found["before"], found["floor"],
                                                                            seed=seed)
    return result


def _summary(sets: list[PromptSet], features: dict[str, dict[str, Tensor]], text_of: dict[str, Tensor],
             anchor_twins: list[str], results: list[ClipSetResult], seed: int) -> dict[str, float]:
    target_texts, anchor_texts = _stack(text_of, sets[0].prompts), _stack(text_of, anchor_twins)
    summary: dict[str, float] = {}
    for when in ("before", "after"):
        hits = metrics.classified_as_target(features["target"][when], target_texts, anchor_texts)
        summary[f"clip_accuracy_{when}"], summary[f"clip_accuracy_{when}_spread"] = metrics.share_and_spread(hits)
    by_name = {r.name: r for r in results}
    for name in ("target", "anchor"):
        summary[f"clip_score_{name}_before"] = by_name[name].clip_score_before
        summary[f"clip_score_{name}_after"] = by_name[name].clip_score_after
    surrounding = [r for r in results if r.name.startswith("surrounding")]
    if surrounding:
        summary["clip_score_neighbours_before"] = sum(r.clip_score_before for r in surrounding) / len(surrounding)
        summary["clip_score_neighbours_after"] = sum(r.clip_score_after for r in surrounding) / len(surrounding)
        pooled = {when: torch.cat([features[r.name][when] for r in surrounding]) for when in ("before", "after",
                                                                                              "floor")}
        summary["neighbour_kid"], summary["neighbour_kid_spread"] = metrics.kid_with_spread(
            pooled["before"], pooled["after"], seed=seed)
        summary["neighbour_kid_floor"], summary["neighbour_kid_floor_spread"] = metrics.kid_with_spread(
            pooled["before"], pooled["floor"], seed=seed)
    return summary
