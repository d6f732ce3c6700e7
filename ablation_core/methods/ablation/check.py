"""After training: did the run change the model? Measured on prompts the run did not train on.

``target_anchor_gap``: how far the target prompt's noise prediction is from its anchor twin's, relative to how far
the anchor's is from the unconditional prediction. Before the run it is the concept's own signal; after it, what is
left of it: the target's prediction against the anchor's as the patched model now makes it (the target should behave
like the anchor does, and where the anchor itself moved, measuring against its old prediction would count the
anchor's move as the target's failure). ``erased_fraction`` = 1 - after / before: near 1 when the target now behaves
like its anchor, near 0 when the run barely changed anything (then the caller warns, saying what to try).
``anchor_drift``: how much the anchor's own prediction moved, on the same scale (should stay near 0).

Each target is measured on the anchor images drawn for its own pair, with its own anchor's prompts: in a joint run
(snoopy -> dog, van gogh -> painting, bird -> fish) a check of van gogh on photos of dogs, or with "a photo of a dog"
as a painting's prompt, read -54 % for a run that erased van gogh (issue 25).
"""

from __future__ import annotations

import contextlib
import random

import torch
from torch import Tensor

from ...models.view import Conditioning, ModelView
from .. import prompts as prompt_lib
from .adapters import AdapterSet
from .settings import AblationConfig

CHECK_PROMPTS = 8
SAMPLES_PER_PROMPT = 2
WEAK_EFFECT = 0.5


def held_out_pairs(config: AblationConfig, trained_on: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """For each target: anchor prompts of the same kind the run did not train on (the config's own list when it has
    one), and their target twins."""
    seen = set(trained_on)
    targets = [t for t, _ in config.pairs()]
    others = [a for _, a in config.pairs()]
    found = []
    for (target, anchor), kind in zip(config.pairs(), config.kinds()):
        if config.held_out_prompts:
            candidates = prompt_lib.prompts_for(anchor, config.held_out_prompts, kind, others)
        else:
            candidates = [p for p in prompt_lib.anchor_prompt_bank(anchor, kind) if p not in seen]
        candidates = candidates or prompt_lib.prompts_for(anchor, trained_on, kind, others)
        # as in training: an anchor prompt naming another target of the run would measure that one's erasure too
        candidates = prompt_lib.without_targets(candidates, targets)
        anchors = random.Random(config.seed + 1).sample(candidates, min(CHECK_PROMPTS, len(candidates)))
        found.append((target, anchors, prompt_lib.target_prompts(anchors, anchor, target, kind)))
    return found


def combine(checks: dict[str, dict[str, float]]) -> dict[str, object]:
    """One figure set for the run: each target's, and overall the weakest erasure and the largest drift."""
    if len(checks) == 1:
        return next(iter(checks.values()))
    combined: dict[str, object] = {
        "held_out_prompts": sum(c["held_out_prompts"] for c in checks.values()),
        "samples": sum(c["samples"] for c in checks.values()),
        "erased_fraction": min(c["erased_fraction"] for c in checks.values()),
        "anchor_drift": max(c["anchor_drift"] for c in checks.values()),
        "per_target": checks,
    }
    return combined


@torch.no_grad()
def measure_effect(view: ModelView, adapters: AdapterSet, config: AblationConfig, latents: Tensor,
                   anchor_prompts: list[str], target_prompts: list[str],
                   base: AdapterSet | None = None) -> dict[str, float]:
    """The held-out gaps before and after (adapters switched off and on), from the run's own anchor latents: those
    of this pair's anchor (``pair_latents``), so the noisy images are ones the anchor prompts describe.

    "Before" is the original model: an earlier patch the run built on (``base``) is switched off too, so the
    figures are the effect of everything the resulting patch holds."""
    count = len(anchor_prompts) * SAMPLES_PER_PROMPT
    generator = torch.Generator().manual_seed(config.seed + 2)
    pick = torch.arange(count) % len(latents)
    x0 = latents[pick].to(view.device, view.dtype)
    noise = torch.randn(x0.shape, generator=generator).to(view.device, view.dtype)
    steps = view.schedule.steps
    t = torch.linspace(steps * 0.1, steps * 0.9, count).long().to(view.device)
    x_t = view.schedule.noisy(x0, noise, t)
    prompt = torch.arange(count) % len(anchor_prompts)
    anchors = [anchor_prompts[i] for i in prompt.tolist()]
    targets = [target_prompts[i] for i in prompt.tolist()]

    totals = {"scale": 0.0, "gap_before": 0.0, "gap_after": 0.0, "drift": 0.0}
    batch = max(1, config.batch_size)
    for start in range(0, count, batch):
        chunk = slice(start, start + batch)
        x, tt = x_t[chunk], t[chunk]
        with adapters.disabled(), base.disabled() if base is not None else contextlib.nullcontext():
            unconditional = _eps(view, x, tt, view.encode([""] * len(x)))
            anchor_before = _eps(view, x, tt, view.encode(anchors[chunk]))
            target_before = _eps(view, x, tt, view.encode(targets[chunk]))
        anchor_after = _eps(view, x, tt, view.encode(anchors[chunk]))
        target_after = _eps(view, x, tt, view.encode(targets[chunk]))
        totals["scale"] += float((anchor_before - unconditional).square().sum())
        totals["gap_before"] += float((target_before - anchor_before).square().sum())
        totals["gap_after"] += float((target_after - anchor_after).square().sum())
        totals["drift"] += float((anchor_after - anchor_before).square().sum())
    scale = max(totals["scale"], 1e-12)
    before, after = totals["gap_before"] / scale, totals["gap_after"] / scale
    return {
        "held_out_prompts": len(anchor_prompts),
        "samples": count,
        "target_anchor_gap_before": round(before, 6),
        "target_anchor_gap_after": round(after, 6),
        "erased_fraction": round(1 - after / before, 4) if before > 0 else 0.0,
        "anchor_drift": round(totals["drift"] / scale, 6),
    }


def pair_latents(latents: Tensor, image_prompt: Tensor, prompt_pair: list[int], pair: int) -> Tensor:
    """The anchor images drawn for pair ``pair``'s prompts (``prompt_pair[i]``: the pair of anchor prompt ``i``).

    In a joint run the images are shuffled across pairs; measuring "van gogh" on photos of fish drawn for
    bird -> fish gives a gap that says nothing about van gogh (it read -54 % on a run that erased it)."""
    own = torch.tensor([prompt_pair[i] == pair for i in image_prompt.tolist()], dtype=torch.bool)
    return latents[own.to(latents.device)] if bool(own.any()) else latents


def _eps(view: ModelView, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    return view.predict(x, t, cond).float()


def weak_effect_warning(check: dict[str, float], config: AblationConfig) -> str | None:
    """A message when the run barely moved the target toward its anchor on held-out prompts, else None."""
    if check["erased_fraction"] >= WEAK_EFFECT:
        return None
    weakest = ""
    if "per_target" in check:
        name = min(check["per_target"], key=lambda t: check["per_target"][t]["erased_fraction"])
        weakest = f" ('{name}')"
    return (f"the run barely changed the model: on {check['held_out_prompts']} prompts it did not train on, the "
            f"target's{weakest} prediction moved only {max(check['erased_fraction'], 0):.0%} of the way to the "
            "anchor's. Try "
            f"more steps (now {config.steps}), a larger learning rate (now {config.learning_rate:g}) or the "
            f"'paper' preset; check that the target is a word this model knows")
