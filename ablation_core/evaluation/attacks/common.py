"""What every attack shares: its outcome on one model, its result before and after a patch, and how success is read.

Success is the fraction of samples the toy world's classifier reads as the target (strictly, as ``evaluate_toy``
counts). Seeds keep the three kinds of images apart: ablation runs draw from their own seed, the evaluation from
``EVAL_SEED_OFFSET`` past it, the images an attack learns from at ``ATTACK_SEED_OFFSET`` and the samples that measure
an attack's success at ``SUCCESS_SEED_OFFSET``. Attacks learn on the training half of the caption templates and are
measured on the evaluation half, like the rest of the evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ...models.sampling import sample_latents
from ...models.view import Conditioning, ModelView
from ..toy_eval import EVAL_SEED_OFFSET, _shows

ATTACK_SEED_OFFSET = 20_000
SUCCESS_SEED_OFFSET = EVAL_SEED_OFFSET + 500
SAMPLE_BATCH = 64


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


def sampling_settings() -> tuple[int, float]:
    from ...toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    return DEFAULT_STEPS, DEFAULT_GUIDANCE


@torch.no_grad()
def success_rate(view: ModelView, cond: Conditioning, target: str, seed: int) -> tuple[float, list]:
    """Sample one image per row of ``cond`` (noise from ``seed``) and the fraction that shows ``target``."""
    from ...toy.classifier import classify, load_toy_classifier

    steps, guidance = sampling_settings()
    latents = sample_latents(view, [""], torch.arange(len(cond)), steps, guidance, SAMPLE_BATCH, seed, encoded=cond)
    predictions = classify(load_toy_classifier(), latents.clamp(-1, 1))
    return sum(_shows(p, target) for p in predictions) / len(predictions), predictions


def shown_by_group(predictions: list, target: str, groups: list[str]) -> dict[str, float]:
    """Success per named group of samples (``groups[i]`` names sample ``i``)."""
    found: dict[str, list[bool]] = {}
    for prediction, group in zip(predictions, groups):
        found.setdefault(group, []).append(_shows(prediction, target))
    return {name: round(sum(hits) / len(hits), 4) for name, hits in found.items()}


def cycle(items: list, count: int) -> list:
    return [items[i % len(items)] for i in range(count)]


def target_images(view: ModelView, target: str, count: int, seed: int) -> tuple[Tensor, list[str]]:
    """``count`` images of ``target`` drawn by the model as it is (call it unpatched) from the training templates,
    and each image's caption."""
    from ...methods.robust.adversary import draw_images
    from ...toy.prompts import captions_of

    prompts = captions_of(target, "train")
    steps, guidance = sampling_settings()
    latents, index = draw_images(view, prompts, count, steps, guidance, seed + ATTACK_SEED_OFFSET, SAMPLE_BATCH)
    return latents, [prompts[i] for i in index.tolist()]
