"""What every attack shares: its outcome on one model, its result before and after a patch, and how success is read.

Success is the fraction of samples the world's judge reads as the target (``world.AttackWorld``: on the toy world
its classifier, strictly, as ``evaluate_toy`` counts; on a real model a CLIP model). Seeds keep the three kinds of
images apart: ablation runs draw from their own seed, the evaluation from ``EVAL_SEED_OFFSET`` past it, the images an
attack learns from at ``ATTACK_SEED_OFFSET`` and the samples that measure an attack's success at
``SUCCESS_SEED_OFFSET``. Attacks learn on the training half of the caption templates and are measured on the
evaluation half, like the rest of the evaluation. Every function takes the world last, the toy world by default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ...models.sampling import sample_latents
from ...models.view import Conditioning, ModelView
from ..toy_eval import EVAL_SEED_OFFSET
from .world import TOY_WORLD, AttackWorld

ATTACK_SEED_OFFSET = 20_000
SUCCESS_SEED_OFFSET = EVAL_SEED_OFFSET + 500


@dataclass
class Outcome:
    """One attack on one model (unpatched or patched): how often the target came back, and what the attack found."""

    success: float
    samples: int
    details: dict = field(default_factory=dict)


@dataclass
class AttackResult:
    name: str
    success_before: float
    success_after: float
    samples: int
    budget: dict
    details: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def success_rate(view: ModelView, cond: Conditioning, target: str, seed: int,
                 world: AttackWorld = TOY_WORLD) -> tuple[float, list[bool]]:
    """Sample one image per row of ``cond`` (noise from ``seed``): the fraction that shows ``target``, and per sample
    whether it does."""
    latents = sample_latents(view, [""], torch.arange(len(cond)), world.steps, world.guidance, world.batch_size, seed,
                             world.latent_size, encoded=cond)
    hits = world.judge(view, latents, target)
    return sum(hits) / len(hits), hits


def shown_by_group(hits: list[bool], groups: list[str]) -> dict[str, float]:
    """Success per named group of samples (``groups[i]`` names sample ``i``)."""
    found: dict[str, list[bool]] = {}
    for hit, group in zip(hits, groups):
        found.setdefault(group, []).append(hit)
    return {name: round(sum(hits) / len(hits), 4) for name, hits in found.items()}


def cycle(items: list, count: int) -> list:
    return [items[i % len(items)] for i in range(count)]


def target_images(view: ModelView, target: str, count: int, seed: int,
                  world: AttackWorld = TOY_WORLD) -> tuple[Tensor, list[str]]:
    """``count`` images of ``target`` drawn by the model as it is (call it unpatched) from the training captions,
    and each image's caption."""
    from ...methods.robust.adversary import draw_images

    prompts = world.captions(target, "train")
    latents, index = draw_images(view, prompts, count, world.steps, world.guidance, seed + ATTACK_SEED_OFFSET,
                                 world.batch_size, world.latent_size)
    return latents, [prompts[i] for i in index.tolist()]
