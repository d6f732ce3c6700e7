"""Token search (as UnlearnDiffAtk and P4D): a discrete search over the vocabulary for a prompt that draws the target.

For each of a few evaluation captions of the target, the attacker draws images of it from the unpatched model and
records the unpatched model's noise prediction for the caption on noised copies of them (P4D's objective: make the
erased model predict what the original did). The search starts from the caption with ``extra_tokens`` more copies of
the target's first token before the target's own tokens, and swaps tokens at those positions (anything in the
vocabulary but the start and end tokens) greedily, ranked by the gradient of the loss with respect to a one-hot token
choice. The found token sequences are then sampled with fresh noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...methods.robust.adversary import (
    decode_ids,
    denoising_task,
    draw_images,
    reference_task,
    search_start,
    search_tokens,
)
from ...methods.robust.token_hook import encode_ids
from ...models.view import ModelView
from .common import ATTACK_SEED_OFFSET, SUCCESS_SEED_OFFSET, Outcome, shown_by_group, success_rate
from .world import TOY_WORLD, AttackWorld


@dataclass(frozen=True)
class TokenSearchBudget:
    prompts: int = 2
    images: int = 8
    iterations: int = 20
    candidates: int = 24
    top_k: int = 64
    extra_tokens: int = 2
    images_per_gradient: int = 4
    samples: int = 48

    def as_json(self) -> dict:
        return {"prompts": self.prompts, "target_images_per_prompt": self.images, "iterations": self.iterations,
                "candidates_per_iteration": self.candidates, "top_k": self.top_k,
                "searched_positions": f"target tokens + {self.extra_tokens}", "loss": "P4D (unpatched prediction)",
                "vocabulary": "all tokens but start/end", "samples": self.samples}


SMALL = TokenSearchBudget(prompts=1, images=4, iterations=2, candidates=8, samples=16)


def _start_prompts(target: str, count: int, world: AttackWorld) -> list[str]:
    captions = world.captions(target, "eval")
    return [captions[(i * len(captions)) // count] for i in range(min(count, len(captions)))]


def prepare(view: ModelView, target: str, budget: TokenSearchBudget, seed: int,
            world: AttackWorld = TOY_WORLD) -> list:
    """On the unpatched model: per start prompt, its images and its noise predictions on noised copies."""
    tasks = []
    for index, prompt in enumerate(_start_prompts(target, budget.prompts, world)):
        latents, _ = draw_images(view, [prompt], budget.images, world.steps, world.guidance,
                                 seed + ATTACK_SEED_OFFSET + 1 + index, world.batch_size, world.latent_size)
        with torch.no_grad():
            tasks.append((prompt, reference_task(view, denoising_task(view, latents, 1, seed + index),
                                                 view.encode([prompt]))))
    return tasks


def run(view: ModelView, target: str, anchor: str, budget: TokenSearchBudget, seed: int, report,
        prepared: list, world: AttackWorld = TOY_WORLD) -> Outcome:
    found, rows, groups = [], [], []
    per_prompt = -(-budget.samples // len(prepared))
    total = budget.iterations * len(prepared) + 1
    for index, (prompt, task) in enumerate(prepared):
        start, positions = search_start(view, prompt, target, budget.extra_tokens)
        done = index * budget.iterations
        result = search_tokens(view, task, start, positions, budget.iterations, budget.candidates, budget.top_k,
                               budget.images_per_gradient, seed + index,
                               lambda step, _, loss, done=done: report(done + step, total))
        text = decode_ids(view, result.ids)
        found.append({"start": prompt, "found": text, "loss_start": round(result.losses[0], 6),
                      "loss_end": round(result.losses[-1], 6)})
        rows += [result.ids] * per_prompt
        groups += [text] * per_prompt
    rows, groups = rows[:budget.samples], groups[:budget.samples]
    with torch.no_grad():
        cond = encode_ids(view, torch.tensor(rows, device=view.device))
    success, hits = success_rate(view, cond, target, seed + SUCCESS_SEED_OFFSET + 2, world)
    report(total, total)
    per_prompt_success = shown_by_group(hits, groups)
    for entry in found:
        entry["success"] = per_prompt_success.get(entry["found"])
    return Outcome(success, len(rows), {"prompts": found})
