"""After training: did the run change the model? Measured on prompts the run did not train on.

``target_anchor_gap``: how far the target prompt's noise prediction is from its anchor twin's, relative to how far
the anchor's is from the unconditional prediction. Before the run it is the concept's own signal; after it, what is
left of it: the target's prediction against the anchor's as the patched model now makes it (the target should behave
like the anchor does, and where the anchor itself moved, measuring against its old prediction would count the
anchor's move as the target's failure). ``erased_fraction`` = 1 - after / before: near 1 when the target now behaves
like its anchor, near 0 when the run barely changed anything (then the caller warns, saying what to try).
``anchor_drift``: how much the anchor's own prediction moved, on the same scale (should stay near 0).

The gap is a sum over noise levels and reads 0.88-0.94 whether a target is erased or still drawn in 88 % of its
images (toy world, a joint run of three targets), so the check also draws: ``CHECK_IMAGES`` held-out target prompts,
one image each, from the same noise with the original model (the target's image and its anchor twin's) and with the
patched one (the target's). ``images_still_target`` is the share of patched images nearer the original image of the
target than to the anchor's: on toy objects and instances from 5 steps to the default (per-set 16) it read 0.88-1.0
where the classifier still saw the target in 88-100 % of the evaluation's images, 0.38-0.5 at 12-62 %, and 0-0.19 at
0-6 %. The images are drawn as a user draws them (guided; a distilled model at its own guidance) in
``CHECK_SAMPLER_STEPS`` solver steps (no more than the run's own; nor more images than its anchor images). A style
is checked in the phrasing it was trained on ("..., in the style of monet"): a run that erased those but not "a
monet painting of a cat" reads 0 (toy, monet -> painting at 10 steps).

Each target is measured on the anchor images drawn for its own pair, with its own anchor's prompts: in a joint run
(snoopy -> dog, van gogh -> painting, bird -> fish) a check of van gogh on photos of dogs, or with "a photo of a
dog" as a painting's prompt, read -54 % for a run that erased van gogh (issue 25).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import torch
from torch import Tensor

from ...models.sampling import sample_latents
from ...models.view import Conditioning, ModelView
from .. import prompts as prompt_lib
from .adapters import AdapterSet
from .settings import AblationConfig, preset_values

CHECK_PROMPTS = 8
SAMPLES_PER_PROMPT = 2
CHECK_PASSES = 5  # per sample: unconditional, anchor and target before, anchor and target after
CHECK_IMAGES = 8
CHECK_SAMPLER_STEPS = 8
WEAK_EFFECT = 0.5
STILL_TARGET = 0.25  # warn above: 3 of 8 images or more


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


def check_guidance(view: ModelView, config: AblationConfig) -> float:
    """The guidance the check draws with: a distilled model's own (the run's, resolved for the view), else the
    family's thorough preset's, which is how people draw."""
    if view.guidance_input:
        return float(config.guidance)
    return float(preset_values(view.family.name, "thorough")["guidance"])


def check_evaluations(view: ModelView, config: AblationConfig, prompts: int) -> int:
    """UNet evaluations of the check of one target with ``prompts`` held-out prompts: the gap's and the drawn
    images'."""
    return gap_evaluations(prompts) + drawn_evaluations(config, prompts, view.guidance_input)


def gap_evaluations(prompts: int) -> int:
    """UNet evaluations of the gap (``measure_effect``) over ``prompts`` held-out prompts."""
    return CHECK_PASSES * SAMPLES_PER_PROMPT * prompts


def drawn_evaluations(config: AblationConfig, prompts: int, guidance_input: bool) -> int:
    """UNet evaluations of the drawn images (``drawn_effect``) of one target with ``prompts`` held-out prompts: three
    sets of ``drawn_images``."""
    return 3 * drawn_images(config, prompts) * drawn_steps(config) * drawn_passes(guidance_input)


def drawn_images(config: AblationConfig, prompts: int) -> int:
    """Images the check draws per set: ``CHECK_IMAGES``, no more than the held-out prompts or the run's anchor
    images (a run of a few images and steps, as in tests, keeps a check of its size)."""
    return max(1, min(CHECK_IMAGES, prompts, int(config.anchor_images)))


def drawn_steps(config: AblationConfig) -> int:
    """Solver steps of the drawn check: ``CHECK_SAMPLER_STEPS``, no more than the run's own."""
    return max(1, min(CHECK_SAMPLER_STEPS, int(config.sampler_steps)))


def check_prompts_encoded(targets: int) -> int:
    """Prompts the check encodes for ``targets`` targets: the gap's anchor prompts and twins, and the drawn
    images'."""
    return 2 * CHECK_PROMPTS * targets + drawn_prompts_encoded(targets)


def drawn_prompts_encoded(targets: int) -> int:
    """Prompts the drawn images encode for ``targets`` targets at the presets' sizes: three sets of prompts, each
    with its empty prompt."""
    return 3 * (min(CHECK_IMAGES, CHECK_PROMPTS) + 1) * targets


def drawn_passes(guidance_input: bool) -> int:
    """UNet evaluations per drawn image and solver step: two (guided), one on a distilled model."""
    return 1 if guidance_input else 2  # the thorough preset's guidance is above 1 on every family


def check_pair(view: ModelView, adapters: AdapterSet, config: AblationConfig, latents: Tensor,
               anchor_prompts: list[str], target_prompts: list[str], base: AdapterSet | None = None,
               report: Callable[[int], None] | None = None) -> dict[str, float]:
    """Both measures of one target: the gap (``measure_effect``) and the drawn images (``drawn_effect``);
    ``report(UNet evaluations done)``, up to ``check_evaluations``."""
    done = report or (lambda _evaluations: None)
    gap = gap_evaluations(len(anchor_prompts))
    found = measure_effect(view, adapters, config, latents, anchor_prompts, target_prompts, base, done)  # to gap
    found.update(drawn_effect(view, adapters, config, anchor_prompts, target_prompts, base,
                              lambda evaluations: done(gap + int(evaluations))))
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
        "images": sum(c.get("images", 0) for c in checks.values()),
        "images_still_target": max(c.get("images_still_target", 0.0) for c in checks.values()),
        "per_target": checks,
    }
    return combined


@torch.no_grad()
def measure_effect(view: ModelView, adapters: AdapterSet, config: AblationConfig, latents: Tensor,
                   anchor_prompts: list[str], target_prompts: list[str], base: AdapterSet | None = None,
                   report: Callable[[int], None] | None = None) -> dict[str, float]:
    """The held-out gaps before and after (adapters switched off and on), from the run's own anchor latents: those
    of this pair's anchor (``pair_latents``), so the noisy images are ones the anchor prompts describe.
    ``report(UNet evaluations done)`` after each batch (the whole gap was one step: 129 s on a CPU in ComfyUI).

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
        if report is not None:
            report(CHECK_PASSES * min(start + batch, count))
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


@torch.no_grad()
def drawn_effect(view: ModelView, adapters: AdapterSet, config: AblationConfig, anchor_prompts: list[str],
                 target_prompts: list[str], base: AdapterSet | None = None,
                 report: Callable[[float], None] | None = None) -> dict[str, float]:
    """Images of held-out target prompts from the same noise: the original model's of the target and of its anchor
    twin, and the patched model's of the target. ``images_still_target``: the share of patched images nearer the
    original target image than the anchor's (0 when each one now follows the anchor). ``report(evaluations)``."""
    count, steps = drawn_images(config, len(anchor_prompts)), drawn_steps(config)
    index = torch.arange(count) % len(anchor_prompts)
    guidance = check_guidance(view, config)
    per_set = drawn_evaluations(config, len(anchor_prompts), view.guidance_input) // 3
    batch, seed = max(1, int(config.sample_batch_size)), config.seed + 3
    drawn: list[Tensor] = []

    def draw(prompts: list[str]) -> Tensor:
        done = len(drawn) * per_set

        def step(images: float, _total: int) -> None:
            if report is not None:
                report(done + per_set * images / count)
        drawn.append(sample_latents(view, prompts[:count], index, steps, guidance, batch, seed, config.latent_size,
                                    on_progress=step))
        return drawn[-1]

    with adapters.disabled(), base.disabled() if base is not None else contextlib.nullcontext():
        anchor_before, target_before = draw(anchor_prompts), draw(target_prompts)
    target_after = draw(target_prompts)
    to_target = (target_after - target_before).flatten(1).square().sum(1)
    to_anchor = (target_after - anchor_before).flatten(1).square().sum(1)
    return {"images": count, "images_still_target": round(float((to_target < to_anchor).float().mean()), 4)}


def pair_latents(latents: Tensor, image_prompt: Tensor, prompt_pair: list[int], pair: int) -> Tensor:
    """The anchor images drawn for pair ``pair``'s prompts (``prompt_pair[i]``: the pair of anchor prompt ``i``).

    In a joint run the images are shuffled across pairs; measuring "van gogh" on photos of fish drawn for
    bird -> fish gives a gap that says nothing about van gogh (it read -54 % on a run that erased it)."""
    own = torch.tensor([prompt_pair[i] == pair for i in image_prompt.tolist()], dtype=torch.bool)
    return latents[own.to(latents.device)] if bool(own.any()) else latents


def _eps(view: ModelView, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    return view.predict(x, t, cond).float()


def check_summary(check: dict) -> str:
    """"the target moved 96% of the way to the anchor; 0% of 8 images drawn for it stay nearer the original's" (a
    joint run's weakest figures), for consoles and nodes."""
    found = f"the target moved {check['erased_fraction']:.0%} of the way to the anchor"
    per_target = check.get("per_target", {"": check})
    if all("images_still_target" in c for c in per_target.values()):
        name = max(per_target, key=lambda t: per_target[t]["images_still_target"])
        drawn = per_target[name]
        found += (f"; {drawn['images_still_target']:.0%} of {drawn['images']} images drawn for "
                  f"{repr(name) if name else 'it'} stay nearer the original's")
    return found


def weak_effect_warning(check: dict[str, float], config: AblationConfig) -> str | None:
    """A message when the run barely moved a target toward its anchor on held-out prompts, or when the patched
    model still draws it in more than ``STILL_TARGET`` of the check's images; else None."""
    per_target = check.get("per_target", {config.pairs()[0][0]: check})
    try_this = (f"Try more steps (now {config.steps}), a larger learning rate (now {config.learning_rate:g}) or the "
                "'paper' preset; check that the target is a word this model knows")
    weakest = min(per_target, key=lambda t: per_target[t]["erased_fraction"])
    named = f" ('{weakest}')" if len(per_target) > 1 else ""
    if check["erased_fraction"] < WEAK_EFFECT:
        return (f"the run barely changed the model: on {check['held_out_prompts']} prompts it did not train on, the "
                f"target's{named} prediction moved only {max(check['erased_fraction'], 0):.0%} of the way to the "
                f"anchor's. {try_this}")
    still = max(per_target, key=lambda t: per_target[t].get("images_still_target", 0.0))
    share = per_target[still].get("images_still_target", 0.0)
    if share <= STILL_TARGET:
        return None
    return (f"the run did not erase '{still}' everywhere: of {per_target[still]['images']} images the patched model "
            f"drew for it on prompts it did not train on, {share:.0%} stay nearer the original model's image of it "
            f"than its anchor's (same noise). {try_this}")
