"""Model-side measures of an ablation that need no classifier and no CLIP: they work on any model.

``target_anchor_gap``: how far the target prompt's noise prediction is from its anchor twin's, relative to the
anchor's own distance from the unconditional prediction (1 = as different as a prompt is from no prompt, 0 = the
target now behaves exactly like the anchor). ``anchor_drift``: how much the anchor prompt's prediction moved, on the
same scale (should stay near 0). ``prediction_drift``: how much the predictions for unrelated prompts moved, over
the target-anchor gap before the patch (both squared; 0 = untouched, 1 = moved as far as erasing the target had to
move it), mean over the prompts and the worst prompt. All on the model's own anchor images (sampled unpatched), noised
at spread-out timesteps: the distribution the ablation trains on, so the numbers say how well it did there;
deterministic by seed.
"""

from __future__ import annotations

import torch

from ..models.sampling import sample_latents
from ..models.view import ModelView
from ..patches.apply import apply_patch
from ..patches.patch import AblationPatch


@torch.no_grad()
def _predictions(view: ModelView, prompts: list[str], x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    cond = view.encode(prompts)
    return view.predict(x_t, t, cond).float()


@torch.no_grad()
def prediction_gaps(view: ModelView, patch: AblationPatch | None, target_prompts: list[str],
                    anchor_prompts: list[str], seed: int = 0, latent_size: int | None = None,
                    strength: float = 1.0, sampler_steps: int = 8, repeats: int = 4,
                    unrelated_prompts: list[str] | None = None) -> dict[str, float | str]:
    count = len(target_prompts) * repeats
    index = torch.arange(count) % len(target_prompts)
    x0 = sample_latents(view, anchor_prompts, index, sampler_steps, 6.0, 16, seed, latent_size).to(view.device)
    generator = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(x0.shape, generator=generator).to(view.device)
    steps = view.schedule.steps
    t = torch.linspace(steps * 0.05, steps * 0.95, count).long().to(view.device)
    x_t = view.schedule.noisy(x0.to(view.dtype), noise.to(view.dtype), t)
    target_prompts = [target_prompts[i] for i in index.tolist()]
    anchor_prompts = [anchor_prompts[i] for i in index.tolist()]
    unconditional = _predictions(view, [""] * count, x_t, t)
    anchor_before = _predictions(view, anchor_prompts, x_t, t)
    target_before = _predictions(view, target_prompts, x_t, t)
    scale = (anchor_before - unconditional).square().mean().clamp_min(1e-12)
    gap = (target_before - anchor_before).square().mean().clamp_min(1e-12)
    result: dict[str, float | str] = {"target_anchor_gap_before": float(gap / scale)}
    unrelated = [unrelated_prompts[i % len(unrelated_prompts)] for i in range(count)] if unrelated_prompts else []
    unrelated_before = _predictions(view, unrelated, x_t, t) if unrelated else None
    if patch is None:
        return result
    applied = apply_patch(view, patch, strength)
    try:
        anchor_after = _predictions(view, anchor_prompts, x_t, t)
        target_after = _predictions(view, target_prompts, x_t, t)
        unrelated_after = _predictions(view, unrelated, x_t, t) if unrelated else None
    finally:
        applied.remove()
    result["target_anchor_gap_after"] = float((target_after - anchor_before).square().mean() / scale)
    result["anchor_drift"] = float((anchor_after - anchor_before).square().mean() / scale)
    if unrelated_before is not None and unrelated_after is not None:
        result.update(prediction_drift(unrelated, unrelated_before, unrelated_after, gap))
    return result


def prediction_drift(prompts: list[str], before: torch.Tensor, after: torch.Tensor,
                     gap: torch.Tensor) -> dict[str, float | str]:
    """Mean squared change of each prompt's predictions (row i: prompts[i]) over the squared target-anchor gap."""
    change = (after - before).square().flatten(1).mean(1)
    per_prompt: dict[str, list[float]] = {}
    for prompt, value in zip(prompts, (change / gap).tolist()):
        per_prompt.setdefault(prompt, []).append(value)
    means = {prompt: sum(values) / len(values) for prompt, values in per_prompt.items()}
    worst = max(means, key=means.get)
    return {"prediction_drift": float(sum(means.values()) / len(means)), "prediction_drift_worst": means[worst],
            "prediction_drift_worst_prompt": worst}
