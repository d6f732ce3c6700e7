"""Soft-prompt inversion (textual inversion against the erased model, as Circumventing Concept Erasure).

The attacker draws images of the target from the unpatched model (the training captions), then learns one new token
embedding on the model under attack so that captions carrying the placeholder in the target's place denoise those
images, starting from the anchor's own embedding. The learned token is then used in the evaluation captions. Against
the unpatched model the same inversion must bring the target back, or the attack is broken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...methods.robust.adversary import invert_embedding
from ...methods.robust.token_hook import PLACEHOLDER, encode_with
from ...models.view import ModelView
from .common import SUCCESS_SEED_OFFSET, Outcome, cycle, success_rate, target_images
from .world import TOY_WORLD, AttackWorld


@dataclass(frozen=True)
class SoftPromptBudget:
    images: int = 32
    steps: int = 300
    learning_rate: float = 1e-2
    batch_size: int = 8
    samples: int = 48

    def as_json(self) -> dict:
        return {"target_images": self.images, "steps": self.steps, "learning_rate": self.learning_rate,
                "batch_size": self.batch_size, "samples": self.samples, "tokens": 1, "init": "anchor embedding"}


SMALL = SoftPromptBudget(images=16, steps=40, samples=16)


def with_placeholder(prompts: list[str], target: str) -> list[str]:
    return [p.replace(target, PLACEHOLDER) for p in prompts]


def prepare(view: ModelView, target: str, budget: SoftPromptBudget, seed: int,
            world: AttackWorld = TOY_WORLD) -> tuple:
    """On the unpatched model: the images of the target the attacker learns from, and their captions."""
    return target_images(view, target, budget.images, seed, world)


def run(view: ModelView, target: str, anchor: str, budget: SoftPromptBudget, seed: int, report,
        prepared: tuple, world: AttackWorld = TOY_WORLD) -> Outcome:
    latents, captions = prepared
    inversion = invert_embedding(view, latents, with_placeholder(captions, target), anchor, budget.steps,
                                 budget.learning_rate, budget.batch_size, seed,
                                 lambda done, total, loss: report(done, total + 1))
    prompts = cycle(with_placeholder(world.captions(target, "eval"), target), budget.samples)
    with torch.no_grad():
        cond = encode_with(view, prompts, inversion.vectors)
    success, _ = success_rate(view, cond, target, seed + SUCCESS_SEED_OFFSET + 1, world)
    report(budget.steps + 1, budget.steps + 1)
    losses = inversion.losses
    tail = losses[-max(1, len(losses) // 10):]
    return Outcome(success, len(prompts), {"loss_first": round(losses[0], 6),
                                           "loss_last_tenth": round(sum(tail) / len(tail), 6),
                                           "vector_norm": round(float(inversion.vectors[0].norm()), 4),
                                           "example": prompts[0]})
